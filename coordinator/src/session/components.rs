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

/// At most this many components in one set: a larger report is refused as bad input.
pub const MAX_COMPONENTS: usize = 10_000;

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
        let set = to_set(&ac.components);
        if set.values().map(BTreeSet::len).sum::<usize>() + set.len() <= MAX_COMPONENTS {
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
    }
    let changed = state.record.components_hash.as_deref() != Some(hash.as_str());
    state.record.components_hash = Some(hash);
    changed
}

fn to_set(components: &BTreeMap<String, ComponentDetails>) -> ComponentSet {
    components
        .iter()
        .map(|(kind, d)| {
            let types = d.sub_component_map.keys().cloned().collect();
            (kind.clone(), types)
        })
        .collect()
}
