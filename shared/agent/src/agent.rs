//! The agent task: [`AgentCore`] plus a transport, heartbeats/polling, reconnects and stop.

use std::collections::VecDeque;
use std::time::Duration;

use proto::AgentToServer;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

use crate::core::AgentCore;
use crate::download::Downloads;
use crate::error::{ClientError, ConnectError};
use crate::http::HttpTransport;
use crate::options::{AgentOptions, AgentStatus};
use crate::url::{missing_tls, Endpoint, Scheme};
use crate::ws::WsConnection;

/// A send that does not complete in this time means a dead peer; reconnect.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for one HTTP request/response.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` spends on saying goodbye before giving up.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// opamp-go's back-off between failed connection attempts of one connection cycle
/// ([`AgentOptions::reconnect_at_once_after_close`]): 0.5 s doubling to 60 s, each delay
/// randomised by ±50 % (the randomisation factor of the back-off library it uses).
const GO_BACKOFF_START: Duration = Duration::from_millis(500);
const GO_BACKOFF_CAP: Duration = Duration::from_secs(60);

/// Handle to a running agent task. Dropping it stops the agent like [`Agent::stop`], without
/// waiting for the goodbye.
#[derive(Debug)]
pub struct Agent {
    stop: Option<oneshot::Sender<()>>,
    /// Hands the core back when it ends, for [`Agent::restart_process`].
    task: JoinHandle<AgentCore>,
    status: watch::Receiver<AgentStatus>,
    /// To start from scratch should the core not come back.
    opts: AgentOptions,
}

impl Agent {
    /// Spawns the agent task on the current tokio runtime. An invalid endpoint ends the task
    /// at once with the reason in [`AgentStatus::last_error`].
    pub fn start(opts: AgentOptions) -> Agent {
        let (core, status) = AgentCore::new(opts.clone());
        let (stop, task) = spawn(core);
        Agent {
            stop: Some(stop),
            task,
            status,
            opts,
        }
    }

    /// Simulates a restart of the agent's process: stops it as [`Agent::stop`] does, then
    /// starts it again with its options, its instance UID and its config, numbering messages
    /// from 0. An offered certificate survives unless
    /// [`AgentOptions::forget_identity_on_restart`]. The status channel (and its counters)
    /// carries on; [`AgentStatus::process_restarts`] counts restarts.
    pub async fn restart_process(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let ended = timeout(GOODBYE_TIMEOUT * 3, &mut self.task).await;
        let core = match ended {
            Ok(Ok(core)) => core.process_restarted(self.opts.forget_identity_on_restart),
            _ => {
                self.task.abort();
                let (core, status) = AgentCore::new(self.opts.clone());
                self.status = status;
                core
            }
        };
        let (stop, task) = spawn(core);
        self.stop = Some(stop);
        self.task = task;
    }

    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.clone()
    }

    /// Sends `counters` as this agent's own metrics where the server's last `own_metrics`
    /// offer says (over `https://` trusting what the agent's own connection trusts, unless the
    /// offer names a CA). Returns the HTTP status.
    pub async fn export_own_metrics(
        &self,
        counters: &crate::own_metrics::CollectorCounters,
    ) -> Result<u16, crate::ClientError> {
        let offer = self
            .status
            .borrow()
            .own_metrics
            .clone()
            .ok_or_else(|| crate::ClientError::Protocol("no own_metrics offer yet".into()))?;
        let tls = self.opts.tls.clone().filter(|_| offer.ca_pem.is_none());
        crate::own_metrics::export(&offer, counters, tls).await
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

/// Spawns the agent task for `core`: the transport loop for its endpoint.
fn spawn(core: AgentCore) -> (oneshot::Sender<()>, JoinHandle<AgentCore>) {
    let (stop_tx, stop_rx) = oneshot::channel();
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
            tokio::spawn(async move { core })
        }
        Ok(ep) => tokio::spawn(run(core, ep, stop_rx)),
    };
    (stop_tx, task)
}

/// Why a transport loop returned.
#[derive(Debug, PartialEq, Eq)]
enum Exit {
    Stop,
    /// The next connection is over the other transport.
    Transport,
}

