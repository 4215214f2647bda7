//! Billing periods: the calendar that decides when caps restart.
//!
//! This module owns the rules that cut time into periods — monthly and
//! yearly renewals at an account's anchor in its own time zone, and one-off
//! trial windows — and the arithmetic over them: which period contains an
//! instant, when the next one starts, and which boundaries fell between two
//! instants. It is pure calendar math over `chrono` and `chrono-tz`: no I/O,
//! no clock reads.
//!
//! Renewals follow the local wall clock, never a fixed number of days:
//!
//! - The boundary of month `k` is at the anchor's local time of day on local
//!   day `min(anchor day, days in that month)` of the anchor's local month
//!   plus `k`. An anchor on the 31st renews on the last day of shorter months
//!   and returns to the 31st in long ones; a yearly anchor on 29 February
//!   renews on 28 February in common years.
//! - Daylight-saving changes do not move the local time: 09:00 Europe/Paris
//!   stays 09:00 local in winter (08:00Z) and in summer (07:00Z).
//! - A local time that does not exist (the spring-forward gap) resolves to the
//!   first instant after the gap; an ambiguous one (the fall-back overlap)
//!   resolves to the earlier of its two instants.
//!
//! Offsets come from the IANA tables compiled into `chrono-tz`, which list
//! daylight-saving changes up to 2099; later instants keep the last offset.
//!
//! Periods are half-open, `[start, end)`, and tile the timeline: the period
//! after one starts exactly at its end.

use chrono::{DateTime, Datelike, MappedLocalTime, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::{GapInfo, Tz};

/// How an account's billing periods repeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeriodRule {
    /// Renews every month at the anchor's local day-of-month and time of day in `tz`.
    Monthly { anchor: DateTime<Utc>, tz: Tz },
    /// Renews every year at the anchor's local month, day and time in `tz`.
    Yearly { anchor: DateTime<Utc>, tz: Tz },
    /// One fixed window [start, end) that never renews.
    Trial { start: DateTime<Utc>, end: DateTime<Utc> },
}

/// One billing period, `[start, end)`: usage between the two counts against
/// the same caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    pub start: DateTime<Utc>,
    /// `None` when the period never ends: after a trial, or at the far end of
    /// the representable time range.
    pub end: Option<DateTime<Utc>>,
}

impl Period {
    /// Whether `at` falls inside the half-open `[start, end)`.
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        self.start <= at && self.end.is_none_or(|end| at < end)
    }
}

/// Why a stored period rule was refused. Each message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeriodError {
    #[error("period.kind {0:?} is not one of \"month\", \"year\", \"trial\"")]
    UnknownKind(String),
    #[error("period.time_zone is not an IANA time zone: {0:?}")]
    UnknownTimeZone(String),
    #[error("period.trial_end is required when period.kind is \"trial\"")]
    MissingTrialEnd,
    #[error("period.trial_end must be after period.anchor")]
    TrialEndNotAfterAnchor,
    #[error("period.trial_end is only allowed when period.kind is \"trial\"")]
    UnexpectedTrialEnd,
}

/// Where the single rule used before per-account periods existed is anchored:
/// 2000-01-01T00:00:00Z.
const LEGACY_ANCHOR: DateTime<Utc> = DateTime::from_timestamp_nanos(946_684_800_000_000_000);

/// The half-open calendar month in UTC that contains `now`.
///
/// Kept for callers that predate per-account rules: it is
/// [`PeriodRule::Monthly`] anchored at 2000-01-01T00:00:00Z in UTC.
pub fn current_period(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let period = PeriodRule::Monthly { anchor: LEGACY_ANCHOR, tz: Tz::UTC }.containing(now);
    (period.start, period.end.unwrap_or(DateTime::<Utc>::MAX_UTC))
}

