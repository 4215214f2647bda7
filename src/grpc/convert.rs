//! Proto ↔ service types. Every request field is validated here, and a bad
//! one becomes INVALID_ARGUMENT naming it, before anything is touched.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use rust_decimal::Decimal;

use crate::{
    auth::{KeyRecord, Role},
    decision::{Denial, DenialReason},
    domain::{
        Credits,
        grant::Category,
        ids,
        limit::CommitLimit,
        pricing::{self, Rating, UsageItem},
    },
    error::{Error, Reason, Result},
    pb,
    service::credit::{Cost, Recorded},
    store::{
        hot::{BalanceView, ExtendOutcome, Extended, ReserveOutcome, Reserved},
        pg::{AccountRow, GrantRow, PeriodSpec, TenantRow},
        policy::{AllowanceRow, ChangeRow},
    },
};

/// What a cost field must be.
#[derive(Clone, Copy)]
pub enum Sign {
    Positive,
    NonNegative,
}

pub fn amount(field: &'static str, text: &str, sign: Sign) -> Result<Credits> {
    let parsed = match sign {
        Sign::Positive => Credits::parse_positive(text),
        Sign::NonNegative => Credits::parse_non_negative(text),
    };
    parsed.map_err(|e| Error::invalid(field, Reason::InvalidAmount, e))
}

pub fn optional_amount(field: &'static str, text: &str) -> Result<Option<Credits>> {
    if text.is_empty() { Ok(None) } else { amount(field, text, Sign::Positive).map(Some) }
}

pub fn account_id(field: &'static str, value: &str) -> Result<String> {
    ids::check_id(value).map_err(|e| Error::invalid(field, Reason::InvalidAccountId, e))?;
    Ok(value.to_string())
}

pub fn tenant_id(field: &'static str, value: &str) -> Result<String> {
    ids::check_id(value).map_err(|e| Error::invalid(field, Reason::InvalidTenantId, e))?;
    Ok(value.to_string())
}

pub fn idempotency_key(value: &str) -> Result<String> {
    ids::check_idempotency_key(value)
        .map_err(|e| Error::invalid("idempotency_key", Reason::InvalidIdempotencyKey, e))?;
    Ok(value.to_string())
}

pub fn labels(map: std::collections::HashMap<String, String>) -> Result<BTreeMap<String, String>> {
    let labels: BTreeMap<String, String> = map.into_iter().collect();
    ids::check_labels(&labels).map_err(|e| Error::invalid(e.field(), Reason::InvalidLabels, e.detail()))?;
    Ok(labels)
}

/// Free text (names, descriptions, reasons, notes, URLs): at most `max`
/// characters and no control character (`ids::check_text`). Empty is
/// allowed.
pub fn text(field: impl Into<String>, value: String, max: usize) -> Result<String> {
    match ids::check_text(&value, max) {
        Ok(()) => Ok(value),
        Err(e) => Err(Error::invalid(field, Reason::InvalidArgument, e)),
    }
}

/// Free text that must not be blank; surrounding whitespace is trimmed.
pub fn required_text(field: &'static str, value: String, max: usize) -> Result<String> {
    let value = text(field, value, max)?.trim().to_string();
    if value.is_empty() {
        return Err(Error::invalid(field, Reason::InvalidArgument, "is required"));
    }
    Ok(value)
}

/// An IANA time zone name, as `chrono-tz` knows them (at most 64
/// characters).
pub fn time_zone(field: impl Into<String>, value: &str, reason: Reason) -> Result<()> {
    let field = field.into();
    text(field.clone(), value.to_string(), 64)?;
    value
        .parse::<chrono_tz::Tz>()
        .map(|_| ())
        .map_err(|_| Error::invalid(field, reason, format!("{value:?} is not an IANA time zone (like Europe/Paris)")))
}

pub fn reservation_id(value: &str) -> Result<Uuid> {
    uuid_field("reservation_id", Reason::InvalidReservationId, value)
}

pub fn key_id(value: &str) -> Result<Uuid> {
    uuid_field("key_id", Reason::InvalidArgument, value)
}

