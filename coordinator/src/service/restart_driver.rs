//! The group-restart driver. Every coordinator runs [`run_restarts`]; a restart is driven by
//! the coordinator holding the lease of partition `id % PARTITIONS` (as a rollout is), and
//! every write it makes is fenced by that lease and compared by revision. So exactly one
//! coordinator moves a restart at a time, and a take-over continues from the stored job: the
//! members restarting keep the time they were sent the command, so their deadline holds.
//!
//! One step per look (every [`LOOK_EVERY`] while this coordinator drives a restart, every
//! [`IDLE_LOOK`] otherwise, and at once when a restart starts here): members of the batch
//! that came back are restarted, those past the deadline failed; once the batch is decided,
//! the budget stops the restart or the next batch is sent, until none is left.
//!
//! The step is written before its commands are sent: a coordinator that stops between the
//! two leaves the batch unsent (its agents fail at the deadline) rather than restarting
//! agents twice. A driver still loading partitions it took over does not step: the agents
//! in them have no slot yet, and a command sent to them would be lost.
//!
//! "Came back" means on a newer connection than the one the command went to (the gateway's
//! ownership epoch, noted when the batch is sent), connected and healthy: a coordinator that
//! takes an agent over sees its first frame as a new connection, so the connection time
//! alone would count agents that never restarted.

use std::collections::HashSet;
use std::sync::Weak;
use std::time::Duration;

use proto::agent_caps::REPORTS_HEALTH;
use shared::domain::{AgentRecord, Transport};
use shared::ids::InstanceUid;
use shared::now_ms;
use shared::rollout::Fence;

use super::restarts::{JobState, MemberState, RestartJob, OUTCOMES};
use super::rollouts::driver_partition;
use super::Coordinator;

/// How often a restart being driven here is looked at.
const LOOK_EVERY: Duration = Duration::from_millis(250);
/// How often the store is asked for restarts when none is driven here: how long a restart
/// started through another coordinator, or one whose driver stopped, may wait for its first
/// look here.
const IDLE_LOOK: Duration = Duration::from_secs(1);

pub(super) async fn run_restarts(weak: Weak<Coordinator>) {
    loop {
        let Some(c) = weak.upgrade() else { return };
        if c.is_stopping() {
            return;
        }
        let wake = c.restart_wake.clone();
        let driving = c.restart_tick().await;
        drop(c);
        let pause = if driving { LOOK_EVERY } else { IDLE_LOOK };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = wake.notified() => {}
        }
    }
}

/// What one look decided: the job's next revision and the agents to send the command.
#[derive(Debug)]
pub(super) struct Step {
    pub next: RestartJob,
    pub send: Vec<InstanceUid>,
}

/// The next step of `job` at `now`, given the members that came back; `None` when nothing
/// changed.
pub(super) fn step(job: &RestartJob, back: &HashSet<String>, now: i64) -> Option<Step> {
    if job.state != JobState::Running {
        return None;
    }
    let mut next = job.clone();
    let mut changed = false;
    let mut deciding = false;
    for m in next
        .members
        .iter_mut()
        .filter(|m| m.state == MemberState::Restarting)
    {
        if back.contains(&m.uid) {
            m.state = MemberState::Restarted;
            changed = true;
        } else if now >= m.sent_ms.unwrap_or(0).saturating_add(job.deadline_ms) {
            m.state = MemberState::Failed;
            m.reason = Some(format!(
                "did not reconnect healthy within {} s of the command",
                job.deadline_ms / 1000
            ));
            changed = true;
        } else {
            deciding = true;
        }
    }
    let mut send = Vec::new();
    if !deciding {
        let failed = next
            .members
            .iter()
            .filter(|m| m.state == MemberState::Failed)
            .count() as u64;
        if failed > job.budget {
            next.state = JobState::Stopped;
            next.reason = Some(format!(
                "{failed} agent(s) did not come back, more than the budget of {}",
                job.budget
            ));
        } else {
            for m in next
                .members
                .iter_mut()
                .filter(|m| m.state == MemberState::Waiting)
                .take(job.batch.max(1))
            {
                m.state = MemberState::Restarting;
                m.sent_ms = Some(now);
                if let Ok(uid) = m.uid.parse::<InstanceUid>() {
                    send.push(uid);
                }
            }
            if send.is_empty() {
                next.state = JobState::Succeeded;
            }
        }
        if next.state != JobState::Running {
            next.finished_ms = Some(now);
            for m in next
                .members
                .iter_mut()
                .filter(|m| m.state == MemberState::Waiting)
            {
                m.state = MemberState::NotSent;
            }
        }
        changed = true;
    }
    changed.then(|| {
        next.rev = job.rev + 1;
        Step { next, send }
    })
}

