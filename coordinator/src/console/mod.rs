//! The operator console at `/ui/`: server-rendered HTML pages over the same coordinator and
//! the same rules as the REST API (every write calls the function its API route calls), served
//! by the API's listener on every coordinator.
//!
//! Owns: the page layout (navigation, footer with the version), the security headers of
//! every console response (a Content-Security-Policy without inline scripts or styles), the
//! static assets, and one module per screen: [`fleet`], [`agent`], [`configs`], [`rollouts`],
//! [`groups`], [`packages`], [`tokens`], [`identities`], [`audit`]. Sign-in, sessions and CSRF are [`session`]'s.
//!
//! Every value an agent reports is rendered through maud, which escapes it; nothing reaches
//! the page as raw HTML except the markup written here.

mod agent;
mod audit;
mod components;
mod configs;
mod fleet;
mod groups;
mod identities;
mod packages;
mod restarts;
mod rollouts;
pub(crate) mod session;
mod throughput;
mod tokens;
mod view;
mod who;

use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::api::guard::ApiState;

/// No inline script or style, nothing from elsewhere, no framing, forms post only here.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// The console's routes; merged into the API router, whose state and guard it shares.
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/login", get(session::login_page).post(session::sign_in))
        .route("/ui/logout", post(session::sign_out))
        .route("/ui/", get(fleet::page))
        .route("/ui/fleet/rows", get(fleet::rows))
        .route("/ui/fleet/events", get(fleet::events))
        .route("/ui/agents/{uid}", get(agent::page))
        .route("/ui/agents/{uid}/reapply", post(agent::reapply))
        .route("/ui/agents/{uid}/adopt", post(agent::adopt))
        .route("/ui/agents/{uid}/restart", post(restarts::restart_agent))
        .route("/ui/restarts", get(restarts::page).post(restarts::start))
        .route("/ui/configs", get(configs::list).post(configs::create))
        .route("/ui/configs/diff", get(configs::diff))
        .route("/ui/configs/{id}", get(configs::show))
        .route("/ui/push", post(configs::push))
        .route("/ui/rollouts", get(rollouts::list).post(rollouts::create))
        .route("/ui/rollouts/{id}", get(rollouts::show))
        .route("/ui/rollouts/{id}/live", get(rollouts::fragment))
        .route("/ui/rollouts/{id}/{action}", post(rollouts::act))
        .route("/ui/groups", get(groups::list).post(groups::save))
        .route("/ui/groups/delete", post(groups::delete))
        .route("/ui/tokens", get(tokens::list).post(tokens::create))
        .route("/ui/tokens/{id}/revoke", post(tokens::revoke))
        .route("/ui/packages", get(packages::list))
        .route("/ui/identities", get(identities::list))
        .route("/ui/identities/{serial}/revoke", post(identities::revoke))
        .route(
            "/ui/identities/{serial}/rebootstrap",
            post(identities::rebootstrap),
        )
        .route("/ui/audit", get(audit::page))
        .route("/ui/audit/export", get(audit::export))
        .route("/ui/assets/console.css", get(css))
        .route("/ui/assets/console.js", get(js))
        .layer(axum::middleware::from_fn(security_headers))
        .layer(axum::Extension(std::sync::Arc::new(
            session::Sessions::default(),
        )))
}

/// Every console response: the CSP, no sniffing, no referrer, never cached (pages carry
/// tokens shown once and CSRF secrets).
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

async fn css() -> impl IntoResponse {
    asset("text/css; charset=utf-8", CSS)
}

async fn js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", JS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}
