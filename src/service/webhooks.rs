//! Alert webhooks: each alert of a tenant with a webhook is POSTed as JSON
//! to its URL, signed, by whichever replica claims the delivery first;
//! failures are retried with exponential backoff until `max_attempts`,
//! then the delivery is dead (listed by `ListWebhookDeliveries`).
//!
//! Signature: header `creditd-signature: t=<unix seconds>,v1=<hex>` where
//! `<hex>` is HMAC-SHA256(secret, "<t>.<body>"). Receivers check it, reject
//! stale `t`, and deduplicate on `creditd-alert-id` (a crash between a send
//! and its record can send an alert again: delivery is at least once).
//!
//! Destinations (SSRF): a webhook may be `http://` or `https://` (rustls,
//! the Mozilla roots of `webpki-roots` plus `webhooks.ca_file`). Its host
//! must not be, or resolve to, a loopback, link-local (cloud metadata
//! 169.254.169.254 included), private (RFC 1918, ULA), CGNAT, multicast or
//! otherwise reserved address, unless the operator allowlists it
//! (`webhooks.allow_destinations`, CIDRs). SetWebhook checks it, and every
//! delivery checks it again after resolving the name and connects to the
//! very address it checked, so a name re-pointed at an internal address
//! later (DNS rebinding) is refused, not delivered to.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use super::Engine;
use crate::{
    domain::hmac::hmac_sha256,
    error::Result,
    store::alerts::{AlertRow, Delivery},
};

/// Where webhooks may go, and how https is verified.
#[derive(Clone)]
pub struct WebhookPolicy {
    /// Networks the operator allows despite the built-in refusals.
    allow: Vec<(IpAddr, u8)>,
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for WebhookPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookPolicy").field("allow", &self.allow).finish_non_exhaustive()
    }
}

/// Parses "a.b.c.d/n" or "x::/n" (a bare address is /32 or /128).
pub fn parse_cidr(text: &str) -> std::result::Result<(IpAddr, u8), String> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let ip: IpAddr = addr.trim().parse().map_err(|_| format!("{text:?} is not an address or CIDR"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{text:?} has a bad prefix length"))?,
        None => max,
    };
    Ok((ip, len))
}

/// Parses a comma-separated CIDR list ("" = none).
pub fn parse_cidrs(text: &str) -> std::result::Result<Vec<(IpAddr, u8)>, String> {
    text.split(',').map(str::trim).filter(|t| !t.is_empty()).map(parse_cidr).collect()
}

fn in_net(ip: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Why a destination address is refused by default, if it is.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4);
            }
            let seg = v6.segments();
            // NAT64 (64:ff9b::/96) carries an IPv4 address.
            if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
                let o = v6.octets();
                return forbidden_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if seg[0] & 0xffc0 == 0xfe80 || seg[0] & 0xffc0 == 0xfec0 {
                Some("link-local")
            } else if seg[0] & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
                Some("cloud metadata")
            } else {
                None
            }
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if o == [169, 254, 169, 254] {
        Some("cloud metadata")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_private() {
        Some("private (RFC 1918)")
    } else if o[0] == 100 && (64..128).contains(&o[1]) {
        Some("shared address space (CGNAT)")
    } else if o[0] == 0 {
        Some("this network (0.0.0.0/8)")
    } else if o[0] >= 224 {
        Some("multicast or reserved")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignments")
    } else if o[0] == 198 && (o[1] == 18 || o[1] == 19) {
        Some("benchmarking")
    } else {
        None
    }
}

impl WebhookPolicy {
    /// `allow`: comma-separated CIDRs; `ca_file`: extra PEM roots ("" =
    /// none).
    pub fn new(allow: &str, ca_file: &str) -> std::result::Result<WebhookPolicy, String> {
        let allow = parse_cidrs(allow).map_err(|e| format!("webhooks.allow_destinations: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if !ca_file.is_empty() {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            let certs = CertificateDer::pem_file_iter(ca_file)
                .map_err(|e| format!("webhooks.ca_file {ca_file}: {e}"))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| format!("webhooks.ca_file {ca_file}: {e}"))?;
            if certs.is_empty() {
                return Err(format!("webhooks.ca_file {ca_file}: no certificate in it"));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| format!("webhooks.ca_file {ca_file}: {e}"))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(WebhookPolicy { allow, tls: Arc::new(tls) })
    }

    /// Nothing allowlisted, the built-in roots.
    pub fn strict() -> WebhookPolicy {
        WebhookPolicy::new("", "").expect("the built-in policy is valid")
    }

    /// Whether creditd may send to `ip`; the reason when not.
    pub fn check_ip(&self, ip: IpAddr) -> std::result::Result<(), String> {
        match forbidden(ip) {
            Some(why) if !self.allow.iter().any(|net| in_net(ip, *net)) => {
                Err(format!("{ip} is a {why} address; an operator may allow it with webhooks.allow_destinations"))
            }
            _ => Ok(()),
        }
    }

    /// Checks a URL's form and every address its host resolves to now;
    /// returns those addresses. A name that does not resolve is an error.
    pub async fn resolve(&self, url: &url::Url) -> std::result::Result<Vec<SocketAddr>, String> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err("must be an http:// or https:// URL".into());
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not carry credentials".into());
        }
        let port = url.port_or_known_default().ok_or("has no port")?;
        let addrs: Vec<SocketAddr> = match url.host() {
            Some(url::Host::Ipv4(ip)) => vec![SocketAddr::new(IpAddr::V4(ip), port)],
            Some(url::Host::Ipv6(ip)) => vec![SocketAddr::new(IpAddr::V6(ip), port)],
            Some(url::Host::Domain(name)) => {
                let found = tokio::time::timeout(Duration::from_secs(3), tokio::net::lookup_host((name, port)))
                    .await
                    .map_err(|_| format!("host {name} did not resolve in time"))?
                    .map_err(|e| format!("host {name} does not resolve: {e}"))?;
                found.collect()
            }
            None => return Err("has no host".into()),
        };
        if addrs.is_empty() {
            return Err("host resolves to no address".into());
        }
        for a in &addrs {
            self.check_ip(a.ip())?;
        }
        Ok(addrs)
    }
}