/// The agent task: the transport loop of the endpoint in use, another when offered settings
/// move the agent to the other transport. The loops are boxed, so the task stores the core
/// once and only the running loop's state. Package downloads outlive connections and loops
/// (their results are reported on the next connection), not the task.
async fn run(mut core: AgentCore, ep: Endpoint, mut stop: oneshot::Receiver<()>) -> AgentCore {
    let mut dl = Downloads::default();
    loop {
        let exit = match core.next_scheme(&ep) {
            Scheme::Ws => Box::pin(run_ws(&mut core, &ep, &mut stop, &mut dl)).await,
            Scheme::Http => Box::pin(run_http(&mut core, &ep, &mut stop, &mut dl)).await,
        };
        if exit == Exit::Stop {
            return core;
        }
    }
}

/// Reconnect delays. By default like opamp-go once was: the first retry is immediate, then
/// exponential with jitter, never shorter than a server-requested Retry-After. With
/// [`AgentOptions::reconnect_at_once_after_close`], opamp-go's current policy (see
/// [`GO_BACKOFF_START`]); the loops then reset it for every connection cycle.
#[derive(Debug, Default)]
struct Backoff {
    attempt: u32,
    go: bool,
}

impl Backoff {
    fn new(opts: &AgentOptions) -> Self {
        Self {
            attempt: 0,
            go: opts.reconnect_at_once_after_close,
        }
    }

