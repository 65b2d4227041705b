//! The gateway's OpAMP endpoint: `/v1/opamp` over WebSocket and plain HTTP.
//!
//! One handler serves both transports. The spec's discriminator decides which: a request with
//! `Content-Type: application/x-protobuf` is plain HTTP (must be POST), anything else must be a
//! WebSocket upgrade (GET). Every request is authenticated before it gets anywhere: the bearer
//! token is checked by a coordinator over the bus ([`CoordinatorRequest::Authenticate`]); for
//! WebSocket that happens before the upgrade.
//!
//! Each `AgentToServer` becomes one bus request to the coordinator owning the agent's partition,
//! and its one reply becomes the one `ServerToAgent`. WebSocket connections additionally claim
//! ownership of the agent (fenced by an epoch) so coordinator pushes can reach them; the
//! dispatcher task routes those pushes and drops any addressed to an epoch we no longer hold.
//!
//! This file keeps the [`Gateway`], its config, the connection registry and the dispatcher,
//! and the handler that sends each request to its transport. Submodules: `ws` (the
//! per-connection task), `plain` (the plain HTTP transport), `auth` (origin, client
//! certificate and bearer token authentication), `replies` (refusals and error responses),
//! `admission` (connection cap and accept rate, checked before anything else), `limits` (the
//! same per source address and per credential), `refusal_hold`, `decode` (frame limits and the
//! decode memory budget), `proxy` (trusted proxies), `metrics` and `latency`, `ownership`
//! (refreshing ownership claims) and `revocations` (the identity revocation set). Beside
//! `/v1/opamp`: `downloads` (package artifacts) and `own_metrics` (agents' own metrics).

mod admission;
mod auth;
mod blob_cache;
mod bus_watch;
mod decode;
pub mod downloads;
mod latency;
mod lazy_read;
mod limits;
mod metrics;
mod own_metrics;
mod ownership;
mod plain;
pub mod proxy;
mod refusal_hold;
mod replies;
mod revocations;
mod ws;

pub use crate::net::IpNet;
pub use admission::{AdmissionConfig, WARMUP_FLOOR};
pub use decode::{DecodeBudget, FrameLimits, DEFAULT_DECODE_BUDGET_BYTES};
pub use latency::{BUS_REQUEST_DURATION, OPAMP_MESSAGE_DURATION};
pub use proxy::{ProxySecret, PROXY_SECRET_HEADER};

#[cfg(test)]
mod tests;

// Entry points for the fuzz targets (tests/fuzz); not part of the gateway's API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::any;
use axum::Router;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, Method, StatusCode};
use proto::ServerToAgent;
use shared::bus::{Bus, GatewayMessage};
use shared::ids::{GatewayId, InstanceUid};
use shared::ownership::Ownership;
use tokio::sync::{mpsc, Notify};

use crate::tls::AgentTrust;
use auth::{check_plaintext_bootstrap, client_identity, origin_of, presented_chain};
use metrics::count_dropped;
use replies::{admission_refused, method_not_allowed, text};

/// The OpAMP endpoint path (spec default).
pub const OPAMP_PATH: &str = "/v1/opamp";

/// Default inbound message limit. The spec recommends 64 MiB; we default lower because a
/// gateway holds many connections and real status reports are kilobytes (effective configs of
/// a few hundred KiB at most). Operators can raise it.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 4 << 20;

/// The header a plain-HTTP client may use to announce its instance UID (spec v0.15.0).
pub const INSTANCE_UID_HEADER: HeaderName = HeaderName::from_static("opamp-instance-uid");

