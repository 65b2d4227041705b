//! Restarting agents (OpAMP's Restart command, facts §3.12): one agent, or every agent a
//! target admits in batches. Only agents that declare AcceptsRestartCommand are sent the
//! command; the others are listed as unable. An agent counts as restarted once it has
//! connected again after the command and is healthy; one that has not within the deadline
//! fails, and a batch that takes the failures past the budget stops the restart there.
//!
//! This file owns what operators do (restart one agent, start a group restart, read them);
//! [`super::restart_driver`] moves group restarts through their batches. A group restart is
//! a row of the store, so every coordinator lists it, and it is driven by the holder of one
//! partition's lease: a coordinator that stops hands its restarts over with its leases.

use proto::agent_caps::ACCEPTS_RESTART_COMMAND;
use serde::{Deserialize, Serialize};
use shared::bus::ControlEvent;
use shared::domain::{Target, Transport};
use shared::ids::InstanceUid;
use shared::now_ms;
use shared::store::StoredRestart;
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

/// Group restarts listed, newest first.
pub const LISTED: u32 = 50;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    Waiting,
    Restarting,
    Restarted,
    Failed,
    /// The restart stopped before this agent's batch.
    NotSent,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Restarting => "restarting",
            Self::Restarted => "restarted",
            Self::Failed => "failed",
            Self::NotSent => "not_sent",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Succeeded,
    Stopped,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RestartMember {
    pub uid: String,
    pub state: MemberState,
    pub sent_ms: Option<i64>,
    pub reason: Option<String>,
    /// The agent's connection (its ownership epoch) when it was sent the command: it came
    /// back on a newer one. `None` for agents not connected over WebSocket then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_epoch: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RestartJob {
    /// Given by the store (the row's id; not in the stored body).
    #[serde(default)]
    pub id: i64,
    /// The store's revision: each write bumps it, compared so that writes never cross.
    #[serde(skip)]
    pub rev: i64,
    pub state: JobState,
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

impl RestartJob {
    /// A stored restart, with its id and revision from the row.
    pub(super) fn from_stored(s: &StoredRestart) -> Result<Self, ServiceError> {
        let mut job: Self = serde_json::from_str(&s.body)
            .map_err(|e| ServiceError::Internal(format!("restart {}: stored body: {e}", s.id)))?;
        job.id = s.id;
        job.rev = s.rev;
        Ok(job)
    }

    pub(super) fn body(&self) -> Result<String, ServiceError> {
        serde_json::to_string(self)
            .map_err(|e| ServiceError::Internal(format!("restart {}: encoding: {e}", self.id)))
    }
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

    pub(super) async fn send_restart(&self, uid: InstanceUid) {
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
        &self,
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
        let mut job = RestartJob {
            id: 0,
            rev: 1,
            state: JobState::Running,
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
                    state: MemberState::Waiting,
                    sent_ms: None,
                    reason: None,
                    sent_epoch: None,
                })
                .collect(),
            unable,
        };
        job.id = self
            .store
            .create_restart(JobState::Running.as_str(), &job.body()?, job.created_ms)
            .await?;
        let audited = self
            .audit_op(
                actor,
                "restart.start",
                None,
                serde_json::json!({
                    "restart_id": job.id, "target": plan.target, "agents": able.len(),
                    "unable": job.unable.len(), "batch": plan.batch, "budget": plan.budget,
                }),
            )
            .await;
        if let Err(e) = audited {
            // Nothing is sent for a restart whose start is not in the audit log.
            let mut stopped = job.clone();
            stopped.state = JobState::Stopped;
            stopped.reason = Some("its start could not be audited".into());
            stopped.finished_ms = Some(now_ms());
            stopped.rev = 2;
            self.store
                .update_restart(stopped.id, 2, "stopped", &stopped.body()?, None)
                .await?;
            return Err(e);
        }
        self.restart_wake.notify_one();
        Ok(job)
    }

    /// The newest `limit` group restarts, newest first.
    pub async fn restart_jobs(&self, limit: u32) -> Result<Vec<RestartJob>, ServiceError> {
        self.store
            .list_restarts(limit)
            .await?
            .iter()
            .map(RestartJob::from_stored)
            .collect()
    }

    pub async fn restart_job(&self, id: i64) -> Result<Option<RestartJob>, ServiceError> {
        self.store
            .get_restart(id)
            .await?
            .as_ref()
            .map(RestartJob::from_stored)
            .transpose()
    }
}
