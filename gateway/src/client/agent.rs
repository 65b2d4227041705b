//! The agent task: [`AgentCore`] plus a transport, heartbeats/polling, reconnects and stop.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::Duration;

use proto::{agent_caps, AgentToServer};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

use super::core::AgentCore;
use super::http::HttpTransport;
use super::tls::ClientTls;
use super::url::{missing_tls, Endpoint, Scheme};
use super::ws::WsConnection;
use super::ClientError;

/// ReportsStatus | AcceptsRemoteConfig | ReportsEffectiveConfig | ReportsHealth |
/// ReportsRemoteConfig | ReportsHeartbeat.
pub const DEFAULT_CAPABILITIES: u64 = agent_caps::REPORTS_STATUS
    | agent_caps::ACCEPTS_REMOTE_CONFIG
    | agent_caps::REPORTS_EFFECTIVE_CONFIG
    | agent_caps::REPORTS_HEALTH
    | agent_caps::REPORTS_REMOTE_CONFIG
    | agent_caps::REPORTS_HEARTBEAT;

/// A send that does not complete in this time means a dead peer; reconnect.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for one HTTP request/response.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` spends on saying goodbye before giving up.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// `ws://…`, `wss://…`, `http://…` or `https://…`; the scheme picks the transport.
    pub endpoint: String,
    /// What to trust for `wss://` and `https://` (required for them: there is no built-in
    /// trust store), e.g. `ClientTls::from_ca_file("ampora-data/tls/ca.pem")`.
    pub tls: Option<ClientTls>,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// `None`: ask the server for one (RequestInstanceUid) and adopt what it assigns.
    pub instance_uid: Option<[u8; 16]>,
    /// Identifying attributes (service.name, service.version, …).
    pub description: Vec<(String, String)>,
    /// Non-identifying attributes (host.name, os.type, labels, …).
    pub non_identifying: Vec<(String, String)>,
    pub capabilities: u64,
    /// WS heartbeat / HTTP poll interval (zero means the 30 s default). A non-zero
    /// `heartbeat_interval_seconds` offered by the server replaces it.
    pub heartbeat: Duration,
    /// Effective config reported at start (a single `text/yaml` file).
    pub initial_config: String,
    /// Report FAILED for every remote config instead of applying it.
    pub fail_configs: bool,
    /// Local address to connect from (the load generator spreads over 127.0.0.x).
    pub source_ip: Option<IpAddr>,
    /// On WebSocket reconnects, open with a compact message instead of the full state, as
    /// agents that trust the server to remember them do (the server must then ask for full
    /// state when its memory may be stale, e.g. after a move between gateways).
    pub compact_reconnect: bool,
    /// Declare AcceptsOpAMPConnectionSettings (0x100) and take up a client certificate the
    /// server offers in `connection_settings.opamp` (with its private key): reconnect with it
    /// (mTLS, no `Authorization` header from then on). Declaring 0x100 in `capabilities` does
    /// the same. Needs a `wss://` / `https://` endpoint.
    pub accept_identity: bool,
}

impl AgentOptions {
    /// The spec's default heartbeat and HTTP poll interval.
    pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            endpoint: "ws://127.0.0.1:4320/v1/opamp".into(),
            tls: None,
            token: None,
            instance_uid: None,
            description: Vec::new(),
            non_identifying: Vec::new(),
            capabilities: DEFAULT_CAPABILITIES,
            heartbeat: Self::DEFAULT_HEARTBEAT,
            initial_config: String::new(),
            fail_configs: false,
            source_ip: None,
            compact_reconnect: false,
            accept_identity: false,
        }
    }
}

/// What an agent has seen so far; published on a watch channel so tests can wait on it.
#[derive(Debug, Clone, Default)]
pub struct AgentStatus {
    /// `None` until the server assigned one when the agent started without a uid.
    pub instance_uid: Option<[u8; 16]>,
    pub connected: bool,
    /// ServerToAgent messages received.
    pub replies: u64,
    pub last_remote_config_hash: Option<Vec<u8>>,
    pub applied_configs: u64,
    /// Bodies of the effective config files, concatenated (just the body for one file).
    pub effective_config: String,
    /// Last connect/transport/server error, e.g. "401: unknown token". Kept after recovery.
    pub last_error: Option<String>,
    pub heartbeat_secs: u64,
    pub server_capabilities: u64,
    pub full_state_requests: u64,
    /// Serial (lowercase hex) of the client certificate the agent connects with, once a
    /// connection with an offered certificate succeeded; `None` on the bootstrap token.
    pub client_cert_serial: Option<String>,
}