pub fn api_key_role(value: i32) -> Result<Role> {
    match pb::ApiKeyRole::try_from(value) {
        Ok(pb::ApiKeyRole::Runtime) => Ok(Role::Runtime),
        Ok(pb::ApiKeyRole::Admin) => Ok(Role::Admin),
        Ok(pb::ApiKeyRole::Operator) => Ok(Role::Operator),
        Ok(pb::ApiKeyRole::Unspecified) => Err(Error::invalid("role", Reason::InvalidArgument, "is required")),
        Err(_) => Err(Error::invalid("role", Reason::InvalidArgument, "is not an ApiKeyRole")),
    }
}

pub fn api_key(k: &KeyRecord) -> pb::ApiKey {
    pb::ApiKey {
        key_id: k.key_id.to_string(),
        prefix: k.prefix.clone(),
        tenant_id: k.tenant.clone().unwrap_or_default(),
        role: match k.role {
            Role::Runtime => pb::ApiKeyRole::Runtime,
            Role::Admin => pb::ApiKeyRole::Admin,
            Role::Operator => pb::ApiKeyRole::Operator,
        } as i32,
        name: k.name.clone(),
        created_at: Some(timestamp(k.created_at)),
        revoked_at: k.revoked_at.map(timestamp),
    }
}

pub fn grant_id(value: &str) -> Result<Uuid> {
    uuid_field("grant_id", Reason::InvalidGrantId, value)
}

pub fn uuid_field(field: &'static str, reason: Reason, value: &str) -> Result<Uuid> {
    if value.is_empty() {
        return Err(Error::invalid(field, reason, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| Error::invalid(field, reason, "is not an id creditd issued"))
}

/// `None` when unset (the server default applies).
pub fn ttl(value: Option<prost_types::Duration>) -> Result<Option<Duration>> {
    let Some(d) = value else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(Error::invalid("ttl", Reason::InvalidTtl, "must be a positive duration"));
    }
    Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32)))
}

/// A cost oneof: an amount (`sign` applies), or a usage to rate.
pub fn cost(
    amount_text: Option<&str>,
    usage_value: Option<&pb::Usage>,
    sign: Sign,
    field: &'static str,
    max_quantity: Decimal,
) -> Result<Cost> {
    match (amount_text, usage_value) {
        (Some(text), _) => Ok(Cost::Amount(amount(field, text, sign)?)),
        (None, Some(u)) => Ok(Cost::Usage(usage(u, max_quantity)?)),
        (None, None) => Err(Error::invalid(field, Reason::InvalidAmount, "is required (or usage)")),
    }
}

/// At most this many items in one usage.
pub const MAX_USAGE_ITEMS: usize = 64;

pub fn usage(u: &pb::Usage, max_quantity: Decimal) -> Result<Vec<UsageItem>> {
    if u.items.is_empty() {
        return Err(Error::invalid("usage.items", Reason::InvalidUsage, "is empty"));
    }
    if u.items.len() > MAX_USAGE_ITEMS {
        return Err(Error::invalid("usage.items", Reason::InvalidUsage, "has more than 64 items"));
    }
    u.items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            if !pricing::valid_name(&item.meter) {
                return Err(Error::invalid(
                    format!("usage.items[{i}].meter"),
                    Reason::InvalidUsage,
                    "must be 1-64 characters of [a-z0-9_.-]",
                ));
            }
            if !item.model.is_empty() && !pricing::valid_model(&item.model) {
                return Err(Error::invalid(
                    format!("usage.items[{i}].model"),
                    Reason::InvalidUsage,
                    "must be empty or 1-128 characters of [A-Za-z0-9._:/@-]",
                ));
            }
            let field = format!("usage.items[{i}].quantity");
            let quantity = quantity(&item.quantity)
                .map_err(|detail| Error::invalid(field.clone(), Reason::InvalidUsage, detail))?;
            if quantity > max_quantity {
                return Err(Error::invalid(field, Reason::InvalidUsage, format!("is above the bound {max_quantity}")));
            }
            Ok(UsageItem { meter: item.meter.clone(), model: item.model.clone(), quantity })
        })
        .collect()
}

