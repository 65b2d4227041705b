//! The OpAMP edge: transports at `/v1/opamp` (WebSocket and plain HTTP), frame validation,
//! authentication of the upgrade / request (delegated to a coordinator over the bus),
//! ownership claims, and delivery of coordinator pushes to sockets.
//!
//! [`tls`] is the agent listener: TLS and plaintext on one port, the server certificate
//! (reloaded when its files change, or from a local CA).
//!
//! [`serve`] serves the agent port: connection-level limits (pending connections, header
//! timeout, open connections per address) and the HTTP/1.1 loop.
//!
//! The other end of the connection, the OpAMP agent library that the Self-Agent, the test
//! agent and the load generator use, is the `agent` crate (`shared/agent/`); what both ends
//! need (the WebSocket header codec, the TLS primitives) is in `shared`.
//!
//! Invariant: the gateway holds no agent state beyond its open connections and never opens a
//! database connection; everything it knows about an agent it learns from the bus.

pub mod net;
pub mod serve;
pub mod server;
pub mod tls;

pub use server::{Gateway, GatewayConfig};
