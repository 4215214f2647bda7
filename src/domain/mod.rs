//! Pure rules of the credit model: amounts, identifiers, grants and spend
//! order, billing periods, rating. No I/O, no tonic, sqlx or redis.

pub mod grant;
pub mod hmac;
pub mod ids;
pub mod limit;
pub mod money;
pub mod period;
pub mod pricing;

pub use money::Credits;
