//! What operators do with rollouts, from the API and the console alike: create one (plan its
//! stages and record its members), pause, resume, promote, abort, roll back; and the status
//! view with each stage's live progress. Every action is written compared by revision (an
//! operator and the driver never overwrite each other), recorded in the rollout's history
//! and audited with who did it.

use std::collections::HashMap;

use proto::agent_caps::{REPORTS_EFFECTIVE_CONFIG, REPORTS_HEALTH};
use serde::Serialize;
use shared::bus::ControlEvent;
use shared::domain::{AgentRecord, Target};
use shared::ids::InstanceUid;
use shared::now_ms;
use shared::rollout::{
    Amount, GateResult, NewRollout, OnFailure, PackageChange, Rollout, RolloutEvent, RolloutState,
    Stage,
};
use shared::store::StoreError;
use utoipa::ToSchema;

use super::engine::{begin_rollback, event, finish, Step};
use super::gates::{self, Progress};
use super::plan::{self, Candidate};
use super::{Holding, Live};
use crate::service::{Coordinator, ServiceError};

/// Agents named in a status view's "cannot receive" list.
const NAMED_UNABLE: usize = 100;

/// Writes retried when an action meets a concurrent write (the driver's, usually).
const ACTION_ATTEMPTS: usize = 5;

/// What a rollout brings its agents to.
#[derive(Debug, Clone)]
pub enum Payload {
    /// A config version.
    Config(i64),
    /// A package version: an upgrade.
    Package { name: String, version: String },
}

/// A rollout as asked for.
#[derive(Debug, Clone)]
pub struct RolloutPlan {
    pub payload: Payload,
    /// A group's name, or else `target`.
    pub group: Option<String>,
    pub target: Target,
    pub stages: Vec<Amount>,
    pub soak_ms: i64,
    pub deadline_ms: i64,
    pub budget: Amount,
    pub on_failure: OnFailure,
    /// An upgrade may take agents to an older version than they run (said explicitly).
    pub allow_downgrade: bool,
    /// A config rollout goes ahead though the config fails its pre-flight check for some
    /// of its agents (audited as forced).
    pub force: bool,
}

/// An operator action on a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    /// Start the next stage now (or finish), without waiting for the soak or the gate.
    Promote,
    Abort,
    Rollback,
}

impl Action {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            "promote" => Self::Promote,
            "abort" => Self::Abort,
            "rollback" => Self::Rollback,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Promote => "promote",
            Self::Abort => "abort",
            Self::Rollback => "rollback",
        }
    }
}

/// A rollout with each stage's live progress.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RolloutStatus {
    #[schema(value_type = Object)]
    pub rollout: Rollout,
    pub stages: Vec<StageStatus>,
    /// Members (and joiners) that cannot be judged on health: no ReportsHealth.
    pub health_unknown: u64,
    /// Members that cannot be judged on effective config: no ReportsEffectiveConfig.
    pub effective_unknown: u64,
    /// Agents matching the target now without AcceptsRemoteConfig: left out.
    pub cannot_receive: u64,
    #[schema(value_type = Vec<String>)]
    pub cannot_receive_sample: Vec<InstanceUid>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StageStatus {
    /// The stage's cumulative size as given (`1`, `5%`, `100%`).
    pub size: String,
    pub planned: u64,
    pub started_ms: Option<i64>,
    pub settled_ms: Option<i64>,
    pub soak_ms: i64,
    /// Answers of this stage's members to the rollout's config now.
    pub progress: Progress,
    #[schema(value_type = Option<Object>)]
    pub gate: Option<GateResult>,
}

