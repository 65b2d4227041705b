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
//!   remote config handling, package offers and statuses). Unit-tested without sockets.
//! * [`Agent`]: the task that glues the two together and adds heartbeats, polling,
//!   reconnects with backoff, package downloads (on tasks of their own, SHA-256 checked) and
//!   a clean shutdown.
//!
//! `wss://` and `https://` endpoints need a [`ClientTls`] naming the CA to trust; plaintext
//! connections do not go through rustls at all. The transports fail with [`ConnectError`] /
//! [`ClientError`].

mod agent;
mod core;
mod download;
mod error;
mod http;
mod options;
pub mod own_metrics;
#[cfg(test)]
mod tests;
mod tls;
mod url;
mod wire;
mod ws;

use std::time::Duration;

use tokio::sync::watch;

pub use self::agent::Agent;
pub use self::core::{AgentCore, Outcome, PackageDownload, DISLIKED, SICKENED};
pub use self::download::fetch as download_package;
pub use self::error::{ClientError, ConnectError};
pub use self::http::HttpTransport;
pub use self::options::{
    AgentOptions, AgentStatus, OwnTelemetryOffer, PackageView, DEFAULT_CAPABILITIES,
};
pub use self::tls::ClientTls;
pub use self::url::{Endpoint, Scheme};
pub use self::ws::WsConnection;

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
