//! Grants: where credits come from, and the order in which usage spends
//! them.

use chrono::{DateTime, Utc};

/// The source of a grant's credits. Each has a default spend priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    Plan,
    Purchase,
    Promotional,
    Referral,
    Welcome,
    Trial,
    Refund,
    Adjustment,
}

impl Category {
    pub const ALL: [Category; 8] = [
        Category::Plan,
        Category::Purchase,
        Category::Promotional,
        Category::Referral,
        Category::Welcome,
        Category::Trial,
        Category::Refund,
        Category::Adjustment,
    ];

    /// Lower is spent first. Free credits go first, then refunds and
    /// adjustments, then purchased packs, then the plan allowance.
    pub fn default_priority(self) -> i32 {
        match self {
            Category::Promotional | Category::Welcome | Category::Referral | Category::Trial => 10,
            Category::Refund | Category::Adjustment => 20,
            Category::Purchase => 30,
            Category::Plan => 40,
        }
    }

    /// The name stored in PostgreSQL.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Plan => "plan",
            Category::Purchase => "purchase",
            Category::Promotional => "promotional",
            Category::Referral => "referral",
            Category::Welcome => "welcome",
            Category::Trial => "trial",
            Category::Refund => "refund",
            Category::Adjustment => "adjustment",
        }
    }

    pub fn parse(name: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

/// What decides a grant's place in the spend order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpendKey {
    pub priority: i32,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// Tie-breaker so the order is total and repeatable.
    pub id: uuid::Uuid,
}

impl SpendKey {
    /// Priority, then earliest expiry (none last), then oldest, then id.
    pub fn cmp_spend(&self, other: &SpendKey) -> std::cmp::Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| match (self.expires_at, other.expires_at) {
                (Some(a), Some(b)) => a.cmp(&b),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            })
            .then_with(|| self.created_at.cmp(&other.created_at))
            .then_with(|| self.id.cmp(&other.id))
    }
}

/// Splits `amount` over grants with `remaining` credits, in the order given
/// (already sorted by [`SpendKey::cmp_spend`]). Returns the part taken from
/// each grant and what no grant covered.
pub fn allocate(amount: i64, remaining: &[i64]) -> (Vec<i64>, i64) {
    let mut left = amount;
    let taken = remaining
        .iter()
        .map(|&r| {
            let take = left.min(r.max(0));
            left -= take;
            take
        })
        .collect();
    (taken, left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn key(priority: i32, expires: Option<i64>, created: i64, id: u128) -> SpendKey {
        SpendKey {
            priority,
            expires_at: expires.map(|s| Utc.timestamp_opt(s, 0).unwrap()),
            created_at: Utc.timestamp_opt(created, 0).unwrap(),
            id: uuid::Uuid::from_u128(id),
        }
    }

    #[test]
    fn spend_order_is_priority_then_expiry_then_age() {
        let mut keys = [
            key(40, None, 1, 1),
            key(30, None, 5, 2),
            key(30, Some(100), 9, 3),
            key(30, Some(50), 9, 4),
            key(10, None, 9, 5),
            key(30, None, 2, 6),
        ];
        keys.sort_by(|a, b| a.cmp_spend(b));
        let order: Vec<u128> = keys.iter().map(|k| k.id.as_u128()).collect();
        assert_eq!(order, vec![5, 4, 3, 6, 2, 1]);
    }

    #[test]
    fn category_names_round_trip() {
        for c in Category::ALL {
            assert_eq!(Category::parse(c.as_str()), Some(c));
        }
        assert!(Category::Purchase.default_priority() < Category::Plan.default_priority());
    }

    proptest! {
        #[test]
        fn allocation_conserves_and_respects_order(amount in 0i64..10_000, rem in proptest::collection::vec(-5i64..3_000, 0..6)) {
            let (taken, uncovered) = allocate(amount, &rem);
            prop_assert_eq!(taken.iter().sum::<i64>() + uncovered, amount);
            for (t, r) in taken.iter().zip(&rem) {
                prop_assert!(*t >= 0 && *t <= (*r).max(0));
            }
            // A later grant is touched only when every earlier one is used up.
            for i in 0..taken.len() {
                if taken[i] > 0 {
                    for j in 0..i {
                        prop_assert_eq!(taken[j], rem[j].max(0));
                    }
                }
            }
            if uncovered > 0 {
                prop_assert_eq!(taken.iter().sum::<i64>(), rem.iter().map(|r| (*r).max(0)).sum::<i64>());
            }
        }
    }
}
