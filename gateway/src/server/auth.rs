//! Who a request is and whether it may in: where it comes from ([`Origin`]: the peer, or the
//! agent behind a trusted proxy), the client certificate it presents (handshake or proxy
//! header) and its verification, the plaintext-bootstrap rule, the bearer token and
//! `OpAMP-Instance-UID` headers, the coordinator's authentication over the bus, and the
//! audit notice for failures decided here.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue, StatusCode};
use shared::bus::{
    AuthDecision, AuthFailure, AuthRequest, CertificateId, CoordinatorEvent, CoordinatorReply,
    CoordinatorRequest, Credential, PresentedToken, Route,
};
use shared::domain::Transport;
use shared::ids::InstanceUid;

use super::latency;
use super::metrics::{count_rejected, count_untrusted_cert_header};
use super::proxy::{self, ProxySecret};
use super::replies::{service_unavailable, text, unauthorized};
use super::{Inner, INSTANCE_UID_HEADER};
use crate::net::IpNet;
use crate::tls::Peer;

/// Where a request comes from.
pub(super) struct Origin {
    /// The address of the TCP peer: the agent, or a proxy in front of it.
    peer: IpAddr,
    /// How far `peer` is trusted as a proxy (`tls.trusted_proxies`, the proxy secret).
    proxy: proxy::ProxyTrust,
    /// The agent's address, for logs, audit and metrics: the peer's, or the one a trusted
    /// proxy names (`X-Real-IP`, else the last `X-Forwarded-For` entry, which that proxy
    /// appended).
    pub(super) source_ip: IpAddr,
    /// Whether the agent's connection is TLS: this one's, or, behind a trusted proxy, the
    /// proxy's (`X-Forwarded-Proto: https`/`wss`: it terminated TLS).
    pub(super) tls: bool,
}

/// The [`Origin`] of a request, from the connect info of an
/// [`AgentListener`](crate::tls::AgentListener) ([`Peer`]) or of a plain TCP listener
/// (`SocketAddr`: plaintext). Without either (a router served without connect info) the
/// peer is unknown, which 0.0.0.0 says plainly in logs and audit, and the connection counts
/// as plaintext. Forwarding headers from anyone but a trusted proxy (with the proxy secret,
/// when one is set) are ignored: an agent could otherwise claim TLS it does not have, or
/// another agent's address.
pub(super) fn origin_of(
    trusted_proxies: &[IpNet],
    secret: Option<&ProxySecret>,
    req: &Request,
) -> Origin {
    let ext = req.extensions();
    let (peer, peer_tls) = match ext.get::<ConnectInfo<Peer>>() {
        Some(ConnectInfo(peer)) => (peer.addr.ip(), peer.tls),
        None => (
            ext.get::<ConnectInfo<SocketAddr>>()
                .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip()),
            false,
        ),
    };
    let headers = req.headers();
    let proxy = proxy::trust(trusted_proxies, secret, peer, headers);
    let (source_ip, tls) = proxy::forwarded(proxy, peer, peer_tls, headers);
    Origin {
        peer,
        proxy,
        source_ip,
        tls,
    }
}

/// The client certificate chain a request presents to [`client_identity`]: its handshake's,
/// else a trusted proxy's header. Synchronous, so the request is not held across an await.
pub(super) fn presented_chain(
    inner: &Inner,
    req: &Request,
    origin: &Origin,
) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
    inner.cfg.identity.as_ref()?;
    let from_handshake = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .and_then(|c| c.0.client_certs.clone());
    match from_handshake {
        Some(chain) => Some(chain.to_vec()),
        None => match inner
            .cfg
            .client_cert_header
            .as_ref()
            .and_then(|h| req.headers().get(h))
        {
            None => None,
            Some(value) => {
                if origin.proxy != proxy::ProxyTrust::Authenticated {
                    count_untrusted_cert_header();
                    tracing::debug!(peer = %origin.peer, "client certificate header not from an authenticated proxy ignored");
                    None
                } else {
                    Some(header_chain(value))
                }
            }
        },
    }
}