/// A quantity: a non-negative plain decimal (`[0-9]+(\.[0-9]+)?`, the
/// grammar of amounts) with at most 6 fractional digits.
fn quantity(text: &str) -> std::result::Result<Decimal, &'static str> {
    if crate::domain::money::plain_decimal(text, false).is_none() {
        return Err("must be a non-negative plain decimal like \"1200\" or \"1.5\"");
    }
    let value: Decimal = text.parse().map_err(|_| "is too large")?;
    if value.scale() > 6 {
        return Err("has more than 6 fractional digits");
    }
    Ok(value)
}

pub fn rating(r: &Rating) -> pb::Rating {
    pb::Rating {
        line_items: r
            .lines
            .iter()
            .map(|l| pb::LineItem {
                meter: l.meter.clone(),
                model: l.model.clone(),
                tier: l.tier.clone().unwrap_or_default(),
                quantity: l.quantity.normalize().to_string(),
                unit_price: l.unit_price.normalize().to_string(),
                per_units: l.per_units,
                subtotal: l.subtotal.normalize().to_string(),
            })
            .collect(),
        total: r.total.to_string(),
        price_version: r.version.clone(),
    }
}

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

pub fn from_timestamp(field: &'static str, t: Option<prost_types::Timestamp>) -> Result<Option<DateTime<Utc>>> {
    from_timestamp_field(field, t)
}

pub fn from_timestamp_field(
    field: impl Into<String>,
    t: Option<prost_types::Timestamp>,
) -> Result<Option<DateTime<Utc>>> {
    let field = field.into();
    let Some(t) = t else { return Ok(None) };
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Error::invalid(field, Reason::InvalidArgument, "has nanos out of range"));
    }
    Utc.timestamp_opt(t.seconds, t.nanos as u32)
        .single()
        .map(Some)
        .ok_or_else(|| Error::invalid(field, Reason::InvalidArgument, "is out of range"))
}

/// A page token that is the last account id of the previous page ("" =
/// the start).
pub fn account_page_token(value: &str) -> Result<String> {
    if value.is_empty() {
        return Ok(String::new());
    }
    ids::check_id(value).map_err(|_| {
        Error::invalid("page_token", Reason::InvalidArgument, "is not a token from a previous response")
    })?;
    Ok(value.to_string())
}

pub fn denial(d: &Denial) -> pb::Denial {
    pb::Denial {
        reason: match d.reason {
            DenialReason::InsufficientCredits => pb::DenialReason::InsufficientCredits,
            DenialReason::CapReached => pb::DenialReason::CapReached,
            DenialReason::AccountSuspended => pb::DenialReason::AccountSuspended,
        } as i32,
        account_id: d.account_id.clone(),
        available: d.available.to_string(),
        retry_after: d.retry_after.map(timestamp),
        message: d.message(),
    }
}

pub fn reserve_response(r: &Reserved, rated: Option<&Rating>) -> pb::ReserveResponse {
    let mut response = match &r.outcome {
        ReserveOutcome::Granted { hold_id, amount, expires_at, available } => pb::ReserveResponse {
            granted: true,
            reservation_id: hold_id.clone(),
            amount: amount.to_string(),
            expires_at: Some(timestamp(*expires_at)),
            available: available.to_string(),
            denial: None,
            replayed: r.replayed,
            rating: None,
        },
        ReserveOutcome::Denied(d) => pb::ReserveResponse {
            granted: false,
            available: d.available.to_string(),
            amount: "0".into(),
            denial: Some(denial(d)),
            replayed: r.replayed,
            ..Default::default()
        },
    };
    response.rating = rated.map(rating);
    response
}

pub fn authorize_response(r: &Reserved, rated: Option<&Rating>) -> pb::AuthorizeResponse {
    let mut response = match &r.outcome {
        ReserveOutcome::Granted { available, .. } => {
            pb::AuthorizeResponse { granted: true, available: available.to_string(), denial: None, rating: None }
        }
        ReserveOutcome::Denied(d) => pb::AuthorizeResponse {
            granted: false,
            available: d.available.to_string(),
            denial: Some(denial(d)),
            rating: None,
        },
    };
    response.rating = rated.map(rating);
    response
}

