//! Signing in to the console and what a signed-in browser holds.
//!
//! An operator signs in with an API token (`amp-api.…`), over TLS or from loopback as the
//! API requires. The browser then holds only a random session secret in an HttpOnly,
//! SameSite=Strict cookie (Secure when the request came over TLS); the server keeps the
//! session (a hash of the secret, the API token's hash, name and role, a CSRF secret, its
//! expiry). Every request re-checks the API token, so revoking it ends its sessions at once;
//! signing out ends the session on the server.
//!
//! Every state-changing request carries the session's CSRF secret in its form and must not
//! come from another site (`Sec-Fetch-Site` / `Origin`). Roles are the API's: a handler asks
//! for `Signed<Operator>` as an API handler asks for `Caller<Operator>`.
//!
//! Sessions live in the memory of the coordinator that signed the browser in; behind a load
//! balancer spreading the console over several coordinators, use session affinity (a browser
//! sent elsewhere is asked to sign in again, nothing worse).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use axum::extract::{Form, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use maud::html;
use rand::RngCore as _;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use shared::domain::Role;
use shared::token;

use super::view;
pub use super::who::Signed;
use crate::api::guard::{ApiState, NeedsRole};

const COOKIE: &str = "ampora_session";

/// How long a session lasts without signing in again.
const SESSION_TTL_MS: i64 = 12 * 60 * 60 * 1000;

/// Sessions one coordinator keeps at most; the oldest goes first beyond it.
const MAX_SESSIONS: usize = 10_000;

struct Session {
    api_token_hash: [u8; 32],
    csrf: String,
    expires_ms: i64,
}

/// The sessions of this coordinator, by the SHA-256 of their secret.
#[derive(Default)]
pub struct Sessions {
    by_hash: Mutex<HashMap<[u8; 32], Session>>,
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Sessions {
    /// A new session for the API token with this hash; returns its secret.
    fn open(&self, api_token_hash: [u8; 32], now_ms: i64) -> String {
        let secret = random_hex();
        let mut map = self.by_hash.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| s.expires_ms > now_ms);
        if map.len() >= MAX_SESSIONS {
            let oldest = map
                .iter()
                .min_by_key(|(_, s)| s.expires_ms)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                map.remove(&k);
            }
        }
        map.insert(
            hash(&secret),
            Session {
                api_token_hash,
                csrf: random_hex(),
                expires_ms: now_ms + SESSION_TTL_MS,
            },
        );
        secret
    }

    /// The API token hash and CSRF secret of a live session.
    fn get(&self, secret: &str, now_ms: i64) -> Option<([u8; 32], String)> {
        let map = self.by_hash.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&hash(secret))
            .filter(|s| s.expires_ms > now_ms)
            .map(|s| (s.api_token_hash, s.csrf.clone()))
    }

    fn close(&self, secret: &str) {
        let mut map = self.by_hash.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&hash(secret));
    }
}

fn session_secret(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// The sessions the console's router keeps (an extension of every console request).
fn sessions_of(parts: &Parts) -> Option<Arc<Sessions>> {
    parts.extensions.get::<Arc<Sessions>>().cloned()
}

/// The role a console handler needs; `()` is any signed-in operator.
pub trait ConsoleRole: Send + Sync + 'static {
    const ROLE: Role;
}

impl ConsoleRole for () {
    const ROLE: Role = Role::Viewer;
}

impl<R: NeedsRole> ConsoleRole for R {
    const ROLE: Role = <R as NeedsRole>::ROLE;
}

impl<R: ConsoleRole> FromRequestParts<ApiState> for Signed<R> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &ApiState) -> Result<Self, Response> {
        if !s.guard.channel_ok(parts) {
            return Err(view::status_page(
                StatusCode::FORBIDDEN,
                None,
                "the console needs https:// (or a loopback address)",
            ));
        }
        let unsigned = || -> Response {
            if parts.method == Method::GET {
                Redirect::to("/ui/login").into_response()
            } else {
                view::status_page(StatusCode::UNAUTHORIZED, None, "not signed in")
            }
        };
        let Some(secret) = session_secret(&parts.headers) else {
            return Err(unsigned());
        };
        let now = shared::now_ms();
        let Some(sessions) = sessions_of(parts) else {
            return Err(view::status_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                "console sessions missing",
            ));
        };
        let Some((api_hash, csrf)) = sessions.get(&secret, now) else {
            return Err(unsigned());
        };
        // The API token behind the session, as it is now: revoked means signed out.
        let rec = match s.coord.store().find_api_token(&api_hash).await {
            Ok(Some(rec)) => rec,
            Ok(None) => {
                sessions.close(&secret);
                return Err(unsigned());
            }
            Err(e) => return Err(view::error_page(None, &e.into())),
        };
        let signed = Signed {
            actor: format!("api:{}", rec.name),
            role: rec.role,
            csrf,
            secret,
            role_needed: PhantomData,
        };
        if rec.role < R::ROLE {
            metrics::counter!(crate::api::guard::REFUSED_METRIC, "reason" => "forbidden")
                .increment(1);
            return Err(view::status_page(
                StatusCode::FORBIDDEN,
                Some(&signed.any()),
                &format!("this needs the {} role", view::role_name(R::ROLE)),
            ));
        }
        Ok(signed)
    }
}

