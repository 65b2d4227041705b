//! Trust in the reverse proxy in front of the gateway: which requests may speak for the agent
//! behind them through forwarding headers (`X-Real-IP` / `X-Forwarded-For`,
//! `X-Forwarded-Proto`, the client-certificate header).
//!
//! An address in `tls.trusted_proxies` is necessary but not sufficient: anything else that can
//! reach the gateway from that network could send the same headers, and an agent certificate
//! is public. With a proxy secret (`tls.trusted_proxy_secret_file`) a request must also carry
//! it in [`PROXY_SECRET_HEADER`] (compared in constant time) before any forwarding header
//! counts. Without one, forwarded addresses and TLS are still believed from a trusted address,
//! but a forwarded client certificate never is: it would make the header alone a credential.
//!
//! The coordinator's API guard applies the same rule ([`classify`], [`forwarded`]) to decide
//! whether an API token came over TLS or from the host itself.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

use crate::net::IpNet;

/// The header a trusted proxy sends the shared secret in (nginx:
/// `proxy_set_header X-Ampora-Proxy-Secret "...";`).
pub const PROXY_SECRET_HEADER: HeaderName = HeaderName::from_static("x-ampora-proxy-secret");

/// Shortest secret accepted: guessing it must be hopeless.
pub const MIN_SECRET_LEN: usize = 16;

const PROXY_UNAUTHENTICATED: &str = "ampora_gateway_proxy_unauthenticated_total";

pub(super) fn describe_metrics() {
    metrics::describe_counter!(
        PROXY_UNAUTHENTICATED,
        "Requests from a tls.trusted_proxies address without the right proxy secret (forwarding headers ignored)"
    );
    metrics::counter!(PROXY_UNAUTHENTICATED).increment(0);
}

/// The secrets a trusted proxy may present: one per non-empty line of the secret file, so a
/// new one can be rolled out to the proxies before the old one is removed. Only their SHA-256
/// digests are kept.
#[derive(Clone)]
pub struct ProxySecret {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ProxySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxySecret")
            .field("secrets", &self.digests.len())
            .finish_non_exhaustive()
    }
}

impl ProxySecret {
    /// Parses the secret file's contents: every non-empty line (trimmed) is a secret of at
    /// least [`MIN_SECRET_LEN`] visible ASCII characters (what a header value can carry).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut digests = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if line.len() < MIN_SECRET_LEN {
                return Err(format!(
                    "a proxy secret must be at least {MIN_SECRET_LEN} characters"
                ));
            }
            if !line.bytes().all(|b| b.is_ascii_graphic()) {
                return Err("a proxy secret must be visible ASCII (no spaces)".into());
            }
            digests.push(digest(line.as_bytes()));
        }
        if digests.is_empty() {
            return Err("the proxy secret file holds no secret".into());
        }
        Ok(Self { digests })
    }

    /// Whether `presented` is one of the secrets. Digests of equal length are compared without
    /// an early exit, so the time taken says nothing about how much of a guess was right.
    fn accepts(&self, presented: &[u8]) -> bool {
        let presented = digest(presented);
        self.digests
            .iter()
            .fold(false, |any, d| any | constant_time_eq(d, &presented))
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// How far a request's forwarding headers may be believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyTrust {
    /// Not from a trusted proxy: forwarding headers are ignored.
    None,
    /// From a trusted address, no secret configured: forwarded address and TLS count, a
    /// forwarded client certificate does not.
    Address,
    /// From a trusted address with the proxy secret: every forwarding header counts.
    Authenticated,
}

/// Classifies a request from `peer` with `headers`. Counts nothing: the gateway's [`trust`]
/// also counts a trusted address without the secret.
pub fn classify(
    trusted_proxies: &[IpNet],
    secret: Option<&ProxySecret>,
    peer: IpAddr,
    headers: &HeaderMap,
) -> ProxyTrust {
    if !trusted_proxies.iter().any(|n| n.contains(peer)) {
        return ProxyTrust::None;
    }
    let Some(secret) = secret else {
        return ProxyTrust::Address;
    };
    let presented = headers.get(PROXY_SECRET_HEADER);
    if presented.is_some_and(|v| secret.accepts(v.as_bytes())) {
        return ProxyTrust::Authenticated;
    }
    ProxyTrust::None
}

