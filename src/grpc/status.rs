//! `Error` → `tonic::Status`, in one exhaustive match. Every status
//! carries `google.rpc.ErrorInfo` (domain "creditd", a stable reason);
//! INVALID_ARGUMENT also carries `google.rpc.BadRequest` naming the field.
//! Internal causes are logged here and never sent.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::{Error, Reason};

const DOMAIN: &str = "creditd";

fn status(code: Code, reason: Reason, message: String) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(reason.as_str(), DOMAIN, std::collections::HashMap::new());
    Status::with_error_details(code, message, details)
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::InvalidArgument { field, reason, detail } => {
                let message = format!("{field} {detail}");
                let mut details = ErrorDetails::new();
                details.set_error_info(reason.as_str(), DOMAIN, std::collections::HashMap::new());
                details.add_bad_request_violation(field.as_str(), &message);
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::NotFound(reason, message) => status(Code::NotFound, reason, message),
            Error::AlreadyExists(reason, message) => status(Code::AlreadyExists, reason, message),
            Error::FailedPrecondition(reason, message) => status(Code::FailedPrecondition, reason, message),
            Error::Unimplemented(reason, message) => status(Code::Unimplemented, reason, message),
            Error::Unauthenticated(reason, message) => status(Code::Unauthenticated, reason, message),
            Error::PermissionDenied(reason, message) => status(Code::PermissionDenied, reason, message),
            Error::ResourceExhausted(reason, message) => status(Code::ResourceExhausted, reason, message),
            Error::Unavailable(source) => {
                tracing::warn!(error = %source, "backend unavailable");
                status(
                    Code::Unavailable,
                    Reason::BackendUnavailable,
                    "a backend is unavailable; retry with the same idempotency key".into(),
                )
            }
            Error::Loading => status(
                Code::Unavailable,
                Reason::TenantLoading,
                "the tenant's balances are being rebuilt from PostgreSQL (Redis lost them or was behind); \
                 nothing changed; retry with the same idempotency key"
                    .into(),
            ),
            Error::Internal(source) => {
                tracing::error!(error = %source, "internal error");
                status(Code::Internal, Reason::Internal, "internal error".into())
            }
        }
    }
}
