//! Own-telemetry settings (facts §3.5): the `own_metrics`, `own_traces` and `own_logs` of a
//! connection-settings offer are kept in the status for the signals the agent declares, and,
//! when the offer carries no `opamp` part this agent acts on, answered APPLIED (agents with
//! ReportsConnectionSettingsStatus). Sending is [`crate::own_metrics`]'s.

use proto::agent_caps;
use proto::v1::{
    ConnectionSettingsOffers, ConnectionSettingsStatuses, TelemetryConnectionSettings,
};

use super::{AgentCore, Outcome};
use crate::options::OwnTelemetryOffer;

fn offer_of(s: &TelemetryConnectionSettings) -> OwnTelemetryOffer {
    OwnTelemetryOffer {
        endpoint: s.destination_endpoint.clone(),
        headers: s
            .headers
            .iter()
            .flat_map(|h| &h.headers)
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect(),
        ca_pem: s
            .tls
            .as_ref()
            .map(|t| t.ca_pem_contents.clone())
            .filter(|c| !c.is_empty()),
    }
}

impl AgentCore {
    /// Takes the telemetry parts of `cs`. `opamp_handled`: the offer's `opamp` part is acted
    /// on (and its status reported) elsewhere.
    pub(super) fn on_telemetry_settings(
        &mut self,
        cs: &ConnectionSettingsOffers,
        opamp_handled: bool,
        out: &mut Outcome,
    ) {
        let caps = self.opts.capabilities;
        let take = |s: &Option<TelemetryConnectionSettings>, bit: u64| {
            s.as_ref().filter(|_| caps & bit != 0).map(offer_of)
        };
        let metrics = take(&cs.own_metrics, agent_caps::REPORTS_OWN_METRICS);
        let traces = take(&cs.own_traces, agent_caps::REPORTS_OWN_TRACES);
        let logs = take(&cs.own_logs, agent_caps::REPORTS_OWN_LOGS);
        if metrics.is_none() && traces.is_none() && logs.is_none() {
            return;
        }
        // Unset parts mean "keep what you use" (facts §3.5).
        self.status.send_modify(|s| {
            if metrics.is_some() {
                s.own_metrics = metrics;
            }
            if traces.is_some() {
                s.own_traces = traces;
            }
            if logs.is_some() {
                s.own_logs = logs;
            }
        });
        if !opamp_handled && !cs.hash.is_empty() && self.settings_seen.as_ref() != Some(&cs.hash) {
            self.settings_seen = Some(cs.hash.clone());
            self.report_settings(
                &cs.hash,
                ConnectionSettingsStatuses::Applied,
                String::new(),
                out,
            );
        }
    }
}