/// Connected again since the command, and healthy (or not reporting health).
fn came_back(r: &AgentRecord, sent_ms: i64) -> bool {
    let healthy =
        r.capabilities & REPORTS_HEALTH == 0 || r.health.as_ref().is_some_and(|h| h.healthy);
    r.connected && r.connected_ms > sent_ms && healthy
}

impl Coordinator {
    /// Looks at the running restarts this coordinator drives; true when it drives one.
    async fn restart_tick(&self) -> bool {
        if self.lease_lapsed() {
            return false;
        }
        let running = match self
            .store
            .list_restarts_in(JobState::Running.as_str())
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "restart driver: reading restarts failed");
                return false;
            }
        };
        let held = self.held();
        let mut driving = false;
        for stored in running {
            let Some(&fence) = held.get(&driver_partition(stored.id)) else {
                continue;
            };
            driving = true;
            let job = match RestartJob::from_stored(&stored) {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(error = %e, "restart driver: skipping a restart");
                    continue;
                }
            };
            // Agents of partitions being taken over have no slot yet: a command sent now
            // would be lost.
            if self.loading() {
                continue;
            }
            let back = self.came_back_of(&job).await;
            let now = now_ms();
            let Some(mut step) = step(&job, &back, now) else {
                continue;
            };
            self.note_connections(&mut step).await;
            let fence = Fence {
                node: self.cfg.node.clone(),
                partition: driver_partition(job.id),
                fence,
                now_ms: now,
            };
            let wrote = match step.next.body() {
                Ok(body) => self
                    .store
                    .update_restart(
                        job.id,
                        step.next.rev,
                        step.next.state.as_str(),
                        &body,
                        Some(&fence),
                    )
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match wrote {
                Ok(true) => self.carry_out_restart_step(&job, step).await,
                // The lease moved on: the next driver starts from the stored job.
                Ok(false) => {}
                Err(e) => tracing::warn!(restart = job.id, error = %e, "restart write failed"),
            }
        }
        driving
    }

    /// Notes the connection each agent of a new batch is on, before the command goes out; an
    /// agent on none (and not polling over HTTP) fails at once, unsent.
    async fn note_connections(&self, step: &mut Step) {
        if step.send.is_empty() {
            return;
        }
        let owners = match self.ownership.lookup_many(&step.send).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "restart driver: ownership lookup failed");
                return;
            }
        };
        let mut unreachable = Vec::new();
        for (&uid, owner) in step.send.iter().zip(owners) {
            let http = match self.slot(&uid) {
                Some(slot) => slot.lock().await.state.record.transport,
                None => self
                    .store
                    .get_agent(uid)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|r| r.transport),
            } == Some(Transport::Http);
            let key = uid.to_string();
            let Some(m) = step.next.members.iter_mut().find(|m| m.uid == key) else {
                continue;
            };
            match owner {
                Some(o) => m.sent_epoch = Some(o.epoch),
                // Answered at its next poll.
                None if http => {}
                // Not connected (or between connections): the command would go nowhere, and
                // a later connection would look like a restart.
                None => {
                    m.state = MemberState::Failed;
                    m.reason = Some("not connected when its batch was sent".into());
                    unreachable.push(uid);
                }
            }
        }
        step.send.retain(|u| !unreachable.contains(u));
    }

    /// The members restarting that have come back since their command: on a newer
    /// connection than the one they had (a coordinator taking an agent over sees its old
    /// connection as new), or, without one noted, connected since.
    async fn came_back_of(&self, job: &RestartJob) -> HashSet<String> {
        let mut back = HashSet::new();
        for m in job
            .members
            .iter()
            .filter(|m| m.state == MemberState::Restarting)
        {
            let (Some(uid), Some(sent)) = (m.uid.parse::<InstanceUid>().ok(), m.sent_ms) else {
                continue;
            };
            let record = match self.slot(&uid) {
                Some(slot) => Some(slot.lock().await.state.record.clone()),
                None => self.store.get_agent(uid).await.ok().flatten(),
            };
            if !record.is_some_and(|r| came_back(&r, sent)) {
                continue;
            }
            let reconnected = match m.sent_epoch {
                Some(before) => match self.ownership.lookup(uid).await {
                    Ok(owner) => owner.is_some_and(|o| o.epoch > before),
                    Err(_) => false,
                },
                None => true,
            };
            if reconnected {
                back.insert(m.uid.clone());
            }
        }
        back
    }

    /// What a written step does: counts its outcomes, audits and sends the commands of a new
    /// batch, and audits the end.
    async fn carry_out_restart_step(&self, before: &RestartJob, step: Step) {
        let next = &step.next;
        for (was, now) in before.members.iter().zip(&next.members) {
            if was.state != now.state && now.state != MemberState::Restarting {
                metrics::counter!(OUTCOMES, "outcome" => now.state.as_str()).increment(1);
            }
        }
        for uid in step.send {
            let audited = self
                .audit_op(
                    &next.author,
                    "agent.restart",
                    Some(uid),
                    serde_json::json!({ "restart_id": next.id }),
                )
                .await;
            if let Err(e) = audited {
                tracing::warn!(error = %e, "auditing a restart failed");
            }
            self.send_restart(uid).await;
        }
        if next.state != JobState::Running {
            let count = |s: MemberState| next.members.iter().filter(|m| m.state == s).count();
            let audited = self
                .audit_op(
                    &next.author,
                    "restart.finished",
                    None,
                    serde_json::json!({
                        "restart_id": next.id, "state": next.state.as_str(),
                        "restarted": count(MemberState::Restarted),
                        "failed": count(MemberState::Failed), "reason": next.reason,
                    }),
                )
                .await;
            if let Err(e) = audited {
                tracing::warn!(error = %e, "auditing a restart failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::restarts::RestartMember;

    fn job(members: usize, batch: usize, budget: u64) -> RestartJob {
        RestartJob {
            id: 7,
            rev: 1,
            state: JobState::Running,
            reason: None,
            author: "api:test".into(),
            created_ms: 0,
            finished_ms: None,
            batch,
            deadline_ms: 1_000,
            budget,
            members: (0..members)
                .map(|_| RestartMember {
                    uid: InstanceUid::new_v7().to_string(),
                    state: MemberState::Waiting,
                    sent_ms: None,
                    reason: None,
                    sent_epoch: None,
                })
                .collect(),
            unable: Vec::new(),
        }
    }

    fn states(j: &RestartJob) -> Vec<&'static str> {
        j.members.iter().map(|m| m.state.as_str()).collect()
    }

    #[test]
    fn batches_go_one_after_another_and_the_job_succeeds() {
        let j = job(3, 2, 0);
        let s = step(&j, &HashSet::new(), 100).expect("first batch");
        assert_eq!(s.send.len(), 2);
        assert_eq!(s.next.rev, 2);
        assert_eq!(states(&s.next), ["restarting", "restarting", "waiting"]);
        assert!(
            step(&s.next, &HashSet::new(), 500).is_none(),
            "nothing changes while the batch is within its deadline"
        );
        let back: HashSet<String> = s.next.members[..2].iter().map(|m| m.uid.clone()).collect();
        let s = step(&s.next, &back, 600).expect("second batch");
        assert_eq!(states(&s.next), ["restarted", "restarted", "restarting"]);
        assert_eq!(s.send.len(), 1);
        assert_eq!(s.next.members[2].sent_ms, Some(600));
        let back = HashSet::from([s.next.members[2].uid.clone()]);
        let s = step(&s.next, &back, 700).expect("done");
        assert_eq!(s.next.state, JobState::Succeeded);
        assert_eq!(s.next.finished_ms, Some(700));
        assert!(s.send.is_empty());
        assert!(step(&s.next, &back, 800).is_none(), "a finished job stays");
    }

    #[test]
    fn a_batch_past_the_budget_stops_the_rest() {
        let j = job(4, 2, 0);
        let s = step(&j, &HashSet::new(), 0).expect("first batch");
        let back = HashSet::from([s.next.members[0].uid.clone()]);
        assert!(
            step(&s.next, &back, 999).is_some_and(|t| t.send.is_empty()),
            "one back, the other still within its deadline: no new batch"
        );
        let s = step(&s.next, &HashSet::new(), 1_000).expect("the deadline");
        assert_eq!(s.next.state, JobState::Stopped);
        assert_eq!(
            states(&s.next),
            ["failed", "failed", "not_sent", "not_sent"]
        );
        assert!(s.send.is_empty(), "no more commands");
        assert!(s.next.reason.is_some_and(|r| r.contains("budget of 0")));
    }

    #[test]
    fn failures_within_the_budget_go_on() {
        let j = job(2, 1, 1);
        let s = step(&j, &HashSet::new(), 0).expect("first batch");
        let s = step(&s.next, &HashSet::new(), 1_000).expect("failed, next batch");
        assert_eq!(states(&s.next), ["failed", "restarting"]);
        assert_eq!(s.send.len(), 1);
        assert_eq!(s.next.state, JobState::Running);
    }

    #[test]
    fn a_take_over_keeps_each_members_deadline() {
        let j = job(1, 1, 0);
        let sent = step(&j, &HashSet::new(), 5_000).expect("sent").next;
        // Another coordinator reads the stored job later: the deadline counts from the
        // command, not from the take-over.
        let stored: RestartJob =
            serde_json::from_str(&sent.body().expect("body")).expect("decoded");
        assert_eq!(stored.members[0].sent_ms, Some(5_000));
        let mut stored = stored;
        stored.rev = sent.rev;
        assert!(step(&stored, &HashSet::new(), 5_999).is_none());
        let s = step(&stored, &HashSet::new(), 6_000).expect("failed");
        assert_eq!(s.next.state, JobState::Stopped);
        assert_eq!(s.next.rev, 3);
    }
}
