//! Plain HTTP transport (spec §Plain HTTP Transport): one POSTed `AgentToServer`, one
//! `ServerToAgent` in the response. No connection state, no ownership claim: pushes for HTTP
//! agents wait at the coordinator for the next poll.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, VARY};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use proto::Message;
use shared::bus::{
    AgentFrame, CertificateId, CoordinatorReply, CoordinatorRequest, FrameReply, Route,
};
use shared::domain::Transport;
use shared::ids::InstanceUid;

use super::auth::{auth_close_reason, authenticate};
use super::decode::{self, DecodeError, Framing};
use super::latency;
use super::metrics::{count_received, count_rejected, count_sent};
use super::replies::{service_unavailable, text, unauthorized};
use super::{partition_of, Inner};

const PROTOBUF: &str = "application/x-protobuf";

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Encoding {
    Identity,
    Gzip,
}

/// `None` for a content coding we don't support.
fn content_encoding(headers: &HeaderMap) -> Option<Encoding> {
    let Some(v) = headers.get(CONTENT_ENCODING) else {
        return Some(Encoding::Identity);
    };
    let v = v.to_str().ok()?.trim();
    if v.is_empty() || v.eq_ignore_ascii_case("identity") {
        Some(Encoding::Identity)
    } else if v.eq_ignore_ascii_case("gzip") || v.eq_ignore_ascii_case("x-gzip") {
        Some(Encoding::Gzip)
    } else {
        None
    }
}

/// True when `Accept-Encoding` lets us gzip the response (`gzip`, `x-gzip` or `*`, q > 0).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or_default().trim();
            let wanted = coding.eq_ignore_ascii_case("gzip")
                || coding.eq_ignore_ascii_case("x-gzip")
                || coding == "*";
            wanted && parts.all(|p| !is_zero_q(p))
        })
}

/// `q=0` (or `q=0.0`, `q=0.000`) means "not acceptable".
fn is_zero_q(param: &str) -> bool {
    let Some((name, value)) = param.split_once('=') else {
        return false;
    };
    name.trim().eq_ignore_ascii_case("q") && value.trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
}

/// Why a body could not be read.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BodyError {
    TooLarge,
    Malformed(String),
}

/// Gunzips `raw`, refusing output larger than `max` without ever holding more than `max + 1`
/// bytes of it: a gzip bomb costs us at most the limit.
fn gunzip_limited(raw: &[u8], max: usize) -> Result<Vec<u8>, BodyError> {
    let mut out = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    MultiGzDecoder::new(raw)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| BodyError::Malformed(format!("invalid gzip body: {e}")))?;
    if out.len() > max {
        return Err(BodyError::TooLarge);
    }
    Ok(out)
}

/// Reads the (possibly gzipped) request body, at most `max` bytes after decompression.
pub(super) async fn read_body(
    body: Body,
    encoding: &Encoding,
    max: usize,
) -> Result<Vec<u8>, BodyError> {
    // gzip can grow incompressible input by a few bytes per 16 KiB block plus a header; allow
    // that slack on the wire so a body just under the limit isn't refused for its framing.
    let wire_limit = match encoding {
        Encoding::Identity => max,
        Encoding::Gzip => max.saturating_add(max / 64).saturating_add(1024),
    };
    let raw = match Limited::new(body, wire_limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(BodyError::TooLarge)
        }
        Err(e) => return Err(BodyError::Malformed(format!("reading body: {e}"))),
    };
    match encoding {
        Encoding::Identity => Ok(raw.to_vec()),
        Encoding::Gzip => gunzip_limited(&raw, max),
    }
}

fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = GzEncoder::new(Vec::with_capacity(data.len() / 2 + 32), Compression::fast());
    enc.write_all(data)?;
    enc.finish()
}

