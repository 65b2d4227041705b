//! The gateway's private parsers as the fuzz targets in `tests/fuzz` call them (feature
//! `fuzzing`, off by default). Thin wrappers only: each calls the code the transports run, and
//! turns its private error types into the `reason` labels the metrics already use.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use axum::body::Body;
use http::HeaderValue;
use proto::AgentToServer;
use rustls::pki_types::CertificateDer;

use super::decode::{self, DecodeBudget, FrameLimits, Framing};
use super::plain::{self, BodyError, Encoding};

/// One inbound WebSocket message through the pre-scan, the budget and the decode, as the
/// WebSocket transport does it (`Err` holds the rejection reason).
pub fn decode_ws_frame(
    frame: &[u8],
    limits: &FrameLimits,
    budget: &DecodeBudget,
) -> Result<AgentToServer, &'static str> {
    decode::decode_sync(frame, Framing::WebSocket, limits, budget)
        .map(|d| d.msg)
        .map_err(|e| e.reason())
}

/// The budget the pre-scan charges for decoding the protobuf `body` (no header).
pub fn decode_cost(body: &[u8], limits: &FrameLimits) -> Result<usize, &'static str> {
    decode::scan(body, limits)
        .map(|c| c.cost(body.len()))
        .map_err(|e| e.reason())
}

/// The plain-HTTP body reader over a complete body: `Err("oversize")` past `max` decoded
/// bytes, `Err("malformed")` for a broken gzip stream.
pub fn read_http_body(raw: Vec<u8>, gzip: bool, max: usize) -> Result<Vec<u8>, &'static str> {
    let encoding = if gzip {
        Encoding::Gzip
    } else {
        Encoding::Identity
    };
    // A body already in memory never makes the reader wait: one poll completes it.
    let fut = pin!(plain::read_body(Body::from(raw), &encoding, max));
    let result = match fut.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r,
        Poll::Pending => panic!("reading an in-memory body waited"),
    };
    result.map_err(|e| match e {
        BodyError::TooLarge => "oversize",
        BodyError::Malformed(_) => "malformed",
    })
}

/// The certificate chain in a trusted proxy's client-certificate header.
pub fn client_cert_chain(value: &HeaderValue) -> Vec<CertificateDer<'static>> {
    super::auth::header_chain(value)
}