impl Coordinator {
    /// Plans and records a rollout; the driver starts it on its next tick.
    pub async fn create_rollout(
        &self,
        want: RolloutPlan,
        author: &str,
    ) -> Result<Rollout, ServiceError> {
        plan::check_stages(&want.stages).map_err(ServiceError::Invalid)?;
        if want.soak_ms < 0 || want.deadline_ms <= 0 {
            return Err(ServiceError::Invalid(
                "soak must be 0 or more and the deadline above 0".into(),
            ));
        }
        let (config_id, config_hash, package) = match &want.payload {
            Payload::Config(id) => match self.load_desired(*id).await {
                Ok(d) => (*id, d.hash_hex.clone(), None),
                Err(StoreError::NotFound(m)) => return Err(ServiceError::NotFound(m)),
                Err(e) => return Err(e.into()),
            },
            Payload::Package { name, version } => (
                0,
                String::new(),
                Some(self.upgrade_to(name, version).await?),
            ),
        };
        // One creation at a time in this process, so two cannot both pass the overlap check.
        let _one = self.rollout_create.lock().await;
        let agents = self.agents().await?;
        if let Some((id, state, n)) = self.overlap(&want.target, &agents, Holding::Any) {
            return Err(ServiceError::Conflict(format!(
                "{n} of these agents are in rollout {id} ({state}): finish, abort or roll it back first"
            )));
        }
        let now = now_ms();
        match &want.payload {
            Payload::Package { name, version } => {
                self.check_downgrade(name, version, &want.target, &agents, want.allow_downgrade)?;
            }
            Payload::Config(id) => {
                self.preflight_gate(*id, &want.target, &agents, want.force, author)
                    .await?;
            }
        }
        let matching: Vec<&AgentRecord> = agents
            .iter()
            .filter(|r| self.target_admits(&want.target, r))
            .collect();
        let candidates: Vec<Candidate> = matching
            .iter()
            .filter(|r| self.can_receive(package.as_ref(), r))
            .map(|r| Candidate {
                uid: r.instance_uid,
                preferred: r.connected && !gates::unhealthy(r),
                from_config: r.assigned_config,
            })
            .collect();
        let cannot_receive = (matching.len() - candidates.len()) as u64;
        let sizes = plan::stage_sizes(&want.stages, candidates.len() as u64);
        let seed = u64::try_from(now).unwrap_or(0) ^ config_id.unsigned_abs();
        let members = plan::assign_stages(seed, &sizes, candidates);
        let stages = want
            .stages
            .iter()
            .zip(&sizes)
            .map(|(&size, &planned)| Stage {
                size,
                soak_ms: want.soak_ms,
                planned,
                started_ms: None,
                settled_ms: None,
                gate: None,
            })
            .collect();
        let created = RolloutEvent {
            rollout_id: 0,
            at_ms: now,
            kind: "created".into(),
            actor: author.into(),
            stage: None,
            detail: serde_json::json!({
                "members": members.len(),
                "planned": sizes,
                "cannot_receive": cannot_receive,
            }),
        };
        let new = NewRollout {
            config_id,
            config_hash,
            package,
            group: want.group.clone(),
            target: want.target.clone(),
            stages,
            budget: want.budget,
            deadline_ms: want.deadline_ms,
            on_failure: want.on_failure,
            cannot_receive,
            author: author.into(),
            created_ms: now,
        };
        let rollout = self.store.create_rollout(new, &members, created).await?;
        drop(_one);
        self.audit_op(
            author,
            "rollout.create",
            None,
            serde_json::json!({
                "rollout_id": rollout.id, "config_id": rollout.config_id,
                "package": rollout.package, "allow_downgrade": want.allow_downgrade,
                "group": rollout.group, "target": rollout.target,
                "stages": want.stages.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "members": members.len(),
            }),
        )
        .await?;
        self.sync_rollouts().await;
        let _ = self
            .bus
            .broadcast(ControlEvent::RolloutChanged {
                rollout_id: rollout.id,
            })
            .await;
        Ok(rollout)
    }

    /// Applies an operator action; `Conflict` when the rollout's state does not allow it.
    pub async fn rollout_action(
        &self,
        id: i64,
        action: Action,
        actor: &str,
    ) -> Result<Rollout, ServiceError> {
        for _ in 0..ACTION_ATTEMPTS {
            let r = self
                .store
                .get_rollout(id)
                .await?
                .ok_or_else(|| ServiceError::NotFound(format!("rollout {id}")))?;
            let from = r.state;
            let step = self.action_step(r, action, actor)?;
            let next = step.next.clone();
            if self.commit_step(step, None).await? {
                self.audit_op(
                    actor,
                    &format!("rollout.{}", action.as_str()),
                    None,
                    serde_json::json!({
                        "rollout_id": id, "from": from, "to": next.state, "stage": next.stage,
                    }),
                )
                .await?;
                self.sync_rollouts().await;
                return Ok(next);
            }
        }
        Err(ServiceError::Conflict(format!(
            "rollout {id} kept changing; try again"
        )))
    }

    fn action_step(&self, r: Rollout, action: Action, actor: &str) -> Result<Step, ServiceError> {
        use RolloutState as S;
        let now = now_ms();
        let refuse = || {
            ServiceError::Conflict(format!(
                "cannot {} a rollout that is {}",
                action.as_str(),
                r.state
            ))
        };
        let simple = |mut next: Rollout, state: S, kind: &str, reason: Option<String>| {
            next.state = state;
            next.reason = reason;
            next.updated_ms = now;
            next.rev += 1;
            let e = event(&next, now, kind, actor.into(), serde_json::Value::Null);
            Step {
                next,
                events: vec![e],
                finish: None,
            }
        };
        let started = r
            .stages
            .get(r.stage)
            .is_some_and(|s| s.started_ms.is_some());
        Ok(match (action, r.state) {
            (Action::Pause, S::Pending | S::Running) => {
                let why = Some(format!("paused by {actor}"));
                simple(r, S::Paused, "paused", why)
            }
            (Action::Resume, S::Paused) => {
                let state = if started { S::Running } else { S::Pending };
                simple(r, state, "resumed", None)
            }
            (Action::Resume, S::Failed) => {
                // The stage settles, soaks and is judged again: members still reporting
                // FAILED fail it again at once (promote or roll back to get past them).
                let s = r.stage;
                let mut step = simple(r, S::Running, "resumed", None);
                if let Some(st) = step.next.stages.get_mut(s) {
                    st.settled_ms = None;
                    st.gate = None;
                }
                step
            }
            (Action::Promote, S::Running | S::Paused | S::Failed) if started => {
                let mut next = r.clone();
                next.updated_ms = now;
                let promoted = event(
                    &next,
                    now,
                    "promoted",
                    actor.into(),
                    serde_json::Value::Null,
                );
                if r.stage >= r.last_stage() {
                    next.state = S::Succeeded;
                    next.reason = None;
                    next.rev += 1;
                    let done = event(
                        &next,
                        now,
                        "succeeded",
                        actor.into(),
                        serde_json::Value::Null,
                    );
                    Step {
                        finish: Some(finish(&r, now)),
                        next,
                        events: vec![promoted, done],
                    }
                } else {
                    let mut step = self.start_stage(next, r.stage + 1, now, "promoted");
                    step.events.insert(0, promoted);
                    step
                }
            }
            (Action::Abort, S::Pending | S::Running | S::Paused | S::Failed) => {
                let why = Some(format!("aborted by {actor}"));
                simple(r, S::Aborted, "aborted", why)
            }
            (Action::Rollback, S::Running | S::Paused | S::Failed | S::Aborted) => {
                let mut next = r;
                next.rev += 1;
                next.reason = Some(format!("rolled back by {actor}"));
                begin_rollback(next, now, actor.into())
            }
            _ => return Err(refuse()),
        })
    }

