//! Available components (facts §3.7), as the Collector's OpAMP extension reports them: kind
//! (`receivers`, `exporters`, …) → component types. The first message of a connection
//! carries only the set's hash; the whole set goes out when the server asks for it with the
//! ReportAvailableComponents flag.

use proto::agent_caps;
use proto::v1::{AvailableComponents, ComponentDetails};
use sha2::{Digest, Sha256};

use super::AgentCore;

impl AgentCore {
    /// What the agent reports of its components in a full state: the hash only.
    pub(super) fn components_hash_only(&self) -> Option<AvailableComponents> {
        self.reports_components().then(|| AvailableComponents {
            components: Default::default(),
            hash: self.components_hash(),
        })
    }

    /// The whole set, for a server that asked for it.
    pub(super) fn components_full(&self) -> Option<AvailableComponents> {
        if !self.reports_components() {
            return None;
        }
        self.status.send_modify(|s| s.components_requests += 1);
        let components = self
            .opts
            .available_components
            .iter()
            .map(|(kind, types)| {
                let sub = types
                    .iter()
                    .map(|t| (t.clone(), ComponentDetails::default()))
                    .collect();
                (
                    kind.clone(),
                    ComponentDetails {
                        metadata: Vec::new(),
                        sub_component_map: sub,
                    },
                )
            })
            .collect();
        Some(AvailableComponents {
            components,
            hash: self.components_hash(),
        })
    }

    fn reports_components(&self) -> bool {
        self.opts.capabilities & agent_caps::REPORTS_AVAILABLE_COMPONENTS != 0
    }

    /// SHA-256 over the kinds and types in order (the format is the agent's to choose).
    fn components_hash(&self) -> Vec<u8> {
        let mut h = Sha256::new();
        for (kind, types) in &self.opts.available_components {
            h.update(kind.as_bytes());
            h.update([0]);
            for t in types {
                h.update(t.as_bytes());
                h.update([1]);
            }
        }
        h.finalize().to_vec()
    }
}
