//! Per-call observability, as a tower layer around every gRPC service:
//! a tracing span per call (handlers record tenant, account and
//! reservation ids on it, see `record`), and the latency histogram and
//! status counter of `crate::metrics`.

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::LazyLock,
    task::{Context, Poll},
    time::Instant,
};

use prost::Message;
use tonic::codegen::http;
use tracing::{Instrument, field::Empty};

use crate::metrics::{code_name, metrics};

/// Every method this server serves, as `package.Service/Method`. Calls to
/// anything else are counted as "other" (label values stay bounded). The
/// names live for the whole process, so a call's labels and span borrow
/// them instead of allocating.
static KNOWN: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    let mut known = HashSet::new();
    for set in [crate::pb::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else { continue };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let name = service.name.unwrap_or_default();
                for method in service.method {
                    let path = format!("{package}.{name}/{}", method.name.unwrap_or_default());
                    known.insert(&*Box::leak(path.into_boxed_str()));
                }
            }
        }
    }
    for reflection in ["grpc.reflection.v1", "grpc.reflection.v1alpha"] {
        known.insert(&*Box::leak(format!("{reflection}.ServerReflection/ServerReflectionInfo").into_boxed_str()));
    }
    known
});

/// Records `value` as `field` of the current call's span (`tenant`,
/// `account`, `reservation`).
pub fn record(field: &'static str, value: impl std::fmt::Display) {
    tracing::Span::current().record(field, tracing::field::display(value));
}

/// `access`: the level of the per-call access log line (`None`: off).
#[derive(Clone, Copy, Debug, Default)]
pub struct ObserveLayer {
    pub access: Option<tracing::Level>,
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner, access: self.access }
    }
}

#[derive(Clone, Debug)]
pub struct Observe<S> {
    inner: S,
    access: Option<tracing::Level>,
}

/// The trace id of a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`).
fn trace_id(headers: &http::HeaderMap) -> Option<String> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    let mut parts = value.split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id != "0".repeat(32)).then(|| id.to_string())
}

/// One access log line (inside the call's span, so it carries the tenant).
fn access_line(level: tracing::Level, method: &str, code: &str, elapsed: std::time::Duration, trace: &str) {
    let ms = elapsed.as_secs_f64() * 1000.0;
    macro_rules! line {
        ($lvl:expr) => {
            tracing::event!(target: "creditd::access", $lvl, method, code, duration_ms = ms, trace_id = trace, "call")
        };
    }
    match level {
        tracing::Level::ERROR => line!(tracing::Level::ERROR),
        tracing::Level::WARN => line!(tracing::Level::WARN),
        tracing::Level::INFO => line!(tracing::Level::INFO),
        tracing::Level::DEBUG => line!(tracing::Level::DEBUG),
        tracing::Level::TRACE => line!(tracing::Level::TRACE),
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for Observe<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> <Self as tower::Service<http::Request<B>>>::Future {
        let path = request.uri().path().trim_start_matches('/');
        let method: &'static str = KNOWN.get(path).copied().unwrap_or("other");
        let span = tracing::info_span!("rpc", method = %method, tenant = Empty, account = Empty, reservation = Empty);
        let access = self.access;
        let trace = if access.is_some() { trace_id(request.headers()).unwrap_or_default() } else { String::new() };
        let start = Instant::now();
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(
            async move {
                let mut result = future.await;
                if let Ok(response) = &mut result {
                    rewrite_transport_errors(response.headers_mut());
                }
                // Errors travel as trailers-only responses: grpc-status is
                // in the headers. A success carries it in the trailers.
                let code = match &result {
                    Ok(response) => response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or("OK", |c| code_name(tonic::Code::from_i32(c))),
                    Err(_) => "UNKNOWN",
                };
                let elapsed = start.elapsed();
                metrics().rpc(method, code, elapsed);
                if let Some(level) = access {
                    access_line(level, method, code, elapsed, &trace);
                }
                result
            }
            .instrument(span),
        )
    }
}

/// The largest request message the server decodes (tonic's default,
/// 4 MiB): documented in common.proto and README.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Rewrites the statuses tonic itself answers for a request it could not
/// read, before any handler ran: a message over the size limit
/// (OUT_OF_RANGE) becomes RESOURCE_EXHAUSTED (MESSAGE_TOO_LARGE) naming
/// the limit; a call with no message (INTERNAL) becomes INVALID_ARGUMENT
/// (MALFORMED_REQUEST). Both changed nothing.
fn rewrite_transport_errors(headers: &mut http::HeaderMap) {
    let code = headers.get("grpc-status").map(|v| v.as_bytes().to_vec());
    let replacement = match code.as_deref() {
        Some(b"11") | Some(b"13") => match tonic::Status::from_header_map(headers) {
            Some(s)
                if s.code() == tonic::Code::OutOfRange && s.message().contains("decoded message length too large") =>
            {
                let found = s
                    .message()
                    .split("found ")
                    .nth(1)
                    .and_then(|t| t.split(' ').next())
                    .map_or_else(String::new, |n| format!(" ({n} bytes)"));
                Some(crate::error::Error::ResourceExhausted(
                    crate::error::Reason::MessageTooLarge,
                    format!("the request message{found} is larger than the limit of {MAX_MESSAGE_BYTES} bytes (4 MiB)"),
                ))
            }
            Some(s) if s.code() == tonic::Code::Internal && s.message() == "Missing request message." => {
                Some(crate::error::Error::invalid(
                    "request",
                    crate::error::Reason::MalformedRequest,
                    "is missing: the call carried no message",
                ))
            }
            _ => None,
        },
        _ => None,
    };
    if let Some(error) = replacement {
        let status = tonic::Status::from(error);
        headers.remove("grpc-message");
        headers.remove("grpc-status-details-bin");
        if status.add_header(headers).is_err() {
            tracing::debug!("cannot rewrite a transport error's status");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_access_line_names_method_tenant_code_duration_and_trace() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("rpc", method = "m", tenant = Empty, account = Empty, reservation = Empty);
            let _e = span.enter();
            record("tenant", "acme");
            let t = "4bf92f3577b34da6a3ce929d0e0e4736";
            access_line(
                tracing::Level::INFO,
                "creditd.v1.CreditService/Reserve",
                "OK",
                std::time::Duration::from_millis(3),
                t,
            );
            // Below the subscriber's level: not written.
            access_line(tracing::Level::DEBUG, "creditd.v1.CreditService/Commit", "OK", Default::default(), "");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        for part in [
            "creditd::access",
            "tenant=acme",
            "method=\"creditd.v1.CreditService/Reserve\"",
            "code=\"OK\"",
            "duration_ms=3",
            "trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"",
        ] {
            assert!(text.contains(part), "{part} missing in {text}");
        }
    }

    #[test]
    fn the_trace_id_comes_from_traceparent() {
        let mut h = http::HeaderMap::new();
        assert_eq!(trace_id(&h), None);
        h.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        assert_eq!(trace_id(&h).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        h.insert("traceparent", "00-xyz-00f067aa0ba902b7-01".parse().unwrap());
        assert_eq!(trace_id(&h), None);
    }

    #[test]
    fn every_creditd_method_is_known() {
        assert!(KNOWN.contains("creditd.v1.CreditService/Reserve"));
        assert!(KNOWN.contains("creditd.v1.AdminService/CheckBalances"));
        assert!(KNOWN.contains("grpc.health.v1.Health/Check"));
        assert!(!KNOWN.contains("creditd.v1.CreditService/Nope"));
    }
}
