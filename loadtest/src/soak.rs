//! The soak: a connected fleet held for a long run with continuous churn (a share of the
//! agents leaving and reconnecting every second), a config pushed to every agent at a fixed
//! period, and optionally a coordinator restarted part-way. It samples the measured server
//! processes' memory and open descriptors and the fleet's live connections, and reports the
//! slopes after warm-up, each push's time until every agent applied it, and the errors.
//! The samples go to a CSV file that `loadtest/plot-soak.py` draws.

use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::agent::{unix_ms, Mode};
use crate::fleet::Fleet;
use crate::measure::{merge_errors, Measured};
use crate::options::RunOptions;
use crate::procs::{rss_kib, Role};
use crate::report::Stats;

/// Restarts a coordinator; resolves to its old and new pid.
type RestartFn =
    dyn Fn() -> Pin<Box<dyn Future<Output = anyhow::Result<(u32, u32)>> + Send>> + Send + Sync;

/// What restarts a coordinator part-way through a cluster soak (the harness owns the nodes).
#[derive(Clone)]
pub struct Restarter(pub Arc<RestartFn>);

impl std::fmt::Debug for Restarter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Restarter")
    }
}

/// The soak's own settings (the fleet and the run's length are the run's).
#[derive(Debug, Clone)]
pub struct SoakPlan {
    /// Share of the fleet reconnecting per second (0.01: 1 %).
    pub churn_per_sec: f64,
    /// A new config to every agent this often.
    pub push_every: Duration,
    /// Memory, descriptors and connections are read this often.
    pub sample_every: Duration,
    /// Samples before this are left out of the slopes.
    pub warmup: Duration,
    pub csv_out: Option<PathBuf>,
    /// Restart a coordinator this long after the soak starts.
    pub restart_after: Option<Duration>,
    pub restarter: Option<Restarter>,
}

/// One reading.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SoakSample {
    pub t_secs: f64,
    /// Every measured process together.
    pub rss_kib: u64,
    pub fds: u64,
    pub gateway_rss_kib: u64,
    pub coordinator_rss_kib: u64,
    /// Agents connected now, as the fleet counts them.
    pub live_agents: i64,
    /// Since the soak started.
    pub connects: u64,
    pub errors: u64,
    pub pushes: usize,
}

