//! Billing periods: when caps restart.
//!
//! Every account currently follows the calendar month in UTC; anchors,
//! time zones, yearly and trial periods arrive with the credit-policy work
//! and will replace [`current_period`] without changing its callers.

use chrono::{DateTime, Datelike, TimeZone, Utc};

/// The half-open period `[start, end)` that contains `now`.
pub fn current_period(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let start = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .expect("the first of a month at midnight UTC exists");
    let (year, month) = if now.month() == 12 { (now.year() + 1, 1) } else { (now.year(), now.month() + 1) };
    let end =
        Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0).single().expect("the first of a month at midnight UTC exists");
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_contains_now() {
        let now = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).unwrap();
        let (start, end) = current_period(now);
        assert_eq!(start, Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap());
        assert_eq!(end, Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap());
        assert!(start <= now && now < end);
    }
}
