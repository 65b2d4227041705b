//! The REST API under `/api/v1`, described by the OpenAPI document at `/api/v1/openapi.json`:
//! its routes and handlers. What a request passes before a handler runs (concurrency limit,
//! API token and role, body size and time) is [`guard`]; the mapping of failures to statuses
//! is [`error`].
//!
//! Every route but the document itself and the agent CA's CRL (`/api/v1/identities/crl`,
//! fetched by agents and proxies) needs an operator API token (`Authorization: Bearer
//! amp-api.…`); reads need the viewer role, except the two token lists (admin: they name
//! every token and its prefix); config and assignment changes need operator; bootstrap
//! tokens, API tokens and identity revocations admin; groups, rollouts and drift actions
//! (re-apply, adopt) operator. The role is in each handler's
//! signature (`Caller<Viewer>`). Errors are JSON `{"error": "..."}`. Every change made
//! through the API is audited with its actor, `api:<API token name>`.
//!
//! The handlers live by resource: [`agents`], [`configs`] (config versions and assignments),
//! [`tokens`] (bootstrap tokens), [`api_tokens`], [`identities`] (with the CRL), [`audit`],
//! [`groups`], [`rollouts`], [`packages`] and [`cluster`]. This module keeps the router, the OpenAPI
//! document and the checks they share.

mod agents;
mod api_tokens;
pub(crate) mod audit;
mod cluster;
mod components;
pub(crate) mod configs;
mod custom_messages;
mod error;
pub(crate) mod groups;
pub(crate) mod guard;
pub(crate) mod identities;
mod latency;
pub(crate) mod own_telemetry;
mod packages;
mod restarts;
pub(crate) mod rollouts;
pub(crate) mod tokens;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use shared::ids::InstanceUid;
use utoipa::OpenApi;

pub use error::{ApiError, ErrorBody};
pub use guard::ApiState;
use guard::Guard;
pub use latency::REQUEST_DURATION;

use crate::config::Config;
use crate::service::Coordinator;

#[derive(OpenApi)]
#[openapi(
    info(title = "Ampora API", description = "Fleet management for OpAMP agents"),
    paths(
        agents::list_agents, agents::count_agents, agents::show_agent, configs::create_config, configs::list_configs,
        configs::show_config, configs::create_assignment, configs::list_assignments,
        tokens::create_token, tokens::create_tokens, tokens::list_tokens, tokens::revoke_token,
        api_tokens::create_api_token, api_tokens::list_api_tokens, api_tokens::revoke_api_token,
        audit::list_audit, audit::export_audit, cluster::show_cluster,
        identities::list_identities, identities::show_identity, identities::revoke_identity,
        identities::identities_crl, rollouts::create_rollout, rollouts::list_rollouts,
        rollouts::show_rollout, rollouts::rollout_events, rollouts::act_on_rollout,
        rollouts::config_rollouts, groups::list_groups, groups::put_group, groups::show_group,
        groups::delete_group, own_telemetry::show_group_telemetry, own_telemetry::put_group_telemetry, own_telemetry::show_agent_telemetry, agents::reapply_config, agents::adopt_config,
        packages::import_package, packages::check_package, packages::list_packages, packages::assign_package,
        packages::list_package_assignments, packages::show_upgrade,
        components::show_components, components::check_config,
        restarts::restart_agent, restarts::create_restart, restarts::list_restarts, restarts::show_restart,
        custom_messages::send_custom_message, custom_messages::list_custom_messages
    ),
    components(schemas(identities::IdentityView, cluster::ClusterView, cluster::PartitionLease, agents::AgentView, agents::AgentCounts, configs::NewConfig, configs::NewAssignmentBody, configs::AssignmentResult, tokens::NewToken, tokens::CreatedToken, tokens::NewTokens, tokens::CreatedTokens, tokens::NewScope, api_tokens::NewApiToken, api_tokens::CreatedApiToken, api_tokens::ApiTokenView, rollouts::NewRolloutBody, crate::service::rollouts::actions::RolloutStatus, crate::service::rollouts::actions::StageStatus, crate::service::rollouts::gates::Progress, groups::GroupBody, groups::GroupView, groups::GroupDetail, agents::AdoptBody, packages::NewPackageAssignmentBody, crate::service::packages::UpgradeView, components::ComponentsView, components::CheckBody, crate::service::preflight::Preflight, crate::service::preflight::ConfigProblem, crate::service::preflight::BuildGap, restarts::NewRestartBody, crate::service::restarts::RestartJob, crate::service::restarts::RestartMember, custom_messages::NewCustomMessage, custom_messages::CustomMessageView, custom_messages::CustomMessagesView, shared::own_telemetry::TelemetrySettings, shared::own_telemetry::Destination, shared::own_telemetry::Rates, own_telemetry::OfferedView, own_telemetry::PointView, own_telemetry::AgentTelemetryView, ErrorBody)),
    modifiers(&BearerAuth, &Untagged)
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

/// utoipa tags an operation with the module its handler is named through in `paths(...)`
/// (`agents`, `configs`, ...); the document has never had tags, so the split into modules
/// does not add them.
struct Untagged;