/// The certificate chain of a proxy's header: URL-encoded PEM (an unencoded PEM works too);
/// empty when it holds none, which verification then refuses.
pub(super) fn header_chain(value: &HeaderValue) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let decoded = percent_encoding::percent_decode(value.as_bytes()).collect::<Vec<u8>>();
    shared::tls::parse_certs_pem(&decoded).unwrap_or_default()
}

/// The agent identity a request carries, if any: the client certificate of its TLS
/// handshake, or the one a trusted proxy put in `client_cert_header`. Both are verified the
/// same way (agent CA, revocation set); the handshake already refused invalid and revoked
/// ones, so this repeats the check for the header path and for a revocation that arrived
/// since. A certificate that fails is refused (401, audited): the agent meant to use it.
/// The header from any other address is ignored and counted.
pub(super) async fn client_identity(
    inner: &Inner,
    chain: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
    source_ip: IpAddr,
) -> Result<Option<CertificateId>, Response> {
    let (Some(trust), Some(chain)) = (&inner.cfg.identity, chain) else {
        return Ok(None);
    };
    match trust.verify(&chain) {
        Ok(id) => Ok(Some(CertificateId {
            uid: id.uid,
            serial: id.serial,
        })),
        Err(rejection) => {
            report_auth_failure(inner, source_ip, rejection.as_str()).await;
            Err(unauthorized(
                source_ip,
                rejection.as_str(),
                "client certificate not accepted",
            ))
        }
    }
}

/// `OpAmp:BootstrapPlaintextAllowed`: unless allowed, a bearer (bootstrap) token over a
/// plaintext connection is refused (401, audited, counted as `auth_failed`). Refused before a
/// coordinator sees it: redeeming a single-use token over a channel that may have leaked it
/// would burn it for nothing. Requests without a usable bearer token pass on, for
/// [`authenticate`] to refuse with the precise reason.
pub(super) async fn check_plaintext_bootstrap(
    inner: &Inner,
    headers: &HeaderMap,
    source_ip: IpAddr,
    tls: bool,
) -> Result<(), Response> {
    if tls
        || inner.cfg.bootstrap_plaintext_allowed
        || parse_bearer(headers.get(AUTHORIZATION)).is_err()
    {
        return Ok(());
    }
    report_auth_failure(inner, source_ip, "plaintext_bootstrap").await;
    Err(unauthorized(
        source_ip,
        "plaintext_bootstrap",
        "bootstrap over plaintext is not allowed",
    ))
}

/// Authenticates a request: `Ok((credential, uid_hint))` or the response refusing it.
pub(super) async fn authenticate(
    inner: &Inner,
    headers: &HeaderMap,
    source_ip: IpAddr,
    transport: Transport,
    cert: Option<CertificateId>,
) -> Result<(Credential, Option<InstanceUid>), Response> {
    let uid_hint = match parse_uid_header(headers) {
        Ok(hint) => hint,
        Err(()) => {
            count_rejected("malformed");
            return Err(text(
                StatusCode::BAD_REQUEST,
                "invalid OpAMP-Instance-UID header",
            ));
        }
    };
    // A verified certificate needs no Authorization header (and its token, if any, is not
    // looked at: the certificate is the stronger credential). A token's format is checked
    // here, and only its hash and display prefix go to a coordinator: neither the token
    // itself nor a malformed one crosses the bus.
    let token = match parse_bearer(headers.get(AUTHORIZATION)) {
        _ if cert.is_some() => None,
        Ok(token) => match PresentedToken::from_bootstrap_token(token) {
            Ok(presented) => Some(presented),
            Err(_) => {
                let f = AuthFailure::MalformedToken;
                report_auth_failure(inner, source_ip, f.as_str()).await;
                return Err(unauthorized(source_ip, f.as_str(), f.message()));
            }
        },
        Err(f) => {
            report_auth_failure(inner, source_ip, f.as_str()).await;
            return Err(unauthorized(source_ip, f.as_str(), f.message()));
        }
    };
    // Over plaintext, `handle` has already applied `OpAmp:BootstrapPlaintextAllowed`
    // (`check_plaintext_bootstrap`).
    let req = CoordinatorRequest::Authenticate(AuthRequest {
        token,
        source_ip,
        uid_hint,
        transport,
        certificate: cert,
    });
    let reply = tokio::time::timeout(
        inner.cfg.request_timeout,
        latency::bus_request(&*inner.bus, Route::Any, req),
    )
    .await;
    match reply {
        Ok(Ok(CoordinatorReply::Auth(AuthDecision::Accept(credential)))) => {
            Ok((credential, uid_hint))
        }
        Ok(Ok(CoordinatorReply::Auth(AuthDecision::Reject(f)))) => {
            Err(unauthorized(source_ip, f.as_str(), f.message()))
        }
        Ok(Ok(CoordinatorReply::Auth(AuthDecision::Unavailable))) => {
            Err(service_unavailable("authentication unavailable"))
        }
        Ok(Ok(
            CoordinatorReply::Frame(_)
            | CoordinatorReply::RevokedSerials(_)
            | CoordinatorReply::BlobChunk(_),
        )) => {
            tracing::error!("coordinator answered an authentication request with another reply");
            Err(service_unavailable("authentication unavailable"))
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "authentication request failed");
            Err(service_unavailable("authentication unavailable"))
        }
        Err(_) => {
            tracing::warn!("authentication request timed out");
            Err(service_unavailable("authentication unavailable"))
        }
    }
}

