//! Config versions: the list (author, time, hash; immutable), one version's body with the
//! rollouts that used it, the diff between any two, creating a version, and pushing one to
//! an agent, a label selector or every agent. Creating and pushing call what
//! `POST /api/v1/configs` and `POST /api/v1/assignments` call, with the operator role.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde::Deserialize;
use shared::domain::{ConfigVersion, Role};

use super::rollouts::rollouts_table;
use super::session::{Posted, Signed};
use super::view::{self, config_text, csrf, diff_view, when};
use crate::api::configs::{assign, create as create_version, NewAssignmentBody, NewConfig};
use crate::api::guard::Operator;
use crate::service::Coordinator;

pub(super) async fn list(State(c): State<Arc<Coordinator>>, who: Signed) -> Response {
    let mut versions = match c.store().list_configs().await {
        Ok(v) => v,
        Err(e) => return view::error_page(Some(&who), &e.into()),
    };
    versions.reverse();
    let body = html! {
        h1 { "Configs" }
        @if versions.len() >= 2 {
            form.inline method="get" action="/ui/configs/diff" {
                "Diff version "
                (version_select("a", &versions, versions.get(1).map(|v| v.id)))
                " with "
                (version_select("b", &versions, versions.first().map(|v| v.id)))
                button type="submit" { "Diff" }
            }
        }
        table #configs {
            thead { tr { th { "Version" } th { "Name" } th { "Hash" } th { "Author" } th { "Created" } } }
            tbody {
                @for v in &versions {
                    tr {
                        td { a href={"/ui/configs/" (v.id)} { (v.id) } }
                        td { (v.name) }
                        td { code { (v.hash.get(..12).unwrap_or(&v.hash)) } }
                        td { (v.author) }
                        td { (when(Some(v.created_ms))) }
                    }
                }
            }
        }
        @if who.may(Role::Operator) {
            h2 { "New version" }
            form.stacked method="post" action="/ui/configs" {
                (csrf(&who))
                label for="name" { "Name" }
                input #name type="text" name="name" required;
                label for="body" { "Body (YAML)" }
                textarea #body name="body" rows="12" required {}
                button type="submit" { "Create version" }
            }
        }
    };
    view::page("Configs", Some(&who), body).into_response()
}

fn version_select(name: &str, versions: &[ConfigVersion], selected: Option<i64>) -> Markup {
    html! {
        select name=(name) {
            @for v in versions {
                option value=(v.id) selected[Some(v.id) == selected] { (v.id) " · " (v.name) }
            }
        }
    }
}

pub(super) async fn show(
    State(c): State<Arc<Coordinator>>,
    who: Signed,
    Path(id): Path<i64>,
) -> Response {
    let v = match c.store().get_config(id).await {
        Ok(Some(v)) => v,
        Ok(None) => return view::status_page(StatusCode::NOT_FOUND, Some(&who), "no such version"),
        Err(e) => return view::error_page(Some(&who), &e.into()),
    };
    let mut used = c.rollouts_of_config(v.id).await.unwrap_or_default();
    used.reverse();
    let names = std::collections::HashMap::from([(v.id, v.name.clone())]);
    let body = html! {
        h1 { "Config version " (v.id) " · " (v.name) }
        dl.summary {
            dt { "Hash" } dd { code { (v.hash) } }
            dt { "Author" } dd { (v.author) }
            dt { "Created" } dd { (when(Some(v.created_ms))) }
        }
        pre #config-body { (config_text(&v.files)) }
        h2 { "Rollouts of this version" }
        @if used.is_empty() {
            p.muted #no-rollouts { "None." }
        } @else {
            (rollouts_table(&used, &names))
        }
        @if who.may(Role::Operator) {
            h2 { "Push" }
            form.stacked #push method="post" action="/ui/push" {
                (csrf(&who))
                input type="hidden" name="config_id" value=(v.id);
                label for="target" { "To" }
                select #target name="target" {
                    option value="agent" { "one agent (instance uid)" }
                    option value="labels" { "agents matching labels (key=value,…)" }
                    option value="all" { "every agent" }
                }
                label for="value" { "Instance uid or labels" }
                input #value type="text" name="value";
                button type="submit" data-confirm="Push this version?" { "Push" }
            }
        }
    };
    view::page("Config", Some(&who), body).into_response()
}

#[derive(Deserialize)]
pub(super) struct DiffParams {
    a: i64,
    b: i64,
}

pub(super) async fn diff(
    State(c): State<Arc<Coordinator>>,
    who: Signed,
    Query(p): Query<DiffParams>,
) -> Response {
    let store = c.store();
    let (a, b) = match (store.get_config(p.a).await, store.get_config(p.b).await) {
        (Ok(Some(a)), Ok(Some(b))) => (a, b),
        (Err(e), _) | (_, Err(e)) => return view::error_page(Some(&who), &e.into()),
        _ => return view::status_page(StatusCode::NOT_FOUND, Some(&who), "no such version"),
    };
    let body = html! {
        h1 { "Version " (a.id) " → " (b.id) }
        (diff_view(&config_text(&a.files), &config_text(&b.files)))
    };
    view::page("Diff", Some(&who), body).into_response()
}

#[derive(Deserialize)]
pub(super) struct NewVersionForm {
    name: String,
    body: String,
}

pub(super) async fn create(
    State(c): State<Arc<Coordinator>>,
    posted: Posted<Operator, NewVersionForm>,
) -> Response {
    let Posted { who, form } = posted;
    let new = NewConfig {
        name: form.name,
        // Browsers send CRLF line ends; the config is what the operator typed.
        body: Some(form.body.replace("\r\n", "\n")),
        content_type: None,
        files: None,
        force: false,
    };
    match create_version(&c, &who.actor, new).await {
        Ok(v) => Redirect::to(&format!("/ui/configs/{}", v.id)).into_response(),
        Err(e) => view::error_page(Some(&who.any()), &e),
    }
}

#[derive(Deserialize)]
pub(super) struct PushForm {
    config_id: i64,
    target: String,
    #[serde(default)]
    value: String,
}

pub(super) async fn push(
    State(c): State<Arc<Coordinator>>,
    posted: Posted<Operator, PushForm>,
) -> Response {
    let Posted { who, form } = posted;
    let who_any = who.any();
    let value = form.value.trim().to_string();
    let mut body = NewAssignmentBody {
        config_id: form.config_id,
        agent: None,
        labels: None,
        all: false,
        force: false,
    };
    match form.target.as_str() {
        "agent" => body.agent = Some(value),
        "labels" => match view::parse_labels(&value) {
            Some(l) => body.labels = Some(l),
            None => {
                return view::status_page(
                    StatusCode::BAD_REQUEST,
                    Some(&who_any),
                    "labels must be key=value,…",
                )
            }
        },
        "all" => body.all = true,
        _ => return view::status_page(StatusCode::BAD_REQUEST, Some(&who_any), "unknown target"),
    }
    match assign(&c, &who.actor, body).await {
        Ok(r) => {
            let page = html! {
                h1 { "Pushed" }
                p #pushed { "Config version " (form.config_id) " assigned to " (r.matched_agents) " agent(s)." }
                p { a href="/ui/" { "Watch the fleet" } }
            };
            view::page("Pushed", Some(&who_any), page).into_response()
        }
        Err(e) => view::error_page(Some(&who_any), &e),
    }
}