impl PeriodRule {
    /// The period that contains `at`, so usage at `at` is counted against it.
    ///
    /// Monthly and yearly: `[boundary(k), boundary(k + 1))` with
    /// `boundary(k) <= at < boundary(k + 1)`, for any `at`, before the anchor
    /// too (negative `k`). At the edges of chrono's range (±262,000 years)
    /// the period is cut at [`DateTime::<Utc>::MIN_UTC`] or left open (`end`
    /// `None`).
    ///
    /// Trial: `[start, end)` while the trial runs; from its end on, one
    /// never-ending period `[end, ∞)` since nothing renews. Before the trial,
    /// `[1970-01-01T00:00:00Z, start)`: the Unix epoch precedes every real
    /// account and, unlike [`DateTime::<Utc>::MIN_UTC`], is storable
    /// everywhere (PostgreSQL, Unix seconds). So an `at` before 1970 is not
    /// inside that period; for a trial that itself starts before 1970 the
    /// pre-trial period starts at [`DateTime::<Utc>::MIN_UTC`] instead, so it
    /// is never empty. A trial whose `end` is not after `start` is empty:
    /// from `start` on, the never-ending period begins.
    pub fn containing(&self, at: DateTime<Utc>) -> Period {
        match *self {
            PeriodRule::Monthly { anchor, tz } => Recurrence::new(anchor, tz, 1).containing(at),
            PeriodRule::Yearly { anchor, tz } => Recurrence::new(anchor, tz, 12).containing(at),
            PeriodRule::Trial { start, end } => {
                let end = end.max(start);
                if at < start {
                    let pre_start = if start > DateTime::<Utc>::UNIX_EPOCH {
                        DateTime::<Utc>::UNIX_EPOCH
                    } else {
                        DateTime::<Utc>::MIN_UTC
                    };
                    Period { start: pre_start, end: Some(start) }
                } else if at < end {
                    Period { start, end: Some(end) }
                } else {
                    Period { start: end, end: None }
                }
            }
        }
    }

    /// The first period start strictly after `at` (None for a trial once it
    /// has ended): when caps next restart. Always `containing(at).end`.
    pub fn next_start_after(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.containing(at).end
    }

    /// Every period start in `(from, to]`, in order, at most `limit`: the
    /// boundaries a job that was not running between `from` and `to` missed
    /// and has to catch up on. Empty when `to <= from`.
    pub fn starts_between(&self, from: DateTime<Utc>, to: DateTime<Utc>, limit: usize) -> Vec<DateTime<Utc>> {
        if to <= from || limit == 0 {
            return Vec::new();
        }
        match *self {
            PeriodRule::Monthly { anchor, tz } => Recurrence::new(anchor, tz, 1).starts_between(from, to, limit),
            PeriodRule::Yearly { anchor, tz } => Recurrence::new(anchor, tz, 12).starts_between(from, to, limit),
            PeriodRule::Trial { start, end } => {
                // The pre-trial period's start is a label, not a boundary: the
                // trial's only boundaries are its start and its end.
                let boundaries = if end > start { vec![start, end] } else { vec![start] };
                boundaries.into_iter().filter(|&t| from < t && t <= to).take(limit).collect()
            }
        }
    }

    /// Parses the stored form of a rule: `kind` is `"month"`, `"year"` or
    /// `"trial"`; `anchor` is when the first period starts (for a trial, its
    /// start); `time_zone` is an IANA name such as `"Europe/Paris"`, required
    /// for month and year, and for a trial either empty or valid (a trial is
    /// two instants, so the zone plays no part); `trial_end` is required for a
    /// trial, after `anchor`, and refused for the other kinds.
    pub fn parse(
        kind: &str,
        anchor: DateTime<Utc>,
        time_zone: &str,
        trial_end: Option<DateTime<Utc>>,
    ) -> Result<PeriodRule, PeriodError> {
        let parse_tz = || time_zone.parse::<Tz>().map_err(|_| PeriodError::UnknownTimeZone(time_zone.to_owned()));
        match kind {
            "month" | "year" => {
                let tz = parse_tz()?;
                if trial_end.is_some() {
                    return Err(PeriodError::UnexpectedTrialEnd);
                }
                Ok(if kind == "month" { PeriodRule::Monthly { anchor, tz } } else { PeriodRule::Yearly { anchor, tz } })
            }
            "trial" => {
                if !time_zone.is_empty() {
                    parse_tz()?;
                }
                let end = trial_end.ok_or(PeriodError::MissingTrialEnd)?;
                if end <= anchor {
                    return Err(PeriodError::TrialEndNotAfterAnchor);
                }
                Ok(PeriodRule::Trial { start: anchor, end })
            }
            _ => Err(PeriodError::UnknownKind(kind.to_owned())),
        }
    }

    /// The stored name of the rule's kind, the inverse of [`PeriodRule::parse`]'s `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            PeriodRule::Monthly { .. } => "month",
            PeriodRule::Yearly { .. } => "year",
            PeriodRule::Trial { .. } => "trial",
        }
    }
}

