//! The `refused` scenario (issue 18): do agents the server refuses, looping the way clients
//! built on opamp-go do, change the message latency of the admitted ones?
//!
//! The admitted fleet (the scenario's `--agents`, connected as in every scenario) sends one
//! status report per agent every `report_every`, each agent at its own offset, and the round
//! trips are timed, after an unmeasured warm-up of `settle`, in two windows of `duration`: a
//! baseline, then the same with `refused_agents` refused agents started at once. Those are the
//! client library's own [`Agent`] with opamp-go's reconnect policy
//! (`reconnect_at_once_after_close`), each with its own credential, so each has its own hold on
//! the server (per source address and credential):
//!
//! - half present a token already bound to another agent (bound here by a one-shot agent
//!   first): the server can only tell from the first message, answers it with an error, holds
//!   the socket, closes it, and the agent reconnects at once;
//! - a quarter present a revoked token and a quarter a well-formed token the server never
//!   issued: refused at the upgrade with 401, after which the agent backs off (0.5 s doubling
//!   to 60 s, ±50 %, at least the Retry-After).
//!
//! Refusals are counted on the client side; the server's audit rows for the three reasons are
//! read once at the end of the window and again once the server's aggregation windows have
//! closed (the summary rows carry the repeat counts).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ::agent::{Agent, AgentStatus, ClientTls};
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::task::JoinSet;

use crate::agent::{self, unix_ms, AgentSpec, Mode, Params};
use crate::api::Api;
use crate::fleet::Fleet;
use crate::hist::Latency;
use crate::measure::{busy_window, merge_errors, window, Measured};
use crate::options::{source_ip, RunOptions};
use crate::procs::{rss_kib, Role};

/// Lifetime of the tokens the scenario creates.
const TOKEN_TTL_SECS: u64 = 86_400;

/// What a refused agent presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A token already redeemed by another agent: refused after the upgrade.
    BoundToOther,
    /// A revoked token: refused at the upgrade (401).
    Revoked,
    /// A well-formed token the server never issued: refused at the upgrade (401).
    Unknown,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::BoundToOther, Kind::Revoked, Kind::Unknown];

    /// The reason the server audits the refusal under.
    pub fn reason(self) -> &'static str {
        match self {
            Kind::BoundToOther => "already_redeemed",
            Kind::Revoked => "revoked",
            Kind::Unknown => "unknown_token",
        }
    }
}

/// How many of `r` refused agents present what: half a token bound to another agent, the
/// rest split between revoked and unknown tokens.
pub fn split(r: usize) -> [(Kind, usize); 3] {
    let bound = r / 2;
    let revoked = (r - bound) / 2;
    [
        (Kind::BoundToOther, bound),
        (Kind::Revoked, revoked),
        (Kind::Unknown, r - bound - revoked),
    ]
}

/// `a / b`, 0 when `b` is not positive.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// `after` against `before`: `1.23× (+23.0 %)`; `n/a` without a baseline.
pub fn change(after: f64, before: f64) -> String {
    if before <= 0.0 {
        return "n/a".into();
    }
    let r = after / before;
    format!("{r:.2}× ({:+.1} %)", (r - 1.0) * 100.0)
}

/// One timed window of the admitted agents.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WindowReport {
    pub seconds: f64,
    pub messages: u64,
    pub rate_per_sec: f64,
    /// Per status report: sent → reply received.
    pub latency: Latency,
    /// Each measured process over the window.
    pub servers: Vec<ServerFigures>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerFigures {
    pub pid: u32,
    pub role: Role,
    /// CPU over the window, in % of one core.
    pub cpu_percent: f64,
    /// VmRSS at the window's end.
    pub rss_kib: u64,
}

/// The refused agents of one kind over the window, counted on the client side.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KindReport {
    pub kind: Option<Kind>,
    pub reason: String,
    pub agents: usize,
    /// WebSocket handshakes started.
    pub attempts: u64,
    /// Answered with a status other than 101 (401 expected).
    pub refused_at_upgrade: u64,
    /// Upgraded, then answered with an error and closed (every such connection is a
    /// refusal: none of these agents is ever admitted).
    pub refused_after_upgrade: u64,
    /// Neither: connect errors, or still in progress when the window ended.
    pub other: u64,
    /// A refused agent's last error, as the client library reports it.
    pub sample_error: Option<String>,
}

