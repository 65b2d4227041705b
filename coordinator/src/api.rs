//! The REST API under `/api/v1`, described by the OpenAPI document at `/api/v1/openapi.json`.
//!
//! Every route but the document itself needs an operator API token (`Authorization: Bearer
//! amp-api.…`); reads need the viewer role, config changes operator, tokens admin. Errors are
//! JSON `{"error": "..."}` with the status chosen in one place, [`ApiError::into_response`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shared::domain::{
    AgentRecord, ApiTokenRecord, Assignment, AuditEntry, ConfigFile, ConfigMap, ConfigState,
    ConfigVersion, Role, Target, TokenRecord,
};
use shared::ids::InstanceUid;
use shared::store::{AuditQuery, StoreError};
use shared::token;
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::service::{Coordinator, ServiceError};

#[derive(OpenApi)]
#[openapi(
    info(title = "Ampora API", description = "Fleet management for OpAMP agents"),
    paths(
        list_agents, show_agent, create_config, list_configs, show_config, create_assignment,
        list_assignments, create_token, create_tokens, list_tokens, revoke_token, list_audit,
        show_cluster
    ),
    components(schemas(ClusterView, PartitionLease, AgentView, NewConfig, NewAssignmentBody, AssignmentResult, NewToken, CreatedToken, NewTokens, CreatedTokens, ErrorBody)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document as JSON text.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

pub fn router(coord: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/agents", get(list_agents))
        .route("/api/v1/agents/{uid}", get(show_agent))
        .route("/api/v1/configs", post(create_config).get(list_configs))
        .route("/api/v1/configs/{id}", get(show_config))
        .route(
            "/api/v1/assignments",
            post(create_assignment).get(list_assignments),
        )
        .route("/api/v1/tokens", post(create_token).get(list_tokens))
        .route("/api/v1/tokens/batch", post(create_tokens))
        .route("/api/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/api/v1/audit", get(list_audit))
        .route("/api/v1/cluster", get(show_cluster))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_API_BODY_BYTES))
        .with_state(coord)
}

/// Config versions of several MiB are normal (the bus carries them in chunks); axum's default
/// of 2 MB would refuse them.
const MAX_API_BODY_BYTES: usize = 64 << 20;

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi_json(),
    )
        .into_response()
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid API token")]
    Unauthorized,
    #[error("this action needs the {0:?} role")]
    Forbidden(Role),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("storage error: {0}")]
    Store(StoreError),
}

#[derive(Serialize, ToSchema)]
struct ErrorBody {
    error: String,
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::NotFound(m) => Self::NotFound(m),
            ServiceError::Invalid(m) => Self::BadRequest(m),
            ServiceError::Store(StoreError::NotFound(m)) => Self::NotFound(m),
            ServiceError::Store(s) => Self::Store(s),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ServiceError::Store(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Store(StoreError::MaybeApplied(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut resp = (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Checks the operator's API token and role; returns the actor name for the audit log.
async fn authorize(
    coord: &Coordinator,
    headers: &HeaderMap,
    need: Role,
) -> Result<String, ApiError> {
    let text = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| token::is_api_token(t))
        .ok_or(ApiError::Unauthorized)?;
    let rec: ApiTokenRecord = coord
        .store()
        .find_api_token(&token::hash_token(text))
        .await?
        .ok_or(ApiError::Unauthorized)?;
    if rec.role < need {
        return Err(ApiError::Forbidden(need));
    }
    Ok(format!("api:{}", rec.name))
}

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
struct AgentFilter {
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

#[utoipa::path(get, path = "/api/v1/agents", params(AgentFilter),
    responses((status = 200, body = [AgentView])), security(("api_token" = [])))]
async fn list_agents(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
    Query(f): Query<AgentFilter>,
) -> ApiResult<Vec<AgentView>> {
    authorize(&c, &headers, Role::Viewer).await?;
    let labels = f.label.as_deref().map(parse_labels).transpose()?;
    let state = f
        .config_state
        .map(|s| {
            serde_json::from_value::<ConfigState>(serde_json::Value::String(s.clone()))
                .map_err(|_| ApiError::BadRequest(format!("unknown config_state `{s}`")))
        })
        .transpose()?;
    let agents = c
        .agents()
        .await?
        .into_iter()
        .filter(|a| f.connected.is_none_or(|want| a.connected == want))
        .filter(|a| labels.as_ref().is_none_or(|l| a.description.matches(l)))
        .filter(|a| state.is_none_or(|s| a.config_state() == s))
        .map(AgentView::from)
        .collect();
    Ok(Json(agents))
}

fn parse_uid(s: &str) -> Result<InstanceUid, ApiError> {
    s.parse()
        .map_err(|_| ApiError::BadRequest(format!("`{s}` is not an instance uid")))
}

#[utoipa::path(get, path = "/api/v1/agents/{uid}", params(("uid" = String, Path)),
    responses((status = 200, body = AgentView), (status = 404, body = ErrorBody)), security(("api_token" = [])))]
async fn show_agent(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
    Path(uid): Path<String>,
) -> ApiResult<AgentView> {
    authorize(&c, &headers, Role::Viewer).await?;
    let uid = parse_uid(&uid)?;
    c.agent(uid)
        .await?
        .map(|a| Json(a.into()))
        .ok_or_else(|| ApiError::NotFound(format!("agent {uid}")))
}

/// A new config version: either one `body` (file name "") or several named `files`.
#[derive(Deserialize, ToSchema)]
pub struct NewConfig {
    name: String,
    body: Option<String>,
    content_type: Option<String>,
    #[schema(value_type = Option<Object>)]
    files: Option<BTreeMap<String, ConfigFile>>,
}

#[utoipa::path(post, path = "/api/v1/configs", request_body = NewConfig,
    responses((status = 200, body = Object)), security(("api_token" = [])))]