    /// A rollout with each stage's progress now.
    pub async fn rollout_status(&self, id: i64) -> Result<RolloutStatus, ServiceError> {
        let rollout = self
            .store
            .get_rollout(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("rollout {id}")))?;
        let members = match self
            .live_rollouts()
            .into_iter()
            .find(|l| l.rollout.id == id)
        {
            Some(l) => l.members,
            None => std::sync::Arc::new(
                self.store
                    .rollout_members(id)
                    .await?
                    .into_iter()
                    .map(|m| (m.instance_uid, m))
                    .collect(),
            ),
        };
        let live = Live {
            rollout: rollout.clone(),
            members,
        };
        let agents = self.agents().await?;
        let by_uid: HashMap<InstanceUid, &AgentRecord> =
            agents.iter().map(|a| (a.instance_uid, a)).collect();
        let (mut health_unknown, mut effective_unknown) = (0, 0);
        let mut stages = Vec::with_capacity(rollout.stages.len());
        for (s, st) in rollout.stages.iter().enumerate() {
            let m = self.stage_members(&live, s, &agents, &by_uid);
            health_unknown += m
                .iter()
                .filter(|r| r.capabilities & REPORTS_HEALTH == 0)
                .count();
            // An upgrade's gates do not look at effective configs.
            if rollout.package.is_none() {
                effective_unknown += m
                    .iter()
                    .filter(|r| r.capabilities & REPORTS_EFFECTIVE_CONFIG == 0)
                    .count();
            }
            stages.push(StageStatus {
                size: st.size.to_string(),
                planned: st.planned,
                started_ms: st.started_ms,
                settled_ms: st.settled_ms,
                soak_ms: st.soak_ms,
                progress: Progress::of(m.iter().copied(), self.want(&rollout)),
                gate: st.gate.clone(),
            });
        }
        let unable: Vec<InstanceUid> = agents
            .iter()
            .filter(|r| {
                self.target_admits(&rollout.target, r)
                    && !self.can_receive(rollout.package.as_ref(), r)
            })
            .map(|r| r.instance_uid)
            .collect();
        Ok(RolloutStatus {
            rollout,
            stages,
            health_unknown: health_unknown as u64,
            effective_unknown: effective_unknown as u64,
            cannot_receive: unable.len() as u64,
            cannot_receive_sample: unable.into_iter().take(NAMED_UNABLE).collect(),
        })
    }

    /// The package version an upgrade brings agents to, checked: package hosting is on, a
    /// build of that version was imported (for some platform), and the catalog is current.
    async fn upgrade_to(&self, name: &str, version: &str) -> Result<PackageChange, ServiceError> {
        if self.cfg.packages.is_none() {
            return Err(ServiceError::Conflict(
                crate::service::packages::HOSTING_OFF.into(),
            ));
        }
        self.sync_packages().await;
        let artifacts = self.store.list_artifacts().await?;
        let Some(build) = artifacts
            .iter()
            .find(|a| a.name == name && a.version == version)
        else {
            return Err(ServiceError::NotFound(format!(
                "no artifact of package {name:?} version {version} was imported"
            )));
        };
        Ok(PackageChange {
            name: name.to_owned(),
            version: version.to_owned(),
            kind: build.kind,
        })
    }

    /// The rollouts that used config version `config_id`, oldest first.
    pub async fn rollouts_of_config(&self, config_id: i64) -> Result<Vec<Rollout>, StoreError> {
        let all = self.store.list_rollouts().await?;
        Ok(all
            .into_iter()
            .filter(|r| r.package.is_none() && r.config_id == config_id)
            .collect())
    }
}