/// Handle to a running agent task. Dropping it stops the agent like [`Agent::stop`], without
/// waiting for the goodbye.
#[derive(Debug)]
pub struct Agent {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    status: watch::Receiver<AgentStatus>,
}

impl Agent {
    /// Spawns the agent task on the current tokio runtime. An invalid endpoint ends the task
    /// at once with the reason in [`AgentStatus::last_error`].
    pub fn start(opts: AgentOptions) -> Agent {
        let (core, status) = AgentCore::new(opts);
        let (stop_tx, stop_rx) = oneshot::channel();
        // The transport loop is spawned directly (not behind a dispatching async fn) so the
        // task stores its arguments once.
        let endpoint = Endpoint::parse(&core.options().endpoint).and_then(|ep| {
            if ep.tls && core.options().tls.is_none() {
                Err(missing_tls(&ep))
            } else {
                Ok(ep)
            }
        });
        let task = match endpoint {
            Err(e) => {
                core.set_error(e);
                tokio::spawn(async move { drop(core) })
            }
            Ok(ep) => match ep.scheme {
                Scheme::Ws => tokio::spawn(run_ws(core, ep, stop_rx)),
                Scheme::Http => tokio::spawn(run_http(core, ep, stop_rx)),
            },
        };
        Agent {
            stop: Some(stop_tx),
            task,
            status,
        }
    }

    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.clone()
    }

    /// Sends `agent_disconnect`, closes the connection and waits for the task to end.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let task = &mut self.task;
        if timeout(GOODBYE_TIMEOUT * 3, &mut *task).await.is_err() {
            task.abort();
        }
    }
}

/// Reconnect delays like opamp-go: the first retry is immediate, then exponential with
/// jitter, never shorter than a server-requested Retry-After.
#[derive(Debug, Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next(&mut self, retry_after: Option<Duration>) -> Duration {
        let base = match self.attempt {
            0 => Duration::ZERO,
            n => BACKOFF_START
                .saturating_mul(1 << (n - 1).min(16))
                .min(BACKOFF_CAP),
        };
        self.attempt = self.attempt.saturating_add(1);
        // "Equal jitter": half fixed, half random, so agents that dropped together spread out.
        let half = base / 2;
        let jittered = half + half.mul_f64(rand::random::<f64>());
        jittered.max(retry_after.unwrap_or(Duration::ZERO))
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Sleeps `d` unless stopped first; false means stop.
async fn pause(d: Duration, stop: &mut oneshot::Receiver<()>) -> bool {
    tokio::select! {
        _ = stop => false,
        _ = sleep(d) => true,
    }
}

/// Why a WebSocket session ended.
enum SessionEnd {
    Stop,
    /// Connection lost or unusable; reconnect after the backoff (and this Retry-After).
    Lost {
        error: String,
        retry_after: Option<Duration>,
    },
    /// The server is unavailable: say goodbye, close, back off.
    Unavailable {
        retry_after: Option<Duration>,
    },
    /// New connection settings to try: close and reconnect at once with them.
    Switch,
}

async fn run_ws(mut core: AgentCore, ep: Endpoint, mut stop: oneshot::Receiver<()>) {
    let source = core.options().source_ip;
    let mut backoff = Backoff::default();
    loop {
        // The configured endpoint, TLS and token, or an offered client certificate.
        let settings = core.connection();
        let target = settings.endpoint.unwrap_or_else(|| ep.clone());
        // Boxed here and below: the handshake and the goodbye are big futures that only live
        // briefly; inline they would bloat every idle agent's task.
        let connect = Box::pin(async move {
            WsConnection::connect_endpoint(
                &target,
                &settings.headers,
                source,
                settings.tls.as_ref(),
            )
            .await
        });
        let connected = tokio::select! {
            _ = &mut stop => return,
            c = connect => c,
        };
        let mut conn = match connected {
            Ok(c) => c,
            Err(e) => {
                let error = e.to_string();
                if core.connection_failed(&error) {
                    // The offered certificate did not work: back to the previous settings.
                    core.set_error(error);
                    continue;
                }
                let wait = backoff.next(e.retry_after());
                core.set_error(error);
                if !pause(wait, &mut stop).await {
                    return;
                }
                continue;
            }
        };
        core.connection_succeeded();
        core.set_connected(true);
        let end = ws_session(&mut core, &mut conn, &mut stop, &mut backoff).await;
        core.set_connected(false);
        let retry_after = match end {
            SessionEnd::Stop => {
                Box::pin(goodbye(&mut core, conn)).await;
                return;
            }
            SessionEnd::Lost { error, retry_after } => {
                core.set_error(error);
                retry_after
            }
            SessionEnd::Unavailable { retry_after } => {
                Box::pin(goodbye(&mut core, conn)).await;
                retry_after
            }
            SessionEnd::Switch => {
                Box::pin(conn.close(1000, "switching connection settings")).await;
                backoff.reset();
                continue;
            }
        };
        if !pause(backoff.next(retry_after), &mut stop).await {
            return;
        }
    }
}

