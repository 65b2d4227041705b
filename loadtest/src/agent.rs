//! One simulated agent: a lean task over [`WsConnection`] / [`HttpTransport`] driven by the
//! client's sans-I/O [`AgentCore`], so protocol behaviour (sequence numbers, full-state
//! resends, APPLYING → APPLIED/FAILED with the new effective config) is exactly the tested
//! client's, while the load generator controls timing: it stamps the moment each agent got
//! its first reply and sent APPLIED, and runs the steady and churn loops.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::agent::{AgentCore, AgentOptions, ClientError, ClientTls, HttpTransport, WsConnection};
use proto::v1::{ComponentHealth, RemoteConfigStatuses};
use proto::{AgentToServer, ServerToAgent};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, timeout, Instant};

use crate::report::{Event, Stats};

/// A reply that takes longer than this counts as lost.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Who one agent is and where it connects.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentSpec {
    /// Index in the whole fleet (events carry it back).
    pub index: usize,
    /// `ws://…`, `http://…`, or with TLS `wss://…`, `https://…`.
    pub endpoint: String,
    pub token: Option<String>,
    pub source_ip: Option<IpAddr>,
    pub fail_configs: bool,
}

/// Settings shared by every agent of a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    /// Size of the effective config each agent reports.
    pub config_bytes: usize,
    /// Heartbeat until the server offers its own interval; also the HTTP poll interval.
    pub heartbeat_secs: u64,
    pub http_poll_secs: u64,
    /// PEM of the CA(s) `wss://` / `https://` endpoints are trusted by.
    #[serde(default)]
    pub ca_pem: Option<String>,
}

/// What all agents of a worker do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Mode {
    /// Connected, heartbeating, applying pushed configs.
    Idle,
    /// Status report → reply in a loop until the wall clock reaches `until_ms`.
    Steady {
        until_ms: u64,
    },
    /// One status report every `every_ms` per agent (each agent at its own random offset)
    /// until `until_ms`: a steady rate, for latency under a fixed load.
    Paced {
        until_ms: u64,
        every_ms: u64,
    },
    /// Disconnect and reconnect in a loop until `until_ms`.
    Churn {
        until_ms: u64,
    },
    /// Idle, but each connected agent leaves (goodbye, close) and reconnects at once after an
    /// exponentially distributed time, at `churn_per_million` per million per second: a
    /// fleet where that share of agents reconnects every second (the soak).
    Soak {
        until_ms: u64,
        churn_per_million: u32,
    },
    Stop,
}

/// What a worker's agents share.
#[derive(Debug)]
pub struct Shared {
    pub events: mpsc::UnboundedSender<Event>,
    pub mode: watch::Receiver<Mode>,
    pub stats: Mutex<Stats>,
    /// The realistic effective config every agent starts with.
    pub config: String,
    /// For `wss://` / `https://`: one client config for every agent of the worker.
    pub tls: Option<ClientTls>,
}

impl Shared {
    fn error(&self, kind: String) {
        if let Ok(mut s) = self.stats.lock() {
            *s.errors.entry(kind).or_default() += 1;
        }
    }

    fn with_stats(&self, f: impl FnOnce(&mut Stats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }
}

pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub fn unix_ms() -> u64 {
    unix_us() / 1000
}

/// Lower-case hex, as the API shows config hashes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The label every simulated agent carries (a non-identifying attribute), so a staged
/// rollout can target the run's agents alone.
pub const FLEET_LABEL: (&str, &str) = ("loadtest", "true");

/// Error kind for the report: stable, low-cardinality names.
pub fn error_kind(e: &ClientError) -> String {
    match e {
        ClientError::Status { status, .. } => format!("http_{status}"),
        ClientError::Timeout => "timeout".into(),
        ClientError::Io(io) => format!("io_{:?}", io.kind()).to_lowercase(),
        ClientError::Ws(_) => "websocket".into(),
        ClientError::Http(_) => "http".into(),
        ClientError::Protocol(_) => "protocol".into(),
        ClientError::Closed => "closed".into(),
        ClientError::Url(_) => "bad_url".into(),
    }
}

enum Conn {
    Ws(WsConnection),
    /// Boxed: most agents are WebSocket agents, and the enum is part of every idle task.
    Http(Box<HttpTransport>),
}

/// Why a connected session ended.
enum End {
    Stop,
    /// Start churning: leave and reconnect.
    Churn,
    Lost(ClientError),
    /// The server said "unavailable": leave and come back after the delay.
    Unavailable(Option<Duration>),
}

impl Conn {
    async fn open(
        spec: &AgentSpec,
        headers: &[(String, String)],
        tls: Option<&ClientTls>,
    ) -> Result<Conn, ClientError> {
        if spec.endpoint.starts_with("http") {
            // Connects lazily with the first request.
            let t = HttpTransport::new(&spec.endpoint, headers.to_vec(), false)
                .with_tls(tls.cloned())
                .with_source_ip(spec.source_ip);
            return Ok(Conn::Http(Box::new(t)));
        }
        let ws = Box::pin(WsConnection::connect_with(
            &spec.endpoint,
            headers,
            spec.source_ip,
            tls,
        ))
        .await?;
        Ok(Conn::Ws(ws))
    }

