//! Own telemetry over the API: a group's settings (where its agents send their own metrics,
//! traces and logs), and one agent's offer, its status and its throughput window.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use shared::domain::AgentRecord;
use shared::own_telemetry::{Point, Rates, TelemetrySettings};
use utoipa::ToSchema;

use super::guard::{ApiJson, Caller, Operator, Viewer};
use super::{check_name, parse_uid, ApiError, ApiResult, ErrorBody};
use crate::service::Coordinator;

#[utoipa::path(get, path = "/api/v1/groups/{name}/telemetry", params(("name" = String, Path)),
    responses((status = 200, body = TelemetrySettings), (status = 404, body = ErrorBody)),
    security(("api_token" = [])))]
/// Operators only: the headers often hold keys.
pub(super) async fn show_group_telemetry(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Operator>,
    Path(name): Path<String>,
) -> ApiResult<TelemetrySettings> {
    check_name(&name)?;
    Ok(Json(c.group_telemetry(&name).await?.unwrap_or_default()))
}

#[utoipa::path(put, path = "/api/v1/groups/{name}/telemetry", params(("name" = String, Path)),
    request_body = TelemetrySettings,
    responses((status = 200, body = TelemetrySettings), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_token" = [])))]
/// Sets the group's settings (`{}` removes them); offered to its agents at once.
pub(super) async fn put_group_telemetry(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Operator>,
    Path(name): Path<String>,
    ApiJson(body, _): ApiJson<TelemetrySettings>,
) -> ApiResult<TelemetrySettings> {
    check_name(&name)?;
    c.set_group_telemetry(&name, body.clone(), &caller.actor)
        .await?;
    Ok(Json(body))
}

/// One signal as offered to the agent (its credential left out).
#[derive(Serialize, ToSchema)]
pub struct OfferedView {
    pub signal: &'static str,
    /// Where it goes; `ampora` when to this server.
    pub endpoint: String,
    /// Whether the agent declares it reports this signal (else it is not offered).
    pub declared: bool,
}

/// One minute of throughput, all signals together, and per signal.
#[derive(Serialize, ToSchema)]
pub struct PointView {
    /// Start of the minute, Unix ms.
    pub at_ms: i64,
    pub accepted: u64,
    pub sent: u64,
    pub dropped: u64,
    pub queue_size: u32,
    /// `traces`/`metrics`/`logs` → `[accepted, refused, sent, failed]`.
    #[schema(value_type = Object)]
    pub by_signal: std::collections::BTreeMap<&'static str, [u32; 4]>,
}

impl PointView {
    pub(crate) fn of(p: &Point) -> Self {
        use shared::own_telemetry::Signal;
        PointView {
            at_ms: p.minute * 60_000,
            accepted: p.accepted(),
            sent: p.sent(),
            dropped: p.dropped(),
            queue_size: p.queue,
            by_signal: Signal::ALL
                .iter()
                .map(|s| {
                    let i = *s as usize * 4;
                    (
                        s.as_str(),
                        [
                            p.counts[i],
                            p.counts[i + 1],
                            p.counts[i + 2],
                            p.counts[i + 3],
                        ],
                    )
                })
                .collect(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct AgentTelemetryView {
    /// The group whose settings apply (the first by name that has some).
    pub group: Option<String>,
    pub offered: Vec<OfferedView>,
    /// Hex of the connection settings last offered, and whether the agent showed it uses
    /// them: reported APPLIED (`ConnectionSettingsStatus`, agents with
    /// ReportsConnectionSettingsStatus) or connected with the certificate they carry.
    pub settings_offered: Option<String>,
    pub settings_confirmed: bool,
    /// What the agent last reported of the settings it uses (`APPLIED`, `APPLYING`,
    /// `FAILED`), and its error, if it reported any.
    pub settings_status: Option<&'static str>,
    pub settings_error: Option<String>,
    /// Rates over the interval between its last two exports to Ampora, if recent.
    pub rates: Option<Rates>,
    /// When its last export arrived (Unix ms), if ever.
    pub last_export_ms: Option<i64>,
    /// The last hour, a point a minute, oldest first.
    pub points: Vec<PointView>,
}

pub(crate) fn telemetry_view(c: &Coordinator, record: &AgentRecord) -> AgentTelemetryView {
    use proto::agent_caps;
    let found = c.telemetry_of(record);
    let mut offered = Vec::new();
    if let Some((_, s)) = &found {
        for (signal, d, bit) in [
            ("metrics", &s.metrics, agent_caps::REPORTS_OWN_METRICS),
            ("traces", &s.traces, agent_caps::REPORTS_OWN_TRACES),
            ("logs", &s.logs, agent_caps::REPORTS_OWN_LOGS),
        ] {
            if let Some(d) = d {
                offered.push(OfferedView {
                    signal,
                    endpoint: if d.ampora {
                        "ampora".into()
                    } else {
                        d.endpoint.clone()
                    },
                    declared: record.capabilities & bit != 0,
                });
            }
        }
    }
    let t = record.throughput.as_deref();
    let reported = record.settings_status.as_ref();
    let failed_or_pending = reported.is_some_and(|r| {
        matches!(
            r.status,
            shared::domain::RemoteStatus::Failed | shared::domain::RemoteStatus::Applying
        )
    });
    AgentTelemetryView {
        group: found.map(|(g, _)| g),
        offered,
        settings_offered: record.settings_offered.clone(),
        settings_confirmed: record.settings_offered.is_some()
            && record.settings_offered == record.settings_in_use
            && !failed_or_pending,
        settings_status: reported.map(|r| r.status.as_str()),
        settings_error: reported
            .map(|r| r.error_message.clone())
            .filter(|e| !e.is_empty()),
        rates: t.and_then(|t| t.current(shared::now_ms())),
        last_export_ms: t.map(|t| t.last_ms).filter(|ms| *ms > 0),
        points: t
            .map(|t| t.points.iter().map(PointView::of).collect())
            .unwrap_or_default(),
    }
}

#[utoipa::path(get, path = "/api/v1/agents/{uid}/telemetry", params(("uid" = String, Path)),
    responses((status = 200, body = AgentTelemetryView), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn show_agent_telemetry(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Path(uid): Path<String>,
) -> ApiResult<AgentTelemetryView> {
    let uid = parse_uid(&uid)?;
    let record = c
        .agent(uid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("agent {uid}")))?;
    Ok(Json(telemetry_view(&c, &record)))
}