impl KindReport {
    pub fn refusals(&self) -> u64 {
        self.refused_at_upgrade + self.refused_after_upgrade
    }
}

/// Adds up the client-side counters of the agents of `kind`.
pub fn tally(kind: Kind, statuses: &[AgentStatus]) -> KindReport {
    let mut k = KindReport {
        kind: Some(kind),
        reason: kind.reason().into(),
        agents: statuses.len(),
        ..KindReport::default()
    };
    for s in statuses {
        k.attempts += s.connections_attempted;
        k.refused_at_upgrade += s.upgrade_refusals;
        k.refused_after_upgrade += s.connections_established;
    }
    k.other = k.attempts.saturating_sub(k.refusals());
    k.sample_error = statuses.iter().find_map(|s| s.last_error.clone());
    k
}

/// The server's audit rows for one reason since the refused window began.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AuditCount {
    pub reason: String,
    /// Rows written by the end of the window.
    pub rows_at_end: usize,
    /// Sum of their `detail.count`.
    pub count_at_end: u64,
    /// Rows once the aggregation windows closed (or the wait gave up).
    pub rows: usize,
    /// Sum of their `detail.count`: every refusal the server saw.
    pub count: u64,
}

/// Rows and the sum of their `detail.count`.
pub fn audit_sums(rows: &[Value]) -> (usize, u64) {
    let count = rows
        .iter()
        .map(|r| r["detail"]["count"].as_u64().unwrap_or(0))
        .sum();
    (rows.len(), count)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RefusedReport {
    pub refused_agents: usize,
    /// Each admitted agent's report interval.
    pub report_every_ms: u64,
    pub baseline: WindowReport,
    pub with_refused: WindowReport,
    /// With refused / baseline.
    pub p50_ratio: f64,
    pub p99_ratio: f64,
    pub kinds: Vec<KindReport>,
    /// All kinds' refusals over the refused window's length.
    pub refusals_per_sec: f64,
    pub attempts_per_sec: f64,
    pub audit: Vec<AuditCount>,
    /// From the end of the refused window until the audit counts were read the last time.
    pub audit_wait_secs: f64,
}

/// Starts the scenario's client-library agents (refused agents, and the owners that bind
/// tokens) with what every agent of the run shares.
struct Starter<'a> {
    opts: &'a RunOptions,
    params: Params,
    config: String,
    tls: Option<ClientTls>,
}

impl<'a> Starter<'a> {
    fn new(opts: &'a RunOptions) -> anyhow::Result<Self> {
        let params = Params {
            config_bytes: opts.config_bytes,
            heartbeat_secs: opts.heartbeat_secs,
            http_poll_secs: opts.http_poll_secs,
            ca_pem: opts.ca_pem.clone(),
        };
        Ok(Self {
            config: crate::config::effective_config(params.config_bytes),
            tls: params
                .ca_pem
                .as_deref()
                .map(crate::tls::client_tls)
                .transpose()?,
            params,
            opts,
        })
    }

    /// Agent `i` with `token`, over WebSocket from the address the fleet's agent `i` uses;
    /// `opamp_go`: reconnecting as opamp-go does.
    fn start(&self, i: usize, token: &str, opamp_go: bool) -> Agent {
        let opts = self.opts;
        let spec = AgentSpec {
            index: i,
            endpoint: opts.targets[i % opts.targets.len()].clone(),
            token: Some(token.to_string()),
            source_ip: source_ip(opts, i),
            fail_configs: false,
        };
        let mut o = agent::options(&spec, &self.params, &self.config);
        o.tls = self.tls.clone();
        o.reconnect_at_once_after_close = opamp_go;
        Agent::start(o)
    }
}

