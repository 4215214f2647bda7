//! Storage: `hot` (Redis, the hot balances and holds) and `pg` (PostgreSQL,
//! the source of truth; `policy` holds its credit-policy queries). `keys`
//! names every Redis key.

pub mod alerts;
pub mod hot;
pub mod keys;
pub mod link;
pub mod pg;
pub mod policy;
pub mod reports;