/// One push and how it went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SoakPush {
    pub at_secs: f64,
    pub hash: String,
    pub matched_agents: u64,
    /// Agents that reported APPLIED for it before the next push.
    pub applied: usize,
    /// From the assignment request until every agent applied it.
    pub all_applied_secs: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Restart {
    pub at_secs: f64,
    pub old_pid: u32,
    pub new_pid: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SoakReport {
    pub seconds: f64,
    pub churn_per_sec: f64,
    pub warmup_secs: f64,
    /// Least-squares slopes over the samples after warm-up.
    pub rss_slope_kib_per_hour: f64,
    pub fd_slope_per_hour: f64,
    /// RSS at the first sample after warm-up and at the last.
    pub rss_after_warmup_kib: u64,
    pub rss_end_kib: u64,
    pub fds_after_warmup: u64,
    pub fds_end: u64,
    pub connects: u64,
    pub pushes: Vec<SoakPush>,
    pub pushes_fully_applied: usize,
    /// The API's count of agents with the last push applied, at the end.
    pub api_applied_last: usize,
    pub restarts: Vec<Restart>,
    pub samples: Vec<SoakSample>,
}

/// Least-squares slope of `y` over `x`; 0 with fewer than two distinct `x`.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

const CSV_HEADER: &str =
    "t_secs,rss_kib,fds,gateway_rss_kib,coordinator_rss_kib,live_agents,connects,errors,pushes\n";

fn csv_row(s: &SoakSample) -> String {
    format!(
        "{:.1},{},{},{},{},{},{},{},{}\n",
        s.t_secs,
        s.rss_kib,
        s.fds,
        s.gateway_rss_kib,
        s.coordinator_rss_kib,
        s.live_agents,
        s.connects,
        s.errors,
        s.pushes
    )
}

/// Runs the soak on a connected fleet of `n` agents for `duration`; true if every push was
/// applied by every agent before the next one and the API agrees on the last.
pub(crate) async fn phase(
    plan: &SoakPlan,
    opts: &RunOptions,
    api: &crate::api::Api,
    fleet: &mut Fleet,
    measured: &mut [Measured],
    n: usize,
    errors: &mut std::collections::BTreeMap<String, u64>,
) -> anyhow::Result<(SoakReport, bool)> {
    let duration = opts.duration;
    // Counters since the soak started: every collection resets the workers' own.
    let mut totals = Stats::default();
    fleet.collect().await?; // start from zero
    let mut csv = String::from(CSV_HEADER);
    let mut report = SoakReport {
        churn_per_sec: plan.churn_per_sec,
        warmup_secs: plan.warmup.as_secs_f64(),
        ..SoakReport::default()
    };
    let start = Instant::now();
    let end = start + duration;
    fleet.set_mode(Mode::Soak {
        until_ms: unix_ms() + duration.as_millis() as u64,
        churn_per_million: (plan.churn_per_sec.clamp(0.0, 1.0) * 1e6).round() as u32,
    })?;
    let mut next_sample = start;
    let mut next_push = start + plan.push_every;
    let mut restart_at = plan.restart_after.map(|d| start + d);
    // The push in flight: its index in `report.pushes` and when it was requested.
    let mut pending: Option<(usize, Instant)> = None;
    while Instant::now() < end {
        let next = [Some(next_sample), Some(next_push), restart_at, Some(end)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(end);
        let wait = next.saturating_duration_since(Instant::now());
        match pending {
            Some((i, at)) => {
                if fleet.pump_until(wait, None, |f| f.applied == n).await {
                    report.pushes[i].applied = n;
                    report.pushes[i].all_applied_secs = Some(at.elapsed().as_secs_f64());
                    pending = None;
                }
            }
            None => fleet.pump_for(wait).await,
        }
        let now = Instant::now();
        if now >= next_sample {
            totals.merge(&fleet.collect().await?);
            let sample = sample(
                measured,
                start.elapsed().as_secs_f64(),
                n,
                &totals,
                report.pushes.len(),
            );
            csv.push_str(&csv_row(&sample));
            if let Some(p) = &plan.csv_out {
                std::fs::write(p, &csv).with_context(|| format!("writing {}", p.display()))?;
            }
            eprintln!(
                "soak {:>6.0}s: rss {} MiB, fds {}, live {}, connects {}, errors {}, pushes {}",
                sample.t_secs,
                sample.rss_kib / 1024,
                sample.fds,
                sample.live_agents,
                sample.connects,
                sample.errors,
                sample.pushes
            );
            report.samples.push(sample);
            next_sample += plan.sample_every;
        }
        if now >= next_push && now < end {
            if let Some((i, _)) = pending.take() {
                report.pushes[i].applied = fleet.applied;
            }
            let at = start.elapsed().as_secs_f64();
            let body = crate::config::effective_config_with(
                opts.config_bytes,
                &format!("soak push {at:.0}"),
            );
            let (id, hash) = api.create_config_hashed("loadtest-soak", &body).await?;
            fleet.reset_applied();
            fleet.watch_config(&hash);
            let requested = Instant::now();
            let matched = api.assign_all(id).await?;
            report.pushes.push(SoakPush {
                at_secs: at,
                hash,
                matched_agents: matched,
                ..SoakPush::default()
            });
            pending = Some((report.pushes.len() - 1, requested));
            next_push += plan.push_every;
        }
        if restart_at.is_some_and(|at| now >= at) {
            restart_at = None;
            let r = plan
                .restarter
                .as_ref()
                .context("no coordinator to restart")?;
            let at_secs = start.elapsed().as_secs_f64();
            let (old_pid, new_pid) = (r.0)().await?;
            eprintln!("soak {at_secs:>6.0}s: coordinator restarted (pid {old_pid} → {new_pid})");
            for m in measured.iter_mut().filter(|m| m.pid == old_pid) {
                m.pid = new_pid;
            }
            report.restarts.push(Restart {
                at_secs,
                old_pid,
                new_pid,
            });
        }
    }
    fleet.set_mode(Mode::Idle)?;
    // The last push gets the run's timeout to finish, like any rollout.
    if let Some((i, at)) = pending {
        let all = fleet
            .pump_until(Duration::from_secs(120), None, |f| f.applied == n)
            .await;
        report.pushes[i].applied = fleet.applied;
        if all {
            report.pushes[i].all_applied_secs = Some(at.elapsed().as_secs_f64());
        }
    }
    totals.merge(&fleet.collect().await?);
    if !report.pushes.is_empty() {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            report.api_applied_last = api.count_in_state("applied").await?;
            if report.api_applied_last >= n || Instant::now() >= deadline {
                break;
            }
            fleet.pump_for(Duration::from_millis(500)).await;
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.connects = totals.connects;
    report.pushes_fully_applied = report
        .pushes
        .iter()
        .filter(|p| p.all_applied_secs.is_some())
        .count();
    let warm: Vec<&SoakSample> = report
        .samples
        .iter()
        .filter(|s| s.t_secs >= report.warmup_secs)
        .collect();
    let hours = |s: &&SoakSample| s.t_secs / 3600.0;
    let pts = |f: fn(&SoakSample) -> u64| -> Vec<(f64, f64)> {
        warm.iter().map(|s| (hours(s), f(s) as f64)).collect()
    };
    report.rss_slope_kib_per_hour = slope(&pts(|s| s.rss_kib));
    report.fd_slope_per_hour = slope(&pts(|s| s.fds));
    if let (Some(first), Some(last)) = (warm.first(), warm.last()) {
        report.rss_after_warmup_kib = first.rss_kib;
        report.fds_after_warmup = first.fds;
        report.rss_end_kib = last.rss_kib;
        report.fds_end = last.fds;
    }
    merge_errors(errors, std::mem::take(&mut totals.errors));
    let ok = report.pushes_fully_applied == report.pushes.len() && report.api_applied_last >= n;
    Ok((report, ok))
}

fn sample(
    measured: &[Measured],
    t_secs: f64,
    n: usize,
    totals: &Stats,
    pushes: usize,
) -> SoakSample {
    let rss = |m: &Measured| rss_kib(m.pid).unwrap_or(0);
    let of = |role: Role| {
        measured
            .iter()
            .filter(|m| m.role == role)
            .map(rss)
            .sum::<u64>()
    };
    SoakSample {
        t_secs,
        rss_kib: measured.iter().map(rss).sum(),
        fds: measured.iter().map(|m| open_fds(m.pid)).sum(),
        gateway_rss_kib: of(Role::Gateway),
        coordinator_rss_kib: of(Role::Coordinator),
        // Everyone was connected when the soak started.
        live_agents: n as i64 + totals.connects as i64 - totals.ended as i64,
        connects: totals.connects,
        errors: totals.errors.values().sum(),
        pushes,
    }
}

/// The report's lines for the summary.
pub fn summary(r: &SoakReport) -> String {
    let mut out = String::new();
    let mib = |k: u64| k as f64 / 1024.0;
    let _ = writeln!(
        out,
        "soak: {:.0} s, churn {:.2} %/s, {} connects; after {:.0} s warm-up RSS {:.1} → {:.1} MiB (slope {:+.2} MiB/h), fds {} → {} (slope {:+.1}/h)",
        r.seconds,
        r.churn_per_sec * 100.0,
        r.connects,
        r.warmup_secs,
        mib(r.rss_after_warmup_kib),
        mib(r.rss_end_kib),
        r.rss_slope_kib_per_hour / 1024.0,
        r.fds_after_warmup,
        r.fds_end,
        r.fd_slope_per_hour
    );
    let times: Vec<f64> = r.pushes.iter().filter_map(|p| p.all_applied_secs).collect();
    let max = times.iter().copied().fold(0.0, f64::max);
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let _ = writeln!(
        out,
        "soak pushes: {} of {} applied by every agent (median {:.2} s, max {:.2} s); API shows {} with the last applied",
        r.pushes_fully_applied,
        r.pushes.len(),
        median,
        max,
        r.api_applied_last
    );
    for x in &r.restarts {
        let _ = writeln!(
            out,
            "soak: coordinator restarted at {:.0} s (pid {} → {})",
            x.at_secs, x.old_pid, x.new_pid
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::slope;

    #[test]
    fn slope_is_the_least_squares_fit() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 7.0)).collect();
        assert!((slope(&line) - 3.0).abs() < 1e-9);
        let flat: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 5.0)).collect();
        assert_eq!(slope(&flat), 0.0);
        assert_eq!(slope(&[(1.0, 2.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 2.0), (1.0, 4.0)]), 0.0);
        // Noise around a rising line still gives its slope.
        let noisy: Vec<(f64, f64)> = (0..100)
            .map(|i| {
                (
                    i as f64,
                    2.0 * i as f64 + if i % 2 == 0 { 1.0 } else { -1.0 },
                )
            })
            .collect();
        assert!((slope(&noisy) - 2.0).abs() < 0.01);
    }
}
