//! The service's error type and its stable machine reasons.
//!
//! Every failure a client can see is one [`Error`] variant with a
//! [`Reason`]; `grpc::status` maps them to gRPC codes in one exhaustive
//! match. Store errors are classified here (transient → UNAVAILABLE,
//! otherwise INTERNAL) and their text never reaches a client.

use crate::{
    auth::AuthError,
    metrics::{Store, metrics},
    store::{hot::HotError, pg::PgError},
};

/// Stable `google.rpc.ErrorInfo.reason` values (domain "creditd").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    InvalidAmount,
    InvalidTtl,
    InvalidIdempotencyKey,
    InvalidLabels,
    InvalidAccountId,
    InvalidTenantId,
    InvalidReservationId,
    InvalidGrantId,
    InvalidArgument,
    TreeTooDeep,
    BalanceLimit,
    TenantNotFound,
    AccountNotFound,
    ParentNotFound,
    GrantNotFound,
    ReservationNotFound,
    TenantExists,
    AccountExists,
    IdempotencyKeyReused,
    ReservationCommitted,
    ReservationReleased,
    ReservationExpired,
    CommitReverted,
    CommitLimitExceeded,
    GrantNotLive,
    InvalidUsage,
    UnknownMeter,
    NoPrice,
    InvalidPrice,
    BackendUnavailable,
    TenantLoading,
    AllowanceNotFound,
    ChangeNotFound,
    ChangeDecided,
    GrantLimitReached,
    InvalidPeriod,
    MissingCredentials,
    InvalidCredentials,
    WrongRole,
    KeyNotFound,
    MalformedRequest,
    MessageTooLarge,
    TooManyStreams,
    RateLimited,
    Internal,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TenantLoading => "TENANT_LOADING",
            Reason::InvalidAmount => "INVALID_AMOUNT",
            Reason::InvalidTtl => "INVALID_TTL",
            Reason::InvalidIdempotencyKey => "INVALID_IDEMPOTENCY_KEY",
            Reason::InvalidLabels => "INVALID_LABELS",
            Reason::InvalidAccountId => "INVALID_ACCOUNT_ID",
            Reason::InvalidTenantId => "INVALID_TENANT_ID",
            Reason::InvalidReservationId => "INVALID_RESERVATION_ID",
            Reason::InvalidGrantId => "INVALID_GRANT_ID",
            Reason::InvalidArgument => "INVALID_ARGUMENT",
            Reason::TreeTooDeep => "TREE_TOO_DEEP",
            Reason::BalanceLimit => "BALANCE_LIMIT",
            Reason::TenantNotFound => "TENANT_NOT_FOUND",
            Reason::AccountNotFound => "ACCOUNT_NOT_FOUND",
            Reason::ParentNotFound => "PARENT_NOT_FOUND",
            Reason::GrantNotFound => "GRANT_NOT_FOUND",
            Reason::ReservationNotFound => "RESERVATION_NOT_FOUND",
            Reason::TenantExists => "TENANT_EXISTS",
            Reason::AccountExists => "ACCOUNT_EXISTS",
            Reason::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Reason::ReservationCommitted => "RESERVATION_COMMITTED",
            Reason::ReservationReleased => "RESERVATION_RELEASED",
            Reason::ReservationExpired => "RESERVATION_EXPIRED",
            Reason::CommitReverted => "COMMIT_REVERTED",
            Reason::CommitLimitExceeded => "COMMIT_LIMIT_EXCEEDED",
            Reason::GrantNotLive => "GRANT_NOT_LIVE",
            Reason::InvalidUsage => "INVALID_USAGE",
            Reason::UnknownMeter => "UNKNOWN_METER",
            Reason::NoPrice => "NO_PRICE",
            Reason::InvalidPrice => "INVALID_PRICE",
            Reason::BackendUnavailable => "BACKEND_UNAVAILABLE",
            Reason::AllowanceNotFound => "ALLOWANCE_NOT_FOUND",
            Reason::ChangeNotFound => "CHANGE_NOT_FOUND",
            Reason::ChangeDecided => "CHANGE_DECIDED",
            Reason::GrantLimitReached => "GRANT_LIMIT_REACHED",
            Reason::InvalidPeriod => "INVALID_PERIOD",
            Reason::MissingCredentials => "MISSING_CREDENTIALS",
            Reason::InvalidCredentials => "INVALID_CREDENTIALS",
            Reason::WrongRole => "WRONG_ROLE",
            Reason::KeyNotFound => "KEY_NOT_FOUND",
            Reason::MalformedRequest => "MALFORMED_REQUEST",
            Reason::MessageTooLarge => "MESSAGE_TOO_LARGE",
            Reason::TooManyStreams => "TOO_MANY_STREAMS",
            Reason::RateLimited => "RATE_LIMITED",
            Reason::Internal => "INTERNAL",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input; nothing changed. `field` is the request field's name.
    #[error("{field} {detail}")]
    InvalidArgument { field: String, reason: Reason, detail: String },
    #[error("{1}")]
    NotFound(Reason, String),
    #[error("{1}")]
    AlreadyExists(Reason, String),
    #[error("{1}")]
    FailedPrecondition(Reason, String),
    #[error("{1}")]
    Unimplemented(Reason, String),
    #[error("{1}")]
    Unauthenticated(Reason, String),
    #[error("{1}")]
    PermissionDenied(Reason, String),
    /// A limit was reached (a message too large, too many streams, too
    /// many calls); nothing changed.
    #[error("{1}")]
    ResourceExhausted(Reason, String),
    /// A backend is down or busy; retrying (with the same idempotency key)
    /// is safe. The source goes to the log only.
    #[error("a backend is unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The tenant's hot state is being rebuilt from PostgreSQL (Redis lost
    /// it, or was found behind); nothing changed, retrying is safe.
    #[error("the tenant's hot state is being rebuilt")]
    Loading,
    /// A bug or corrupted state. The source goes to the log only.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(field: impl Into<String>, reason: Reason, detail: impl std::fmt::Display) -> Self {
        Error::InvalidArgument { field: field.into(), reason, detail: detail.to_string() }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal(message.into().into())
    }
}

