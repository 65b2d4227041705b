//! The measuring tools every phase uses, the `refused` one included: the processes whose
//! memory and CPU are measured, timed windows with a progress bar, busy windows with the CPU
//! they cost, and adding up the errors of a window. It depends on neither `scenario` nor
//! `refused`, so the scenario can run the `refused` phase without the two depending on each
//! other.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::agent::{unix_ms, AgentSpec, Mode};
use crate::fleet::Fleet;
use crate::options::RunOptions;
use crate::procs::{cpu_secs, CpuSample, Role};
use crate::report::Stats;

/// A progress bar of `len` steps labelled `what`, when `progress` is on.
pub(crate) fn bar(progress: bool, len: u64, what: &str) -> Option<ProgressBar> {
    if !progress {
        return None;
    }
    let b = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>10} [{elapsed_precise}] {wide_bar} {pos}/{len}")
    {
        b.set_style(style);
    }
    b.set_message(what.to_string());
    Some(b)
}

/// Runs a timed window with a seconds bar.
pub(crate) async fn window(fleet: &mut Fleet, d: Duration, progress: bool, what: &str) {
    let b = bar(progress, d.as_secs().max(1), what);
    let end = Instant::now() + d;
    while Instant::now() < end {
        let step = end
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        fleet.pump_for(step).await;
        if let Some(b) = &b {
            b.inc(1);
        }
    }
    if let Some(b) = b {
        b.finish_and_clear();
    }
}

/// Puts the fleet in `mode(until_ms)` for `opts.duration`, then back to idle; returns the
/// window's length in seconds and what the agents did in it (counters reset at its start).
pub(crate) async fn busy_window(
    fleet: &mut Fleet,
    opts: &RunOptions,
    measured: &[Measured],
    what: &str,
    mode: impl FnOnce(u64) -> Mode,
) -> anyhow::Result<(f64, Stats, Vec<CpuSample>)> {
    fleet.collect().await?;
    let cpu0 = cpu_of(measured)?;
    let start = Instant::now();
    fleet.set_mode(mode(unix_ms() + opts.duration.as_millis() as u64))?;
    window(fleet, opts.duration, opts.progress, what).await;
    fleet.set_mode(Mode::Idle)?;
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_of(measured)?
        .iter()
        .zip(&cpu0)
        .zip(measured)
        .map(|((c1, c0), m)| CpuSample {
            pid: m.pid,
            role: m.role,
            cpu_percent: 100.0 * (c1 - c0) / secs,
        })
        .collect();
    Ok((secs, fleet.collect().await?, cpu))
}

/// A process whose memory and CPU the report shows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Measured {
    pub(crate) pid: u32,
    pub(crate) role: Role,
    /// What its per-agent memory divides by.
    pub(crate) agents: usize,
}

/// Servers, then gateways (with the agents of their target), then coordinators.
pub(crate) fn measured(opts: &RunOptions, specs: &[AgentSpec]) -> Vec<Measured> {
    let n = specs.len();
    let t = opts.targets.len().max(1);
    let on_target = |g: usize| specs.iter().filter(|s| s.index % t == g).count();
    let mut out: Vec<Measured> = opts
        .server_pids
        .iter()
        .map(|&pid| Measured {
            pid,
            role: Role::Server,
            agents: n,
        })
        .collect();
    out.extend(
        opts.gateway_pids
            .iter()
            .enumerate()
            .map(|(g, &pid)| Measured {
                pid,
                role: Role::Gateway,
                agents: on_target(g),
            }),
    );
    out.extend(opts.coordinator_pids.iter().map(|&pid| Measured {
        pid,
        role: Role::Coordinator,
        agents: n,
    }));
    out
}

pub(crate) fn cpu_of(measured: &[Measured]) -> anyhow::Result<Vec<f64>> {
    measured.iter().map(|m| cpu_secs(m.pid)).collect()
}

pub(crate) fn merge_errors(into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}