pub fn extend_response(e: &Extended) -> pb::ExtendResponse {
    match &e.outcome {
        ExtendOutcome::Granted { amount, expires_at, available } => pb::ExtendResponse {
            granted: true,
            amount: amount.to_string(),
            expires_at: Some(timestamp(*expires_at)),
            available: available.to_string(),
            denial: None,
            replayed: e.replayed,
            rating: None,
        },
        ExtendOutcome::Denied { denial: d, amount, expires_at } => pb::ExtendResponse {
            granted: false,
            amount: amount.to_string(),
            expires_at: Some(timestamp(*expires_at)),
            available: d.available.to_string(),
            denial: Some(denial(d)),
            replayed: e.replayed,
            rating: None,
        },
    }
}

pub fn commit_response(r: &Recorded) -> pb::CommitResponse {
    pb::CommitResponse {
        event_id: r.event_id.to_string(),
        amount: r.amount.to_string(),
        released: r.released.to_string(),
        overdraft: r.overdraft.to_string(),
        available: r.available.to_string(),
        replayed: r.replayed,
        rating: r.rating.as_ref().map(rating),
        recorded_at: Some(timestamp(r.recorded_at)),
    }
}

pub fn balance_response(account_id: &str, b: &BalanceView) -> pb::GetBalanceResponse {
    let levels = b
        .levels
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let cap_used = l.used.checked_add(l.used_held).unwrap_or(l.used);
            pb::BalanceLevel {
                account_id: l.account_id.clone(),
                in_draw_chain: i < b.draw_len,
                balance: l.balance.to_string(),
                held: l.held.to_string(),
                available: l.balance.checked_sub(l.held).unwrap_or_default().to_string(),
                pool_access: l.pool_access,
                cap: l.cap.map(|c| c.to_string()).unwrap_or_default(),
                cap_used: cap_used.to_string(),
                cap_left: l
                    .cap
                    .map(|c| c.checked_sub(cap_used).unwrap_or_default().max(Credits::ZERO).to_string())
                    .unwrap_or_default(),
                period_end: l.period_end.map(timestamp),
                suspended: l.suspended,
            }
        })
        .collect();
    pb::GetBalanceResponse { account_id: account_id.to_string(), available: b.available.to_string(), levels }
}

pub fn tenant(t: &TenantRow) -> pb::Tenant {
    pb::Tenant {
        tenant_id: t.tenant_id.clone(),
        display_name: t.display_name.clone(),
        credit_value: t.credit_value.normalize().to_string(),
        currency: t.currency.clone(),
        time_zone: t.time_zone.clone(),
        created_at: Some(timestamp(t.created_at)),
        default_period: Some(period_pb(&t.period)),
        grant_limits: t.grant_limits.clone().into_iter().collect(),
        commit_limit: Some(pb::CommitLimit {
            hold_multiple: t.commit_limit.hold_multiple.to_string(),
            allowance: t.commit_limit.allowance.to_string(),
            charge_max: t.commit_limit.charge_max.map(|c| c.to_string()).unwrap_or_default(),
        }),
    }
}

/// A request's commit limit; unset parts take their defaults (admin.proto).
pub fn commit_limit(field: &str, limit: Option<pb::CommitLimit>) -> Result<CommitLimit> {
    let limit = limit.unwrap_or_default();
    let mut out = CommitLimit::default();
    if !limit.hold_multiple.is_empty() {
        out.hold_multiple = limit
            .hold_multiple
            .parse::<u32>()
            .ok()
            .filter(|m| {
                (1..=CommitLimit::MAX_HOLD_MULTIPLE).contains(m)
                    && limit.hold_multiple.bytes().all(|b| b.is_ascii_digit())
            })
            .ok_or_else(|| {
                Error::invalid(
                    format!("{field}.hold_multiple"),
                    Reason::InvalidArgument,
                    format!("must be a whole number from 1 to {}", CommitLimit::MAX_HOLD_MULTIPLE),
                )
            })?;
    }
    if !limit.allowance.is_empty() {
        out.allowance = Credits::parse_non_negative(&limit.allowance)
            .map_err(|e| Error::invalid(format!("{field}.allowance"), Reason::InvalidAmount, e))?;
    }
    if !limit.charge_max.is_empty() {
        out.charge_max = Some(
            Credits::parse_positive(&limit.charge_max)
                .map_err(|e| Error::invalid(format!("{field}.charge_max"), Reason::InvalidAmount, e))?,
        );
    }
    Ok(out)
}

