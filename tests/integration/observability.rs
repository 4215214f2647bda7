//! The reconciler and the metrics endpoint: drift is measured exactly under
//! traffic, repaired from the ledger, logged and exported.

use std::{sync::Arc, time::Duration};

use creditd::pb::{self, GrantCategory};
use futures::{StreamExt, stream};
use redis::AsyncCommands;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Backends, TENANT, TestApp, eventually, req};

async fn check(app: &TestApp) -> pb::CheckBalancesResponse {
    app.admin
        .clone()
        .check_balances(req(TENANT, pb::CheckBalancesRequest {}))
        .await
        .expect("check balances")
        .into_inner()
}

/// `GET path` on the metrics endpoint: (status line, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the metrics endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// The value of the sample `name` (with exactly `labels`, e.g.
/// `{call="reserve",decision="granted"}`, or "" for none).
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let wanted = format!("{name}{labels} ");
    text.lines().find_map(|l| l.strip_prefix(&wanted)).and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn check_balances_sees_no_drift_under_traffic() {
    // Commits in flight (Redis charged, PostgreSQL not yet written) and
    // ledger rows not yet applied must not read as drift.
    let first = Arc::new(TestApp::spawn().await);
    let second = Arc::new(TestApp::spawn_on(first.backends.clone(), &[]).await);
    second.adopt_keys(&first);
    first.account("org", None, false, None).await;
    for i in 0..8 {
        first.account(&format!("u{i}"), Some("org"), true, None).await;
    }
    first.grant("org", "100000", GrantCategory::Plan).await;

    let traffic = {
        let (first, second) = (first.clone(), second.clone());
        tokio::spawn(async move {
            stream::iter(0..1500)
                .for_each_concurrent(32, |i| {
                    let app = if i % 2 == 0 { first.clone() } else { second.clone() };
                    async move {
                        let user = format!("u{}", i % 8);
                        let r = app.reserve(&user, "3", &format!("r{i}")).await.expect("reserve");
                        assert!(r.granted);
                        if i % 5 == 0 {
                            app.release(&r.reservation_id, &format!("l{i}")).await.expect("release");
                        } else {
                            app.commit(&r.reservation_id, "2.5", &format!("c{i}")).await.expect("commit");
                        }
                        if i % 300 == 0 {
                            app.grant(&user, "10", GrantCategory::Purchase).await;
                        }
                    }
                })
                .await
        })
    };
    let mut checks = 0;
    let mut judged = 0;
    while !traffic.is_finished() {
        let report = check(&first).await;
        assert!(report.drifts.is_empty(), "drift reported under traffic: {:?}", report.drifts);
        checks += 1;
        judged += report.accounts_checked as usize;
    }
    traffic.await.expect("traffic ran");
    assert!(checks > 0);
    assert!(judged > 0, "no account was judged under traffic: the check proved nothing");
    let settled = check(&first).await;
    assert!(settled.drifts.is_empty() && settled.busy_accounts.is_empty(), "{settled:?}");
    assert_eq!(settled.accounts_checked, 9);
    eprintln!("{checks} checks under traffic, {judged} account comparisons judged");
}