/// The refused agents' credentials, set up before the baseline so that its cost is in
/// neither window.
async fn credentials(
    opts: &RunOptions,
    api: &Api,
    starter: &Starter<'_>,
) -> anyhow::Result<Vec<(Kind, String)>> {
    let mut out = Vec::with_capacity(opts.refused_agents);
    for (kind, n) in split(opts.refused_agents) {
        if n == 0 {
            continue;
        }
        let tokens = match kind {
            Kind::BoundToOther => {
                let tokens = api
                    .bootstrap_tokens_named("loadtest-refused-bound", n, TOKEN_TTL_SECS)
                    .await?;
                bind(starter, &tokens).await?;
                tokens
            }
            Kind::Revoked => {
                let name = format!("loadtest-refused-revoked-{}", uuid::Uuid::new_v4());
                let tokens = api.bootstrap_tokens_named(&name, n, TOKEN_TTL_SECS).await?;
                let ids = api.token_ids_named(&name).await?;
                anyhow::ensure!(ids.len() == n, "{} of {n} tokens listed", ids.len());
                for id in ids {
                    api.revoke_token(&id).await?;
                }
                tokens
            }
            Kind::Unknown => (0..n)
                .map(|_| shared::token::new_bootstrap_token())
                .collect(),
        };
        out.extend(tokens.into_iter().map(|t| (kind, t)));
    }
    Ok(out)
}

/// Stops every agent at once (each says goodbye if connected).
async fn stop_all(agents: Vec<Agent>) {
    let mut set = JoinSet::new();
    for a in agents {
        set.spawn(a.stop());
    }
    while set.join_next().await.is_some() {}
}

/// Binds each token to an agent of its own: one connect and first message each.
async fn bind(starter: &Starter<'_>, tokens: &[String]) -> anyhow::Result<()> {
    let owners: Vec<Agent> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| starter.start(i, t, false))
        .collect();
    let mut unbound = 0;
    for a in &owners {
        let mut st = a.status();
        let ok = tokio::time::timeout(starter.opts.timeout, st.wait_for(|s| s.replies > 0))
            .await
            .is_ok_and(|r| r.is_ok_and(|s| s.last_error.is_none()));
        unbound += usize::from(!ok);
    }
    stop_all(owners).await;
    anyhow::ensure!(
        unbound == 0,
        "{unbound} of {} tokens could not be bound to an agent",
        tokens.len()
    );
    Ok(())
}

fn paced(opts: &RunOptions, until_ms: u64) -> Mode {
    Mode::Paced {
        until_ms,
        every_ms: (opts.report_every.as_millis() as u64).max(1),
    }
}

/// The admitted agents report at their pace for `--settle`, unmeasured: the first reports
/// after connecting (and after the credentials' setup) are not the steady state.
async fn warm_up(fleet: &mut Fleet, opts: &RunOptions) -> anyhow::Result<()> {
    fleet.set_mode(paced(opts, unix_ms() + opts.settle.as_millis() as u64))?;
    window(fleet, opts.settle, opts.progress, "warm-up").await;
    fleet.set_mode(Mode::Idle)
}

