//! Agent identities (mTLS certificates): the list, revoking one, and the operator guide's
//! re-bootstrap in one step (revoke the identity, then a bootstrap token for that agent only,
//! shown once). Both call what the API's routes call, with the admin role.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use shared::domain::Role;

use super::session::{Nothing, Posted, Signed};
use super::tokens::created_token;
use super::view::{self, csrf, when};
use crate::api::guard::Admin;
use crate::api::identities::{revoke as revoke_identity, state};
use crate::api::tokens::{create as create_token, NewToken};
use crate::service::Coordinator;

pub(super) async fn list(State(c): State<Arc<Coordinator>>, who: Signed) -> Response {
    let mut identities = match c.identities().await {
        Ok(i) => i,
        Err(e) => return view::error_page(Some(&who), &e.into()),
    };
    identities.sort_by_key(|i| std::cmp::Reverse(i.created_ms));
    let admin = who.may(Role::Admin);
    let body = html! {
        h1 { "Identities" }
        p.muted { "Certificates issued to agents after their bootstrap token. Revoking one disconnects its agent; re-bootstrap revokes it and gives you a token for that agent only." }
        table #identities {
            thead { tr { th { "Agent" } th { "Serial" } th { "Issued" } th { "Expires" } th { "State" } @if admin { th { "" } } } }
            tbody {
                @for i in &identities {
                    @let uid = i.instance_uid.to_string();
                    @let st = state(i);
                    tr {
                        td { a href={"/ui/agents/" (uid)} { (uid) } }
                        td { code { (i.serial) } }
                        td { (when(Some(i.created_ms))) }
                        td { (when(Some(i.not_after_ms))) }
                        td { span class={"chip identity-" (st)} { (st) } }
                        @if admin {
                            td.actions {
                                @if st != "revoked" {
                                    form.inline method="post" action={"/ui/identities/" (i.serial) "/revoke"} {
                                        (csrf(&who))
                                        button type="submit" data-confirm="Revoke this identity?" { "Revoke" }
                                    }
                                }
                                form.inline method="post" action={"/ui/identities/" (i.serial) "/rebootstrap"} {
                                    (csrf(&who))
                                    button type="submit" data-confirm="Revoke and issue a token for this agent?" { "Re-bootstrap" }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    view::page("Identities", Some(&who), body).into_response()
}

pub(super) async fn revoke(
    State(c): State<Arc<Coordinator>>,
    Path(serial): Path<String>,
    posted: Posted<Admin, Nothing>,
) -> Response {
    match revoke_identity(&c, &posted.who.actor, &serial).await {
        Ok(()) => Redirect::to("/ui/identities").into_response(),
        Err(e) => view::error_page(Some(&posted.who.any()), &e),
    }
}

/// Revoke (unless it already is) and mint a token bound to the agent.
pub(super) async fn rebootstrap(
    State(c): State<Arc<Coordinator>>,
    Path(serial): Path<String>,
    posted: Posted<Admin, Nothing>,
) -> Response {
    let who = posted.who.any();
    let identity = match c.get_identity(&serial).await {
        Ok(i) => i,
        Err(e) => return view::error_page(Some(&who), &e.into()),
    };
    if identity.revoked_ms.is_none() {
        if let Err(e) = revoke_identity(&c, &who.actor, &serial).await {
            return view::error_page(Some(&who), &e);
        }
    }
    let new = NewToken {
        name: format!("re-bootstrap {}", identity.instance_uid),
        ttl_secs: None,
        scope: None,
        instance_uid: Some(identity.instance_uid.to_string()),
    };
    match create_token(&c, &who.actor, new).await {
        Ok(created) => created_token(&who, &created),
        Err(e) => view::error_page(Some(&who), &e),
    }
}