#[tokio::test]
async fn reconciler_repairs_a_drifted_balance_and_exports_it() {
    let backends = Backends::fresh().await;
    let app = TestApp::spawn_on(
        backends.clone(),
        &[("reconcile.interval", "300ms"), ("reconcile.repair", "true"), ("metrics.listen", "127.0.0.1:0")],
    )
    .await;
    app.create_tenant(TENANT).await;
    app.account("alice", None, false, None).await;
    app.account("bob", None, false, None).await;
    app.grant("alice", "50", GrantCategory::Purchase).await;
    app.grant("bob", "20", GrantCategory::Purchase).await;
    let r = app.reserve("alice", "5", "r1").await.unwrap();
    app.commit(&r.reservation_id, "4", "c1").await.unwrap();

    // Corrupt alice's hot balance behind creditd's back: +7 credits.
    let mut redis = backends.redis().await;
    let key = format!("{}{{t:{TENANT}}}:a:alice", backends.key_prefix);
    let _: i64 = redis.hincr(&key, "b", 7_000_000).await.unwrap();

    // Repaired to the ledger's 46 within a few reconciler intervals.
    eventually(Duration::from_secs(15), || async { app.available("alice").await == "46" }).await;
    assert_eq!(app.available("bob").await, "20", "an account without drift is untouched");
    let report = check(&app).await;
    assert!(report.drifts.is_empty(), "{report:?}");

    let metrics_addr = app.metrics_addr.expect("metrics endpoint configured");
    let (status, body) = http_get(metrics_addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    assert!(sample(&body, "creditd_drift_repaired_total", "").is_some_and(|v| v >= 1.0), "{body}");
    assert!(sample(&body, "creditd_drift_found_total", "").is_some_and(|v| v >= 1.0));
    assert!(
        sample(&body, "creditd_rpc_total", "{method=\"creditd.v1.CreditService/Reserve\",code=\"OK\"}")
            .is_some_and(|v| v >= 1.0),
        "{body}"
    );
    assert!(
        body.contains("creditd_rpc_duration_seconds_bucket{le=\"0.0001\",method=\"creditd.v1.CreditService/Reserve\"}")
            || body.contains(
                "creditd_rpc_duration_seconds_bucket{method=\"creditd.v1.CreditService/Reserve\",le=\"0.0001\"}"
            )
    );
    assert!(sample(&body, "creditd_commit_batch_size_count", "").is_some_and(|v| v >= 1.0));
    assert!(body.ends_with("# EOF\n"));
    let (status, _) = http_get(metrics_addr, "/nope").await;
    assert!(status.contains("404"), "{status}");
}

#[tokio::test]
async fn decisions_and_errors_are_counted_by_reason() {
    let app = TestApp::spawn_on(Backends::fresh().await, &[("metrics.listen", "127.0.0.1:0")]).await;
    app.create_tenant(TENANT).await;
    app.account("carol", None, false, None).await;
    app.grant("carol", "1", GrantCategory::Purchase).await;
    let addr = app.metrics_addr.expect("metrics endpoint configured");
    let denied_label = "{call=\"reserve\",decision=\"insufficient_credits\"}";
    let before = sample(&http_get(addr, "/metrics").await.1, "creditd_decisions_total", denied_label).unwrap_or(0.0);
    let r = app.reserve("carol", "5", "big").await.unwrap();
    assert!(!r.granted);
    let bad = app.reserve("carol", "-1", "negative").await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let body = http_get(addr, "/metrics").await.1;
    // Other tests share the process's registry: compare with before.
    assert!(sample(&body, "creditd_decisions_total", denied_label).unwrap() >= before + 1.0, "{body}");
    assert!(
        sample(&body, "creditd_rpc_total", "{method=\"creditd.v1.CreditService/Reserve\",code=\"INVALID_ARGUMENT\"}")
            .is_some_and(|v| v >= 1.0),
        "{body}"
    );
    // The reaper (every 50 ms here) sets the active-hold gauge: its
    // total only, since `metrics.tenant_labels` is off by default, so the
    // scrape names no tenant.
    eventually(Duration::from_secs(5), || async {
        sample(&http_get(addr, "/metrics").await.1, "creditd_holds_active", "").is_some()
    })
    .await;
    let body = http_get(addr, "/metrics").await.1;
    assert!(!body.contains("tenant="), "a default scrape names no tenant:\n{body}");
    assert!(!body.contains(TENANT), "{body}");
}

/// With `metrics.tenant_labels`, per-tenant series appear beside the
/// totals; the setting is per listener, so other apps in this process keep
/// their scrapes free of tenant ids.
#[tokio::test]
async fn tenant_labels_are_opt_in() {
    let app = TestApp::spawn_on(
        Backends::fresh().await,
        &[("metrics.listen", "127.0.0.1:0"), ("metrics.tenant_labels", "true")],
    )
    .await;
    app.create_tenant(TENANT).await;
    app.account("carol", None, false, None).await;
    app.grant("carol", "10", GrantCategory::Purchase).await;
    let r = app.reserve("carol", "1", "held").await.unwrap();
    assert!(r.granted);
    let addr = app.metrics_addr.expect("metrics endpoint configured");
    let series = format!("{{tenant=\"{TENANT}\"}}");
    eventually(Duration::from_secs(5), || async {
        let body = http_get(addr, "/metrics").await.1;
        sample(&body, "creditd_tenant_holds_active", &series).is_some_and(|v| v >= 1.0)
            && sample(&body, "creditd_holds_active", "").is_some_and(|v| v >= 1.0)
    })
    .await;
    let body = http_get(addr, "/metrics").await.1;
    assert!(body.ends_with("# EOF\n") && body.matches("# EOF").count() == 1, "{body}");
}

/// `creditd health` and `creditd smoke` (what the chart's probes and
/// `helm test` run) against a running server: exit 0 when it serves and a
/// Reserve/Release works, non-zero otherwise.
// Multi-threaded: the commands run as blocking child processes while this
// runtime serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_and_smoke_commands_answer() {
    let app = TestApp::spawn().await;
    app.account("a", None, false, None).await;
    app.grant("a", "1", GrantCategory::Plan).await;
    let key = app.create_key(TENANT, pb::ApiKeyRole::Runtime).await;
    let addr = app.addr.to_string();
    let run = |args: Vec<&str>, key: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_creditd"))
            .args(args)
            .env("CREDITD_API_KEY", key)
            .output()
            .expect("run creditd");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (ok, out) = run(vec!["health", "--addr", &addr, "--service", "creditd.liveness"], "");
    assert!(ok, "{out}");
    assert!(run(vec!["health", "--addr", &addr], "").0);
    let (ok, out) = run(vec!["smoke", "--addr", &addr, "--account", "a"], &key);
    assert!(ok && out.contains("reserve: granted") && out.contains("release: done"), "{out}");
    assert_eq!(app.available("a").await, "1", "the smoke hold was released");
    // A denial, an unknown account or a wrong key fail the smoke test.
    let (ok, out) = run(vec!["smoke", "--addr", &addr, "--account", "a", "--amount", "2"], &key);
    assert!(!ok && out.contains("denied"), "{out}");
    assert!(!run(vec!["smoke", "--addr", &addr, "--account", "nobody"], &key).0);
    let wrong = format!("cdk_{}_{}", "0a".repeat(6), "1b".repeat(32));
    assert!(!run(vec!["smoke", "--addr", &addr, "--account", "a"], &wrong).0);
    // Nothing listening: both fail.
    let closed = format!("127.0.0.1:{}", crate::fault_tools::free_port());
    assert!(!run(vec!["health", "--addr", &closed, "--timeout-ms", "500"], "").0);
    assert!(!run(vec!["smoke", "--addr", &closed], "").0);
}