/// Upper bound of [`Gateway::shutdown`].
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Registers descriptions for the gateway's metrics and creates the bounded-label series at
/// zero, so dashboards and alerts see them before the first event.
pub fn describe_metrics() {
    metrics::describe();
    crate::serve::describe_metrics();
    proxy::describe_metrics();
    latency::describe_metrics();
    bus_watch::describe();
    downloads::describe();
    blob_cache::describe();
    own_metrics::describe();
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Inbound message limit in bytes, applied after decompression (HTTP) and to the whole
    /// WebSocket message including its header. Default [`DEFAULT_MAX_FRAME_BYTES`] (4 MiB).
    pub max_frame_bytes: usize,
    /// How long a bus request (authentication or frame) may take. On timeout a WebSocket agent
    /// gets `error_response{Unavailable, retry_info}`, an HTTP agent 503 + `Retry-After`.
    pub request_timeout: Duration,
    /// Per-connection bound on queued coordinator pushes; a push that doesn't fit is dropped
    /// (and counted) rather than slowing the dispatcher down. Default 16.
    pub write_queue: usize,
    /// `OpAmp:BootstrapPlaintextAllowed`. When false, bearer (bootstrap token) authentication
    /// over a plaintext connection is refused with 401; over TLS it is always allowed.
    pub bootstrap_plaintext_allowed: bool,
    /// How often this gateway extends the ownership TTL of every agent it holds (a third of
    /// the TTL). Claims it finds lost are closed: another gateway holds the agent now.
    pub ownership_refresh: Duration,
    /// Connection cap and accept rate, checked before authentication (see `admission`).
    pub admission: AdmissionConfig,
    /// The agent CA and revocation set: client certificates verified against it authenticate
    /// agents (mTLS identities). `None`: identities off, certificates ignored.
    pub identity: Option<AgentTrust>,
    /// The header a TLS-terminating proxy puts the client certificate in (URL-encoded PEM,
    /// nginx's `$ssl_client_escaped_cert`); honoured only from `trusted_proxies`.
    pub client_cert_header: Option<HeaderName>,
    /// Addresses (networks) of proxies trusted to set `client_cert_header` and to say who the
    /// agent is and whether it spoke TLS (`X-Real-IP` / `X-Forwarded-For`, `X-Forwarded-Proto`).
    pub trusted_proxies: Vec<IpNet>,
    /// The shared secret a trusted proxy must also present (see `proxy`). `None`: forwarded
    /// addresses and TLS are believed from `trusted_proxies`, forwarded certificates never.
    pub proxy_secret: Option<ProxySecret>,
    /// Repeated-field entries one `AgentToServer` may hold (see `decode`).
    pub frame_limits: FrameLimits,
    /// Memory this gateway lets messages being decoded (and awaiting their reply) take at
    /// once. Default [`DEFAULT_DECODE_BUDGET_BYTES`] (256 MiB).
    pub decode_budget_bytes: usize,
    /// How long the bus may stay lost before the agents are closed so they reconnect
    /// elsewhere (see `bus_watch`). `None`: never.
    pub bus_lost_drain: Option<Duration>,
    /// Package downloads served on this listener (`downloads`); `None`: none.
    pub downloads: Option<downloads::Downloads>,
    /// The key agents' own-metrics credentials are checked with: with it, this listener
    /// takes agents' own metrics at `/v1/metrics` (`own_metrics`); `None`: it does not.
    pub own_metrics_key: Option<shared::download_token::DownloadKey>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            request_timeout: Duration::from_secs(10),
            write_queue: 16,
            bootstrap_plaintext_allowed: false,
            ownership_refresh: Duration::from_secs(20),
            admission: AdmissionConfig::default(),
            identity: None,
            client_cert_header: None,
            trusted_proxies: Vec::new(),
            proxy_secret: None,
            frame_limits: FrameLimits::default(),
            decode_budget_bytes: DEFAULT_DECODE_BUDGET_BYTES,
            bus_lost_drain: Some(Duration::from_secs(10)),
            downloads: None,
            own_metrics_key: None,
        }
    }
}

/// A running gateway: the `/v1/opamp` handler, its open WebSocket connections, and the
/// dispatcher task that delivers coordinator pushes to them.
pub struct Gateway {
    inner: Arc<Inner>,
    /// The dispatcher and the refresher hold their own `Arc<Inner>`; aborting them on drop
    /// breaks that cycle.
    dispatcher: tokio::task::AbortHandle,
    refresher: tokio::task::AbortHandle,
    bus_watch: tokio::task::AbortHandle,
    /// Keeps the identity revocation set current (`None` without identities).
    revocations: Option<tokio::task::AbortHandle>,
    /// Package downloads served here (`None`: none).
    downloads: Option<Arc<downloads::Hosted>>,
    /// Agents' own metrics taken here (`None`: none).
    own_metrics: Option<Arc<own_metrics::OwnMetrics>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("id", &self.inner.id)
            .field("connected", &self.connected())
            .finish_non_exhaustive()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.dispatcher.abort();
        self.refresher.abort();
        self.bus_watch.abort();
        if let Some(r) = &self.revocations {
            r.abort();
        }
    }
}

