//! How far one Commit may go past its hold, and how large one Charge may be
//! (a tenant setting; admin.proto `CommitLimit`).

use super::Credits;

/// A Commit whose cost is above `hold × hold_multiple + allowance` is
/// refused, and so is a Charge whose cost is above `charge_max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitLimit {
    /// A whole number ≥ 1.
    pub hold_multiple: u32,
    /// Credits allowed past `hold × hold_multiple` (≥ 0).
    pub allowance: Credits,
    /// The largest cost of one Charge; `None`: no limit.
    pub charge_max: Option<Credits>,
}

impl CommitLimit {
    pub const DEFAULT_HOLD_MULTIPLE: u32 = 10;
    /// The largest `hold_multiple` accepted.
    pub const MAX_HOLD_MULTIPLE: u32 = 1_000_000;

    /// The most a Commit of a hold of `held` may cost (saturating).
    pub fn commit_bound(&self, held: Credits) -> Credits {
        let bound = (held.micros() as i128) * (self.hold_multiple as i128) + self.allowance.micros() as i128;
        Credits::from_micros(bound.min(i64::MAX as i128) as i64)
    }
}

impl Default for CommitLimit {
    fn default() -> Self {
        CommitLimit { hold_multiple: Self::DEFAULT_HOLD_MULTIPLE, allowance: Credits::ZERO, charge_max: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_a_multiple_of_the_hold_plus_the_allowance() {
        let limit = CommitLimit { hold_multiple: 3, allowance: Credits::from_whole(2).unwrap(), charge_max: None };
        assert_eq!(limit.commit_bound(Credits::from_whole(5).unwrap()), Credits::from_whole(17).unwrap());
        assert_eq!(limit.commit_bound(Credits::ZERO), Credits::from_whole(2).unwrap());
        assert_eq!(CommitLimit::default().commit_bound(Credits::from_micros(1)), Credits::from_micros(10));
    }

    #[test]
    fn the_bound_saturates() {
        let limit = CommitLimit { hold_multiple: CommitLimit::MAX_HOLD_MULTIPLE, ..CommitLimit::default() };
        assert_eq!(limit.commit_bound(Credits::from_micros(i64::MAX)), Credits::from_micros(i64::MAX));
    }
}