    /// Sends `msg` and waits for the one reply it gets.
    async fn exchange(&mut self, msg: &AgentToServer) -> Result<ServerToAgent, ClientError> {
        let fut = async {
            match self {
                Conn::Http(t) => Box::pin(t.exchange(msg)).await,
                Conn::Ws(ws) => {
                    Box::pin(ws.send(msg)).await?;
                    ws.recv().await?.ok_or(ClientError::Closed)
                }
            }
        };
        timeout(REPLY_TIMEOUT, fut)
            .await
            .unwrap_or(Err(ClientError::Timeout))
    }

    /// agent_disconnect, then close (WebSocket) — what a well-behaved agent does when leaving.
    async fn goodbye(self, core: &mut AgentCore) {
        let bye = core.disconnect_message();
        match self {
            Conn::Ws(mut ws) => {
                let _ = timeout(Duration::from_secs(2), Box::pin(ws.send(&bye))).await;
                Box::pin(ws.close(1000, "agent stopping")).await;
            }
            Conn::Http(mut t) => {
                let _ = timeout(Duration::from_secs(2), Box::pin(t.exchange(&bye))).await;
            }
        }
    }
}

pub(crate) fn options(spec: &AgentSpec, params: &Params, config: &str) -> AgentOptions {
    let i = spec.index;
    let s = |v: &str| v.to_string();
    AgentOptions {
        endpoint: spec.endpoint.clone(),
        token: spec.token.clone(),
        instance_uid: Some(*uuid::Uuid::new_v4().as_bytes()),
        description: vec![
            (s("service.name"), s("otelcol-contrib")),
            (s("service.version"), s("0.115.1")),
            (s("service.instance.id"), format!("loadtest-{i:06}")),
        ],
        non_identifying: vec![
            (
                s("host.name"),
                format!("lt-node-{i:06}.prod.example.internal"),
            ),
            (s("host.arch"), s("amd64")),
            (s("os.type"), s("linux")),
            (s("os.description"), s("Ubuntu 24.04.1 LTS")),
            (s("env"), s(["prod", "staging", "dev"][i % 3])),
            (
                s("region"),
                s(["eu-west-1", "us-east-1", "ap-south-1"][i % 3]),
            ),
            (s("team"), format!("team-{}", i % 17)),
            (s(FLEET_LABEL.0), s(FLEET_LABEL.1)),
        ],
        heartbeat: Duration::from_secs(params.heartbeat_secs.max(1)),
        initial_config: config.to_string(),
        fail_configs: spec.fail_configs,
        source_ip: spec.source_ip,
        ..AgentOptions::default()
    }
}

/// Like opamp-go: retry at once, then exponential with jitter, never before Retry-After.
fn backoff(attempt: &mut u32, retry_after: Option<Duration>) -> Duration {
    let base = match *attempt {
        0 => Duration::ZERO,
        n => BACKOFF_START
            .saturating_mul(1 << (n - 1).min(16))
            .min(BACKOFF_CAP),
    };
    *attempt = attempt.saturating_add(1);
    let half = base / 2;
    (half + half.mul_f64(rand::random::<f64>())).max(retry_after.unwrap_or_default())
}

/// Sleeps unless told to stop first; false means stop.
async fn pause(d: Duration, mode: &mut watch::Receiver<Mode>) -> bool {
    let until = Instant::now() + d;
    loop {
        if *mode.borrow_and_update() == Mode::Stop {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return true,
            r = mode.changed() => if r.is_err() { return false },
        }
    }
}

/// When an agent that connected now leaves under [`Mode::Soak`]: an exponential delay at
/// `per_million` / 1,000,000 per second (a Poisson process per agent); `None` at rate 0.
fn soak_leave_at(per_million: u32) -> Option<Instant> {
    (per_million > 0).then(|| {
        let rate = f64::from(per_million) / 1_000_000.0;
        // 1 - U is in (0, 1]: its logarithm is finite.
        let secs = -(1.0 - rand::random::<f64>()).ln() / rate;
        Instant::now() + Duration::from_secs_f64(secs.min(86_400.0))
    })
}

fn churn_active(mode: &watch::Receiver<Mode>) -> bool {
    matches!(*mode.borrow(), Mode::Churn { until_ms } if unix_ms() < until_ms)
}

/// Runs one agent until the worker says stop.
pub async fn run(spec: AgentSpec, params: Arc<Params>, shared: Arc<Shared>) {
    let (mut core, _status) = AgentCore::new(options(&spec, &params, &shared.config));
    let headers: Vec<(String, String)> = spec
        .token
        .iter()
        .map(|t| ("Authorization".to_string(), format!("Bearer {t}")))
        .collect();
    let mut mode = shared.mode.clone();
    let mut first = true;
    let mut attempt = 0u32;
    loop {
        if *mode.borrow() == Mode::Stop {
            return;
        }
        let hello = async {
            let mut conn = Conn::open(&spec, &headers, shared.tls.as_ref()).await?;
            let msg = core.full_state();
            let reply = conn.exchange(&msg).await?;
            Ok::<_, ClientError>((conn, reply))
        };
        let (mut conn, reply) = match hello.await {
            Ok(ok) => ok,
            Err(e) => {
                shared.error(error_kind(&e));
                if !pause(backoff(&mut attempt, e.retry_after()), &mut mode).await {
                    return;
                }
                continue;
            }
        };
        attempt = 0;
        if first {
            first = false;
            let _ = shared.events.send(Event::Connected {
                idx: spec.index,
                at_us: unix_us(),
            });
        }
        shared.with_stats(|s| s.connects += 1);
        let end = match handle(&mut core, &mut conn, reply, &spec, &shared).await {
            Err(end) => end,
            Ok(()) if churn_active(&mode) => End::Churn,
            Ok(()) => session(&mut core, &mut conn, &spec, &params, &shared, &mut mode).await,
        };
        shared.with_stats(|s| s.ended += 1);
        let retry_after = match end {
            End::Stop => {
                conn.goodbye(&mut core).await;
                return;
            }
            End::Churn => {
                conn.goodbye(&mut core).await;
                continue;
            }
            End::Lost(e) => {
                shared.error(error_kind(&e));
                e.retry_after()
            }
            End::Unavailable(retry_after) => {
                shared.error("unavailable".into());
                conn.goodbye(&mut core).await;
                retry_after
            }
        };
        if !pause(backoff(&mut attempt, retry_after), &mut mode).await {
            return;
        }
    }
}

/// Processes a reply and sends what it calls for (APPLYING, APPLIED, full state, …). Over
/// HTTP every message is its own exchange, so follow-ups are handled until none remain.
async fn handle(
    core: &mut AgentCore,
    conn: &mut Conn,
    reply: ServerToAgent,
    spec: &AgentSpec,
    shared: &Shared,
) -> Result<(), End> {
    let mut pending = vec![reply];
    while let Some(reply) = pending.pop() {
        let out = core.on_message(reply);
        for msg in &out.send {
            let outcome = msg.remote_config_status.as_ref().and_then(|st| {
                (st.status == RemoteConfigStatuses::Applied as i32
                    || st.status == RemoteConfigStatuses::Failed as i32)
                    .then(|| {
                        let failed = st.status == RemoteConfigStatuses::Failed as i32;
                        (failed, hex(&st.last_remote_config_hash))
                    })
            });
            // Stamped before sending: the server cannot have seen the answer earlier, so a
            // stage the answer lets start always starts after it (see `stagetimes`).
            let at_us = unix_us();
            match conn {
                Conn::Ws(ws) => {
                    // The replies to these come later and are handled by the session loop.
                    match timeout(REPLY_TIMEOUT, Box::pin(ws.send(msg))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(End::Lost(e)),
                        Err(_) => return Err(End::Lost(ClientError::Timeout)),
                    }
                }
                Conn::Http(_) => pending.push(conn.exchange(msg).await.map_err(End::Lost)?),
            }
            if let Some((failed, hash)) = outcome {
                let _ = shared.events.send(Event::Applied {
                    idx: spec.index,
                    at_us,
                    failed,
                    hash: Some(hash),
                });
            }
        }
        if out.reconnect {
            return Err(End::Unavailable(out.retry_after));
        }
    }
    Ok(())
}

/// Status report → reply until the wall clock reaches `until_ms`, recording each round trip:
/// back to back (`every` is `None`), or one every `every`, the first after a random part of
/// it so that agents spread over the interval. A late reply delays the next report, never
/// queues several. `Err` when the session ends (connection lost, told to stop).
async fn reports(
    core: &mut AgentCore,
    conn: &mut Conn,
    spec: &AgentSpec,
    shared: &Shared,
    mode: &mut watch::Receiver<Mode>,
    until_ms: u64,
    every: Option<Duration>,
) -> Result<(), End> {
    let mut degraded = false;
    let mut next = Instant::now() + every.map_or(Duration::ZERO, |e| e.mul_f64(rand::random()));
    while unix_ms() < until_ms {
        if every.is_some() {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                r = mode.changed() => {
                    if r.is_err() || *mode.borrow() == Mode::Stop {
                        return Err(End::Stop);
                    }
                    continue;
                }
            }
        }
        // A status report that changes health, as a flapping component would.
        degraded = !degraded;
        let mut msg = core.heartbeat_message();
        msg.health = Some(ComponentHealth {
            healthy: true,
            status: if degraded { "degraded" } else { "running" }.into(),
            status_time_unix_nano: unix_us() * 1000,
            ..ComponentHealth::default()
        });
        let t = Instant::now();
        let reply = conn.exchange(&msg).await.map_err(End::Lost)?;
        let us = t.elapsed().as_micros() as u64;
        shared.with_stats(|s| {
            s.messages += 1;
            s.steady_latency.record(us);
        });
        handle(core, conn, reply, spec, shared).await?;
        if let Some(e) = every {
            next = (next + e).max(Instant::now());
        }
    }
    Ok(())
}

