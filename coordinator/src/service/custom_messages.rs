//! Custom messages (facts §3.13) between operators and agents: an operator sends one for a
//! capability the agent declared (never for another), through whichever coordinator serves
//! the agent; the agent's messages for the capabilities Ampora relays
//! (`opamp.custom_capabilities`) are kept on its record for operators to read.

use shared::bus::ControlEvent;
use shared::domain::Transport;
use shared::ids::InstanceUid;

use super::{Coordinator, ServiceError};
use crate::session;

/// Largest payload an operator may send.
pub const MAX_DATA_BYTES: usize = 64 * 1024;

/// HTTP agents' messages waiting for their next polls, at most.
const MAX_PENDING: usize = 16;

impl Coordinator {
    /// The custom capabilities whose messages Ampora relays.
    pub fn relayed_custom_capabilities(&self) -> &[String] {
        &self.cfg.custom_capabilities
    }

    /// Sends `message` to agent `uid`, which must have declared its capability.
    pub async fn send_custom_message(
        &self,
        uid: InstanceUid,
        message: proto::v1::CustomMessage,
        actor: &str,
    ) -> Result<(), ServiceError> {
        let record = self
            .agent(uid)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("agent {uid}")))?;
        if !record.custom_capabilities.contains(&message.capability) {
            return Err(ServiceError::Conflict(format!(
                "agent {uid} did not declare the custom capability {:?}",
                message.capability
            )));
        }
        if message.data.len() > MAX_DATA_BYTES {
            return Err(ServiceError::Invalid(format!(
                "a custom message carries at most {MAX_DATA_BYTES} bytes"
            )));
        }
        self.audit_op(
            actor,
            "agent.custom_message",
            Some(uid),
            serde_json::json!({
                "capability": message.capability, "type": message.r#type,
                "bytes": message.data.len(),
            }),
        )
        .await?;
        if self.slot(&uid).is_some() {
            self.custom_here(uid, message).await;
        } else {
            let event = ControlEvent::CustomMessage {
                uid,
                capability: message.capability,
                kind: message.r#type,
                data: message.data,
            };
            let _ = self.bus.broadcast(event).await;
        }
        Ok(())
    }

    /// Delivers to one of this coordinator's agents: at once over WebSocket, with its next
    /// polls over HTTP.
    pub(super) async fn custom_here(&self, uid: InstanceUid, message: proto::v1::CustomMessage) {
        let Some(slot) = self.slot(&uid) else { return };
        let mut e = slot.lock().await;
        if !e.state.record.connected {
            return;
        }
        if e.state.record.transport == Some(Transport::Http) {
            if e.state.custom_pending.len() < MAX_PENDING {
                e.state.custom_pending.push(message);
            }
            return;
        }
        drop(e);
        let msg = proto::ServerToAgent {
            instance_uid: uid.as_bytes().to_vec(),
            capabilities: session::SERVER_CAPABILITIES,
            custom_message: Some(message),
            ..Default::default()
        };
        self.deliver(uid, msg).await;
    }
}
