//! The REST API under `/api/v1`, described by the OpenAPI document at `/api/v1/openapi.json`:
//! its routes and handlers. What a request passes before a handler runs (concurrency limit,
//! API token and role, body size and time) is [`guard`]; the mapping of failures to statuses
//! is [`error`].
//!
//! Every route but the document itself and the agent CA's CRL (`/api/v1/identities/crl`,
//! fetched by agents and proxies) needs an operator API token (`Authorization: Bearer
//! amp-api.…`); reads need the viewer role, except the two token lists (admin: they name
//! every token and its prefix); config and assignment changes need operator; bootstrap
//! tokens, API tokens and identity revocations admin. The role is in each handler's
//! signature (`Caller<Viewer>`). Errors are JSON `{"error": "..."}`. Every change made
//! through the API is audited with its actor, `api:<API token name>`.

mod error;
mod guard;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shared::domain::{
    AgentRecord, ApiTokenListing, Assignment, AuditEntry, ConfigFile, ConfigMap, ConfigState,
    ConfigVersion, IdentityRecord, Role, Target, TokenRecord, TokenScope,
};
use shared::ids::InstanceUid;
use shared::store::{AuditCursor, AuditQuery};
use utoipa::{IntoParams, OpenApi, ToSchema};

pub use error::{ApiError, ErrorBody};
pub use guard::describe_metrics;
use guard::{Admin, ApiJson, ApiState, Caller, ConfigSized, Guard, Operator, Viewer};

use crate::config::Config;
use crate::service::Coordinator;

#[derive(OpenApi)]
#[openapi(
    info(title = "Ampora API", description = "Fleet management for OpAMP agents"),
    paths(
        list_agents, show_agent, create_config, list_configs, show_config, create_assignment,
        list_assignments, create_token, create_tokens, list_tokens, revoke_token,
        create_api_token, list_api_tokens, revoke_api_token, list_audit, export_audit,
        show_cluster, list_identities, show_identity, revoke_identity, identities_crl
    ),
    components(schemas(IdentityView, ClusterView, PartitionLease, AgentView, NewConfig, NewAssignmentBody, AssignmentResult, NewToken, CreatedToken, NewTokens, CreatedTokens, NewScope, NewApiToken, CreatedApiToken, ApiTokenView, ErrorBody)),
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

/// The API's routes with their guard, configured by `[api]` (and `[tls] trusted_proxies`,
/// with `proxy_secret` read from `tls.trusted_proxy_secret_file`).
pub fn router(
    coord: Arc<Coordinator>,
    config: &Config,
    proxy_secret: Option<gateway::server::ProxySecret>,
) -> Router {
    let guard = Arc::new(Guard::new(config, proxy_secret));
    // `ApiJson` enforces the per-route limits; this bounds any other body extractor.
    let body_limit = axum::extract::DefaultBodyLimit::max(guard.largest_body());
    let state = ApiState { coord, guard };
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
        .route(
            "/api/v1/api-tokens",
            post(create_api_token).get(list_api_tokens),
        )
        .route(
            "/api/v1/api-tokens/{id}",
            axum::routing::delete(revoke_api_token),
        )
        .route("/api/v1/audit", get(list_audit))
        .route("/api/v1/audit/export", get(export_audit))
        .route("/api/v1/cluster", get(show_cluster))
        .route("/api/v1/identities", get(list_identities))
        .route("/api/v1/identities/crl", get(identities_crl))
        .route(
            "/api/v1/identities/{serial}",
            get(show_identity).delete(revoke_identity),
        )
        .layer(body_limit)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::limit_concurrency,
        ))
        .with_state(state)
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi_json(),
    )
        .into_response()
}

