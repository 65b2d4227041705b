//! The Rust OpAMP agent library: the agent side of the protocol.
//!
//! Used by Ampora's in-process Self-Agent (the coordinator), the integration tests' test agent
//! and the load generator; it depends on `proto` and `shared` (the WebSocket header codec and
//! the TLS primitives it has in common with the gateway), never on the gateway. The load generator runs thousands of these per process, which shapes the design:
//! one task per agent, no background threads, one TCP connection per agent, and status kept
//! in a single place (the [`AgentStatus`] watch channel) instead of being copied around.
//!
//! Layers:
//! * [`WsConnection`] / [`HttpTransport`]: one connection, one message at a time, no policy.
//!   Tests use them directly to send hand-made or malformed input.
//! * [`AgentCore`]: the sans-I/O protocol state machine (sequence numbers, full-state resends,
//!   remote config handling). Unit-tested without sockets.
//! * [`Agent`]: the task that glues the two together and adds heartbeats, polling,
//!   reconnects with backoff and a clean shutdown.
//!
//! `wss://` and `https://` endpoints need a [`ClientTls`] naming the CA to trust; plaintext
//! connections do not go through rustls at all.

mod agent;
mod core;
mod http;
mod options;
#[cfg(test)]
mod tests;
mod tls;
mod url;
mod wire;
mod ws;

use std::time::Duration;

use tokio::sync::watch;

pub use self::agent::Agent;
pub use self::core::{AgentCore, Outcome};
pub use self::http::HttpTransport;
pub use self::options::{AgentOptions, AgentStatus, DEFAULT_CAPABILITIES};
pub use self::tls::ClientTls;
pub use self::url::{Endpoint, Scheme};
pub use self::ws::WsConnection;

/// Failure to establish a WebSocket connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid endpoint: {0}")]
    Url(String),
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("connect: timed out")]
    Timeout,
    #[error("handshake: {0}")]
    Handshake(String),
    /// The server answered the upgrade with something other than 101 (401, 429, 503, …).
    #[error("{status}: {body}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        body: String,
    },
}

impl ConnectError {
    /// Server-requested delay before the next attempt (429/503 with `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Failure of an established transport or of one exchange.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid endpoint: {0}")]
    Url(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("websocket: {0}")]
    Ws(#[from] fastwebsockets::WebSocketError),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("timed out")]
    Timeout,
    /// The peer sent something that is not a valid OpAMP message.
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("connection closed")]
    Closed,
    /// Plain HTTP: the server answered with a status other than 200.
    #[error("{status}: {body}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        body: String,
    },
}

impl ClientError {
    /// Server-requested delay before the next attempt (429/503 with `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

impl From<ConnectError> for ClientError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Url(u) => Self::Url(u),
            ConnectError::Io(e) => Self::Io(e),
            ConnectError::Timeout => Self::Timeout,
            ConnectError::Handshake(h) => Self::Protocol(h),
            ConnectError::Status {
                status,
                retry_after,
                body,
            } => Self::Status {
                status,
                retry_after,
                body,
            },
        }
    }
}

/// Waits until `pred` holds for the agent's status, for at most `deadline`.
///
/// Tests use this instead of sleeps: it returns as soon as the condition is met and fails
/// with the last seen status when it is not, which is what one needs to debug a timeout.
pub async fn wait_for(
    rx: &mut watch::Receiver<AgentStatus>,
    deadline: Duration,
    pred: impl Fn(&AgentStatus) -> bool,
) -> Result<AgentStatus, anyhow::Error> {
    let res = tokio::time::timeout(deadline, rx.wait_for(|s| pred(s)))
        .await
        .map(|r| r.map(|status| status.clone()));
    match res {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(_)) => Err(anyhow::anyhow!(
            "agent stopped before the condition was met; last status: {:?}",
            *rx.borrow()
        )),
        Err(_) => Err(anyhow::anyhow!(
            "condition not met within {deadline:?}; last status: {:?}",
            *rx.borrow()
        )),
    }
}
