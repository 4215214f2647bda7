//! creditd: a prepaid-credit gate for AI usage.
//!
//! - [`pb`]: the generated `creditd.v1` protocol (client and server).
//! - [`domain`]: amounts, identifiers, grants, spend order, periods (pure).
//! - [`decision`]: the outcome types of the hot path.
//! - [`store`]: Redis hot state (`hot`, Lua in `src/lua/`) and PostgreSQL
//!   (`pg`), the source of truth.
//! - [`service`]: the operations, the group committer, background jobs.
//! - [`grpc`]: the tonic edge: validation, conversion, error mapping.
//! - [`auth`]: API keys, roles and the key cache.
//! - [`config`]: layered configuration (`src/default.toml`).
//! - [`app`]: assembly, serving and graceful shutdown.
//! - [`metrics`]: the Prometheus registry and its endpoint.
//! - [`demo`]: the demo tenant the quickstart seeds.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod config;
pub mod decision;
pub mod demo;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod service;
pub mod store;

/// The `creditd.v1` protocol, generated from `proto/`.
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("creditd.v1");

    /// Encoded descriptors of every creditd proto file (for reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("creditd_descriptor");
}