type ApiResult<T> = Result<Json<T>, ApiError>;

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
    _caller: Caller<Viewer>,
    Query(f): Query<AgentFilter>,
) -> ApiResult<Vec<AgentView>> {
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
    _caller: Caller<Viewer>,
    Path(uid): Path<String>,
) -> ApiResult<AgentView> {
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
    caller: Caller<Operator>,
    ApiJson(body, _): ApiJson<NewConfig, ConfigSized>,
) -> ApiResult<ConfigVersion> {
    let actor = caller.actor;
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
    Ok(Json(c.create_config(body.name, files, &actor).await?))
}

/// Names, file names, content types and labels are shown in tables and logs, and Postgres
/// text cannot hold NUL: no control characters, and a sane length.
fn check_text(what: &str, value: &str) -> Result<(), ApiError> {
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(ApiError::BadRequest(format!(
            "{what} must not contain control characters (found U+{:04X})",
            u32::from(c)
        )));
    }
    if value.len() > 256 {
        return Err(ApiError::BadRequest(format!(
            "{what} must be at most 256 bytes (is {})",
            value.len()
        )));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), ApiError> {
    check_text("name", name)
}

/// Label keys (never empty) and values, of assignments and token scopes.
fn check_labels(what: &str, labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for (k, v) in labels {
        if k.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "{what} keys must not be empty"
            )));
        }
        check_text(&format!("{what} key `{}`", k.escape_default()), k)?;
        check_text(&format!("{what} value of `{}`", k.escape_default()), v)?;
    }
    Ok(())
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
async fn list_configs(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
) -> ApiResult<Vec<ConfigVersion>> {
    Ok(Json(c.store().list_configs().await?))
}

#[utoipa::path(get, path = "/api/v1/configs/{id}", params(("id" = i64, Path)),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)), security(("api_token" = [])))]
async fn show_config(
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
    caller: Caller<Operator>,
    ApiJson(body, _): ApiJson<NewAssignmentBody>,
) -> ApiResult<AssignmentResult> {
    let actor = caller.actor;
    let target = match (body.agent, body.labels, body.all) {
        (Some(uid), None, false) => Target::Agent(parse_uid(&uid)?),
        (None, Some(labels), false) if !labels.is_empty() => {
            check_labels("label", &labels)?;
            Target::Labels(labels)
        }
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
    _caller: Caller<Viewer>,
) -> ApiResult<Vec<Assignment>> {
    Ok(Json(c.store().list_assignments().await?))
}

#[derive(Deserialize, ToSchema)]
pub struct NewToken {
    #[serde(default)]
    name: String,
    /// Lifetime in seconds; the configured default when absent.
    ttl_secs: Option<u64>,
    /// Only agents matching the scope may redeem the token; any agent when absent.
    scope: Option<NewScope>,
    /// Re-bootstrap: the token is for this agent only, bound from the start. Once an agent
    /// exists, no other token may speak for it (revoke its identity first, or the token is
    /// refused with `identity_required`). Not combined with `scope`.
    instance_uid: Option<String>,
}

/// A bootstrap token's scope: the agent redeeming it must report every label as an attribute
/// (identifying or non-identifying) with that value in its first message, or it is refused
/// with reason `scope_mismatch`. A first message without a description is refused too.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewScope {
    /// `key: value` pairs, at least one.
    labels: BTreeMap<String, String>,
}

