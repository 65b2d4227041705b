//! What a run is asked to do: the [`Phase`]s after connecting and the [`RunOptions`] of the
//! whole run, plus the one thing derived from them per agent that more than one phase needs
//! (its source address). Plain data at the bottom of the scenarios, so the orchestration in
//! `scenario` and the `refused` phase both read it without depending on each other.

use std::io::IsTerminal as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::Api;

/// What runs after every agent connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Hold,
    Rollout,
    Steady,
    Churn,
    /// A paced baseline window, then the same with refused agents looping (see `refused`).
    Refused,
    /// A long run with churn and periodic pushes, sampling memory and descriptors (`soak`).
    Soak,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Name in the report (connect, hold, …).
    pub scenario: String,
    pub phases: Vec<Phase>,
    /// OpAMP URLs (`ws://…/v1/opamp`, `wss://…` with `ca_pem`); agents are spread over them
    /// round-robin.
    pub targets: Vec<String>,
    /// PEM of the CA(s) that `wss://` targets are trusted by.
    pub ca_pem: Option<String>,
    /// Ampora's API (tokens, pushes). Required unless `no_auth`.
    pub api: Option<Api>,
    /// No credentials: only allowed against the baseline server (checked).
    pub no_auth: bool,
    pub agents: usize,
    pub http_share: f64,
    pub fail_share: f64,
    pub config_bytes: usize,
    /// Window of hold (CPU), steady and churn.
    pub duration: Duration,
    /// Wait after connecting before memory is read (hold).
    pub settle: Duration,
    pub heartbeat_secs: u64,
    pub http_poll_secs: u64,
    /// Worker processes; `None`: in-process up to `per_worker` agents, else enough processes.
    pub workers: Option<usize>,
    pub per_worker: usize,
    /// Agents are spread over 127.0.0.2 … 127.0.0.(1+n) when the target is on loopback.
    pub source_ips: u8,
    /// Whole servers to measure (every agent is on each).
    pub server_pids: Vec<u32>,
    /// Cluster gateways to measure: gateway `i` serves `targets[i]` (same length, or empty).
    pub gateway_pids: Vec<u32>,
    /// Cluster coordinators to measure.
    pub coordinator_pids: Vec<u32>,
    /// Bound of every wait for the fleet (connect, rollout).
    pub timeout: Duration,
    /// Agents started per second (0: all at once, the connect storm).
    pub connect_rate: f64,
    /// The binary to run as `worker` (default: this executable).
    pub worker_exe: Option<PathBuf>,
    pub progress: bool,
    /// `refused`: agents refused by the server, looping as opamp-go clients do.
    pub refused_agents: usize,
    /// `refused`: each admitted agent sends a status report this often.
    pub report_every: Duration,
    /// Console pages kept open during a rollout: each holds the Fleet page's event stream and
    /// fetches the page's rows on every event, as a browser does.
    pub console_watchers: usize,
    /// rollout: a staged rollout with these cumulative stages (`1,5%,25%,100%`) instead of
    /// one assignment to all (see `staged`).
    pub stages: Option<String>,
    /// rollout with `stages`: each stage's soak (`0s`, `90s`).
    pub soak: String,
    /// The soak phase's settings.
    pub soak_plan: Option<crate::soak::SoakPlan>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            scenario: "connect".into(),
            phases: Vec::new(),
            targets: Vec::new(),
            ca_pem: None,
            api: None,
            no_auth: false,
            agents: 1000,
            http_share: 0.0,
            fail_share: 0.0,
            config_bytes: 2048,
            duration: Duration::from_secs(10),
            settle: Duration::from_secs(3),
            heartbeat_secs: 30,
            http_poll_secs: 5,
            workers: None,
            per_worker: 8000,
            source_ips: 16,
            server_pids: Vec::new(),
            gateway_pids: Vec::new(),
            coordinator_pids: Vec::new(),
            timeout: Duration::from_secs(120),
            connect_rate: 0.0,
            worker_exe: None,
            progress: std::io::stderr().is_terminal(),
            refused_agents: 1000,
            console_watchers: 0,
            report_every: Duration::from_millis(200),
            stages: None,
            soak: "0s".into(),
            soak_plan: None,
        }
    }
}

fn is_loopback_v4(url: &str) -> bool {
    url.split("//")
        .nth(1)
        .is_some_and(|rest| rest.starts_with("127.") || rest.starts_with("localhost"))
}

/// Agent `i`'s source address: 127.0.0.2 … 127.0.0.(1+`source_ips`) round-robin when every
/// target is on loopback, else the system's choice.
pub(crate) fn source_ip(opts: &RunOptions, i: usize) -> Option<IpAddr> {
    let loopback = opts.targets.iter().all(|t| is_loopback_v4(t));
    (loopback && opts.source_ips > 0).then(|| {
        IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            2 + (i % opts.source_ips as usize) as u8,
        ))
    })
}
