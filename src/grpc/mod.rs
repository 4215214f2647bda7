//! The gRPC edge: tonic services over the service layer. Requests are
//! validated and converted in `convert`, errors mapped in `status`; the
//! caller's tenant is resolved in `caller`.

pub mod admin;
pub mod alerts;
pub mod caller;
pub mod convert;
pub mod credit;
pub mod pricing;
pub mod reports;
pub mod status;
