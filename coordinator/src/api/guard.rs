//! What every API request passes before a handler does any work, in this order:
//!
//! 1. [`limit_concurrency`] (a router layer): a slot among `api.max_concurrent_requests`, or
//!    503 + `Retry-After` at once; excess requests are never queued.
//! 2. [`Caller`] (the first extractor of every protected handler): the API token, refused over
//!    plaintext from a non-loopback client unless `api.token_plaintext_allowed`, then looked
//!    up, then its role checked. Being a parts extractor it runs before any body extractor, so
//!    a request that fails here is answered 401 / 403 without a byte of its body being read.
//! 3. [`ApiJson`] (the body extractor): reads at most `api.max_body_bytes`
//!    (`api.max_config_body_bytes` for config creation; 413 beyond it) within
//!    `api.body_timeout_secs` (408 after it), then parses JSON as axum's `Json` does.
//!
//! Refusals are counted in `ampora_api_requests_refused_total{reason}` (see
//! [`ApiError::refusal_reason`]).

use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRef, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt as _;
use gateway::server::proxy;
use gateway::server::{IpNet, ProxySecret};
use gateway::tls::Peer;
use serde::de::DeserializeOwned;
use shared::domain::{ApiTokenRecord, Role};
use shared::token;
use tokio::sync::Semaphore;

use super::ApiError;
use crate::config::Config;
use crate::service::Coordinator;

pub const REFUSED_METRIC: &str = "ampora_api_requests_refused_total";

/// Every `reason` label of [`REFUSED_METRIC`].
pub const REFUSAL_REASONS: [&str; 6] = [
    "unauthenticated",
    "forbidden",
    "plaintext_token",
    "body_too_large",
    "body_timeout",
    "busy",
];

pub fn describe_metrics() {
    metrics::describe_counter!(
        REFUSED_METRIC,
        "API requests refused before their handler ran, by reason (unauthenticated, forbidden, \
         plaintext_token, body_too_large, body_timeout, busy)"
    );
    for reason in REFUSAL_REASONS {
        metrics::counter!(REFUSED_METRIC, "reason" => reason).increment(0);
    }
}

/// The router's state: the coordinator, and the guard's settings.
#[derive(Clone)]
pub struct ApiState {
    pub coord: Arc<Coordinator>,
    pub guard: Arc<Guard>,
}

impl FromRef<ApiState> for Arc<Coordinator> {
    fn from_ref(s: &ApiState) -> Self {
        s.coord.clone()
    }
}

/// The `[api]` settings, plus the trusted proxies and their secret of `[tls]`.
pub struct Guard {
    max_body: usize,
    max_config_body: usize,
    body_timeout: Duration,
    /// `None`: unlimited.
    slots: Option<Arc<Semaphore>>,
    token_plaintext_allowed: bool,
    trusted_proxies: Vec<IpNet>,
    /// `tls.trusted_proxy_secret_file`: with one, a trusted proxy's headers count only when
    /// it presents the secret, as at the gateway.
    proxy_secret: Option<ProxySecret>,
}

impl Guard {
    /// `proxy_secret`: the one read from `tls.trusted_proxy_secret_file`
    /// (`node_config::gateway_proxy_secret`).
    pub fn new(config: &Config, proxy_secret: Option<ProxySecret>) -> Self {
        let api = &config.api;
        // Out-of-range values saturate: a limit that large is no limit.
        let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let slots = match size(api.max_concurrent_requests) {
            0 => None,
            n => Some(Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS)))),
        };
        Self {
            max_body: size(api.max_body_bytes),
            max_config_body: size(api.max_config_body_bytes),
            body_timeout: Duration::from_secs(api.body_timeout_secs),
            slots,
            token_plaintext_allowed: api.token_plaintext_allowed,
            trusted_proxies: config.tls.trusted_proxy_nets(),
            proxy_secret,
        }
    }

    /// The largest body the router accepts at all (for axum's own body extractors).
    pub fn largest_body(&self) -> usize {
        self.max_body.max(self.max_config_body)
    }

    /// Whether a token may be presented on this request: it came over TLS (this connection,
    /// or a trusted proxy's `X-Forwarded-Proto: https`) or from a loopback client (the peer,
    /// or the client a trusted proxy names), where plaintext never leaves the host. A trusted
    /// proxy is believed by the gateway's rule ([`proxy::classify`]): from a
    /// `tls.trusted_proxies` address, and with the proxy secret when one is set. Without
    /// connect info the peer is unknown, which is not loopback.
    pub(crate) fn channel_ok(&self, parts: &Parts) -> bool {
        self.token_plaintext_allowed
            || self
                .client(parts)
                .is_some_and(|(client, tls)| tls || client.to_canonical().is_loopback())
    }

    /// The client's address and whether it spoke TLS, believing a trusted proxy by the
    /// gateway's rule; `None` without connect info.
    pub(crate) fn client(&self, parts: &Parts) -> Option<(IpAddr, bool)> {
        let ext = &parts.extensions;
        let (peer, peer_tls) = match ext.get::<ConnectInfo<Peer>>() {
            Some(ConnectInfo(p)) => (p.addr.ip(), p.tls),
            None => match ext.get::<ConnectInfo<SocketAddr>>() {
                Some(ConnectInfo(a)) => (a.ip(), false),
                None => return None,
            },
        };
        let trust = proxy::classify(
            &self.trusted_proxies,
            self.proxy_secret.as_ref(),
            peer,
            &parts.headers,
        );
        Some(proxy::forwarded(trust, peer, peer_tls, &parts.headers))
    }
}