impl Gateway {
    /// Subscribes to this gateway's deliveries and starts the dispatcher.
    pub async fn start(
        id: GatewayId,
        bus: Arc<dyn Bus>,
        ownership: Arc<dyn Ownership>,
        cfg: GatewayConfig,
    ) -> anyhow::Result<Arc<Self>> {
        let deliveries = bus.subscribe_gateway(&id).await?;
        metrics::set_max_connections(cfg.admission.max_connections);
        if cfg.identity.is_some() && !cfg.trusted_proxies.is_empty() && cfg.proxy_secret.is_none() {
            tracing::warn!("tls.trusted_proxies without tls.trusted_proxy_secret_file: client certificates forwarded by a proxy are refused");
        }
        let inner = Arc::new(Inner {
            id,
            bus,
            ownership,
            accept: admission::TokenBucket::new(&cfg.admission, Instant::now()),
            decode_budget: DecodeBudget::new(cfg.decode_budget_bytes),
            clients: limits::ClientLimits::new(&cfg.admission),
            refusal_holds: refusal_hold::RefusalHolds::default(),
            cfg,
            next_conn_id: AtomicU64::new(1),
            conns: Mutex::new(Conns::default()),
            conn_ended: Notify::new(),
            bus_lost: AtomicBool::new(false),
            bus_lost_changed: Notify::new(),
        });
        let dispatcher = tokio::spawn(dispatch(inner.clone(), deliveries)).abort_handle();
        let refresher = tokio::spawn(ownership::refresh_ownership(inner.clone())).abort_handle();
        let bus_watch = tokio::spawn(bus_watch::watch(inner.clone())).abort_handle();
        let revocations = match &inner.cfg.identity {
            Some(trust) => {
                Some(revocations::start(&inner.bus, trust, inner.cfg.request_timeout).await?)
            }
            None => None,
        };
        let downloads = inner.cfg.downloads.clone().map(|d| {
            Arc::new(downloads::Hosted::new(
                d,
                Some(inner.clone()),
                inner.bus.clone(),
                inner.cfg.request_timeout,
            ))
        });
        let own_metrics = inner
            .cfg
            .own_metrics_key
            .clone()
            .map(|key| Arc::new(own_metrics::OwnMetrics::new(key, inner.clone())));
        Ok(Arc::new(Self {
            own_metrics,
            inner,
            dispatcher,
            refresher,
            bus_watch,
            revocations,
            downloads,
        }))
    }

    /// Blobs this gateway fetched whole from the store into its download cache.
    pub fn blobs_fetched(&self) -> u64 {
        self.downloads.as_ref().map_or(0, |d| d.fetched())
    }

    pub fn id(&self) -> &GatewayId {
        &self.inner.id
    }

    /// True once [`Gateway::drain`] (or `shutdown`) began: readiness should fail so load
    /// balancers stop sending new agents here.
    pub fn is_draining(&self) -> bool {
        self.inner.conns().shutting_down
    }

    /// True while the bus is lost: this gateway cannot serve agents, so it should not be sent
    /// any (see `bus_watch`).
    pub fn is_bus_lost(&self) -> bool {
        self.inner.bus_lost()
    }

    /// The `/v1/opamp` route (GET = WebSocket upgrade, POST = plain HTTP). Serve it on a
    /// [`crate::tls::AgentListener`] with `into_make_service_with_connect_info::<Peer>()` so
    /// source IPs and TLS are known (`::<SocketAddr>()` on a TCP listener: all plaintext).
    pub fn router(self: &Arc<Self>) -> Router {
        let opamp = Router::new()
            .route(OPAMP_PATH, any(handle))
            .with_state(self.inner.clone());
        let opamp = match &self.downloads {
            Some(d) => opamp.merge(downloads::router(d.clone())),
            None => opamp,
        };
        match &self.own_metrics {
            Some(m) => opamp.merge(own_metrics::router(m.clone())),
            None => opamp,
        }
    }

    /// Open WebSocket agent connections.
    pub fn connected(&self) -> usize {
        self.inner.conns().open.len()
    }