impl utoipa::Modify for Untagged {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ];
            for op in operations.into_iter().flatten() {
                if let Some(tags) = op.tags.as_mut() {
                    tags.clear();
                }
            }
        }
    }
}

/// Describes the API's metrics (and creates its bounded series at zero).
pub fn describe_metrics() {
    guard::describe_metrics();
    latency::describe_metrics();
}

/// The OpenAPI document as JSON text.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

/// The API's routes with their guard, configured by `[api]` (and `[tls] trusted_proxies`,
/// with `proxy_secret` read from `tls.trusted_proxy_secret_file`), and `beside` (the
/// console) under the same guard, limits and timing.
pub fn router(
    coord: Arc<Coordinator>,
    config: &Config,
    proxy_secret: Option<gateway::server::ProxySecret>,
    beside: Router<ApiState>,
) -> Router {
    let guard = Arc::new(Guard::new(config, proxy_secret));
    // `ApiJson` enforces the per-route limits; this bounds any other body extractor.
    let body_limit = axum::extract::DefaultBodyLimit::max(guard.largest_body());
    let state = ApiState { coord, guard };
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/agents", get(agents::list_agents))
        .route("/api/v1/agents/counts", get(agents::count_agents))
        .route("/api/v1/agents/{uid}", get(agents::show_agent))
        .route(
            "/api/v1/configs",
            post(configs::create_config).get(configs::list_configs),
        )
        .route("/api/v1/configs/{id}", get(configs::show_config))
        .route(
            "/api/v1/configs/{id}/rollouts",
            get(rollouts::config_rollouts),
        )
        .route(
            "/api/v1/rollouts",
            post(rollouts::create_rollout).get(rollouts::list_rollouts),
        )
        .route("/api/v1/rollouts/{id}", get(rollouts::show_rollout))
        .route(
            "/api/v1/rollouts/{id}/events",
            get(rollouts::rollout_events),
        )
        .route(
            "/api/v1/rollouts/{id}/{action}",
            post(rollouts::act_on_rollout),
        )
        .route("/api/v1/groups", get(groups::list_groups))
        .route(
            "/api/v1/groups/{name}",
            get(groups::show_group)
                .put(groups::put_group)
                .delete(groups::delete_group),
        )
        .route(
            "/api/v1/groups/{name}/telemetry",
            get(own_telemetry::show_group_telemetry).put(own_telemetry::put_group_telemetry),
        )
        .route(
            "/api/v1/agents/{uid}/telemetry",
            get(own_telemetry::show_agent_telemetry),
        )
        .route("/api/v1/agents/{uid}/reapply", post(agents::reapply_config))
        .route("/api/v1/agents/{uid}/adopt", post(agents::adopt_config))
        .route(
            "/api/v1/assignments",
            post(configs::create_assignment).get(configs::list_assignments),
        )
        .route(
            "/api/v1/tokens",
            post(tokens::create_token).get(tokens::list_tokens),
        )
        .route("/api/v1/tokens/batch", post(tokens::create_tokens))
        .route(
            "/api/v1/tokens/{id}",
            axum::routing::delete(tokens::revoke_token),
        )
        .route(
            "/api/v1/api-tokens",
            post(api_tokens::create_api_token).get(api_tokens::list_api_tokens),
        )
        .route(
            "/api/v1/api-tokens/{id}",
            axum::routing::delete(api_tokens::revoke_api_token),
        )
        .route(
            "/api/v1/packages",
            post(packages::import_package).get(packages::list_packages),
        )
        .route("/api/v1/packages/check", post(packages::check_package))
        .route(
            "/api/v1/packages/assignments",
            post(packages::assign_package).get(packages::list_package_assignments),
        )
        .route("/api/v1/agents/{uid}/upgrade", get(packages::show_upgrade))
        .route(
            "/api/v1/agents/{uid}/components",
            get(components::show_components),
        )
        .route("/api/v1/configs/{id}/check", post(components::check_config))
        .route(
            "/api/v1/agents/{uid}/restart",
            post(restarts::restart_agent),
        )
        .route(
            "/api/v1/restarts",
            post(restarts::create_restart).get(restarts::list_restarts),
        )
        .route("/api/v1/restarts/{id}", get(restarts::show_restart))
        .route(
            "/api/v1/agents/{uid}/custom-messages",
            post(custom_messages::send_custom_message).get(custom_messages::list_custom_messages),
        )
        .route("/api/v1/audit", get(audit::list_audit))
        .route("/api/v1/audit/export", get(audit::export_audit))
        .route("/api/v1/cluster", get(cluster::show_cluster))
        .route("/api/v1/identities", get(identities::list_identities))
        .route("/api/v1/identities/crl", get(identities::identities_crl))
        .route(
            "/api/v1/identities/{serial}",
            get(identities::show_identity).delete(identities::revoke_identity),
        )
        .merge(beside)
        .layer(body_limit)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::limit_concurrency,
        ))
        // Outermost, so the time includes the guard's refusals and queueing.
        .layer(axum::middleware::from_fn(latency::track))
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

fn parse_uid(s: &str) -> Result<InstanceUid, ApiError> {
    s.parse()
        .map_err(|_| ApiError::BadRequest(format!("`{s}` is not an instance uid")))
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

pub(crate) fn check_name(name: &str) -> Result<(), ApiError> {
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