/// Router layer: one of `api.max_concurrent_requests` slots for the whole request, or 503.
pub async fn limit_concurrency(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let has_body = declares_body(req.headers());
    let http1 = req.version() <= Version::HTTP_11;
    let _slot = match &s.guard.slots {
        None => None,
        Some(slots) => match slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => return close_unread(ApiError::Busy.into_response(), has_body && http1),
        },
    };
    let resp = next.run(req).await;
    let refused = matches!(
        resp.status(),
        StatusCode::UNAUTHORIZED
            | StatusCode::FORBIDDEN
            | StatusCode::REQUEST_TIMEOUT
            | StatusCode::PAYLOAD_TOO_LARGE
    );
    close_unread(resp, refused && has_body && http1)
}

fn declares_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// A refusal that left (part of) the body unread closes the connection, rather than have
/// the server read and discard what the client still sends.
fn close_unread(mut resp: Response, close: bool) -> Response {
    if close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The role a handler needs, as a type: `Caller<Operator>`.
pub trait NeedsRole: Send + Sync + 'static {
    const ROLE: Role;
}

pub struct Viewer;
pub struct Operator;
pub struct Admin;

impl NeedsRole for Viewer {
    const ROLE: Role = Role::Viewer;
}
impl NeedsRole for Operator {
    const ROLE: Role = Role::Operator;
}
impl NeedsRole for Admin {
    const ROLE: Role = Role::Admin;
}

/// An authenticated operator holding at least role `R`; `actor` names it in the audit log
/// (`api:<API token name>`).
pub struct Caller<R> {
    pub actor: String,
    role: PhantomData<R>,
}

impl<R: NeedsRole> FromRequestParts<ApiState> for Caller<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &ApiState) -> Result<Self, ApiError> {
        let text = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| token::is_api_token(t))
            .ok_or(ApiError::Unauthorized)?;
        // Before the lookup: whether a token that crossed the network in the clear is valid
        // is nobody's business.
        if !s.guard.channel_ok(parts) {
            return Err(ApiError::PlaintextToken);
        }
        let rec: ApiTokenRecord = s
            .coord
            .store()
            .find_api_token(&token::hash_token(text))
            .await?
            .ok_or(ApiError::Unauthorized)?;
        if rec.role < R::ROLE {
            return Err(ApiError::Forbidden(R::ROLE));
        }
        Ok(Self {
            actor: format!("api:{}", rec.name),
            role: PhantomData,
        })
    }
}

/// Which body limit applies: [`Small`] (`api.max_body_bytes`) or [`ConfigSized`].
pub trait BodyLimit: Send + Sync + 'static {
    fn of(g: &Guard) -> usize;
}

pub struct Small;
pub struct ConfigSized;

impl BodyLimit for Small {
    fn of(g: &Guard) -> usize {
        g.max_body
    }
}
impl BodyLimit for ConfigSized {
    fn of(g: &Guard) -> usize {
        g.max_config_body
    }
}

/// A JSON body read within the size limit `L` and the body timeout; then axum's `Json`
/// (415 without a JSON content type, 400 / 422 for bad JSON).
pub struct ApiJson<T, L = Small>(pub T, pub PhantomData<L>);

impl<T, L> FromRequest<ApiState> for ApiJson<T, L>
where
    T: DeserializeOwned,
    L: BodyLimit,
{
    type Rejection = Response;

    async fn from_request(req: Request, s: &ApiState) -> Result<Self, Response> {
        let limit = L::of(&s.guard);
        let (parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::TooLarge(limit).into_response());
        }
        let capacity = declared.map_or(0, |n| usize::try_from(n).unwrap_or(limit).min(limit));
        let timeout = s.guard.body_timeout;
        let bytes = tokio::time::timeout(timeout, read_body(body, limit, capacity))
            .await
            .map_err(|_| ApiError::BodyTimeout(timeout.as_secs()).into_response())?
            .map_err(IntoResponse::into_response)?;
        let req = Request::from_parts(parts, Body::from(bytes));
        let Json(value) = Json::<T>::from_request(req, s)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Self(value, PhantomData))
    }
}

