//! `creditd.v1.ReportService` (admin role).

use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{
    caller::{Need, tenant},
    convert,
};
use crate::{
    error::{Error, Reason, Result},
    pb::{self, report_service_server::ReportService},
    service::{
        Engine,
        reports::{EventsRequest, SummaryRequest},
    },
    store::reports::{Dimension, LedgerOf, LedgerRow, ReportEvent, ShareRow, UsageGroup},
};

pub struct ReportApi {
    pub engine: Engine,
}

/// Credits as the API writes them: canonical decimal text ("0" for zero).
fn text(value: Decimal) -> String {
    if value.is_zero() { "0".to_string() } else { value.normalize().to_string() }
}

/// Decimal text as stored (line items, shares), canonicalized.
fn decimal_text(value: &str) -> String {
    value.parse::<Decimal>().map(text).unwrap_or_else(|_| value.to_string())
}

fn page_size(value: i32, default: usize, max: usize) -> Result<usize> {
    match value {
        0 => Ok(default),
        n if n > 0 && n as usize <= max => Ok(n as usize),
        _ => Err(Error::invalid("page_size", Reason::InvalidArgument, format!("must be between 0 and {max}"))),
    }
}

fn bad_token() -> Error {
    Error::invalid("page_token", Reason::InvalidArgument, "is not a token from a previous response")
}

/// An offset token ("" = the start).
fn offset_token(token: &str) -> Result<usize> {
    if token.is_empty() {
        return Ok(0);
    }
    token.parse::<usize>().map_err(|_| bad_token())
}

/// An event keyset token: "<recorded_at in µs since the epoch>:<event id>".
fn event_token(token: &str) -> Result<Option<(DateTime<Utc>, Uuid)>> {
    if token.is_empty() {
        return Ok(None);
    }
    let (micros, id) = token.split_once(':').ok_or_else(bad_token)?;
    let micros: i64 = micros.parse().map_err(|_| bad_token())?;
    let at = Utc.timestamp_micros(micros).single().ok_or_else(bad_token)?;
    Ok(Some((at, Uuid::parse_str(id).map_err(|_| bad_token())?)))
}

fn ledger_token(token: &str) -> Result<Option<i64>> {
    if token.is_empty() {
        return Ok(None);
    }
    token.parse::<i64>().map(Some).map_err(|_| bad_token())
}

fn optional_account(value: &str) -> Result<Option<String>> {
    if value.is_empty() { Ok(None) } else { convert::account_id("account_id", value).map(Some) }
}

/// A free-text filter (model, category): empty = none; at most 256
/// characters, no control characters.
fn text_filter(field: &'static str, value: String) -> Result<Option<String>> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.chars().count() > 256 || value.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            Reason::InvalidArgument,
            "must be at most 256 characters, none of them control",
        ));
    }
    Ok(Some(value))
}

fn dimensions(values: &[i32]) -> Result<Vec<Dimension>> {
    let mut dims = Vec::with_capacity(values.len());
    for (i, value) in values.iter().enumerate() {
        let field = || format!("group_by[{i}]");
        let dim = match pb::UsageDimension::try_from(*value) {
            Ok(pb::UsageDimension::Account) => Dimension::Account,
            Ok(pb::UsageDimension::Model) => Dimension::Model,
            Ok(pb::UsageDimension::Tier) => Dimension::Tier,
            Ok(pb::UsageDimension::Category) => Dimension::Category,
            Ok(pb::UsageDimension::Meter) => Dimension::Meter,
            Ok(pb::UsageDimension::Day) => Dimension::Day,
            Ok(pb::UsageDimension::Month) => Dimension::Month,
            Ok(pb::UsageDimension::Unspecified) | Err(_) => {
                return Err(Error::invalid(field(), Reason::InvalidArgument, "is not a usage dimension"));
            }
        };
        if dims.contains(&dim) {
            return Err(Error::invalid(field(), Reason::InvalidArgument, "repeats a dimension"));
        }
        dims.push(dim);
    }
    Ok(dims)
}

fn usage_row(g: &UsageGroup) -> pb::UsageRow {
    pb::UsageRow { keys: g.keys.clone(), credits: text(g.credits), events: g.events, line_items: g.lines }
}

fn share(s: &ShareRow) -> pb::UsageShare {
    pb::UsageShare {
        category: s.category.clone(),
        meter: s.meter.clone(),
        model: s.model.clone(),
        tier: s.tier.clone(),
        credits: decimal_text(&s.credits),
        primary: s.primary,
    }
}

