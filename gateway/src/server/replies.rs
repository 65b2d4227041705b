//! The answers the endpoint gives without a coordinator's: the plain-text HTTP refusals
//! (400, 401, 405, 429, 503 with `Retry-After`) and the `ServerToAgent` error responses
//! (unavailable with retry info, bad request).

use std::net::IpAddr;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::header::CONTENT_TYPE;
use http::{HeaderValue, StatusCode};
use proto::ServerToAgent;

use super::admission::Refusal;
use super::metrics::{count_admission_refused, count_rejected};

/// What we tell throttled / unserved agents to wait before retrying.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// The `error_response` for "try again later" (spec §Throttling / WebSocket).
pub(super) fn unavailable_msg(instance_uid: Vec<u8>, text: &str) -> ServerToAgent {
    use proto::v1::{server_error_response::Details, RetryInfo, ServerErrorResponse};
    ServerToAgent {
        instance_uid,
        error_response: Some(ServerErrorResponse {
            r#type: proto::v1::ServerErrorResponseType::Unavailable as i32,
            error_message: text.to_owned(),
            details: Some(Details::RetryInfo(RetryInfo {
                retry_after_nanoseconds: u64::try_from(RETRY_AFTER.as_nanos()).unwrap_or(u64::MAX),
            })),
        }),
        ..Default::default()
    }
}

/// The `error_response` for a message we could not use (spec §Bad Request: don't retry).
pub(super) fn bad_request_msg(instance_uid: Vec<u8>, text: String) -> ServerToAgent {
    ServerToAgent {
        instance_uid,
        error_response: Some(proto::v1::ServerErrorResponse {
            r#type: proto::v1::ServerErrorResponseType::BadRequest as i32,
            error_message: text,
            details: None,
        }),
        ..Default::default()
    }
}

pub(super) fn text(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.to_owned(),
    )
        .into_response()
}

/// 401, counted and logged. `reason` is the audit-style code, `message` the body. Logged at
/// debug only: a looping or hostile client would turn a line per attempt into a log flood,
/// and every refusal is already counted here and by the coordinator
/// (`ampora_auth_failures_total{reason}`) and audited there, aggregated.
pub(super) fn unauthorized(source_ip: IpAddr, reason: &str, message: &str) -> Response {
    count_rejected("auth_failed");
    tracing::debug!(source_ip = %source_ip, reason, "authentication failed");
    let mut resp = text(StatusCode::UNAUTHORIZED, message);
    resp.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer"),
    );
    resp
}

pub(super) fn service_unavailable(body: &str) -> Response {
    let mut resp = text(StatusCode::SERVICE_UNAVAILABLE, body);
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        HeaderValue::from(RETRY_AFTER.as_secs()),
    );
    resp
}

/// 503 at the connection cap, 429 without an accept token; counted, never logged (a storm of
/// refusals would be a storm of log lines; the counter says the same). `Retry-After` is what
/// opamp-go clients wait before reconnecting.
pub(super) fn admission_refused(refusal: Refusal) -> Response {
    count_admission_refused(refusal);
    let (status, body, retry_after) = match refusal {
        Refusal::ConnectionCap => (
            StatusCode::SERVICE_UNAVAILABLE,
            "connection limit reached, retry later",
            RETRY_AFTER,
        ),
        Refusal::Rate { retry_after } => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many new connections, retry later",
            retry_after,
        ),
        Refusal::IpRate { retry_after } => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many new connections from this address, retry later",
            retry_after,
        ),
        Refusal::IpConnectionCap => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections from this address, retry later",
            RETRY_AFTER,
        ),
        Refusal::CredentialConnectionCap => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections with this credential, retry later",
            RETRY_AFTER,
        ),
    };
    let mut resp = text(status, body);
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        HeaderValue::from(retry_after.as_secs().max(1)),
    );
    resp
}

pub(super) fn method_not_allowed(allow: &'static str) -> Response {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    resp.headers_mut()
        .insert(http::header::ALLOW, HeaderValue::from_static(allow));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_refusals_say_when_to_retry() {
        let resp = admission_refused(Refusal::ConnectionCap);
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[http::header::RETRY_AFTER], "5");
        let resp = admission_refused(Refusal::Rate {
            retry_after: Duration::from_secs(3),
        });
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[http::header::RETRY_AFTER], "3");
        let resp = admission_refused(Refusal::Rate {
            retry_after: Duration::ZERO,
        });
        assert_eq!(resp.headers()[http::header::RETRY_AFTER], "1", "never 0");
    }
}
