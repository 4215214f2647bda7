//! Storage: `hot` (Redis, the hot balances and holds) and `pg` (PostgreSQL,
//! the source of truth). `keys` names every Redis key.

pub mod hot;
pub mod keys;
pub mod pg;
