//! Rating through gRPC: usage in, credits out, with line items; pinned
//! price versions; the default catalog; tenant and operator price changes.

use creditd::pb::{self, GrantCategory};
use tonic::Code;

use crate::harness::{TENANT, TestApp, assert_status, req, req_operator};

fn item(meter: &str, model: &str, quantity: &str) -> pb::UsageItem {
    pb::UsageItem { meter: meter.into(), model: model.into(), quantity: quantity.into() }
}

fn usage(items: Vec<pb::UsageItem>) -> pb::Usage {
    pb::Usage { items }
}

async fn app() -> TestApp {
    let app = TestApp::spawn().await;
    app.account("org", None, false, None).await;
    app.account("u", Some("org"), true, None).await;
    app.grant("org", "100000", GrantCategory::Plan).await;
    app
}

async fn reserve_usage(app: &TestApp, u: pb::Usage, key: &str) -> pb::ReserveResponse {
    app.credit
        .clone()
        .reserve(req(
            TENANT,
            pb::ReserveRequest {
                account_id: "u".into(),
                cost: Some(pb::reserve_request::Cost::Usage(u)),
                idempotency_key: key.into(),
                ..Default::default()
            },
        ))
        .await
        .expect("reserve with usage")
        .into_inner()
}

async fn commit_usage(app: &TestApp, rid: &str, u: pb::Usage, key: &str) -> Result<pb::CommitResponse, tonic::Status> {
    app.credit
        .clone()
        .commit(req(
            TENANT,
            pb::CommitRequest {
                reservation_id: rid.into(),
                cost: Some(pb::commit_request::Cost::Usage(u)),
                idempotency_key: key.into(),
                ..Default::default()
            },
        ))
        .await
        .map(|r| r.into_inner())
}

async fn charge_usage(app: &TestApp, u: pb::Usage, key: &str) -> Result<pb::CommitResponse, tonic::Status> {
    app.credit
        .clone()
        .charge(req(
            TENANT,
            pb::ChargeRequest {
                account_id: "u".into(),
                cost: Some(pb::charge_request::Cost::Usage(u)),
                idempotency_key: key.into(),
                ..Default::default()
            },
        ))
        .await
        .map(|r| r.into_inner())
}

async fn quote(app: &TestApp, u: pb::Usage) -> Result<pb::Rating, tonic::Status> {
    app.credit_pricing()
        .quote(req(TENANT, pb::QuoteRequest { usage: Some(u), at: None }))
        .await
        .map(|r| r.into_inner().rating.unwrap())
}

#[tokio::test]
async fn reserve_by_estimate_then_commit_the_real_tokens_per_tier() {
    let app = app().await;
    // Default catalog, per million tokens: fast 15 in / 60 out, standard
    // 150 / 600, advanced 1500 / 6000.
    let cases = [
        ("example-fast-1", "fast", "0.105", "0.0894"),
        ("example-standard-1", "standard", "1.05", "0.894"),
        ("example-advanced-1", "advanced", "10.5", "8.94"),
    ];
    for (model, tier, estimate, actual) in cases {
        let r = reserve_usage(
            &app,
            usage(vec![item("input_tokens", model, "3000"), item("output_tokens", model, "1000")]),
            &format!("r-{model}"),
        )
        .await;
        assert!(r.granted);
        assert_eq!(r.amount, estimate, "{model}: 3000 in + 1000 out");
        let rating = r.rating.unwrap();
        assert_eq!(rating.total, estimate);
        assert_eq!(rating.line_items.len(), 2);
        assert_eq!(rating.line_items[0].tier, tier);
        assert_eq!(rating.line_items[0].per_units, 1_000_000);

        let c = commit_usage(
            &app,
            &r.reservation_id,
            usage(vec![
                item("input_tokens", model, "2760"),
                item("output_tokens", model, "600"),
                item("reasoning_tokens", model, "200"),
            ]),
            &format!("c-{model}"),
        )
        .await
        .unwrap();
        assert_eq!(c.amount, actual, "{model}: 2760 in + 600 out + 200 reasoning");
        let lines = c.rating.unwrap().line_items;
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2].meter, "reasoning_tokens");
        let sum: rust_decimal::Decimal =
            lines.iter().map(|l| l.subtotal.parse::<rust_decimal::Decimal>().unwrap()).sum();
        assert_eq!(sum.normalize().to_string(), actual, "the total is the sum of the lines");
    }
}

