//! Own-telemetry connection settings (facts §3.5): the `own_metrics`, `own_traces` and
//! `own_logs` an agent's group offers, cut to the signals the agent declares it reports, and
//! their part of the `ConnectionSettingsOffers.hash`.

use proto::agent_caps;
use proto::v1::{
    ConnectionSettingsOffers, Header, Headers, TelemetryConnectionSettings, TlsConnectionSettings,
};
use proto::Message;
use sha2::{Digest, Sha256};
use shared::own_telemetry::Destination;

/// What one agent is offered for its own telemetry, ready to send.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TelemetryOffer {
    pub metrics: Option<TelemetryConnectionSettings>,
    pub traces: Option<TelemetryConnectionSettings>,
    pub logs: Option<TelemetryConnectionSettings>,
}

/// One destination on the wire. `credential`, when Ampora is the destination, goes in
/// `Authorization` (the agent's own, minted by the caller).
pub fn settings_of(
    d: &Destination,
    endpoint: &str,
    credential: Option<&str>,
) -> TelemetryConnectionSettings {
    let mut headers: Vec<Header> = d
        .headers
        .iter()
        .map(|(k, v)| Header {
            key: k.clone(),
            value: v.clone(),
        })
        .collect();
    if let Some(c) = credential {
        headers.retain(|h| !h.key.eq_ignore_ascii_case("authorization"));
        headers.push(Header {
            key: "Authorization".into(),
            value: format!("Bearer {c}"),
        });
    }
    TelemetryConnectionSettings {
        destination_endpoint: endpoint.to_owned(),
        headers: (!headers.is_empty()).then_some(Headers { headers }),
        tls: d.ca_pem.as_ref().map(|ca| TlsConnectionSettings {
            ca_pem_contents: ca.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl TelemetryOffer {
    /// Only the signals the agent declares it reports (ReportsOwnMetrics, …Traces, …Logs).
    pub fn for_caps(&self, caps: u64) -> TelemetryOffer {
        let has = |bit: u64| caps & bit != 0;
        TelemetryOffer {
            metrics: self
                .metrics
                .clone()
                .filter(|_| has(agent_caps::REPORTS_OWN_METRICS)),
            traces: self
                .traces
                .clone()
                .filter(|_| has(agent_caps::REPORTS_OWN_TRACES)),
            logs: self
                .logs
                .clone()
                .filter(|_| has(agent_caps::REPORTS_OWN_LOGS)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.metrics.is_none() && self.traces.is_none() && self.logs.is_none()
    }

    /// The offer hash over `base` (the `opamp` part's hash, empty without one) and these
    /// settings: it changes whenever any part does (facts §3.5).
    pub fn hash_with(&self, base: &[u8]) -> Vec<u8> {
        let mut h = Sha256::new();
        let mut part = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        };
        part(b"ampora.telemetry-settings.v1");
        part(base);
        for s in [&self.metrics, &self.traces, &self.logs] {
            part(&s.as_ref().map(Message::encode_to_vec).unwrap_or_default());
        }
        h.finalize().to_vec()
    }

    /// Puts these settings into `offer`.
    pub fn fill(&self, offer: &mut ConnectionSettingsOffers) {
        offer.own_metrics = self.metrics.clone();
        offer.own_traces = self.traces.clone();
        offer.own_logs = self.logs.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(endpoint: &str) -> Destination {
        Destination {
            endpoint: endpoint.into(),
            headers: [("X-Key".to_owned(), "k1".to_owned())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_declared_signals_are_offered_and_any_change_moves_the_hash() {
        let d = dest("https://otel.example/v1/metrics");
        let offer = TelemetryOffer {
            metrics: Some(settings_of(&d, &d.endpoint, None)),
            logs: Some(settings_of(&d, "https://otel.example/v1/logs", None)),
            ..Default::default()
        };
        let cut = offer.for_caps(agent_caps::REPORTS_OWN_METRICS);
        assert!(cut.metrics.is_some() && cut.logs.is_none() && cut.traces.is_none());
        assert!(offer.for_caps(agent_caps::REPORTS_OWN_TRACES).is_empty());
        let base = offer.hash_with(b"");
        assert_ne!(base, offer.hash_with(b"opamp"));
        assert_ne!(base, cut.hash_with(b""));
        let mut other = offer.clone();
        other.metrics = Some(settings_of(
            &dest("https://otel.example/v1/metrics"),
            &d.endpoint,
            Some("amp-om.x"),
        ));
        assert_ne!(base, other.hash_with(b""));
        let auth = other
            .metrics
            .and_then(|m| m.headers)
            .map(|h| h.headers)
            .unwrap_or_default();
        assert!(auth
            .iter()
            .any(|h| h.key == "Authorization" && h.value == "Bearer amp-om.x"));
    }

    /// Through the session: an agent with no `opamp` settings to take is offered its
    /// telemetry once per hash; an agent without telemetry keeps the hash it always had.
    #[test]
    fn the_offer_goes_out_once_per_change_and_leaves_other_agents_alone() {
        use crate::session::{handle, AgentState, Context, OpampOffer};
        use proto::v1::{AgentDescription, AgentToServer, ConnectionSettingsStatus};
        use shared::domain::{AgentRecord, Transport};
        use shared::ids::InstanceUid;

        let opamp = OpampOffer {
            endpoint: "ws://h/v1/opamp".into(),
            heartbeat_interval_secs: 30,
        };
        let d = dest("https://otel.example/v1/metrics");
        let tel = TelemetryOffer {
            metrics: Some(settings_of(&d, &d.endpoint, None)),
            ..Default::default()
        };
        let ctx = |t: Option<&'static TelemetryOffer>| Context {
            now_ms: 1,
            transport: Transport::WebSocket,
            desired: None,
            opamp_offer: None,
            identity: None,
            assign_uid: None,
            packages: None,
            components_known: false,
            custom_capabilities: &[],
            telemetry: t,
        };
        let tel: &'static TelemetryOffer = Box::leak(Box::new(tel));
        let msg = |seq: u64, caps: u64| AgentToServer {
            instance_uid: vec![1; 16],
            sequence_num: seq,
            capabilities: caps,
            agent_description: Some(AgentDescription::default()),
            ..Default::default()
        };
        let caps = agent_caps::REPORTS_STATUS
            | agent_caps::REPORTS_OWN_METRICS
            | agent_caps::REPORTS_CONNECTION_SETTINGS_STATUS;
        let mut s = AgentState::new(AgentRecord::new(InstanceUid([1; 16]), 0));
        let first = handle(&mut s, &msg(0, caps), &ctx(Some(tel)));
        let cs = first.reply.connection_settings.expect("offered");
        assert!(cs.opamp.is_none(), "the agent takes no opamp settings");
        assert_eq!(cs.own_metrics, tel.metrics);
        assert_eq!(cs.hash, tel.hash_with(b""));
        assert!(first.changed);
        let again = handle(&mut s, &msg(1, caps), &ctx(Some(tel)));
        assert!(again.reply.connection_settings.is_none(), "once per hash");
        let mut answered = msg(2, caps);
        answered.connection_settings_status = Some(ConnectionSettingsStatus {
            last_connection_settings_hash: cs.hash.clone(),
            status: 1,
            ..Default::default()
        });
        handle(&mut s, &answered, &ctx(Some(tel)));
        assert_eq!(s.record.settings_in_use, Some(hex::encode(&cs.hash)));
        assert_eq!(
            s.record.settings_status.as_ref().map(|r| r.status),
            Some(shared::domain::RemoteStatus::Applied)
        );
        // A failure is kept with its error (cut short), and not offered again.
        let mut failed = msg(3, caps);
        failed.connection_settings_status = Some(ConnectionSettingsStatus {
            last_connection_settings_hash: cs.hash.clone(),
            status: 3,
            error_message: "x".repeat(5_000),
        });
        let o = handle(&mut s, &failed, &ctx(Some(tel)));
        assert!(o.changed && o.reply.connection_settings.is_none());
        let report = s.record.settings_status.clone().expect("kept");
        assert_eq!(report.status, shared::domain::RemoteStatus::Failed);
        assert_eq!(report.error_message.len(), 1024);

        // An agent that heartbeats and takes opamp settings, with no telemetry for it: the
        // offer and its hash are the opamp ones alone.
        let hb = agent_caps::ACCEPTS_OPAMP_CONNECTION_SETTINGS | agent_caps::REPORTS_HEARTBEAT;
        let mut plain = AgentState::new(AgentRecord::new(InstanceUid([2; 16]), 0));
        let c = Context {
            opamp_offer: Some(Box::leak(Box::new(opamp.clone()))),
            ..ctx(Some(tel))
        };
        let o = handle(&mut plain, &msg(0, hb), &c);
        let cs = o.reply.connection_settings.expect("opamp offered");
        assert!(cs.own_metrics.is_none(), "ReportsOwnMetrics not declared");
        assert_eq!(cs.hash, opamp.hash());
    }
}