/// [`classify`], counting and logging (debug) a request from a trusted address without the
/// right secret.
pub(super) fn trust(
    trusted_proxies: &[IpNet],
    secret: Option<&ProxySecret>,
    peer: IpAddr,
    headers: &HeaderMap,
) -> ProxyTrust {
    let trust = classify(trusted_proxies, secret, peer, headers);
    if trust == ProxyTrust::None
        && secret.is_some()
        && trusted_proxies.iter().any(|n| n.contains(peer))
    {
        metrics::counter!(PROXY_UNAUTHENTICATED).increment(1);
        let presented = headers.contains_key(PROXY_SECRET_HEADER);
        tracing::debug!(%peer, presented, "request from a trusted proxy address without the proxy secret: forwarding headers ignored");
    }
    trust
}

/// The client's address and whether it spoke TLS, as far as `trust` lets the headers say:
/// with [`ProxyTrust::None`] the peer's own; otherwise the proxy's `X-Real-IP` (else the last
/// `X-Forwarded-For` entry, the one that proxy appended) and TLS when the peer's connection
/// is TLS or the proxy says `X-Forwarded-Proto: https` (or `wss`): it terminated TLS.
pub fn forwarded(
    trust: ProxyTrust,
    peer: IpAddr,
    peer_tls: bool,
    headers: &HeaderMap,
) -> (IpAddr, bool) {
    if trust == ProxyTrust::None {
        return (peer, peer_tls);
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let client = header("x-real-ip")
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| {
            header("x-forwarded-for")
                .and_then(|v| v.rsplit(',').next())
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(peer);
    let tls = header("x-forwarded-proto").is_some_and(|p| {
        let p = p.trim();
        p.eq_ignore_ascii_case("https") || p.eq_ignore_ascii_case("wss")
    });
    (client, peer_tls || tls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const SECRET: &str = "0123456789abcdef-secret";

    fn headers(secret: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(s) = secret {
            h.insert(
                PROXY_SECRET_HEADER,
                HeaderValue::from_str(s).expect("value"),
            );
        }
        h
    }

    #[test]
    fn secret_file_parsing() {
        let s = ProxySecret::parse(&format!("\n {SECRET} \nsecond-secret-0123456789\n"))
            .expect("two secrets");
        assert!(s.accepts(SECRET.as_bytes()));
        assert!(s.accepts(b"second-secret-0123456789"));
        assert!(!s.accepts(b"0123456789abcdef-secreT"));
        assert!(!s.accepts(b""));
        assert!(ProxySecret::parse("").is_err(), "empty");
        assert!(ProxySecret::parse("short").is_err(), "too short");
        assert!(ProxySecret::parse("has a space in it, long").is_err());
        assert!(!format!("{s:?}").contains(SECRET), "never printed");
    }

    #[test]
    fn trust_needs_the_address_and_the_secret() {
        let proxies: Vec<IpNet> = vec!["10.0.0.5".parse().expect("net")];
        let secret = ProxySecret::parse(SECRET).expect("secret");
        let proxy: IpAddr = "10.0.0.5".parse().expect("ip");
        let other: IpAddr = "10.0.0.6".parse().expect("ip");
        let t = |peer, secret, presented| trust(&proxies, secret, peer, &headers(presented));

        assert_eq!(t(other, None, None), ProxyTrust::None);
        assert_eq!(t(other, Some(&secret), Some(SECRET)), ProxyTrust::None);
        assert_eq!(t(proxy, None, None), ProxyTrust::Address);
        assert_eq!(t(proxy, None, Some("anything")), ProxyTrust::Address);
        assert_eq!(
            t(proxy, Some(&secret), Some(SECRET)),
            ProxyTrust::Authenticated
        );
        assert_eq!(t(proxy, Some(&secret), None), ProxyTrust::None);
        assert_eq!(
            t(proxy, Some(&secret), Some("0123456789abcdef-wrong")),
            ProxyTrust::None
        );
    }
}
