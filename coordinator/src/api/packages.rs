//! Packages: importing an artifact (the request body is the file, streamed; the signature in
//! a header; `check` answers the same without the file), listing artifacts, assigning a package version to agents, and an agent's
//! upgrade state.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use shared::packages::{Artifact, PackageAssignment, PackageKind};
use utoipa::{IntoParams, ToSchema};

use super::configs::target_of;
use super::guard::{ApiJson, Caller, Operator, Viewer};
use super::{parse_uid, ApiError, ApiResult, ErrorBody};
use crate::service::package_import::ImportRequest;
use crate::service::packages::UpgradeView;
use crate::service::Coordinator;

/// The header carrying the artifact's minisign signature file, base64-encoded.
pub const SIGNATURE_HEADER: &str = "x-ampora-signature";

/// What the uploaded file is.
#[derive(Deserialize, IntoParams)]
pub struct ImportParams {
    name: String,
    version: String,
    /// `os/arch`, e.g. `linux/amd64`.
    platform: String,
    /// `top_level` (the default) or `addon`.
    kind: Option<String>,
    /// An `http(s)` URL where the operator hosts the build: Ampora fetches it once to check
    /// its signature and SHA-256, stores nothing, and offers agents this URL (send no body).
    url: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/packages", params(ImportParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn import_package(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Operator>,
    Query(p): Query<ImportParams>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Artifact> {
    let req = import_request(p, &headers)?;
    if req.url.is_some() {
        return Ok(Json(c.import_external(req, &caller.actor).await?));
    }
    Ok(Json(
        c.import_artifact(req, body.into_data_stream(), &caller.actor)
            .await?,
    ))
}

/// Whether `POST /api/v1/packages` with these parameters and signature would be accepted,
/// judged without the build: the checks an import makes before reading its body (names,
/// platform, the signature against the trust policy, not imported before). A client sends
/// this first, so a refusal is an answer rather than a connection closed mid-upload.
#[utoipa::path(post, path = "/api/v1/packages/check", params(ImportParams),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn check_package(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Operator>,
    Query(p): Query<ImportParams>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    c.check_import(&import_request(p, &headers)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The import the query and the signature header describe.
fn import_request(p: ImportParams, headers: &HeaderMap) -> Result<ImportRequest, ApiError> {
    let kind = match p.kind.as_deref() {
        None => PackageKind::TopLevel,
        Some(k) => PackageKind::parse(k)
            .ok_or_else(|| ApiError::BadRequest("kind: top_level or addon".into()))?,
    };
    let signature = match headers.get(SIGNATURE_HEADER) {
        None => None,
        Some(v) => {
            let text = base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "{SIGNATURE_HEADER}: the signature file, base64-encoded"
                    ))
                })?;
            Some(text)
        }
    };
    Ok(ImportRequest {
        name: p.name,
        version: p.version,
        platform: p.platform,
        kind,
        signature,
        url: p.url,
    })
}

#[utoipa::path(get, path = "/api/v1/packages",
    responses((status = 200, body = [Object])), security(("api_token" = [])))]
pub(super) async fn list_packages(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
) -> ApiResult<Vec<Artifact>> {
    Ok(Json(c.list_artifacts().await?))
}

/// Assign a package version to one agent (`agent`), to agents matching all `labels`, or to
/// `all`. Per package name the newest matching assignment wins.
#[derive(Deserialize, ToSchema)]
pub struct NewPackageAssignmentBody {
    name: String,
    version: String,
    agent: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    all: bool,
    /// Agents may be taken to an older version than they run (default: refused with 409).
    #[serde(default)]
    allow_downgrade: bool,
}

#[utoipa::path(post, path = "/api/v1/packages/assignments", request_body = NewPackageAssignmentBody,
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn assign_package(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Operator>,
    ApiJson(body, _): ApiJson<NewPackageAssignmentBody>,
) -> ApiResult<PackageAssignment> {
    let target = target_of(body.agent, body.labels, body.all)?;
    Ok(Json(
        c.assign_package(
            body.name,
            body.version,
            target,
            body.allow_downgrade,
            &caller.actor,
        )
        .await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/packages/assignments",
    responses((status = 200, body = [Object])), security(("api_token" = [])))]
pub(super) async fn list_package_assignments(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
) -> ApiResult<Vec<PackageAssignment>> {
    Ok(Json(c.list_package_assignments().await?))
}

#[utoipa::path(get, path = "/api/v1/agents/{uid}/upgrade",
    responses((status = 200, body = UpgradeView), (status = 404, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn show_upgrade(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Path(uid): Path<String>,
) -> ApiResult<UpgradeView> {
    let uid = parse_uid(&uid)?;
    let record = c
        .agent(uid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("agent {uid}")))?;
    Ok(Json(c.upgrade_view(&record)))
}
