//! Bootstrap tokens: create one (scoped, or bound to one agent) or a batch, list, revoke.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use shared::domain::{TokenRecord, TokenScope};
use utoipa::ToSchema;

use super::guard::{Admin, ApiJson, Caller};
use super::{check_labels, check_name, parse_uid, ApiError, ApiResult, ErrorBody};
use crate::service::Coordinator;

#[derive(Deserialize, ToSchema)]
pub struct NewToken {
    #[serde(default)]
    pub(crate) name: String,
    /// Lifetime in seconds; the configured default when absent.
    pub(crate) ttl_secs: Option<u64>,
    /// Only agents matching the scope may redeem the token; any agent when absent.
    pub(crate) scope: Option<NewScope>,
    /// Re-bootstrap: the token is for this agent only, bound from the start. Once an agent
    /// exists, no other token may speak for it (revoke its identity first, or the token is
    /// refused with `identity_required`). Not combined with `scope`.
    pub(crate) instance_uid: Option<String>,
}

/// A bootstrap token's scope: the agent redeeming it must report every label as an attribute
/// (identifying or non-identifying) with that value in its first message, or it is refused
/// with reason `scope_mismatch`. A first message without a description is refused too.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewScope {
    /// `key: value` pairs, at least one.
    pub(crate) labels: BTreeMap<String, String>,
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
    pub(crate) token: String,
    #[schema(value_type = Object)]
    pub(crate) record: TokenRecord,
}

#[utoipa::path(post, path = "/api/v1/tokens", request_body = NewToken,
    responses((status = 200, body = CreatedToken)), security(("api_token" = [])))]
pub(super) async fn create_token(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Admin>,
    ApiJson(body, _): ApiJson<NewToken>,
) -> ApiResult<CreatedToken> {
    Ok(Json(create(&c, &caller.actor, body).await?))
}

/// Creates a bootstrap token as `POST /api/v1/tokens` does (the console's path too).
pub(crate) async fn create(
    c: &Coordinator,
    actor: &str,
    body: NewToken,
) -> Result<CreatedToken, ApiError> {
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
        Some(uid) => c.create_token_for(uid, body.name, ttl, actor).await?,
        None => {
            let scope = scope_of(body.scope)?;
            c.create_scoped_token(body.name, ttl, scope, actor).await?
        }
    };
    Ok(CreatedToken { token, record })
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
pub(super) async fn create_tokens(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Admin>,
    ApiJson(body, _): ApiJson<NewTokens>,
) -> ApiResult<CreatedTokens> {
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
            &caller.actor,
        )
        .await?;
    Ok(Json(CreatedTokens { tokens }))
}

/// Every bootstrap token (never the token text), with its state and scope.
#[utoipa::path(get, path = "/api/v1/tokens",
    responses((status = 200, body = [Object])), security(("api_token" = [])))]
pub(super) async fn list_tokens(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Admin>,
) -> ApiResult<Vec<TokenRecord>> {
    Ok(Json(c.store().list_tokens().await?))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("api_token" = [])))]
pub(super) async fn revoke_token(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Admin>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    c.revoke_token(&id, &caller.actor).await?;
    Ok(StatusCode::NO_CONTENT)
}