fn scope_of(scope: Option<NewScope>) -> Result<Option<TokenScope>, ApiError> {
    let Some(NewScope { labels }) = scope else {
        return Ok(None);
    };
    if labels.is_empty() {
        return Err(ApiError::BadRequest(
            "scope.labels needs at least one label (omit scope for an unscoped token)".into(),
        ));
    }
    check_labels("scope label", &labels)?;
    Ok(Some(TokenScope { labels }))
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
    caller: Caller<Admin>,
    ApiJson(body, _): ApiJson<NewToken>,
) -> ApiResult<CreatedToken> {
    let actor = caller.actor;
    if body.ttl_secs == Some(0) {
        return Err(ApiError::BadRequest("ttl_secs must be positive".into()));
    }
    check_name(&body.name)?;
    let ttl = body.ttl_secs.map(Duration::from_secs);
    let (token, record) = match body.instance_uid.as_deref().map(parse_uid).transpose()? {
        Some(_) if body.scope.is_some() => {
            return Err(ApiError::BadRequest(
                "a token for one agent (instance_uid) takes no scope".into(),
            ))
        }
        Some(uid) => c.create_token_for(uid, body.name, ttl, &actor).await?,
        None => {
            let scope = scope_of(body.scope)?;
            c.create_scoped_token(body.name, ttl, scope, &actor).await?
        }
    };
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
    /// The scope of every token in the batch; see `NewToken`.
    scope: Option<NewScope>,
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
    caller: Caller<Admin>,
    ApiJson(body, _): ApiJson<NewTokens>,
) -> ApiResult<CreatedTokens> {
    let actor = caller.actor;
    if body.ttl_secs == Some(0) || !(1..=100_000).contains(&body.count) {
        return Err(ApiError::BadRequest(
            "ttl_secs must be positive and count between 1 and 100000".into(),
        ));
    }
    check_name(&body.name)?;
    let scope = scope_of(body.scope)?;
    let tokens = c
        .create_tokens(
            body.name,
            body.ttl_secs.map(Duration::from_secs),
            body.count,
            scope,
            &actor,
        )
        .await?;
    Ok(Json(CreatedTokens { tokens }))
}

/// Every bootstrap token (never the token text), with its state and scope.
#[utoipa::path(get, path = "/api/v1/tokens",
    responses((status = 200, body = [Object])), security(("api_token" = [])))]
async fn list_tokens(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Admin>,
) -> ApiResult<Vec<TokenRecord>> {
    Ok(Json(c.store().list_tokens().await?))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("api_token" = [])))]
async fn revoke_token(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Admin>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let actor = caller.actor;
    c.revoke_token(&id, &actor).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new operator API token.
#[derive(Deserialize, ToSchema)]
pub struct NewApiToken {
    /// Unique among all API tokens ever created; the audit log names its actions
    /// `api:<name>`.
    name: String,
    /// `viewer` (read only), `operator` (also configs and assignments) or `admin` (also
    /// bootstrap tokens and API tokens).
    #[schema(value_type = String, example = "operator")]
    role: Role,
}

/// An API token as listed: never the token text.
#[derive(Serialize, ToSchema)]
pub struct ApiTokenView {
    id: String,
    name: String,
    #[schema(value_type = String, example = "viewer")]
    role: Role,
    created_ms: i64,
    /// When it was revoked; a revoked token gets 401.
    revoked_ms: Option<i64>,
}

impl From<ApiTokenListing> for ApiTokenView {
    fn from(l: ApiTokenListing) -> Self {
        Self {
            id: l.token.id,
            name: l.token.name,
            role: l.token.role,
            created_ms: l.token.created_ms,
            revoked_ms: l.revoked_ms,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct CreatedApiToken {
    /// The token itself. Shown only here, once: Ampora stores only its hash.
    token: String,
    api_token: ApiTokenView,
}

#[utoipa::path(post, path = "/api/v1/api-tokens", request_body = NewApiToken,
    responses((status = 200, body = CreatedApiToken), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody)),
    security(("api_token" = [])))]
async fn create_api_token(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Admin>,
    ApiJson(body, _): ApiJson<NewApiToken>,
) -> ApiResult<CreatedApiToken> {
    let actor = caller.actor;
    if body.name.is_empty() {
        return Err(ApiError::BadRequest("an api token needs a name".into()));
    }
    check_name(&body.name)?;
    let (token, record) = c.create_api_token(body.name, body.role, &actor).await?;
    Ok(Json(CreatedApiToken {
        token,
        api_token: ApiTokenListing {
            token: record,
            revoked_ms: None,
        }
        .into(),
    }))
}

/// Every API token ever created, oldest first, revoked ones included.
#[utoipa::path(get, path = "/api/v1/api-tokens",
    responses((status = 200, body = [ApiTokenView]), (status = 403, body = ErrorBody)),
    security(("api_token" = [])))]