/// A state-changing request: the operator (role `R`), and its form `T`, accepted only with
/// the session's CSRF secret and not from another site.
pub struct Posted<R, T> {
    pub who: Signed<R>,
    pub form: T,
}

#[derive(Deserialize)]
struct CsrfField {
    #[serde(default)]
    csrf: String,
}

/// A state-changing request from another site: a browser says so in `Sec-Fetch-Site`, or
/// its `Origin` names another host than the one it asked.
fn cross_site(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return !matches!(site, "same-origin" | "none");
    }
    match (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) {
        (Some(origin), Some(host)) => origin.split_once("://").map(|(_, h)| h) != Some(host),
        _ => false,
    }
}

impl<R, T> FromRequest<ApiState> for Posted<R, T>
where
    R: ConsoleRole,
    T: DeserializeOwned + Send,
{
    type Rejection = Response;

    async fn from_request(req: Request, s: &ApiState) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let who = Signed::<R>::from_request_parts(&mut parts, s).await?;
        let forged = || {
            metrics::counter!(crate::api::guard::REFUSED_METRIC, "reason" => "forbidden")
                .increment(1);
            view::status_page(
                StatusCode::FORBIDDEN,
                Some(&who.any()),
                "this form is stale or did not come from this console; reload and try again",
            )
        };
        if cross_site(&parts.headers) {
            return Err(forged());
        }
        let bytes = axum::body::to_bytes(body, s.guard.largest_body())
            .await
            .map_err(|_| {
                view::status_page(StatusCode::PAYLOAD_TOO_LARGE, None, "form too large")
            })?;
        let CsrfField { csrf } = serde_urlencoded::from_bytes(&bytes).unwrap_or(CsrfField {
            csrf: String::new(),
        });
        // Digests compared, so the time taken says nothing about the secret.
        if hash(&csrf) != hash(&who.csrf) {
            return Err(forged());
        }
        let form = serde_urlencoded::from_bytes(&bytes).map_err(|e| {
            view::status_page(StatusCode::BAD_REQUEST, Some(&who.any()), &e.to_string())
        })?;
        Ok(Self { who, form })
    }
}

pub(super) async fn login_page() -> Response {
    login_form(None, StatusCode::OK)
}

fn login_form(error: Option<&str>, status: StatusCode) -> Response {
    let body = html! {
        section.signin {
            h1 { "Sign in" }
            p { "Paste an API token (" code { "amp-api.…" } "). The admin token of a new server is in "
                code { "<data_dir>/admin-token" } "." }
            @if let Some(e) = error { p.error { (e) } }
            form method="post" action="/ui/login" {
                label for="token" { "API token" }
                input #token type="password" name="token" autocomplete="off" required;
                button type="submit" { "Sign in" }
            }
        }
    };
    (status, view::page("Sign in", None, body)).into_response()
}

#[derive(Deserialize)]
pub(super) struct SignIn {
    token: String,
}

pub(super) async fn sign_in(
    State(s): State<ApiState>,
    Extension(sessions): Extension<Arc<Sessions>>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    if !s.guard.channel_ok(&parts) {
        return view::status_page(
            StatusCode::FORBIDDEN,
            None,
            "API tokens are accepted over plaintext only from loopback: use https://",
        );
    }
    if cross_site(&parts.headers) {
        return view::status_page(StatusCode::FORBIDDEN, None, "cross-site sign-in refused");
    }
    let Ok(Form(SignIn { token: text })) =
        Form::<SignIn>::from_request(Request::from_parts(parts.clone(), body), &()).await
    else {
        return login_form(Some("no token given"), StatusCode::BAD_REQUEST);
    };
    let text = text.trim();
    let unknown = || {
        metrics::counter!(crate::api::guard::REFUSED_METRIC, "reason" => "unauthenticated")
            .increment(1);
        login_form(
            Some("unknown or revoked API token"),
            StatusCode::UNAUTHORIZED,
        )
    };
    if !token::is_api_token(text) {
        return unknown();
    }
    let api_hash = token::hash_token(text);
    let rec = match s.coord.store().find_api_token(&api_hash).await {
        Ok(Some(rec)) => rec,
        Ok(None) => return unknown(),
        Err(e) => return view::error_page(None, &e.into()),
    };
    let secret = sessions.open(api_hash, shared::now_ms());
    let (ip, tls) = match s.guard.client(&parts) {
        Some((ip, tls)) => (Some(ip), tls),
        None => (None, false),
    };
    s.coord
        .audit_operator(
            &format!("api:{}", rec.name),
            "console.sign_in",
            ip,
            serde_json::json!({ "api_token_id": rec.id }),
        )
        .await;
    let cookie = format!(
        "{COOKIE}={secret}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_TTL_MS / 1000,
        if tls { "; Secure" } else { "" }
    );
    let mut resp = Redirect::to("/ui/").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Deserialize)]
pub(super) struct Nothing {}

pub(super) async fn sign_out(
    State(s): State<ApiState>,
    Extension(sessions): Extension<Arc<Sessions>>,
    posted: Posted<(), Nothing>,
) -> Response {
    sessions.close(&posted.who.secret);
    s.coord
        .audit_operator(
            &posted.who.actor,
            "console.sign_out",
            None,
            serde_json::json!({}),
        )
        .await;
    let mut resp = Redirect::to("/ui/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("ampora_session=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    resp
}
