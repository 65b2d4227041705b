//! Server commands (facts §3.12): Restart, taken only with AcceptsRestartCommand. The agent
//! restarts as a Collector would: it says goodbye and comes back at once with its full
//! state, or, with [`crate::AgentOptions::restart_never_returns`], does not come back.

use proto::agent_caps;
use proto::v1::{CommandType, ServerToAgentCommand};

use super::{AgentCore, Outcome};

impl AgentCore {
    pub(super) fn on_command(&mut self, cmd: ServerToAgentCommand, out: &mut Outcome) {
        if self.opts.capabilities & agent_caps::ACCEPTS_RESTART_COMMAND == 0 {
            self.set_error("ignored a command: AcceptsRestartCommand is not declared".into());
            return;
        }
        if cmd.r#type != CommandType::Restart as i32 {
            return;
        }
        self.status.send_modify(|s| s.restart_commands += 1);
        if self.opts.restart_never_returns {
            out.halt = true;
        } else {
            out.upgraded = true;
        }
    }
}
