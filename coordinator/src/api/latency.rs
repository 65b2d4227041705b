//! `ampora_api_request_duration_seconds{method, route, status}`: every API request from the
//! router's edge to its response, refusals by the guard included. `route` is the matched
//! route's template (`/api/v1/agents/{uid}`), never the raw path, so the label set stays bounded
//! whatever paths clients send; `method` is bounded the same way.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

pub const REQUEST_DURATION: &str = "ampora_api_request_duration_seconds";

pub fn describe_metrics() {
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "API requests from arrival to response headers, by method, route (the route template) \
         and status"
    );
}

/// A label for `m`: the standard methods by name, any other (clients may invent methods) as
/// `other`.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware timing one request. Layered on the API router, whose routes set
/// [`MatchedPath`] before their layers run.
pub async fn track(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    metrics::histogram!(
        REQUEST_DURATION,
        "method" => method,
        "route" => route,
        "status" => resp.status().as_str().to_owned(),
    )
    .record(started.elapsed().as_secs_f64());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invented_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        let invented = Method::from_bytes(b"FROBNICATE").expect("a valid token");
        assert_eq!(method_label(&invented), "other");
    }
}
