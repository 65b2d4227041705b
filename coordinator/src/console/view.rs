//! What every page shares: the layout (navigation, who is signed in, sign-out, the footer
//! with version and build commit), error pages, and small renderers (times, JSON, labels).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};
use shared::domain::{ConfigMap, Role};
use similar::{ChangeTag, TextDiff};

use super::who::Signed;
use crate::api::ApiError;

/// The version and the commit it was built from (when the build could tell).
pub(super) fn version() -> String {
    match option_env!("AMPORA_COMMIT") {
        Some(c) if !c.is_empty() => format!("{} ({c})", env!("CARGO_PKG_VERSION")),
        _ => env!("CARGO_PKG_VERSION").to_string(),
    }
}

pub(super) fn role_name(role: Role) -> &'static str {
    match role {
        Role::Viewer => "viewer",
        Role::Operator => "operator",
        Role::Admin => "admin",
    }
}

/// A whole page: navigation (when signed in), `body`, and the footer.
pub(super) fn page(title: &str, who: Option<&Signed>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Ampora" }
                link rel="stylesheet" href="/ui/assets/console.css";
                script src="/ui/assets/console.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/ui/" { "Ampora" }
                    @if let Some(who) = who {
                        nav {
                            a href="/ui/" { "Fleet" }
                            a href="/ui/configs" { "Configs" }
                            a href="/ui/rollouts" { "Rollouts" }
                            a href="/ui/groups" { "Groups" }
                            a href="/ui/packages" { "Packages" }
                            a href="/ui/restarts" { "Restarts" }
                            // Only admins may list tokens (as in the API): no dead link.
                            @if who.may(Role::Admin) { a href="/ui/tokens" { "Tokens" } }
                            a href="/ui/identities" { "Identities" }
                            a href="/ui/audit" { "Audit" }
                        }
                        div.who {
                            span { (who.actor) " · " (role_name(who.role)) }
                            form method="post" action="/ui/logout" {
                                (csrf(who))
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { (body) }
                footer { "Ampora " span #version { (version()) } }
            }
        }
    }
}

/// The hidden CSRF field every state-changing form carries.
pub(super) fn csrf(who: &Signed) -> Markup {
    html! { input type="hidden" name="csrf" value=(who.csrf); }
}

/// An error as a page with its status: what the API would have said, as text.
pub(super) fn error_page(who: Option<&Signed>, e: &ApiError) -> Response {
    let status = e.status();
    let body = html! {
        h1 { "Could not do that" }
        p.error { (e.public_body().error) }
        p { a href="/ui/" { "Back to the fleet" } }
    };
    (status, page("Error", who, body)).into_response()
}

/// A page with a status other than 200 (forbidden, not found).
pub(super) fn status_page(status: StatusCode, who: Option<&Signed>, text: &str) -> Response {
    let body = html! {
        h1 { (status.canonical_reason().unwrap_or("Error")) }
        p.error { (text) }
    };
    (status, page(text, who, body)).into_response()
}

/// Unix ms as UTC `YYYY-MM-DD HH:MM:SS`; `-` for none.
pub(super) fn when(ms: Option<i64>) -> String {
    let Some(ms) = ms else {
        return "-".into();
    };
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// Pretty JSON, escaped by maud where it is rendered.
pub(super) fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// `key=value,key=value` into labels; `None` when a part is not `key=value`.
pub(super) fn parse_labels(s: &str) -> Option<std::collections::BTreeMap<String, String>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// One text per config: the single unnamed file as it is, several files each under a
/// `# file: name` line, so a diff reads naturally.
pub(super) fn config_text(files: &ConfigMap) -> String {
    if files.len() == 1 {
        if let Some(f) = files.get("") {
            return f.body.clone();
        }
    }
    files
        .iter()
        .map(|(n, f)| format!("# file: {n}\n{}", f.body))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A unified diff of two texts, lines marked added / removed / kept.
pub(super) fn diff_view(old: &str, new: &str) -> Markup {
    let diff = TextDiff::from_lines(old, new);
    if diff.ratio() >= 1.0 {
        return html! { p.muted.diff-same { "Identical." } };
    }
    html! {
        pre.diff {
            @for change in diff.iter_all_changes() {
                @let (class, sign) = match change.tag() {
                    ChangeTag::Delete => ("del", "-"),
                    ChangeTag::Insert => ("ins", "+"),
                    ChangeTag::Equal => ("eq", " "),
                };
                span class=(class) { (sign) " " (change.value()) }
            }
        }
    }
}
