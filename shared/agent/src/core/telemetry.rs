//! Own-telemetry settings (facts §3.5): the `own_metrics`, `own_traces` and `own_logs` of a
//! connection-settings offer are kept in the status for the signals the agent declares, and,
//! when the offer carries no `opamp` part this agent acts on, answered APPLIED (or FAILED, with
//! `own_telemetry_fails`; agents with ReportsConnectionSettingsStatus). Sending is [`crate::own_metrics`]'s.

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
        let offered: Vec<&'static str> = [
            ("metrics", cs.own_metrics.is_some()),
            ("traces", cs.own_traces.is_some()),
            ("logs", cs.own_logs.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, present)| present.then_some(name))
        .collect();
        if !offered.is_empty() {
            self.status.send_modify(|s| s.own_signals_offered = offered);
        }
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
            let (status, error) = match &self.opts.own_telemetry_fails {
                Some(e) => (ConnectionSettingsStatuses::Failed, e.clone()),
                None => (ConnectionSettingsStatuses::Applied, String::new()),
            };
            self.report_settings(&cs.hash, status, error, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use proto::v1::{Header, Headers};
    use proto::ServerToAgent;

    use super::*;
    use crate::options::{AgentOptions, DEFAULT_CAPABILITIES};

    fn offer(hash: &[u8]) -> ServerToAgent {
        let settings = |path: &str| TelemetryConnectionSettings {
            destination_endpoint: format!("https://otel.example{path}"),
            headers: Some(Headers {
                headers: vec![Header {
                    key: "Authorization".into(),
                    value: "Bearer k".into(),
                }],
            }),
            ..Default::default()
        };
        ServerToAgent {
            connection_settings: Some(ConnectionSettingsOffers {
                hash: hash.to_vec(),
                own_metrics: Some(settings("/v1/metrics")),
                own_logs: Some(settings("/v1/logs")),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn declared_signals_are_kept_and_the_offer_answered_once() {
        let caps = DEFAULT_CAPABILITIES
            | agent_caps::REPORTS_OWN_METRICS
            | agent_caps::REPORTS_CONNECTION_SETTINGS_STATUS;
        let (mut core, rx) = AgentCore::new(AgentOptions {
            instance_uid: Some([3; 16]),
            capabilities: caps,
            ..AgentOptions::default()
        });
        let out = core.on_message(offer(b"h1"));
        let status = rx.borrow().clone();
        let metrics = status.own_metrics.expect("own metrics kept");
        assert_eq!(metrics.endpoint, "https://otel.example/v1/metrics");
        assert_eq!(
            metrics.headers,
            [("Authorization".to_owned(), "Bearer k".to_owned())]
        );
        assert!(status.own_logs.is_none(), "logs are not declared");
        let answered: Vec<_> = out
            .send
            .iter()
            .filter_map(|m| m.connection_settings_status.as_ref())
            .collect();
        assert_eq!(answered.len(), 1);
        assert_eq!(answered[0].last_connection_settings_hash, b"h1");
        assert_eq!(
            answered[0].status,
            ConnectionSettingsStatuses::Applied as i32
        );
        let again = core.on_message(offer(b"h1"));
        assert!(
            again
                .send
                .iter()
                .all(|m| m.connection_settings_status.is_none()),
            "a repeat is not answered again"
        );
    }
}
