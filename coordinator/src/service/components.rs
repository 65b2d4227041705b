//! Available components on the coordinator: the sets agents report, stored once per hash
//! (`component_sets`) and cached here (read at start and every lease round, written through
//! when an agent sends one); an agent's set for the API and the console; and the pre-flight
//! check of a config against the agents a push or rollout would reach ([`super::preflight`]).

use std::collections::HashMap;
use std::sync::Arc;

use shared::domain::{AgentRecord, ConfigMap, Target};
use shared::now_ms;

use super::preflight::{self, Preflight};
use super::{Coordinator, ServiceError};
use crate::session::components::ComponentSet;

/// Component sets by hex hash.
pub(super) type Sets = HashMap<String, Arc<ComponentSet>>;

/// Distinct sets kept at most (a fleet has a handful of builds); beyond, new ones are not
/// stored and their agents stay unchecked.
pub const MAX_SETS: usize = 500;

impl Coordinator {
    /// Whether the set of `hash` (raw bytes, as the agent sent it) is known here.
    pub(super) fn knows_components(&self, hash: &[u8]) -> bool {
        let hex = hex::encode(hash);
        self.component_sets
            .read()
            .is_ok_and(|s| s.contains_key(&hex))
    }

    /// An agent sent its whole set: kept here at once, and in the store for every other
    /// coordinator (a failed write is retried when another agent of the build sends it).
    pub(super) async fn components_reported(&self, hash: &str, set: &ComponentSet) {
        let full = match self.component_sets.read() {
            Ok(s) if s.contains_key(hash) => return,
            Ok(s) => s.len() >= MAX_SETS,
            Err(_) => return,
        };
        if full {
            metrics::counter!("ampora_opamp_frames_rejected_total", "reason" => "component_sets_full")
                .increment(1);
            tracing::warn!(
                hash,
                "not storing another component set: {MAX_SETS} are stored"
            );
            return;
        }
        let body = match serde_json::to_string(set) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "encoding a component set failed");
                return;
            }
        };
        match self.store.put_component_set(hash, &body, now_ms()).await {
            Ok(()) => {
                if let Ok(mut s) = self.component_sets.write() {
                    s.insert(hash.to_owned(), Arc::new(set.clone()));
                }
            }
            Err(e) => tracing::warn!(error = %e, hash, "storing a component set failed"),
        }
    }

    /// Re-reads the stored sets (those other coordinators' agents sent).
    pub(super) async fn sync_components(&self) {
        let rows = match self.store.list_component_sets().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "loading component sets failed");
                return;
            }
        };
        let Ok(mut sets) = self.component_sets.write() else {
            return;
        };
        for (hash, body) in rows {
            if sets.contains_key(&hash) {
                continue;
            }
            match serde_json::from_str::<ComponentSet>(&body) {
                Ok(set) => {
                    sets.insert(hash, Arc::new(set));
                }
                Err(e) => tracing::warn!(error = %e, hash, "a stored component set is corrupt"),
            }
        }
    }

    /// The components `record` reported, if the server has its set.
    pub fn components_of(&self, record: &AgentRecord) -> Option<Arc<ComponentSet>> {
        let hash = record.components_hash.as_deref()?;
        self.component_sets.read().ok()?.get(hash).cloned()
    }

    /// The pre-flight answer for `files` pushed to those of `agents` that `target` admits.
    pub fn preflight(
        &self,
        files: &ConfigMap,
        target: &Target,
        agents: &[AgentRecord],
    ) -> Preflight {
        let targets: Vec<&AgentRecord> = agents
            .iter()
            .filter(|r| self.target_admits(target, r))
            .collect();
        let sets = self
            .component_sets
            .read()
            .map(|s| s.clone())
            .unwrap_or_default();
        preflight::check(files, &targets, &sets)
    }

    /// Refuses a push or rollout of config `config_id` to `target` that fails its pre-flight
    /// check, unless `force` (then the audit log records it as forced, with the answer).
    pub(super) async fn preflight_gate(
        &self,
        config_id: i64,
        target: &Target,
        agents: &[AgentRecord],
        force: bool,
        actor: &str,
    ) -> Result<(), ServiceError> {
        let Some(version) = self.store.get_config(config_id).await? else {
            return Err(ServiceError::NotFound(format!("config {config_id}")));
        };
        let report = self.preflight(&version.files, target, agents);
        preflight::count("push", report.ok(), force);
        if report.ok() {
            return Ok(());
        }
        if !force {
            return Err(ServiceError::Preflight(Box::new(report)));
        }
        self.audit_op(
            actor,
            "config.preflight_forced",
            None,
            serde_json::json!({ "config_id": config_id, "target": target, "preflight": report }),
        )
        .await
    }
}
