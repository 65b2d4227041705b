//! Bootstrap tokens: create one (name, lifetime, label scope) and see it once with a copy
//! button; the list with expiry, state, the agent that redeemed it and when; revoke. The
//! writes call what `POST /api/v1/tokens` and `DELETE /api/v1/tokens/{id}` call, with the
//! admin role (the token list needs admin too, as in the API: it names every token).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;
use shared::domain::TokenRecord;

use super::session::{Nothing, Posted, Signed};
use super::view::{self, csrf, when};
use crate::api::guard::Admin;
use crate::api::tokens::{create as create_token, CreatedToken, NewScope, NewToken};
use crate::cli::parse_ttl;
use crate::service::Coordinator;

fn state(t: &TokenRecord, now: i64) -> &'static str {
    if t.revoked_ms.is_some() {
        "revoked"
    } else if t.expires_ms <= now {
        "expired"
    } else if t.bound_uid.is_some() {
        "redeemed"
    } else {
        "active"
    }
}

pub(super) async fn list(State(c): State<Arc<Coordinator>>, who: Signed<Admin>) -> Response {
    let mut tokens = match c.store().list_tokens().await {
        Ok(t) => t,
        Err(e) => return view::error_page(Some(&who.any()), &e.into()),
    };
    tokens.sort_by_key(|t| std::cmp::Reverse(t.created_ms));
    let now = shared::now_ms();
    let body = html! {
        h1 { "Bootstrap tokens" }
        form.stacked #new-token method="post" action="/ui/tokens" {
            (csrf(&who.any()))
            label for="name" { "Name" }
            input #name type="text" name="name";
            label for="ttl" { "Lifetime (e.g. 30m, 24h, 7d; empty for the default)" }
            input #ttl type="text" name="ttl";
            label for="labels" { "Scope: labels the agent must report (key=value,…; empty for any agent)" }
            input #labels type="text" name="labels";
            button type="submit" { "Create token" }
        }
        table #tokens {
            thead { tr {
                th { "Name" } th { "Prefix" } th { "State" } th { "Expires" } th { "Redeemed by" }
                th { "Redeemed" } th { "Scope" } th { "" }
            } }
            tbody {
                @for t in &tokens {
                    @let st = state(t, now);
                    tr data-token=(t.id) {
                        td { (t.name) }
                        td { code { (t.prefix) } }
                        td { span class={"chip token-" (st)} { (st) } }
                        td { (when(Some(t.expires_ms))) }
                        td { @match t.bound_uid {
                            Some(uid) => a.redeemed-by href={"/ui/agents/" (uid.to_string())} { (uid.to_string()) },
                            None => "-",
                        } }
                        td { (when(t.redeemed_ms)) }
                        td { @match &t.scope {
                            Some(s) => @for (k, v) in &s.labels { span.label { (k) "=" (v) } },
                            None => "any agent",
                        } }
                        td { @if st == "active" || st == "redeemed" {
                            form.inline method="post" action={"/ui/tokens/" (t.id) "/revoke"} {
                                (csrf(&who.any()))
                                button type="submit" data-confirm="Revoke this token?" { "Revoke" }
                            }
                        } }
                    }
                }
            }
        }
    };
    view::page("Tokens", Some(&who.any()), body).into_response()
}

#[derive(Deserialize)]
pub(super) struct NewTokenForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    ttl: String,
    #[serde(default)]
    labels: String,
}

pub(super) async fn create(
    State(c): State<Arc<Coordinator>>,
    posted: Posted<Admin, NewTokenForm>,
) -> Response {
    let who = posted.who.any();
    let form = posted.form;
    let bad = |text: String| view::error_page(Some(&who), &crate::api::ApiError::BadRequest(text));
    let ttl_secs = match form.ttl.trim() {
        "" => None,
        t => match parse_ttl(t) {
            Ok(secs) => Some(secs),
            Err(e) => return bad(e.to_string()),
        },
    };
    let scope = match form.labels.trim() {
        "" => None,
        l => match view::parse_labels(l) {
            Some(labels) => Some(NewScope { labels }),
            None => return bad(format!("scope `{l}` is not key=value,…")),
        },
    };
    let new = NewToken {
        name: form.name,
        ttl_secs,
        scope,
        instance_uid: None,
    };
    match create_token(&c, &who.actor, new).await {
        Ok(created) => created_token(&who, &created),
        Err(e) => view::error_page(Some(&who), &e),
    }
}

/// The page showing a new token: the only time its text is shown.
pub(super) fn created_token(who: &Signed, created: &CreatedToken) -> Response {
    let body = html! {
        h1 { "Token created" }
        p { "Copy it now: Ampora keeps only its hash, so it is never shown again." }
        div.secret {
            code #new-token-text { (created.token) }
            button type="button" data-copy="new-token-text" { "Copy" }
        }
        @if let Some(uid) = created.record.bound_uid {
            p { "For agent " a href={"/ui/agents/" (uid.to_string())} { (uid.to_string()) } " only." }
        }
        p { a href="/ui/tokens" { "Back to tokens" } }
    };
    view::page("Token created", Some(who), body).into_response()
}

pub(super) async fn revoke(
    State(c): State<Arc<Coordinator>>,
    Path(id): Path<String>,
    posted: Posted<Admin, Nothing>,
) -> Response {
    match c.revoke_token(&id, &posted.who.actor).await {
        Ok(()) => Redirect::to("/ui/tokens").into_response(),
        Err(e) => view::error_page(Some(&posted.who.any()), &e.into()),
    }
}
