//! What every Ampora role shares, and nothing more:
//!
//! - [`ids`]: instance UIDs, gateway ids, partitions;
//! - [`domain`]: wire-neutral records (agents, configs, tokens, audit) as the API and stores see them;
//! - [`rollout`]: groups and staged rollouts (records, states, stage sizes);
//! - [`packages`]: agent packages (artifacts, assignments, reported statuses, their hashes);
//! - [`package_profile`]: how an offer is shaped for the agent type receiving it;
//! - [`download_token`]: the per-agent, per-blob credential for package downloads;
//! - [`own_telemetry`]: agents' own-telemetry settings, the own-metrics credential and the
//!   per-agent throughput window;
//! - [`token`]: the bootstrap and API token formats (`amp-bs.<base32>.<crc>`);
//! - [`codec`]: the OpAMP WebSocket message header, which the gateway and the agent both frame
//!   with;
//! - [`tls`]: the TLS primitives the gateway's listener and the agent both build on;
//! - the three seams, each a trait with an embedded implementation here and a production one
//!   in cluster mode: [`store::Store`], [`bus::Bus`], [`ownership::Ownership`].
//!
//! No I/O beyond the in-process seam implementations (and the stream wrapper
//! [`tls::MaybeTls`]) lives here, and no protocol logic:
//! the OpAMP session core belongs to the coordinator, frame validation and the listener to the
//! gateway, the agent side of the protocol to the `agent` crate (`shared/agent/`).

pub mod bus;
pub mod codec;
pub mod domain;
pub mod download_token;
pub mod ids;
pub mod own_telemetry;
pub mod ownership;
pub mod package_profile;
pub mod packages;
pub mod rollout;
pub mod store;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod tls;
pub mod token;

/// Milliseconds since the Unix epoch: the one clock unit of stored timestamps.
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
