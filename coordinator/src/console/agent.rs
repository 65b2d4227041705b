//! The agent detail page: what the agent says it is (its description as JSON), what it can
//! do (the Capabilities chip), how it is (the component health tree), its config (assigned
//! next to effective, with a diff, and the remote-config status with the agent's error), its
//! identity, where and when it was seen, and the recent audit rows about it.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use shared::domain::{AgentRecord, ConfigMap, Health, IdentityRecord};
use shared::ids::InstanceUid;
use shared::store::AuditQuery;

use super::audit::audit_table;
use super::session::Signed;
use super::view::{self, config_text, diff_view, when};
use crate::service::fleet::{ConfigView, HealthState};
use crate::service::Coordinator;

/// Audit rows shown on the page; the Audit page has the rest.
const RECENT_AUDIT: u32 = 20;

/// The capabilities the operator guide names, and what their absence means.
const KEY_CAPABILITIES: [(u64, &str, &str); 3] = [
    (
        proto::agent_caps::ACCEPTS_REMOTE_CONFIG,
        "AcceptsRemoteConfig",
        "configs pushed to this agent are never sent: it cannot receive them",
    ),
    (
        proto::agent_caps::REPORTS_EFFECTIVE_CONFIG,
        "ReportsEffectiveConfig",
        "the config it really runs is unknown, so drift cannot be seen",
    ),
    (
        proto::agent_caps::REPORTS_HEALTH,
        "ReportsHealth",
        "its health is unknown, so health gates cannot judge it",
    ),
];

pub(super) async fn page(
    State(c): State<Arc<Coordinator>>,
    who: Signed,
    Path(uid): Path<String>,
) -> Response {
    let who = &who;
    let Ok(uid) = uid.parse::<InstanceUid>() else {
        return view::status_page(StatusCode::NOT_FOUND, Some(who), "not an instance uid");
    };
    let agent = match c.agent(uid).await {
        Ok(Some(a)) => a,
        Ok(None) => return view::status_page(StatusCode::NOT_FOUND, Some(who), "no such agent"),
        Err(e) => return view::error_page(Some(who), &e.into()),
    };
    let store = c.store();
    let assigned = match agent.assigned_config {
        Some(id) => store.get_config(id).await.ok().flatten(),
        None => None,
    };
    let identities = store.identities_of(uid).await.unwrap_or_default();
    let audit = store
        .query_audit(&AuditQuery {
            instance_uid: Some(uid),
            limit: RECENT_AUDIT,
            ..AuditQuery::default()
        })
        .await
        .unwrap_or_default();
    let name = agent
        .description
        .get_str("service.name")
        .unwrap_or_else(|| "(unnamed)".into());
    let body = html! {
        h1 { (name) " " small.uid { (uid.to_string()) } }
        (summary(&agent))
        h2 { "Capabilities" }
        (capabilities(agent.capabilities))
        h2 { "Description" }
        pre.json #description { (view::json(&agent.description)) }
        h2 { "Health" }
        @match &agent.health {
            Some(h) => ul.health-tree { (health_node("agent", h)) },
            None => p.muted { "Not reported." },
        }
        h2 { "Config" }
        (config_section(&agent, assigned.as_ref().map(|v| (v.id, &v.files))))
        h2 { "Identity" }
        (identity_section(&identities))
        h2 { "Recent audit" }
        (audit_table(&audit))
        p { a href={"/ui/audit?agent=" (uid.to_string())} { "All audit rows for this agent" } }
    };
    view::page(&name, Some(who), body).into_response()
}

fn summary(a: &AgentRecord) -> Markup {
    let health = HealthState::of(a);
    let config = ConfigView::of(a);
    html! {
        dl.summary {
            dt { "Status" }
            dd { @if a.connected { span.chip.ok { "connected" } } @else { span.chip.off { "disconnected" } } }
            dt { "Health" } dd { span class={"chip health-" (health.as_str())} { (health.as_str()) } }
            dt { "Config" } dd #config-state { span class={"chip config-" (config.as_str())} { (config.as_str()) } }
            dt { "Transport" } dd { (a.transport.map(|t| format!("{t:?}")).unwrap_or_else(|| "-".into())) }
            dt { "Gateway" } dd { (a.gateway.as_deref().unwrap_or("-")) }
            dt { "First seen" } dd { (when(Some(a.first_seen_ms))) }
            dt { "Last seen" } dd { (when(Some(a.last_seen_ms))) }
        }
    }
}

/// The Capabilities chip: every bit by name, declared ones lit; the three the guide names
/// stand out when missing, with what that means.
fn capabilities(caps: u64) -> Markup {
    html! {
        div.capabilities #capabilities {
            @for (bit, name) in proto::agent_caps::NAMES {
                @if caps & bit != 0 {
                    span.cap.declared title="declared" { (name) }
                } @else {
                    span.cap.absent title="not declared" { (name) }
                }
            }
        }
        @for (bit, name, meaning) in KEY_CAPABILITIES {
            @if caps & bit == 0 {
                p.warning.missing-cap { strong { "No " (name) ": " } (meaning) "." }
            }
        }
    }
}

fn health_node(name: &str, h: &Health) -> Markup {
    html! {
        li {
            span class={"chip " (if h.healthy { "health-healthy" } else { "health-unhealthy" })} {
                (if h.healthy { "healthy" } else { "unhealthy" })
            }
            " " strong { (name) }
            @if !h.status.is_empty() { " · " (h.status) }
            @if !h.last_error.is_empty() { " · " span.error { (h.last_error) } }
            @if !h.components.is_empty() {
                ul { @for (n, c) in &h.components { (health_node(n, c)) } }
            }
        }
    }
}

fn config_section(a: &AgentRecord, assigned: Option<(i64, &ConfigMap)>) -> Markup {
    let effective = a.effective_config.as_ref().map(config_text);
    let assigned_text = assigned.map(|(_, f)| config_text(f));
    html! {
        @if let Some(r) = a.remote_config.as_ref().filter(|r| !r.hash.is_empty()) {
            p #remote-status {
                "Remote config " code { (r.hash.get(..12).unwrap_or(&r.hash)) } ": "
                span class={"chip status-" (r.status.as_str())} { (r.status.as_str()) }
                @if !r.error_message.is_empty() {
                    " " span.error #remote-error { (r.error_message) }
                }
            }
        }
        div.side-by-side {
            div {
                h3 { "Assigned" @if let Some((id, _)) = assigned { " (" a href={"/ui/configs/" (id)} { "version " (id) } ")" } }
                @match &assigned_text { Some(t) => pre { (t) }, None => p.muted { "None assigned." } }
            }
            div {
                h3 { "Effective" }
                @match &effective { Some(t) => pre { (t) }, None => p.muted { "Not reported." } }
            }
        }
        @if let (Some(want), Some(have)) = (&assigned_text, &effective) {
            h3 { "Assigned → effective" }
            (diff_view(want, have))
        }
    }
}

fn identity_section(identities: &[IdentityRecord]) -> Markup {
    html! {
        @if identities.is_empty() {
            p.muted { "No certificate issued: the agent uses its bootstrap token." }
        } @else {
            table {
                thead { tr { th { "Serial" } th { "Issued" } th { "Expires" } th { "State" } } }
                tbody {
                    @for i in identities {
                        tr {
                            td { code { (i.serial) } }
                            td { (when(Some(i.created_ms))) }
                            td { (when(Some(i.not_after_ms))) }
                            td { (crate::api::identities::state(i)) }
                        }
                    }
                }
            }
        }
    }
}