/// A connected agent: heartbeats (WS) or polls (HTTP), applies pushes, and follows the mode.
async fn session(
    core: &mut AgentCore,
    conn: &mut Conn,
    spec: &AgentSpec,
    params: &Params,
    shared: &Shared,
    mode: &mut watch::Receiver<Mode>,
) -> End {
    let poll = Duration::from_secs(params.http_poll_secs.max(1));
    let mut last_sent = Instant::now();
    // Soak: when this session ends by itself (drawn once per session).
    let mut leave_at: Option<Option<Instant>> = None;
    loop {
        let current = *mode.borrow_and_update();
        let mut leave = None;
        match current {
            Mode::Stop => return End::Stop,
            Mode::Churn { until_ms } if unix_ms() < until_ms => return End::Churn,
            Mode::Soak {
                until_ms,
                churn_per_million,
            } if unix_ms() < until_ms => {
                leave = *leave_at.get_or_insert_with(|| soak_leave_at(churn_per_million));
                if leave.is_some_and(|at| Instant::now() >= at) {
                    return End::Churn;
                }
            }
            Mode::Steady { until_ms } if unix_ms() < until_ms => {
                if let Err(end) = reports(core, conn, spec, shared, mode, until_ms, None).await {
                    return end;
                }
                last_sent = Instant::now();
                continue;
            }
            Mode::Paced { until_ms, every_ms } if unix_ms() < until_ms => {
                let every = Some(Duration::from_millis(every_ms.max(1)));
                if let Err(end) = reports(core, conn, spec, shared, mode, until_ms, every).await {
                    return end;
                }
                last_sent = Instant::now();
                continue;
            }
            _ => {}
        }
        let interval = match conn {
            Conn::Ws(_) => core.heartbeat(),
            Conn::Http(_) => poll,
        };
        let due = last_sent + interval;
        // Far enough never to fire: the branch below is off without a soak.
        let leave = leave.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        let step = match conn {
            Conn::Ws(ws) => tokio::select! {
                r = mode.changed() => if r.is_err() { return End::Stop } else { None },
                _ = tokio::time::sleep_until(leave) => None,
                r = ws.recv() => match r {
                    Ok(Some(msg)) => Some(msg),
                    Ok(None) => return End::Lost(ClientError::Closed),
                    Err(ClientError::Protocol(_)) => {
                        shared.error("protocol".into());
                        None
                    }
                    Err(e) => return End::Lost(e),
                },
                _ = tokio::time::sleep_until(due) => {
                    last_sent = Instant::now();
                    let hb = core.heartbeat_message();
                    if let Err(e) = Box::pin(ws.send(&hb)).await {
                        return End::Lost(e);
                    }
                    None
                }
            },
            Conn::Http(_) => {
                tokio::select! {
                    r = mode.changed() => if r.is_err() { return End::Stop },
                    _ = tokio::time::sleep_until(leave) => continue,
                    _ = sleep(due.saturating_duration_since(Instant::now())) => {}
                }
                if !matches!(*mode.borrow(), Mode::Idle | Mode::Soak { .. }) {
                    continue;
                }
                last_sent = Instant::now();
                let hb = core.heartbeat_message();
                match conn.exchange(&hb).await {
                    Ok(r) => Some(r),
                    Err(e) => return End::Lost(e),
                }
            }
        };
        if let Some(msg) = step {
            if let Err(end) = handle(core, conn, msg, spec, shared).await {
                return end;
            }
        }
    }
}