    fn next(&mut self, retry_after: Option<Duration>) -> Duration {
        let n = self.attempt;
        self.attempt = self.attempt.saturating_add(1);
        let delay = if self.go {
            // A cycle's first attempt is made without asking: its first retry already waits.
            let base = GO_BACKOFF_START
                .saturating_mul(1 << n.min(16))
                .min(GO_BACKOFF_CAP);
            // ±50 %: between half and one and a half times the interval.
            base / 2 + base.mul_f64(rand::random::<f64>())
        } else if n == 0 {
            Duration::ZERO
        } else {
            let base = BACKOFF_START
                .saturating_mul(1 << (n - 1).min(16))
                .min(BACKOFF_CAP);
            // "Equal jitter": half fixed, half random, so agents that dropped together spread
            // out.
            let half = base / 2;
            half + half.mul_f64(rand::random::<f64>())
        };
        delay.max(retry_after.unwrap_or(Duration::ZERO))
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
    /// Settings offered to an agent that restarts on offers: close, restart the client.
    Restart,
    /// A new top-level package was installed: say goodbye and reconnect at once.
    Upgraded,
}

async fn run_ws(
    core: &mut AgentCore,
    ep: &Endpoint,
    stop: &mut oneshot::Receiver<()>,
    dl: &mut Downloads,
) -> Exit {
    let source = core.options().source_ip;
    let at_once = core.options().reconnect_at_once_after_close;
    let mut backoff = Backoff::new(core.options());
    loop {
        // The configured endpoint, TLS and token, or an offered client certificate.
        let settings = core.connection();
        let target = settings.endpoint.unwrap_or_else(|| ep.clone());
        if target.scheme != Scheme::Ws {
            return Exit::Transport;
        }
        core.count_connections(1, 0, Scheme::Ws);
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
            _ = &mut *stop => return Exit::Stop,
            c = connect => c,
        };
        let mut conn = match connected {
            Ok(c) => c,
            Err(e) => {
                if matches!(e, ConnectError::Status { .. }) {
                    core.count_upgrade_refusal();
                }
                let error = e.to_string();
                if core.connection_failed(&error) {
                    // The offered certificate did not work: back to the previous settings.
                    core.set_error(error);
                    continue;
                }
                let wait = backoff.next(e.retry_after());
                core.set_error(error);
                if !pause(wait, stop).await {
                    return Exit::Stop;
                }
                continue;
            }
        };
        core.count_connections(0, 1, Scheme::Ws);
        core.connection_succeeded();
        core.set_connected(true);
        let end = ws_session(core, &mut conn, stop, &mut backoff, dl).await;
        core.set_connected(false);
        let retry_after = match end {
            SessionEnd::Stop => {
                Box::pin(goodbye(core, conn)).await;
                return Exit::Stop;
            }
            SessionEnd::Lost { error, retry_after } => {
                core.set_error(error);
                retry_after
            }
            SessionEnd::Unavailable { retry_after } => {
                Box::pin(goodbye(core, conn)).await;
                retry_after
            }
            SessionEnd::Switch => {
                Box::pin(conn.close(1000, "switching connection settings")).await;
                backoff.reset();
                continue;
            }
            SessionEnd::Restart => {
                Box::pin(conn.close(1000, "restarting with new connection settings")).await;
                core.client_restarted();
                backoff.reset();
                continue;
            }
            SessionEnd::Upgraded => {
                // Like the Collector restarted on its new version.
                Box::pin(goodbye(core, conn)).await;
                backoff.reset();
                continue;
            }
        };
        if at_once {
            // A new connection cycle: its first attempt is immediate.
            backoff.reset();
            continue;
        }
        if !pause(backoff.next(retry_after), stop).await {
            return Exit::Stop;
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
    dl: &mut Downloads,
) -> SessionEnd {
    let at_once = core.options().reconnect_at_once_after_close;
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
                    let mut out = core.on_message(msg);
                    dl.start(core, std::mem::take(&mut out.downloads));
                    let then = if out.switch {
                        Some(SessionEnd::Switch)
                    } else if out.upgraded {
                        Some(SessionEnd::Upgraded)
                    } else {
                        // opamp-go only records an error response; it does not disconnect.
                        (out.reconnect && !at_once)
                            .then_some(SessionEnd::Unavailable { retry_after: out.retry_after })
                    };
                    if out.restart {
                        // A restarting client sends nothing more on this connection.
                        Step::End(SessionEnd::Restart)
                    } else if out.halt {
                        Step::End(SessionEnd::Stop)
                    } else {
                        Step::Send(out.send, then)
                    }
                }
                Ok(None) => {
                    let error = match conn.close_info() {
                        Some((code, reason)) => {
                            core.set_close_reason(format!("{code} {reason}"));
                            format!("closed by server: {code} {reason}")
                        }
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
            done = dl.next() => {
                let out = done.report(core);
                Step::Send(out.send, out.upgraded.then_some(SessionEnd::Upgraded))
            }
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

/// Publishes the connections `transport` opened since `seen` (which it updates).
fn count_http(core: &AgentCore, transport: &HttpTransport, seen: &mut (u64, u64)) {
    let now = transport.connections();
    core.count_connections(now.0 - seen.0, now.1 - seen.1, Scheme::Http);
    *seen = now;
}

async fn run_http(
    core: &mut AgentCore,
    ep: &Endpoint,
    stop: &mut oneshot::Receiver<()>,
    dl: &mut Downloads,
) -> Exit {
    if core.next_scheme(ep) != Scheme::Http {
        return Exit::Transport;
    }
    let at_once = core.options().reconnect_at_once_after_close;
    let mut transport = http_transport(core, ep);
    let mut seen = (0, 0);
    let mut backoff = Backoff::new(core.options());
    // Messages waiting to go out; polls are made up on the spot when this is empty.
    let mut queue: VecDeque<AgentToServer> = VecDeque::from([core.full_state()]);
    loop {
        if queue.is_empty() {
            tokio::select! {
                _ = &mut *stop => break,
                _ = sleep(core.heartbeat()) => queue.push_back(core.heartbeat_message()),
                done = dl.next() => {
                    let out = done.report(core);
                    queue.extend(out.send);
                    if out.upgraded {
                        // Like the Collector restarted on its new version: a new connection
                        // and the full state.
                        transport = http_transport(core, ep);
                        seen = (0, 0);
                        queue.push_back(core.full_state());
                    }
                }
            }
        }
        // Sent from the front of the queue and only removed once answered, so a failed
        // message is retried as is (a repeated sequence number reads as a retry).
        let Some(msg) = queue.front() else { continue };
        // Handled in a block without awaiting (see `Step`): the reply is dropped before the
        // pause below, and only the delay survives.
        let wait = {
            let res = tokio::select! {
                _ = &mut *stop => break,
                r = timeout(EXCHANGE_TIMEOUT, Box::pin(transport.exchange(msg))) => {
                    r.unwrap_or(Err(ClientError::Timeout))
                }
            };
            count_http(core, &transport, &mut seen);
            match res {
                Ok(reply) => {
                    queue.pop_front();
                    backoff.reset();
                    core.connection_succeeded();
                    core.set_connected(true);
                    let mut out = core.on_message(reply);
                    dl.start(core, std::mem::take(&mut out.downloads));
                    if out.halt {
                        break;
                    }
                    if out.restart {
                        // A new client: nothing of the old one's queue, its full state first,
                        // over the offered settings (maybe the other transport).
                        core.set_connected(false);
                        core.client_restarted();
                        if core.next_scheme(ep) != Scheme::Http {
                            return Exit::Transport;
                        }
                        transport = http_transport(core, ep);
                        seen = (0, 0);
                        queue.clear();
                        queue.push_back(core.full_state());
                        continue;
                    }
                    // Sent right away, without waiting for the next poll: e.g. APPLYING, APPLIED.
                    queue.extend(out.send);
                    if out.upgraded && !out.switch {
                        transport = http_transport(core, ep);
                        seen = (0, 0);
                        queue.push_back(core.full_state());
                    }
                    if out.switch {
                        if core.next_scheme(ep) != Scheme::Http {
                            // The certificate comes with the other transport's endpoint.
                            core.set_connected(false);
                            return Exit::Transport;
                        }
                        // An offered client certificate: the next request is made with it.
                        transport = http_transport(core, ep);
                        seen = (0, 0);
                    }
                    (out.reconnect && !at_once).then(|| backoff.next(out.retry_after))
                }
                Err(e) => {
                    core.set_connected(false);
                    if matches!(e, ClientError::Status { .. }) {
                        core.count_upgrade_refusal();
                    }
                    let error = e.to_string();
                    let reverted = core.connection_failed(&error);
                    core.set_error(error);
                    if reverted {
                        // The offered certificate did not work: back to the previous settings.
                        transport = http_transport(core, ep);
                        seen = (0, 0);
                        None
                    } else {
                        Some(backoff.next(e.retry_after()))
                    }
                }
            }
        };
        if let Some(wait) = wait {
            if !pause(wait, stop).await {
                break;
            }
        }
    }
    // Stopping: the spec recommends agent_disconnect in the last HTTP message too.
    let bye = Box::new(core.disconnect_message());
    let _ = timeout(GOODBYE_TIMEOUT, Box::pin(transport.exchange(&bye))).await;
    core.set_connected(false);
    Exit::Stop
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
        let (_tx, mut rx) = oneshot::channel();
        let mut dl = Downloads::default();
        let (mut c, e) = (core(), ep("ws://h/"));
        let ws = run_ws(&mut c, &e, &mut rx, &mut dl);
        assert!(
            std::mem::size_of_val(&ws) < 2048,
            "{}",
            std::mem::size_of_val(&ws)
        );
        drop(ws);
        let e = ep("http://h/");
        let http = run_http(&mut c, &e, &mut rx, &mut dl);
        assert!(
            std::mem::size_of_val(&http) < 3072,
            "{}",
            std::mem::size_of_val(&http)
        );
        drop(http);
        // The task: the core and the endpoint once, the running loop boxed.
        let task = run(core(), e, rx);
        assert!(
            std::mem::size_of_val(&task) < 2048,
            "{}",
            std::mem::size_of_val(&task)
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

    #[test]
    fn opamp_go_backoff_starts_at_half_a_second_doubles_to_a_minute() {
        let mut b = Backoff::new(&AgentOptions {
            reconnect_at_once_after_close: true,
            ..AgentOptions::default()
        });
        let mut base = GO_BACKOFF_START;
        for _ in 0..12 {
            let d = b.next(None);
            assert!(d >= base / 2 && d <= base * 3 / 2, "{d:?} around {base:?}");
            base = (base * 2).min(GO_BACKOFF_CAP);
        }
        assert_eq!(base, GO_BACKOFF_CAP);
        assert!(b.next(Some(Duration::from_secs(120))) >= Duration::from_secs(120));
        b.reset();
        let d = b.next(Some(Duration::from_secs(2)));
        assert_eq!(d, Duration::from_secs(2), "Retry-After wins");
    }
}
