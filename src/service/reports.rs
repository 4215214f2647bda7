//! Reports: usage summaries, usage event pages, monthly history, the grants
//! table and ledger pages. Read-only, and PostgreSQL only: reports keep
//! working while Redis is down.
//!
//! Usage figures come from `store::reports` (the daily rollup plus the
//! events it does not hold yet, in one snapshot); see reports.proto for how
//! events are split into shares and counted.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use super::Engine;
use crate::{
    error::{Error, Reason, Result},
    store::{
        pg::GrantRow,
        reports::{Dimension, EventFilter, GrantSums, LedgerOf, LedgerRow, ReportEvent, UsageGroup, UsageQuery},
    },
};

/// The most groups one summary may have (over all its pages).
pub const MAX_SUMMARY_ROWS: usize = 100_000;

/// What to summarize. `None` times take their defaults: the start of the
/// current month in the tenant's zone, and now.
#[derive(Clone, Debug, Default)]
pub struct SummaryRequest {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub dims: Vec<Dimension>,
    /// The root of the subtree; `None`: the whole tenant.
    pub account: Option<String>,
    pub page_size: usize,
    pub offset: usize,
}

/// One page of a summary, with the totals of all pages.
#[derive(Clone, Debug)]
pub struct Summary {
    pub rows: Vec<UsageGroup>,
    pub total: Decimal,
    pub events: i64,
    pub lines: i64,
    pub row_count: usize,
    /// Where the next page starts, if there is one.
    pub next_offset: Option<usize>,
    pub zone: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// Which events to list.
#[derive(Clone, Debug, Default)]
pub struct EventsRequest {
    pub account: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub model: Option<String>,
    pub category: Option<String>,
    pub page_size: usize,
    /// Only events before this (recorded_at, event_id).
    pub before: Option<(DateTime<Utc>, Uuid)>,
}

/// A page of events; `next` is the keyset of the next page, if any.
#[derive(Clone, Debug)]
pub struct EventsPage {
    pub events: Vec<ReportEvent>,
    pub next: Option<(DateTime<Utc>, Uuid)>,
}

/// One month of a history.
#[derive(Clone, Debug)]
pub struct MonthUsage {
    pub month: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub credits: Decimal,
    pub events: i64,
    /// (category, credits, events, lines), largest credits first.
    pub categories: Vec<UsageGroup>,
}

/// A page of the grants table with the credit bar's sums.
#[derive(Clone, Debug)]
pub struct GrantsReport {
    pub grants: Vec<GrantRow>,
    pub sums: GrantSums,
    pub next_offset: Option<usize>,
}

/// A page of ledger rows; `next` is the entry id the next page goes below.
#[derive(Clone, Debug)]
pub struct LedgerPage {
    pub entries: Vec<LedgerRow>,
    pub next: Option<i64>,
}

fn account_missing(account: &str) -> Error {
    Error::NotFound(Reason::AccountNotFound, format!("account {account} not found"))
}

impl Engine {
    /// The account and its descendants (`None` for the whole tenant).
    /// NOT_FOUND when the account is not the tenant's.
    async fn report_accounts(&self, tenant: &str, account: Option<&str>) -> Result<Option<Vec<String>>> {
        let Some(account) = account else { return Ok(None) };
        let accounts = self.pg.subtree(tenant, account).await?;
        if accounts.is_empty() {
            return Err(account_missing(account));
        }
        Ok(Some(accounts))
    }

    /// Usage groups over [from, to) (at most MAX_SUMMARY_ROWS + 1 of them).
    async fn usage_groups(
        &self,
        tenant: &str,
        zone: &str,
        (from, to): (DateTime<Utc>, DateTime<Utc>),
        accounts: Option<&[String]>,
        dims: &[Dimension],
    ) -> Result<Vec<UsageGroup>> {
        let split = self.pg.day_split(zone, from, to).await?;
        let query = UsageQuery { tenant, zone, from, to, split, accounts, dims, limit: MAX_SUMMARY_ROWS as i64 + 1 };
        Ok(self.pg.summarize_usage(&query).await?)
    }

    pub async fn summarize_usage(&self, tenant: &str, r: SummaryRequest) -> Result<Summary> {
        let accounts = self.report_accounts(tenant, r.account.as_deref()).await?;
        let zone = self.pg.report_zone(tenant).await?;
        let now = self.clock.now();
        let to = r.to.unwrap_or(now);
        let from = match r.from {
            Some(from) => from,
            None => self.pg.month_start(&zone, now).await?,
        };
        if from > to {
            return Err(Error::invalid("from", Reason::InvalidArgument, "must not be after to"));
        }
        let groups = self.usage_groups(tenant, &zone, (from, to), accounts.as_deref(), &r.dims).await?;
        if groups.len() > MAX_SUMMARY_ROWS {
            return Err(Error::invalid(
                "group_by",
                Reason::InvalidArgument,
                format!("yields more than {MAX_SUMMARY_ROWS} rows: narrow from/to, account_id or group_by"),
            ));
        }
        let total = groups.iter().map(|g| g.credits).sum();
        let events = groups.iter().map(|g| g.events).sum();
        let lines = groups.iter().map(|g| g.lines).sum();
        let row_count = groups.len();
        let end = r.offset.saturating_add(r.page_size).min(row_count);
        let rows = if r.offset < row_count { groups[r.offset..end].to_vec() } else { Vec::new() };
        let next_offset = (end < row_count).then_some(end);
        Ok(Summary { rows, total, events, lines, row_count, next_offset, zone, from, to })
    }