    /// Closes every WebSocket connection with 1001 (going away) at once and waits, at most
    /// 5 s, for their tasks to finish. See [`Gateway::drain`].
    pub async fn shutdown(&self) {
        self.drain(Duration::ZERO).await;
    }

    /// Graceful stop: refuses new connections (503) from now on, closes the open ones with
    /// 1001 (going away) spread evenly over `window` so their agents reconnect to the other
    /// gateways gradually rather than in one storm, and waits (at most 5 s past the window)
    /// for their tasks to finish: ownership released, coordinators told.
    pub async fn drain(&self, window: Duration) {
        let open: Vec<Arc<ConnControl>> = {
            let mut conns = self.inner.conns();
            conns.shutting_down = true;
            conns.open.values().cloned().collect()
        };
        let start = tokio::time::Instant::now();
        let n = u32::try_from(open.len()).unwrap_or(u32::MAX).max(1);
        for (i, control) in open.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            tokio::time::sleep_until(start + window.mul_f64(f64::from(i) / f64::from(n))).await;
            control.request_close(1001, "server shutting down");
        }
        drop(open);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        loop {
            // Register interest before checking, so an ending connection can't slip between.
            let ended = self.inner.conn_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let left = self.connected();
            if left == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                tracing::warn!(
                    left,
                    "shutdown grace period over with connections still open"
                );
                return;
            }
        }
    }
}

/// Shared by the handler, the connection tasks and the dispatcher.
struct Inner {
    id: GatewayId,
    bus: Arc<dyn Bus>,
    ownership: Arc<dyn Ownership>,
    cfg: GatewayConfig,
    /// Unique per process; HTTP requests take one too, so coordinators can tell them apart.
    next_conn_id: AtomicU64,
    /// Registry of open connections and of which one holds which agent. Only ever locked for
    /// map operations, never across an await.
    conns: Mutex<Conns>,
    /// Woken (notify_waiters) whenever a connection leaves `open`; `shutdown` waits on it.
    conn_ended: Notify,
    /// The accept-rate bucket (`None`: unlimited); its warmup counts from `Gateway::start`.
    accept: Option<admission::TokenBucket>,
    /// Memory for messages being decoded (see `decode`).
    decode_budget: DecodeBudget,
    /// Connections per source address and per credential, accept rate per address.
    clients: limits::ClientLimits,
    /// How long refused WebSockets are held before they are closed ([`refusal_hold`]).
    refusal_holds: refusal_hold::RefusalHolds,
    /// Set while the bus is lost ([`bus_watch`]): not ready, new upgrades refused.
    bus_lost: AtomicBool,
    /// Woken (notify_waiters) when the bus is found lost.
    bus_lost_changed: Notify,
}

#[derive(Default)]
struct Conns {
    /// Set by `shutdown`; no new connection is admitted afterwards.
    shutting_down: bool,
    /// Every open WebSocket connection (bound to an agent or not yet), by conn id.
    open: HashMap<u64, Arc<ConnControl>>,
    /// Which connection holds which agent, at which epoch: the dispatcher's routing table.
    bound: HashMap<InstanceUid, Binding>,
    /// WebSocket upgrades admitted by `handle` and not answered yet: they count against the
    /// connection cap next to `open`, so the cap is checked and the slot taken under this
    /// lock, before authentication (see `admission::SlotReservation`).
    admitting: usize,
}

struct Binding {
    conn_id: u64,
    epoch: u64,
    push: mpsc::Sender<Box<ServerToAgent>>,
    control: Arc<ConnControl>,
}

/// How others ask a connection task to close. A close must never be lost to a full push
/// queue, so it travels beside the queue: the first reason wins and `Notify` keeps a permit
/// if the task isn't waiting right now.
struct ConnControl {
    close: Mutex<Option<(u16, String)>>,
    wake: Notify,
}

impl ConnControl {
    fn new() -> Self {
        Self {
            close: Mutex::new(None),
            wake: Notify::new(),
        }
    }

    /// Returns whether this was the first reason given.
    fn request_close(&self, code: u16, reason: &str) -> bool {
        let mut close = self.close.lock().unwrap_or_else(PoisonError::into_inner);
        let first = close.is_none();
        if first {
            *close = Some((code, reason.to_owned()));
        }
        drop(close);
        self.wake.notify_one();
        first
    }

