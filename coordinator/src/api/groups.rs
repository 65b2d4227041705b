//! Groups: named label selectors with their live member counts; create or replace, show,
//! delete. A rollout targets a group by name.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::agents::AgentView;
use super::guard::{ApiJson, Caller, Operator, Viewer};
use super::{check_labels, check_name, ApiError, ApiResult, ErrorBody};
use crate::service::Coordinator;

/// Agents listed in a group's view.
const LISTED_MEMBERS: usize = 1000;

#[derive(Deserialize, ToSchema)]
pub struct GroupBody {
    /// Labels an agent's description must all have (identifying or not); `{}` is every agent.
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, ToSchema)]
pub struct GroupView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub author: String,
    pub created_ms: i64,
    /// Agents the labels match now.
    pub members: usize,
}

#[derive(Serialize, ToSchema)]
pub struct GroupDetail {
    #[serde(flatten)]
    pub group: GroupView,
    /// The first members (at most 1,000), by uid.
    pub agents: Vec<AgentView>,
}

#[utoipa::path(get, path = "/api/v1/groups",
    responses((status = 200, body = [GroupView])), security(("api_token" = [])))]
pub(super) async fn list_groups(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
) -> ApiResult<Vec<GroupView>> {
    let groups = c.groups_counted().await?;
    Ok(Json(
        groups
            .into_iter()
            .map(|(g, members)| GroupView {
                name: g.name,
                labels: g.labels,
                author: g.author,
                created_ms: g.created_ms,
                members,
            })
            .collect(),
    ))
}

#[utoipa::path(put, path = "/api/v1/groups/{name}", params(("name" = String, Path)),
    request_body = GroupBody,
    responses((status = 200, body = GroupView), (status = 400, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn put_group(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Operator>,
    Path(name): Path<String>,
    ApiJson(body, _): ApiJson<GroupBody>,
) -> ApiResult<GroupView> {
    put(&c, &caller.actor, &name, body).await.map(Json)
}

/// Creates or replaces a group as `PUT /api/v1/groups/{name}` does (the console's too).
pub(crate) async fn put(
    c: &Coordinator,
    actor: &str,
    name: &str,
    body: GroupBody,
) -> Result<GroupView, ApiError> {
    check_name(name)?;
    if name.is_empty() {
        return Err(ApiError::BadRequest("a group needs a name".into()));
    }
    check_labels("label", &body.labels)?;
    let g = c.put_group(name, body.labels, actor).await?;
    let agents = c.agents().await?;
    let members = c.group_members(&g, &agents).count();
    Ok(GroupView {
        name: g.name,
        labels: g.labels,
        author: g.author,
        created_ms: g.created_ms,
        members,
    })
}

#[utoipa::path(get, path = "/api/v1/groups/{name}", params(("name" = String, Path)),
    responses((status = 200, body = GroupDetail), (status = 404, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn show_group(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Path(name): Path<String>,
) -> ApiResult<GroupDetail> {
    let g = c.group(&name).await?;
    let agents = c.agents().await?;
    let members: Vec<_> = c.group_members(&g, &agents).collect();
    Ok(Json(GroupDetail {
        group: GroupView {
            members: members.len(),
            name: g.name.clone(),
            labels: g.labels.clone(),
            author: g.author.clone(),
            created_ms: g.created_ms,
        },
        agents: members
            .into_iter()
            .take(LISTED_MEMBERS)
            .map(|r| AgentView::from(r.clone()))
            .collect(),
    }))
}

#[utoipa::path(delete, path = "/api/v1/groups/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("api_token" = [])))]
pub(super) async fn delete_group(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Operator>,
    Path(name): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    c.delete_group(&name, &caller.actor).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}