fn json_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn line_item(l: &serde_json::Value) -> pb::LineItem {
    pb::LineItem {
        meter: json_text(&l["meter"]),
        model: json_text(&l["model"]),
        tier: json_text(&l["tier"]),
        quantity: decimal_text(&json_text(&l["quantity"])),
        unit_price: decimal_text(&json_text(&l["unit_price"])),
        per_units: l["per_units"].as_i64().unwrap_or(1),
        subtotal: decimal_text(&json_text(&l["subtotal"])),
    }
}

fn usage_event(e: &ReportEvent) -> pb::UsageEvent {
    pb::UsageEvent {
        event_id: e.event_id.to_string(),
        account_id: e.account_id.clone(),
        kind: match e.kind.as_str() {
            "commit" => pb::UsageEventKind::Commit,
            "charge" => pb::UsageEventKind::Charge,
            _ => pb::UsageEventKind::Unspecified,
        } as i32,
        reservation_id: e.reservation_id.map(|r| r.to_string()).unwrap_or_default(),
        idempotency_key: e.idempotency_key.clone(),
        amount: text(e.amount),
        overdraft: text(e.overdraft),
        draws: e
            .draws
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|d| pb::Draw {
                        account_id: json_text(&d["account"]),
                        amount: decimal_text(&json_text(&d["amount"])),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        labels: e
            .labels
            .as_object()
            .map(|map| map.iter().map(|(k, v)| (k.clone(), json_text(v))).collect::<HashMap<_, _>>())
            .unwrap_or_default(),
        price_version: e.price_version.clone().unwrap_or_default(),
        line_items: e
            .line_items
            .as_ref()
            .and_then(|v| v.as_array())
            .map(|list| list.iter().map(line_item).collect())
            .unwrap_or_default(),
        shares: e.shares.iter().map(share).collect(),
        recorded_at: Some(convert::timestamp(e.recorded_at)),
        allocated: e.allocated,
    }
}

fn ledger_entry(l: &LedgerRow) -> pb::LedgerEntry {
    pb::LedgerEntry {
        entry_id: l.entry_id,
        account_id: l.account_id.clone(),
        kind: match l.kind.as_str() {
            "grant" => pb::LedgerEntryKind::Grant,
            "usage" => pb::LedgerEntryKind::Usage,
            "cover" => pb::LedgerEntryKind::Cover,
            "void" => pb::LedgerEntryKind::Void,
            "expiry" => pb::LedgerEntryKind::Expiry,
            "adjustment" => pb::LedgerEntryKind::Adjustment,
            _ => pb::LedgerEntryKind::Unspecified,
        } as i32,
        amount: text(l.amount),
        grant_id: l.grant_id.map(|g| g.to_string()).unwrap_or_default(),
        event_id: l.event_id.map(|e| e.to_string()).unwrap_or_default(),
        adjustment_id: l.adjustment_id.map(|a| a.to_string()).unwrap_or_default(),
        created_at: Some(convert::timestamp(l.created_at)),
    }
}

#[tonic::async_trait]
impl ReportService for ReportApi {
    async fn summarize_usage(
        &self,
        request: Request<pb::SummarizeUsageRequest>,
    ) -> std::result::Result<Response<pb::SummarizeUsageResponse>, Status> {
        let tenant = tenant(&self.engine, &request, Need::Admin).await?;
        let r = request.into_inner();
        let from = convert::from_timestamp("from", r.from)?;
        let to = convert::from_timestamp("to", r.to)?;
        if let (Some(from), Some(to)) = (from, to)
            && from > to
        {
            return Err(Error::invalid("from", Reason::InvalidArgument, "must not be after to").into());
        }
        let input = SummaryRequest {
            from,
            to,
            dims: dimensions(&r.group_by)?,
            account: optional_account(&r.account_id)?,
            page_size: page_size(r.page_size, 1000, 10_000)?,
            offset: offset_token(&r.page_token)?,
        };
        let s = self.engine.summarize_usage(&tenant, input).await?;
        Ok(Response::new(pb::SummarizeUsageResponse {
            rows: s.rows.iter().map(usage_row).collect(),
            total: text(s.total),
            events: s.events,
            line_items: s.lines,
            row_count: s.row_count as i64,
            next_page_token: s.next_offset.map(|o| o.to_string()).unwrap_or_default(),
            time_zone: s.zone,
            from: Some(convert::timestamp(s.from)),
            to: Some(convert::timestamp(s.to)),
        }))
    }

    async fn list_usage_events(
        &self,
        request: Request<pb::ListUsageEventsRequest>,
    ) -> std::result::Result<Response<pb::ListUsageEventsResponse>, Status> {
        let tenant = tenant(&self.engine, &request, Need::Admin).await?;
        let r = request.into_inner();
        let input = EventsRequest {
            account: optional_account(&r.account_id)?,
            from: convert::from_timestamp("from", r.from)?,
            to: convert::from_timestamp("to", r.to)?,
            model: text_filter("model", r.model)?,
            category: text_filter("category", r.category)?,
            page_size: page_size(r.page_size, 100, 1000)?,
            before: event_token(&r.page_token)?,
        };
        let page = self.engine.list_usage_events(&tenant, input).await?;
        Ok(Response::new(pb::ListUsageEventsResponse {
            events: page.events.iter().map(usage_event).collect(),
            next_page_token: page.next.map(|(at, id)| format!("{}:{id}", at.timestamp_micros())).unwrap_or_default(),
        }))
    }

    async fn monthly_history(
        &self,
        request: Request<pb::MonthlyHistoryRequest>,
    ) -> std::result::Result<Response<pb::MonthlyHistoryResponse>, Status> {
        let tenant = tenant(&self.engine, &request, Need::Admin).await?;
        let r = request.into_inner();
        let account = optional_account(&r.account_id)?;
        let months = match r.months {
            0 => 12,
            n @ 1..=36 => n,
            _ => return Err(Error::invalid("months", Reason::InvalidArgument, "must be between 0 and 36").into()),
        };
        let (history, zone) = self.engine.monthly_history(&tenant, account.as_deref(), months).await?;
        Ok(Response::new(pb::MonthlyHistoryResponse {
            months: history
                .iter()
                .map(|m| pb::MonthUsage {
                    month: m.month.clone(),
                    start: Some(convert::timestamp(m.start)),
                    end: Some(convert::timestamp(m.end)),
                    credits: text(m.credits),
                    events: m.events,
                    categories: m
                        .categories
                        .iter()
                        .map(|c| pb::CategoryUsage {
                            category: c.keys[0].clone(),
                            credits: text(c.credits),
                            events: c.events,
                            line_items: c.lines,
                        })
                        .collect(),
                })
                .collect(),
            time_zone: zone,
        }))
    }

    async fn list_grants_report(
        &self,
        request: Request<pb::ListGrantsReportRequest>,
    ) -> std::result::Result<Response<pb::ListGrantsReportResponse>, Status> {
        let tenant = tenant(&self.engine, &request, Need::Admin).await?;
        let r = request.into_inner();
        let account = optional_account(&r.account_id)?;
        let size = page_size(r.page_size, 100, 1000)?;
        let offset = offset_token(&r.page_token)?;
        let report = self
            .engine
            .grants_report(&tenant, account.as_deref(), r.include_descendants, r.include_inactive, size, offset)
            .await?;
        let s = &report.sums;
        Ok(Response::new(pb::ListGrantsReportResponse {
            grants: report.grants.iter().map(convert::grant).collect(),
            totals: Some(pb::GrantTotals {
                amount: text(s.amount),
                used: text(s.used),
                forfeited: text(s.forfeited),
                remaining: text(s.remaining),
                pending: text(s.pending),
                overdraft: text(s.overdraft),
                unallocated: text(s.unallocated),
                balance: text(s.ledger - s.unallocated),
                accounts: s.accounts,
            }),
            next_page_token: report.next_offset.map(|o| o.to_string()).unwrap_or_default(),
        }))
    }

    async fn get_ledger(
        &self,
        request: Request<pb::GetLedgerRequest>,
    ) -> std::result::Result<Response<pb::GetLedgerResponse>, Status> {
        let tenant = tenant(&self.engine, &request, Need::Admin).await?;
        let r = request.into_inner();
        let size = page_size(r.page_size, 100, 1000)?;
        let before = ledger_token(&r.page_token)?;
        let account;
        let of = match (r.account_id.is_empty(), r.grant_id.is_empty()) {
            (false, true) => {
                account = convert::account_id("account_id", &r.account_id)?;
                LedgerOf::Account(&account)
            }
            (true, false) => LedgerOf::Grant(convert::grant_id(&r.grant_id)?),
            _ => {
                return Err(Error::invalid(
                    "account_id",
                    Reason::InvalidArgument,
                    "exactly one of account_id and grant_id must be set",
                )
                .into());
            }
        };
        let page = self.engine.ledger_page(&tenant, of, before, size).await?;
        Ok(Response::new(pb::GetLedgerResponse {
            entries: page.entries.iter().map(ledger_entry).collect(),
            next_page_token: page.next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }
}
