//! The rollout driver. Every coordinator runs [`run_engine`]; a rollout is driven by the
//! coordinator holding the lease of partition `id % PARTITIONS`, and every write it makes is
//! fenced by that lease (and compared by revision), so exactly one coordinator moves a
//! rollout at a time and one that lost its lease (frozen, partitioned) writes nothing. A
//! take-over continues from the stored state: stage starts, settle and soak times, and gate
//! results are in the record; the gate is judged again from the agents' stored facts.
//!
//! One step per look, per rollout (a look every 200 ms, or sooner when an agent answers):
//! - pending: start the first stage;
//! - running: until every member of the stage answered (or the progress deadline passed) the
//!   stage is settling; then it soaks; then the gate decides: next stage (or success), or
//!   failed / rolling back (with nothing to soak, settling and the gate are one step). A gate that cannot pass any more (more FAILED than the budget,
//!   or unhealthy members during the soak beyond it) fails at once, without waiting;
//! - rolling back: until every agent the rollout reached reports its previous version
//!   applied (or the deadline passed).
//!
//! After a write that changes which agents are due which config the driver re-reads the table
//! and reconciles its own agents, and tells the other coordinators (`RolloutChanged`).

use std::collections::{HashMap, HashSet};
use std::sync::Weak;
use std::time::{Duration, Instant};

use shared::bus::ControlEvent;
use shared::domain::AgentRecord;
use shared::ids::{InstanceUid, PARTITIONS};
use shared::now_ms;
use shared::packages::NewPackageAssignment;
use shared::rollout::{
    Fence, GateResult, OnFailure, PackageChange, Rollout, RolloutEvent, RolloutState,
};
use shared::store::{Finish, NewAssignment, StoreError};

use super::gates::{self, Answer, Progress};
use super::Live;
use crate::service::Coordinator;

/// How often the driver looks at its rollouts (longer when a look takes long: see
/// [`run_engine`]).
pub(crate) const TICK: Duration = Duration::from_millis(200);

/// The partition whose lease holder drives rollout `id`.
pub fn driver_partition(id: i64) -> u16 {
    u16::try_from(id.rem_euclid(i64::from(PARTITIONS))).unwrap_or(0)
}

/// The shortest pause between two looks when agents' answers wake the driver.
pub(crate) const WAKE_GAP: Duration = Duration::from_millis(20);

/// Drives the rollouts this coordinator holds the lease for, every [`TICK`], or sooner when an
/// agent of this coordinator answers a config offer (at most every [`WAKE_GAP`]); either way
/// at least twice the time the last look took apart (reading 100,000 agents from the store in
/// cluster mode takes a while, and the engine must not crowd out the agents).
pub(crate) async fn run_engine(weak: Weak<Coordinator>) {
    loop {
        let Some(c) = weak.upgrade() else { return };
        if c.is_stopping() {
            return;
        }
        let wake = c.rollout_wake.clone();
        let started = Instant::now();
        c.engine_tick().await;
        let took = started.elapsed();
        drop(c);
        tokio::select! {
            () = tokio::time::sleep(TICK.max(took * 2)) => {}
            () = async {
                wake.notified().await;
                tokio::time::sleep(WAKE_GAP.max(took * 2)).await;
            } => {}
        }
    }
}

/// Gate failure reasons, the `reason` label of `ampora_rollout_gate_failures_total`.
const GATE_REASONS: [&str; 5] = [
    "failed",
    "straggler",
    "disconnected",
    "unhealthy",
    "mismatched",
];

/// Where a member of a running rollout stands, the `state` label of `ampora_rollout_agents`.
const MEMBER_STATES: [&str; 4] = ["not_reached", "waiting", "applied", "failed"];

/// Describes the rollout metrics and creates their bounded series at zero, so alert rules
/// and dashboards see them before the first rollout.
pub(crate) fn describe_metrics() {
    metrics::describe_gauge!("ampora_rollouts", "Rollouts by state (pending, running, paused, failed, succeeded, aborted, rolling_back, rolled_back)");
    metrics::describe_gauge!(
        "ampora_rollout_stage_age_seconds",
        metrics::Unit::Seconds,
        "Age of the oldest running stage among the rollouts this coordinator drives (0: none)"
    );
    metrics::describe_counter!(
        "ampora_rollout_gate_failures_total",
        "Failed rollout gates, once per reason that counted against the budget"
    );
    metrics::describe_gauge!(
        "ampora_rollout_agents",
        "Members of the running rollouts this coordinator drives, by where they stand"
    );
    count_states(&[]);
    for reason in GATE_REASONS {
        metrics::counter!("ampora_rollout_gate_failures_total", "reason" => reason).increment(0);
    }
    for state in MEMBER_STATES {
        metrics::gauge!("ampora_rollout_agents", "state" => state).set(0.0);
    }
    metrics::gauge!("ampora_rollout_stage_age_seconds").set(0.0);
}