    pub async fn list_usage_events(&self, tenant: &str, r: EventsRequest) -> Result<EventsPage> {
        let accounts = self.report_accounts(tenant, r.account.as_deref()).await?;
        if let (Some(from), Some(to)) = (r.from, r.to)
            && from > to
        {
            return Err(Error::invalid("from", Reason::InvalidArgument, "must not be after to"));
        }
        let filter = EventFilter {
            accounts: accounts.as_deref(),
            from: r.from,
            to: r.to,
            model: r.model.as_deref(),
            category: r.category.as_deref(),
            before: r.before,
        };
        let mut events = self.pg.usage_events_page(tenant, &filter, r.page_size as i64 + 1).await?;
        let next = if events.len() > r.page_size {
            events.truncate(r.page_size);
            events.last().map(|e| (e.recorded_at, e.event_id))
        } else {
            None
        };
        Ok(EventsPage { events, next })
    }

    /// The last `months` months (the current one included), oldest first,
    /// and the zone they are in.
    pub async fn monthly_history(
        &self,
        tenant: &str,
        account: Option<&str>,
        months: i32,
    ) -> Result<(Vec<MonthUsage>, String)> {
        let accounts = self.report_accounts(tenant, account).await?;
        let zone = self.pg.report_zone(tenant).await?;
        let spans = self.pg.month_spans(&zone, self.clock.now(), months).await?;
        let (Some(first), Some(last)) = (spans.first(), spans.last()) else {
            return Ok((Vec::new(), zone));
        };
        let range = (first.start, last.end);
        let groups = self
            .usage_groups(tenant, &zone, range, accounts.as_deref(), &[Dimension::Month, Dimension::Category])
            .await?;
        let history = spans
            .into_iter()
            .map(|span| {
                let mut categories: Vec<UsageGroup> = groups
                    .iter()
                    .filter(|g| g.keys[0] == span.month)
                    .map(|g| UsageGroup { keys: vec![g.keys[1].clone()], ..g.clone() })
                    .collect();
                categories.sort_by(|a, b| b.credits.cmp(&a.credits).then_with(|| a.keys.cmp(&b.keys)));
                MonthUsage {
                    credits: categories.iter().map(|c| c.credits).sum(),
                    events: categories.iter().map(|c| c.events).sum(),
                    month: span.month,
                    start: span.start,
                    end: span.end,
                    categories,
                }
            })
            .collect();
        Ok((history, zone))
    }

    pub async fn grants_report(
        &self,
        tenant: &str,
        account: Option<&str>,
        include_descendants: bool,
        include_inactive: bool,
        page_size: usize,
        offset: usize,
    ) -> Result<GrantsReport> {
        let accounts = match account {
            None => None,
            Some(account) if include_descendants => self.report_accounts(tenant, Some(account)).await?,
            Some(account) => {
                self.pg.account(tenant, account).await?.ok_or_else(|| account_missing(account))?;
                Some(vec![account.to_string()])
            }
        };
        let (mut grants, sums) = self
            .pg
            .grants_report(tenant, accounts.as_deref(), include_inactive, page_size as i64 + 1, offset as i64)
            .await?;
        let next_offset = if grants.len() > page_size {
            grants.truncate(page_size);
            Some(offset + page_size)
        } else {
            None
        };
        Ok(GrantsReport { grants, sums, next_offset })
    }

    pub async fn ledger_page(
        &self,
        tenant: &str,
        of: LedgerOf<'_>,
        before: Option<i64>,
        page_size: usize,
    ) -> Result<LedgerPage> {
        match of {
            LedgerOf::Account(account) => {
                self.pg.account(tenant, account).await?.ok_or_else(|| account_missing(account))?;
            }
            LedgerOf::Grant(grant) => {
                if !self.pg.grant_exists(tenant, grant).await? {
                    return Err(Error::NotFound(Reason::GrantNotFound, format!("grant {grant} not found")));
                }
            }
        }
        let mut entries = self.pg.ledger_page(tenant, of, before, page_size as i64 + 1).await?;
        let next = if entries.len() > page_size {
            entries.truncate(page_size);
            entries.last().map(|e| e.entry_id)
        } else {
            None
        };
        Ok(LedgerPage { entries, next })
    }
}
