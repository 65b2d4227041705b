//! Token scopes stay with the agent they admitted.
//!
//! A scoped token (`env=dev`) binds only to an agent that describes itself with the scope's
//! labels, but descriptions change: an agent admitted as `env=dev` that later reports
//! `env=prod` must not be sent prod's configs. So every label match of an assignment is
//! intersected with the scopes of the tokens bound to the agent: for a label the scope names,
//! the scope's value is the agent's, whatever it reports. Assignments to one agent by UID or
//! to all agents are the operator's explicit choice and are not narrowed.

use shared::domain::{AgentRecord, Target, TokenRecord, TokenScope};
use shared::ids::InstanceUid;

use super::tokens::TokenCache;
use super::Coordinator;

impl TokenCache {
    /// Records the scope of `rec` under the agent it is bound to, if both are set.
    pub(super) fn index_scope(&mut self, rec: &TokenRecord) {
        let (Some(uid), Some(scope)) = (rec.bound_uid, &rec.scope) else {
            return;
        };
        let scopes = self.scopes.entry(uid).or_default();
        if !scopes.iter().any(|(id, _)| *id == rec.id) {
            scopes.push((rec.id.clone(), scope.clone()));
        }
    }
}

/// Whether `target` selects `agent` once the agent's `scopes` are applied.
pub fn admits(target: &Target, agent: &AgentRecord, scopes: &[TokenScope]) -> bool {
    if !target.matches(agent) {
        return false;
    }
    match target {
        Target::Labels(wanted) => scopes.iter().all(|s| {
            wanted
                .iter()
                .all(|(k, v)| s.labels.get(k).is_none_or(|scoped| scoped == v))
        }),
        Target::Agent(_) | Target::All => true,
    }
}

impl Coordinator {
    /// The scopes of the tokens bound to `uid`; every one holds.
    pub(super) fn scopes_of(&self, uid: InstanceUid) -> Vec<TokenScope> {
        self.tokens
            .read()
            .ok()
            .and_then(|c| {
                c.scopes
                    .get(&uid)
                    .map(|s| s.iter().map(|(_, s)| s.clone()).collect())
            })
            .unwrap_or_default()
    }

    /// [`admits`] for an agent of this coordinator.
    pub(super) fn target_admits(&self, target: &Target, agent: &AgentRecord) -> bool {
        target.matches(agent) && admits(target, agent, &self.scopes_of(agent.instance_uid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn labels(k: &str, v: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(k.to_string(), v.to_string())])
    }

    #[test]
    fn a_scope_overrides_what_the_agent_reports() {
        let mut agent = AgentRecord::new(InstanceUid::new_v7(), 0);
        agent
            .description
            .identifying
            .insert("env".into(), serde_json::json!("prod"));
        let prod = Target::Labels(labels("env", "prod"));
        let dev_scope = TokenScope {
            labels: labels("env", "dev"),
        };
        assert!(
            admits(&prod, &agent, &[]),
            "unscoped: the description decides"
        );
        assert!(
            !admits(&prod, &agent, std::slice::from_ref(&dev_scope)),
            "an env=dev agent never matches env=prod"
        );
        assert!(admits(
            &Target::All,
            &agent,
            std::slice::from_ref(&dev_scope)
        ));
        let other = Target::Labels(labels("service.name", "x"));
        agent
            .description
            .identifying
            .insert("service.name".into(), serde_json::json!("x"));
        assert!(
            admits(&other, &agent, &[dev_scope]),
            "labels the scope does not name are the agent's"
        );
    }
}
