//! The agent detail page: what the agent says it is (its description as JSON), what it can
//! do (the Capabilities chip), how it is (the component health tree), its config (assigned
//! next to effective, with a diff, and the remote-config status with the agent's error), its
//! upgrade (the packages it should have and reports), its identity, where and when it was seen, and the recent audit rows about it. A drifted agent
//! (its effective config moved after it applied) gets the operator's two answers: re-apply the
//! assigned config, or adopt what it runs as a new version (`Coordinator::reapply_config` /
//! `adopt_config`, as `POST /api/v1/agents/{uid}/reapply|adopt` call them; audited there).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde::Deserialize;
use shared::domain::{AgentRecord, ConfigMap, ConfigState, Health, IdentityRecord, Role};
use shared::ids::InstanceUid;
use shared::store::AuditQuery;

use super::audit::audit_table;
use super::session::{Nothing, Posted, Signed};
use super::view::{self, config_text, csrf, diff_view, when};
use crate::api::guard::Operator;
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
        (drift_section(who, &agent))
        h2 { "Capabilities" }
        (capabilities(agent.capabilities))
        (super::restarts::section(who, &agent))
        @if !agent.custom_capabilities.is_empty() {
            p #custom-capabilities {
                "Custom: "
                @for (i, c) in agent.custom_capabilities.iter().enumerate() {
                    @if i > 0 { ", " }
                    code { (c) }
                }
            }
        }
        h2 { "Description" }
        pre.json #description { (view::json(&agent.description)) }
        h2 { "Health" }
        @match &agent.health {
            Some(h) => ul.health-tree { (health_node("agent", h)) },
            None => p.muted { "Not reported." },
        }
        h2 { "Config" }
        (config_section(&agent, assigned.as_ref().map(|v| (v.id, &v.files))))
        h2 { "Components" }
        (super::components::section(&c, &agent))
        h2 { "Own telemetry" }
        (super::throughput::section(&c, &agent))
        h2 { "Upgrade" }
        (super::packages::section(&c, &agent))
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

/// What a drifted agent's operator can do about it; nothing for an agent that is not drifted.
fn drift_section(who: &Signed, a: &AgentRecord) -> Markup {
    if ConfigView::of(a) != ConfigView::State(ConfigState::Drifted) {
        return html! {};
    }
    let uid = a.instance_uid.to_string();
    html! {
        div.drift #drift {
            p {
                span.chip.config-drifted { "Drifted" }
                " The config this agent runs moved away from what it reported when it applied its "
                "assigned version (a local edit?)."
            }
            @if who.may(Role::Operator) {
                form.inline #reapply method="post" action={"/ui/agents/" (uid) "/reapply"} {
                    (csrf(who))
                    button type="submit" data-confirm="Send the assigned config to this agent again?" { "Re-apply" }
                }
                form.inline #adopt method="post" action={"/ui/agents/" (uid) "/adopt"} {
                    (csrf(who))
                    input #adopt-name type="text" name="name" placeholder="name (default: adopted from <uid>)";
                    button type="submit" data-confirm="Make what this agent runs a new version, assigned to it?" { "Adopt as new version" }
                }
            }
        }
    }
}

pub(super) fn not_a_uid(who: &Signed) -> Response {
    view::status_page(StatusCode::NOT_FOUND, Some(who), "not an instance uid")
}

pub(super) async fn reapply(
    State(c): State<Arc<Coordinator>>,
    Path(uid): Path<String>,
    posted: Posted<Operator, Nothing>,
) -> Response {
    let who = posted.who.any();
    let Ok(uid) = uid.parse::<InstanceUid>() else {
        return not_a_uid(&who);
    };
    match c.reapply_config(uid, &who.actor).await {
        Ok(()) => Redirect::to(&format!("/ui/agents/{uid}")).into_response(),
        Err(e) => view::error_page(Some(&who), &e.into()),
    }
}

#[derive(Deserialize)]
pub(super) struct AdoptForm {
    #[serde(default)]
    name: String,
}

pub(super) async fn adopt(
    State(c): State<Arc<Coordinator>>,
    Path(uid): Path<String>,
    posted: Posted<Operator, AdoptForm>,
) -> Response {
    let who = posted.who.any();
    let Ok(uid) = uid.parse::<InstanceUid>() else {
        return not_a_uid(&who);
    };
    let name = Some(posted.form.name.trim().to_string()).filter(|n| !n.is_empty());
    if let Some(n) = &name {
        if let Err(e) = crate::api::check_name(n) {
            return view::error_page(Some(&who), &e);
        }
    }
    match c.adopt_config(uid, name, &who.actor).await {
        Ok(_) => Redirect::to(&format!("/ui/agents/{uid}")).into_response(),
        Err(e) => view::error_page(Some(&who), &e.into()),
    }
}
