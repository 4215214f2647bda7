//! Integration suite: creditd driven through its gRPC API against real
//! PostgreSQL and Redis (see `harness`).

mod fault_tools;
mod harness;

mod abuse;
mod admin;
mod alerts;
mod bad_input;
mod cluster;
mod crash;
mod exactness;
mod faults;
mod fencing;
mod hot_path;
mod idempotency;
mod isolation;
mod limits;
mod observability;
mod pricing;
mod recovery;
mod reports;
mod scenarios;
mod security;
mod webhooks;
