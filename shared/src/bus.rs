//! The Bus seam: how gateways and coordinators talk.
//!
//! - gateway → coordinator: [`Bus::request`] with a [`CoordinatorRequest`], routed by the agent's
//!   partition (or to any coordinator for authentication); exactly one reply comes back, which is
//!   what makes "one `ServerToAgent` per `AgentToServer`" hold by construction;
//! - gateway → coordinator, no reply: [`Bus::notify`] for connection closes;
//! - coordinator → gateway: [`Bus::deliver`] to the gateway that owns the agent (pushes, closes).
//!
//! The bus is at-most-once. Nothing relies on a delivery arriving: the session core asks for
//! full state on sequence gaps and reconciles desired config on every report.
//! Embedded mode uses [`InProcessBus`]; cluster mode NATS.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::domain::Transport;
use crate::ids::{GatewayId, InstanceUid};

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
        }
    }
}

/// "May this request in?", asked before a WebSocket upgrade or HTTP request is accepted.
#[derive(Debug, Clone)]
pub struct AuthRequest {
    /// The bearer token, scheme already checked and stripped by the gateway.
    pub token: String,
    pub source_ip: IpAddr,
    /// The instance UID the client declared up front (`OpAMP-Instance-UID`), if any.
    pub uid_hint: Option<InstanceUid>,
    pub transport: Transport,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthDecision {
    Accept(Credential),
    Reject(AuthFailure),
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
}

#[derive(Debug, Clone)]
pub enum CoordinatorReply {
    Auth(AuthDecision),
    Frame(Box<FrameReply>),
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

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("no coordinator is serving this route")]
    NoResponder,
    #[error("request timed out")]
    Timeout,
    #[error("bus unavailable: {0}")]
    Unavailable(String),
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
    /// Starts serving coordinator traffic with `handler`.
    async fn serve_coordinator(&self, handler: Arc<dyn CoordinatorHandler>)
        -> Result<(), BusError>;
    /// Subscribes a gateway to its deliveries.
    async fn subscribe_gateway(
        &self,
        gateway: &GatewayId,
    ) -> Result<mpsc::Receiver<GatewayMessage>, BusError>;
}

/// Per-gateway delivery queue depth. A gateway that falls this far behind loses deliveries,
/// which the protocol heals (see the module docs); it never blocks a coordinator.
const GATEWAY_QUEUE: usize = 65_536;

/// The single-process bus: requests are direct calls into the one coordinator, deliveries go
/// through a bounded channel per gateway. No serialisation on either path.
#[derive(Default)]
pub struct InProcessBus {
    coordinator: RwLock<Option<Arc<dyn CoordinatorHandler>>>,
    gateways: RwLock<HashMap<GatewayId, mpsc::Sender<GatewayMessage>>>,
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

    fn handler(&self) -> Result<Arc<dyn CoordinatorHandler>, BusError> {
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
        _route: Route,
        req: CoordinatorRequest,
    ) -> Result<CoordinatorReply, BusError> {
        Ok(self.handler()?.handle(req).await)
    }

    async fn notify(&self, _route: Route, ev: CoordinatorEvent) -> Result<(), BusError> {
        self.handler()?.event(ev).await;
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
