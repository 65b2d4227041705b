//! The scenarios: connect, then optionally hold / rollout / steady / churn on the same fleet,
//! and the report.
//!
//! What a run is asked to do lives in `options` and the measuring tools in `measure`, below
//! this module and the `refused` phase alike: this module uses `refused`, never the reverse.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use crate::agent::{unix_ms, unix_us, AgentSpec, Mode, Params};
use crate::fleet::Fleet;
use crate::hist::{percentile, summarize, Latency};
use crate::measure::{bar, busy_window, cpu_of, measured, merge_errors, window, Measured};
use crate::options::source_ip;
use crate::procs::{rss_kib, CpuSample, ProcSample, Role};
use crate::refused::RefusedReport;
use crate::report::Stats;
use crate::staged::StagedReport;

pub use crate::options::{Phase, RunOptions};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectReport {
    pub connected: usize,
    /// From the start signal until the last agent's first reply.
    pub seconds: f64,
    pub rate_per_sec: f64,
    /// Per agent: start signal → first reply.
    pub latency: Latency,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HoldReport {
    /// Every measured process (servers, gateways, coordinators).
    pub servers: Vec<ProcSample>,
    /// RSS growth of all measured processes together / agents.
    pub kib_per_agent: f64,
    /// Sum over the measured processes, in % of one core.
    pub idle_cpu_percent: f64,
    /// Cluster: mean over the gateways of (gateway's growth / agents on that gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_kib_per_agent: Option<f64>,
    /// Cluster: sum over the gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_idle_cpu_percent: Option<f64>,
    /// Cluster: the coordinators' growth together / agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator_kib_per_agent: Option<f64>,
    /// Cluster: sum over the coordinators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator_idle_cpu_percent: Option<f64>,
    pub window_secs: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RolloutReport {
    /// Duration of the assignment request itself.
    pub request_ms: f64,
    pub matched_agents: u64,
    /// Agents that reported APPLIED or FAILED.
    pub reported: usize,
    pub applied: usize,
    pub failed: usize,
    /// From the assignment request to the agents' APPLIED/FAILED reports.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p100_ms: f64,
    /// What the API shows once the agents reported.
    pub api_applied: usize,
    pub api_failed: usize,
    /// From the assignment request until the API showed every agent's outcome.
    pub api_confirmed_ms: f64,
    /// Console Fleet pages open meanwhile (`--console-watchers`) and their rows fetches.
    #[serde(default)]
    pub console_watchers: usize,
    #[serde(default)]
    pub console_refreshes: u64,
    /// `--stages`: the staged rollout's figures. The fields above then count from the
    /// rollout's creation request; `api_*` are the gates' counts and `api_confirmed_ms` when
    /// the harness saw it succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<StagedReport>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SteadyReport {
    pub seconds: f64,
    pub messages: u64,
    pub rate_per_sec: f64,
    /// Per exchange: status report sent → reply received.
    pub latency: Latency,
    /// CPU of each measured process over the window.
    #[serde(default)]
    pub cpu: Vec<CpuSample>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChurnReport {
    pub seconds: f64,
    pub connects: u64,
    pub connects_per_sec: f64,
    pub errors: BTreeMap<String, u64>,
    /// CPU of each measured process over the window.
    #[serde(default)]
    pub cpu: Vec<CpuSample>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub targets: Vec<String>,
    pub agents: usize,
    pub http_agents: usize,
    pub failing_agents: usize,
    pub config_bytes: usize,
    pub worker_processes: usize,
    /// Agents started per second; 0: all at once.
    #[serde(default)]
    pub connect_rate: f64,
    pub started_unix_ms: u64,
    /// Every phase reached its goal (all connected, rollout 100 %).
    pub complete: bool,
    pub connect: ConnectReport,
    pub hold: Option<HoldReport>,
    pub rollout: Option<RolloutReport>,
    pub steady: Option<SteadyReport>,
    pub churn: Option<ChurnReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<RefusedReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak: Option<crate::soak::SoakReport>,
    /// Every error of the run, by kind.
    pub errors: BTreeMap<String, u64>,
}

/// Agent `i` of `n` gets the trait when the running share crosses an integer: an even spread.
fn picked(i: usize, share: f64) -> bool {
    let s = share.clamp(0.0, 1.0);
    ((i + 1) as f64 * s).floor() > (i as f64 * s).floor()
}

/// The plain-HTTP OpAMP URL of a WebSocket one (`ws` → `http`, `wss` → `https`).
fn http_url(ws: &str) -> String {
    if let Some(rest) = ws.strip_prefix("ws://") {
        format!("http://{rest}")
    } else if let Some(rest) = ws.strip_prefix("wss://") {
        format!("https://{rest}")
    } else {
        ws.to_string()
    }
}

/// Checks that a `--no-auth` target is the baseline server, never Ampora; a `wss://` one
/// through a client trusting `ca_pem`.
async fn ensure_baseline(target: &str, ca_pem: Option<&str>) -> anyhow::Result<()> {
    let url = http_url(target);
    let body = match (url.starts_with("https://"), ca_pem) {
        (true, Some(pem)) => crate::baseline::get_https(&url, pem).await,
        (true, None) => Err(anyhow::anyhow!("no CA to trust")),
        (false, _) => match reqwest::get(&url).await {
            Ok(resp) => resp.text().await.map_err(Into::into),
            Err(e) => Err(e.into()),
        },
    }
    .with_context(|| format!("GET {url}"))?;
    if body.trim() != crate::baseline::BANNER {
        bail!("--no-auth is only for the baseline server; {target} is not one");
    }
    Ok(())
}

/// Runs one scenario; the fleet is stopped and every worker gone when it returns.
pub async fn run(opts: &RunOptions) -> anyhow::Result<Report> {
    anyhow::ensure!(!opts.targets.is_empty(), "no --target");
    anyhow::ensure!(opts.agents > 0, "--agents must be positive");
    anyhow::ensure!(
        opts.gateway_pids.is_empty() || opts.gateway_pids.len() == opts.targets.len(),
        "one gateway pid per target is needed ({} pids, {} targets)",
        opts.gateway_pids.len(),
        opts.targets.len()
    );
    let tls_targets = opts.targets.iter().any(|t| t.starts_with("wss://"));
    match &opts.ca_pem {
        None => anyhow::ensure!(
            !tls_targets,
            "wss:// targets need the CA to trust (--ca-file, or --tls with --spawn-server)"
        ),
        // Fails here, once, rather than in every agent of every worker.
        Some(pem) => {
            crate::tls::client_tls(pem)?;
        }
    }
    let n = opts.agents;
    let tokens: Vec<Option<String>> = if opts.no_auth {
        for t in &opts.targets {
            ensure_baseline(t, opts.ca_pem.as_deref()).await?;
        }
        vec![None; n]
    } else {
        let api = opts
            .api
            .as_ref()
            .context("the API (--api and --api-token, or --data-dir) is needed for tokens")?;
        api.bootstrap_tokens(n, 86_400)
            .await?
            .into_iter()
            .map(Some)
            .collect()
    };
    let specs: Vec<AgentSpec> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, token)| {
            let target = &opts.targets[i % opts.targets.len()];
            let http = picked(i, opts.http_share);
            AgentSpec {
                index: i,
                endpoint: if http {
                    http_url(target)
                } else {
                    target.clone()
                },
                token,
                source_ip: source_ip(opts, i),
                fail_configs: picked(i, opts.fail_share),
            }
        })
        .collect();
    let params = Params {
        config_bytes: opts.config_bytes,
        heartbeat_secs: opts.heartbeat_secs,
        http_poll_secs: opts.http_poll_secs,
        ca_pem: opts.ca_pem.clone(),
    };
    let processes = opts.workers.unwrap_or(if n > opts.per_worker {
        n.div_ceil(opts.per_worker)
    } else {
        0
    });

    let mut fleet = Fleet::launch(n, processes, opts.worker_exe.clone()).await?;
    let mut report = Report {
        scenario: opts.scenario.clone(),
        targets: opts.targets.clone(),
        agents: n,
        http_agents: specs
            .iter()
            .filter(|s| s.endpoint.starts_with("http"))
            .count(),
        failing_agents: specs.iter().filter(|s| s.fail_configs).count(),
        config_bytes: opts.config_bytes,
        worker_processes: processes,
        connect_rate: opts.connect_rate,
        started_unix_ms: unix_ms(),
        ..Report::default()
    };
    let result = phases(opts, &mut fleet, &specs, &params, &mut report).await;
    let mut stats = fleet.stop().await;
    stats.merge(&Stats {
        errors: std::mem::take(&mut report.errors),
        ..Stats::default()
    });
    report.errors = stats.errors;
    result.map(|complete| {
        report.complete = complete;
        report
    })
}

/// The hold figures from RSS before connecting, RSS held, and CPU over the window.
pub(crate) fn hold_report(
    measured: &[Measured],
    before: &[u64],
    held: &[u64],
    cpu: &[f64],
    secs: f64,
    n: usize,
) -> HoldReport {
    let servers: Vec<ProcSample> = measured
        .iter()
        .enumerate()
        .map(|(i, m)| ProcSample {
            pid: m.pid,
            role: m.role,
            agents: m.agents,
            rss_before_kib: before[i],
            rss_held_kib: held[i],
            kib_per_agent: (held[i] as f64 - before[i] as f64) / m.agents.max(1) as f64,
            idle_cpu_percent: 100.0 * cpu[i] / secs,
        })
        .collect();
    let growth = |s: &&ProcSample| s.rss_held_kib as f64 - s.rss_before_kib as f64;
    let of = |role: Role| servers.iter().filter(move |s| s.role == role);
    let gateways = of(Role::Gateway).count();
    let coordinators = of(Role::Coordinator).count();
    HoldReport {
        kib_per_agent: servers.iter().map(|s| growth(&s)).sum::<f64>() / n.max(1) as f64,
        idle_cpu_percent: servers.iter().map(|s| s.idle_cpu_percent).sum(),
        gateway_kib_per_agent: (gateways > 0)
            .then(|| of(Role::Gateway).map(|s| s.kib_per_agent).sum::<f64>() / gateways as f64),
        gateway_idle_cpu_percent: (gateways > 0)
            .then(|| of(Role::Gateway).map(|s| s.idle_cpu_percent).sum()),
        coordinator_kib_per_agent: (coordinators > 0)
            .then(|| of(Role::Coordinator).map(|s| growth(&s)).sum::<f64>() / n.max(1) as f64),
        coordinator_idle_cpu_percent: (coordinators > 0)
            .then(|| of(Role::Coordinator).map(|s| s.idle_cpu_percent).sum()),
        servers,
        window_secs: secs,
    }
}

/// Connect, then the phases; true if every goal was reached.
async fn phases(
    opts: &RunOptions,
    fleet: &mut Fleet,
    specs: &[AgentSpec],
    params: &Params,
    report: &mut Report,
) -> anyhow::Result<bool> {
    let n = specs.len();
    let mut measured = measured(opts, specs);
    let rss_before: Vec<u64> = measured
        .iter()
        .map(|m| rss_kib(m.pid))
        .collect::<anyhow::Result<_>>()?;

    // connect: every agent at once (or ramped at connect_rate); the clock runs until the last
    // first reply.
    let b = bar(opts.progress, n as u64, "connect");
    let t0 = unix_us();
    if opts.connect_rate > 0.0 {
        let step = Duration::from_millis(100);
        let steps = (n as f64 / opts.connect_rate / step.as_secs_f64()).ceil() as usize;
        let start = Instant::now();
        for k in 0..steps.max(1) {
            fleet.start_step(specs, params, k, steps)?;
            if let Some(b) = &b {
                b.set_position(fleet.connected as u64);
            }
            let next = start + step * (k as u32 + 1);
            fleet
                .pump_for(next.saturating_duration_since(Instant::now()))
                .await;
        }
    } else {
        fleet.start(specs, params)?;
    }
    let mut complete = fleet
        .pump_until(
            opts.timeout,
            b.as_ref()
                .map(|b| (b, (|f: &Fleet| f.connected as u64) as fn(&Fleet) -> u64)),
            |f| f.connected == n,
        )
        .await;
    if let Some(b) = b {
        b.finish_and_clear();
    }
    let times: Vec<f64> = fleet
        .connected_at
        .iter()
        .flatten()
        .map(|&t| t.saturating_sub(t0) as f64 / 1000.0)
        .collect();
    let seconds = times.iter().copied().fold(0.0, f64::max) / 1000.0;
    report.connect = ConnectReport {
        connected: fleet.connected,
        seconds,
        rate_per_sec: if seconds > 0.0 {
            fleet.connected as f64 / seconds
        } else {
            0.0
        },
        latency: summarize(times),
    };
    let mut errors = fleet.collect().await?.errors;

    for phase in &opts.phases {
        match phase {
            Phase::Hold => {
                window(fleet, opts.settle, opts.progress, "settle").await;
                let held: Vec<u64> = measured
                    .iter()
                    .map(|m| rss_kib(m.pid))
                    .collect::<anyhow::Result<_>>()?;
                let cpu0 = cpu_of(&measured)?;
                let w = Instant::now();
                window(fleet, opts.duration, opts.progress, "hold").await;
                let secs = w.elapsed().as_secs_f64();
                let cpu: Vec<f64> = cpu_of(&measured)?
                    .iter()
                    .zip(&cpu0)
                    .map(|(c1, c0)| c1 - c0)
                    .collect();
                report.hold = Some(hold_report(&measured, &rss_before, &held, &cpu, secs, n));
            }
            Phase::Rollout => {
                let (r, ok) = match &opts.stages {
                    Some(stages) => staged_rollout(opts, fleet, stages, &mut errors).await?,
                    None => rollout(opts, fleet, n).await?,
                };
                complete &= ok;
                report.rollout = Some(r);
            }
            Phase::Steady => {
                let (secs, s, cpu) = busy_window(fleet, opts, &measured, "steady", |until_ms| {
                    Mode::Steady { until_ms }
                })
                .await?;
                report.steady = Some(SteadyReport {
                    seconds: secs,
                    messages: s.messages,
                    rate_per_sec: s.messages as f64 / secs,
                    latency: s.steady_latency.summary(),
                    cpu,
                });
                merge_errors(&mut errors, s.errors);
            }
            Phase::Refused => {
                let (r, errs) = crate::refused::phase(opts, fleet, &measured).await?;
                report.refused = Some(r);
                merge_errors(&mut errors, errs);
            }
            Phase::Soak => {
                let plan = opts.soak_plan.as_ref().context("soak needs its plan")?;
                let api = opts.api.as_ref().context("soak needs the API")?;
                let (r, ok) =
                    crate::soak::phase(plan, opts, api, fleet, &mut measured, n, &mut errors)
                        .await?;
                complete &= ok;
                report.soak = Some(r);
            }
            Phase::Churn => {
                let (secs, s, cpu) = busy_window(fleet, opts, &measured, "churn", |until_ms| {
                    Mode::Churn { until_ms }
                })
                .await?;
                report.churn = Some(ChurnReport {
                    seconds: secs,
                    connects: s.connects,
                    connects_per_sec: s.connects as f64 / secs,
                    errors: s.errors.clone(),
                    cpu,
                });
                merge_errors(&mut errors, s.errors);
            }
        }
    }
    report.errors = errors;
    Ok(complete)
}

/// One config to all through the API; agent-side times to APPLIED, then the API's view.
async fn rollout(
    opts: &RunOptions,
    fleet: &mut Fleet,
    n: usize,
) -> anyhow::Result<(RolloutReport, bool)> {
    let api = opts.api.as_ref().context("rollout needs the API")?;
    let body = crate::config::effective_config_with(
        opts.config_bytes,
        &format!("rollout {}", uuid::Uuid::new_v4()),
    );
    let config_id = api.create_config("loadtest-rollout", &body).await?;
    fleet.reset_applied();
    let watchers = match opts.console_watchers {
        0 => None,
        w => Some(crate::console::Watchers::start(api.base(), api.token(), w).await?),
    };
    let b = bar(opts.progress, n as u64, "rollout");
    let t0 = unix_us();
    let started = Instant::now();
    let matched = api.assign_all(config_id).await?;
    let request_ms = started.elapsed().as_secs_f64() * 1000.0;
    let all = fleet
        .pump_until(
            opts.timeout,
            b.as_ref()
                .map(|b| (b, (|f: &Fleet| f.applied as u64) as fn(&Fleet) -> u64)),
            |f| f.applied == n,
        )
        .await;
    if let Some(b) = b {
        b.finish_and_clear();
    }
    let mut times: Vec<f64> = fleet
        .applied_at
        .iter()
        .flatten()
        .map(|&(t, _)| t.saturating_sub(t0) as f64 / 1000.0)
        .collect();
    times.sort_by(f64::total_cmp);
    let failed = fleet.applied_at.iter().flatten().filter(|a| a.1).count();
    let applied = fleet.applied - failed;
    // The server's view: every outcome recorded (bounded wait; it may lag the agents).
    let mut api_applied = 0;
    let mut api_failed = 0;
    let deadline = Instant::now() + opts.timeout;
    while Instant::now() < deadline {
        api_applied = api.count_in_state("applied").await?;
        api_failed = api.count_in_state("failed").await?;
        if api_applied >= applied && api_failed >= failed {
            break;
        }
        fleet.pump_for(Duration::from_millis(50)).await;
    }
    let confirmed = started.elapsed().as_secs_f64() * 1000.0;
    // Open until the API agrees, as an operator watching the rollout would keep them.
    let console_refreshes = watchers.map_or(0, crate::console::Watchers::stop);
    let ok = all && api_applied >= applied && api_failed >= failed;
    Ok((
        RolloutReport {
            request_ms,
            matched_agents: matched,
            reported: fleet.applied,
            applied,
            failed,
            p50_ms: percentile(&times, 0.5),
            p90_ms: percentile(&times, 0.9),
            p99_ms: percentile(&times, 0.99),
            p100_ms: times.last().copied().unwrap_or(0.0),
            api_applied,
            api_failed,
            api_confirmed_ms: confirmed,
            console_watchers: opts.console_watchers,
            console_refreshes,
            staged: None,
        },
        ok,
    ))
}

/// `--stages`: a staged rollout to the run's agents (see `staged`), in the rollout report.
async fn staged_rollout(
    opts: &RunOptions,
    fleet: &mut Fleet,
    stages: &str,
    errors: &mut BTreeMap<String, u64>,
) -> anyhow::Result<(RolloutReport, bool)> {
    let o = crate::staged::phase(opts, fleet, stages).await?;
    merge_errors(errors, o.errors);
    let t = &o.since_request_ms;
    let r = RolloutReport {
        request_ms: o.request_ms,
        matched_agents: o.planned,
        reported: o.reported,
        applied: o.reported - o.failed,
        failed: o.failed,
        p50_ms: percentile(t, 0.5),
        p90_ms: percentile(t, 0.9),
        p99_ms: percentile(t, 0.99),
        p100_ms: t.last().copied().unwrap_or(0.0),
        api_applied: o.gate_applied,
        api_failed: o.gate_failed,
        api_confirmed_ms: o.staged.seen_done_ms,
        staged: Some(o.staged),
        ..RolloutReport::default()
    };
    Ok((r, o.ok))
}

/// `  CPU: Gateway 1234 45.0 %, …` (empty when nothing was measured).
fn cpu_line(cpu: &[CpuSample]) -> String {
    if cpu.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = cpu
        .iter()
        .map(|c| format!("{:?} {} {:.1} %", c.role, c.pid, c.cpu_percent))
        .collect();
    format!("  CPU (% of a core): {}\n", parts.join(", "))
}

/// The human summary.
pub fn summary(r: &Report) -> String {
    let mut s = format!(
        "scenario {} — {} agents ({} http, {} failing), {} worker process(es), target {}\n",
        r.scenario,
        r.agents,
        r.http_agents,
        r.failing_agents,
        r.worker_processes.max(1),
        r.targets.join(", ")
    );
    if r.connect_rate > 0.0 {
        s += &format!("connect ramp: {:.0} agents/s\n", r.connect_rate);
    }
    let c = &r.connect;
    s += &format!(
        "connect: {}/{} in {:.3} s ({:.0}/s); per agent p50 {:.1} ms p90 {:.1} p99 {:.1} max {:.1}\n",
        c.connected, r.agents, c.seconds, c.rate_per_sec, c.latency.p50_ms, c.latency.p90_ms,
        c.latency.p99_ms, c.latency.max_ms
    );
    if let Some(h) = &r.hold {
        s += &format!(
            "hold: {:.2} KiB RSS per agent, idle CPU {:.1} % of a core over {:.1} s\n",
            h.kib_per_agent, h.idle_cpu_percent, h.window_secs
        );
        if let (Some(kib), Some(cpu)) = (h.gateway_kib_per_agent, h.gateway_idle_cpu_percent) {
            s += &format!(
                "  gateways: {kib:.2} KiB RSS per agent on each (mean), idle CPU {cpu:.1} % together\n"
            );
        }
        if let (Some(kib), Some(cpu)) =
            (h.coordinator_kib_per_agent, h.coordinator_idle_cpu_percent)
        {
            s += &format!(
                "  coordinators: {kib:.2} KiB RSS per agent together, idle CPU {cpu:.1} % together\n"
            );
        }
        for p in &h.servers {
            s += &format!(
                "  {:?} pid {}: {} KiB → {} KiB ({:.2} KiB/agent over {} agents), CPU {:.1} %\n",
                p.role,
                p.pid,
                p.rss_before_kib,
                p.rss_held_kib,
                p.kib_per_agent,
                p.agents,
                p.idle_cpu_percent
            );
        }
    }
    if let Some((ro, st)) = r
        .rollout
        .as_ref()
        .and_then(|ro| ro.staged.as_ref().map(|st| (ro, st)))
    {
        s += &format!(
            "rollout: create request {:.1} ms; APPLIED {} FAILED {}; after the request p50 {:.1} ms p90 {:.1} p99 {:.1} p100 {:.1}; gates counted {} applied {} failed\n",
            ro.request_ms, ro.applied, ro.failed, ro.p50_ms, ro.p90_ms, ro.p99_ms, ro.p100_ms,
            ro.api_applied, ro.api_failed
        );
        s += &crate::staged::summary(st);
    } else if let Some(ro) = &r.rollout {
        s += &format!(
            "rollout: request {:.1} ms, {} matched; APPLIED {} FAILED {}; p50 {:.1} ms p90 {:.1} p99 {:.1} p100 {:.1}; API shows {} applied {} failed after {:.0} ms\n",
            ro.request_ms, ro.matched_agents, ro.applied, ro.failed, ro.p50_ms, ro.p90_ms,
            ro.p99_ms, ro.p100_ms, ro.api_applied, ro.api_failed, ro.api_confirmed_ms
        );
        if ro.console_watchers > 0 {
            s += &format!(
                "console: {} Fleet pages open during the rollout fetched their rows {} times\n",
                ro.console_watchers, ro.console_refreshes
            );
        }
    }
    if let Some(st) = &r.steady {
        s += &format!(
            "steady: {} messages in {:.1} s = {:.0} msg/s; latency p50 {:.2} ms p90 {:.2} p99 {:.2} max {:.1}\n",
            st.messages, st.seconds, st.rate_per_sec, st.latency.p50_ms, st.latency.p90_ms,
            st.latency.p99_ms, st.latency.max_ms
        );
        s += &cpu_line(&st.cpu);
    }
    if let Some(ch) = &r.churn {
        s += &format!(
            "churn: {} connects in {:.1} s = {:.0}/s; errors {:?}\n",
            ch.connects, ch.seconds, ch.connects_per_sec, ch.errors
        );
        s += &cpu_line(&ch.cpu);
    }
    if let Some(rf) = &r.refused {
        s += &crate::refused::summary(rf);
    }
    if let Some(soak) = &r.soak {
        s += &crate::soak::summary(soak);
    }
    s += &format!("errors: {:?}; complete: {}\n", r.errors, r.complete);
    s
}

/// How the agents of both sides of a comparison connected: `tls`, `plaintext` or `mixed`.
fn transport(a: &Report, b: &Report) -> &'static str {
    let all = |r: &Report, scheme: &str| {
        !r.targets.is_empty() && r.targets.iter().all(|t| t.starts_with(scheme))
    };
    if all(a, "wss://") && all(b, "wss://") {
        "tls"
    } else if all(a, "ws://") && all(b, "ws://") {
        "plaintext"
    } else {
        "mixed"
    }
}