async fn create_config(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
    Json(body): Json<NewConfig>,
) -> ApiResult<ConfigVersion> {
    let actor = authorize(&c, &headers, Role::Operator).await?;
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
    Ok(Json(c.create_config(body.name, files, &actor).await?))
}

/// Names are shown in tables and logs, and Postgres text cannot hold NUL: no control
/// characters, and a sane length.
fn check_name(name: &str) -> Result<(), ApiError> {
    if name.chars().any(char::is_control) || name.len() > 256 {
        return Err(ApiError::BadRequest(
            "name must be at most 256 bytes without control characters".into(),
        ));
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/v1/configs",
    responses((status = 200, body = [Object])), security(("api_token" = [])))]
async fn list_configs(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
) -> ApiResult<Vec<ConfigVersion>> {
    authorize(&c, &headers, Role::Viewer).await?;
    Ok(Json(c.store().list_configs().await?))
}

#[utoipa::path(get, path = "/api/v1/configs/{id}", params(("id" = i64, Path)),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)), security(("api_token" = [])))]
async fn show_config(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> ApiResult<ConfigVersion> {
    authorize(&c, &headers, Role::Viewer).await?;
    c.store()
        .get_config(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("config version {id}")))
}

/// Assign a config version to one agent (`agent`), to agents matching all `labels`, or to `all`.
#[derive(Deserialize, ToSchema)]
pub struct NewAssignmentBody {
    config_id: i64,
    agent: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    all: bool,
}

#[derive(Serialize, ToSchema)]
pub struct AssignmentResult {
    #[schema(value_type = Object)]
    assignment: Assignment,
    /// Agents the assignment applies to now. In cluster mode, agents served by other
    /// coordinators are counted as of their last batch write (`store.flush_interval_ms`), so
    /// agents that connected within that time may be missing from the count (the assignment
    /// still reaches them).
    matched_agents: usize,
}

#[utoipa::path(post, path = "/api/v1/assignments", request_body = NewAssignmentBody,
    responses((status = 200, body = AssignmentResult)), security(("api_token" = [])))]
async fn create_assignment(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
    Json(body): Json<NewAssignmentBody>,
) -> ApiResult<AssignmentResult> {
    let actor = authorize(&c, &headers, Role::Operator).await?;
    let target = match (body.agent, body.labels, body.all) {
        (Some(uid), None, false) => Target::Agent(parse_uid(&uid)?),
        (None, Some(labels), false) if !labels.is_empty() => Target::Labels(labels),
        (None, None, true) => Target::All,
        _ => {
            return Err(ApiError::BadRequest(
                "give exactly one of `agent`, non-empty `labels`, or `all: true`".into(),
            ))
        }
    };
    let (assignment, matched_agents) = c.assign(body.config_id, target, &actor).await?;
    Ok(Json(AssignmentResult {
        assignment,
        matched_agents,
    }))
}

#[utoipa::path(get, path = "/api/v1/assignments",
    responses((status = 200, body = [Object])), security(("api_token" = [])))]
async fn list_assignments(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
) -> ApiResult<Vec<Assignment>> {
    authorize(&c, &headers, Role::Viewer).await?;
    Ok(Json(c.store().list_assignments().await?))
}

