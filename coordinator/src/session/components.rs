//! Available components in the session core (facts §3.7): an agent that declares
//! ReportsAvailableComponents sends only a hash at first; a hash the server does not know is
//! answered with the ReportAvailableComponents flag, and the agent then sends the whole set,
//! which goes out in a [`Event::ComponentsReported`] for the service to store once.

use std::collections::{BTreeMap, BTreeSet};

use proto::v1::{AgentToServer, ComponentDetails, ServerToAgent};
use proto::{agent_caps, server_flags};

use super::{AgentState, Event};

/// Kind → component types: the shape the Collector reports (`receivers` → `otlp`, …); an
/// agent that reports a flat map has one kind per top-level key, each without types.
pub type ComponentSet = BTreeMap<String, BTreeSet<String>>;

/// At most this many components in one set, each type at most [`MAX_TYPE`] bytes: a
/// larger report is refused (a Collector distribution has a few hundred).
pub const MAX_COMPONENTS: usize = 2_000;
pub const MAX_TYPE: usize = 64;

/// Records the agent's components hash; asks for the set when `known` says the hash is new
/// to the server. True when the record changed.
pub(super) fn record(
    state: &mut AgentState,
    msg: &AgentToServer,
    known: bool,
    reply: &mut ServerToAgent,
    events: &mut Vec<Event>,
) -> bool {
    let Some(ac) = &msg.available_components else {
        return false;
    };
    if state.caps() & agent_caps::REPORTS_AVAILABLE_COMPONENTS == 0 {
        events.push(Event::CapMismatch {
            what: "available_components",
        });
        return false;
    }
    if ac.hash.is_empty() {
        return false;
    }
    let hash = hex::encode(&ac.hash);
    if !ac.components.is_empty() {
        // Only the set the server asked for is taken: an agent cannot fill the store with
        // sets under made-up hashes.
        if state.components_asked.as_deref() != Some(hash.as_str()) {
            events.push(Event::CapMismatch {
                what: "available_components_unasked",
            });
        } else if let Some(set) = to_set(&ac.components) {
            state.components_asked = None;
            events.push(Event::ComponentsReported {
                hash: hash.clone(),
                set,
            });
        } else {
            events.push(Event::CapMismatch {
                what: "available_components_too_large",
            });
        }
    } else if !known && msg.agent_disconnect.is_none() {
        reply.flags |= server_flags::REPORT_AVAILABLE_COMPONENTS;
        state.components_asked = Some(hash.clone());
    }
    let changed = state.record.components_hash.as_deref() != Some(hash.as_str());
    state.record.components_hash = Some(hash);
    changed
}

/// The set, or `None` when it is larger than the bounds allow.
fn to_set(components: &BTreeMap<String, ComponentDetails>) -> Option<ComponentSet> {
    let mut n = 0;
    let mut set = ComponentSet::new();
    for (kind, d) in components {
        n += 1 + d.sub_component_map.len();
        let too_long =
            kind.len() > MAX_TYPE || d.sub_component_map.keys().any(|t| t.len() > MAX_TYPE);
        if n > MAX_COMPONENTS || too_long {
            return None;
        }
        set.insert(kind.clone(), d.sub_component_map.keys().cloned().collect());
    }
    Some(set)
}