/// A request's billing period; `None` when unset. Checked by the caller
/// against the tenant's time zone.
pub fn period_spec(field: &'static str, p: Option<pb::BillingPeriod>) -> Result<Option<PeriodSpec>> {
    let Some(p) = p else { return Ok(None) };
    let kind = match pb::PeriodKind::try_from(p.kind) {
        Ok(pb::PeriodKind::Monthly) => "month",
        Ok(pb::PeriodKind::Yearly) => "year",
        Ok(pb::PeriodKind::Trial) => "trial",
        _ => {
            return Err(Error::invalid(
                format!("{field}.kind"),
                Reason::InvalidPeriod,
                "must be MONTHLY, YEARLY or TRIAL",
            ));
        }
    };
    let anchor = from_timestamp_field(format!("{field}.anchor"), p.anchor)?;
    let trial_end = from_timestamp_field(format!("{field}.trial_end"), p.trial_end)?;
    if kind == "trial" && anchor.is_none() {
        return Err(Error::invalid(format!("{field}.anchor"), Reason::InvalidPeriod, "is required for a trial"));
    }
    if kind == "trial" && trial_end.is_none() {
        return Err(Error::invalid(format!("{field}.trial_end"), Reason::InvalidPeriod, "is required for a trial"));
    }
    if kind != "trial" && trial_end.is_some() {
        return Err(Error::invalid(format!("{field}.trial_end"), Reason::InvalidPeriod, "is only for trials"));
    }
    if let (Some(start), Some(end)) = (anchor, trial_end)
        && end <= start
    {
        return Err(Error::invalid(format!("{field}.trial_end"), Reason::InvalidPeriod, "must be after anchor"));
    }
    if !p.time_zone.is_empty() {
        time_zone(format!("{field}.time_zone"), &p.time_zone, Reason::InvalidPeriod)?;
    }
    Ok(Some(PeriodSpec {
        kind: kind.to_string(),
        anchor,
        time_zone: if p.time_zone.is_empty() { None } else { Some(p.time_zone) },
        trial_end,
    }))
}

pub fn period_pb(p: &PeriodSpec) -> pb::BillingPeriod {
    pb::BillingPeriod {
        kind: match p.kind.as_str() {
            "month" => pb::PeriodKind::Monthly,
            "year" => pb::PeriodKind::Yearly,
            _ => pb::PeriodKind::Trial,
        } as i32,
        anchor: p.anchor.map(timestamp),
        time_zone: p.time_zone.clone().unwrap_or_default(),
        trial_end: p.trial_end.map(timestamp),
    }
}

pub fn account_kind(kind: i32) -> Result<String> {
    let kind = pb::AccountKind::try_from(kind)
        .map_err(|_| Error::invalid("kind", Reason::InvalidArgument, "is not an AccountKind"))?;
    Ok(match kind {
        pb::AccountKind::Unspecified => "unspecified",
        pb::AccountKind::Organization => "organization",
        pb::AccountKind::Team => "team",
        pb::AccountKind::User => "user",
        pb::AccountKind::Workspace => "workspace",
    }
    .to_string())
}

pub fn account(a: &AccountRow) -> pb::Account {
    let kind = match a.kind.as_str() {
        "organization" => pb::AccountKind::Organization,
        "team" => pb::AccountKind::Team,
        "user" => pb::AccountKind::User,
        "workspace" => pb::AccountKind::Workspace,
        _ => pb::AccountKind::Unspecified,
    };
    pb::Account {
        account_id: a.account_id.clone(),
        parent_id: a.parent_id.clone().unwrap_or_default(),
        kind: kind as i32,
        display_name: a.display_name.clone(),
        pool_access: a.pool_access,
        cap: a.cap.map(|c| c.to_string()).unwrap_or_default(),
        suspended: a.suspended,
        created_at: Some(timestamp(a.created_at)),
        period: a.period.as_ref().map(period_pb),
        period_start: a.period_start.map(timestamp),
        period_end: a.period_end.map(timestamp),
        tier: a.tier.clone(),
    }
}

