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
//! Submodules: `ws` (the per-connection task), `plain` (the plain HTTP transport),
//! `admission` (connection cap and accept rate, checked before anything else), `limits` (the
//! same per source address and per credential).

mod admission;
mod decode;
mod latency;
mod limits;
mod plain;
pub mod proxy;
mod refusal_hold;
mod ws;

pub use crate::net::IpNet;
pub use admission::{AdmissionConfig, WARMUP_FLOOR};
pub use decode::{DecodeBudget, FrameLimits, DEFAULT_DECODE_BUDGET_BYTES};
pub use latency::{BUS_REQUEST_DURATION, OPAMP_MESSAGE_DURATION};
pub use proxy::{ProxySecret, PROXY_SECRET_HEADER};

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use http::header::{ACCEPT_ENCODING, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use proto::ServerToAgent;
use shared::bus::{
    AuthDecision, AuthFailure, AuthRequest, Bus, CertificateId, ControlEvent, CoordinatorEvent,
    CoordinatorReply, CoordinatorRequest, Credential, GatewayMessage, PresentedToken, Route,
};
use shared::domain::Transport;
use shared::ids::{GatewayId, InstanceUid};
use shared::ownership::{Owner, Ownership};
use tokio::sync::{mpsc, Notify};

use crate::tls::{AgentTrust, Peer};

/// The OpAMP endpoint path (spec default).
pub const OPAMP_PATH: &str = "/v1/opamp";

/// Default inbound message limit. The spec recommends 64 MiB; we default lower because a
/// gateway holds many connections and real status reports are kilobytes (effective configs of
/// a few hundred KiB at most). Operators can raise it.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 4 << 20;

/// The header a plain-HTTP client may use to announce its instance UID (spec v0.15.0).
pub const INSTANCE_UID_HEADER: HeaderName = HeaderName::from_static("opamp-instance-uid");

/// What we tell throttled / unserved agents to wait before retrying.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Upper bound of [`Gateway::shutdown`].
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

// Metric names (see `describe_metrics`).
const FRAMES_RECEIVED: &str = "ampora_opamp_frames_received_total";
const FRAMES_SENT: &str = "ampora_opamp_frames_sent_total";
const FRAMES_REJECTED: &str = "ampora_opamp_frames_rejected_total";
const CONNECTIONS: &str = "ampora_opamp_connections";
const DELIVERIES_DROPPED: &str = "ampora_gateway_deliveries_dropped_total";
const ADMISSION_REFUSED: &str = "ampora_gateway_admission_refused_total";
const ADMISSION_MAX_CONNECTIONS: &str = "ampora_gateway_admission_max_connections";
const UNTRUSTED_CERT_HEADER: &str = "ampora_gateway_untrusted_cert_header_total";

/// How often a gateway with agent identities reloads the whole revocation set from a
/// coordinator, beside the `IdentityRevoked` broadcasts (which the bus may lose).
const REVOCATION_REFRESH: Duration = Duration::from_secs(30);

/// Every `reason` of `ampora_opamp_frames_rejected_total` (cap_mismatch is counted by the
/// coordinator, the others here).
const REJECT_REASONS: [&str; 6] = [
    "oversize",
    "malformed",
    "cap_mismatch",
    "auth_failed",
    "too_many_fields",
    "memory_budget",
];
const DROP_REASONS: [&str; 3] = ["stale", "queue_full", "gone"];

/// Registers descriptions for the gateway's metrics and creates the bounded-label series at
/// zero, so dashboards and alerts see them before the first event.
pub fn describe_metrics() {
    metrics::describe_counter!(
        FRAMES_RECEIVED,
        "OpAMP AgentToServer messages received, by transport (ws, http)"
    );
    metrics::describe_counter!(
        FRAMES_SENT,
        "OpAMP ServerToAgent messages sent, by transport (ws, http)"
    );
    metrics::describe_counter!(
        FRAMES_REJECTED,
        "OpAMP messages or requests refused, by reason (oversize, malformed, cap_mismatch, auth_failed, too_many_fields, memory_budget)"
    );
    metrics::describe_gauge!(CONNECTIONS, "Open OpAMP WebSocket connections");
    metrics::describe_counter!(
        DELIVERIES_DROPPED,
        "Coordinator deliveries the gateway dropped, by reason (stale, queue_full, gone)"
    );
    metrics::describe_counter!(
        ADMISSION_REFUSED,
        "Connections and requests refused before the upgrade, by reason (connection_cap: 503; rate, ip_connection_cap, credential_connection_cap, ip_rate: 429)"
    );
    metrics::describe_gauge!(
        ADMISSION_MAX_CONNECTIONS,
        "This gateway's cap on open WebSocket connections (0: unlimited)"
    );
    for reason in admission::REFUSAL_REASONS {
        metrics::counter!(ADMISSION_REFUSED, "reason" => reason).increment(0);
    }
    for reason in REJECT_REASONS {
        metrics::counter!(FRAMES_REJECTED, "reason" => reason).increment(0);
    }
    for reason in DROP_REASONS {
        metrics::counter!(DELIVERIES_DROPPED, "reason" => reason).increment(0);
    }
    metrics::gauge!(CONNECTIONS, "transport" => "ws").increment(0.0);
    metrics::describe_counter!(
        UNTRUSTED_CERT_HEADER,
        "Requests carrying the client-certificate header from an address that is not a trusted proxy (header ignored)"
    );
    metrics::counter!(UNTRUSTED_CERT_HEADER).increment(0);
    crate::serve::describe_metrics();
    proxy::describe_metrics();
    latency::describe_metrics();
}

fn count_rejected(reason: &'static str) {
    metrics::counter!(FRAMES_REJECTED, "reason" => reason).increment(1);
}

fn count_dropped(reason: &'static str) {
    metrics::counter!(DELIVERIES_DROPPED, "reason" => reason).increment(1);
}

fn transport_label(t: Transport) -> &'static str {
    match t {
        Transport::WebSocket => "ws",
        Transport::Http => "http",
    }
}