/// A paced window of the admitted fleet, with the server's CPU and RSS.
async fn measure(
    fleet: &mut Fleet,
    opts: &RunOptions,
    measured: &[Measured],
    what: &str,
) -> anyhow::Result<(WindowReport, BTreeMap<String, u64>)> {
    let (secs, s, cpu) = busy_window(fleet, opts, measured, what, |until_ms| {
        paced(opts, until_ms)
    })
    .await?;
    let servers = cpu
        .iter()
        .map(|c| {
            Ok(ServerFigures {
                pid: c.pid,
                role: c.role,
                cpu_percent: c.cpu_percent,
                rss_kib: rss_kib(c.pid)?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let w = WindowReport {
        seconds: secs,
        messages: s.messages,
        rate_per_sec: s.messages as f64 / secs,
        latency: s.steady_latency.summary(),
        servers,
    };
    Ok((w, s.errors))
}

/// The audit counts per reason since `since_ms`.
async fn audit_now(api: &Api, since_ms: u64) -> anyhow::Result<Vec<(String, usize, u64)>> {
    let mut out = Vec::new();
    for kind in Kind::ALL {
        let rows = api.audit(kind.reason(), since_ms).await?;
        let (n, count) = audit_sums(&rows);
        out.push((kind.reason().to_string(), n, count));
    }
    Ok(out)
}

/// The scenario's phase: credentials, the baseline window, the window with refused agents,
/// then the audit. Returns the report and the admitted agents' errors.
pub(crate) async fn phase(
    opts: &RunOptions,
    fleet: &mut Fleet,
    measured: &[Measured],
) -> anyhow::Result<(RefusedReport, BTreeMap<String, u64>)> {
    let api = opts
        .api
        .as_ref()
        .context("the refused scenario needs Ampora's API")?;
    let starter = Starter::new(opts)?;
    let population = credentials(opts, api, &starter).await?;
    let mut errors = BTreeMap::new();

    warm_up(fleet, opts).await?;
    let (baseline, e) = measure(fleet, opts, measured, "baseline").await?;
    merge_errors(&mut errors, e);

    let since_ms = unix_ms();
    let agents: Vec<(Kind, Agent)> = population
        .iter()
        .enumerate()
        .map(|(i, (kind, token))| (*kind, starter.start(i, token, true)))
        .collect();
    let (with_refused, e) = measure(fleet, opts, measured, "refused").await?;
    merge_errors(&mut errors, e);
    let statuses: Vec<(Kind, AgentStatus)> = agents
        .iter()
        .map(|(k, a)| (*k, a.status().borrow().clone()))
        .collect();
    let at_end = audit_now(api, since_ms).await?;
    let ended = Instant::now();
    stop_all(agents.into_iter().map(|(_, a)| a).collect()).await;

    let kinds: Vec<KindReport> = Kind::ALL
        .iter()
        .map(|kind| {
            let of_kind: Vec<AgentStatus> = statuses
                .iter()
                .filter(|(k, _)| k == kind)
                .map(|(_, s)| s.clone())
                .collect();
            tally(*kind, &of_kind)
        })
        .filter(|k| k.agents > 0)
        .collect();

    // Repeats reach the audit log as summary rows when the server's aggregation window (per
    // source and reason, 60 s by default) closes: wait for them, within the timeout.
    let mut last = at_end.clone();
    let complete = |now: &[(String, usize, u64)]| {
        kinds.iter().all(|k| {
            now.iter()
                .any(|(r, _, count)| *r == k.reason && *count >= k.refusals())
        })
    };
    while !complete(&last) && ended.elapsed() < opts.timeout {
        fleet.pump_for(Duration::from_secs(2)).await;
        last = audit_now(api, since_ms).await?;
    }
    let audit = at_end
        .iter()
        .zip(&last)
        .map(
            |((reason, rows_at_end, count_at_end), (_, rows, count))| AuditCount {
                reason: reason.clone(),
                rows_at_end: *rows_at_end,
                count_at_end: *count_at_end,
                rows: *rows,
                count: *count,
            },
        )
        .collect();

    let refusals: u64 = kinds.iter().map(KindReport::refusals).sum();
    let attempts: u64 = kinds.iter().map(|k| k.attempts).sum();
    let report = RefusedReport {
        refused_agents: opts.refused_agents,
        report_every_ms: opts.report_every.as_millis() as u64,
        p50_ratio: ratio(with_refused.latency.p50_ms, baseline.latency.p50_ms),
        p99_ratio: ratio(with_refused.latency.p99_ms, baseline.latency.p99_ms),
        refusals_per_sec: ratio(refusals as f64, with_refused.seconds),
        attempts_per_sec: ratio(attempts as f64, with_refused.seconds),
        baseline,
        with_refused,
        kinds,
        audit,
        audit_wait_secs: ended.elapsed().as_secs_f64(),
    };
    Ok((report, errors))
}

fn window_line(name: &str, w: &WindowReport) -> String {
    let l = &w.latency;
    let mut s = format!(
        "  {name}: {} reports in {:.1} s ({:.0}/s); latency p50 {:.2} ms p90 {:.2} p99 {:.2} max {:.1}\n",
        w.messages, w.seconds, w.rate_per_sec, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
    );
    for p in &w.servers {
        s += &format!(
            "    {:?} pid {}: CPU {:.1} % of a core, RSS {} KiB at the end\n",
            p.role, p.pid, p.cpu_percent, p.rss_kib
        );
    }
    s
}

/// The human summary of the phase.
pub fn summary(r: &RefusedReport) -> String {
    let mut s = format!(
        "refused: {} refused agents looping as opamp-go clients; admitted agents report every {} ms\n",
        r.refused_agents, r.report_every_ms
    );
    s += &window_line("baseline", &r.baseline);
    s += &window_line("with refused agents", &r.with_refused);
    s += &format!(
        "  admitted latency with / without: p50 {}, p99 {}\n",
        change(r.with_refused.latency.p50_ms, r.baseline.latency.p50_ms),
        change(r.with_refused.latency.p99_ms, r.baseline.latency.p99_ms)
    );
    s += &format!(
        "  refusals seen by the refused agents: {:.1}/s ({:.1} attempts/s) over {:.1} s\n",
        r.refusals_per_sec, r.attempts_per_sec, r.with_refused.seconds
    );
    for k in &r.kinds {
        s += &format!(
            "    {} × {}: {} attempts, {} refused at the upgrade, {} after it, {} other; last error {:?}\n",
            k.agents,
            k.reason,
            k.attempts,
            k.refused_at_upgrade,
            k.refused_after_upgrade,
            k.other,
            k.sample_error.as_deref().unwrap_or("none")
        );
    }
    for a in &r.audit {
        s += &format!(
            "  audit {}: {} rows (count {}) at the window's end; {} rows (count {}) after {:.0} s\n",
            a.reason, a.rows_at_end, a.count_at_end, a.rows, a.count, r.audit_wait_secs
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_bound_the_rest_split_and_nobody_lost() {
        assert_eq!(
            split(1000),
            [
                (Kind::BoundToOther, 500),
                (Kind::Revoked, 250),
                (Kind::Unknown, 250)
            ]
        );
        for r in [0, 1, 2, 3, 7, 999] {
            assert_eq!(split(r).iter().map(|(_, n)| n).sum::<usize>(), r, "{r}");
        }
    }

    #[test]
    fn ratio_and_change() {
        assert_eq!(ratio(3.0, 2.0), 1.5);
        assert_eq!(ratio(3.0, 0.0), 0.0);
        assert_eq!(change(1.5, 1.0), "1.50× (+50.0 %)");
        assert_eq!(change(0.9, 1.0), "0.90× (-10.0 %)");
        assert_eq!(change(1.0, 0.0), "n/a");
    }

    #[test]
    fn tally_adds_up_the_client_counters() {
        let s = |attempted, established, refused| AgentStatus {
            connections_attempted: attempted,
            connections_established: established,
            upgrade_refusals: refused,
            ..AgentStatus::default()
        };
        let mut last = s(5, 0, 5);
        last.last_error = Some("401: unknown token".into());
        let k = tally(Kind::Unknown, &[s(4, 0, 3), last]);
        assert_eq!(
            (k.agents, k.attempts, k.refused_at_upgrade, k.other),
            (2, 9, 8, 1)
        );
        assert_eq!(k.refusals(), 8);
        assert_eq!(k.reason, "unknown_token");
        assert_eq!(k.sample_error.as_deref(), Some("401: unknown token"));
        let b = tally(Kind::BoundToOther, &[s(4, 4, 0)]);
        assert_eq!((b.refused_after_upgrade, b.refusals(), b.other), (4, 4, 0));
    }

    #[test]
    fn audit_sums_add_the_counts() {
        let rows = vec![
            serde_json::json!({ "detail": { "count": 1 } }),
            serde_json::json!({ "detail": { "count": 41, "repeats": true } }),
            serde_json::json!({ "detail": {} }),
        ];
        assert_eq!(audit_sums(&rows), (3, 42));
        assert_eq!(audit_sums(&[]), (0, 0));
    }
}