#[derive(Deserialize, ToSchema)]
pub struct NewToken {
    #[serde(default)]
    name: String,
    /// Lifetime in seconds; the configured default when absent.
    ttl_secs: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct CreatedToken {
    /// The token itself. Shown only here, once: Ampora stores only its hash.
    token: String,
    #[schema(value_type = Object)]
    record: TokenRecord,
}

#[utoipa::path(post, path = "/api/v1/tokens", request_body = NewToken,
    responses((status = 200, body = CreatedToken)), security(("api_token" = [])))]
async fn create_token(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
    Json(body): Json<NewToken>,
) -> ApiResult<CreatedToken> {
    let actor = authorize(&c, &headers, Role::Admin).await?;
    if body.ttl_secs == Some(0) {
        return Err(ApiError::BadRequest("ttl_secs must be positive".into()));
    }
    check_name(&body.name)?;
    let (token, record) = c
        .create_token(body.name, body.ttl_secs.map(Duration::from_secs), &actor)
        .await?;
    Ok(Json(CreatedToken { token, record }))
}

/// Many tokens at once, for provisioning a fleet (or a load test) in one call.
#[derive(Deserialize, ToSchema)]
pub struct NewTokens {
    #[serde(default)]
    name: String,
    ttl_secs: Option<u64>,
    /// How many tokens, 1 to 100,000.
    count: u32,
}

#[derive(Serialize, ToSchema)]
pub struct CreatedTokens {
    /// The tokens themselves, shown only here.
    tokens: Vec<String>,
}

#[utoipa::path(post, path = "/api/v1/tokens/batch", request_body = NewTokens,
    responses((status = 200, body = CreatedTokens)), security(("api_token" = [])))]
async fn create_tokens(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
    Json(body): Json<NewTokens>,
) -> ApiResult<CreatedTokens> {
    let actor = authorize(&c, &headers, Role::Admin).await?;
    if body.ttl_secs == Some(0) || !(1..=100_000).contains(&body.count) {
        return Err(ApiError::BadRequest(
            "ttl_secs must be positive and count between 1 and 100000".into(),
        ));
    }
    check_name(&body.name)?;
    let tokens = c
        .create_tokens(
            body.name,
            body.ttl_secs.map(Duration::from_secs),
            body.count,
            &actor,
        )
        .await?;
    Ok(Json(CreatedTokens { tokens }))
}

#[utoipa::path(get, path = "/api/v1/tokens",
    responses((status = 200, body = [Object])), security(("api_token" = [])))]
async fn list_tokens(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
) -> ApiResult<Vec<TokenRecord>> {
    authorize(&c, &headers, Role::Admin).await?;
    Ok(Json(c.store().list_tokens().await?))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("api_token" = [])))]
async fn revoke_token(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let actor = authorize(&c, &headers, Role::Admin).await?;
    c.revoke_token(&id, &actor).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams)]
struct AuditParams {
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    instance_uid: Option<String>,
    actor: Option<String>,
    reason: Option<String>,
    limit: Option<u32>,
}

/// Which coordinator serves which partition of agents.
#[derive(Serialize, ToSchema)]
pub struct ClusterView {
    /// The coordinator that answered.
    node: String,
    partitions: Vec<PartitionLease>,
}

#[derive(Serialize, ToSchema)]
pub struct PartitionLease {
    partition: u16,
    holder: String,
    fence: i64,
    expires_ms: i64,
}

#[utoipa::path(get, path = "/api/v1/cluster",
    responses((status = 200, body = ClusterView)), security(("api_token" = [])))]
async fn show_cluster(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
) -> ApiResult<ClusterView> {
    authorize(&c, &headers, Role::Viewer).await?;
    let partitions = c
        .store()
        .list_leases()
        .await?
        .into_iter()
        .map(|l| PartitionLease {
            partition: l.partition,
            holder: l.holder,
            fence: l.fence,
            expires_ms: l.expires_ms,
        })
        .collect();
    Ok(Json(ClusterView {
        node: c.node().to_string(),
        partitions,
    }))
}

#[utoipa::path(get, path = "/api/v1/audit", params(AuditParams),
    responses((status = 200, body = [Object])), security(("api_token" = [])))]
async fn list_audit(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
    Query(p): Query<AuditParams>,
) -> ApiResult<Vec<AuditEntry>> {
    authorize(&c, &headers, Role::Viewer).await?;
    let q = AuditQuery {
        since_ms: p.since_ms,
        until_ms: p.until_ms,
        instance_uid: p.instance_uid.as_deref().map(parse_uid).transpose()?,
        actor: p.actor,
        reason: p.reason,
        limit: p.limit.unwrap_or(100).min(10_000),
    };
    Ok(Json(c.store().query_audit(&q).await?))
}