pub fn category(value: i32) -> Result<Category> {
    let c = pb::GrantCategory::try_from(value)
        .map_err(|_| Error::invalid("category", Reason::InvalidArgument, "is not a GrantCategory"))?;
    Ok(match c {
        pb::GrantCategory::Unspecified => {
            return Err(Error::invalid("category", Reason::InvalidArgument, "is required"));
        }
        pb::GrantCategory::Plan => Category::Plan,
        pb::GrantCategory::Purchase => Category::Purchase,
        pb::GrantCategory::Promotional => Category::Promotional,
        pb::GrantCategory::Referral => Category::Referral,
        pb::GrantCategory::Welcome => Category::Welcome,
        pb::GrantCategory::Trial => Category::Trial,
        pb::GrantCategory::Refund => Category::Refund,
        pb::GrantCategory::Adjustment => Category::Adjustment,
    })
}

pub fn category_pb(c: Category) -> pb::GrantCategory {
    match c {
        Category::Plan => pb::GrantCategory::Plan,
        Category::Purchase => pb::GrantCategory::Purchase,
        Category::Promotional => pb::GrantCategory::Promotional,
        Category::Referral => pb::GrantCategory::Referral,
        Category::Welcome => pb::GrantCategory::Welcome,
        Category::Trial => pb::GrantCategory::Trial,
        Category::Refund => pb::GrantCategory::Refund,
        Category::Adjustment => pb::GrantCategory::Adjustment,
    }
}

pub fn grant(g: &GrantRow) -> pb::Grant {
    let status = if g.voided_at.is_some() {
        pb::GrantStatus::Voided
    } else if g.expired_at.is_some() {
        pb::GrantStatus::Expired
    } else if g.credited_at.is_none() {
        pb::GrantStatus::Pending
    } else {
        pb::GrantStatus::Active
    };
    pb::Grant {
        grant_id: g.grant_id.to_string(),
        account_id: g.account_id.clone(),
        amount: g.amount.to_string(),
        category: category_pb(g.category) as i32,
        priority: g.priority,
        effective_at: Some(timestamp(g.effective_at)),
        expires_at: g.expires_at.map(timestamp),
        status: status as i32,
        used: g.used.to_string(),
        remaining: g.remaining.to_string(),
        forfeited: g.forfeited.to_string(),
        description: g.description.clone(),
        created_at: Some(timestamp(g.created_at)),
        voided_at: g.voided_at.map(timestamp),
        void_reason: g.void_reason.clone().unwrap_or_default(),
        reason: g.reason.clone(),
        actor: g.actor.clone(),
        allowance_id: g.allowance_id.map(|a| a.to_string()).unwrap_or_default(),
    }
}

pub fn allowance(a: &AllowanceRow) -> pb::Allowance {
    pb::Allowance {
        allowance_id: a.allowance_id.to_string(),
        account_id: a.account_id.clone(),
        amount: a.amount.to_string(),
        category: Category::parse(&a.category).map(category_pb).unwrap_or(pb::GrantCategory::Unspecified) as i32,
        priority: a.priority,
        rollover: match a.rollover.as_str() {
            "all" => pb::RolloverKind::All,
            "up_to" => pb::RolloverKind::UpTo,
            _ => pb::RolloverKind::None,
        } as i32,
        rollover_max: a.rollover_max.map(|m| m.to_string()).unwrap_or_default(),
        description: a.description.clone(),
        created_at: Some(timestamp(a.created_at)),
        ended_at: a.ended_at.map(timestamp),
    }
}

pub fn change(c: &ChangeRow) -> pb::AccountChange {
    let requested = &c.requested;
    pb::AccountChange {
        change_id: c.change_id.to_string(),
        account_id: c.account_id.clone(),
        pool_access: requested.get("pool_access").and_then(|v| v.as_bool()),
        cap: requested.get("cap").and_then(|v| v.as_str()).map(str::to_string),
        tier: requested.get("tier").and_then(|v| v.as_str()).map(str::to_string),
        note: c.note.clone(),
        status: match c.status.as_str() {
            "approved" => pb::ChangeStatus::Approved,
            "denied" => pb::ChangeStatus::Denied,
            _ => pb::ChangeStatus::Pending,
        } as i32,
        requested_at: Some(timestamp(c.requested_at)),
        decided_at: c.decided_at.map(timestamp),
        decision_note: c.decision_note.clone(),
    }
}