/// agent_disconnect, then Close(1000), as the spec asks of a client that leaves.
async fn goodbye(core: &mut AgentCore, mut conn: WsConnection) {
    let bye = core.disconnect_message();
    let _ = timeout(GOODBYE_TIMEOUT, conn.send(&bye)).await;
    conn.close(1000, "agent stopping").await;
}

/// Sends with a deadline. The send future is boxed: it only exists while sending, and inline
/// it would enlarge every idle agent's task.
async fn ws_send(conn: &mut WsConnection, msg: &AgentToServer) -> Result<(), SessionEnd> {
    match timeout(SEND_TIMEOUT, Box::pin(conn.send(msg))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(lost(e)),
        Err(_) => Err(lost(ClientError::Timeout)),
    }
}

fn lost(e: ClientError) -> SessionEnd {
    SessionEnd::Lost {
        retry_after: e.retry_after(),
        error: e.to_string(),
    }
}

/// What the session loop does next. Decided without awaiting, so that received messages
/// (ServerToAgent is ~1.5 KiB inline) are consumed before the next await point and don't
/// take space in the task's state.
enum Step {
    Send(Vec<AgentToServer>, Option<SessionEnd>),
    End(SessionEnd),
    Idle,
}

async fn ws_session(
    core: &mut AgentCore,
    conn: &mut WsConnection,
    stop: &mut oneshot::Receiver<()>,
    backoff: &mut Backoff,
) -> SessionEnd {
    // The client speaks first, with everything: the server may know nothing about us.
    let mut step = Step::Send(vec![core.connect_message()], None);
    let mut last_sent = Instant::now();
    loop {
        match step {
            Step::Send(msgs, then) => {
                for m in &msgs {
                    if let Err(end) = ws_send(conn, m).await {
                        return end;
                    }
                    last_sent = Instant::now();
                }
                if let Some(end) = then {
                    return end;
                }
            }
            Step::End(end) => return end,
            Step::Idle => {}
        }
        let due = last_sent + core.heartbeat();
        let heartbeats = core.heartbeats_enabled();
        step = tokio::select! {
            biased;
            _ = &mut *stop => Step::End(SessionEnd::Stop),
            r = conn.recv() => match r {
                Ok(Some(msg)) => {
                    // A full exchange worked: the next failure retries at once again.
                    backoff.reset();
                    let out = core.on_message(msg);
                    let then = if out.switch {
                        Some(SessionEnd::Switch)
                    } else {
                        out.reconnect
                            .then_some(SessionEnd::Unavailable { retry_after: out.retry_after })
                    };
                    Step::Send(out.send, then)
                }
                Ok(None) => {
                    let error = match conn.close_info() {
                        Some((code, reason)) => format!("closed by server: {code} {reason}"),
                        None => "closed by server".to_string(),
                    };
                    Step::End(SessionEnd::Lost { error, retry_after: None })
                }
                // A malformed message is not fatal: record it, keep the connection.
                Err(ClientError::Protocol(p)) => {
                    core.set_error(format!("protocol: {p}"));
                    Step::Idle
                }
                Err(e) => Step::End(lost(e)),
            },
            _ = tokio::time::sleep_until(due), if heartbeats => {
                Step::Send(vec![core.heartbeat_message()], None)
            }
        };
    }
}

/// The HTTP transport for the configured endpoint, TLS and token, or an offered client
/// certificate.
fn http_transport(core: &AgentCore, ep: &Endpoint) -> HttpTransport {
    let settings = core.connection();
    HttpTransport::from_endpoint(
        settings.endpoint.unwrap_or_else(|| ep.clone()),
        settings.headers,
    )
    .with_source_ip(core.options().source_ip)
    .with_tls(settings.tls)
}