async fn list_api_tokens(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Admin>,
) -> ApiResult<Vec<ApiTokenView>> {
    Ok(Json(
        c.list_api_tokens()
            .await?
            .into_iter()
            .map(ApiTokenView::from)
            .collect(),
    ))
}

/// Revokes an API token at once, on every coordinator. The last live admin token cannot be
/// revoked (400).
#[utoipa::path(delete, path = "/api/v1/api-tokens/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_token" = [])))]
async fn revoke_api_token(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Admin>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let actor = caller.actor;
    c.revoke_api_token(&id, &actor).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams)]
struct AuditParams {
    /// Entries at or after this time (Unix ms).
    since_ms: Option<i64>,
    /// Entries before this time (Unix ms).
    until_ms: Option<i64>,
    instance_uid: Option<String>,
    /// E.g. `api:admin`, `agent`, `system`.
    actor: Option<String>,
    /// E.g. `revoked`, `scope_mismatch`.
    reason: Option<String>,
    /// At most this many, newest first (default 100, at most 10,000).
    limit: Option<u32>,
}

/// The filters the list and the export share.
fn audit_filters(
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    instance_uid: Option<&str>,
    actor: Option<String>,
    reason: Option<String>,
    limit: u32,
) -> Result<AuditQuery, ApiError> {
    Ok(AuditQuery {
        since_ms,
        until_ms,
        instance_uid: instance_uid.map(parse_uid).transpose()?,
        actor,
        reason,
        limit,
    })
}

/// Entries per export response, and the default. A page is one indexed query and at most a
/// few MB of text; a larger export follows the `next` links.
const EXPORT_PAGE_MAX: u32 = 10_000;

#[derive(Deserialize, IntoParams)]
struct ExportParams {
    /// Entries at or after this time (Unix ms).
    since_ms: Option<i64>,
    /// Entries before this time (Unix ms).
    until_ms: Option<i64>,
    instance_uid: Option<String>,
    actor: Option<String>,
    reason: Option<String>,
    /// Entries in this response, 1 to 10,000 (default 10,000).
    limit: Option<u32>,
    /// Continue after this entry: `<at_ms>.<id>` of the last line already received (the
    /// `next` link carries it).
    after: Option<String>,
}

fn parse_cursor(s: &str) -> Result<AuditCursor, ApiError> {
    s.split_once('.')
        .and_then(|(at, id)| {
            Some(AuditCursor {
                at_ms: at.parse().ok()?,
                id: id.parse().ok()?,
            })
        })
        .ok_or_else(|| ApiError::BadRequest(format!("`after` must be <at_ms>.<id>, not `{s}`")))
}

/// The `Link` header value pointing at the page after `cursor`, with the same filters.
fn next_link(p: &ExportParams, limit: u32, cursor: AuditCursor) -> Result<String, ApiError> {
    let mut url = reqwest::Url::parse("http://ampora.invalid/api/v1/audit/export")
        .map_err(|e| ApiError::Internal(format!("building the next link: {e}")))?;
    {
        let mut q = url.query_pairs_mut();
        let numbers = [("since_ms", p.since_ms), ("until_ms", p.until_ms)];
        for (k, v) in numbers {
            if let Some(v) = v {
                q.append_pair(k, &v.to_string());
            }
        }
        let texts = [
            ("instance_uid", &p.instance_uid),
            ("actor", &p.actor),
            ("reason", &p.reason),
        ];
        for (k, v) in texts {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        q.append_pair("limit", &limit.to_string());
        q.append_pair("after", &format!("{}.{}", cursor.at_ms, cursor.id));
    }
    Ok(format!(
        "<{}?{}>; rel=\"next\"",
        url.path(),
        url.query().unwrap_or_default()
    ))
}

/// The audit log as JSON lines (`application/x-ndjson`), oldest first, one page per request:
/// when the page is full, a `Link: <…>; rel="next"` header names the request for the next one
/// (same filters, `after` the last entry). Entries appended meanwhile with a time behind the
/// cursor are not included.
#[utoipa::path(get, path = "/api/v1/audit/export", params(ExportParams),
    responses((status = 200, description = "one audit entry per line, oldest first",
        content_type = "application/x-ndjson", body = String,
        headers(("Link" = String, description = "the next page, when this one is full")))),
    security(("api_token" = [])))]
