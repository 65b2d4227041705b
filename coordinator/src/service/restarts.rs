//! Restarting agents (OpAMP's Restart command, facts §3.12): one agent, or every agent a
//! target admits in batches. Only agents that declare AcceptsRestartCommand are sent the
//! command; the others are listed as unable. An agent counts as restarted once it has
//! connected again after the command and is healthy; one that has not within the deadline
//! fails, and a batch that takes the failures past the budget stops the restart there.
//!
//! A group restart is driven by the coordinator that was asked, and kept in its memory (the
//! last [`KEPT_JOBS`]); the commands reach each agent through whichever coordinator serves
//! it. If that coordinator stops, the restart stops with it: the audit log has what was
//! sent.

use std::sync::Arc;
use std::time::Duration;

use proto::agent_caps::{ACCEPTS_RESTART_COMMAND, REPORTS_HEALTH};
use serde::Serialize;
use shared::bus::ControlEvent;
use shared::domain::{AgentRecord, Target, Transport};
use shared::ids::InstanceUid;
use shared::now_ms;
use utoipa::ToSchema;

use super::{Coordinator, ServiceError};
use crate::session;

/// Restart commands sent (to one agent, or a member of a group restart).
pub const COMMANDS: &str = "ampora_agent_restart_commands_total";
/// Members of group restarts by outcome: restarted, failed, not_sent.
pub const OUTCOMES: &str = "ampora_agent_restarts_total";

pub fn describe_metrics() {
    metrics::describe_counter!(COMMANDS, "Restart commands sent to agents");
    metrics::describe_counter!(
        OUTCOMES,
        "Members of group restarts by outcome: restarted (back and healthy within the deadline), failed, not_sent (the restart stopped first)"
    );
    metrics::counter!(COMMANDS).absolute(0);
    for outcome in ["restarted", "failed", "not_sent"] {
        metrics::counter!(OUTCOMES, "outcome" => outcome).absolute(0);
    }
}

/// Group restarts remembered per coordinator, newest last.
pub const KEPT_JOBS: usize = 50;

/// How often a running batch looks at its agents.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// What an operator asks for.
#[derive(Debug, Clone)]
pub struct RestartPlan {
    pub target: Target,
    /// Agents restarting at once.
    pub batch: usize,
    /// How long each batch's agents have to come back healthy.
    pub deadline_ms: i64,
    /// Agents that may fail to come back before the restart stops.
    pub budget: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RestartMember {
    pub uid: String,
    /// waiting, restarting, restarted, failed, not_sent (the restart stopped first).
    pub state: &'static str,
    pub sent_ms: Option<i64>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RestartJob {
    pub id: u64,
    /// running, succeeded, stopped.
    pub state: &'static str,
    pub reason: Option<String>,
    pub author: String,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    pub batch: usize,
    pub deadline_ms: i64,
    pub budget: u64,
    pub members: Vec<RestartMember>,
    /// Agents the target admits that do not declare AcceptsRestartCommand: never sent it.
    pub unable: Vec<String>,
}

impl Coordinator {
    /// Sends one agent the Restart command, through whichever coordinator serves it.
    pub async fn restart_agent(&self, uid: InstanceUid, actor: &str) -> Result<(), ServiceError> {
        let record = self
            .agent(uid)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("agent {uid}")))?;
        if record.capabilities & ACCEPTS_RESTART_COMMAND == 0 {
            return Err(ServiceError::Conflict(format!(
                "agent {uid} does not accept the restart command (AcceptsRestartCommand)"
            )));
        }
        self.audit_op(actor, "agent.restart", Some(uid), serde_json::json!({}))
            .await?;
        self.send_restart(uid).await;
        Ok(())
    }

    async fn send_restart(&self, uid: InstanceUid) {
        metrics::counter!(COMMANDS).increment(1);
        if self.slot(&uid).is_some() {
            self.restart_here(uid).await;
        } else {
            // Lost with the bus: the restart counts it failed at its deadline.
            let _ = self.bus.broadcast(ControlEvent::RestartAgent { uid }).await;
        }
    }

    /// Sends the command to one of this coordinator's agents: at once over WebSocket, as the
    /// answer to its next poll over HTTP.
    pub(super) async fn restart_here(&self, uid: InstanceUid) {
        let Some(slot) = self.slot(&uid) else { return };
        let mut e = slot.lock().await;
        if !e.state.record.connected {
            return;
        }
        if e.state.record.transport == Some(Transport::Http) {
            e.state.restart_pending = true;
            return;
        }
        drop(e);
        self.deliver(uid, session::restart_reply(uid.as_bytes()))
            .await;
    }