    fn take_close(&self) -> Option<(u16, String)> {
        self.close
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl Inner {
    fn conns(&self) -> MutexGuard<'_, Conns> {
        // The critical sections can't leave the maps inconsistent, so a poisoned lock is
        // still usable.
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The bus is lost right now ([`bus_watch`]).
    fn bus_lost(&self) -> bool {
        self.bus_lost.load(Ordering::Relaxed)
    }

    /// Completes once the bus is lost (at once if it is).
    async fn bus_lost_now(&self) {
        loop {
            // Interest first, then the check, so a loss between the two is not missed.
            let lost = self.bus_lost_changed.notified();
            tokio::pin!(lost);
            lost.as_mut().enable();
            if self.bus_lost() {
                return;
            }
            lost.await;
        }
    }

    fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Admits a new WebSocket connection; `None` once shutting down or at the connection cap.
    fn open_conn(&self) -> Option<(u64, Arc<ConnControl>)> {
        let id = self.next_conn_id();
        let control = Arc::new(ConnControl::new());
        {
            let mut conns = self.conns();
            if conns.shutting_down {
                return None;
            }
            // A backstop: upgrades through `handle` reserved their slot before authenticating,
            // so this only refuses a connection that bypassed admission.
            if !conns.has_room_to_open(self.cfg.admission.max_connections) {
                drop(conns);
                metrics::count_admission_refused(admission::Refusal::ConnectionCap);
                return None;
            }
            conns.open.insert(id, control.clone());
        }
        metrics::ws_connection_opened();
        Some((id, control))
    }

    /// Removes a connection and whatever it still holds from the registry.
    fn close_conn(&self, conn_id: u64, held: &[(InstanceUid, u64)]) {
        let removed = {
            let mut conns = self.conns();
            for (uid, _) in held {
                if conns.bound.get(uid).is_some_and(|b| b.conn_id == conn_id) {
                    conns.bound.remove(uid);
                }
            }
            conns.open.remove(&conn_id).is_some()
        };
        if removed {
            metrics::ws_connection_closed();
            self.conn_ended.notify_waiters();
        }
    }

    /// Routes `uid` to this connection. A different connection of this gateway that held the
    /// agent before is told to close: the agent reconnected and the old socket is a leftover.
    fn bind(&self, uid: InstanceUid, binding: Binding) {
        let conn_id = binding.conn_id;
        let old = self.conns().bound.insert(uid, binding);
        if let Some(old) = old.filter(|o| o.conn_id != conn_id) {
            old.control
                .request_close(1008, "superseded by a newer connection");
        }
    }

    /// Forgets `uid` for this connection (no-op if another connection holds it by now).
    fn unbind(&self, uid: InstanceUid, conn_id: u64) {
        let mut conns = self.conns();
        if conns.bound.get(&uid).is_some_and(|b| b.conn_id == conn_id) {
            conns.bound.remove(&uid);
        }
    }

    /// One delivery from a coordinator. Never blocks: the bus queue behind us serves every
    /// connection of this gateway.
    fn route(&self, msg: GatewayMessage) {
        let conns = self.conns();
        match msg {
            GatewayMessage::Deliver { uid, epoch, msg } => match conns.bound.get(&uid) {
                None => count_dropped("gone"),
                Some(b) if b.epoch != epoch => count_dropped("stale"),
                Some(b) => match b.push.try_send(msg) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => count_dropped("queue_full"),
                    Err(mpsc::error::TrySendError::Closed(_)) => count_dropped("gone"),
                },
            },
            GatewayMessage::Close { uid, epoch, reason } => match conns.bound.get(&uid) {
                None => count_dropped("gone"),
                Some(b) if b.epoch != epoch => count_dropped("stale"),
                Some(b) => {
                    b.control.request_close(1008, &reason);
                }
            },
        }
    }
}

async fn dispatch(inner: Arc<Inner>, mut deliveries: mpsc::Receiver<GatewayMessage>) {
    while let Some(msg) = deliveries.recv().await {
        inner.route(msg);
    }
    tracing::warn!(gateway = %inner.id, "delivery subscription ended");
}

/// The partition an agent's frames are routed by. Frames without a valid UID (first contact
/// of an agent asking for one, or garbage) all go to partition 0.
fn partition_of(instance_uid: &[u8]) -> u16 {
    InstanceUid::from_slice(instance_uid).map_or(0, |u| u.partition())
}

// ---------------------------------------------------------------------------------------------
// Request handling common to both transports.

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let origin = origin_of(
        &inner.cfg.trusted_proxies,
        inner.cfg.proxy_secret.as_ref(),
        &req,
    );
    let source_ip = origin.source_ip;
    let tls = origin.tls;
    let chain = presented_chain(&inner, &req, &origin);
    let cert = match client_identity(&inner, chain, source_ip).await {
        Ok(cert) => cert,
        Err(refused) => return refused,
    };
    if is_protobuf(req.headers()) {
        if req.method() != Method::POST {
            return method_not_allowed("POST");
        }
        // Admission comes before the body is read and before authentication: a refusal must
        // cost next to nothing, or refusing a storm would itself be the overload.
        if let Err(refusal) = inner.admit_request(source_ip, Instant::now()) {
            return admission_refused(refusal);
        }
        if cert.is_none() {
            if let Err(refused) =
                check_plaintext_bootstrap(&inner, req.headers(), source_ip, tls).await
            {
                return refused;
            }
        }
        return plain::serve(inner, req, source_ip, tls, cert).await;
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return text(
            StatusCode::BAD_REQUEST,
            "expected websocket upgrade or application/x-protobuf POST",
        );
    }
    if req.method() != Method::GET {
        return method_not_allowed("GET");
    }
    // Held until the upgrade is answered; an admitted connection is in the registry by then.
    let (_slot, ip_slot) = match inner.admit_upgrade(source_ip, Instant::now()) {
        Ok(slots) => slots,
        Err(refusal) => return admission_refused(refusal),
    };
    if cert.is_none() {
        if let Err(refused) = check_plaintext_bootstrap(&inner, req.headers(), source_ip, tls).await
        {
            return refused;
        }
    }
    ws::serve(inner, req, source_ip, tls, cert, ip_slot).await
}

