//! Groups: named label selectors with how many agents each matches now (each linked to the
//! Fleet page filtered by its labels); creating or replacing one, and deleting one. The
//! writes call what `PUT /api/v1/groups/{name}` and `DELETE /api/v1/groups/{name}` call
//! (`api::groups::put`, `Coordinator::delete_group`), as operator.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde::Deserialize;
use shared::domain::Role;

use super::session::{Posted, Signed};
use super::view::{self, csrf, when};
use crate::api::groups::{put, GroupBody};
use crate::api::guard::Operator;
use crate::api::ApiError;
use crate::service::Coordinator;

/// The Fleet page showing the agents `labels` match (every agent for none).
fn fleet_link(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "/ui/".into();
    }
    let text = labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "/ui/?{}",
        serde_urlencoded::to_string([("label", text)]).unwrap_or_default()
    )
}

pub(super) async fn list(State(c): State<Arc<Coordinator>>, who: Signed) -> Response {
    let groups = match c.groups_counted().await {
        Ok(g) => g,
        Err(e) => return view::error_page(Some(&who), &e.into()),
    };
    let operator = who.may(Role::Operator);
    let body = html! {
        h1 { "Groups" }
        p.muted { "A group is a saved label selector; a rollout can target it by name. Members are counted now." }
        table #groups {
            thead { tr {
                th { "Name" } th { "Labels" } th { "Members" } th { "Author" } th { "Created" }
                @if operator { th { "" } }
            } }
            tbody {
                @for (g, n) in &groups {
                    tr data-group=(g.name) {
                        td { a.group-link href=(fleet_link(&g.labels)) title="Show these agents on the Fleet page" { (g.name) } }
                        td {
                            @for (k, v) in &g.labels { span.label { (k) "=" (v) } }
                            @if g.labels.is_empty() { span.muted { "every agent" } }
                        }
                        td.members { (n) }
                        td { (g.author) }
                        td { (when(Some(g.created_ms))) }
                        @if operator {
                            td.actions {
                                a.restart-group href={"/ui/restarts?group=" (urlencode(&g.name))} { "Restart…" }
                                " "
                                form.inline method="post" action="/ui/groups/delete" {
                                    (csrf(&who))
                                    input type="hidden" name="name" value=(g.name);
                                    button.danger type="submit" data-confirm="Delete this group? Rollouts created for it keep its labels." { "Delete" }
                                }
                            }
                        }
                    }
                }
                @if groups.is_empty() { tr { td colspan="6" { "No groups yet." } } }
            }
        }
        @if operator { (group_form(&who)) }
    };
    view::page("Groups", Some(&who), body).into_response()
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("", s)])
        .map(|q| q.trim_start_matches('=').to_owned())
        .unwrap_or_default()
}

fn group_form(who: &Signed) -> Markup {
    html! {
        h2 { "New group, or new labels for one" }
        form.stacked #new-group method="post" action="/ui/groups" {
            (csrf(who))
            label for="name" { "Name (an existing group's labels are replaced)" }
            input #name type="text" name="name" required;
            label for="labels" { "Labels every member has (key=value, key=value; empty for every agent)" }
            input #labels type="text" name="labels" placeholder="env=prod, region=eu";
            button type="submit" { "Save group" }
        }
    }
}

#[derive(Deserialize)]
pub(super) struct GroupForm {
    name: String,
    #[serde(default)]
    labels: String,
}

pub(super) async fn save(
    State(c): State<Arc<Coordinator>>,
    posted: Posted<Operator, GroupForm>,
) -> Response {
    let who = posted.who.any();
    let f = posted.form;
    let Some(labels) = view::parse_labels(&f.labels) else {
        let e = ApiError::BadRequest(format!("labels `{}` are not key=value, …", f.labels));
        return view::error_page(Some(&who), &e);
    };
    match put(&c, &who.actor, f.name.trim(), GroupBody { labels }).await {
        Ok(_) => Redirect::to("/ui/groups").into_response(),
        Err(e) => view::error_page(Some(&who), &e),
    }
}

#[derive(Deserialize)]
pub(super) struct DeleteForm {
    name: String,
}

pub(super) async fn delete(
    State(c): State<Arc<Coordinator>>,
    posted: Posted<Operator, DeleteForm>,
) -> Response {
    match c.delete_group(&posted.form.name, &posted.who.actor).await {
        Ok(()) => Redirect::to("/ui/groups").into_response(),
        Err(e) => view::error_page(Some(&posted.who.any()), &e.into()),
    }
}
