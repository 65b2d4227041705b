//! The Bus seam: how gateways and coordinators talk.
//!
//! - gateway → coordinator: [`Bus::request`] with a [`CoordinatorRequest`], routed by the agent's
//!   partition (or to any coordinator for authentication); exactly one reply comes back, which is
//!   what makes "one `ServerToAgent` per `AgentToServer`" hold by construction;
//! - gateway → coordinator, no reply: [`Bus::notify`] for connection closes;
//! - coordinator → gateway: [`Bus::deliver`] to the gateway that owns the agent (pushes, closes),
//!   or [`Bus::deliver_many`] for many to one gateway (a rollout's pushes).
//!
//! The bus is at-most-once. Nothing relies on a delivery arriving: the session core asks for
//! full state on sequence gaps and reconciles desired config on every report.
//! Embedded mode uses [`InProcessBus`]; cluster mode [`nats::NatsBus`], whose module docs
//! describe its subjects, wire format (`proto/bus.proto`) and how large messages travel.
//! [`conformance::run_all`] is the behaviour both must show.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::domain::Transport;
use crate::ids::{GatewayId, InstanceUid};
use crate::token::{self, TokenHash};

pub mod conformance;
pub mod nats;
mod wire;

/// Where a coordinator request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The coordinator owning this partition (agent frames: keeps per-agent order).
    Partition(u16),
    /// Any coordinator (stateless questions such as authentication).
    Any,
}

/// The credential a connection was admitted with, as decided by a coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A bootstrap token (by its id), possibly already bound to an agent.
    BootstrapToken {
        token_id: String,
        bound_uid: Option<InstanceUid>,
    },
    /// A client certificate from the agent CA, verified by the gateway (at the TLS handshake
    /// or from a trusted proxy's header): the agent's mTLS identity.
    Certificate { uid: InstanceUid, serial: String },
}

/// Why authentication failed. `as_str` values are the audited reason codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    MissingCredentials,
    WrongScheme,
    MalformedToken,
    UnknownToken,
    Expired,
    Revoked,
    AlreadyRedeemed,
    /// A bootstrap token presented for an agent that has a confirmed mTLS identity: only its
    /// certificate is accepted now.
    IdentityRequired,
    /// The client certificate's identity is revoked or unknown.
    IdentityRevoked,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingCredentials => "missing_credentials",
            Self::WrongScheme => "wrong_scheme",
            Self::MalformedToken => "malformed_token",
            Self::UnknownToken => "unknown_token",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::AlreadyRedeemed => "already_redeemed",
            Self::IdentityRequired => "identity_required",
            Self::IdentityRevoked => "identity_revoked",
        }
    }

    /// Human text for the 401 body / close reason.
    pub fn message(self) -> &'static str {
        match self {
            Self::MissingCredentials => "missing Authorization header",
            Self::WrongScheme => "authorization scheme must be Bearer",
            Self::MalformedToken => "malformed token",
            Self::UnknownToken => "unknown token",
            Self::Expired => "token expired",
            Self::Revoked => "token revoked",
            Self::AlreadyRedeemed => "token already redeemed by another agent",
            Self::IdentityRequired => "agent has a certificate identity; bootstrap token refused",
            Self::IdentityRevoked => "client certificate revoked",
        }
    }
}

/// "May this request in?", asked before a WebSocket upgrade or HTTP request is accepted.
#[derive(Debug, Clone)]
pub struct AuthRequest {
    /// The bootstrap token presented, as its hash and display prefix: the token itself never
    /// crosses the bus. `None` when `certificate` authenticates the request.
    pub token: Option<PresentedToken>,
    /// The verified client certificate's identity, when the request came with one.
    pub certificate: Option<CertificateId>,
    pub source_ip: IpAddr,
    /// The instance UID the client declared up front (`OpAMP-Instance-UID`), if any.
    pub uid_hint: Option<InstanceUid>,
    pub transport: Transport,
}

/// A bootstrap token as a coordinator needs it: the SHA-256 of its text (what the store keys
/// tokens by) and its display prefix (for the audit log). Built by the gateway with
/// [`PresentedToken::from_bootstrap_token`], which refuses a malformed token, so neither the
/// raw token nor a malformed one is ever sent to a coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedToken {
    pub hash: TokenHash,
    /// [`token::display_prefix`]: short and not secret.
    pub prefix: String,
}

