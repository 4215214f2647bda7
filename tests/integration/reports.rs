//! ReportService through gRPC: summaries that trace to usage events, line
//! items and ledger rows; grouping by category, tier and model as
//! committed; event, grant and ledger pages; monthly history; local days;
//! tenant isolation and bad input.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use chrono::{DateTime, TimeZone, Utc};
use creditd::pb::{self, GrantCategory, UsageDimension as Dim, report_service_client::ReportServiceClient};
use rust_decimal::Decimal;
use tonic::{Code, transport::Channel};

use crate::harness::{TENANT, TestApp, assert_status, eventually, req, with_key};

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

fn from_ts(t: &prost_types::Timestamp) -> DateTime<Utc> {
    Utc.timestamp_opt(t.seconds, t.nanos as u32).unwrap()
}

fn dec(text: &str) -> Decimal {
    text.parse().unwrap_or_else(|_| panic!("{text:?} is not a decimal"))
}

/// Canonical credits text, as the API writes it.
fn text(d: Decimal) -> String {
    if d.is_zero() { "0".into() } else { d.normalize().to_string() }
}

async fn reports(app: &TestApp) -> ReportServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", app.addr)).unwrap().connect().await.unwrap();
    ReportServiceClient::new(channel)
}

/// A request with the admin key of `tenant`.
fn admin<T>(app: &TestApp, tenant: &str, message: T) -> tonic::Request<T> {
    let key = app.keys.lock().unwrap()[tenant].clone();
    with_key(&key, message)
}