async fn export_audit(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Query(p): Query<ExportParams>,
) -> Result<Response, ApiError> {
    let limit = p.limit.unwrap_or(EXPORT_PAGE_MAX);
    if !(1..=EXPORT_PAGE_MAX).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {EXPORT_PAGE_MAX}"
        )));
    }
    let after = p.after.as_deref().map(parse_cursor).transpose()?;
    let q = audit_filters(
        p.since_ms,
        p.until_ms,
        p.instance_uid.as_deref(),
        p.actor.clone(),
        p.reason.clone(),
        limit,
    )?;
    let entries = c.store().scan_audit(&q, after).await?;
    let mut body = Vec::with_capacity(entries.len() * 256);
    for e in &entries {
        serde_json::to_writer(&mut body, e)
            .map_err(|e| ApiError::Internal(format!("encoding an audit entry: {e}")))?;
        body.push(b'\n');
    }
    let mut resp = ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response();
    // A full page may have a successor; a short one is the end.
    if let (true, Some(last)) = (entries.len() == limit as usize, entries.last()) {
        let link = next_link(&p, limit, AuditCursor::after(last))?;
        let value = HeaderValue::from_str(&link)
            .map_err(|e| ApiError::Internal(format!("building the next link: {e}")))?;
        resp.headers_mut().insert(header::LINK, value);
    }
    Ok(resp)
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
    _caller: Caller<Viewer>,
) -> ApiResult<ClusterView> {
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

/// The newest audit entries matching the filters, as one JSON array.
#[utoipa::path(get, path = "/api/v1/audit", params(AuditParams),
    responses((status = 200, body = [Object])), security(("api_token" = [])))]
async fn list_audit(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Query(p): Query<AuditParams>,
) -> ApiResult<Vec<AuditEntry>> {
    let q = audit_filters(
        p.since_ms,
        p.until_ms,
        p.instance_uid.as_deref(),
        p.actor,
        p.reason,
        p.limit.unwrap_or(100).min(10_000),
    )?;
    Ok(Json(c.store().query_audit(&q).await?))
}

/// An agent identity (mTLS client certificate) as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct IdentityView {
    /// The certificate's serial number, lowercase hex (what the CRL and revocations name).
    serial: String,
    #[schema(value_type = String)]
    instance_uid: InstanceUid,
    created_ms: i64,
    /// The certificate's notAfter.
    not_after_ms: i64,
    /// When the agent first connected with it; from then on bootstrap tokens are refused
    /// for the agent.
    confirmed_ms: Option<i64>,
    revoked_ms: Option<i64>,
    /// `issued` (not used yet), `confirmed`, `revoked` or `expired`.
    state: &'static str,
    /// SHA-256 of the certificate DER, lowercase hex.
    fingerprint: String,
    /// The certificate (PEM); never a private key.
    cert_pem: String,
}

impl From<IdentityRecord> for IdentityView {
    fn from(i: IdentityRecord) -> Self {
        let state = if i.revoked_ms.is_some() {
            "revoked"
        } else if i.not_after_ms <= shared::now_ms() {
            "expired"
        } else if i.confirmed_ms.is_some() {
            "confirmed"
        } else {
            "issued"
        };
        Self {
            serial: i.serial,
            instance_uid: i.instance_uid,
            created_ms: i.created_ms,
            not_after_ms: i.not_after_ms,
            confirmed_ms: i.confirmed_ms,
            revoked_ms: i.revoked_ms,
            state,
            fingerprint: i.fingerprint,
            cert_pem: i.cert_pem,
        }
    }
}

