//! [`ApiError`]: the one place mapping API failures to HTTP statuses and JSON bodies.
//!
//! What the caller got wrong (400, 404, 401, 403, 408, 413) is said plainly. What went wrong on
//! our side (storage, internal) is not: the caller, possibly unauthenticated, gets a generic
//! message with a request id, and the detail is logged under that id for the operator.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use shared::domain::Role;
use shared::store::StoreError;
use utoipa::ToSchema;

use crate::service::preflight::Preflight;
use crate::service::ServiceError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid API token")]
    Unauthorized,
    #[error("this action needs the {0:?} role")]
    Forbidden(Role),
    /// An API token over plaintext from a non-loopback address (`api.token_plaintext_allowed`).
    #[error(
        "API tokens are accepted over plaintext only from loopback: use https:// \
         (or set api.token_plaintext_allowed)"
    )]
    PlaintextToken,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// The request is valid but the state forbids it now (overlapping rollouts, an action
    /// that does not apply to a rollout's state).
    #[error("{0}")]
    Conflict(String),
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("request body not received within {0} s")]
    BodyTimeout(u64),
    #[error("too many API requests in progress; retry shortly")]
    Busy,
    #[error("storage error: {0}")]
    Store(StoreError),
    #[error("internal error: {0}")]
    Internal(String),
    /// A config that fails its pre-flight check: 409 with the whole answer.
    #[error("pre-flight check failed: {}", .0.summary())]
    Preflight(Box<Preflight>),
}

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    /// Set on server-side failures: the id under which the detail was logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Set when a config failed its pre-flight check: what is wrong, on which builds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preflight: Option<Box<Preflight>>,
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::NotFound(m) => Self::NotFound(m),
            ServiceError::Invalid(m) => Self::BadRequest(m),
            ServiceError::Conflict(m) => Self::Conflict(m),
            ServiceError::Internal(m) => Self::Internal(m),
            ServiceError::Store(StoreError::NotFound(m)) => Self::NotFound(m),
            ServiceError::Store(s) => Self::Store(s),
            ServiceError::Preflight(p) => Self::Preflight(p),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ServiceError::Store(e).into()
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::PlaintextToken => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Conflict(_) | Self::Preflight(_) => StatusCode::CONFLICT,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Busy | Self::Store(StoreError::MaybeApplied(_) | StoreError::Unavailable(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Store(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl ApiError {
    /// The `reason` of `ampora_api_requests_refused_total` when this is a refusal by the
    /// guard (before any handler work), else `None`.
    pub fn refusal_reason(&self) -> Option<&'static str> {
        Some(match self {
            Self::Unauthorized => "unauthenticated",
            Self::Forbidden(_) => "forbidden",
            Self::PlaintextToken => "plaintext_token",
            Self::TooLarge(_) => "body_too_large",
            Self::BodyTimeout(_) => "body_timeout",
            Self::Busy => "busy",
            _ => return None,
        })
    }
}

impl ApiError {
    /// What the caller is told: its own mistakes plainly; for server-side failures a generic
    /// message naming a request id, under which the detail is logged here.
    pub fn public_body(&self) -> ErrorBody {
        match self {
            Self::Store(_) | Self::Internal(_) => {
                // Storage errors name tables, constraints and hosts: for the log only.
                let id = uuid::Uuid::now_v7().simple().to_string();
                tracing::error!(request_id = %id, error = %self, "API request failed");
                let error = match self {
                    Self::Store(StoreError::MaybeApplied(_)) => {
                        "storage unavailable; the change may or may not have been applied"
                    }
                    Self::Store(StoreError::Unavailable(_)) => {
                        "storage unavailable, nothing was changed; retry later"
                    }
                    Self::Store(_) => "storage error",
                    _ => "internal error",
                };
                ErrorBody {
                    error: format!("{error} (request id {id}; the server log has the detail)"),
                    request_id: Some(id),
                    preflight: None,
                }
            }
            Self::Preflight(p) => ErrorBody {
                error: self.to_string(),
                request_id: None,
                preflight: Some(p.clone()),
            },
            _ => ErrorBody {
                error: self.to_string(),
                request_id: None,
                preflight: None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Some(reason) = self.refusal_reason() {
            metrics::counter!(super::guard::REFUSED_METRIC, "reason" => reason).increment(1);
        }
        let body = self.public_body();
        let mut resp = (status, Json(body)).into_response();
        let headers = resp.headers_mut();
        match self {
            Self::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Busy | Self::Store(StoreError::MaybeApplied(_) | StoreError::Unavailable(_)) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(resp: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        serde_json::from_slice(&bytes).expect("json")
    }

    #[tokio::test]
    async fn storage_detail_is_logged_not_returned() {
        let secret = "relation \"api_tokens\" does not exist at db.internal:5432";
        for (err, status) in [
            (ApiError::Store(StoreError::NotApplied(secret.into())), 500),
            (
                ApiError::Store(StoreError::MaybeApplied(secret.into())),
                503,
            ),
            (ApiError::Store(StoreError::Unavailable(secret.into())), 503),
            (ApiError::Internal(secret.into()), 500),
        ] {
            let resp = err.into_response();
            assert_eq!(resp.status().as_u16(), status);
            let v = body_of(resp).await;
            let text = v["error"].as_str().unwrap_or_default();
            assert!(!text.contains("api_tokens"), "leaks the detail: {text}");
            let id = v["request_id"].as_str().unwrap_or_default();
            assert_eq!(id.len(), 32, "{v}");
            assert!(
                text.contains(id),
                "the message names the request id: {text}"
            );
        }
        // The caller's own mistakes are still explained.
        let v = body_of(ApiError::BadRequest("name must be short".into()).into_response()).await;
        assert_eq!(v["error"], "name must be short");
        assert!(v.get("request_id").is_none());
    }
}