/// Properties of request conversion over arbitrary input: every request
/// field either converts to a value that satisfies its documented bounds,
/// or fails with INVALID_ARGUMENT naming that field with its reason, and
/// the resulting `Status` says so in `ErrorInfo` and `BadRequest`.
#[cfg(test)]
mod props {
    use proptest::prelude::*;
    use tonic::Code;
    use tonic_types::StatusExt;

    use super::*;
    use crate::domain::money::MAX_AMOUNT;

    /// The field and reason of an INVALID_ARGUMENT, checking the Status
    /// built from it carries the same.
    fn invalid(e: Error) -> (String, Reason) {
        let (field, reason) = match &e {
            Error::InvalidArgument { field, reason, .. } => (field.clone(), *reason),
            other => panic!("not INVALID_ARGUMENT: {other:?}"),
        };
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        assert_eq!(details.error_info().expect("ErrorInfo").reason, reason.as_str());
        let violations = &details.bad_request().expect("BadRequest").field_violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, field);
        (field, reason)
    }

    /// Independent oracle for amounts: a plain decimal, ≤ 6 fractional
    /// digits, no sign but an optional leading '-', |value| ≤ 10⁹.
    fn oracle_amount(text: &str, sign: Sign) -> Option<i64> {
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if whole.is_empty()
            || (digits.contains('.') && frac.is_empty())
            || !whole.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
            || frac.len() > 6
        {
            return None;
        }
        let whole = whole.trim_start_matches('0');
        if whole.len() > 10 {
            return None;
        }
        let whole: i128 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
        let frac: i128 = format!("{frac:0<6}").parse().ok()?;
        let micros = whole * 1_000_000 + frac;
        if micros > MAX_AMOUNT.micros() as i128 {
            return None;
        }
        let value = if negative { -micros } else { micros };
        let allowed = match sign {
            Sign::Positive => value > 0,
            Sign::NonNegative => value >= 0 && !negative,
        };
        allowed.then_some(value as i64)
    }

    fn amount_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "-?[0-9]{0,12}(\\.[0-9]{0,8})?",
            "[0-9.+eE -]{0,12}",
            any::<String>(),
            (0i64..=MAX_AMOUNT.micros()).prop_map(|m| Credits::from_micros(m).to_string()),
        ]
    }

    fn name_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9_.-]{1,64}",
            "[a-z0-9_.-]{65,70}",
            "[A-Za-z {}/]{0,8}",
            any::<String>(),
            Just(String::new())
        ]
    }

    fn model_text() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[A-Za-z0-9._:/@-]{1,128}", "[A-Za-z0-9 {}]{1,8}", "[a-z]{129,130}"]
    }

    fn quantity_text() -> impl Strategy<Value = String> {
        prop_oneof!["[0-9]{1,8}(\\.[0-9]{0,7})?", "-[0-9]{1,3}", "[0-9]{29,31}", "[0-9a-z. ]{0,6}", any::<String>()]
    }

    fn usage_item() -> impl Strategy<Value = pb::UsageItem> {
        (name_text(), model_text(), quantity_text()).prop_map(|(meter, model, quantity)| pb::UsageItem {
            meter,
            model,
            quantity,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn amounts_convert_exactly_or_name_the_field(text in amount_text(), positive in any::<bool>()) {
            let sign = if positive { Sign::Positive } else { Sign::NonNegative };
            match (amount("amount", &text, sign), oracle_amount(&text, sign)) {
                (Ok(c), Some(expected)) => prop_assert_eq!(c.micros(), expected),
                (Err(e), None) => {
                    let (field, reason) = invalid(e);
                    prop_assert_eq!(field, "amount");
                    prop_assert_eq!(reason, Reason::InvalidAmount);
                }
                (got, expected) => prop_assert!(false, "{text:?}: got {got:?}, oracle {expected:?}"),
            }
        }

        #[test]
        fn usage_converts_or_names_the_first_bad_item(items in proptest::collection::vec(usage_item(), 0..70)) {
            let bound = Decimal::from(1_000_000_000_000i64);
            let result = usage(&pb::Usage { items: items.clone() }, bound);
            let first_bad = items.iter().enumerate().find_map(|(i, item)| {
                if !pricing::valid_name(&item.meter) {
                    return Some(format!("usage.items[{i}].meter"));
                }
                if !item.model.is_empty() && !pricing::valid_model(&item.model) {
                    return Some(format!("usage.items[{i}].model"));
                }
                let q = &item.quantity;
                let frac = q.split_once('.').map_or(0, |(_, f)| f.len());
                let (whole, fraction) = q.split_once('.').unwrap_or((q.as_str(), ""));
                let point_without_digits = q.contains('.') && fraction.is_empty();
                let syntax = !whole.is_empty() && !point_without_digits
                    && q.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                    && q.matches('.').count() <= 1;
                let within = syntax && frac <= 6 && q.parse::<Decimal>().is_ok_and(|d| d <= bound);
                (!within).then(|| format!("usage.items[{i}].quantity"))
            });
            let expected_field = if items.is_empty() || items.len() > MAX_USAGE_ITEMS {
                Some("usage.items".to_string())
            } else {
                first_bad
            };
            match (result, expected_field) {
                (Ok(converted), None) => {
                    prop_assert_eq!(converted.len(), items.len());
                    for (c, i) in converted.iter().zip(&items) {
                        prop_assert_eq!(&c.meter, &i.meter);
                        prop_assert_eq!(c.quantity, i.quantity.parse::<Decimal>().unwrap());
                        prop_assert!(c.quantity >= Decimal::ZERO && c.quantity <= bound);
                    }
                }
                (Err(e), Some(expected)) => {
                    let (field, reason) = invalid(e);
                    prop_assert_eq!(field, expected);
                    prop_assert_eq!(reason, Reason::InvalidUsage);
                }
                (got, expected) => prop_assert!(false, "got {got:?}, expected failure at {expected:?}"),
            }
        }

        #[test]
        fn ids_and_keys_convert_or_name_the_field(value in prop_oneof![
            "[A-Za-z0-9._:@-]{1,128}", "[A-Za-z0-9._:@-]{129,130}", "[ -~]{0,12}", any::<String>()
        ]) {
            let id_ok = !value.is_empty() && value.len() <= 128
                && value.chars().all(|c| c.is_ascii_alphanumeric() || "._:@-".contains(c));
            match account_id("account_id", &value) {
                Ok(v) => { prop_assert!(id_ok); prop_assert_eq!(v, value.clone()); }
                Err(e) => {
                    prop_assert!(!id_ok);
                    prop_assert_eq!(invalid(e), ("account_id".to_string(), Reason::InvalidAccountId));
                }
            }
            let key_ok = !value.is_empty() && value.len() <= 128 && value.chars().all(|c| c.is_ascii_graphic());
            match idempotency_key(&value) {
                Ok(_) => prop_assert!(key_ok),
                Err(e) => {
                    prop_assert!(!key_ok);
                    prop_assert_eq!(invalid(e), ("idempotency_key".to_string(), Reason::InvalidIdempotencyKey));
                }
            }
            match reservation_id(&value) {
                Ok(id) => prop_assert_eq!(Uuid::parse_str(&value).unwrap(), id),
                Err(e) => {
                    prop_assert!(Uuid::parse_str(&value).is_err());
                    prop_assert_eq!(invalid(e), ("reservation_id".to_string(), Reason::InvalidReservationId));
                }
            }
        }

        #[test]
        fn ttl_converts_or_names_the_field(seconds in any::<i64>(), nanos in any::<i32>()) {
            let valid = seconds >= 0 && (0..1_000_000_000).contains(&nanos);
            match ttl(Some(prost_types::Duration { seconds, nanos })) {
                Ok(Some(d)) => {
                    prop_assert!(valid);
                    prop_assert_eq!(d, Duration::new(seconds as u64, nanos as u32));
                }
                Ok(None) => prop_assert!(false, "a set ttl converted to none"),
                Err(e) => {
                    prop_assert!(!valid);
                    prop_assert_eq!(invalid(e), ("ttl".to_string(), Reason::InvalidTtl));
                }
            }
        }
    }
}
