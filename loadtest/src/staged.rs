//! The staged rollout phase (`rollout --stages LIST`): a new config version to the run's
//! agents (by their `loadtest` label) through `POST /api/v1/rollouts`, followed until the
//! rollout succeeds (or stops in another state: an error, reported), then timed stage by
//! stage from the agents' answers and the server's stage starts and gate verdicts (the
//! arithmetic is `stagetimes`'). It also owns the staged part of the report and its text.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use shared::rollout::{Rollout, RolloutState};

use crate::agent::{unix_us, FLEET_LABEL};
use crate::fleet::Fleet;
use crate::measure::bar;
use crate::options::RunOptions;
use crate::stagetimes::{stage_times, StageClock, StageTimes};

/// How often the rollout's record is read while it runs (the list endpoint: no agent reads).
const POLL_EVERY: Duration = Duration::from_millis(100);
/// After the rollout succeeded, how long the answers still in the workers' pipes may take.
const ANSWERS_GRACE: Duration = Duration::from_secs(10);
/// Each stage's progress deadline (the API's default).
const STAGE_DEADLINE: &str = "10m";

/// What the staged phase adds to the rollout report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StagedReport {
    pub rollout_id: i64,
    /// `--stages` and `--soak` as given.
    pub stages_arg: String,
    pub soak: String,
    /// The rollout's target, e.g. `labels loadtest=true`.
    pub target: String,
    /// The state it ended in (`succeeded`, or what stopped it) and why.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Members planned at creation (agents the server did not know yet join the last stage).
    pub planned: u64,
    /// From the creation request until the harness read `succeeded` (polling every 100 ms).
    pub seen_done_ms: f64,
    /// Per stage and overall; see `stagetimes`.
    pub times: StageTimes,
}

/// What the phase measured, for the scenario's rollout report.
pub(crate) struct Outcome {
    pub staged: StagedReport,
    pub request_ms: f64,
    pub planned: u64,
    /// Answer − creation request, sorted.
    pub since_request_ms: Vec<f64>,
    pub reported: usize,
    pub failed: usize,
    /// Applied and failed members as the gates counted them.
    pub gate_applied: usize,
    pub gate_failed: usize,
    pub errors: BTreeMap<String, u64>,
    pub ok: bool,
}

fn clocks(r: &Rollout) -> Vec<StageClock> {
    r.stages
        .iter()
        .map(|s| StageClock {
            planned: s.planned,
            started_ms: s.started_ms,
            gate_ms: s.gate.as_ref().map(|g| g.at_ms),
        })
        .collect()
}

