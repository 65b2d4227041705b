//! Drift: an agent whose effective config moved away from what it reported when it applied
//! its assigned config. The operator either sends the assigned config again (re-apply: the
//! agent's next effective config becomes the new baseline) or makes what the agent runs the
//! new version (adopt: a config version from its effective config, assigned to it).

use shared::bus::ControlEvent;
use shared::domain::{AgentRecord, ConfigVersion, Target};
use shared::ids::InstanceUid;

use super::{Coordinator, ServiceError};
use crate::session;

impl Coordinator {
    async fn drifting_agent(&self, uid: InstanceUid) -> Result<AgentRecord, ServiceError> {
        self.agent(uid)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("agent {uid}")))
    }

    /// Sends the agent its assigned config again, through whichever coordinator serves it.
    pub async fn reapply_config(&self, uid: InstanceUid, actor: &str) -> Result<(), ServiceError> {
        let record = self.drifting_agent(uid).await?;
        let Some(config_id) = record.assigned_config else {
            return Err(ServiceError::Conflict(format!(
                "agent {uid} has no assigned config to re-apply"
            )));
        };
        if record.capabilities & proto::agent_caps::ACCEPTS_REMOTE_CONFIG == 0 {
            return Err(ServiceError::Conflict(format!(
                "agent {uid} does not accept remote config"
            )));
        }
        self.audit_op(
            actor,
            "config.reapply",
            Some(uid),
            serde_json::json!({ "config_id": config_id, "config_state": record.config_state() }),
        )
        .await?;
        if self.slot(&uid).is_some() {
            self.reapply_here(uid).await;
        } else {
            let _ = self
                .bus
                .broadcast(ControlEvent::ReapplyConfig { uid })
                .await;
        }
        Ok(())
    }

    /// Re-sends the assigned config to one of this coordinator's agents, even though it
    /// reports that hash already, and takes its next effective config as the new baseline.
    pub(super) async fn reapply_here(&self, uid: InstanceUid) {
        let Some(slot) = self.slot(&uid) else { return };
        let mut e = slot.lock().await;
        let Some(desired) = self.desired_of(&e.state.record) else {
            return;
        };
        e.state.record.applied_effective_hash = None;
        e.state.applied_effective_pending = true;
        e.state.offered_config = Some(desired.hash_hex.clone());
        self.mark_dirty(uid);
        if !e.state.record.connected {
            return;
        }
        let msg = proto::ServerToAgent {
            instance_uid: uid.as_bytes().to_vec(),
            capabilities: session::SERVER_CAPABILITIES,
            remote_config: Some(desired.remote.clone()),
            ..Default::default()
        };
        drop(e);
        self.deliver(uid, msg).await;
    }

    /// Makes the agent's effective config a new config version and assigns it to the agent.
    pub async fn adopt_config(
        &self,
        uid: InstanceUid,
        name: Option<String>,
        actor: &str,
    ) -> Result<ConfigVersion, ServiceError> {
        let record = self.drifting_agent(uid).await?;
        let Some(files) = record.effective_config.clone().filter(|f| !f.is_empty()) else {
            return Err(ServiceError::Conflict(format!(
                "agent {uid} has reported no effective config to adopt"
            )));
        };
        let name = name.unwrap_or_else(|| format!("adopted from {uid}"));
        // What the agent runs already: adopted as it is, checked or not.
        let version = self.create_config(name, files, actor, true).await?;
        // Audited before it is sent: whoever sees the agent get it finds the reason logged.
        self.audit_op(
            actor,
            "config.adopt",
            Some(uid),
            serde_json::json!({ "config_id": version.id, "hash": version.hash }),
        )
        .await?;
        self.assign(version.id, Target::Agent(uid), actor, true)
            .await?;
        Ok(version)
    }
}