impl PresentedToken {
    /// Checks the token's shape and CRC ([`token::check_bootstrap_token`]) and keeps only its
    /// hash and display prefix.
    pub fn from_bootstrap_token(text: &str) -> Result<Self, token::TokenFormatError> {
        let text = token::check_bootstrap_token(text)?;
        Ok(Self {
            hash: token::hash_token(text),
            prefix: token::display_prefix(text),
        })
    }
}

/// What a gateway read from a verified agent certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateId {
    pub uid: InstanceUid,
    /// Lowercase hex without leading zero bytes.
    pub serial: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthDecision {
    Accept(Credential),
    Reject(AuthFailure),
    /// The coordinator could not decide (its store failed): "retry later", not a refusal, and
    /// not an authentication failure in the audit log.
    Unavailable,
}

/// One `AgentToServer`, with what the gateway knows about the connection it came on.
#[derive(Debug, Clone)]
pub struct AgentFrame {
    pub gateway: GatewayId,
    /// Unique per gateway process; tells connections of one agent apart.
    pub conn_id: u64,
    /// The ownership epoch this connection holds for the frame's agent; 0 when not yet bound.
    pub epoch: u64,
    pub transport: Transport,
    pub credential: Credential,
    pub source_ip: IpAddr,
    /// Whether the agent's connection is TLS: to the gateway's agent port, or to a trusted
    /// proxy in front of it that says so (`X-Forwarded-Proto: https`, believed under the
    /// gateway's proxy rules: `tls.trusted_proxies`, with the proxy secret when one is set).
    pub secure: bool,
    pub msg: proto::AgentToServer,
}

/// The coordinator's answer to an [`AgentFrame`].
#[derive(Debug, Clone, Default)]
pub struct FrameReply {
    pub msg: proto::ServerToAgent,
    /// The gateway should claim this agent for the connection (first accepted frame, or the
    /// first frame after a UID change).
    pub bind: Option<InstanceUid>,
    /// Close the connection after sending `msg`, with this reason (e.g. a token bound to
    /// another agent).
    pub close: Option<String>,
}

#[derive(Debug, Clone)]
pub enum CoordinatorRequest {
    Authenticate(AuthRequest),
    Frame(Box<AgentFrame>),
    /// Every revoked identity serial ([`Route::Any`]): a gateway's full refresh of its
    /// revocation set, at start and periodically, beside the `IdentityRevoked` broadcasts.
    RevokedSerials,
    /// Piece `index` of the hosted artifact `sha256` ([`Route::Any`]): a gateway filling its
    /// download cache in cluster mode, where artifacts live in the store.
    BlobChunk {
        sha256: String,
        index: u32,
    },
}

#[derive(Debug, Clone)]
pub enum CoordinatorReply {
    Auth(AuthDecision),
    Frame(Box<FrameReply>),
    RevokedSerials(Vec<String>),
    BlobChunk(BlobChunk),
}

/// A coordinator's answer to [`CoordinatorRequest::BlobChunk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobChunk {
    Bytes(Vec<u8>),
    /// The blob has no such chunk (it is shorter, or not stored at all).
    Missing,
    /// The store failed: nothing is known.
    Error(String),
}

/// Fire-and-forget news for coordinators.
#[derive(Debug, Clone)]
pub enum CoordinatorEvent {
    /// Connection `conn_id` of `gateway`, which held `uid` at `epoch`, closed.
    Disconnected {
        uid: InstanceUid,
        gateway: GatewayId,
        conn_id: u64,
        epoch: u64,
    },
    /// A gateway refused a request before any coordinator saw it (no or malformed
    /// `Authorization`, plaintext bootstrap refused); coordinators audit it.
    AuthFailed { source_ip: IpAddr, reason: String },
    /// An agent's own-metrics export, as the gateway that took it read it, for the
    /// coordinator that owns the agent.
    OwnMetrics {
        uid: InstanceUid,
        figures: Box<crate::own_telemetry::Figures>,
    },
}

/// Coordinator → gateway.
#[derive(Debug, Clone)]
pub enum GatewayMessage {
    /// Send `msg` to the agent if this gateway still holds it at `epoch`.
    Deliver {
        uid: InstanceUid,
        epoch: u64,
        msg: Box<proto::ServerToAgent>,
    },
    /// Close the agent's connection if held at `epoch` (a newer connection took over, or the
    /// credential was revoked).
    Close {
        uid: InstanceUid,
        epoch: u64,
        reason: String,
    },
}