/// Pending connections the kernel may queue (capped by `net.core.somaxconn`). Tokio's default
/// of 1024 overflows in a reconnect storm, and every overflowed SYN costs its agent a
/// one-second retransmit.
pub const LISTEN_BACKLOG: u32 = 16_384;

/// A listener for agent connections on `addr`, with [`LISTEN_BACKLOG`].
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// True for `Content-Type: application/x-protobuf`, ignoring case and parameters.
fn is_protobuf(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/x-protobuf"))
}

#[cfg(test)]
mod helper_tests {
    use super::*;
    use http::HeaderValue;

    /// Shared by the header tests of the submodules.
    pub(super) fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).expect("valid header value")
    }

    pub(super) fn headers(name: HeaderName, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name.clone(), hv(v));
        }
        h
    }

    #[test]
    fn content_type_check_is_lenient() {
        for ok in [
            "application/x-protobuf",
            "Application/X-Protobuf",
            "application/x-protobuf; charset=binary",
            " application/x-protobuf ;proto=opamp",
        ] {
            assert!(is_protobuf(&headers(CONTENT_TYPE, &[ok])), "{ok:?}");
        }
        for bad in [
            "application/protobuf",
            "text/plain",
            "application/x-protobufx",
            "",
        ] {
            assert!(!is_protobuf(&headers(CONTENT_TYPE, &[bad])), "{bad:?}");
        }
        assert!(!is_protobuf(&HeaderMap::new()));
    }

    #[test]
    fn trusted_proxy_networks() {
        let net: IpNet = "10.1.0.0/16".parse().expect("cidr");
        assert!(net.contains("10.1.2.3".parse().expect("ip")));
        assert!(!net.contains("10.2.0.1".parse().expect("ip")));
        assert!(net.contains("::ffff:10.1.0.9".parse().expect("mapped")));
        let one: IpNet = "::1".parse().expect("address");
        assert!(one.contains("::1".parse().expect("ip")));
        assert!(!one.contains("::2".parse().expect("ip")));
        let all: IpNet = "0.0.0.0/0".parse().expect("all");
        assert!(all.contains("192.0.2.1".parse().expect("ip")));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("proxy".parse::<IpNet>().is_err());
    }

    #[test]
    fn partitions_default_to_zero() {
        assert_eq!(partition_of(&[1, 2, 3]), 0);
        let uid = InstanceUid::new_v7();
        assert_eq!(partition_of(uid.as_bytes()), uid.partition());
    }
}
