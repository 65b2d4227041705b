//! Operator API tokens: create (the token text shown once), list, revoke.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use shared::domain::{ApiTokenListing, Role};
use utoipa::ToSchema;

use super::guard::{Admin, ApiJson, Caller};
use super::{check_name, ApiError, ApiResult, ErrorBody};
use crate::service::Coordinator;

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
pub(super) async fn create_api_token(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Admin>,
    ApiJson(body, _): ApiJson<NewApiToken>,
) -> ApiResult<CreatedApiToken> {
    if body.name.is_empty() {
        return Err(ApiError::BadRequest("an api token needs a name".into()));
    }
    check_name(&body.name)?;
    let (token, record) = c
        .create_api_token(body.name, body.role, &caller.actor)
        .await?;
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
pub(super) async fn list_api_tokens(
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
pub(super) async fn revoke_api_token(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Admin>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    c.revoke_api_token(&id, &caller.actor).await?;
    Ok(StatusCode::NO_CONTENT)
}
