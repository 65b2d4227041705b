//! Agents' own telemetry on the coordinator (facts §3.5): groups' settings (stored per group,
//! cached here: read at start, every lease round and on `TelemetryChanged`), the offer each
//! agent gets from them, and the throughput window of the agents that send their own metrics
//! to Ampora (the gateways relay each export's figures to the agent's owner).
//!
//! An agent in several groups with settings takes the first such group by name.

use std::sync::Arc;

use shared::bus::ControlEvent;
use shared::domain::AgentRecord;
use shared::download_token::DownloadKey;
use shared::ids::InstanceUid;
use shared::now_ms;
use shared::own_telemetry::{Figures, MetricsCredential, TelemetrySettings};
use shared::rollout::Group;

use super::{Coordinator, ServiceError};
use crate::session::telemetry::settings_of;
use crate::session::TelemetryOffer;

/// Ampora as a destination of own metrics: its endpoint as agents reach it, and the key their
/// credentials are signed with (the gateways check them with the same key).
#[derive(Debug, Clone)]
pub struct MetricsHost {
    /// `http(s)://host:port/v1/metrics`.
    pub endpoint: String,
    pub key: DownloadKey,
}

/// Groups with settings, by group name.
pub(super) type GroupSettings = Vec<(Group, TelemetrySettings)>;

const EXPORTS: &str = "ampora_own_metrics_exports_total";

pub fn describe_metrics() {
    metrics::describe_counter!(
        EXPORTS,
        "Agents' own-metrics exports a coordinator took (recorded) or dropped (not_owned: the agent is not served here)"
    );
    for outcome in ["recorded", "not_owned"] {
        metrics::counter!(EXPORTS, "outcome" => outcome).absolute(0);
    }
}

impl Coordinator {
    /// Sets `group`'s own-telemetry settings (empty ones remove them). Audited, with header
    /// names but not their values (they are often keys).
    pub async fn set_group_telemetry(
        &self,
        group: &str,
        settings: TelemetrySettings,
        actor: &str,
    ) -> Result<(), ServiceError> {
        self.group(group).await?;
        if let Some(p) = settings.problem() {
            return Err(ServiceError::Invalid(p));
        }
        let to_ampora = settings.metrics.as_ref().is_some_and(|d| d.ampora);
        if to_ampora && self.cfg.metrics_host.is_none() {
            return Err(ServiceError::Conflict(
                "Ampora's own-metrics endpoint is off on this node: it needs the shared key \
                 (packages.download_key_file in cluster mode)"
                    .into(),
            ));
        }
        if settings.is_empty() {
            self.store.delete_group_telemetry(group).await?;
        } else {
            let body = serde_json::to_string(&settings)
                .map_err(|e| ServiceError::Internal(e.to_string()))?;
            self.store
                .put_group_telemetry(group, &body, now_ms())
                .await?;
        }
        let summary = |d: &Option<shared::own_telemetry::Destination>| {
            d.as_ref().map(|d| {
                serde_json::json!({
                    "endpoint": if d.ampora { "ampora" } else { d.endpoint.as_str() },
                    "headers": d.headers.keys().collect::<Vec<_>>(),
                })
            })
        };
        self.audit_op(
            actor,
            "group.telemetry",
            None,
            serde_json::json!({
                "group": group,
                "metrics": summary(&settings.metrics),
                "traces": summary(&settings.traces),
                "logs": summary(&settings.logs),
            }),
        )
        .await?;
        self.telemetry_changed().await;
        Ok(())
    }

    /// `group`'s settings (`None`: it has none).
    pub async fn group_telemetry(
        &self,
        group: &str,
    ) -> Result<Option<TelemetrySettings>, ServiceError> {
        self.group(group).await?;
        Ok(self.group_settings.read().ok().and_then(|g| {
            g.iter()
                .find(|(g, _)| g.name == group)
                .map(|(_, s)| s.clone())
        }))
    }

    /// Settings or groups changed here: re-read now, and tell the other coordinators.
    pub(super) async fn telemetry_changed(&self) {
        self.sync_telemetry().await;
        let _ = self.bus.broadcast(ControlEvent::TelemetryChanged).await;
    }

    /// Re-reads groups and their settings (a failed read keeps the last ones).
    pub(super) async fn sync_telemetry(&self) {
        let read = async {
            let rows = self.store.list_group_telemetry().await?;
            let groups = self.store.list_groups().await?;
            Ok::<_, shared::store::StoreError>((rows, groups))
        };
        let (rows, groups) = match read.await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "loading own-telemetry settings failed");
                return;
            }
        };
        let mut settings: GroupSettings = Vec::new();
        for (name, body) in rows {
            let Some(g) = groups.iter().find(|g| g.name == name) else {
                continue;
            };
            match serde_json::from_str(&body) {
                Ok(s) => settings.push((g.clone(), s)),
                Err(e) => {
                    tracing::warn!(group = %name, error = %e, "unreadable own-telemetry settings")
                }
            }
        }
        settings.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        if let Ok(mut w) = self.group_settings.write() {
            *w = settings;
        }
    }

    /// The group whose settings apply to `agent`, and them.
    pub fn telemetry_of(&self, agent: &AgentRecord) -> Option<(String, TelemetrySettings)> {
        let groups = self.group_settings.read().ok()?;
        groups
            .iter()
            .find(|(g, _)| self.target_admits(&g.target(), agent))
            .map(|(g, s)| (g.name.clone(), s.clone()))
    }

    /// What `agent` is offered for its own telemetry (before its capabilities are applied).
    pub(super) fn telemetry_offer(&self, agent: &AgentRecord) -> Option<Arc<TelemetryOffer>> {
        use proto::agent_caps::{REPORTS_OWN_LOGS, REPORTS_OWN_METRICS, REPORTS_OWN_TRACES};
        // Asked on every frame: nothing to look up for agents that report none of it.
        let reports = REPORTS_OWN_METRICS | REPORTS_OWN_TRACES | REPORTS_OWN_LOGS;
        if agent.capabilities & reports == 0 {
            return None;
        }
        let (_, s) = self.telemetry_of(agent)?;
        let host = self.cfg.metrics_host.as_ref();
        let one = |d: &Option<shared::own_telemetry::Destination>| {
            let d = d.as_ref()?;
            if d.ampora {
                let host = host?;
                let credential = MetricsCredential::mint(&host.key, agent.instance_uid);
                Some(settings_of(d, &host.endpoint, Some(&credential)))
            } else {
                Some(settings_of(d, &d.endpoint, None))
            }
        };
        let offer = TelemetryOffer {
            metrics: one(&s.metrics),
            traces: one(&s.traces),
            logs: one(&s.logs),
        };
        (!offer.is_empty()).then(|| Arc::new(offer))
    }

    /// A gateway relayed an own-metrics export of `uid`: folded into its window when the
    /// agent is served here, and written with the record at the next flush, so every
    /// coordinator's API and console read it (a Collector exports once a minute by default;
    /// the gateways take at most one export per second per agent).
    pub(super) async fn own_metrics(&self, uid: InstanceUid, figures: &Figures) {
        let Some(slot) = self.slot(&uid) else {
            metrics::counter!(EXPORTS, "outcome" => "not_owned").increment(1);
            return;
        };
        slot.lock()
            .await
            .state
            .record
            .throughput
            .get_or_insert_with(Default::default)
            .record(figures, now_ms());
        metrics::counter!(EXPORTS, "outcome" => "recorded").increment(1);
        self.mark_dirty(uid);
    }
}