/// A boundary on the timeline extended at both ends: before the range chrono
/// can represent, an instant, or after it. Ordered in that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Edge {
    BeforeRange,
    At(DateTime<Utc>),
    AfterRange,
}

/// A monthly (`step_months` 1) or yearly (12) renewal, with the anchor
/// already in local wall-clock time.
struct Recurrence {
    /// The anchor as the wall clock in `tz` shows it.
    local: NaiveDateTime,
    tz: Tz,
    step_months: i64,
}

impl Recurrence {
    fn new(anchor: DateTime<Utc>, tz: Tz, step_months: i64) -> Recurrence {
        let utc = anchor.naive_utc();
        let offset = tz.offset_from_utc_datetime(&utc).fix();
        // Only an anchor within hours of the end of chrono's range has no
        // local representation; the UTC wall clock is as good as any there.
        let local = utc.checked_add_offset(offset).unwrap_or(utc);
        Recurrence { local, tz, step_months }
    }

    /// The start of period `k`: period 0 starts at the anchor (or where its
    /// wall-clock time resolves to), negative `k` precede it.
    fn boundary(&self, k: i64) -> Edge {
        let beyond = if k < 0 { Edge::BeforeRange } else { Edge::AfterRange };
        let Some(index) = k.checked_mul(self.step_months).and_then(|m| m.checked_add(month_index(self.local.date())))
        else {
            return beyond;
        };
        let Ok(year) = i32::try_from(index.div_euclid(12)) else {
            return beyond;
        };
        let Ok(month) = u32::try_from(index.rem_euclid(12) + 1) else {
            return beyond;
        };
        let day = self.local.day().min(days_in_month(year, month));
        let Some(date) = NaiveDate::from_ymd_opt(year, month, day) else {
            return beyond;
        };
        match resolve_local(self.tz, &date.and_time(self.local.time())) {
            Some(instant) => Edge::At(instant),
            None => beyond,
        }
    }

    /// The `k` with `boundary(k) <= at < boundary(k + 1)`.
    fn index_containing(&self, at: DateTime<Utc>) -> i64 {
        // The UTC month of `at` is within one of its local month, and the
        // boundary of a local month lies inside it, so this guess is off by at
        // most two steps.
        let mut k = (month_index(at.naive_utc().date()) - month_index(self.local.date())).div_euclid(self.step_months);
        let at = Edge::At(at);
        // Boundaries never decrease with `k` and run from `BeforeRange` to
        // `AfterRange`, so the walk goes one way only and stops.
        loop {
            if self.boundary(k) > at {
                k -= 1;
            } else if self.boundary(k + 1) <= at {
                k += 1;
            } else {
                return k;
            }
        }
    }

    fn period(&self, k: i64) -> Period {
        let start = match self.boundary(k) {
            Edge::At(t) => t,
            Edge::BeforeRange | Edge::AfterRange => DateTime::<Utc>::MIN_UTC,
        };
        let end = match self.boundary(k + 1) {
            Edge::At(t) => Some(t),
            Edge::BeforeRange | Edge::AfterRange => None,
        };
        Period { start, end }
    }

    fn containing(&self, at: DateTime<Utc>) -> Period {
        self.period(self.index_containing(at))
    }

    fn starts_between(&self, from: DateTime<Utc>, to: DateTime<Utc>, limit: usize) -> Vec<DateTime<Utc>> {
        let mut starts = Vec::new();
        let mut k = self.index_containing(from);
        while starts.len() < limit {
            k += 1;
            match self.boundary(k) {
                Edge::At(t) if t <= to => starts.push(t),
                _ => break,
            }
        }
        starts
    }
}

/// Months since year 0, January = 0.
fn month_index(date: NaiveDate) -> i64 {
    i64::from(date.year()) * 12 + i64::from(date.month0())
}

fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The instant the wall clock in `tz` shows `local`: in a spring-forward gap
/// the first instant after the gap, in a fall-back overlap the earlier
/// instant. `None` outside chrono's range.
fn resolve_local(tz: Tz, local: &NaiveDateTime) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(local) {
        MappedLocalTime::Single(t) => Some(t.with_timezone(&Utc)),
        MappedLocalTime::Ambiguous(a, b) => Some(a.min(b).with_timezone(&Utc)),
        MappedLocalTime::None => GapInfo::new(local, &tz).and_then(|gap| gap.end).map(|t| t.with_timezone(&Utc)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, Timelike};
    use proptest::prelude::*;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    fn monthly(anchor: DateTime<Utc>, tz: &str) -> PeriodRule {
        PeriodRule::Monthly { anchor, tz: tz.parse().unwrap() }
    }

    fn yearly(anchor: DateTime<Utc>, tz: &str) -> PeriodRule {
        PeriodRule::Yearly { anchor, tz: tz.parse().unwrap() }
    }

    /// The consecutive period starts from the period containing `from`.
    fn starts(rule: &PeriodRule, from: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
        let mut out = vec![rule.containing(from).start];
        while out.len() < count {
            out.push(rule.next_start_after(*out.last().unwrap()).unwrap());
        }
        out
    }

    #[test]
    fn month_contains_now() {
        let now = utc(2026, 12, 31, 23, 59, 59);
        let (start, end) = current_period(now);
        assert_eq!(start, utc(2026, 12, 1, 0, 0, 0));
        assert_eq!(end, utc(2027, 1, 1, 0, 0, 0));
        assert!(start <= now && now < end);
    }

    #[test]
    fn utc_anchor_on_the_first_gives_calendar_months() {
        let rule = monthly(utc(2026, 3, 1, 0, 0, 0), "UTC");
        for (y, m) in [(1999, 12), (2024, 2), (2026, 1), (2026, 3), (2026, 12), (2099, 6)] {
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            let expected = Period { start: utc(y, m, 1, 0, 0, 0), end: Some(utc(ny, nm, 1, 0, 0, 0)) };
            assert_eq!(rule.containing(utc(y, m, 1, 0, 0, 0)), expected);
            assert_eq!(rule.containing(utc(y, m, 17, 13, 5, 0)), expected);
            assert_eq!(rule.containing(utc(ny, nm, 1, 0, 0, 0) - Duration::nanoseconds(1)), expected);
            assert_eq!(current_period(utc(y, m, 17, 13, 5, 0)), (expected.start, expected.end.unwrap()));
        }
    }

    #[test]
    fn anchor_on_the_31st_falls_on_month_ends_and_returns() {
        let rule = monthly(utc(2024, 1, 31, 10, 0, 0), "UTC");
        assert_eq!(
            starts(&rule, utc(2024, 2, 1, 0, 0, 0), 6),
            vec![
                utc(2024, 1, 31, 10, 0, 0),
                utc(2024, 2, 29, 10, 0, 0),
                utc(2024, 3, 31, 10, 0, 0),
                utc(2024, 4, 30, 10, 0, 0),
                utc(2024, 5, 31, 10, 0, 0),
                utc(2024, 6, 30, 10, 0, 0),
            ]
        );
        // A common year: 28 February, then back to the 31st.
        assert_eq!(
            starts(&rule, utc(2025, 2, 1, 0, 0, 0), 3),
            vec![utc(2025, 1, 31, 10, 0, 0), utc(2025, 2, 28, 10, 0, 0), utc(2025, 3, 31, 10, 0, 0)]
        );
        // Just before the boundary still belongs to the previous period.
        assert_eq!(rule.containing(utc(2025, 2, 28, 9, 59, 59)).start, utc(2025, 1, 31, 10, 0, 0));
    }

    #[test]
    fn paris_morning_anchor_stays_at_nine_local_across_dst() {
        // 15 January 2026 09:00 in Paris is 08:00Z.
        let rule = monthly(utc(2026, 1, 15, 8, 0, 0), "Europe/Paris");
        let got = starts(&rule, utc(2026, 2, 20, 0, 0, 0), 11);
        let expected = vec![
            utc(2026, 2, 15, 8, 0, 0),
            utc(2026, 3, 15, 8, 0, 0), // before the change on 29 March
            utc(2026, 4, 15, 7, 0, 0), // summer time
            utc(2026, 5, 15, 7, 0, 0),
            utc(2026, 6, 15, 7, 0, 0),
            utc(2026, 7, 15, 7, 0, 0),
            utc(2026, 8, 15, 7, 0, 0),
            utc(2026, 9, 15, 7, 0, 0),
            utc(2026, 10, 15, 7, 0, 0), // before the change on 25 October
            utc(2026, 11, 15, 8, 0, 0), // winter time
            utc(2026, 12, 15, 8, 0, 0),
        ];
        assert_eq!(got, expected);
        for start in got {
            let local = start.with_timezone(&chrono_tz::Europe::Paris);
            assert_eq!((local.day(), local.hour(), local.minute()), (15, 9, 0));
        }
        // The periods that hold the changes are an hour short and long.
        let march = rule.containing(utc(2026, 3, 29, 12, 0, 0));
        assert_eq!(march.end.unwrap() - march.start, Duration::days(31) - Duration::hours(1));
        let october = rule.containing(utc(2026, 10, 25, 12, 0, 0));
        assert_eq!(october.end.unwrap() - october.start, Duration::days(31) + Duration::hours(1));
    }

    #[test]
    fn nonexistent_local_time_resolves_after_the_gap() {
        // 29th at 02:30 Paris: on 29 March 2026 the clocks jump 02:00 -> 03:00.
        let rule = monthly(utc(2026, 1, 29, 1, 30, 0), "Europe/Paris");
        // The first instant after the gap: 03:00 CEST = 01:00Z.
        assert_eq!(rule.next_start_after(utc(2026, 3, 1, 0, 0, 0)), Some(utc(2026, 3, 29, 1, 0, 0)));
        assert_eq!(rule.next_start_after(utc(2026, 3, 29, 1, 0, 0)), Some(utc(2026, 4, 29, 0, 30, 0)));
    }

    #[test]
    fn ambiguous_local_time_takes_the_earlier_instant() {
        // 25th at 02:30 Paris: on 25 October 2026 02:00-03:00 happens twice.
        let rule = monthly(utc(2026, 1, 25, 1, 30, 0), "Europe/Paris");
        // 02:30 CEST = 00:30Z, not 02:30 CET = 01:30Z.
        assert_eq!(rule.next_start_after(utc(2026, 10, 1, 0, 0, 0)), Some(utc(2026, 10, 25, 0, 30, 0)));
        assert_eq!(rule.containing(utc(2026, 10, 25, 1, 0, 0)).start, utc(2026, 10, 25, 0, 30, 0));
    }

    #[test]
    fn yearly_leap_day_anchor_falls_on_the_28th_in_common_years() {
        let rule = yearly(utc(2024, 2, 29, 12, 0, 0), "UTC");
        assert_eq!(
            starts(&rule, utc(2023, 6, 1, 0, 0, 0), 7),
            vec![
                utc(2023, 2, 28, 12, 0, 0),
                utc(2024, 2, 29, 12, 0, 0),
                utc(2025, 2, 28, 12, 0, 0),
                utc(2026, 2, 28, 12, 0, 0),
                utc(2027, 2, 28, 12, 0, 0),
                utc(2028, 2, 29, 12, 0, 0),
                utc(2029, 2, 28, 12, 0, 0),
            ]
        );
        assert_eq!(
            rule.containing(utc(2025, 3, 1, 0, 0, 0)),
            Period { start: utc(2025, 2, 28, 12, 0, 0), end: Some(utc(2026, 2, 28, 12, 0, 0)) }
        );
        // 2100 is not a leap year.
        assert_eq!(rule.next_start_after(utc(2100, 1, 1, 0, 0, 0)), Some(utc(2100, 2, 28, 12, 0, 0)));
    }

    #[test]
    fn yearly_follows_the_local_date() {
        // 1 January 2026 00:00 in Adelaide (UTC+10:30 in summer) is 31 December 13:30Z.
        let rule = yearly(utc(2025, 12, 31, 13, 30, 0), "Australia/Adelaide");
        assert_eq!(rule.next_start_after(utc(2026, 6, 1, 0, 0, 0)), Some(utc(2026, 12, 31, 13, 30, 0)));
        assert_eq!(rule.containing(utc(2026, 6, 1, 0, 0, 0)).start, utc(2025, 12, 31, 13, 30, 0));
    }

    #[test]
    fn periods_before_the_anchor_follow_the_same_calendar() {
        let rule = monthly(utc(2026, 5, 31, 0, 0, 0), "UTC");
        assert_eq!(
            rule.containing(utc(2025, 12, 15, 0, 0, 0)),
            Period { start: utc(2025, 11, 30, 0, 0, 0), end: Some(utc(2025, 12, 31, 0, 0, 0)) }
        );
        assert_eq!(
            rule.containing(utc(2024, 3, 1, 0, 0, 0)),
            Period { start: utc(2024, 2, 29, 0, 0, 0), end: Some(utc(2024, 3, 31, 0, 0, 0)) }
        );
        assert_eq!(
            rule.containing(utc(1969, 7, 20, 20, 17, 0)),
            Period { start: utc(1969, 6, 30, 0, 0, 0), end: Some(utc(1969, 7, 31, 0, 0, 0)) }
        );
    }

    #[test]
    fn trial_window() {
        let (start, end) = (utc(2026, 3, 10, 12, 0, 0), utc(2026, 3, 24, 12, 0, 0));
        let rule = PeriodRule::Trial { start, end };
        let before = Period { start: DateTime::<Utc>::UNIX_EPOCH, end: Some(start) };
        assert_eq!(rule.containing(utc(2026, 1, 1, 0, 0, 0)), before);
        assert_eq!(rule.containing(start - Duration::nanoseconds(1)), before);
        assert_eq!(rule.containing(start), Period { start, end: Some(end) });
        assert_eq!(rule.containing(end - Duration::seconds(1)), Period { start, end: Some(end) });
        assert_eq!(rule.containing(end), Period { start: end, end: None });
        assert_eq!(rule.containing(utc(2090, 1, 1, 0, 0, 0)), Period { start: end, end: None });

        assert_eq!(rule.next_start_after(utc(2026, 1, 1, 0, 0, 0)), Some(start));
        assert_eq!(rule.next_start_after(start), Some(end));
        assert_eq!(rule.next_start_after(end), None);

        assert_eq!(rule.starts_between(utc(2026, 1, 1, 0, 0, 0), utc(2027, 1, 1, 0, 0, 0), 10), vec![start, end]);
        assert_eq!(rule.starts_between(utc(2026, 1, 1, 0, 0, 0), utc(2027, 1, 1, 0, 0, 0), 1), vec![start]);
        assert_eq!(rule.starts_between(start, end, 10), vec![end]);
        assert_eq!(rule.starts_between(start - Duration::seconds(1), start, 10), vec![start]);
        assert!(rule.starts_between(end, utc(2090, 1, 1, 0, 0, 0), 10).is_empty());
        assert_eq!(rule.kind(), "trial");
    }

    #[test]
    fn inverted_trial_is_empty() {
        let at = utc(2026, 3, 10, 12, 0, 0);
        let rule = PeriodRule::Trial { start: at, end: at - Duration::days(1) };
        assert_eq!(rule.containing(at - Duration::seconds(1)).end, Some(at));
        assert_eq!(rule.containing(at), Period { start: at, end: None });
        assert_eq!(rule.starts_between(at - Duration::days(2), at + Duration::days(2), 10), vec![at]);
    }

    #[test]
    fn catch_up_lists_missed_boundaries() {
        let rule = monthly(utc(2026, 1, 31, 0, 0, 0), "UTC");
        let from = utc(2026, 1, 31, 0, 0, 0);
        let to = utc(2026, 5, 31, 0, 0, 0);
        // `from` itself is excluded, `to` included.
        let all = rule.starts_between(from, to, 100);
        assert_eq!(all, vec![utc(2026, 2, 28, 0, 0, 0), utc(2026, 3, 31, 0, 0, 0), utc(2026, 4, 30, 0, 0, 0), to]);
        assert_eq!(rule.starts_between(from, to, 2), all[..2].to_vec());
        assert!(rule.starts_between(from, to, 0).is_empty());
        assert!(rule.starts_between(to, from, 10).is_empty());
        assert!(rule.starts_between(from, from + Duration::days(20), 10).is_empty());
    }

    #[test]
    fn parse_accepts_the_stored_forms() {
        let anchor = utc(2026, 1, 15, 8, 0, 0);
        let paris: Tz = "Europe/Paris".parse().unwrap();
        assert_eq!(
            PeriodRule::parse("month", anchor, "Europe/Paris", None),
            Ok(PeriodRule::Monthly { anchor, tz: paris })
        );
        assert_eq!(PeriodRule::parse("year", anchor, "UTC", None), Ok(PeriodRule::Yearly { anchor, tz: Tz::UTC }));
        let end = anchor + Duration::days(14);
        assert_eq!(PeriodRule::parse("trial", anchor, "", Some(end)), Ok(PeriodRule::Trial { start: anchor, end }));
        assert_eq!(
            PeriodRule::parse("trial", anchor, "Asia/Kolkata", Some(end)),
            Ok(PeriodRule::Trial { start: anchor, end })
        );
        assert_eq!(monthly(anchor, "UTC").kind(), "month");
        assert_eq!(yearly(anchor, "UTC").kind(), "year");
    }

    #[test]
    fn parse_errors_name_the_field() {
        let anchor = utc(2026, 1, 15, 8, 0, 0);
        let end = Some(anchor + Duration::days(14));
        let cases = [
            (
                PeriodRule::parse("weekly", anchor, "UTC", None),
                "period.kind",
                PeriodError::UnknownKind("weekly".into()),
            ),
            (
                PeriodRule::parse("month", anchor, "Europe/Parys", None),
                "period.time_zone",
                PeriodError::UnknownTimeZone("Europe/Parys".into()),
            ),
            (
                PeriodRule::parse("year", anchor, "", None),
                "period.time_zone",
                PeriodError::UnknownTimeZone(String::new()),
            ),
            (PeriodRule::parse("trial", anchor, "Mars/Olympus", end), "period.time_zone", {
                PeriodError::UnknownTimeZone("Mars/Olympus".into())
            }),
            (PeriodRule::parse("trial", anchor, "", None), "period.trial_end", PeriodError::MissingTrialEnd),
            (
                PeriodRule::parse("trial", anchor, "", Some(anchor)),
                "period.trial_end",
                PeriodError::TrialEndNotAfterAnchor,
            ),
            (PeriodRule::parse("month", anchor, "UTC", end), "period.trial_end", PeriodError::UnexpectedTrialEnd),
        ];
        for (got, field, expected) in cases {
            let err = got.unwrap_err();
            assert_eq!(err, expected);
            assert!(err.to_string().starts_with(field), "{err} does not name {field}");
        }
        assert_eq!(
            PeriodError::UnknownTimeZone("x".into()).to_string(),
            "period.time_zone is not an IANA time zone: \"x\""
        );
    }

    #[test]
    fn extreme_instants_do_not_panic() {
        let rules = [
            monthly(utc(2026, 1, 31, 23, 30, 0), "Asia/Kolkata"),
            yearly(utc(2024, 2, 29, 0, 0, 0), "Pacific/Chatham"),
            monthly(DateTime::<Utc>::MIN_UTC, "Pacific/Kiritimati"),
            monthly(DateTime::<Utc>::MAX_UTC, "Pacific/Kiritimati"),
            yearly(DateTime::<Utc>::MIN_UTC, "Etc/GMT+12"),
            yearly(DateTime::<Utc>::MAX_UTC, "Etc/GMT-14"),
            PeriodRule::Trial { start: DateTime::<Utc>::MIN_UTC, end: DateTime::<Utc>::MAX_UTC },
        ];
        let instants = [DateTime::<Utc>::MIN_UTC, utc(2026, 6, 1, 0, 0, 0), DateTime::<Utc>::MAX_UTC];
        for rule in rules {
            for at in instants {
                let period = rule.containing(at);
                assert!(period.start <= at);
                assert!(period.end.is_none_or(|end| at < end));
                let _ = rule.next_start_after(at);
                for to in instants {
                    let _ = rule.starts_between(at, to, 3);
                }
            }
        }
    }

    const ZONES: [&str; 9] = [
        "UTC",
        "Europe/Paris",
        "America/New_York",
        "America/Santiago",
        "Asia/Kolkata",
        "Asia/Kathmandu",
        "Australia/Adelaide",
        "Australia/Lord_Howe",
        "America/St_Johns",
    ];

    /// Instants from 2000 to 2100 with days drawn 1..=31 (clamped), so month
    /// ends come up often.
    fn anchor_strategy() -> impl Strategy<Value = DateTime<Utc>> {
        (2000i32..=2100, 1u32..=12, 1u32..=31, 0u32..24, 0u32..60, 0u32..60)
            .prop_map(|(y, mo, d, h, mi, s)| utc(y, mo, d.min(days_in_month(y, mo)), h, mi, s))
    }

    fn at_strategy() -> impl Strategy<Value = DateTime<Utc>> {
        // 1990-01-01 .. 2110-01-01, to second precision.
        (631_152_000i64..4_417_977_600).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap())
    }

    fn rule_strategy() -> impl Strategy<Value = PeriodRule> {
        (anchor_strategy(), 0..ZONES.len(), any::<bool>()).prop_map(|(anchor, zone, yearly)| {
            let tz = ZONES[zone].parse().unwrap();
            if yearly { PeriodRule::Yearly { anchor, tz } } else { PeriodRule::Monthly { anchor, tz } }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn periods_contain_and_tile(rule in rule_strategy(), at in at_strategy()) {
            let period = rule.containing(at);
            let end = period.end.unwrap();
            prop_assert!(period.start <= at && at < end, "{period:?} does not contain {at}");
            // The next period starts at this one's end: no gap, no overlap.
            prop_assert_eq!(rule.containing(end).start, end);
            prop_assert_eq!(rule.containing(end - Duration::nanoseconds(1)), period);
            prop_assert_eq!(rule.containing(period.start), period);
            prop_assert_eq!(rule.next_start_after(at), Some(end));
            let previous = rule.containing(period.start - Duration::nanoseconds(1));
            prop_assert_eq!(previous.end, Some(period.start));
        }

        #[test]
        fn period_lengths_stay_calendar_sized(rule in rule_strategy(), at in at_strategy()) {
            let period = rule.containing(at);
            let length = period.end.unwrap() - period.start;
            let (min, max) = match rule {
                PeriodRule::Monthly { .. } => (Duration::days(28), Duration::days(31)),
                _ => (Duration::days(365), Duration::days(366)),
            };
            prop_assert!(
                min - Duration::hours(1) <= length && length <= max + Duration::hours(1),
                "{rule:?}: {period:?} lasts {length}"
            );
        }

        #[test]
        fn boundaries_keep_the_anchor_wall_clock(rule in rule_strategy(), at in at_strategy()) {
            let (PeriodRule::Monthly { anchor, tz } | PeriodRule::Yearly { anchor, tz }) = rule else { unreachable!() };
            let anchor_local = anchor.with_timezone(&tz).naive_local();
            let start = rule.containing(at).start;
            let local = start.with_timezone(&tz).naive_local();
            // None of the zones has a gap that crosses midnight, so the start
            // is on the intended local date.
            let (year, month) = (local.year(), local.month());
            if matches!(rule, PeriodRule::Yearly { .. }) {
                prop_assert_eq!(month, anchor_local.month());
            }
            let expected_date =
                NaiveDate::from_ymd_opt(year, month, anchor_local.day().min(days_in_month(year, month))).unwrap();
            let expected = expected_date.and_time(anchor_local.time());
            match tz.from_local_datetime(&expected) {
                MappedLocalTime::Single(t) => prop_assert_eq!(start, t.with_timezone(&Utc)),
                MappedLocalTime::Ambiguous(a, b) => prop_assert_eq!(start, a.min(b).with_timezone(&Utc)),
                MappedLocalTime::None => {
                    // In a gap: the first valid instant after it, within hours.
                    prop_assert!(local > expected && local - expected <= Duration::hours(2), "{local} vs {expected}");
                    let just_before = start - Duration::seconds(1);
                    prop_assert!(just_before.with_timezone(&tz).naive_local() < expected);
                }
            }
        }

        #[test]
        fn starts_between_lists_consecutive_starts(
            rule in rule_strategy(),
            from in at_strategy(),
            span_days in 0i64..2000,
            limit in 0usize..40,
        ) {
            let to = from + Duration::days(span_days) + Duration::seconds(span_days * 37);
            let got = rule.starts_between(from, to, limit);
            prop_assert!(got.len() <= limit);
            let mut cursor = from;
            for &start in &got {
                prop_assert_eq!(rule.next_start_after(cursor), Some(start));
                prop_assert!(from < start && start <= to);
                prop_assert_eq!(rule.containing(start).start, start);
                cursor = start;
            }
            if got.len() < limit {
                // Nothing was left out: the next start is past `to`.
                prop_assert!(rule.next_start_after(cursor).is_none_or(|next| next > to));
            }
        }

        #[test]
        fn trial_periods_contain_and_tile(
            start in at_strategy(),
            days in 1i64..400,
            at in at_strategy(),
        ) {
            let end = start + Duration::days(days);
            let rule = PeriodRule::Trial { start, end };
            let period = rule.containing(at);
            prop_assert!(period.contains(at));
            prop_assert_eq!(rule.next_start_after(at), period.end);
            if let Some(next) = period.end {
                prop_assert_eq!(rule.containing(next).start, next);
            }
            let between = rule.starts_between(at, at + Duration::days(800), 10);
            let expected: Vec<_> = [start, end].into_iter().filter(|&t| t > at && t <= at + Duration::days(800)).collect();
            prop_assert_eq!(between, expected);
        }
    }
}