#[derive(Deserialize, IntoParams)]
struct IdentityFilter {
    /// Only the identities issued to this agent.
    instance_uid: Option<String>,
}

/// Every agent identity ever issued (revoked ones included), oldest first.
#[utoipa::path(get, path = "/api/v1/identities", params(IdentityFilter),
    responses((status = 200, body = [IdentityView])), security(("api_token" = [])))]
async fn list_identities(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Query(f): Query<IdentityFilter>,
) -> ApiResult<Vec<IdentityView>> {
    let uid = f.instance_uid.as_deref().map(parse_uid).transpose()?;
    let ids = match uid {
        Some(uid) => c.store().identities_of(uid).await?,
        None => c.identities().await?,
    };
    Ok(Json(ids.into_iter().map(IdentityView::from).collect()))
}

#[utoipa::path(get, path = "/api/v1/identities/{serial}", params(("serial" = String, Path)),
    responses((status = 200, body = IdentityView), (status = 404, body = ErrorBody)),
    security(("api_token" = [])))]
async fn show_identity(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Path(serial): Path<String>,
) -> ApiResult<IdentityView> {
    Ok(Json(
        c.get_identity(&normalize_serial(&serial)).await?.into(),
    ))
}

/// Revokes an identity: every gateway refuses its certificate from then on (within seconds)
/// and the agent's live connection is closed. To re-bootstrap the agent, give it a new
/// bootstrap token.
#[utoipa::path(delete, path = "/api/v1/identities/{serial}", params(("serial" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("api_token" = [])))]
async fn revoke_identity(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Admin>,
    Path(serial): Path<String>,
) -> Result<StatusCode, ApiError> {
    let actor = caller.actor;
    c.revoke_identity(&normalize_serial(&serial), &actor)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Serials are stored as lowercase hex without leading zero bytes; accept `AB:CD`, `0xabcd`
/// and upper case as well (as openssl and browsers show them).
fn normalize_serial(s: &str) -> String {
    let s = s.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let hex: String = s
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    match ::hex::decode(&hex) {
        Ok(bytes) => gateway::tls::serial_hex(&bytes),
        Err(_) => hex,
    }
}

#[derive(Deserialize, IntoParams)]
struct CrlParams {
    /// `der` (default, `application/pkix-crl`) or `pem`.
    format: Option<String>,
}

/// The certificate revocation list of the agent CA: every revoked identity not expired yet,
/// signed at most every 10 s (valid 24 h). No API token needed: agents and TLS-terminating proxies fetch it.
#[utoipa::path(get, path = "/api/v1/identities/crl", params(CrlParams),
    responses((status = 200, description = "the CRL, DER (default) or PEM",
        content_type = "application/pkix-crl", body = Vec<u8>),
        (status = 400, body = ErrorBody),
        (status = 404, description = "identities are off (no agent CA)", body = ErrorBody)))]
async fn identities_crl(
    State(c): State<Arc<Coordinator>>,
    Query(p): Query<CrlParams>,
) -> Result<Response, ApiError> {
    let pem = match p.format.as_deref() {
        None | Some("der") => false,
        Some("pem") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "format must be `der` or `pem`, not `{other}`"
            )))
        }
    };
    let crl = c.crl().await?.ok_or_else(|| {
        ApiError::NotFound(
            "agent identities are off: no agent CA is configured \
             (tls.agent_ca_cert_file / tls.agent_ca_key_file), so there is no CRL"
                .into(),
        )
    })?;
    Ok(if pem {
        (
            [(header::CONTENT_TYPE, "application/x-pem-file")],
            crl.pem.clone(),
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "application/pkix-crl")],
            crl.der.clone(),
        )
            .into_response()
    })
}