/// Creates the rollout and follows it; see the module comment.
pub(crate) async fn phase(
    opts: &RunOptions,
    fleet: &mut Fleet,
    stages: &str,
) -> anyhow::Result<Outcome> {
    let n = fleet.applied_at.len();
    let api = opts.api.as_ref().context("rollout needs the API")?;
    let body = crate::config::effective_config_with(
        opts.config_bytes,
        &format!("staged rollout {}", uuid::Uuid::new_v4()),
    );
    let config_id = api.create_config("loadtest-staged-rollout", &body).await?;
    fleet.reset_applied();
    let b = bar(opts.progress, n as u64, "rollout");
    let request_unix_ms = unix_us() as f64 / 1000.0;
    let started = Instant::now();
    let created = api
        .create_rollout(json!({
            "config_id": config_id,
            "labels": { FLEET_LABEL.0: FLEET_LABEL.1 },
            "stages": stages,
            "soak": opts.soak,
            "deadline": STAGE_DEADLINE,
            "budget": "0",
            "on_failure": "pause",
        }))
        .await?;
    let request_ms = started.elapsed().as_secs_f64() * 1000.0;
    fleet.watch_config(&created.config_hash);
    let planned: u64 = created.stages.iter().map(|s| s.planned).sum();
    let id = created.id;
    let deadline = Instant::now() + opts.timeout;
    let mut errors = BTreeMap::new();
    let last = loop {
        fleet.pump_for(POLL_EVERY).await;
        if let Some(b) = &b {
            b.set_position(fleet.applied as u64);
        }
        let r = api.rollout(id).await?;
        match r.state {
            RolloutState::Succeeded => break r,
            RolloutState::Pending | RolloutState::Running if Instant::now() < deadline => {}
            RolloutState::Pending | RolloutState::Running => {
                errors.insert("rollout_timeout".into(), 1);
                break r;
            }
            other => {
                errors.insert(format!("rollout_{other}"), 1);
                break r;
            }
        }
    };
    let seen_done_ms = started.elapsed().as_secs_f64() * 1000.0;
    let succeeded = last.state == RolloutState::Succeeded;
    if succeeded {
        // Every agent of the run is in the rollout (members and joiners alike).
        let all = fleet
            .pump_until(ANSWERS_GRACE, None, |f| f.applied >= n)
            .await;
        if !all {
            errors.insert("rollout_answers_missing".into(), (n - fleet.applied) as u64);
        }
    }
    if let Some(b) = b {
        b.finish_and_clear();
    }
    let answers: Vec<(f64, bool)> = fleet
        .applied_at
        .iter()
        .flatten()
        .map(|&(us, failed)| (us as f64 / 1000.0, failed))
        .collect();
    let mut times = stage_times(&answers, &clocks(&last), request_unix_ms);
    for (f, s) in times.stages.iter_mut().zip(&last.stages) {
        f.size = s.size.to_string();
    }
    let mut since_request_ms: Vec<f64> = answers.iter().map(|a| a.0 - request_unix_ms).collect();
    since_request_ms.sort_by(f64::total_cmp);
    let gates = last.stages.iter().filter_map(|s| s.gate.as_ref());
    let (gate_applied, gate_failed) = gates.fold((0, 0), |(a, f), g| {
        (a + g.applied as usize, f + g.failed as usize)
    });
    let failed = answers.iter().filter(|a| a.1).count();
    Ok(Outcome {
        staged: StagedReport {
            rollout_id: id,
            stages_arg: stages.to_string(),
            soak: opts.soak.clone(),
            target: format!("labels {}={}", FLEET_LABEL.0, FLEET_LABEL.1),
            state: last.state.to_string(),
            reason: last.reason.clone(),
            planned,
            seen_done_ms,
            times,
        },
        request_ms,
        planned,
        since_request_ms,
        reported: answers.len(),
        failed,
        gate_applied,
        gate_failed,
        ok: succeeded && errors.is_empty(),
        errors,
    })
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.0}"))
}

/// The staged part of the human summary: a line, then a table of the stages.
pub fn summary(s: &StagedReport) -> String {
    let t = &s.times;
    let mut out = format!(
        "staged rollout {} ({}, stages {}, soak {}): {}{}; {} planned; total {} ms (request → last gate), seen done after {:.0} ms\n",
        s.rollout_id,
        s.target,
        s.stages_arg,
        s.soak,
        s.state,
        s.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default(),
        s.planned,
        ms(t.total_ms),
        s.seen_done_ms,
    );
    out += &format!(
        "  answer after its stage's start: p50 {:.1} ms p99 {:.1}; canary push → applied {} ms; engine time max {} ms; early answers {}\n",
        t.apply_p50_ms,
        t.apply_p99_ms,
        ms(t.stages.first().and_then(|f| f.push_to_last_ms)),
        ms(t.engine_max_ms),
        t.early,
    );
    out += "  | stage | size | planned | agents | failed | start (ms after 1st) | start → last answer | engine: prev. gate → last answer | last answer → gate | p50 | p99 |\n";
    let first = t.stages.first().and_then(|f| f.started_ms);
    for f in &t.stages {
        let since = f.started_ms.zip(first).map(|(a, b)| (a - b) as f64);
        out += &format!(
            "  | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} |\n",
            f.stage,
            f.size,
            f.planned,
            f.agents,
            f.failed,
            ms(since),
            ms(f.push_to_last_ms),
            ms(f.engine_ms),
            ms(f.last_to_gate_ms),
            f.apply_p50_ms,
            f.apply_p99_ms,
        );
    }
    out
}
