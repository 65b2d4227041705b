//! Custom capabilities and messages (facts §3.13): the agent announces its capabilities in
//! its full state, keeps what the server sends for them, and, with
//! [`crate::AgentOptions::echo_custom_messages`], answers each with the same capability, the
//! type `<type>.reply` and the same data.

use proto::v1::{CustomCapabilities, CustomMessage};

use super::{AgentCore, Outcome};

impl AgentCore {
    pub(super) fn custom_capabilities(&self) -> Option<CustomCapabilities> {
        (!self.opts.custom_capabilities.is_empty()).then(|| CustomCapabilities {
            capabilities: self.opts.custom_capabilities.clone(),
        })
    }

    pub(super) fn on_custom_message(&mut self, m: CustomMessage, out: &mut Outcome) {
        // Like opamp-go: a message for a capability the agent did not declare is dropped.
        if !self.opts.custom_capabilities.contains(&m.capability) {
            self.set_error(format!("ignored a custom message for {:?}", m.capability));
            return;
        }
        self.status.send_modify(|s| {
            s.custom_messages
                .push((m.capability.clone(), m.r#type.clone(), m.data.clone()));
        });
        if self.opts.echo_custom_messages {
            let mut reply = self.base();
            reply.custom_message = Some(CustomMessage {
                capability: m.capability,
                r#type: format!("{}.reply", m.r#type),
                data: m.data,
            });
            out.send.push(reply);
        }
    }
}
