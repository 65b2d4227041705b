//! Config versions, assignments and their delivery: which config each agent should run (the
//! newest matching assignment, narrowed by token scopes), pushes to connected agents, and
//! the re-read of assignments every lease round that makes a lost broadcast cost seconds, not
//! correctness. Staged rollouts (`super::rollouts`) enter each agent's choice here.

use super::rollouts::Holding;
use super::{Coordinator, ServiceError};
use crate::session::{self, AgentState, Desired};
use shared::bus::{ControlEvent, GatewayMessage};
use shared::domain::{AgentRecord, Assignment, ConfigMap, ConfigVersion, Target, Transport};
use shared::ids::InstanceUid;
use shared::now_ms;
use shared::store::{NewAssignment, NewConfigVersion, StoreError};
use std::collections::HashSet;
use std::sync::Arc;

impl Coordinator {
    /// Loads assignments created by any coordinator since we last looked and applies them to
    /// our agents (pushing configs). Idempotent: pushes go by config hash.
    pub(super) async fn sync_assignments(&self) {
        let all = match self.store.list_assignments().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "loading assignments failed");
                return;
            }
        };
        let known: HashSet<i64> = self
            .assignments
            .read()
            .map(|a| a.iter().map(|a| a.id).collect())
            .unwrap_or_default();
        for a in all.into_iter().filter(|a| !known.contains(&a.id)) {
            if let Err(e) = self.load_desired(a.config_id).await {
                tracing::warn!(error = %e, config_id = a.config_id, "loading assigned config failed");
                continue;
            }
            if let Ok(mut w) = self.assignments.write() {
                w.push(a.clone());
                w.sort_by_key(|a| a.id);
            }
            self.apply_assignment(&a).await;
        }
    }

    pub(super) async fn load_desired(&self, config_id: i64) -> Result<Arc<Desired>, StoreError> {
        if let Some(d) = self
            .desired
            .read()
            .ok()
            .and_then(|m| m.get(&config_id).cloned())
        {
            return Ok(d);
        }
        let version = self
            .store
            .get_config(config_id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("config version {config_id}")))?;
        let d = Arc::new(Desired::new(version.id, &version.files));
        if let Ok(mut m) = self.desired.write() {
            m.insert(config_id, d.clone());
        }
        Ok(d)
    }

    pub(super) fn desired_of(&self, record: &AgentRecord) -> Option<Arc<Desired>> {
        let id = record.assigned_config?;
        self.desired.read().ok()?.get(&id).cloned()
    }

    /// The config `record` should run: the newer of the newest matching assignment and the
    /// rollout that has reached it (see [`super::rollouts`]), if any.
    pub(super) fn match_assignment(&self, record: &AgentRecord) -> Option<i64> {
        let assigned = self.assignments.read().ok().and_then(|all| {
            all.iter()
                .rev()
                .find(|a| self.target_admits(&a.target, record))
                .map(|a| (a.config_id, a.created_ms))
        });
        match (self.rollout_choice(record), assigned) {
            (Some((_, rolled)), Some((config, at))) if at > rolled => Some(config),
            (Some((config, _)), _) => Some(config),
            (None, assigned) => assigned.map(|(config, _)| config),
        }
    }

    /// Re-evaluates the assignment of one agent; true when it changed.
    pub(super) fn reassign(&self, state: &mut AgentState) -> bool {
        let want = self.match_assignment(&state.record);
        if want == state.record.assigned_config {
            return false;
        }
        state.record.assigned_config = want;
        state.record.assigned_config_hash = want.and_then(|id| {
            self.desired
                .read()
                .ok()?
                .get(&id)
                .map(|d| d.hash_hex.clone())
        });
        true
    }

    pub async fn create_config(
        &self,
        name: String,
        files: ConfigMap,
        author: &str,
        force: bool,
    ) -> Result<ConfigVersion, ServiceError> {
        if files.is_empty() {
            return Err(ServiceError::Invalid(
                "a config needs at least one file".into(),
            ));
        }
        // The config on its own: YAML that parses, pipelines that name defined components,
        // and what a Collector binary's `validate` says (if one is configured).
        let (mut problems, _) = super::preflight::check_config(&files);
        if let (true, Some((binary, limit))) = (problems.is_empty(), &self.cfg.collector_validate) {
            problems.extend(super::collector_validate::validate(binary, *limit, &files).await);
        }
        let forced = !problems.is_empty();
        super::preflight::count("create", !forced, force);
        if forced && !force {
            return Err(ServiceError::Preflight(Box::new(
                super::preflight::Preflight {
                    problems,
                    ..Default::default()
                },
            )));
        }
        let hash = hex::encode(session::config_hash(&files));
        let v = self
            .store
            .create_config(NewConfigVersion {
                name,
                files,
                hash,
                author: author.to_string(),
                created_ms: now_ms(),
            })
            .await?;
        self.audit_op(
            author,
            "config.create",
            None,
            serde_json::json!({ "config_id": v.id, "hash": v.hash, "forced": forced, "problems": problems }),
        )
        .await?;
        Ok(v)
    }

    /// Assigns a config version and pushes it at once to every matching agent that is
    /// connected over WebSocket; HTTP agents get it in their next poll. Returns the
    /// assignment and how many agents it now applies to.
    pub async fn assign(
        &self,
        config_id: i64,
        target: Target,
        author: &str,
        force: bool,
    ) -> Result<(Assignment, usize), ServiceError> {
        match self.load_desired(config_id).await {
            Ok(_) => {}
            Err(StoreError::NotFound(m)) => return Err(ServiceError::NotFound(m)),
            Err(e) => return Err(e.into()),
        };
        // A rollout holds its agents until it ends: an assignment may not take them from it.
        let agents = self.agents().await?;
        if let Some((id, state, n)) = self.overlap(&target, &agents, Holding::Configs) {
            return Err(ServiceError::Conflict(format!(
                "{n} of these agents are in rollout {id} ({state}): finish, abort or roll it back first"
            )));
        }
        self.preflight_gate(config_id, &target, &agents, force, author)
            .await?;
        let created = self
            .store
            .create_assignment(NewAssignment {
                config_id,
                target: target.clone(),
                author: author.to_string(),
                created_ms: now_ms(),
            })
            .await;
        let assignment = match created {
            Ok(a) => a,
            Err(e @ StoreError::MaybeApplied(_)) => {
                // It may exist after all: reload, so our agents follow the store either way.
                self.sync_assignments().await;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        if let Ok(mut a) = self.assignments.write() {
            a.push(assignment.clone());
        }
        // Tell the owners of the other partitions first, so they push in parallel with us
        // (they also find it in the store on their next lease round if this is lost).
        let _ = self
            .bus
            .broadcast(ControlEvent::AssignmentCreated {
                assignment_id: assignment.id,
            })
            .await;
        self.apply_assignment(&assignment).await;
        let uid = match &target {
            Target::Agent(u) => Some(*u),
            _ => None,
        };
        self.audit_op(
            author,
            "config.assign",
            uid,
            serde_json::json!({ "config_id": config_id, "assignment_id": assignment.id }),
        )
        .await?;
        let matched = agents
            .iter()
            .filter(|r| self.target_admits(&target, r))
            .count();
        Ok((assignment, matched))
    }

    /// Points every agent this coordinator serves that `a` matches at its config and pushes
    /// it to those connected over WebSocket.
    pub(super) async fn apply_assignment(&self, a: &Assignment) {
        let Some(desired) = self
            .desired
            .read()
            .ok()
            .and_then(|m| m.get(&a.config_id).cloned())
        else {
            return;
        };
        let (target, config_id) = (&a.target, a.config_id);
        let mut pushes = Vec::new();
        for slot in self.all_slots() {
            let mut e = slot.lock().await;
            if !self.target_admits(target, &e.state.record) {
                continue;
            }
            let uid = e.state.record.instance_uid;
            e.state.record.assigned_config = Some(config_id);
            e.state.record.assigned_config_hash = Some(desired.hash_hex.clone());
            self.mark_dirty(uid);
            if !e.state.record.connected || e.state.record.transport != Some(Transport::WebSocket) {
                continue;
            }
            if e.state.record.capabilities & proto::agent_caps::ACCEPTS_REMOTE_CONFIG == 0 {
                // Once per connection, as the session counts it: recorded where it looks.
                if e.state.refused_config.as_ref() != Some(&desired.hash_hex) {
                    e.state.refused_config = Some(desired.hash_hex.clone());
                    metrics::counter!("ampora_opamp_frames_rejected_total", "reason" => "cap_mismatch")
                        .increment(1);
                }
                continue;
            }
            if let Some(msg) = session::push_config(&mut e.state, &desired, shared::now_ms()) {
                pushes.push((uid, msg));
            }
        }
        self.deliver_all(pushes);
    }

    pub(super) async fn deliver(&self, uid: InstanceUid, msg: proto::ServerToAgent) {
        match self.ownership.lookup(uid).await {
            Ok(Some(owner)) => {
                let m = GatewayMessage::Deliver {
                    uid,
                    epoch: owner.epoch,
                    msg: Box::new(msg),
                };
                if let Err(e) = self.bus.deliver(&owner.gateway, m).await {
                    // At-most-once: the next report from the agent re-triggers the offer.
                    tracing::debug!(instance_uid = %uid, error = %e, "push not delivered");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(instance_uid = %uid, error = %e, "ownership lookup failed"),
        }
    }
}