async fn read_body(body: Body, limit: usize, capacity: usize) -> Result<Vec<u8>, ApiError> {
    let mut buf = Vec::with_capacity(capacity);
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("reading the request body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(trusted: &[&str], allowed: bool) -> Guard {
        guard_with_secret(trusted, allowed, None)
    }

    fn guard_with_secret(trusted: &[&str], allowed: bool, secret: Option<&str>) -> Guard {
        let mut cfg = Config::default();
        cfg.tls.trusted_proxies = trusted.iter().map(|s| s.to_string()).collect();
        cfg.api.token_plaintext_allowed = allowed;
        let secret = secret.map(|s| ProxySecret::parse(s).expect("secret"));
        Guard::new(&cfg, secret)
    }

    fn parts(peer: &str, tls: bool, headers: &[(&str, &str)]) -> Parts {
        let mut b = axum::http::Request::builder().uri("/api/v1/agents");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let (mut parts, _) = b.body(()).expect("request").into_parts();
        let addr: SocketAddr = peer.parse().expect("peer");
        let peer = if tls {
            Peer {
                tls: true,
                ..Peer::plain(addr)
            }
        } else {
            Peer::plain(addr)
        };
        parts.extensions.insert(ConnectInfo(peer));
        parts
    }

    #[test]
    fn tokens_travel_over_tls_or_stay_on_the_host() {
        let g = guard(&["10.0.0.5"], false);
        assert!(
            g.channel_ok(&parts("127.0.0.1:1000", false, &[])),
            "loopback"
        );
        assert!(
            g.channel_ok(&parts("[::1]:1000", false, &[])),
            "loopback v6"
        );
        assert!(
            g.channel_ok(&parts("[::ffff:127.0.0.1]:1000", false, &[])),
            "mapped loopback"
        );
        assert!(g.channel_ok(&parts("192.0.2.1:1000", true, &[])), "TLS");
        assert!(
            !g.channel_ok(&parts("192.0.2.1:1000", false, &[])),
            "plaintext from afar"
        );
        // An untrusted peer's headers claim nothing.
        let claims = [("x-forwarded-proto", "https"), ("x-real-ip", "127.0.0.1")];
        assert!(!g.channel_ok(&parts("192.0.2.1:1000", false, &claims)));
        // A trusted proxy that terminated TLS, or whose client is local.
        assert!(g.channel_ok(&parts("10.0.0.5:1000", false, &claims)));
        let remote_plain = [("x-forwarded-proto", "http"), ("x-real-ip", "192.0.2.9")];
        assert!(!g.channel_ok(&parts("10.0.0.5:1000", false, &remote_plain)));
        let remote_tls = [("x-forwarded-proto", "https"), ("x-real-ip", "192.0.2.9")];
        assert!(g.channel_ok(&parts("10.0.0.5:1000", false, &remote_tls)));
        // No connect info: unknown, so not loopback.
        let (bare, _) = axum::http::Request::builder()
            .body(())
            .expect("request")
            .into_parts();
        assert!(!g.channel_ok(&bare));
        // The setting allows it all.
        let open = guard(&[], true);
        assert!(open.channel_ok(&parts("192.0.2.1:1000", false, &[])));
    }

    /// With a proxy secret, a trusted address is believed only with it, as at the gateway.
    #[test]
    fn with_a_proxy_secret_a_trusted_address_needs_it() {
        const SECRET: &str = "0123456789abcdef-api-secret";
        let g = guard_with_secret(&["10.0.0.5"], false, Some(SECRET));
        let header = gateway::server::PROXY_SECRET_HEADER;
        let header = header.as_str();
        let remote_tls = [("x-forwarded-proto", "https"), ("x-real-ip", "192.0.2.9")];
        let local = [("x-forwarded-proto", "http"), ("x-real-ip", "127.0.0.1")];
        assert!(
            !g.channel_ok(&parts("10.0.0.5:1000", false, &remote_tls)),
            "a trusted address without the secret claims TLS in vain"
        );
        assert!(
            !g.channel_ok(&parts("10.0.0.5:1000", false, &local)),
            "... and a loopback client in vain"
        );
        let wrong = [
            remote_tls[0],
            remote_tls[1],
            (header, "0123456789abcdef-wrong"),
        ];
        assert!(!g.channel_ok(&parts("10.0.0.5:1000", false, &wrong)));
        let proven = [remote_tls[0], remote_tls[1], (header, SECRET)];
        assert!(
            g.channel_ok(&parts("10.0.0.5:1000", false, &proven)),
            "with the secret it is believed"
        );
        assert!(
            !g.channel_ok(&parts("192.0.2.1:1000", false, &proven)),
            "the secret from an untrusted address is not enough"
        );
        assert!(
            g.channel_ok(&parts("127.0.0.1:1000", false, &[])),
            "loopback"
        );
    }
}