fn count_received(t: Transport) {
    metrics::counter!(FRAMES_RECEIVED, "transport" => transport_label(t)).increment(1);
}

fn count_sent(t: Transport) {
    metrics::counter!(FRAMES_SENT, "transport" => transport_label(t)).increment(1);
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
    /// Keeps the identity revocation set current (`None` without identities).
    revocations: Option<tokio::task::AbortHandle>,
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
        // Shows the cap next to `ampora_opamp_connections`, so "how close to full" is a ratio.
        metrics::gauge!(ADMISSION_MAX_CONNECTIONS).set(cfg.admission.max_connections as f64);
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
        });
        let dispatcher = tokio::spawn(dispatch(inner.clone(), deliveries)).abort_handle();
        let refresher = tokio::spawn(refresh_ownership(inner.clone())).abort_handle();
        let revocations = match &inner.cfg.identity {
            Some(trust) => {
                let control = inner.bus.subscribe_control().await?;
                // Before the first handshake: a revocation broadcast before this gateway
                // started never reaches it.
                load_revoked(&inner.bus, trust, inner.cfg.request_timeout).await;
                let task = track_revocations(inner.bus.clone(), trust.clone(), control);
                Some(tokio::spawn(task).abort_handle())
            }
            None => None,
        };
        Ok(Arc::new(Self {
            inner,
            dispatcher,
            refresher,
            revocations,
        }))
    }

    pub fn id(&self) -> &GatewayId {
        &self.inner.id
    }

    /// True once [`Gateway::drain`] (or `shutdown`) began: readiness should fail so load
    /// balancers stop sending new agents here.
    pub fn is_draining(&self) -> bool {
        self.inner.conns().shutting_down
    }

    /// The `/v1/opamp` route (GET = WebSocket upgrade, POST = plain HTTP). Serve it on a
    /// [`crate::tls::AgentListener`] with `into_make_service_with_connect_info::<Peer>()` so
    /// source IPs and TLS are known (`::<SocketAddr>()` on a TCP listener: all plaintext).
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(OPAMP_PATH, any(handle))
            .with_state(self.inner.clone())
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

    fn request_close(&self, code: u16, reason: &str) {
        let mut close = self.close.lock().unwrap_or_else(PoisonError::into_inner);
        if close.is_none() {
            *close = Some((code, reason.to_owned()));
        }
        drop(close);
        self.wake.notify_one();
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
                count_admission_refused(admission::Refusal::ConnectionCap);
                return None;
            }
            conns.open.insert(id, control.clone());
        }
        metrics::gauge!(CONNECTIONS, "transport" => "ws").increment(1.0);
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
            metrics::gauge!(CONNECTIONS, "transport" => "ws").decrement(1.0);
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
                Some(b) => b.control.request_close(1008, &reason),
            },
        }
    }
}

