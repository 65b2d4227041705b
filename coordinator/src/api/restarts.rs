//! Restarts over the API: one agent (`POST /api/v1/agents/{uid}/restart`), or a group, label
//! selector or the whole fleet in batches (`POST /api/v1/restarts`), and the group restarts
//! (from the store: every coordinator answers alike).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use shared::domain::Target;
use utoipa::ToSchema;

use super::guard::{ApiJson, Caller, Operator, Viewer};
use super::{check_labels, parse_uid, ApiError, ApiResult, ErrorBody};
use crate::service::restarts::{RestartJob, RestartPlan, LISTED};
use crate::service::Coordinator;

#[utoipa::path(post, path = "/api/v1/agents/{uid}/restart", params(("uid" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn restart_agent(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Operator>,
    Path(uid): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    let uid = parse_uid(&uid)?;
    c.restart_agent(uid, &caller.actor).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Restart the agents of a `group`, matching all `labels`, or `all`, `batch` at a time.
#[derive(Deserialize, ToSchema)]
pub struct NewRestartBody {
    pub(crate) group: Option<String>,
    pub(crate) labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub(crate) all: bool,
    /// Agents restarting at once (default 10).
    pub(crate) batch: Option<u32>,
    /// Each batch's time to come back connected and healthy, e.g. `2m` (default 2m).
    pub(crate) deadline: Option<String>,
    /// Agents that may fail to come back before the restart stops (default 0).
    pub(crate) budget: Option<u64>,
}

#[utoipa::path(post, path = "/api/v1/restarts", request_body = NewRestartBody,
    responses((status = 200, body = RestartJob), (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn create_restart(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Operator>,
    ApiJson(body, _): ApiJson<NewRestartBody>,
) -> ApiResult<RestartJob> {
    let target = match (body.group, body.labels, body.all) {
        (Some(g), None, false) => c.group(&g).await?.target(),
        (None, Some(labels), false) if !labels.is_empty() => {
            check_labels("label", &labels)?;
            Target::Labels(labels)
        }
        (None, None, true) => Target::All,
        _ => {
            return Err(ApiError::BadRequest(
                "give exactly one of `group`, non-empty `labels`, or `all: true`".into(),
            ))
        }
    };
    let deadline = match body.deadline.as_deref() {
        None => Duration::from_secs(120),
        Some(t) => humantime::parse_duration(t.trim())
            .map_err(|e| ApiError::BadRequest(format!("deadline `{t}`: {e}")))?,
    };
    let plan = RestartPlan {
        target,
        batch: body.batch.unwrap_or(10) as usize,
        deadline_ms: i64::try_from(deadline.as_millis())
            .map_err(|_| ApiError::BadRequest("deadline too long".into()))?,
        budget: body.budget.unwrap_or(0),
    };
    Ok(Json(c.start_restart(plan, &caller.actor).await?))
}

#[utoipa::path(get, path = "/api/v1/restarts",
    responses((status = 200, body = [RestartJob])), security(("api_token" = [])))]
pub(super) async fn list_restarts(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
) -> ApiResult<Vec<RestartJob>> {
    Ok(Json(c.restart_jobs(LISTED).await?))
}

#[utoipa::path(get, path = "/api/v1/restarts/{id}", params(("id" = i64, Path)),
    responses((status = 200, body = RestartJob), (status = 404, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn show_restart(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Path(id): Path<i64>,
) -> ApiResult<RestartJob> {
    c.restart_job(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("restart {id}")))
}
