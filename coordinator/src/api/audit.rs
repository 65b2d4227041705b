//! The audit log: the newest entries as one JSON array, and the paged JSON-lines export
//! (with its `after` cursor and `Link: rel="next"` header).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use shared::domain::AuditEntry;
use shared::store::{AuditCursor, AuditQuery};
use utoipa::IntoParams;

use super::guard::{Caller, Viewer};
use super::{parse_uid, ApiError, ApiResult};
use crate::service::Coordinator;

#[derive(Deserialize, IntoParams)]
pub(super) struct AuditParams {
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
pub(crate) struct ExportParams {
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
fn next_link(
    path: &str,
    p: &ExportParams,
    limit: u32,
    cursor: AuditCursor,
) -> Result<String, ApiError> {
    let mut url = reqwest::Url::parse(&format!("http://ampora.invalid{path}"))
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
pub(super) async fn export_audit(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Query(p): Query<ExportParams>,
) -> Result<Response, ApiError> {
    export(&c, &p, "/api/v1/audit/export").await
}

/// One page of the JSON-lines export, its `next` link pointing at `path` (the API's route,
/// or the console's, which serves the same export to a signed-in browser).
pub(crate) async fn export(
    c: &Coordinator,
    p: &ExportParams,
    path: &str,
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
        let link = next_link(path, p, limit, AuditCursor::after(last))?;
        let value = HeaderValue::from_str(&link)
            .map_err(|e| ApiError::Internal(format!("building the next link: {e}")))?;
        resp.headers_mut().insert(header::LINK, value);
    }
    Ok(resp)
}

/// The newest audit entries matching the filters, as one JSON array.
#[utoipa::path(get, path = "/api/v1/audit", params(AuditParams),
    responses((status = 200, body = [Object])), security(("api_token" = [])))]
pub(super) async fn list_audit(
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