/// Most claims refreshed in one ownership call.
const REFRESH_BATCH: usize = 1000;

/// Keeps this gateway's ownership claims alive; a claim found lost means another gateway took
/// the agent (or the entry expired while we stalled), so the connection here is closed and the
/// agent's next connection claims it afresh.
async fn refresh_ownership(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(inner.cfg.ownership_refresh).await;
        let held: Vec<(InstanceUid, Owner)> = inner
            .conns()
            .bound
            .iter()
            .map(|(uid, b)| {
                let owner = Owner {
                    gateway: inner.id.clone(),
                    epoch: b.epoch,
                };
                (*uid, owner)
            })
            .collect();
        for batch in held.chunks(REFRESH_BATCH) {
            match inner.ownership.refresh(batch).await {
                Ok(lost) => {
                    for uid in lost {
                        let epoch = batch.iter().find(|(u, _)| *u == uid).map(|(_, o)| o.epoch);
                        let conns = inner.conns();
                        if let Some(b) = conns.bound.get(&uid).filter(|b| Some(b.epoch) == epoch) {
                            b.control.request_close(1008, "ownership lost");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ownership refresh failed"),
            }
        }
    }
}

/// Loads the full set of revoked serials once, within `within`; a failure is logged (no
/// coordinator yet is no reason not to start) and left to the periodic reload.
async fn load_revoked(bus: &Arc<dyn Bus>, trust: &AgentTrust, within: Duration) {
    let reply = tokio::time::timeout(
        within,
        latency::bus_request(&**bus, Route::Any, CoordinatorRequest::RevokedSerials),
    )
    .await;
    match reply {
        Ok(Ok(CoordinatorReply::RevokedSerials(serials))) => {
            trust.revoked.replace(serials.into_iter().collect());
        }
        Ok(Ok(_)) => tracing::error!("coordinator answered revoked serials with another reply"),
        Ok(Err(e)) => tracing::warn!(error = %e, "loading revoked identities at start failed"),
        Err(_) => tracing::warn!("loading revoked identities at start timed out"),
    }
}

/// Keeps `trust.revoked` current: each `IdentityRevoked` broadcast adds its serial at once, and
/// a full reload from a coordinator at start and every [`REVOCATION_REFRESH`] catches any
/// broadcast the bus lost. Holds no `Inner`, so it cannot keep the gateway alive.
async fn track_revocations(
    bus: Arc<dyn Bus>,
    trust: AgentTrust,
    mut control: mpsc::Receiver<ControlEvent>,
) {
    let mut tick = tokio::time::interval(REVOCATION_REFRESH);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                match latency::bus_request(&*bus, Route::Any, CoordinatorRequest::RevokedSerials).await {
                    Ok(CoordinatorReply::RevokedSerials(serials)) => {
                        trust.revoked.replace(serials.into_iter().collect());
                    }
                    Ok(_) => tracing::error!("coordinator answered revoked serials with another reply"),
                    Err(e) => tracing::warn!(error = %e, "loading revoked identities failed"),
                }
            }
            ev = control.recv() => match ev {
                Some(ControlEvent::IdentityRevoked { serial }) => trust.revoked.insert(serial),
                Some(_) => {}
                None => {
                    tracing::warn!("control subscription ended; revocations only by refresh");
                    loop {
                        tick.tick().await;
                        if let Ok(CoordinatorReply::RevokedSerials(s)) =
                            latency::bus_request(&*bus, Route::Any, CoordinatorRequest::RevokedSerials).await
                        {
                            trust.revoked.replace(s.into_iter().collect());
                        }
                    }
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

/// The `error_response` for "try again later" (spec §Throttling / WebSocket).
fn unavailable_msg(instance_uid: Vec<u8>, text: &str) -> ServerToAgent {
    use proto::v1::{server_error_response::Details, RetryInfo, ServerErrorResponse};
    ServerToAgent {
        instance_uid,
        error_response: Some(ServerErrorResponse {
            r#type: proto::v1::ServerErrorResponseType::Unavailable as i32,
            error_message: text.to_owned(),
            details: Some(Details::RetryInfo(RetryInfo {
                retry_after_nanoseconds: u64::try_from(RETRY_AFTER.as_nanos()).unwrap_or(u64::MAX),
            })),
        }),
        ..Default::default()
    }
}

/// The `error_response` for a message we could not use (spec §Bad Request: don't retry).
fn bad_request_msg(instance_uid: Vec<u8>, text: String) -> ServerToAgent {
    ServerToAgent {
        instance_uid,
        error_response: Some(proto::v1::ServerErrorResponse {
            r#type: proto::v1::ServerErrorResponseType::BadRequest as i32,
            error_message: text,
            details: None,
        }),
        ..Default::default()
    }
}

/// Coordinator close reasons prefixed `auth:` are authentication failures (counted as such);
/// returns the reason without the prefix.
fn auth_close_reason(reason: &str) -> Option<&str> {
    reason.strip_prefix("auth:").map(str::trim_start)
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

/// The agent identity a request carries, if any: the client certificate of its TLS
/// handshake, or the one a trusted proxy put in `client_cert_header`. Both are verified the
/// same way (agent CA, revocation set); the handshake already refused invalid and revoked
/// ones, so this repeats the check for the header path and for a revocation that arrived
/// since. A certificate that fails is refused (401, audited): the agent meant to use it.
/// The header from any other address is ignored and counted.
async fn client_identity(
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

/// The client certificate chain a request presents to [`client_identity`]: its handshake's,
/// else a trusted proxy's header. Synchronous, so the request is not held across an await.
fn presented_chain(
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
                    metrics::counter!(UNTRUSTED_CERT_HEADER).increment(1);
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
fn header_chain(value: &HeaderValue) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let decoded = percent_encoding::percent_decode(value.as_bytes()).collect::<Vec<u8>>();
    shared::tls::parse_certs_pem(&decoded).unwrap_or_default()
}

/// Where a request comes from.
struct Origin {
    /// The address of the TCP peer: the agent, or a proxy in front of it.
    peer: IpAddr,
    /// How far `peer` is trusted as a proxy (`tls.trusted_proxies`, the proxy secret).
    proxy: proxy::ProxyTrust,
    /// The agent's address, for logs, audit and metrics: the peer's, or the one a trusted
    /// proxy names (`X-Real-IP`, else the last `X-Forwarded-For` entry, which that proxy
    /// appended).
    source_ip: IpAddr,
    /// Whether the agent's connection is TLS: this one's, or, behind a trusted proxy, the
    /// proxy's (`X-Forwarded-Proto: https`/`wss`: it terminated TLS).
    tls: bool,
}

/// The [`Origin`] of a request, from the connect info of an
/// [`AgentListener`](crate::tls::AgentListener) ([`Peer`]) or of a plain TCP listener
/// (`SocketAddr`: plaintext). Without either (a router served without connect info) the
/// peer is unknown, which 0.0.0.0 says plainly in logs and audit, and the connection counts
/// as plaintext. Forwarding headers from anyone but a trusted proxy (with the proxy secret,
/// when one is set) are ignored: an agent could otherwise claim TLS it does not have, or
/// another agent's address.
fn origin_of(trusted_proxies: &[IpNet], secret: Option<&ProxySecret>, req: &Request) -> Origin {
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

/// `OpAmp:BootstrapPlaintextAllowed`: unless allowed, a bearer (bootstrap) token over a
/// plaintext connection is refused (401, audited, counted as `auth_failed`). Refused before a
/// coordinator sees it: redeeming a single-use token over a channel that may have leaked it
/// would burn it for nothing. Requests without a usable bearer token pass on, for
/// [`authenticate`] to refuse with the precise reason.
async fn check_plaintext_bootstrap(
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

/// Authenticates a request: `Ok((credential, uid_hint))` or the response refusing it.
async fn authenticate(
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
        Ok(Ok(CoordinatorReply::Frame(_) | CoordinatorReply::RevokedSerials(_))) => {
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

/// True for `Content-Type: application/x-protobuf`, ignoring case and parameters.
fn is_protobuf(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/x-protobuf"))
}

/// True when `Accept-Encoding` lets us gzip the response (`gzip`, `x-gzip` or `*`, q > 0).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or_default().trim();
            let wanted = coding.eq_ignore_ascii_case("gzip")
                || coding.eq_ignore_ascii_case("x-gzip")
                || coding == "*";
            wanted && parts.all(|p| !is_zero_q(p))
        })
}

/// `q=0` (or `q=0.0`, `q=0.000`) means "not acceptable".
fn is_zero_q(param: &str) -> bool {
    let Some((name, value)) = param.split_once('=') else {
        return false;
    };
    name.trim().eq_ignore_ascii_case("q") && value.trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
}

// ---------------------------------------------------------------------------------------------
// Responses.

fn text(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.to_owned(),
    )
        .into_response()
}

/// 401, counted and logged. `reason` is the audit-style code, `message` the body. Logged at
/// debug only: a looping or hostile client would turn a line per attempt into a log flood,
/// and every refusal is already counted here and by the coordinator
/// (`ampora_auth_failures_total{reason}`) and audited there, aggregated.
fn unauthorized(source_ip: IpAddr, reason: &str, message: &str) -> Response {
    count_rejected("auth_failed");
    tracing::debug!(source_ip = %source_ip, reason, "authentication failed");
    let mut resp = text(StatusCode::UNAUTHORIZED, message);
    resp.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer"),
    );
    resp
}

fn service_unavailable(body: &str) -> Response {
    let mut resp = text(StatusCode::SERVICE_UNAVAILABLE, body);
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        HeaderValue::from(RETRY_AFTER.as_secs()),
    );
    resp
}

fn count_admission_refused(refusal: admission::Refusal) {
    metrics::counter!(ADMISSION_REFUSED, "reason" => refusal.reason()).increment(1);
}

/// 503 at the connection cap, 429 without an accept token; counted, never logged (a storm of
/// refusals would be a storm of log lines; the counter says the same). `Retry-After` is what
/// opamp-go clients wait before reconnecting.
fn admission_refused(refusal: admission::Refusal) -> Response {
    count_admission_refused(refusal);
    let (status, body, retry_after) = match refusal {
        admission::Refusal::ConnectionCap => (
            StatusCode::SERVICE_UNAVAILABLE,
            "connection limit reached, retry later",
            RETRY_AFTER,
        ),
        admission::Refusal::Rate { retry_after } => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many new connections, retry later",
            retry_after,
        ),
        admission::Refusal::IpRate { retry_after } => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many new connections from this address, retry later",
            retry_after,
        ),
        admission::Refusal::IpConnectionCap => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections from this address, retry later",
            RETRY_AFTER,
        ),
        admission::Refusal::CredentialConnectionCap => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections with this credential, retry later",
            RETRY_AFTER,
        ),
    };
    let mut resp = text(status, body);
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        HeaderValue::from(retry_after.as_secs().max(1)),
    );
    resp
}

