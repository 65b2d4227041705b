//! Custom messages over the API: send one to an agent for a capability it declared, and read
//! the capabilities it declared and the messages it sent back.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::guard::{ApiJson, Caller, Operator, Viewer};
use super::{check_text, parse_uid, ApiError, ApiResult, ErrorBody};
use crate::service::Coordinator;

/// A custom message: its `capability` (one the agent declared), its `type`, and its payload
/// as UTF-8 `data` or as `data_base64`.
#[derive(Deserialize, ToSchema)]
pub struct NewCustomMessage {
    pub(crate) capability: String,
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) data: Option<String>,
    pub(crate) data_base64: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct CustomMessageView {
    pub at_ms: i64,
    pub capability: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub data_base64: String,
    /// The payload as text, when it is UTF-8.
    pub text: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct CustomMessagesView {
    /// What the agent declared.
    pub capabilities: Vec<String>,
    /// What Ampora relays (`opamp.custom_capabilities`): the agent's messages for these are
    /// kept, others ignored.
    pub relayed: Vec<String>,
    /// The agent's recent messages, oldest first.
    pub messages: Vec<CustomMessageView>,
}

#[utoipa::path(post, path = "/api/v1/agents/{uid}/custom-messages", params(("uid" = String, Path)),
    request_body = NewCustomMessage,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn send_custom_message(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Operator>,
    Path(uid): Path<String>,
    ApiJson(body, _): ApiJson<NewCustomMessage>,
) -> Result<axum::http::StatusCode, ApiError> {
    let uid = parse_uid(&uid)?;
    check_text("capability", &body.capability)?;
    check_text("type", &body.kind)?;
    let data = match (body.data, body.data_base64) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| ApiError::BadRequest(format!("data_base64: {e}")))?,
        (None, None) => Vec::new(),
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give at most one of `data` or `data_base64`".into(),
            ))
        }
    };
    let message = proto::v1::CustomMessage {
        capability: body.capability,
        r#type: body.kind,
        data,
    };
    c.send_custom_message(uid, message, &caller.actor).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/agents/{uid}/custom-messages", params(("uid" = String, Path)),
    responses((status = 200, body = CustomMessagesView), (status = 404, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn list_custom_messages(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Path(uid): Path<String>,
) -> ApiResult<CustomMessagesView> {
    let uid = parse_uid(&uid)?;
    let record = c
        .agent(uid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("agent {uid}")))?;
    let messages = record
        .custom_messages
        .into_iter()
        .map(|m| {
            let text = base64::engine::general_purpose::STANDARD
                .decode(&m.data_base64)
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
            CustomMessageView {
                at_ms: m.at_ms,
                capability: m.capability,
                kind: m.kind,
                data_base64: m.data_base64,
                text,
            }
        })
        .collect();
    Ok(Json(CustomMessagesView {
        capabilities: record.custom_capabilities,
        relayed: c.relayed_custom_capabilities().to_vec(),
        messages,
    }))
}
