//! Config versions (create, list, show) and their assignments to agents (create, list),
//! with the check on a new version's file names and content types.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use shared::domain::{Assignment, ConfigFile, ConfigMap, ConfigVersion, Target};
use utoipa::ToSchema;

use super::guard::{ApiJson, Caller, ConfigSized, Operator, Viewer};
use super::{check_labels, check_name, check_text, parse_uid, ApiError, ApiResult, ErrorBody};
use crate::service::Coordinator;

/// A new config version: either one `body` (file name "") or several named `files`.
#[derive(Deserialize, ToSchema)]
pub struct NewConfig {
    pub(crate) name: String,
    pub(crate) body: Option<String>,
    pub(crate) content_type: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub(crate) files: Option<BTreeMap<String, ConfigFile>>,
    /// Create it even though its YAML does not parse or its Collector pipelines name
    /// undefined components (recorded in the audit log as forced).
    #[serde(default)]
    pub(crate) force: bool,
}

#[utoipa::path(post, path = "/api/v1/configs", request_body = NewConfig,
    responses((status = 200, body = Object)), security(("api_token" = [])))]
pub(super) async fn create_config(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Operator>,
    ApiJson(body, _): ApiJson<NewConfig, ConfigSized>,
) -> ApiResult<ConfigVersion> {
    Ok(Json(create(&c, &caller.actor, body).await?))
}

/// Creates a config version as `POST /api/v1/configs` does (the console's path too).
pub(crate) async fn create(
    c: &Coordinator,
    actor: &str,
    body: NewConfig,
) -> Result<ConfigVersion, ApiError> {
    let files: ConfigMap = match (body.body, body.files) {
        (Some(text), None) => BTreeMap::from([(
            String::new(),
            ConfigFile {
                body: text,
                content_type: body.content_type.unwrap_or_else(|| "text/yaml".into()),
            },
        )]),
        (None, Some(files)) => files,
        _ => {
            return Err(ApiError::BadRequest(
                "give exactly one of `body` or `files`".into(),
            ))
        }
    };
    check_name(&body.name)?;
    check_files(&files)?;
    Ok(c.create_config(body.name, files, actor, body.force).await?)
}

/// File names (`""` is the single unnamed file) and content types of a new config version.
fn check_files(files: &ConfigMap) -> Result<(), ApiError> {
    for (name, file) in files {
        check_text(&format!("file name `{}`", name.escape_default()), name)?;
        check_text(
            &format!("content type of file `{}`", name.escape_default()),
            &file.content_type,
        )?;
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/v1/configs",
    responses((status = 200, body = [Object])), security(("api_token" = [])))]
pub(super) async fn list_configs(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
) -> ApiResult<Vec<ConfigVersion>> {
    Ok(Json(c.store().list_configs().await?))
}

#[utoipa::path(get, path = "/api/v1/configs/{id}", params(("id" = i64, Path)),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)), security(("api_token" = [])))]
pub(super) async fn show_config(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Path(id): Path<i64>,
) -> ApiResult<ConfigVersion> {
    c.store()
        .get_config(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("config version {id}")))
}

/// Assign a config version to one agent (`agent`), to agents matching all `labels`, or to `all`.
#[derive(Deserialize, ToSchema)]
pub struct NewAssignmentBody {
    pub(crate) config_id: i64,
    pub(crate) agent: Option<String>,
    pub(crate) labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub(crate) all: bool,
    /// Push even though the config fails its pre-flight check for some of these agents
    /// (recorded in the audit log as forced, with the answer).
    #[serde(default)]
    pub(crate) force: bool,
}

#[derive(Serialize, ToSchema)]
pub struct AssignmentResult {
    #[schema(value_type = Object)]
    pub(crate) assignment: Assignment,
    /// Agents the assignment applies to now. In cluster mode, agents served by other
    /// coordinators are counted as of their last batch write (`store.flush_interval_ms`), so
    /// agents that connected within that time may be missing from the count (the assignment
    /// still reaches them).
    pub(crate) matched_agents: usize,
}

#[utoipa::path(post, path = "/api/v1/assignments", request_body = NewAssignmentBody,
    responses((status = 200, body = AssignmentResult)), security(("api_token" = [])))]
pub(super) async fn create_assignment(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Operator>,
    ApiJson(body, _): ApiJson<NewAssignmentBody>,
) -> ApiResult<AssignmentResult> {
    Ok(Json(assign(&c, &caller.actor, body).await?))
}

/// Assigns a config version as `POST /api/v1/assignments` does (the console's path too).
pub(crate) async fn assign(
    c: &Coordinator,
    actor: &str,
    body: NewAssignmentBody,
) -> Result<AssignmentResult, ApiError> {
    let target = target_of(body.agent, body.labels, body.all)?;
    let (assignment, matched_agents) = c.assign(body.config_id, target, actor, body.force).await?;
    Ok(AssignmentResult {
        assignment,
        matched_agents,
    })
}

/// Whom an assignment is for: exactly one of one agent, agents with all these labels, or all.
pub(super) fn target_of(
    agent: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    all: bool,
) -> Result<Target, ApiError> {
    match (agent, labels, all) {
        (Some(uid), None, false) => Ok(Target::Agent(parse_uid(&uid)?)),
        (None, Some(labels), false) if !labels.is_empty() => {
            check_labels("label", &labels)?;
            Ok(Target::Labels(labels))
        }
        (None, None, true) => Ok(Target::All),
        _ => Err(ApiError::BadRequest(
            "give exactly one of `agent`, non-empty `labels`, or `all: true`".into(),
        )),
    }
}

#[utoipa::path(get, path = "/api/v1/assignments",
    responses((status = 200, body = [Object])), security(("api_token" = [])))]
pub(super) async fn list_assignments(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
) -> ApiResult<Vec<Assignment>> {
    Ok(Json(c.store().list_assignments().await?))
}