/// Ampora against the baseline, measured in the same run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Comparison {
    pub ampora: Report,
    pub baseline: Report,
    /// `tls` when both sides' agents used `wss://`, `plaintext` when both used `ws://`, else
    /// `mixed` (the ratios then compare unlike things).
    #[serde(default)]
    pub transport: String,
    /// Ampora / baseline.
    pub kib_per_agent_ratio: f64,
    pub connect_seconds_ratio: f64,
    pub steady_rate_ratio: f64,
}

impl Comparison {
    pub fn new(ampora: Report, baseline: Report) -> Self {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let kib = |r: &Report| r.hold.as_ref().map_or(0.0, |h| h.kib_per_agent);
        let rate = |r: &Report| r.steady.as_ref().map_or(0.0, |s| s.rate_per_sec);
        Self {
            transport: transport(&ampora, &baseline).into(),
            kib_per_agent_ratio: ratio(kib(&ampora), kib(&baseline)),
            connect_seconds_ratio: ratio(ampora.connect.seconds, baseline.connect.seconds),
            steady_rate_ratio: ratio(rate(&ampora), rate(&baseline)),
            ampora,
            baseline,
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "== baseline ==\n{}== ampora ==\n{}== ratios (ampora / baseline, {}) ==\nRSS per agent {:.2}×, connect time {:.2}×, steady msg/s {:.2}×\n",
            summary(&self.baseline),
            summary(&self.ampora),
            self.transport,
            self.kib_per_agent_ratio,
            self.connect_seconds_ratio,
            self.steady_rate_ratio
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(targets: &[&str]) -> Report {
        Report {
            targets: targets.iter().map(|t| t.to_string()).collect(),
            ..Report::default()
        }
    }

    #[test]
    fn comparison_names_the_transport_of_both_sides() {
        let tls = Comparison::new(
            at(&["wss://127.0.0.1:1/v1/opamp"]),
            at(&["wss://127.0.0.1:2/"]),
        );
        assert_eq!(tls.transport, "tls");
        assert!(tls.summary().contains("(ampora / baseline, tls)"));
        let plain = Comparison::new(
            at(&["ws://a/v1/opamp", "ws://b/v1/opamp"]),
            at(&["ws://c/"]),
        );
        assert_eq!(plain.transport, "plaintext");
        let mixed = Comparison::new(at(&["wss://a/v1/opamp"]), at(&["ws://c/"]));
        assert_eq!(mixed.transport, "mixed");
        let half = Comparison::new(
            at(&["wss://a/v1/opamp", "ws://b/v1/opamp"]),
            at(&["wss://c/"]),
        );
        assert_eq!(half.transport, "mixed");
        assert_eq!(Comparison::new(at(&[]), at(&[])).transport, "mixed");
    }
}
