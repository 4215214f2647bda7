//! Prometheus metrics: one registry per process, exposed as text on
//! `metrics.listen` (see `serve`).
//!
//! Recording is cheap on purpose: counters and histograms are atomics
//! behind a read lock, label sets are small. Gauges that describe the
//! stores (active holds, drift) are set by the background jobs, never
//! computed at scrape time, so a scrape costs no Redis or PostgreSQL call.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{LazyLock, Mutex, atomic::AtomicU64},
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// `<package.Service>/<Method>`, e.g. `creditd.v1.CreditService/Reserve`
    /// (a fixed set: see `grpc::observe`).
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcCodeLabels {
    pub method: &'static str,
    /// The gRPC status code name, e.g. `OK`, `UNAVAILABLE`.
    pub code: &'static str,
}

/// The outcome of a Reserve or Authorize.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Decision {
    granted,
    insufficient_credits,
    cap_reached,
    account_suspended,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Call {
    reserve,
    authorize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub call: Call,
    pub decision: Decision,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Store {
    redis,
    postgres,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ErrorKind {
    /// Connection refused or dropped, timeout: retrying may succeed.
    unavailable,
    /// Anything else the store answered that the service did not expect.
    other,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreErrorLabels {
    pub store: Store,
    pub kind: ErrorKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
}

/// How a hold ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum HoldEnd {
    committed,
    released,
    expired,
    /// A commit whose PostgreSQL write never confirmed: its charge undone.
    reverted,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HoldEndLabels {
    pub end: HoldEnd,
}

/// What a PostgreSQL lookup of an API key not cached found.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum KeyLookup {
    found,
    unknown,
    /// Refused without a lookup (`auth.lookups_per_second`).
    rate_limited,
    error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLookupLabels {
    pub result: KeyLookup,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs to ~3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// A quantity measured per tenant: exported as its total over the
/// tenants this replica measured, and, only where `metrics.tenant_labels`
/// is on, as one series per tenant (tenant ids are customer names an
/// unauthenticated scrape should not reveal by default).
pub struct TenantGauge {
    total: Gauge<f64, AtomicU64>,
    by_tenant: Family<TenantLabels, Gauge<f64, AtomicU64>>,
    values: Mutex<HashMap<String, f64>>,
}

impl TenantGauge {
    fn new() -> Self {
        TenantGauge { total: Gauge::default(), by_tenant: Family::default(), values: Mutex::new(HashMap::new()) }
    }

    /// Records the tenant's latest value (and so the new total).
    pub fn set(&self, tenant: &str, value: f64) {
        let mut values = self.values.lock().expect("tenant gauge lock");
        match values.get_mut(tenant) {
            Some(slot) => *slot = value,
            None => {
                values.insert(tenant.to_string(), value);
            }
        }
        self.total.set(values.values().sum());
        self.by_tenant.get_or_create(&TenantLabels { tenant: tenant.to_string() }).set(value);
    }

    /// The tenant's latest value, if it was measured.
    pub fn get(&self, tenant: &str) -> Option<f64> {
        self.values.lock().expect("tenant gauge lock").get(tenant).copied()
    }
}

pub struct Metrics {
    registry: Registry,
    /// The per-tenant series, encoded only with `metrics.tenant_labels`.
    tenant_registry: Registry,
    pub rpc_duration: HistogramFamily<RpcLabels>,
    pub rpc_total: Family<RpcCodeLabels, Counter>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub holds_active: TenantGauge,
    pub holds_ended: Family<HoldEndLabels, Counter>,
    pub commit_batch: Histogram,
    pub commit_write: Histogram,
    pub store_errors: Family<StoreErrorLabels, Counter>,
    pub rebuilds: Counter,
    pub fence_behind: Counter,
    pub tenants_loading: Gauge,
    pub drift_accounts: TenantGauge,
    pub drift_credits: TenantGauge,
    pub drift_found: Counter,
    pub drift_repaired: Counter,
    pub reconcile_runs: Counter,
    pub reconcile_skipped_busy: Counter,
    pub key_lookups: Family<KeyLookupLabels, Counter>,
    pub watch_streams: Gauge,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("creditd");
        let mut tenant_registry = Registry::with_prefix("creditd_tenant");
        let rpc_duration: HistogramFamily<RpcLabels> = Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "rpc_duration",
            "Time from a call's arrival to its response headers, per RPC",
            Unit::Seconds,
            rpc_duration.clone(),
        );
        let rpc_total = Family::<RpcCodeLabels, Counter>::default();
        registry.register("rpc", "Calls answered, per RPC and gRPC status code", rpc_total.clone());
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Reserve and Authorize decisions: granted, or the denial reason (replays count again)",
            decisions.clone(),
        );
        let holds_active = TenantGauge::new();
        registry.register(
            "holds_active",
            "Active holds of all tenants, as of the last reaper pass of this replica",
            holds_active.total.clone(),
        );
        tenant_registry.register(
            "holds_active",
            "Active holds per tenant, as of the last reaper pass of this replica",
            holds_active.by_tenant.clone(),
        );
        let holds_ended = Family::<HoldEndLabels, Counter>::default();
        registry.register(
            "holds_ended",
            "Holds settled by this replica: committed, released, expired by the reaper, or reverted",
            holds_ended.clone(),
        );
        let commit_batch = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        registry.register(
            "commit_batch_size",
            "Usage events written per group-commit transaction",
            commit_batch.clone(),
        );
        let commit_write = latency_histogram();
        registry.register_with_unit(
            "commit_write_duration",
            "Time of one group-commit transaction in PostgreSQL",
            Unit::Seconds,
            commit_write.clone(),
        );
        let store_errors = Family::<StoreErrorLabels, Counter>::default();
        registry.register("store_errors", "Errors from Redis and PostgreSQL, by kind", store_errors.clone());
        let rebuilds = Counter::default();
        registry.register("rebuilds", "Tenant hot states rebuilt from PostgreSQL by this replica", rebuilds.clone());
        let fence_behind = Counter::default();
        registry.register(
            "fence_behind",
            "Tenant hot states found behind PostgreSQL (Redis lost or rolled back writes) and rebuilt",
            fence_behind.clone(),
        );
        let tenants_loading = Gauge::default();
        registry.register(
            "tenants_loading",
            "Tenants whose hot state this replica is rebuilding or has queued for a rebuild",
            tenants_loading.clone(),
        );
        let drift_accounts = TenantGauge::new();
        registry.register(
            "drift_accounts",
            "Accounts (all tenants) whose Redis balance differed from the ledger at their tenant's last reconciliation",
            drift_accounts.total.clone(),
        );
        tenant_registry.register(
            "drift_accounts",
            "Accounts whose Redis balance differed from the ledger at the last reconciliation, per tenant",
            drift_accounts.by_tenant.clone(),
        );
        let drift_credits = TenantGauge::new();
        registry.register(
            "drift_credits",
            "Sum of |Redis balance - ledger balance| over drifting accounts of all tenants, in credits",
            drift_credits.total.clone(),
        );
        tenant_registry.register(
            "drift_credits",
            "Sum of |Redis balance - ledger balance| over drifting accounts at the last reconciliation, per tenant, in credits",
            drift_credits.by_tenant.clone(),
        );
        let drift_found = Counter::default();
        registry.register("drift_found", "Account drifts found by the reconciler", drift_found.clone());
        let drift_repaired = Counter::default();
        registry.register(
            "drift_repaired",
            "Account drifts repaired by the reconciler (the Redis balance set to the ledger's)",
            drift_repaired.clone(),
        );
        let reconcile_runs = Counter::default();
        registry.register("reconcile_runs", "Tenant reconciliations completed", reconcile_runs.clone());
        let reconcile_skipped_busy = Counter::default();
        registry.register(
            "reconcile_skipped_busy",
            "Accounts the reconciler skipped because they changed while it compared them",
            reconcile_skipped_busy.clone(),
        );
        let key_lookups = Family::<KeyLookupLabels, Counter>::default();
        registry.register(
            "auth_key_lookups",
            "PostgreSQL lookups of API keys this replica had not cached, by result (rate_limited: refused without one)",
            key_lookups.clone(),
        );
        let watch_streams = Gauge::default();
        registry.register("watch_streams", "WatchAlerts streams open on this replica", watch_streams.clone());
        Metrics {
            registry,
            tenant_registry,
            rpc_duration,
            rpc_total,
            decisions,
            holds_active,
            holds_ended,
            commit_batch,
            commit_write,
            store_errors,
            rebuilds,
            fence_behind,
            tenants_loading,
            drift_accounts,
            drift_credits,
            drift_found,
            drift_repaired,
            reconcile_runs,
            reconcile_skipped_busy,
            key_lookups,
            watch_streams,
        }
    }

    /// The registry in the OpenMetrics text format; with `tenant_labels`,
    /// also the per-tenant series (`creditd_tenant_*{tenant}`).
    pub fn encode(&self, tenant_labels: bool) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        encode_registry(&mut out, &self.registry).expect("writing to a String cannot fail");
        if tenant_labels {
            encode_registry(&mut out, &self.tenant_registry).expect("writing to a String cannot fail");
        }
        encode_eof(&mut out).expect("writing to a String cannot fail");
        out
    }

    pub fn store_error(&self, store: Store, unavailable: bool) {
        let kind = if unavailable { ErrorKind::unavailable } else { ErrorKind::other };
        self.store_errors.get_or_create(&StoreErrorLabels { store, kind }).inc();
    }

    pub fn hold_ended(&self, end: HoldEnd, count: u64) {
        if count > 0 {
            self.holds_ended.get_or_create(&HoldEndLabels { end }).inc_by(count);
        }
    }

    pub fn key_lookup(&self, result: KeyLookup) {
        self.key_lookups.get_or_create(&KeyLookupLabels { result }).inc();
    }

    pub fn decision(&self, call: Call, decision: Decision) {
        self.decisions.get_or_create(&DecisionLabels { call, decision }).inc();
    }

    pub fn rpc(&self, method: &'static str, code: &'static str, elapsed: Duration) {
        self.rpc_duration.get_or_create(&RpcLabels { method }).observe(elapsed.as_secs_f64());
        self.rpc_total.get_or_create(&RpcCodeLabels { method, code }).inc();
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// The name of a gRPC status code, as Prometheus labels show it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `GET /metrics` (any other path: 404) over HTTP/1.1 until
/// `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tenant_labels: bool,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use http_body_util::Full;
    use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
    use hyper_util::rt::TokioIo;

    let local: SocketAddr = listener.local_addr()?;
    tracing::info!(listen = %local, "metrics endpoint serving /metrics");
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return Ok(()),
        };
        tokio::spawn(async move {
            let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                let response = if request.uri().path() == "/metrics" {
                    Response::builder()
                        .header("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                        .body(Full::new(Bytes::from(metrics().encode(tenant_labels))))
                } else {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(b"not found\n")))
                };
                Ok::<_, hyper::http::Error>(response.expect("a static response is valid"))
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}
