//! Groups: named, saved label selectors. A group's members are the agents its labels match
//! (as an assignment's would), counted live; a rollout records the group's labels as they
//! were when it was created.

use std::collections::BTreeMap;

use shared::domain::AgentRecord;
use shared::now_ms;
use shared::rollout::Group;

use crate::service::{Coordinator, ServiceError};

impl Coordinator {
    /// Creates the group or replaces its labels; audited.
    pub async fn put_group(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        actor: &str,
    ) -> Result<Group, ServiceError> {
        let g = self
            .store
            .put_group(&Group {
                name: name.into(),
                labels,
                author: actor.into(),
                created_ms: now_ms(),
            })
            .await?;
        self.audit_op(
            actor,
            "group.put",
            None,
            serde_json::json!({ "group": g.name, "labels": g.labels }),
        )
        .await?;
        // Its labels decide whose own telemetry its settings cover.
        self.telemetry_changed().await;
        Ok(g)
    }

    /// Deletes the group; rollouts created for it keep its labels. Audited.
    pub async fn delete_group(&self, name: &str, actor: &str) -> Result<(), ServiceError> {
        if !self.store.delete_group(name).await? {
            return Err(ServiceError::NotFound(format!("group `{name}`")));
        }
        self.store.delete_group_telemetry(name).await?;
        self.telemetry_changed().await;
        self.audit_op(
            actor,
            "group.delete",
            None,
            serde_json::json!({ "group": name }),
        )
        .await
    }

    pub async fn group(&self, name: &str) -> Result<Group, ServiceError> {
        self.store
            .list_groups()
            .await?
            .into_iter()
            .find(|g| g.name == name)
            .ok_or_else(|| ServiceError::NotFound(format!("group `{name}`")))
    }

    /// Every group with how many agents it matches now.
    pub async fn groups_counted(&self) -> Result<Vec<(Group, usize)>, ServiceError> {
        let groups = self.store.list_groups().await?;
        let agents = self.agents().await?;
        Ok(groups
            .into_iter()
            .map(|g| {
                let n = self.group_members(&g, &agents).count();
                (g, n)
            })
            .collect())
    }

    /// The agents of `agents` that `group` matches.
    pub fn group_members<'a>(
        &'a self,
        group: &'a Group,
        agents: &'a [AgentRecord],
    ) -> impl Iterator<Item = &'a AgentRecord> + 'a {
        let target = group.target();
        agents
            .iter()
            .filter(move |r| self.target_admits(&target, r))
    }
}