fn item(meter: &str, model: &str, quantity: &str) -> pb::UsageItem {
    pb::UsageItem { meter: meter.into(), model: model.into(), quantity: quantity.into() }
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// What the test committed: per event, its amount and the shares the
/// documented rule gives it: (category, meter, model, tier) → credits, and
/// the key of the primary share.
#[derive(Default)]
struct Committed {
    total: Decimal,
    events: i64,
    /// (category, tier, model) → (credits, events, line items).
    by_category_tier_model: BTreeMap<(String, String, String), (Decimal, i64, i64)>,
}

impl Committed {
    /// Applies the rule of reports.proto to one event.
    fn add(&mut self, amount: &str, rating: Option<&pb::Rating>, labels: &HashMap<String, String>) {
        let amount = dec(amount);
        self.total += amount;
        self.events += 1;
        let label_category = labels.get("category").filter(|c| !c.is_empty()).cloned();
        let mut shares: Vec<((String, String, String), Decimal)> = Vec::new();
        let mut primary = 0;
        match rating.filter(|r| !r.line_items.is_empty()) {
            Some(r) => {
                let truncated: Vec<Decimal> =
                    r.line_items.iter().map(|l| dec(&l.subtotal).trunc_with_scale(6)).collect();
                let mut largest = Decimal::MIN;
                for (i, l) in r.line_items.iter().enumerate() {
                    if dec(&l.subtotal) > largest {
                        largest = dec(&l.subtotal);
                        primary = i;
                    }
                }
                let remainder = amount - truncated.iter().copied().sum::<Decimal>();
                for (i, l) in r.line_items.iter().enumerate() {
                    let category = label_category.clone().unwrap_or_else(|| category_of(&l.meter));
                    let credits = truncated[i] + if i == primary { remainder } else { Decimal::ZERO };
                    shares.push(((category, l.tier.clone(), l.model.clone()), credits));
                }
            }
            None => {
                let model = labels.get("model").cloned().unwrap_or_default();
                shares.push(((label_category.unwrap_or_default(), String::new(), model), amount));
            }
        }
        for (i, (key, credits)) in shares.into_iter().enumerate() {
            let entry = self.by_category_tier_model.entry(key).or_default();
            entry.0 += credits;
            entry.1 += i64::from(i == primary);
            entry.2 += 1;
        }
    }
}

/// The meter → category rule of reports.proto.
fn category_of(meter: &str) -> String {
    match meter {
        m if m == "tokens" || m.ends_with("_tokens") => "ai_usage",
        m if m.starts_with("image_") || m == "app_calls" => "tool_calls",
        m if m.starts_with("runtime_") => "runtime",
        "tasks" => "tasks",
        "voice_minutes" => "voice",
        "meeting_minutes" => "meetings",
        other => other,
    }
    .to_string()
}

/// org (1000 plan) ─┬─ team ── u1
///                  └─ u2 (5 welcome)
/// every child with pool access.
async fn tree(app: &TestApp) {
    app.account("org", None, false, None).await;
    app.account("team", Some("org"), true, None).await;
    app.account("u1", Some("team"), true, None).await;
    app.account("u2", Some("org"), true, None).await;
    app.grant("org", "1000", GrantCategory::Plan).await;
    app.grant("u2", "5", GrantCategory::Welcome).await;
}

async fn charge(
    app: &TestApp,
    account: &str,
    cost: pb::charge_request::Cost,
    labels: HashMap<String, String>,
    key: &str,
    committed: &mut Committed,
) -> pb::CommitResponse {
    let r = app
        .credit
        .clone()
        .charge(req(
            TENANT,
            pb::ChargeRequest {
                account_id: account.into(),
                cost: Some(cost),
                idempotency_key: key.into(),
                labels: labels.clone(),
            },
        ))
        .await
        .expect("charge")
        .into_inner();
    committed.add(&r.amount, r.rating.as_ref(), &labels);
    r
}

/// A mix of rated and unrated usage over the tree, including a rounding
/// remainder, label categories and models, and free usage.
async fn usage(app: &TestApp) -> Committed {
    use pb::charge_request::Cost;
    let mut c = Committed::default();

    // A held model call, committed with its real tokens.
    let held = app
        .credit
        .clone()
        .reserve(req(
            TENANT,
            pb::ReserveRequest {
                account_id: "u1".into(),
                cost: Some(pb::reserve_request::Cost::Usage(pb::Usage {
                    items: vec![
                        item("input_tokens", "example-advanced-1", "3000"),
                        item("output_tokens", "example-advanced-1", "1000"),
                    ],
                })),
                idempotency_key: "r1".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let committed = app
        .credit
        .clone()
        .commit(req(
            TENANT,
            pb::CommitRequest {
                reservation_id: held.reservation_id.clone(),
                cost: Some(pb::commit_request::Cost::Usage(pb::Usage {
                    items: vec![
                        item("input_tokens", "example-advanced-1", "2760"),
                        item("output_tokens", "example-advanced-1", "600"),
                        item("reasoning_tokens", "example-advanced-1", "200"),
                    ],
                })),
                idempotency_key: "c1".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(committed.amount, "8.94");
    c.add(&committed.amount, committed.rating.as_ref(), &HashMap::new());

    // Sub-micro-credit lines: 0.0000015 + 0.00018 + 0.000105 = 0.0002865,
    // charged 0.000287; the remainder goes to the output line.
    let r = charge(
        app,
        "u1",
        Cost::Usage(pb::Usage {
            items: vec![
                item("cached_input_tokens", "example-fast-1", "1"),
                item("output_tokens", "example-fast-1", "3"),
                item("input_tokens", "example-fast-1", "7"),
            ],
        }),
        HashMap::new(),
        "tiny",
        &mut c,
    )
    .await;
    assert_eq!(r.amount, "0.000287");

    // Activities, one of them under a category label.
    charge(
        app,
        "u2",
        Cost::Usage(pb::Usage {
            items: vec![item("runtime_minutes", "", "2.5"), item("tasks", "", "1"), item("app_calls", "", "3")],
        }),
        HashMap::new(),
        "work",
        &mut c,
    )
    .await;
    charge(
        app,
        "u2",
        Cost::Usage(pb::Usage { items: vec![item("image_hd", "", "1")] }),
        labels(&[("category", "design")]),
        "img",
        &mut c,
    )
    .await;
    charge(
        app,
        "org",
        Cost::Usage(pb::Usage { items: vec![item("web_searches", "", "3")] }),
        HashMap::new(),
        "free",
        &mut c,
    )
    .await;
    charge(
        app,
        "u1",
        Cost::Usage(pb::Usage { items: vec![item("output_tokens", "example-standard-1", "1234")] }),
        HashMap::new(),
        "std",
        &mut c,
    )
    .await;

    // Unrated usage: labelled, and not.
    charge(
        app,
        "u1",
        Cost::Amount("1.5".into()),
        labels(&[("category", "voice"), ("model", "vendor-voice-2")]),
        "call",
        &mut c,
    )
    .await;
    charge(app, "team", Cost::Amount("0.75".into()), HashMap::new(), "misc", &mut c).await;

    // A plain reserve and commit.
    let hold = app.reserve("u2", "2", "r2").await.unwrap();
    let done = app.commit(&hold.reservation_id, "1.25", "c2").await.unwrap();
    c.add(&done.amount, None, &HashMap::new());
    c
}

/// Holds the tenant's ledger lock, so the ledger job cannot allocate its
/// usage until the connection is dropped: summaries then read events only.
async fn hold_allocation(app: &TestApp) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
    let pool = app.backends.pg().await;
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtextextended('creditd.ledger.' || $1, 0))")
        .bind(TENANT)
        .execute(&mut *conn)
        .await
        .unwrap();
    conn
}

async fn summarize(app: &TestApp, request: pb::SummarizeUsageRequest) -> pb::SummarizeUsageResponse {
    reports(app).await.summarize_usage(admin(app, TENANT, request)).await.expect("summarize").into_inner()
}

/// Every event of the tenant, following the pages.
async fn all_events(app: &TestApp, mut request: pb::ListUsageEventsRequest) -> Vec<pb::UsageEvent> {
    let mut client = reports(app).await;
    let mut events = Vec::new();
    loop {
        let page = client.list_usage_events(admin(app, TENANT, request.clone())).await.unwrap().into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return events;
        }
        request.page_token = page.next_page_token;
    }
}

async fn all_ledger(app: &TestApp, request: pb::GetLedgerRequest) -> Vec<pb::LedgerEntry> {
    let mut client = reports(app).await;
    let mut request = request;
    let mut entries = Vec::new();
    loop {
        let page = client.get_ledger(admin(app, TENANT, request.clone())).await.unwrap().into_inner();
        entries.extend(page.entries);
        if page.next_page_token.is_empty() {
            return entries;
        }
        request.page_token = page.next_page_token;
    }
}

async fn wait_allocated(app: &TestApp) {
    eventually(Duration::from_secs(10), || async {
        all_events(app, pb::ListUsageEventsRequest::default()).await.iter().all(|e| e.allocated)
    })
    .await;
}

#[tokio::test]
async fn totals_equal_line_items_events_and_ledger_usage_rows() {
    let app = TestApp::spawn().await;
    tree(&app).await;
    let committed = usage(&app).await;
    let before = summarize(&app, pb::SummarizeUsageRequest::default()).await;
    wait_allocated(&app).await;
    let after = summarize(&app, pb::SummarizeUsageRequest::default()).await;

    assert_eq!(after.total, text(committed.total));
    assert_eq!(after.events, committed.events);
    assert_eq!(after.rows.len(), 1);
    assert_eq!(after.rows[0].keys, Vec::<String>::new());
    assert_eq!(after.time_zone, "UTC");
    assert_eq!(
        (before.total.as_str(), before.events),
        (after.total.as_str(), after.events),
        "exact before and after allocation"
    );

    // Events: Σ amount, Σ line subtotals (rounded up once per event), Σ shares.
    let events = all_events(&app, pb::ListUsageEventsRequest::default()).await;
    assert_eq!(events.len() as i64, committed.events);
    let amounts: Decimal = events.iter().map(|e| dec(&e.amount)).sum();
    assert_eq!(text(amounts), after.total);
    for e in &events {
        let shares: Decimal = e.shares.iter().map(|s| dec(&s.credits)).sum();
        assert_eq!(text(shares), e.amount, "the shares of {} sum to its amount", e.event_id);
        assert_eq!(e.shares.iter().filter(|s| s.primary).count(), 1);
        if !e.line_items.is_empty() {
            let lines: Decimal = e.line_items.iter().map(|l| dec(&l.subtotal)).sum();
            let amount = dec(&e.amount);
            assert!(
                lines <= amount && amount - lines < dec("0.000001"),
                "{}: lines {lines}, amount {amount}",
                e.event_id
            );
            assert!(!e.price_version.is_empty());
        }
        let draws: Decimal = e.draws.iter().map(|d| dec(&d.amount)).sum();
        assert_eq!(text(draws), e.amount);
    }

    // Ledger: the usage rows of every account pay exactly the usage.
    let mut usage_rows = Decimal::ZERO;
    let mut events_in_ledger = HashSet::new();
    for account in ["org", "team", "u1", "u2"] {
        for entry in all_ledger(&app, pb::GetLedgerRequest { account_id: account.into(), ..Default::default() }).await {
            if entry.kind() == pb::LedgerEntryKind::Usage {
                usage_rows += dec(&entry.amount);
                events_in_ledger.insert(entry.event_id.clone());
            }
        }
    }
    assert_eq!(text(-usage_rows), after.total, "Σ ledger usage rows = −Σ usage");
    let paid: HashSet<String> =
        events.iter().filter(|e| dec(&e.amount) > Decimal::ZERO).map(|e| e.event_id.clone()).collect();
    assert_eq!(events_in_ledger, paid, "every charged event has ledger rows");

    // A range that does not start or end at midnight counts the same.
    let first = events.iter().map(|e| from_ts(e.recorded_at.as_ref().unwrap())).min().unwrap();
    let last = events.iter().map(|e| from_ts(e.recorded_at.as_ref().unwrap())).max().unwrap();
    let edges = summarize(
        &app,
        pb::SummarizeUsageRequest {
            from: Some(ts(first - chrono::Duration::seconds(1))),
            to: Some(ts(last + chrono::Duration::seconds(1))),
            ..Default::default()
        },
    )
    .await;
    assert_eq!((edges.total.as_str(), edges.events), (after.total.as_str(), after.events));
    let wide = summarize(
        &app,
        pb::SummarizeUsageRequest {
            from: Some(ts(first - chrono::Duration::days(3))),
            to: Some(ts(last + chrono::Duration::days(2))),
            group_by: vec![Dim::Day as i32],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(wide.total, after.total);
    let days: BTreeMap<String, String> = wide.rows.iter().map(|r| (r.keys[0].clone(), r.credits.clone())).collect();
    let mut expected_days: BTreeMap<String, Decimal> = BTreeMap::new();
    for e in &events {
        *expected_days.entry(from_ts(e.recorded_at.as_ref().unwrap()).format("%Y-%m-%d").to_string()).or_default() +=
            dec(&e.amount);
    }
    assert_eq!(days, expected_days.into_iter().map(|(d, c)| (d, text(c))).collect());
    // This month so far: whole days, and today from the rollup (nothing
    // allocated after now); a range ending between two events reads the
    // rest of its last day from the events instead.
    let so_far = summarize(&app, pb::SummarizeUsageRequest::default()).await;
    assert_eq!((so_far.total.as_str(), so_far.events), (after.total.as_str(), after.events));
    let mut times: Vec<DateTime<Utc>> = events.iter().map(|e| from_ts(e.recorded_at.as_ref().unwrap())).collect();
    times.sort();
    let cut = times[times.len() / 2];
    let before_cut: Decimal =
        events.iter().filter(|e| from_ts(e.recorded_at.as_ref().unwrap()) < cut).map(|e| dec(&e.amount)).sum();
    let month_start = from_ts(so_far.from.as_ref().unwrap());
    let to_cut = summarize(
        &app,
        pb::SummarizeUsageRequest { from: Some(ts(month_start)), to: Some(ts(cut)), ..Default::default() },
    )
    .await;
    assert_eq!(to_cut.total, text(before_cut));
    assert_eq!(to_cut.events, events.iter().filter(|e| from_ts(e.recorded_at.as_ref().unwrap()) < cut).count() as i64);
    let empty = summarize(
        &app,
        pb::SummarizeUsageRequest {
            from: Some(ts(last + chrono::Duration::seconds(1))),
            to: Some(ts(last + chrono::Duration::seconds(2))),
            ..Default::default()
        },
    )
    .await;
    assert_eq!((empty.total.as_str(), empty.events, empty.rows.len()), ("0", 0, 0));

    // The rollup equals a recomputation from the allocated events.
    let pool = app.backends.pg().await;
    let differ: i64 = sqlx::query_scalar(
        "WITH r AS (SELECT day, account_id, category, meter, model, tier, credits, events, lines \
                    FROM usage_rollup WHERE tenant_id = $1 AND lines <> 0), \
              e AS (SELECT (e.recorded_at AT TIME ZONE usage_report_zone($1))::date AS day, e.account_id, \
                           s.category, s.meter, s.model, s.tier, sum(s.credits)::numeric(24, 6) AS credits, \
                           count(*) FILTER (WHERE s.is_primary) AS events, count(*) AS lines \
                    FROM usage_events e CROSS JOIN LATERAL usage_shares(e.line_items, e.labels, e.amount) s \
                    WHERE e.tenant_id = $1 AND e.allocated GROUP BY 1, 2, 3, 4, 5, 6) \
         SELECT (SELECT count(*) FROM (SELECT * FROM r EXCEPT SELECT * FROM e) x) \
              + (SELECT count(*) FROM (SELECT * FROM e EXCEPT SELECT * FROM r) y)",
    )
    .bind(TENANT)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(differ, 0, "rollup rows that differ from the events");
    let differ: i64 = sqlx::query_scalar(
        "WITH r AS (SELECT day, category, meter, model, tier, credits, events, lines \
                    FROM usage_rollup_tenant WHERE tenant_id = $1 AND lines <> 0), \
              a AS (SELECT day, category, meter, model, tier, sum(credits) AS credits, sum(events)::bigint AS events, \
                           sum(lines)::bigint AS lines \
                    FROM usage_rollup WHERE tenant_id = $1 GROUP BY 1, 2, 3, 4, 5 HAVING sum(lines) <> 0) \
         SELECT (SELECT count(*) FROM (SELECT * FROM r EXCEPT SELECT * FROM a) x) \
              + (SELECT count(*) FROM (SELECT * FROM a EXCEPT SELECT * FROM r) y)",
    )
    .bind(TENANT)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(differ, 0, "tenant rollup rows that differ from the account rollup");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_rollup WHERE tenant_id = $1 AND lines <> 0")
        .bind(TENANT)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(rows >= 10, "the rollup holds the allocated usage");
}

/// Σ credits, events and lines of both rollups (asserted equal).
async fn rollup_sums(tx: &mut sqlx::Transaction<'static, sqlx::Postgres>) -> (Decimal, i64, i64) {
    let mut sums = Vec::new();
    for table in ["usage_rollup", "usage_rollup_tenant"] {
        let sql = format!(
            "SELECT COALESCE(sum(credits), 0), COALESCE(sum(events), 0)::bigint, COALESCE(sum(lines), 0)::bigint \
             FROM {table} WHERE tenant_id = $1"
        );
        let row: (Decimal, i64, i64) =
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(TENANT).fetch_one(&mut **tx).await.unwrap();
        sums.push(row);
    }
    assert_eq!(sums[0], sums[1], "the two rollups agree");
    sums[0]
}

#[tokio::test]
async fn the_rollup_follows_every_change_of_the_events() {
    let app = TestApp::spawn().await;
    tree(&app).await;
    let committed = usage(&app).await;
    wait_allocated(&app).await;
    let pool = app.backends.pg().await;
    let mut tx = pool.begin().await.unwrap();
    let (credits, events, _) = rollup_sums(&mut tx).await;
    assert_eq!((text(credits), events), (text(committed.total), committed.events));
    sqlx::query("UPDATE usage_events SET allocated = false WHERE tenant_id = $1")
        .bind(TENANT)
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(rollup_sums(&mut tx).await, (Decimal::ZERO, 0, 0), "un-allocated events leave the rollup");
    sqlx::query("UPDATE usage_events SET allocated = true WHERE tenant_id = $1")
        .bind(TENANT)
        .execute(&mut *tx)
        .await
        .unwrap();
    let (back, _, _) = rollup_sums(&mut tx).await;
    assert_eq!(text(back), text(committed.total));
    sqlx::query("DELETE FROM ledger WHERE tenant_id = $1").bind(TENANT).execute(&mut *tx).await.unwrap();
    sqlx::query("DELETE FROM usage_events WHERE tenant_id = $1 AND account_id = 'u2'")
        .bind(TENANT)
        .execute(&mut *tx)
        .await
        .unwrap();
    let (rest, _, _) = rollup_sums(&mut tx).await;
    assert_eq!(text(rest), text(committed.total - dec("12.15")), "deleted events leave the rollup");
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn grouping_by_category_tier_and_model_matches_what_was_committed() {
    let app = TestApp::spawn().await;
    tree(&app).await;
    let lock = hold_allocation(&app).await;
    let committed = usage(&app).await;
    let check = |rows: &[pb::UsageRow]| {
        let got: BTreeMap<(String, String, String), (String, i64, i64)> = rows
            .iter()
            .map(|r| {
                ((r.keys[0].clone(), r.keys[1].clone(), r.keys[2].clone()), (r.credits.clone(), r.events, r.line_items))
            })
            .collect();
        let want: BTreeMap<(String, String, String), (String, i64, i64)> =
            committed.by_category_tier_model.iter().map(|(k, (c, e, l))| (k.clone(), (text(*c), *e, *l))).collect();
        assert_eq!(got, want);
    };
    let group_by = vec![Dim::Category as i32, Dim::Tier as i32, Dim::Model as i32];
    let events = all_events(&app, pb::ListUsageEventsRequest::default()).await;
    assert!(events.iter().all(|e| !e.allocated), "the ledger lock is held");
    let unallocated =
        summarize(&app, pb::SummarizeUsageRequest { group_by: group_by.clone(), ..Default::default() }).await;
    check(&unallocated.rows);
    drop(lock);
    wait_allocated(&app).await;
    let s = summarize(&app, pb::SummarizeUsageRequest { group_by: group_by.clone(), ..Default::default() }).await;
    check(&s.rows);
    assert_eq!(s.total, text(committed.total));

    // A few rows spelled out.
    let row = |keys: [&str; 3]| {
        s.rows.iter().find(|r| r.keys == keys).unwrap_or_else(|| panic!("no row {keys:?} in {:?}", s.rows)).clone()
    };
    assert_eq!(row(["ai_usage", "advanced", "example-advanced-1"]).credits, "8.94");
    // 0.000001 + (0.00018 + 0.000001 remainder) + 0.000105
    assert_eq!(row(["ai_usage", "fast", "example-fast-1"]).credits, "0.000287");
    assert_eq!(row(["design", "", ""]).credits, "8");
    assert_eq!(row(["voice", "", "vendor-voice-2"]).credits, "1.5");
    assert_eq!(row(["runtime", "", ""]).credits, "2.5");
    assert_eq!(row(["tool_calls", "", ""]).credits, "0.15");
    assert_eq!(row(["web_searches", "", ""]).credits, "0");
    let unlabelled = row(["", "", ""]);
    assert_eq!((unlabelled.credits.as_str(), unlabelled.events), ("2", 2), "0.75 and 1.25, unrated");

    // By meter, the fast call's remainder sits on its largest line.
    let by_meter = summarize(
        &app,
        pb::SummarizeUsageRequest { group_by: vec![Dim::Model as i32, Dim::Meter as i32], ..Default::default() },
    )
    .await;
    let meter = |model: &str, meter: &str| {
        by_meter.rows.iter().find(|r| r.keys == [model, meter]).map(|r| (r.credits.clone(), r.events)).unwrap()
    };
    assert_eq!(meter("example-fast-1", "output_tokens"), ("0.000181".into(), 1));
    assert_eq!(meter("example-fast-1", "cached_input_tokens"), ("0.000001".into(), 0));
    assert_eq!(meter("example-fast-1", "input_tokens"), ("0.000105".into(), 0));

    // The subtree of team: u1 and team only.
    let team = summarize(
        &app,
        pb::SummarizeUsageRequest {
            account_id: "team".into(),
            group_by: vec![Dim::Account as i32],
            ..Default::default()
        },
    )
    .await;
    let accounts: Vec<&str> = team.rows.iter().map(|r| r.keys[0].as_str()).collect();
    assert_eq!(accounts, vec!["team", "u1"]);
    let u1: Decimal = ["8.94", "0.000287", "0.7404", "1.5"].iter().map(|a| dec(a)).sum();
    assert_eq!(team.rows[1].credits, text(u1));
    assert_eq!(team.total, text(u1 + dec("0.75")));

    // Pages of a summary cover its rows once, in key order.
    let full = summarize(
        &app,
        pb::SummarizeUsageRequest { group_by: vec![Dim::Account as i32, Dim::Category as i32], ..Default::default() },
    )
    .await;
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = summarize(
            &app,
            pb::SummarizeUsageRequest {
                group_by: vec![Dim::Account as i32, Dim::Category as i32],
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await;
        assert!(page.rows.len() <= 3);
        assert_eq!((page.total.as_str(), page.row_count), (full.total.as_str(), full.rows.len() as i64));
        paged.extend(page.rows);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(paged, full.rows);
    let keys: Vec<Vec<String>> = full.rows.iter().map(|r| r.keys.clone()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
}

#[tokio::test]
async fn usage_events_page_newest_first_and_filter() {
    let app = TestApp::spawn().await;
    tree(&app).await;
    for i in 0..23 {
        let account = if i % 2 == 0 { "u1" } else { "u2" };
        app.charge(account, &format!("0.{:02}", i + 1), &format!("e{i}")).await.unwrap();
    }
    let mut client = reports(&app).await;
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_usage_events(admin(
                &app,
                TENANT,
                pb::ListUsageEventsRequest { page_size: 10, page_token: token.clone(), ..Default::default() },
            ))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!((pages, seen.len()), (3, 23));
    let ids: HashSet<&str> = seen.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids.len(), 23, "no event twice");
    let keys: Vec<(DateTime<Utc>, String)> =
        seen.iter().map(|e| (from_ts(e.recorded_at.as_ref().unwrap()), e.event_id.clone())).collect();
    assert!(keys.windows(2).all(|w| w[0] > w[1]), "newest first");
    assert!(seen.iter().all(|e| e.kind() == pb::UsageEventKind::Charge && e.reservation_id.is_empty()));
    assert_eq!(seen.last().unwrap().amount, "0.01");
    assert_eq!(seen.last().unwrap().idempotency_key, "e0");

    let u2 = all_events(&app, pb::ListUsageEventsRequest { account_id: "u2".into(), ..Default::default() }).await;
    assert_eq!(u2.len(), 11);
    assert!(u2.iter().all(|e| e.account_id == "u2"));
    let org = all_events(&app, pb::ListUsageEventsRequest { account_id: "org".into(), ..Default::default() }).await;
    assert_eq!(org.len(), 23, "the subtree of org is everyone");

    // Model and category filters.
    app.credit
        .clone()
        .charge(req(
            TENANT,
            pb::ChargeRequest {
                account_id: "u1".into(),
                cost: Some(pb::charge_request::Cost::Usage(pb::Usage {
                    items: vec![item("input_tokens", "example-fast-mini", "1000"), item("runtime_minutes", "", "1")],
                })),
                idempotency_key: "mini".into(),
                labels: HashMap::new(),
            },
        ))
        .await
        .unwrap();
    let mini =
        all_events(&app, pb::ListUsageEventsRequest { model: "example-fast-mini".into(), ..Default::default() }).await;
    assert_eq!(mini.len(), 1);
    assert_eq!(mini[0].line_items.len(), 2);
    assert_eq!(mini[0].line_items[0].tier, "fast");
    let shares: Vec<(&str, &str, bool)> =
        mini[0].shares.iter().map(|s| (s.category.as_str(), s.credits.as_str(), s.primary)).collect();
    assert_eq!(shares, vec![("ai_usage", "0.015", false), ("runtime", "1", true)]);
    let runtime =
        all_events(&app, pb::ListUsageEventsRequest { category: "runtime".into(), ..Default::default() }).await;
    assert_eq!(runtime.len(), 1);
    let none = all_events(&app, pb::ListUsageEventsRequest { model: "nothing".into(), ..Default::default() }).await;
    assert!(none.is_empty());

    // A time range.
    let t = keys[10].0;
    let older = all_events(&app, pb::ListUsageEventsRequest { to: Some(ts(t)), ..Default::default() }).await;
    assert!(older.iter().all(|e| from_ts(e.recorded_at.as_ref().unwrap()) < t));
    assert_eq!(older.len(), seen.iter().filter(|e| from_ts(e.recorded_at.as_ref().unwrap()) < t).count());
}

#[tokio::test]
async fn monthly_history_breaks_months_down_by_category() {
    let app = TestApp::spawn().await;
    tree(&app).await;
    let committed = usage(&app).await;
    let mut client = reports(&app).await;
    let history = client
        .monthly_history(admin(&app, TENANT, pb::MonthlyHistoryRequest { months: 3, ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.time_zone, "UTC");
    assert_eq!(history.months.len(), 3);
    let now = app.engine.clock.now();
    let this_month = now.format("%Y-%m").to_string();
    let last = history.months.last().unwrap();
    assert_eq!(last.month, this_month);
    assert_eq!((last.credits.clone(), last.events), (text(committed.total), committed.events));
    assert!(from_ts(last.start.as_ref().unwrap()) <= now && now < from_ts(last.end.as_ref().unwrap()));
    assert_eq!(from_ts(last.start.as_ref().unwrap()).format("%d %H:%M").to_string(), "01 00:00");
    let by_category: Decimal = last.categories.iter().map(|c| dec(&c.credits)).sum();
    assert_eq!(text(by_category), last.credits);
    let credits: Vec<Decimal> = last.categories.iter().map(|c| dec(&c.credits)).collect();
    assert!(credits.windows(2).all(|w| w[0] >= w[1]), "largest first");
    assert_eq!(last.categories[0].category, "ai_usage");
    for m in &history.months[..2] {
        assert_eq!((m.credits.as_str(), m.events, m.categories.len()), ("0", 0, 0));
    }
    assert_eq!(history.months[1].end, last.start);

    // A month later, the usage is in last month's entry.
    app.engine.clock.advance(chrono::Duration::days(32));
    let later = client
        .monthly_history(admin(&app, TENANT, pb::MonthlyHistoryRequest { months: 3, account_id: "org".into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(later.months.last().unwrap().month, app.engine.clock.now().format("%Y-%m").to_string());
    let old = later.months.iter().find(|m| m.month == this_month).expect("the month of the usage");
    assert_eq!(old.credits, text(committed.total));
    let u2 = client
        .monthly_history(admin(&app, TENANT, pb::MonthlyHistoryRequest { months: 12, account_id: "u2".into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u2.months.len(), 12);
    let u2_total: Decimal = u2.months.iter().map(|m| dec(&m.credits)).sum();
    assert_eq!(text(u2_total), "12.15", "2.9 + 8 + 1.25");
}

#[tokio::test]
async fn days_and_months_are_local_to_the_tenant() {
    let app = TestApp::spawn().await;
    app.admin
        .clone()
        .create_tenant(crate::harness::req_operator(pb::CreateTenantRequest {
            tenant_id: "kolkata".into(),
            time_zone: "Asia/Kolkata".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let key = app.create_key("kolkata", pb::ApiKeyRole::Admin).await;
    app.keys.lock().unwrap().insert("kolkata".into(), key);
    app.account_in("kolkata", "k", None, false, None).await;
    app.grant_in("kolkata", "k", "100", GrantCategory::Plan).await;
    let charged = app
        .credit
        .clone()
        .charge(req(
            "kolkata",
            pb::ChargeRequest {
                account_id: "k".into(),
                cost: Some(pb::charge_request::Cost::Amount("3".into())),
                idempotency_key: "k1".into(),
                labels: HashMap::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let at = from_ts(charged.recorded_at.as_ref().unwrap());
    let local = at.with_timezone(&chrono_tz::Asia::Kolkata);
    let mut client = reports(&app).await;
    for _ in 0..2 {
        let s = client
            .summarize_usage(admin(
                &app,
                "kolkata",
                pb::SummarizeUsageRequest {
                    from: Some(ts(at - chrono::Duration::days(2))),
                    to: Some(ts(at + chrono::Duration::days(2))),
                    group_by: vec![Dim::Month as i32, Dim::Day as i32],
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.time_zone, "Asia/Kolkata");
        assert_eq!(s.rows.len(), 1);
        assert_eq!(s.rows[0].keys, vec![local.format("%Y-%m").to_string(), local.format("%Y-%m-%d").to_string()]);
        assert_eq!(s.rows[0].credits, "3");
        // Once allocated, the same answer comes from the rollup.
        eventually(Duration::from_secs(10), || async {
            let pool = app.backends.pg().await;
            sqlx::query_scalar::<_, bool>("SELECT bool_and(allocated) FROM usage_events WHERE tenant_id = 'kolkata'")
                .fetch_one(&pool)
                .await
                .unwrap()
        })
        .await;
    }
    // The default range is this month, local.
    let month = client
        .summarize_usage(admin(&app, "kolkata", pb::SummarizeUsageRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let start = from_ts(month.from.as_ref().unwrap()).with_timezone(&chrono_tz::Asia::Kolkata);
    assert_eq!(start.format("%d %H:%M").to_string(), "01 00:00");
    let history = client
        .monthly_history(admin(&app, "kolkata", pb::MonthlyHistoryRequest { months: 1, ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        history.months[0].month,
        app.engine.clock.now().with_timezone(&chrono_tz::Asia::Kolkata).format("%Y-%m").to_string()
    );
}

#[tokio::test]
async fn grants_report_totals_and_ledger_pages_trace_to_ledger_rows() {
    let app = TestApp::spawn().await;
    tree(&app).await;
    let committed = usage(&app).await;
    wait_allocated(&app).await;
    let mut client = reports(&app).await;
    let report = client
        .list_grants_report(admin(
            &app,
            TENANT,
            pb::ListGrantsReportRequest { account_id: "org".into(), include_descendants: true, ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.grants.len(), 2);
    assert_eq!(report.grants.iter().map(|g| g.account_id.as_str()).collect::<Vec<_>>(), vec!["org", "u2"]);
    let totals = report.totals.unwrap();
    assert_eq!(totals.accounts, 4);
    assert_eq!(totals.amount, "1005");
    assert_eq!(totals.used, text(committed.total));
    assert_eq!(totals.remaining, text(dec("1005") - committed.total));
    assert_eq!((totals.pending.as_str(), totals.overdraft.as_str(), totals.unallocated.as_str()), ("0", "0", "0"));
    assert_eq!(totals.balance, totals.remaining);
    let u2_grant = report.grants.iter().find(|g| g.account_id == "u2").unwrap();
    assert_eq!((u2_grant.used.as_str(), u2_grant.remaining.as_str()), ("5", "0"), "u2 spends its own 5 first");

    // The balance is what the hot path holds.
    let mut hot = Decimal::ZERO;
    for account in ["org", "team", "u1", "u2"] {
        hot += dec(&app.balance(account).await.levels[0].balance);
    }
    assert_eq!(text(hot), totals.balance);

    // Only u2, only its own; the whole tenant; pages.
    let own = client
        .list_grants_report(admin(
            &app,
            TENANT,
            pb::ListGrantsReportRequest { account_id: "u2".into(), ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.grants.len(), 1);
    assert_eq!(own.totals.unwrap().accounts, 1);
    let first = client
        .list_grants_report(admin(&app, TENANT, pb::ListGrantsReportRequest { page_size: 1, ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.grants.len(), 1);
    assert!(!first.next_page_token.is_empty());
    assert_eq!(first.totals.as_ref().unwrap().amount, "1005", "totals cover every page");
    let second = client
        .list_grants_report(admin(
            &app,
            TENANT,
            pb::ListGrantsReportRequest {
                page_size: 1,
                page_token: first.next_page_token.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.grants.len(), 1);
    assert!(second.next_page_token.is_empty());
    assert_ne!(first.grants[0].grant_id, second.grants[0].grant_id);

    // Ledger pages: newest first, every row once; Σ of a grant's rows is its
    // remaining credits.
    let org_grant = report.grants.iter().find(|g| g.account_id == "org").unwrap();
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .get_ledger(admin(
                &app,
                TENANT,
                pb::GetLedgerRequest {
                    account_id: "org".into(),
                    page_size: 2,
                    page_token: token.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        paged.extend(page.entries);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(paged.len() >= 3);
    assert!(paged.windows(2).all(|w| w[0].entry_id > w[1].entry_id));
    assert_eq!(paged.last().unwrap().kind(), pb::LedgerEntryKind::Grant);
    let org_sum: Decimal = paged.iter().map(|e| dec(&e.amount)).sum();
    assert_eq!(text(org_sum), org_grant.remaining);
    let of_grant =
        all_ledger(&app, pb::GetLedgerRequest { grant_id: org_grant.grant_id.clone(), ..Default::default() }).await;
    assert!(of_grant.iter().all(|e| e.grant_id == org_grant.grant_id));
    let grant_sum: Decimal = of_grant.iter().map(|e| dec(&e.amount)).sum();
    assert_eq!(text(grant_sum), org_grant.remaining);
    let used: Decimal =
        of_grant.iter().filter(|e| e.kind() == pb::LedgerEntryKind::Usage).map(|e| -dec(&e.amount)).sum();
    assert_eq!(text(used), org_grant.used);
}

#[tokio::test]
async fn another_tenants_accounts_and_grants_are_not_found() {
    let app = TestApp::spawn().await;
    tree(&app).await;
    app.create_tenant("other").await;
    app.account_in("other", "theirs", None, false, None).await;
    let their_grant = app.grant_in("other", "theirs", "50", GrantCategory::Plan).await;
    app.credit
        .clone()
        .charge(req(
            "other",
            pb::ChargeRequest {
                account_id: "theirs".into(),
                cost: Some(pb::charge_request::Cost::Amount("7".into())),
                idempotency_key: "t1".into(),
                labels: HashMap::new(),
            },
        ))
        .await
        .unwrap();
    app.charge("u1", "1", "mine").await.unwrap();

    let mut client = reports(&app).await;
    let not_found = |status: tonic::Status, reason: &str| assert_status(&status, Code::NotFound, reason, None);
    not_found(
        client
            .summarize_usage(admin(
                &app,
                TENANT,
                pb::SummarizeUsageRequest { account_id: "theirs".into(), ..Default::default() },
            ))
            .await
            .unwrap_err(),
        "ACCOUNT_NOT_FOUND",
    );
    not_found(
        client
            .list_usage_events(admin(
                &app,
                TENANT,
                pb::ListUsageEventsRequest { account_id: "theirs".into(), ..Default::default() },
            ))
            .await
            .unwrap_err(),
        "ACCOUNT_NOT_FOUND",
    );
    not_found(
        client
            .monthly_history(admin(&app, TENANT, pb::MonthlyHistoryRequest { account_id: "theirs".into(), months: 1 }))
            .await
            .unwrap_err(),
        "ACCOUNT_NOT_FOUND",
    );
    for include_descendants in [false, true] {
        not_found(
            client
                .list_grants_report(admin(
                    &app,
                    TENANT,
                    pb::ListGrantsReportRequest {
                        account_id: "theirs".into(),
                        include_descendants,
                        ..Default::default()
                    },
                ))
                .await
                .unwrap_err(),
            "ACCOUNT_NOT_FOUND",
        );
    }
    not_found(
        client
            .get_ledger(admin(&app, TENANT, pb::GetLedgerRequest { account_id: "theirs".into(), ..Default::default() }))
            .await
            .unwrap_err(),
        "ACCOUNT_NOT_FOUND",
    );
    not_found(
        client
            .get_ledger(admin(
                &app,
                TENANT,
                pb::GetLedgerRequest { grant_id: their_grant.grant_id.clone(), ..Default::default() },
            ))
            .await
            .unwrap_err(),
        "GRANT_NOT_FOUND",
    );

    // Tenant-wide figures are the key's tenant's only.
    let mine =
        summarize(&app, pb::SummarizeUsageRequest { group_by: vec![Dim::Account as i32], ..Default::default() }).await;
    assert_eq!((mine.total.as_str(), mine.rows.len()), ("1", 1));
    let events = all_events(&app, pb::ListUsageEventsRequest::default()).await;
    assert!(events.iter().all(|e| e.account_id != "theirs"));
    let grants = client
        .list_grants_report(admin(&app, TENANT, pb::ListGrantsReportRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(grants.grants.iter().all(|g| g.account_id != "theirs"));
    assert_eq!(grants.totals.unwrap().amount, "1005");

    // Reports need an admin key.
    let runtime = app.create_key(TENANT, pb::ApiKeyRole::Runtime).await;
    let denied = client.summarize_usage(with_key(&runtime, pb::SummarizeUsageRequest::default())).await.unwrap_err();
    assert_status(&denied, Code::PermissionDenied, "WRONG_ROLE", None);
    let unauthenticated = client.get_ledger(tonic::Request::new(pb::GetLedgerRequest::default())).await.unwrap_err();
    assert_status(&unauthenticated, Code::Unauthenticated, "MISSING_CREDENTIALS", None);
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let app = TestApp::spawn().await;
    tree(&app).await;
    let mut client = reports(&app).await;
    let now = Utc::now();
    let invalid = |status: tonic::Status, reason: &str, field: &str| {
        assert_status(&status, Code::InvalidArgument, reason, Some(field));
    };

    let summary = |r: pb::SummarizeUsageRequest| {
        let mut client = client.clone();
        let request = admin(&app, TENANT, r);
        async move { client.summarize_usage(request).await.unwrap_err() }
    };
    invalid(
        summary(pb::SummarizeUsageRequest {
            from: Some(ts(now)),
            to: Some(ts(now - chrono::Duration::hours(1))),
            ..Default::default()
        })
        .await,
        "INVALID_ARGUMENT",
        "from",
    );
    invalid(
        summary(pb::SummarizeUsageRequest { from: Some(ts(now + chrono::Duration::days(90))), ..Default::default() })
            .await,
        "INVALID_ARGUMENT",
        "from",
    );
    invalid(
        summary(pb::SummarizeUsageRequest { group_by: vec![99], ..Default::default() }).await,
        "INVALID_ARGUMENT",
        "group_by[0]",
    );
    invalid(
        summary(pb::SummarizeUsageRequest {
            group_by: vec![Dim::Model as i32, Dim::Unspecified as i32],
            ..Default::default()
        })
        .await,
        "INVALID_ARGUMENT",
        "group_by[1]",
    );
    invalid(
        summary(pb::SummarizeUsageRequest {
            group_by: vec![Dim::Day as i32, Dim::Model as i32, Dim::Day as i32],
            ..Default::default()
        })
        .await,
        "INVALID_ARGUMENT",
        "group_by[2]",
    );
    invalid(
        summary(pb::SummarizeUsageRequest { page_size: -1, ..Default::default() }).await,
        "INVALID_ARGUMENT",
        "page_size",
    );
    invalid(
        summary(pb::SummarizeUsageRequest { page_size: 10_001, ..Default::default() }).await,
        "INVALID_ARGUMENT",
        "page_size",
    );
    invalid(
        summary(pb::SummarizeUsageRequest { page_token: "x".into(), ..Default::default() }).await,
        "INVALID_ARGUMENT",
        "page_token",
    );
    invalid(
        summary(pb::SummarizeUsageRequest { account_id: "no spaces".into(), ..Default::default() }).await,
        "INVALID_ACCOUNT_ID",
        "account_id",
    );
    invalid(
        summary(pb::SummarizeUsageRequest {
            from: Some(prost_types::Timestamp { seconds: 0, nanos: -1 }),
            ..Default::default()
        })
        .await,
        "INVALID_ARGUMENT",
        "from",
    );
    let missing = summary(pb::SummarizeUsageRequest { account_id: "nobody".into(), ..Default::default() }).await;
    assert_status(&missing, Code::NotFound, "ACCOUNT_NOT_FOUND", None);

    let events = |r: pb::ListUsageEventsRequest| {
        let mut client = client.clone();
        let request = admin(&app, TENANT, r);
        async move { client.list_usage_events(request).await.unwrap_err() }
    };
    invalid(
        events(pb::ListUsageEventsRequest {
            from: Some(ts(now)),
            to: Some(ts(now - chrono::Duration::seconds(1))),
            ..Default::default()
        })
        .await,
        "INVALID_ARGUMENT",
        "from",
    );
    invalid(
        events(pb::ListUsageEventsRequest { page_token: "1:nope".into(), ..Default::default() }).await,
        "INVALID_ARGUMENT",
        "page_token",
    );
    invalid(
        events(pb::ListUsageEventsRequest { page_size: 1001, ..Default::default() }).await,
        "INVALID_ARGUMENT",
        "page_size",
    );
    invalid(
        events(pb::ListUsageEventsRequest { model: "x".repeat(257), ..Default::default() }).await,
        "INVALID_ARGUMENT",
        "model",
    );
    invalid(
        events(pb::ListUsageEventsRequest { category: "a\nb".into(), ..Default::default() }).await,
        "INVALID_ARGUMENT",
        "category",
    );

    let history = client
        .monthly_history(admin(&app, TENANT, pb::MonthlyHistoryRequest { months: 37, ..Default::default() }))
        .await
        .unwrap_err();
    invalid(history, "INVALID_ARGUMENT", "months");
    let history = client
        .monthly_history(admin(&app, TENANT, pb::MonthlyHistoryRequest { months: -1, ..Default::default() }))
        .await
        .unwrap_err();
    invalid(history, "INVALID_ARGUMENT", "months");

    let grants = client
        .list_grants_report(admin(
            &app,
            TENANT,
            pb::ListGrantsReportRequest { page_token: "-3".into(), ..Default::default() },
        ))
        .await
        .unwrap_err();
    invalid(grants, "INVALID_ARGUMENT", "page_token");

    let ledger = |r: pb::GetLedgerRequest| {
        let mut client = client.clone();
        let request = admin(&app, TENANT, r);
        async move { client.get_ledger(request).await.unwrap_err() }
    };
    invalid(ledger(pb::GetLedgerRequest::default()).await, "INVALID_ARGUMENT", "account_id");
    invalid(
        ledger(pb::GetLedgerRequest {
            account_id: "org".into(),
            grant_id: uuid::Uuid::now_v7().to_string(),
            ..Default::default()
        })
        .await,
        "INVALID_ARGUMENT",
        "account_id",
    );
    invalid(
        ledger(pb::GetLedgerRequest { grant_id: "g-1".into(), ..Default::default() }).await,
        "INVALID_GRANT_ID",
        "grant_id",
    );
    invalid(
        ledger(pb::GetLedgerRequest { account_id: "org".into(), page_token: "next".into(), ..Default::default() })
            .await,
        "INVALID_ARGUMENT",
        "page_token",
    );
    let unknown =
        ledger(pb::GetLedgerRequest { grant_id: uuid::Uuid::now_v7().to_string(), ..Default::default() }).await;
    assert_status(&unknown, Code::NotFound, "GRANT_NOT_FOUND", None);
}
