//! Agent packages in the console: the Packages page (imported builds with who signed them, and
//! the package assignments) and the agent page's Upgrade section (what the agent should have,
//! what it reports, its upgrade state and why). Read-only: imports and assignments go through
//! the CLI and the API, which take the build's bytes and signature.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use shared::domain::{AgentRecord, Target};
use shared::packages::PackageKind;

use super::session::Signed;
use super::view::{self, when};
use crate::service::Coordinator;

pub(super) async fn list(State(c): State<Arc<Coordinator>>, who: Signed) -> Response {
    let (artifacts, assignments) =
        match tokio::try_join!(c.list_artifacts(), c.list_package_assignments()) {
            Ok(both) => both,
            Err(e) => return view::error_page(Some(&who), &e.into()),
        };
    let body = html! {
        h1 { "Packages" }
        p.muted {
            "Agent builds imported with " code { "ampora packages import" }
            ", each verified against the trusted keys, and what is assigned to whom ("
            code { "ampora packages assign" } "), or staged with health gates as a "
            a href="/ui/rollouts" { "rollout" } " (" code { "ampora rollout create --package" } ")."
        }
        h2 { "Builds" }
        @if artifacts.is_empty() {
            p.muted { "None imported." }
        } @else {
            table #artifacts {
                thead { tr {
                    th { "Name" } th { "Version" } th { "Platform" } th { "Kind" }
                    th { "Size" } th { "SHA-256" } th { "Signed by" } th { "Imported" }
                } }
                tbody {
                    @for a in artifacts.iter().rev() {
                        tr {
                            td { (display_name(&a.name)) }
                            td { (a.version) }
                            td { (a.platform) }
                            td { (match a.kind { PackageKind::TopLevel => "top level", PackageKind::Addon => "addon" }) }
                            td.num { (size(a.size)) }
                            td {
                                code title=(a.sha256) { (a.sha256.get(..16).unwrap_or(&a.sha256)) }
                                @if let Some(url) = &a.url {
                                    br; span.muted.hosted-elsewhere title=(url) { "hosted at " (url) }
                                }
                            }
                            td {
                                @match &a.signer {
                                    Some(k) => code title=(k) { (k.get(..12).unwrap_or(k)) "…" },
                                    None => span.chip.state-failed { "unsigned" },
                                }
                            }
                            td { (when(Some(a.created_ms))) " by " (a.author) }
                        }
                    }
                }
            }
        }
        h2 { "Assignments" }
        @if assignments.is_empty() {
            p.muted { "Nothing assigned: no agent is offered a package." }
        } @else {
            p.muted { "Per package name, the newest assignment matching an agent decides its version." }
            table #package-assignments {
                thead { tr { th { "#" } th { "Name" } th { "Version" } th { "For" } th { "Assigned" } } }
                tbody {
                    @for a in assignments.iter().rev() {
                        tr {
                            td.num { (a.id) }
                            td { (display_name(&a.name)) }
                            td { (a.version) }
                            td { (target_text(&a.target)) }
                            td { (when(Some(a.created_ms))) " by " (a.author) }
                        }
                    }
                }
            }
        }
    };
    view::page("Packages", Some(&who), body).into_response()
}

/// The agent page's Upgrade section.
pub(super) fn section(c: &Coordinator, agent: &AgentRecord) -> Markup {
    let v = c.upgrade_view(agent);
    if v.state == "none" && v.reported.is_empty() {
        return html! { p.muted #upgrade { "No package is assigned to this agent." } };
    }
    html! {
        div #upgrade {
            p {
                "Upgrade: " span class={"chip upgrade-" (v.state)} { (v.state.replace('_', " ")) }
                @if v.failed_attempts > 0 { " after " (v.failed_attempts) " failed attempt(s)" }
                @if v.profile == "collector_supervisor" {
                    span.muted { " · offered as to a Collector supervisor" }
                }
            }
            @if let Some(r) = &v.reason { p.error { (r) } }
            table {
                thead { tr { th { "Package" } th { "Should have" } th { "Has" } th { "Status" } } }
                tbody {
                    @let names: std::collections::BTreeSet<&String> =
                        v.desired.keys().chain(v.reported.keys()).collect();
                    @for n in names {
                        tr {
                            td { (display_name(n)) }
                            td { (v.desired.get(n).map_or("—", String::as_str)) }
                            td { (v.reported.get(n).map_or("—", |r| r.0.as_str())) }
                            td { (v.reported.get(n).map_or("not reported", |r| r.1.as_str())) }
                        }
                    }
                }
            }
        }
    }
}

fn display_name(name: &str) -> Markup {
    html! {
        @if name.is_empty() { em { "(the agent itself)" } } @else { (name) }
    }
}

fn target_text(t: &Target) -> String {
    match t {
        Target::All => "every agent".into(),
        Target::Agent(uid) => format!("agent {uid}"),
        Target::Labels(l) => l
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
