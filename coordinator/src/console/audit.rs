//! The Audit page: entries filtered by time window, agent, actor and reason, newest first,
//! with a link to the JSON-lines export of the same filters (the API's endpoint).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use serde::{Deserialize, Serialize};
use shared::domain::AuditEntry;
use shared::store::AuditQuery;

use super::session::Signed;
use super::view::{self, when};
use crate::api::audit::ExportParams;
use crate::cli::parse_time;
use crate::service::Coordinator;

const PAGE: u32 = 200;

#[derive(Default, Deserialize, Serialize)]
pub(super) struct AuditParams {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    since: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    until: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    agent: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    actor: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    reason: String,
}

impl AuditParams {
    fn query(&self, now: i64) -> Result<AuditQuery, String> {
        let time = |s: &str| {
            (!s.trim().is_empty())
                .then(|| parse_time(s, now).map_err(|e| e.to_string()))
                .transpose()
        };
        let text = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        Ok(AuditQuery {
            since_ms: time(&self.since)?,
            until_ms: time(&self.until)?,
            instance_uid: text(&self.agent)
                .map(|a| {
                    a.parse()
                        .map_err(|_| format!("`{a}` is not an instance uid"))
                })
                .transpose()?,
            actor: text(&self.actor),
            reason: text(&self.reason),
            limit: PAGE,
        })
    }
}

pub(super) async fn page(
    State(c): State<Arc<Coordinator>>,
    who: Signed,
    Query(p): Query<AuditParams>,
) -> Response {
    let (rows, error, export) = match p.query(shared::now_ms()) {
        Ok(q) => match c.store().query_audit(&q).await {
            Ok(rows) => (rows, None, export_link(&q)),
            Err(e) => return view::error_page(Some(&who), &e.into()),
        },
        Err(e) => (Vec::new(), Some(e), String::new()),
    };
    let body = html! {
        h1 { "Audit" }
        form.filters method="get" action="/ui/audit" {
            input type="text" name="since" value=(p.since) placeholder="since (1h, 2025-06-01T12:00:00Z)";
            input type="text" name="until" value=(p.until) placeholder="until";
            input type="text" name="agent" value=(p.agent) placeholder="agent uid";
            input type="text" name="actor" value=(p.actor) placeholder="actor (api:admin, agent)";
            input type="text" name="reason" value=(p.reason) placeholder="reason";
            button type="submit" { "Filter" }
            a href="/ui/audit" { "Clear" }
        }
        @if let Some(e) = error { p.error { (e) } }
        @if !export.is_empty() { p { a #export href=(export) { "Export these as JSON lines" } } }
        (audit_table(&rows))
    };
    view::page("Audit", Some(&who), body).into_response()
}

/// The same export the API serves (`GET /api/v1/audit/export`), for a signed-in browser: one
/// page of up to 10,000 JSON lines (the CLI's `ampora audit export` follows every page).
pub(super) async fn export(
    State(c): State<Arc<Coordinator>>,
    who: Signed,
    Query(p): Query<ExportParams>,
) -> Response {
    match crate::api::audit::export(&c, &p, "/ui/audit/export").await {
        Ok(resp) => resp,
        Err(e) => view::error_page(Some(&who), &e),
    }
}

/// The export URL for the same filters, times resolved.
fn export_link(q: &AuditQuery) -> String {
    let mut params: Vec<(&str, String)> = Vec::new();
    if let Some(s) = q.since_ms {
        params.push(("since_ms", s.to_string()));
    }
    if let Some(u) = q.until_ms {
        params.push(("until_ms", u.to_string()));
    }
    if let Some(a) = q.instance_uid {
        params.push(("instance_uid", a.to_string()));
    }
    if let Some(a) = &q.actor {
        params.push(("actor", a.clone()));
    }
    if let Some(r) = &q.reason {
        params.push(("reason", r.clone()));
    }
    format!(
        "/ui/audit/export?{}",
        serde_urlencoded::to_string(&params).unwrap_or_default()
    )
}

/// Audit rows as a table, details as (escaped) JSON.
pub(super) fn audit_table(rows: &[AuditEntry]) -> Markup {
    html! {
        table.audit {
            thead { tr { th { "When" } th { "Action" } th { "Actor" } th { "Agent" } th { "Source" } th { "Reason" } th { "Detail" } } }
            tbody {
                @for e in rows {
                    tr data-action=(e.action) {
                        td { (when(Some(e.at_ms))) }
                        td { (e.action) }
                        td { (e.actor) }
                        td { @match e.instance_uid {
                            Some(u) => a href={"/ui/agents/" (u.to_string())} { (u.to_string()) },
                            None => "-",
                        } }
                        td { (e.source_ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into())) }
                        td { (e.reason.as_deref().unwrap_or("-")) }
                        td { @if !e.detail.is_null() && e.detail != serde_json::json!({}) {
                            details { summary { "detail" } pre.json { (view::json(&e.detail)) } }
                        } }
                    }
                }
                @if rows.is_empty() { tr { td colspan="7" { "No entries." } } }
            }
        }
    }
}