fn method_not_allowed(allow: &'static str) -> Response {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    resp.headers_mut()
        .insert(http::header::ALLOW, HeaderValue::from_static(allow));
    resp
}

#[cfg(test)]
mod helper_tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).expect("valid header value")
    }

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

    fn headers(name: HeaderName, values: &[&str]) -> HeaderMap {
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
    fn accept_encoding_gzip() {
        for ok in [
            &["gzip"][..],
            &["deflate, gzip;q=0.5"],
            &["GZIP"],
            &["br", "x-gzip"],
            &["*"],
            &["gzip; q=1.0"],
        ] {
            assert!(accepts_gzip(&headers(ACCEPT_ENCODING, ok)), "{ok:?}");
        }
        for bad in [
            &[][..],
            &["identity"],
            &["gzip;q=0"],
            &["gzip; q=0.000"],
            &["deflate, br"],
            &["gzipx"],
        ] {
            assert!(!accepts_gzip(&headers(ACCEPT_ENCODING, bad)), "{bad:?}");
        }
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
    fn admission_refusals_say_when_to_retry() {
        let resp = admission_refused(admission::Refusal::ConnectionCap);
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[http::header::RETRY_AFTER], "5");
        let resp = admission_refused(admission::Refusal::Rate {
            retry_after: Duration::from_secs(3),
        });
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[http::header::RETRY_AFTER], "3");
        let resp = admission_refused(admission::Refusal::Rate {
            retry_after: Duration::ZERO,
        });
        assert_eq!(resp.headers()[http::header::RETRY_AFTER], "1", "never 0");
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