impl From<PgError> for Error {
    fn from(e: PgError) -> Self {
        match e {
            PgError::KeyReused => Error::FailedPrecondition(
                Reason::IdempotencyKeyReused,
                "the idempotency key was already used with a different payload".into(),
            ),
            e if e.is_transient() => {
                metrics().store_error(Store::postgres, true);
                Error::Unavailable(Box::new(e))
            }
            e => {
                metrics().store_error(Store::postgres, false);
                Error::Internal(Box::new(e))
            }
        }
    }
}

impl From<crate::domain::pricing::RateError> for Error {
    fn from(e: crate::domain::pricing::RateError) -> Self {
        use crate::domain::pricing::RateError;
        let reason = match &e {
            RateError::Empty | RateError::TooLarge => Reason::InvalidUsage,
            RateError::UnknownMeter { .. } => Reason::UnknownMeter,
            RateError::NoPrice { .. } => Reason::NoPrice,
        };
        let field = e.field();
        let detail = match &e {
            RateError::Empty => "has no items".to_string(),
            RateError::TooLarge => "costs more than one call may charge (1000000000 credits)".to_string(),
            RateError::UnknownMeter { meter, .. } => format!("{meter:?} is not a meter of the price catalog"),
            RateError::NoPrice { meter, model, .. } => format!("{model:?} has no price for meter {meter:?}"),
        };
        Error::invalid(field, reason, detail)
    }
}

impl From<AuthError> for Error {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing => Error::Unauthenticated(Reason::MissingCredentials, e.to_string()),
            AuthError::Invalid => Error::Unauthenticated(Reason::InvalidCredentials, e.to_string()),
            AuthError::Unavailable(source) => source.into(),
            AuthError::RateLimited => Error::ResourceExhausted(Reason::RateLimited, e.to_string()),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        PgError::from(e).into()
    }
}

/// Hot-store errors that carry no request context. Callers map the
/// contextual ones (unknown account, hold states, reused keys) first.
impl From<HotError> for Error {
    fn from(e: HotError) -> Self {
        match e {
            HotError::KeyReused => Error::FailedPrecondition(
                Reason::IdempotencyKeyReused,
                "the idempotency key was already used with a different payload".into(),
            ),
            HotError::AccountNotFound => Error::NotFound(Reason::AccountNotFound, "account not found".into()),
            HotError::NoHold => Error::NotFound(Reason::ReservationNotFound, "reservation not found".into()),
            HotError::TooDeep => Error::invalid("account_id", Reason::TreeTooDeep, "is in a tree deeper than allowed"),
            HotError::NotLoaded => Error::Loading,
            HotError::OverLimit(bound) => Error::FailedPrecondition(
                Reason::CommitLimitExceeded,
                format!("the cost is above the tenant's commit limit of {bound}; nothing changed"),
            ),
            e if e.is_transient() => {
                if matches!(e, HotError::Redis(_)) {
                    metrics().store_error(Store::redis, true);
                }
                Error::Unavailable(Box::new(e))
            }
            e => {
                metrics().store_error(Store::redis, false);
                Error::Internal(Box::new(e))
            }
        }
    }
}