async fn run_http(mut core: AgentCore, ep: Endpoint, mut stop: oneshot::Receiver<()>) {
    let mut transport = http_transport(&core, &ep);
    let mut backoff = Backoff::default();
    // Messages waiting to go out; polls are made up on the spot when this is empty.
    let mut queue: VecDeque<AgentToServer> = VecDeque::from([core.full_state()]);
    loop {
        if queue.is_empty() {
            if !pause(core.heartbeat(), &mut stop).await {
                break;
            }
            queue.push_back(core.heartbeat_message());
        }
        // Sent from the front of the queue and only removed once answered, so a failed
        // message is retried as is (a repeated sequence number reads as a retry).
        let Some(msg) = queue.front() else { continue };
        // Handled in a block without awaiting (see `Step`): the reply is dropped before the
        // pause below, and only the delay survives.
        let wait = {
            let res = tokio::select! {
                _ = &mut stop => break,
                r = timeout(EXCHANGE_TIMEOUT, Box::pin(transport.exchange(msg))) => {
                    r.unwrap_or(Err(ClientError::Timeout))
                }
            };
            match res {
                Ok(reply) => {
                    queue.pop_front();
                    backoff.reset();
                    core.connection_succeeded();
                    core.set_connected(true);
                    let out = core.on_message(reply);
                    // Sent right away, without waiting for the next poll: e.g. APPLYING, APPLIED.
                    queue.extend(out.send);
                    if out.switch {
                        // An offered client certificate: the next request is made with it.
                        transport = http_transport(&core, &ep);
                    }
                    out.reconnect.then(|| backoff.next(out.retry_after))
                }
                Err(e) => {
                    core.set_connected(false);
                    let error = e.to_string();
                    let reverted = core.connection_failed(&error);
                    core.set_error(error);
                    if reverted {
                        // The offered certificate did not work: back to the previous settings.
                        transport = http_transport(&core, &ep);
                        None
                    } else {
                        Some(backoff.next(e.retry_after()))
                    }
                }
            }
        };
        if let Some(wait) = wait {
            if !pause(wait, &mut stop).await {
                break;
            }
        }
    }
    // Stopping: the spec recommends agent_disconnect in the last HTTP message too.
    let bye = Box::new(core.disconnect_message());
    let _ = timeout(GOODBYE_TIMEOUT, Box::pin(transport.exchange(&bye))).await;
    core.set_connected(false);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards the per-agent footprint the load generator depends on: big, short-lived
    /// futures (handshake, sends, HTTP exchanges) are boxed and received messages are dropped
    /// before awaits. Bounds are generous; a jump past them means something large got inlined
    /// into the idle state.
    #[tokio::test]
    async fn agent_task_state_stays_small() {
        let core = || AgentCore::new(AgentOptions::default()).0;
        let ep = |u| Endpoint::parse(u).expect("valid");
        let (_tx, rx) = oneshot::channel();
        let ws = run_ws(core(), ep("ws://h/"), rx);
        assert!(
            std::mem::size_of_val(&ws) < 2048,
            "{}",
            std::mem::size_of_val(&ws)
        );
        let (_tx, rx) = oneshot::channel();
        let http = run_http(core(), ep("http://h/"), rx);
        assert!(
            std::mem::size_of_val(&http) < 3072,
            "{}",
            std::mem::size_of_val(&http)
        );
    }

    #[test]
    fn backoff_is_immediate_then_exponential_capped_and_honours_retry_after() {
        let mut b = Backoff::default();
        assert_eq!(b.next(None), Duration::ZERO);
        let d = b.next(None);
        assert!(d >= BACKOFF_START / 2 && d <= BACKOFF_START, "{d:?}");
        let d = b.next(None);
        assert!(
            d >= BACKOFF_START && d <= BACKOFF_START * 2,
            "doubles: {d:?}"
        );
        for _ in 0..40 {
            assert!(b.next(None) <= BACKOFF_CAP);
        }
        assert!(b.next(Some(Duration::from_secs(120))) >= Duration::from_secs(120));
        b.reset();
        assert_eq!(b.next(None), Duration::ZERO);
        assert_eq!(
            b.next(Some(Duration::from_secs(3))),
            Duration::from_secs(3),
            "Retry-After wins over a short backoff"
        );
    }
}