/// News every coordinator (and every gateway) must hear (not routed by partition): changes one coordinator made
/// through its API that the owners of the affected agents must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEvent {
    /// An assignment was created; owners apply it to their agents and push the config.
    AssignmentCreated { assignment_id: i64 },
    /// A bootstrap token changed in the store (revoked); caches must reload it.
    TokenChanged { token_id: String },
    /// A coordinator joined or is leaving; every coordinator re-balances partition leases now
    /// instead of at its next lease tick.
    MembershipChanged,
    /// An agent identity was revoked: gateways refuse its certificate from now on.
    IdentityRevoked { serial: String },
    /// An agent used its identity for the first time: every coordinator refuses its bootstrap
    /// token from now on (whichever answers the authentication).
    IdentityConfirmed { serial: String },
    /// Bootstrap tokens were created (and committed): coordinators load the newly created
    /// tokens into their caches now rather than at their next lease round, so the agents
    /// about to use them need no lookup each.
    TokensCreated,
    /// A rollout was created or changed state or stage: every coordinator re-reads it and
    /// brings its agents in line (and finds it in the store every lease round if this is lost).
    RolloutChanged { rollout_id: i64 },
    /// An operator asked for this agent's config to be sent again (drift): the coordinator
    /// serving it does.
    ReapplyConfig { uid: InstanceUid },
    /// An operator restarts this agent: the coordinator serving it sends the Restart command.
    RestartAgent { uid: InstanceUid },
    /// An operator sends this agent a custom message: the coordinator serving it delivers it.
    CustomMessage {
        uid: InstanceUid,
        capability: String,
        kind: String,
        data: Vec<u8>,
    },
    /// A package artifact was imported or a package assignment made: every coordinator
    /// re-reads the catalog now (else at its next lease round) and offers the new sets.
    PackagesChanged,
    /// Groups or their own-telemetry settings changed: every coordinator re-reads them (and
    /// every lease round, should this be lost).
    TelemetryChanged,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("no coordinator is serving this route")]
    NoResponder,
    #[error("request timed out")]
    Timeout,
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The encoded message exceeds the bus's configured maximum; it was not sent.
    #[error("bus message of {bytes} bytes exceeds the limit of {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
}

/// What a coordinator does with bus traffic.
#[async_trait]
pub trait CoordinatorHandler: Send + Sync + 'static {
    async fn handle(&self, req: CoordinatorRequest) -> CoordinatorReply;
    async fn event(&self, ev: CoordinatorEvent);
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    async fn request(
        &self,
        route: Route,
        req: CoordinatorRequest,
    ) -> Result<CoordinatorReply, BusError>;
    async fn notify(&self, route: Route, ev: CoordinatorEvent) -> Result<(), BusError>;
    async fn deliver(&self, gateway: &GatewayId, msg: GatewayMessage) -> Result<(), BusError>;
    /// Delivers `msgs` to one gateway in order, as `deliver` each would (an implementation may
    /// coalesce them). Every message is attempted; the first error is returned.
    async fn deliver_many(
        &self,
        gateway: &GatewayId,
        msgs: Vec<GatewayMessage>,
    ) -> Result<(), BusError> {
        let mut first_error = None;
        for msg in msgs {
            if let Err(e) = self.deliver(gateway, msg).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
    /// Starts serving [`Route::Any`] traffic with `handler`, and remembers it for the
    /// partitions this coordinator will serve. Called once per coordinator.
    async fn serve_coordinator(&self, handler: Arc<dyn CoordinatorHandler>)
        -> Result<(), BusError>;
    /// Starts delivering [`Route::Partition`] traffic for `partitions` to the handler given to
    /// `serve_coordinator`. Requests for a partition nobody serves fail with `NoResponder`.
    async fn serve_partitions(&self, partitions: &[u16]) -> Result<(), BusError>;
    /// Stops serving `partitions` (handed over to another coordinator).
    async fn unserve_partitions(&self, partitions: &[u16]) -> Result<(), BusError>;
    /// Sends `ev` to every coordinator's control subscription, this one's included.
    async fn broadcast(&self, ev: ControlEvent) -> Result<(), BusError>;
    async fn subscribe_control(&self) -> Result<mpsc::Receiver<ControlEvent>, BusError>;
    /// Subscribes a gateway to its deliveries.
    async fn subscribe_gateway(
        &self,
        gateway: &GatewayId,
    ) -> Result<mpsc::Receiver<GatewayMessage>, BusError>;
    /// Whether the bus is connected right now (a networked bus may be reconnecting; the
    /// in-process one always is).
    fn is_connected(&self) -> bool {
        true
    }
}

/// Per-gateway delivery queue depth. A gateway that falls this far behind loses deliveries,
/// which the protocol heals (see the module docs); it never blocks a coordinator.
const GATEWAY_QUEUE: usize = 65_536;

/// Control events queued per subscriber; they are rare (one per operator action).
const CONTROL_QUEUE: usize = 1024;

/// The single-process bus: requests are direct calls into the one coordinator, deliveries go
/// through a bounded channel per gateway. No serialisation on either path.
#[derive(Default)]
pub struct InProcessBus {
    coordinator: RwLock<Option<Arc<dyn CoordinatorHandler>>>,
    /// Partitions the coordinator serves, so an unserved one answers `NoResponder` as on NATS.
    served: RwLock<HashSet<u16>>,
    gateways: RwLock<HashMap<GatewayId, mpsc::Sender<GatewayMessage>>>,
    control: RwLock<Vec<mpsc::Sender<ControlEvent>>>,
}

impl std::fmt::Debug for InProcessBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessBus").finish_non_exhaustive()
    }
}