/// The signature header's value for a body sent at `t`.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut message = format!("{t}.").into_bytes();
    message.extend_from_slice(body);
    format!("t={t},v1={}", hex::encode(hmac_sha256(secret.as_bytes(), &message)))
}

/// The JSON body of an alert.
pub fn body(tenant: &str, a: &AlertRow) -> Vec<u8> {
    serde_json::json!({
        "tenant_id": tenant,
        "cursor": a.seq.to_string(),
        "account_id": a.account_id,
        "kind": a.kind,
        "threshold": a.threshold.normalize().to_string(),
        "available": a.available.to_string(),
        "period_credits": a.period_credits.to_string(),
        "fired_at": a.fired_at.to_rfc3339(),
    })
    .to_string()
    .into_bytes()
}

async fn send(policy: &WebhookPolicy, d: Delivery, timeout: Duration) -> std::result::Result<(), String> {
    let url = url::Url::parse(&d.webhook.url).map_err(|e| format!("bad url: {e}"))?;
    // Resolved and checked now, and the connection goes to that address:
    // the name cannot be re-pointed between the check and the connect.
    let addrs = policy.resolve(&url).await.map_err(|e| format!("refused destination: {e}"))?;
    let body = body(&d.tenant_id, &d.alert);
    let t = chrono::Utc::now().timestamp();
    let host = url.host_str().unwrap_or_default().to_string();
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let request = hyper::Request::post(path)
        .header("host", authority)
        .header("content-type", "application/json")
        .header("creditd-alert-id", format!("{}:{}", d.tenant_id, d.alert.seq))
        .header("creditd-signature", signature(&d.webhook.secret, t, &body))
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("bad request: {e}"))?;
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addrs[0]).await.map_err(|e| format!("connection: {e}"))?;
        let _ = tcp.set_nodelay(true);
        if url.scheme() == "https" {
            let name =
                rustls::pki_types::ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())
                    .map_err(|e| format!("tls name: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(policy.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            exchange(TokioIo::new(tls), request).await
        } else {
            exchange(TokioIo::new(tcp), request).await
        }
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| "timed out".to_string())?
}

/// One HTTP/1.1 request on a connected stream; Ok for a 2xx.
async fn exchange<S>(io: S, request: hyper::Request<Full<Bytes>>) -> std::result::Result<(), String>
where
    S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("connection: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender.send_request(request).await.map_err(|e| format!("connection: {e}"))?;
    let status = response.status();
    // Drain the body so the connection can close cleanly.
    let _ = response.into_body().collect().await;
    if status.is_success() { Ok(()) } else { Err(format!("HTTP {status}")) }
}

impl Engine {
    /// One pass: sends every due delivery (a few at a time per replica).
    pub async fn deliver_webhooks(&self) -> Result<usize> {
        let now = chrono::Utc::now();
        let policy = self.webhooks.clone();
        Ok(self
            .pg
            .deliver_due(now, 5, move |d| {
                let policy = policy.clone();
                async move { send(&policy, d, Duration::from_secs(3)).await }
            })
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn internal_ranges_are_refused_by_default() {
        let p = WebhookPolicy::strict();
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "169.254.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "ff02::1",
        ] {
            assert!(p.check_ip(ip(bad)).is_err(), "{bad} must be refused");
        }
        for good in ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(p.check_ip(ip(good)).is_ok(), "{good} must be allowed");
        }
        assert!(p.check_ip(ip("169.254.169.254")).unwrap_err().contains("metadata"));
    }

    #[test]
    fn the_allowlist_opens_only_what_it_names() {
        let p = WebhookPolicy::new("127.0.0.0/8, ::1", "").unwrap();
        assert!(p.check_ip(ip("127.0.0.1")).is_ok());
        assert!(p.check_ip(ip("::1")).is_ok());
        assert!(p.check_ip(ip("10.0.0.1")).is_err());
        assert!(WebhookPolicy::new("10.0.0.0/33", "").is_err());
        assert!(WebhookPolicy::new("nope", "").is_err());
    }
}
