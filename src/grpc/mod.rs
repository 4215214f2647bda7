//! The gRPC edge: tonic services over the service layer. Requests are
//! validated and converted in `convert`, errors mapped in `status`; the
//! caller's tenant is resolved in `caller`; `observe` wraps every call in
//! a span and the RPC metrics.

pub mod admin;
pub mod alerts;
pub mod caller;
pub mod codec;
pub mod convert;
pub mod credit;
pub mod observe;
pub mod pricing;
pub mod reports;
pub mod status;