#[tokio::test]
async fn activities_are_priced_like_the_published_schedule() {
    let app = app().await;
    let cases = [
        (item("runtime_minutes", "", "2.5"), "2.5"),
        (item("tasks", "", "1"), "0.25"),
        (item("voice_minutes", "", "2"), "6"),
        (item("meeting_minutes", "", "10"), "15"),
        (item("image_standard", "", "1"), "4"),
        (item("image_hd", "", "1"), "8"),
        (item("app_calls", "", "3"), "0.15"),
        (item("web_searches", "", "5"), "0"),
        (item("task_creations", "", "2"), "0"),
        // A local model's tokens are free; its runtime is not.
        (item("output_tokens", "local-llama", "50000"), "0"),
    ];
    for (i, (it, credits)) in cases.into_iter().enumerate() {
        let c = charge_usage(&app, usage(vec![it.clone()]), &format!("a{i}")).await.unwrap();
        assert_eq!(c.amount, credits, "{it:?}");
    }
    let local = charge_usage(
        &app,
        usage(vec![item("output_tokens", "local-llama", "5000"), item("runtime_minutes", "", "1")]),
        "local",
    )
    .await
    .unwrap();
    assert_eq!(local.amount, "1");
}

#[tokio::test]
async fn a_price_change_during_a_hold_does_not_change_its_commit() {
    let app = app().await;
    let tokens = || usage(vec![item("input_tokens", "example-fast-1", "1000000")]);
    let held = reserve_usage(&app, tokens(), "before").await;
    assert_eq!(held.amount, "15");
    let pinned = held.rating.unwrap().price_version;

    let book = app
        .credit_pricing()
        .set_prices(req(
            TENANT,
            pb::SetPricesRequest {
                prices: vec![pb::Price {
                    meter: "input_tokens".into(),
                    tier: "fast".into(),
                    unit_price: "30".into(),
                    per_units: 1_000_000,
                    ..Default::default()
                }],
                idempotency_key: "double-fast".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(book.tenant_id, TENANT);

    let now = quote(&app, tokens()).await.unwrap();
    assert_eq!(now.total, "30", "new calls see the new price");
    assert_ne!(now.price_version, pinned);
    let c = commit_usage(&app, &held.reservation_id, tokens(), "commit").await.unwrap();
    assert_eq!(c.amount, "15", "the hold's commit uses the version its reserve pinned");
    assert_eq!(c.rating.as_ref().unwrap().price_version, pinned);
    // A replay answers the same rating.
    let again = commit_usage(&app, &held.reservation_id, tokens(), "commit").await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.rating, c.rating);
    let fresh = reserve_usage(&app, tokens(), "after").await;
    assert_eq!(fresh.amount, "30");

    // The usage event keeps its line items and price version.
    let pg = app.backends.pg().await;
    let (version, lines): (String, serde_json::Value) =
        sqlx::query_as("SELECT price_version, line_items FROM usage_events WHERE event_id = $1::uuid")
            .bind(&c.event_id)
            .fetch_one(&pg)
            .await
            .unwrap();
    assert_eq!(version, pinned);
    assert_eq!(lines[0]["subtotal"], "15");
}

#[tokio::test]
async fn unknown_meters_and_unpriced_models_are_errors_and_change_nothing() {
    let app = app().await;
    let before = app.balance("u").await;
    let cases = [
        (usage(vec![item("tasks", "", "1"), item("bogus_meter", "", "1")]), "UNKNOWN_METER", "usage.items[1].meter"),
        (usage(vec![item("input_tokens", "no-such-model", "1")]), "NO_PRICE", "usage.items[0].model"),
        (usage(vec![item("input_tokens", "", "1")]), "NO_PRICE", "usage.items[0].model"),
        (usage(vec![item("tasks", "", "-1")]), "INVALID_USAGE", "usage.items[0].quantity"),
        (usage(vec![item("tasks", "", "1.0000001")]), "INVALID_USAGE", "usage.items[0].quantity"),
        (usage(vec![item("tasks", "", "1000000000001")]), "INVALID_USAGE", "usage.items[0].quantity"),
        (usage(vec![item("Bad Meter", "", "1")]), "INVALID_USAGE", "usage.items[0].meter"),
        (usage(vec![]), "INVALID_USAGE", "usage.items"),
    ];
    for (i, (u, reason, field)) in cases.into_iter().enumerate() {
        let e = charge_usage(&app, u.clone(), &format!("bad{i}")).await.unwrap_err();
        assert_status(&e, Code::InvalidArgument, reason, Some(field));
        let e = quote(&app, u).await.unwrap_err();
        assert_status(&e, Code::InvalidArgument, reason, Some(field));
    }
    assert_eq!(app.balance("u").await, before);
}

#[tokio::test]
async fn quote_has_no_side_effects_and_tenants_define_meters() {
    let app = app().await;
    let q = quote(&app, usage(vec![item("image_hd", "", "2"), item("tasks", "", "3")])).await.unwrap();
    assert_eq!(q.total, "16.75");
    assert_eq!(app.available("u").await, "100000");

    // A tenant-defined meter, and a model mapped to a tier.
    app.credit_pricing()
        .set_prices(req(
            TENANT,
            pb::SetPricesRequest {
                prices: vec![pb::Price {
                    meter: "cover_letters".into(),
                    unit_price: "2".into(),
                    per_units: 1,
                    ..Default::default()
                }],
                models: [("our-tuned-model".to_string(), "standard".to_string())].into(),
                idempotency_key: "custom".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let c = charge_usage(
        &app,
        usage(vec![item("cover_letters", "", "3"), item("input_tokens", "our-tuned-model", "1000000")]),
        "letters",
    )
    .await
    .unwrap();
    assert_eq!(c.amount, "156", "3 letters at 2 + a million standard input tokens at 150");

    // Bad prices name their field and write nothing.
    let e = app
        .credit_pricing()
        .set_prices(req(
            TENANT,
            pb::SetPricesRequest {
                prices: vec![pb::Price { meter: "x".into(), unit_price: "-1".into(), ..Default::default() }],
                idempotency_key: "bad-price".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, "INVALID_PRICE", Some("prices[0].unit_price"));

    // A runtime key may quote but not change prices.
    let runtime = app.create_key(TENANT, pb::ApiKeyRole::Runtime).await;
    let e = app
        .pricing_raw()
        .set_prices(crate::harness::with_key(
            &runtime,
            pb::SetPricesRequest {
                prices: vec![pb::Price { meter: "x".into(), unit_price: "1".into(), ..Default::default() }],
                idempotency_key: "runtime".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_status(&e, Code::PermissionDenied, "WRONG_ROLE", None);
}

#[tokio::test]
async fn operators_change_the_default_catalog_under_tenant_overrides() {
    let app = app().await;
    app.create_tenant("other").await;
    // acme overrides tasks; other does not.
    app.credit_pricing()
        .set_prices(req(
            TENANT,
            pb::SetPricesRequest {
                prices: vec![pb::Price { meter: "tasks".into(), unit_price: "0.2".into(), ..Default::default() }],
                idempotency_key: "acme-tasks".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let book = app
        .credit_pricing()
        .set_prices(req_operator(pb::SetPricesRequest {
            prices: vec![
                pb::Price { meter: "tasks".into(), unit_price: "0.3".into(), ..Default::default() },
                pb::Price { meter: "app_calls".into(), unit_price: "0.1".into(), ..Default::default() },
            ],
            idempotency_key: "defaults-2".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(book.tenant_id, "", "an operator writes the default catalog");
    let q = |tenant: &'static str| {
        let mut client = app.credit_pricing();
        async move {
            client
                .quote(req(
                    tenant,
                    pb::QuoteRequest {
                        usage: Some(usage(vec![item("tasks", "", "10"), item("app_calls", "", "10")])),
                        at: None,
                    },
                ))
                .await
                .unwrap()
                .into_inner()
                .rating
                .unwrap()
                .total
        }
    };
    assert_eq!(q(TENANT).await, "3", "acme: its own tasks price, the new default app_calls price");
    assert_eq!(q("other").await, "4", "other: both new defaults");

    let catalog =
        app.credit_pricing().get_catalog(req(TENANT, pb::GetCatalogRequest { at: None })).await.unwrap().into_inner();
    let tasks = catalog.prices.iter().find(|p| p.meter == "tasks").unwrap();
    assert_eq!(tasks.unit_price, "0.2");
    assert_eq!(catalog.models.get("example-fast-1").map(String::as_str), Some("fast"));
}
