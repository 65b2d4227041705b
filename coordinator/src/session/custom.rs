//! Custom capabilities and messages in the session core (facts §3.13): the agent's announced
//! capabilities are recorded; its custom messages are kept (the last
//! [`MAX_CUSTOM_MESSAGES`]) only for capabilities it declared and Ampora relays, and ignored
//! otherwise, as the spec says; Ampora announces the capabilities it relays once per
//! connection.

use base64::Engine as _;
use proto::v1::{AgentToServer, CustomCapabilities, ServerToAgent};
use shared::domain::{CustomMessageRecord, MAX_CUSTOM_MESSAGES};

use super::{AgentState, Event};

/// Capabilities kept per agent, and the longest name.
const MAX_CAPABILITIES: usize = 64;
const MAX_NAME: usize = 256;
/// The largest agent message kept: its record is stored, so 20 of them must stay small.
pub const MAX_KEPT_DATA: usize = 16 * 1024;

/// Records what `msg` says of custom capabilities and messages; announces `relayed` on the
/// connection's first reply. True when the record changed.
pub(super) fn record(
    state: &mut AgentState,
    msg: &AgentToServer,
    relayed: &[String],
    now_ms: i64,
    reply: &mut ServerToAgent,
    events: &mut Vec<Event>,
) -> bool {
    let mut changed = false;
    if let Some(cc) = &msg.custom_capabilities {
        let mut caps: Vec<String> = cc
            .capabilities
            .iter()
            .filter(|c| !c.is_empty() && c.len() <= MAX_NAME)
            .take(MAX_CAPABILITIES)
            .cloned()
            .collect();
        caps.sort();
        caps.dedup();
        if state.record.custom_capabilities != caps {
            state.record.custom_capabilities = caps;
            changed = true;
        }
    }
    if let Some(m) = &msg.custom_message {
        let declared = state.record.custom_capabilities.contains(&m.capability);
        let fits = m.r#type.len() <= MAX_NAME && m.data.len() <= MAX_KEPT_DATA;
        if declared && relayed.contains(&m.capability) && fits {
            let kept = &mut state.record.custom_messages;
            kept.push(CustomMessageRecord {
                at_ms: now_ms,
                capability: m.capability.clone(),
                kind: m.r#type.clone(),
                data_base64: base64::engine::general_purpose::STANDARD.encode(&m.data),
            });
            if kept.len() > MAX_CUSTOM_MESSAGES {
                kept.remove(0);
            }
            changed = true;
        } else {
            events.push(Event::CapMismatch {
                what: "custom_message",
            });
        }
    }
    if !state.custom_announced && !relayed.is_empty() && msg.agent_disconnect.is_none() {
        reply.custom_capabilities = Some(CustomCapabilities {
            capabilities: relayed.to_vec(),
        });
        state.custom_announced = true;
    }
    changed
}