/// `ampora_rollouts{state}`: rollouts by state (states missing from `counts` are at zero).
pub(crate) fn count_states(counts: &[(RolloutState, u64)]) {
    for state in RolloutState::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n);
        metrics::gauge!("ampora_rollouts", "state" => state.as_str()).set(n as f64);
    }
}

/// What one step decided: the new record (its revision already bumped), its history lines,
/// and the assignment a success leaves behind.
pub(super) struct Step {
    pub next: Rollout,
    pub events: Vec<RolloutEvent>,
    pub finish: Option<Finish>,
}

/// The assignment rollout `r` leaves behind when it succeeds at `now`: its target keeps what
/// it rolled out.
pub(super) fn finish(r: &Rollout, now: i64) -> Finish {
    let author = format!("rollout:{}", r.id);
    match &r.package {
        Some(p) => Finish::Package(NewPackageAssignment {
            name: p.name.clone(),
            version: p.version.clone(),
            target: r.target.clone(),
            author,
            created_ms: now,
        }),
        None => Finish::Config(NewAssignment {
            config_id: r.config_id,
            target: r.target.clone(),
            author,
            created_ms: now,
        }),
    }
}

impl Coordinator {
    async fn engine_tick(&self) {
        // Leases lapsed: another coordinator may drive these rollouts now, and the first look
        // after a round renews them judges with the outage known (see `gates::within_grace`).
        if self.lease_lapsed() {
            return;
        }
        let held = self.held();
        let mine: Vec<(Live, i64)> = self
            .live_rollouts()
            .into_iter()
            .filter(|l| {
                matches!(
                    l.rollout.state,
                    RolloutState::Pending | RolloutState::Running | RolloutState::RollingBack
                )
            })
            .filter_map(|l| {
                let fence = *held.get(&driver_partition(l.rollout.id))?;
                Some((l, fence))
            })
            .collect();
        if mine.is_empty() {
            metrics::gauge!("ampora_rollout_stage_age_seconds").set(0.0);
            for state in MEMBER_STATES {
                metrics::gauge!("ampora_rollout_agents", "state" => state).set(0.0);
            }
            return;
        }
        let agents = match self.agents_without_configs().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "rollout engine: reading agents failed");
                return;
            }
        };
        let now = now_ms();
        let mut oldest_stage = 0i64;
        let mut changed = false;
        let mut standing = [0u64; MEMBER_STATES.len()];
        for (live, _) in &mine {
            self.count_members(live, &agents, &mut standing);
        }
        for (state, n) in MEMBER_STATES.into_iter().zip(standing) {
            metrics::gauge!("ampora_rollout_agents", "state" => state).set(n as f64);
        }
        for (live, fence) in mine {
            let r = &live.rollout;
            if r.state == RolloutState::Running {
                if let Some(t) = r.stages.get(r.stage).and_then(|s| s.started_ms) {
                    oldest_stage = oldest_stage.max(now - t);
                }
            }
            let Some(step) = self.step(&live, &agents, now) else {
                continue;
            };
            let fence = Fence {
                node: self.cfg.node.clone(),
                partition: driver_partition(r.id),
                fence,
                now_ms: now,
            };
            match self.commit_step(step, Some(&fence)).await {
                Ok(wrote) => changed |= wrote,
                Err(e) => tracing::warn!(rollout = r.id, error = %e, "rollout write failed"),
            }
        }
        metrics::gauge!("ampora_rollout_stage_age_seconds").set(oldest_stage as f64 / 1000.0);
        if changed {
            self.sync_rollouts().await;
        }
    }

    /// Writes a step; on success tells every coordinator. False when the write was refused
    /// (an operator changed the rollout meanwhile, or the lease moved on): the next tick
    /// starts from the stored record.
    pub(super) async fn commit_step(
        &self,
        step: Step,
        fence: Option<&Fence>,
    ) -> Result<bool, StoreError> {
        let id = step.next.id;
        let finishing = step.finish.is_some();
        if !self
            .store
            .update_rollout(&step.next, fence, &step.events, step.finish)
            .await?
        {
            tracing::info!(
                rollout = id,
                "rollout write refused (changed or fenced); re-reading"
            );
            let _ = self.load_rollouts().await;
            return Ok(false);
        }
        for e in &step.events {
            tracing::info!(rollout = id, kind = %e.kind, stage = ?e.stage, "rollout event");
        }
        if finishing {
            // The assignment first, so no coordinator drops the rollout before it has the
            // assignment that replaces it (see `load_rollouts`).
            self.sync_assignments().await;
            let _ = self
                .bus
                .broadcast(ControlEvent::AssignmentCreated { assignment_id: 0 })
                .await;
        }
        let _ = self
            .bus
            .broadcast(ControlEvent::RolloutChanged { rollout_id: id })
            .await;
        Ok(true)
    }

    /// The members of stage `s` with their records: recorded members of that stage, and in
    /// the last stage the agents that joined the target since (those that can receive).
    pub(super) fn stage_members<'a>(
        &self,
        live: &Live,
        s: usize,
        agents: &'a [AgentRecord],
        by_uid: &HashMap<InstanceUid, &'a AgentRecord>,
    ) -> Vec<&'a AgentRecord> {
        let mut out: Vec<&AgentRecord> = live
            .members
            .values()
            .filter(|m| usize::from(m.stage) == s)
            .filter_map(|m| by_uid.get(&m.instance_uid).copied())
            .collect();
        if s == live.rollout.last_stage() {
            out.extend(agents.iter().filter(|r| {
                !live.members.contains_key(&r.instance_uid)
                    && self.target_admits(&live.rollout.target, r)
                    && self.can_receive(live.rollout.package.as_ref(), r)
            }));
        }
        out
    }

    /// Adds where each member of a running rollout stands to `out` (by [`MEMBER_STATES`]).
    fn count_members(&self, live: &Live, agents: &[AgentRecord], out: &mut [u64; 4]) {
        let r = &live.rollout;
        if r.state != RolloutState::Running {
            return;
        }
        let by_uid: HashMap<InstanceUid, &AgentRecord> =
            agents.iter().map(|a| (a.instance_uid, a)).collect();
        for s in 0..r.stages.len() {
            let members = self.stage_members(live, s, agents, &by_uid);
            if !r.reached(s) {
                out[0] += members.len() as u64;
                continue;
            }
            for m in members {
                out[match gates::answer(m, self.want(r)) {
                    Answer::Waiting => 1,
                    Answer::Applied => 2,
                    Answer::Failed => 3,
                }] += 1;
            }
        }
    }

    /// What the rollout does next, if anything, from the agents' facts now.
    fn step(&self, live: &Live, agents: &[AgentRecord], now: i64) -> Option<Step> {
        let r = &live.rollout;
        let by_uid: HashMap<InstanceUid, &AgentRecord> =
            agents.iter().map(|a| (a.instance_uid, a)).collect();
        match r.state {
            RolloutState::Pending => Some(self.start_stage(r.clone(), 0, now, "engine")),
            RolloutState::Running => self.run_stage(live, agents, &by_uid, now),
            RolloutState::RollingBack => self.track_rollback(live, agents, &by_uid, now),
            _ => None,
        }
    }

    fn actor(&self) -> String {
        format!("engine:{}", self.cfg.node)
    }

    pub(super) fn start_stage(&self, mut r: Rollout, s: usize, now: i64, why: &str) -> Step {
        r.state = RolloutState::Running;
        r.stage = s;
        r.reason = None;
        r.updated_ms = now;
        r.rev += 1;
        if let Some(st) = r.stages.get_mut(s) {
            st.started_ms = Some(now);
            st.settled_ms = None;
            st.gate = None;
        }
        self.clear_soak(r.id);
        let events = vec![event(
            &r,
            now,
            "stage_started",
            self.actor(),
            serde_json::json!({ "after": why }),
        )];
        Step {
            next: r,
            events,
            finish: None,
        }
    }

    fn run_stage(
        &self,
        live: &Live,
        agents: &[AgentRecord],
        by_uid: &HashMap<InstanceUid, &AgentRecord>,
        now: i64,
    ) -> Option<Step> {
        let r = &live.rollout;
        let s = r.stage;
        let stage = r.stages.get(s)?;
        let started = stage.started_ms?;
        let members = self.stage_members(live, s, agents, by_uid);
        let deadline_passed = now >= started + r.deadline_ms;
        if stage.settled_ms.is_some() {
            self.note_unhealthy(r.id, s, &members);
        }
        let seen = self.seen_unhealthy(r.id, s);
        let how = gates::Judging {
            deadline_passed,
            soaking: stage.settled_ms.is_some(),
            seen_unhealthy: &seen,
            outage: *self.lease_outage.lock().unwrap_or_else(|p| p.into_inner()),
        };
        let want = self.want(r);
        let gate = gates::judge(&members, want, r.budget, how, now);
        // More failures than the budget cannot get better by waiting.
        if !gate.passed {
            return Some(self.gate_failed(r.clone(), gate, now));
        }
        let mut next = r.clone();
        let mut events = Vec::new();
        let gate = match stage.settled_ms {
            Some(settled) if now < settled + stage.soak_ms => return None,
            // Members reconnecting are judged once they are back (or the grace is over).
            Some(_) if gate.reconnecting > 0 => return None,
            // Judged once more with the soak's facts (the settle step judged answers only).
            Some(_) => gate,
            None => {
                let p = Progress::of(members.iter().copied(), want);
                if p.waiting > 0 && !deadline_passed {
                    return None;
                }
                next.stages[s].settled_ms = Some(now);
                next.updated_ms = now;
                let detail = serde_json::json!({ "applied": p.applied, "failed": p.failed, "stragglers": gate.stragglers });
                events.push(event(&next, now, "stage_settled", self.actor(), detail));
                if stage.soak_ms > 0 {
                    next.rev += 1;
                    return Some(Step {
                        next,
                        events,
                        finish: None,
                    });
                }
                // Nothing to soak: judge now, on everything a soak would look at, in the same
                // step (one tick less per stage).
                let full = gates::judge(
                    &members,
                    want,
                    r.budget,
                    gates::Judging {
                        soaking: true,
                        ..how
                    },
                    now,
                );
                if !full.passed {
                    let mut step = self.gate_failed(next, full, now);
                    events.append(&mut step.events);
                    step.events = events;
                    return Some(step);
                }
                if full.reconnecting > 0 {
                    // Settled; judged on a later look, once they are back.
                    next.rev += 1;
                    return Some(Step {
                        next,
                        events,
                        finish: None,
                    });
                }
                full
            }
        };
        next.stages[s].gate = Some(gate.clone());
        next.updated_ms = now;
        events.push(event(
            &next,
            now,
            "gate_passed",
            self.actor(),
            gate_detail(&gate),
        ));
        if s >= r.last_stage() {
            next.state = RolloutState::Succeeded;
            next.rev += 1;
            events.push(event(
                &next,
                now,
                "succeeded",
                self.actor(),
                serde_json::Value::Null,
            ));
            self.clear_soak(r.id);
            return Some(Step {
                finish: Some(finish(r, now)),
                next,
                events,
            });
        }
        let mut step = self.start_stage(next, s + 1, now, "gate_passed");
        events.append(&mut step.events);
        step.events = events;
        Some(step)
    }

    fn gate_failed(&self, mut r: Rollout, gate: GateResult, now: i64) -> Step {
        let counts = [
            gate.failed,
            gate.stragglers,
            gate.disconnected,
            gate.unhealthy,
            gate.mismatched,
        ];
        for (n, reason) in counts.into_iter().zip(GATE_REASONS) {
            if n > 0 {
                metrics::counter!("ampora_rollout_gate_failures_total", "reason" => reason)
                    .increment(1);
            }
        }
        let s = r.stage;
        let summary = format!("stage {} gate failed: {}", s + 1, gate.reasons.join("; "));
        let detail = gate_detail(&gate);
        r.stages[s].gate = Some(gate);
        r.reason = Some(summary);
        r.updated_ms = now;
        r.rev += 1;
        let failed = event(&r, now, "gate_failed", self.actor(), detail);
        // Stop the next stages at once: the failed stage's members keep what they got.
        self.clear_soak(r.id);
        match r.on_failure {
            OnFailure::Pause => {
                r.state = RolloutState::Failed;
                Step {
                    next: r,
                    events: vec![failed],
                    finish: None,
                }
            }
            OnFailure::Rollback => {
                let mut step = begin_rollback(r, now, self.actor());
                step.events.insert(0, failed);
                step
            }
        }
    }

    fn track_rollback(
        &self,
        live: &Live,
        agents: &[AgentRecord],
        by_uid: &HashMap<InstanceUid, &AgentRecord>,
        now: i64,
    ) -> Option<Step> {
        let r = &live.rollout;
        let started = r.rollback_started_ms.unwrap_or(r.updated_ms);
        // Every stage that started reached its members (`stage` is the last one that did).
        let reached: Vec<&AgentRecord> = (0..=r.stage.min(r.last_stage()))
            .filter(|&s| r.stages[s].started_ms.is_some())
            .flat_map(|s| self.stage_members(live, s, agents, by_uid))
            .collect();
        let (mut returned, mut failed, mut waiting, mut kept) = (0u64, 0u64, 0u64, 0u64);
        for a in &reached {
            let answer = match &r.package {
                None => match a.assigned_config_hash.as_deref() {
                    // Nothing to return to: the agent keeps what it runs.
                    None => None,
                    // Its coordinator has not re-pointed it yet (or its write is not stored).
                    Some(h) if h == r.config_hash => Some(Answer::Waiting),
                    Some(h) => Some(gates::answer(a, gates::Want::Config(h))),
                },
                Some(p) => self.rollback_answer(a, p),
            };
            match answer {
                None => kept += 1,
                Some(Answer::Applied) => returned += 1,
                Some(Answer::Failed) => failed += 1,
                Some(Answer::Waiting) => waiting += 1,
            }
        }
        let deadline_passed = now >= started + r.deadline_ms;
        if waiting > 0 && !deadline_passed {
            return None;
        }
        let mut next = r.clone();
        next.state = RolloutState::RolledBack;
        next.updated_ms = now;
        next.rev += 1;
        let detail = serde_json::json!({
            "returned": returned, "failed": failed, "stragglers": waiting, "no_previous_version": kept,
        });
        let events = vec![event(&next, now, "rolled_back", self.actor(), detail)];
        Some(Step {
            next,
            events,
            finish: None,
        })
    }

    /// How an agent an upgrade reached stands on its way back: verified on the version its
    /// package assignments give it now (the rollout no longer decides), or `None` when none
    /// does (it keeps what it runs: a set without the package would delete it).
    fn rollback_answer(&self, a: &AgentRecord, p: &PackageChange) -> Option<Answer> {
        let offer = self.package_offer(a)?.ok()?;
        let wire = shared::package_profile::Profile::of(a).wire_name(&p.name, p.kind);
        let back = offer.msg.packages.get(wire)?;
        let want = gates::Want::Package {
            name: &p.name,
            version: &back.version,
            kind: p.kind,
            max_attempts: offer.max_attempts,
        };
        Some(gates::answer(a, want))
    }

    /// Remembers members seen unhealthy during this stage's soak (a gate wants them healthy
    /// for the whole soak, not just at its end). Kept by the driver only: a take-over judges
    /// from the facts it sees from then on.
    fn note_unhealthy(&self, id: i64, stage: usize, members: &[&AgentRecord]) {
        if let Ok(mut soak) = self.rollout_soak.lock() {
            let entry = soak.entry(id).or_insert_with(|| (stage, HashSet::new()));
            if entry.0 != stage {
                *entry = (stage, HashSet::new());
            }
            entry.1.extend(
                members
                    .iter()
                    .filter(|r| gates::unhealthy(r))
                    .map(|r| r.instance_uid),
            );
        }
    }

    fn seen_unhealthy(&self, id: i64, stage: usize) -> HashSet<InstanceUid> {
        self.rollout_soak
            .lock()
            .ok()
            .and_then(|s| s.get(&id).filter(|e| e.0 == stage).map(|e| e.1.clone()))
            .unwrap_or_default()
    }

    fn clear_soak(&self, id: i64) {
        if let Ok(mut s) = self.rollout_soak.lock() {
            s.remove(&id);
        }
    }
}

/// Starts returning every agent the rollout reached to its previous version (the caller bumps
/// the revision).
pub(super) fn begin_rollback(mut r: Rollout, now: i64, actor: String) -> Step {
    r.state = RolloutState::RollingBack;
    r.rollback_started_ms = Some(now);
    r.updated_ms = now;
    let e = event(&r, now, "rollback_started", actor, serde_json::Value::Null);
    Step {
        next: r,
        events: vec![e],
        finish: None,
    }
}

pub(super) fn event(
    r: &Rollout,
    now: i64,
    kind: &str,
    actor: String,
    detail: serde_json::Value,
) -> RolloutEvent {
    RolloutEvent {
        rollout_id: r.id,
        at_ms: now,
        kind: kind.into(),
        actor,
        stage: Some(r.stage),
        detail,
    }
}

fn gate_detail(g: &GateResult) -> serde_json::Value {
    serde_json::to_value(g).unwrap_or(serde_json::Value::Null)
}