/// `secure`: whether the agent's connection is TLS (its own, or at a trusted proxy), as
/// [`Origin::tls`](super::auth::Origin) says; passed on in every frame.
pub(super) async fn serve(
    inner: Arc<Inner>,
    req: Request,
    source_ip: IpAddr,
    secure: bool,
    cert: Option<CertificateId>,
) -> Response {
    let (parts, body) = req.into_parts();
    let (credential, uid_hint) =
        match authenticate(&inner, &parts.headers, source_ip, Transport::Http, cert).await {
            Ok(ok) => ok,
            Err(resp) => return resp,
        };
    let Some(encoding) = content_encoding(&parts.headers) else {
        count_rejected("malformed");
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported Content-Encoding (use gzip or none)",
        );
    };
    let max = inner.cfg.max_frame_bytes;
    let bytes = match read_body(body, &encoding, max).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            count_rejected("oversize");
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("AgentToServer exceeds the {max} byte limit"),
            );
        }
        Err(BodyError::Malformed(e)) => {
            count_rejected("malformed");
            return text(StatusCode::BAD_REQUEST, &e);
        }
    };
    count_received(Transport::Http);
    let received = Instant::now();
    let limits = inner.cfg.frame_limits;
    // The permit is this message's share of the decode budget, held until it is answered.
    let (msg, _permit) =
        match decode::decode(bytes, Framing::Plain, limits, &inner.decode_budget).await {
            Ok(d) => (d.msg, d.permit),
            Err(DecodeError::Busy) => {
                count_rejected("memory_budget");
                return service_unavailable("server busy, retry later");
            }
            Err(e) => {
                count_rejected(e.reason());
                return text(StatusCode::BAD_REQUEST, &e.to_string());
            }
        };
    if let Some(hint) = uid_hint {
        if !msg.instance_uid.is_empty() && InstanceUid::from_slice(&msg.instance_uid) != Some(hint)
        {
            count_rejected("malformed");
            return text(
                StatusCode::BAD_REQUEST,
                "OpAMP-Instance-UID header does not match instance_uid",
            );
        }
    }

    let route = Route::Partition(partition_of(&msg.instance_uid));
    let frame = AgentFrame {
        gateway: inner.id.clone(),
        conn_id: inner.next_conn_id(),
        epoch: 0,
        transport: Transport::Http,
        credential,
        source_ip,
        secure,
        msg,
    };
    if inner.bus_lost() {
        return service_unavailable("bus unreachable, retry later");
    }
    let reply = tokio::time::timeout(
        inner.cfg.request_timeout,
        latency::bus_request(
            &*inner.bus,
            route,
            CoordinatorRequest::Frame(Box::new(frame)),
        ),
    )
    .await;
    let reply: FrameReply = match reply {
        Ok(Ok(CoordinatorReply::Frame(r))) => *r,
        Ok(Ok(
            CoordinatorReply::Auth(_)
            | CoordinatorReply::RevokedSerials(_)
            | CoordinatorReply::BlobChunk(_),
        )) => {
            tracing::error!("coordinator answered a frame with another reply");
            return service_unavailable("coordinator unavailable");
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "frame request failed");
            return service_unavailable("coordinator unavailable");
        }
        Err(_) => {
            tracing::warn!("frame request timed out");
            return service_unavailable("coordinator unavailable");
        }
    };

    if let Some(reason) = reply.close {
        // HTTP has no connection to close: the refusal is the status code.
        return match auth_close_reason(&reason) {
            Some(why) => unauthorized(source_ip, why, why),
            None => {
                let mut resp = text(StatusCode::UNAUTHORIZED, &reason);
                resp.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer"),
                );
                resp
            }
        };
    }

    let encoded = reply.msg.encode_to_vec();
    count_sent(Transport::Http);
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(PROTOBUF));
    headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
    if accepts_gzip(&parts.headers) {
        match gzip(&encoded) {
            Ok(zipped) => {
                headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                latency::observe_message(Transport::Http, received);
                return (StatusCode::OK, headers, zipped).into_response();
            }
            // Writing into a Vec can't fail; if it ever did, plain is still a valid answer.
            Err(e) => tracing::warn!(error = %e, "gzip of response failed, sending it plain"),
        }
    }
    latency::observe_message(Transport::Http, received);
    (StatusCode::OK, headers, encoded).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::helper_tests::headers;

    fn gz(data: &[u8]) -> Vec<u8> {
        gzip(data).expect("gzip into a vec")
    }

    #[test]
    fn gunzip_round_trip_and_limits() {
        let data = vec![b'a'; 10_000];
        let zipped = gz(&data);
        assert_eq!(gunzip_limited(&zipped, 10_000), Ok(data));
        assert_eq!(gunzip_limited(&zipped, 9_999), Err(BodyError::TooLarge));
        assert!(matches!(
            gunzip_limited(b"not gzip", 100),
            Err(BodyError::Malformed(_))
        ));
    }

    #[test]
    fn gzip_bomb_is_bounded() {
        // 16 MiB of zeros compresses to a few KiB; we must stop after the limit.
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..16 {
            enc.write_all(&chunk).expect("write");
        }
        let bomb = enc.finish().expect("finish");
        assert!(bomb.len() < 1 << 17);
        assert_eq!(gunzip_limited(&bomb, 4 << 20), Err(BodyError::TooLarge));
    }

    #[test]
    fn content_encodings() {
        let mut h = HeaderMap::new();
        assert_eq!(content_encoding(&h), Some(Encoding::Identity));
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("GZIP"));
        assert_eq!(content_encoding(&h), Some(Encoding::Gzip));
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("identity"));
        assert_eq!(content_encoding(&h), Some(Encoding::Identity));
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("br"));
        assert_eq!(content_encoding(&h), None);
    }

    #[tokio::test]
    async fn body_limits() {
        let body = || Body::from(vec![1u8; 100]);
        assert_eq!(
            read_body(body(), &Encoding::Identity, 100).await,
            Ok(vec![1u8; 100])
        );
        assert_eq!(
            read_body(body(), &Encoding::Identity, 99).await,
            Err(BodyError::TooLarge)
        );
        let zipped = Body::from(gz(&[1u8; 100]));
        assert_eq!(
            read_body(zipped, &Encoding::Gzip, 99).await,
            Err(BodyError::TooLarge)
        );
    }

    #[test]
    fn accept_encoding_gzip() {
        for ok in [
            &["gzip"][..],
            &["deflate, gzip;q=0.5"],
            &["GZIP"],
            &["br", "x-gzip"],
            &["*"],
            &["gzip; q=1.0"],
        ] {
            assert!(accepts_gzip(&headers(ACCEPT_ENCODING, ok)), "{ok:?}");
        }
        for bad in [
            &[][..],
            &["identity"],
            &["gzip;q=0"],
            &["gzip; q=0.000"],
            &["deflate, br"],
            &["gzipx"],
        ] {
            assert!(!accepts_gzip(&headers(ACCEPT_ENCODING, bad)), "{bad:?}");
        }
    }
}
