//! Available components and pre-flight checks over the API: an agent's component set, and
//! the check of a config version against the agents a push would reach (without pushing).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::configs::target_of;
use super::guard::{ApiJson, Caller, Viewer};
use super::{parse_uid, ApiError, ApiResult, ErrorBody};
use crate::service::preflight::Preflight;
use crate::service::Coordinator;

#[derive(Serialize, ToSchema)]
pub struct ComponentsView {
    /// Hex of the hash the agent reported; `None`: it reports no components.
    pub components_hash: Option<String>,
    /// Kind (`receivers`, `exporters`, …) → component types; `None` while the server has
    /// not received the set of that hash.
    #[schema(value_type = Option<Object>)]
    pub components: Option<BTreeMap<String, Vec<String>>>,
}

#[utoipa::path(get, path = "/api/v1/agents/{uid}/components",
    responses((status = 200, body = ComponentsView), (status = 404, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn show_components(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Path(uid): Path<String>,
) -> ApiResult<ComponentsView> {
    let uid = parse_uid(&uid)?;
    let record = c
        .agent(uid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("agent {uid}")))?;
    let components = c.components_of(&record).map(|set| {
        set.iter()
            .map(|(kind, types)| (kind.clone(), types.iter().cloned().collect()))
            .collect()
    });
    Ok(Json(ComponentsView {
        components_hash: record.components_hash,
        components,
    }))
}

/// Which agents to check a config against: one `agent`, agents matching all `labels`, or
/// `all`.
#[derive(Deserialize, ToSchema)]
pub struct CheckBody {
    pub(crate) agent: Option<String>,
    pub(crate) labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub(crate) all: bool,
}

#[utoipa::path(post, path = "/api/v1/configs/{id}/check", params(("id" = i64, Path)),
    request_body = CheckBody,
    responses((status = 200, body = Preflight), (status = 404, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn check_config(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Path(id): Path<i64>,
    ApiJson(body, _): ApiJson<CheckBody>,
) -> ApiResult<Preflight> {
    let target = target_of(body.agent, body.labels, body.all)?;
    let version = c
        .store()
        .get_config(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("config version {id}")))?;
    let agents = c.agents().await?;
    Ok(Json(c.preflight(&version.files, &target, &agents)))
}
