//! Agent identities (mTLS client certificates): list, show, revoke, and the agent CA's CRL
//! (the one route here needing no API token).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use shared::domain::IdentityRecord;
use shared::ids::InstanceUid;
use utoipa::{IntoParams, ToSchema};

use super::guard::{Admin, Caller, Viewer};
use super::{parse_uid, ApiError, ApiResult, ErrorBody};
use crate::service::Coordinator;

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

/// `issued` (not used yet), `confirmed`, `revoked` or `expired`: one rule for the API and the
/// console.
pub(crate) fn state(i: &IdentityRecord) -> &'static str {
    if i.revoked_ms.is_some() {
        "revoked"
    } else if i.not_after_ms <= shared::now_ms() {
        "expired"
    } else if i.confirmed_ms.is_some() {
        "confirmed"
    } else {
        "issued"
    }
}

impl From<IdentityRecord> for IdentityView {
    fn from(i: IdentityRecord) -> Self {
        let state = state(&i);
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
pub(super) struct IdentityFilter {
    /// Only the identities issued to this agent.
    instance_uid: Option<String>,
}

/// Every agent identity ever issued (revoked ones included), oldest first.
#[utoipa::path(get, path = "/api/v1/identities", params(IdentityFilter),
    responses((status = 200, body = [IdentityView])), security(("api_token" = [])))]
pub(super) async fn list_identities(
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
pub(super) async fn show_identity(
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
pub(super) async fn revoke_identity(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Admin>,
    Path(serial): Path<String>,
) -> Result<StatusCode, ApiError> {
    revoke(&c, &caller.actor, &serial).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Revokes an identity as `DELETE /api/v1/identities/{serial}` does (the console's path too).
pub(crate) async fn revoke(c: &Coordinator, actor: &str, serial: &str) -> Result<(), ApiError> {
    Ok(c.revoke_identity(&normalize_serial(serial), actor).await?)
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
        Ok(bytes) => shared::tls::serial_hex(&bytes),
        Err(_) => hex,
    }
}

#[derive(Deserialize, IntoParams)]
pub(super) struct CrlParams {
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
pub(super) async fn identities_crl(
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