impl InProcessBus {
    pub fn new() -> Self {
        Self::default()
    }

    fn handler(&self, route: Route) -> Result<Arc<dyn CoordinatorHandler>, BusError> {
        if let Route::Partition(p) = route {
            let served = self
                .served
                .read()
                .map_err(|_| BusError::Unavailable("poisoned".into()))?;
            if !served.contains(&p) {
                return Err(BusError::NoResponder);
            }
        }
        self.coordinator
            .read()
            .map_err(|_| BusError::Unavailable("poisoned".into()))?
            .clone()
            .ok_or(BusError::NoResponder)
    }
}

#[async_trait]
impl Bus for InProcessBus {
    async fn request(
        &self,
        route: Route,
        req: CoordinatorRequest,
    ) -> Result<CoordinatorReply, BusError> {
        Ok(self.handler(route)?.handle(req).await)
    }

    async fn notify(&self, route: Route, ev: CoordinatorEvent) -> Result<(), BusError> {
        self.handler(route)?.event(ev).await;
        Ok(())
    }

    async fn deliver(&self, gateway: &GatewayId, msg: GatewayMessage) -> Result<(), BusError> {
        let tx = self
            .gateways
            .read()
            .map_err(|_| BusError::Unavailable("poisoned".into()))?
            .get(gateway)
            .cloned()
            .ok_or(BusError::NoResponder)?;
        tx.try_send(msg)
            .map_err(|e| BusError::Unavailable(e.to_string()))
    }

    async fn serve_coordinator(
        &self,
        handler: Arc<dyn CoordinatorHandler>,
    ) -> Result<(), BusError> {
        *self
            .coordinator
            .write()
            .map_err(|_| BusError::Unavailable("poisoned".into()))? = Some(handler);
        Ok(())
    }

    async fn serve_partitions(&self, partitions: &[u16]) -> Result<(), BusError> {
        self.served
            .write()
            .map_err(|_| BusError::Unavailable("poisoned".into()))?
            .extend(partitions);
        Ok(())
    }

    async fn unserve_partitions(&self, partitions: &[u16]) -> Result<(), BusError> {
        let mut served = self
            .served
            .write()
            .map_err(|_| BusError::Unavailable("poisoned".into()))?;
        for p in partitions {
            served.remove(p);
        }
        Ok(())
    }

    async fn broadcast(&self, ev: ControlEvent) -> Result<(), BusError> {
        let mut subs = self
            .control
            .write()
            .map_err(|_| BusError::Unavailable("poisoned".into()))?;
        subs.retain(|tx| !tx.is_closed());
        for tx in subs.iter() {
            // A subscriber this far behind loses the event; owners also reconcile periodically.
            let _ = tx.try_send(ev.clone());
        }
        Ok(())
    }

    async fn subscribe_control(&self) -> Result<mpsc::Receiver<ControlEvent>, BusError> {
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
        self.control
            .write()
            .map_err(|_| BusError::Unavailable("poisoned".into()))?
            .push(tx);
        Ok(rx)
    }

    async fn subscribe_gateway(
        &self,
        gateway: &GatewayId,
    ) -> Result<mpsc::Receiver<GatewayMessage>, BusError> {
        let (tx, rx) = mpsc::channel(GATEWAY_QUEUE);
        self.gateways
            .write()
            .map_err(|_| BusError::Unavailable("poisoned".into()))?
            .insert(gateway.clone(), tx);
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_process_bus_conforms() {
        let bus: Arc<dyn Bus> = Arc::new(InProcessBus::new());
        conformance::run_all(bus.clone(), bus).await;
    }
}