/// Failures decided here never reach a coordinator, so tell one for the audit log. Best effort:
/// a lost notice loses an audit line, never a decision.
async fn report_auth_failure(inner: &Inner, source_ip: IpAddr, reason: &str) {
    let ev = CoordinatorEvent::AuthFailed {
        source_ip,
        reason: reason.to_owned(),
    };
    if let Err(e) = inner.bus.notify(Route::Any, ev).await {
        tracing::debug!(error = %e, "auth failure notice not delivered");
    }
}

/// `Ok(None)` without the header, `Err` when it is there but not a UUID.
fn parse_uid_header(headers: &HeaderMap) -> Result<Option<InstanceUid>, ()> {
    match headers.get(INSTANCE_UID_HEADER) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or(()),
    }
}

/// Extracts the token of `Authorization: Bearer <token>`. The scheme is case-insensitive
/// (RFC 9110 §11.1); the credentials must be exactly one token.
fn parse_bearer(value: Option<&HeaderValue>) -> Result<&str, AuthFailure> {
    let value = value.ok_or(AuthFailure::MissingCredentials)?;
    let value = value.to_str().map_err(|_| AuthFailure::WrongScheme)?.trim();
    let (scheme, token) = value.split_once(' ').ok_or(AuthFailure::WrongScheme)?;
    let token = token.trim_start_matches(' ');
    if !scheme.eq_ignore_ascii_case("bearer")
        || token.is_empty()
        || token.contains(|c: char| c.is_ascii_whitespace())
    {
        return Err(AuthFailure::WrongScheme);
    }
    Ok(token)
}

