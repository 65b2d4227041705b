//! Agents: the list (filtered by connection, labels and config state) and its counts, and
//! one agent, each shown as an [`AgentView`] (the stored record plus derived fields).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use shared::domain::{AgentRecord, ConfigState};
use utoipa::{IntoParams, ToSchema};

use super::guard::{ApiJson, Caller, Operator, Viewer};
use super::{parse_uid, ApiError, ApiResult, ErrorBody};
use crate::service::Coordinator;

/// An agent as the API shows it: the stored record plus derived fields.
#[derive(Serialize, ToSchema)]
pub struct AgentView {
    #[serde(flatten)]
    #[schema(value_type = Object)]
    record: AgentRecord,
    #[schema(value_type = String)]
    config_state: ConfigState,
    capability_names: Vec<&'static str>,
}

impl From<AgentRecord> for AgentView {
    fn from(record: AgentRecord) -> Self {
        Self {
            config_state: record.config_state(),
            capability_names: proto::agent_caps::names(record.capabilities),
            record,
        }
    }
}

#[derive(Deserialize, IntoParams)]
pub(super) struct AgentFilter {
    /// Only connected (true) or disconnected (false) agents.
    connected: Option<bool>,
    /// `key=value` attribute filters, comma separated; all must match.
    label: Option<String>,
    /// none, pending, applied, failed or drifted.
    config_state: Option<String>,
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, ApiError> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| ApiError::BadRequest(format!("label `{p}` is not key=value")))
        })
        .collect()
}

/// The filter's agents, each with what `matches` needs.
async fn filtered(c: &Coordinator, f: AgentFilter) -> Result<Vec<AgentRecord>, ApiError> {
    let labels = f.label.as_deref().map(parse_labels).transpose()?;
    let state = f
        .config_state
        .map(|s| {
            serde_json::from_value::<ConfigState>(serde_json::Value::String(s.clone()))
                .map_err(|_| ApiError::BadRequest(format!("unknown config_state `{s}`")))
        })
        .transpose()?;
    Ok(c.agents()
        .await?
        .into_iter()
        .filter(|a| f.connected.is_none_or(|want| a.connected == want))
        .filter(|a| labels.as_ref().is_none_or(|l| a.description.matches(l)))
        .filter(|a| state.is_none_or(|s| a.config_state() == s))
        .collect())
}

/// Every agent; `effective_config` is left out (its hash stays): one agent's files come with
/// `GET /api/v1/agents/{uid}`.
#[utoipa::path(get, path = "/api/v1/agents", params(AgentFilter),
    responses((status = 200, body = [AgentView])), security(("api_token" = [])))]
pub(super) async fn list_agents(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Query(f): Query<AgentFilter>,
) -> ApiResult<Vec<AgentView>> {
    let agents = filtered(&c, f).await?;
    Ok(Json(agents.into_iter().map(AgentView::from).collect()))
}

/// How many agents match, by connection and config state.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct AgentCounts {
    pub matched: u64,
    pub connected: u64,
    pub none: u64,
    pub pending: u64,
    pub applied: u64,
    pub failed: u64,
    pub drifted: u64,
}

impl AgentCounts {
    fn of(agents: &[AgentRecord]) -> Self {
        let mut n = Self::default();
        for a in agents {
            n.matched += 1;
            n.connected += u64::from(a.connected);
            *match a.config_state() {
                ConfigState::None => &mut n.none,
                ConfigState::Pending => &mut n.pending,
                ConfigState::Applied => &mut n.applied,
                ConfigState::Failed => &mut n.failed,
                ConfigState::Drifted => &mut n.drifted,
            } += 1;
        }
        n
    }
}

/// The counts of the agents `GET /api/v1/agents` would list with the same filter, without
/// the list: what a rollout watcher or a dashboard polls at 100,000 agents.
#[utoipa::path(get, path = "/api/v1/agents/counts", params(AgentFilter),
    responses((status = 200, body = AgentCounts)), security(("api_token" = [])))]
pub(super) async fn count_agents(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Query(f): Query<AgentFilter>,
) -> ApiResult<AgentCounts> {
    Ok(Json(AgentCounts::of(&filtered(&c, f).await?)))
}

#[utoipa::path(get, path = "/api/v1/agents/{uid}", params(("uid" = String, Path)),
    responses((status = 200, body = AgentView), (status = 404, body = ErrorBody)), security(("api_token" = [])))]
pub(super) async fn show_agent(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Path(uid): Path<String>,
) -> ApiResult<AgentView> {
    let uid = parse_uid(&uid)?;
    c.agent(uid)
        .await?
        .map(|a| Json(a.into()))
        .ok_or_else(|| ApiError::NotFound(format!("agent {uid}")))
}

#[utoipa::path(post, path = "/api/v1/agents/{uid}/reapply", params(("uid" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn reapply_config(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Operator>,
    Path(uid): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    let uid = parse_uid(&uid)?;
    c.reapply_config(uid, &caller.actor).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Adopt what a drifted agent runs as a new config version (assigned to it).
#[derive(Deserialize, ToSchema)]
pub struct AdoptBody {
    /// The new version's name (default "adopted from <uid>").
    pub name: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/agents/{uid}/adopt", params(("uid" = String, Path)),
    request_body = AdoptBody,
    responses((status = 200, body = Object), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn adopt_config(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Operator>,
    Path(uid): Path<String>,
    ApiJson(body, _): ApiJson<AdoptBody>,
) -> ApiResult<shared::domain::ConfigVersion> {
    let uid = parse_uid(&uid)?;
    if let Some(n) = &body.name {
        super::check_name(n)?;
    }
    Ok(Json(c.adopt_config(uid, body.name, &caller.actor).await?))
}