    /// Starts restarting the agents `plan.target` admits, in batches; returns the job as it
    /// starts.
    pub async fn start_restart(
        self: &Arc<Self>,
        plan: RestartPlan,
        actor: &str,
    ) -> Result<RestartJob, ServiceError> {
        if plan.batch == 0 || plan.deadline_ms <= 0 {
            return Err(ServiceError::Invalid(
                "batch must be 1 or more and the deadline above 0".into(),
            ));
        }
        let agents = self.agents().await?;
        let (mut able, mut unable) = (Vec::new(), Vec::new());
        for r in agents
            .iter()
            .filter(|r| self.target_admits(&plan.target, r))
        {
            if r.capabilities & ACCEPTS_RESTART_COMMAND != 0 {
                able.push(r.instance_uid);
            } else {
                unable.push(r.instance_uid.to_string());
            }
        }
        if able.is_empty() {
            return Err(ServiceError::Conflict(format!(
                "none of these agents accepts the restart command ({} do not)",
                unable.len()
            )));
        }
        let job = {
            let mut jobs = self
                .restart_jobs
                .lock()
                .map_err(|_| ServiceError::Internal("restart jobs unavailable".into()))?;
            let id = jobs.last().map_or(1, |j| j.id + 1);
            let job = RestartJob {
                id,
                state: "running",
                reason: None,
                author: actor.to_owned(),
                created_ms: now_ms(),
                finished_ms: None,
                batch: plan.batch,
                deadline_ms: plan.deadline_ms,
                budget: plan.budget,
                members: able
                    .iter()
                    .map(|u| RestartMember {
                        uid: u.to_string(),
                        state: "waiting",
                        sent_ms: None,
                        reason: None,
                    })
                    .collect(),
                unable,
            };
            jobs.push(job.clone());
            if jobs.len() > KEPT_JOBS {
                jobs.remove(0);
            }
            job
        };
        self.audit_op(
            actor,
            "restart.start",
            None,
            serde_json::json!({
                "restart_id": job.id, "target": plan.target, "agents": able.len(),
                "unable": job.unable.len(), "batch": plan.batch, "budget": plan.budget,
            }),
        )
        .await?;
        let me = self.clone();
        let author = actor.to_owned();
        tokio::spawn(async move { me.drive_restart(job.id, able, plan, author).await });
        Ok(job)
    }

    /// The group restarts this coordinator drove, newest first.
    pub fn restart_jobs(&self) -> Vec<RestartJob> {
        let mut jobs = self
            .restart_jobs
            .lock()
            .map(|j| j.clone())
            .unwrap_or_default();
        jobs.reverse();
        jobs
    }

    fn update_job(&self, id: u64, f: impl FnOnce(&mut RestartJob)) {
        if let Ok(mut jobs) = self.restart_jobs.lock() {
            if let Some(j) = jobs.iter_mut().find(|j| j.id == id) {
                f(j);
            }
        }
    }

    fn set_member(&self, id: u64, uid: InstanceUid, state: &'static str, reason: Option<String>) {
        if state != "restarting" {
            metrics::counter!(OUTCOMES, "outcome" => state).increment(1);
        }
        let uid = uid.to_string();
        self.update_job(id, |j| {
            if let Some(m) = j.members.iter_mut().find(|m| m.uid == uid) {
                m.state = state;
                if state == "restarting" {
                    m.sent_ms = Some(now_ms());
                }
                m.reason = reason;
            }
        });
    }

    async fn drive_restart(
        &self,
        id: u64,
        agents: Vec<InstanceUid>,
        plan: RestartPlan,
        actor: String,
    ) {
        let mut failed = 0u64;
        let mut restarted = 0u64;
        let mut stopped = None;
        for batch in agents.chunks(plan.batch) {
            let sent = now_ms();
            for &uid in batch {
                self.set_member(id, uid, "restarting", None);
                if let Err(e) = self
                    .audit_op(
                        &actor,
                        "agent.restart",
                        Some(uid),
                        serde_json::json!({ "restart_id": id }),
                    )
                    .await
                {
                    tracing::warn!(error = %e, "auditing a restart failed");
                }
                self.send_restart(uid).await;
            }
            let mut left: Vec<InstanceUid> = batch.to_vec();
            let deadline = sent + plan.deadline_ms;
            while !left.is_empty() && now_ms() < deadline {
                tokio::time::sleep(LOOK_EVERY).await;
                let mut still = Vec::with_capacity(left.len());
                for uid in left {
                    match self.agent(uid).await {
                        Ok(Some(r)) if came_back(&r, sent) => {
                            restarted += 1;
                            self.set_member(id, uid, "restarted", None);
                        }
                        _ => still.push(uid),
                    }
                }
                left = still;
            }
            for uid in left {
                failed += 1;
                let why = format!(
                    "did not reconnect healthy within {} s of the command",
                    plan.deadline_ms / 1000
                );
                self.set_member(id, uid, "failed", Some(why));
            }
            if failed > plan.budget {
                stopped = Some(format!(
                    "{failed} agent(s) did not come back, more than the budget of {}",
                    plan.budget
                ));
                break;
            }
        }
        let state = if stopped.is_some() {
            "stopped"
        } else {
            "succeeded"
        };
        self.update_job(id, |j| {
            j.state = state;
            j.reason = stopped.clone();
            j.finished_ms = Some(now_ms());
            for m in j.members.iter_mut().filter(|m| m.state == "waiting") {
                m.state = "not_sent";
                metrics::counter!(OUTCOMES, "outcome" => "not_sent").increment(1);
            }
        });
        if let Err(e) = self
            .audit_op(
                &actor,
                "restart.finished",
                None,
                serde_json::json!({
                    "restart_id": id, "state": state, "restarted": restarted,
                    "failed": failed, "reason": stopped,
                }),
            )
            .await
        {
            tracing::warn!(error = %e, "auditing a restart failed");
        }
    }
}

/// Connected again since the command, and healthy (or not reporting health).
fn came_back(r: &AgentRecord, sent_ms: i64) -> bool {
    let healthy =
        r.capabilities & REPORTS_HEALTH == 0 || r.health.as_ref().is_some_and(|h| h.healthy);
    r.connected && r.connected_ms > sent_ms && healthy
}