/// Coordinator close reasons prefixed `auth:` are authentication failures (counted as such);
/// returns the reason without the prefix.
pub(super) fn auth_close_reason(reason: &str) -> Option<&str> {
    reason.strip_prefix("auth:").map(str::trim_start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::helper_tests::{headers, hv};

    #[test]
    fn bearer_parsing() {
        assert_eq!(parse_bearer(Some(&hv("Bearer abc"))), Ok("abc"));
        assert_eq!(parse_bearer(Some(&hv("bearer abc"))), Ok("abc"));
        assert_eq!(parse_bearer(Some(&hv("BEARER  abc"))), Ok("abc"));
        assert_eq!(
            parse_bearer(Some(&hv("Bearer amp-bs.ABC.123 "))),
            Ok("amp-bs.ABC.123")
        );
        assert_eq!(parse_bearer(None), Err(AuthFailure::MissingCredentials));
        for bad in [
            "amp-bs.abc.123",
            "Basic abc",
            "Bearer",
            "Bearer ",
            "Bearer a b",
            "Bearerabc",
            "Token abc",
        ] {
            assert_eq!(
                parse_bearer(Some(&hv(bad))),
                Err(AuthFailure::WrongScheme),
                "{bad:?}"
            );
        }
        let non_ascii = HeaderValue::from_bytes(b"Bearer \xff").expect("opaque bytes allowed");
        assert_eq!(
            parse_bearer(Some(&non_ascii)),
            Err(AuthFailure::WrongScheme)
        );
    }

    #[test]
    fn uid_header_parsing() {
        assert_eq!(parse_uid_header(&HeaderMap::new()), Ok(None));
        let uid = InstanceUid::new_v7();
        let h = headers(INSTANCE_UID_HEADER, &[&uid.to_string()]);
        assert_eq!(parse_uid_header(&h), Ok(Some(uid)));
        let h = headers(INSTANCE_UID_HEADER, &["not-a-uuid"]);
        assert_eq!(parse_uid_header(&h), Err(()));
    }

    #[test]
    fn auth_close_prefix() {
        assert_eq!(
            auth_close_reason("auth: token revoked"),
            Some("token revoked")
        );
        assert_eq!(auth_close_reason("auth:x"), Some("x"));
        assert_eq!(auth_close_reason("superseded"), None);
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let proxy: IpNet = "10.0.0.5".parse().expect("address");
        let request = |peer: &str, forwarded: &[(&str, &str)]| {
            let mut b = Request::builder().uri("/v1/opamp");
            for (k, v) in forwarded {
                b = b.header(*k, *v);
            }
            let mut req = b.body(axum::body::Body::empty()).expect("request");
            let peer: SocketAddr = peer.parse().expect("peer");
            req.extensions_mut().insert(ConnectInfo(peer));
            req
        };
        let via_proxy = [
            ("x-forwarded-proto", "https"),
            ("x-forwarded-for", "192.0.2.1, 198.51.100.7"),
        ];
        let o = origin_of(&[proxy], None, &request("10.0.0.5:9000", &via_proxy));
        assert!(o.proxy == proxy::ProxyTrust::Address && o.tls);
        assert_eq!(
            o.source_ip.to_string(),
            "198.51.100.7",
            "the entry the proxy appended"
        );
        assert_eq!(o.peer.to_string(), "10.0.0.5");

        let mut real_ip = via_proxy.to_vec();
        real_ip.push(("x-real-ip", "203.0.113.9"));
        let o = origin_of(&[proxy], None, &request("10.0.0.5:9000", &real_ip));
        assert_eq!(o.source_ip.to_string(), "203.0.113.9", "X-Real-IP first");

        let o = origin_of(
            &[proxy],
            None,
            &request("10.0.0.5:9000", &[("x-forwarded-proto", "http")]),
        );
        assert!(!o.tls, "the proxy says it received plaintext");
        assert_eq!(
            o.source_ip.to_string(),
            "10.0.0.5",
            "no forwarded address: the peer"
        );

        // Anyone else claims nothing: not TLS, its own address.
        let o = origin_of(&[proxy], None, &request("10.0.0.6:9000", &real_ip));
        assert!(o.proxy == proxy::ProxyTrust::None && !o.tls);
        assert_eq!(o.source_ip.to_string(), "10.0.0.6");

        // With a proxy secret, the address alone claims nothing; with the secret, all counts.
        let secret = ProxySecret::parse("proxy-secret-0123456789").expect("secret");
        let o = origin_of(&[proxy], Some(&secret), &request("10.0.0.5:9000", &real_ip));
        assert!(o.proxy == proxy::ProxyTrust::None && !o.tls);
        assert_eq!(o.source_ip.to_string(), "10.0.0.5");
        let mut with_secret = real_ip.clone();
        with_secret.push(("x-ampora-proxy-secret", "proxy-secret-0123456789"));
        let o = origin_of(
            &[proxy],
            Some(&secret),
            &request("10.0.0.5:9000", &with_secret),
        );
        assert!(o.proxy == proxy::ProxyTrust::Authenticated && o.tls);
        assert_eq!(o.source_ip.to_string(), "203.0.113.9");
    }
}
