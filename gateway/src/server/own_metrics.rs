//! Ampora's own-metrics endpoint (`POST /v1/metrics`, OTLP/HTTP protobuf): where agents whose
//! group names Ampora as their `own_metrics` destination send their own metrics.
//!
//! Each export is authenticated before its body is read: the agent's own credential
//! (`Authorization: Bearer amp-om.…`, offered in the settings' headers) or its identity
//! certificate. One export per agent per [`MIN_INTERVAL`] is taken; the body is read up to
//! [`MAX_BODY`] (gzip: [`MAX_INFLATED`] once inflated), decoded with the OpenTelemetry
//! project's generated types, and only the throughput figures (`own_telemetry::Figures`)
//! travel on, to the coordinator that owns the agent. The rest of the export is dropped.

use std::collections::HashMap;
use std::io::Read as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use http::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::StatusCode;
use http_body_util::BodyExt as _;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, AggregationTemporality};
use proto::Message as _;
use shared::bus::{CoordinatorEvent, Route};
use shared::download_token::DownloadKey;
use shared::ids::InstanceUid;
use shared::own_telemetry::{counter_of, is_queue_size, Figures, MetricsCredential, METRICS_PATH};

/// Largest export body taken, as sent.
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// Largest export once a gzip body is inflated.
pub const MAX_INFLATED: usize = 16 * 1024 * 1024;
/// One export per agent per this long; more are answered 429 (a Collector exports every
/// 60 s by default).
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

const EXPORTS: &str = "ampora_gateway_own_metrics_total";
const OUTCOMES: [&str; 8] = [
    "accepted",
    "unauthenticated",
    "too_frequent",
    "unsupported_media_type",
    "too_large",
    "malformed",
    "unavailable",
    "bad_certificate",
];

pub(super) fn describe() {
    metrics::describe_counter!(
        EXPORTS,
        "Own-metrics exports agents sent this gateway, by outcome (accepted, or why refused)"
    );
    for outcome in OUTCOMES {
        metrics::counter!(EXPORTS, "outcome" => outcome).absolute(0);
    }
}

/// The route's state.
pub(super) struct OwnMetrics {
    key: DownloadKey,
    gateway: Arc<super::Inner>,
    turns: Turns,
}

impl OwnMetrics {
    pub(super) fn new(key: DownloadKey, gateway: Arc<super::Inner>) -> Self {
        Self {
            key,
            gateway,
            turns: Turns::default(),
        }
    }
}

/// When each agent's last export was taken: only agents with a valid credential get an
/// entry, and entries older than [`MIN_INTERVAL`] are dropped once there are many.
#[derive(Default)]
struct Turns(Mutex<HashMap<InstanceUid, Instant>>);

/// Entries kept before the old ones are swept.
const SWEEP_AT: usize = 100_000;

impl Turns {
    /// False when `uid` exported less than [`MIN_INTERVAL`] before `now`.
    fn take(&self, uid: InstanceUid, now: Instant) -> bool {
        let Ok(mut last) = self.0.lock() else {
            return true;
        };
        if last.get(&uid).is_some_and(|t| now - *t < MIN_INTERVAL) {
            return false;
        }
        if last.len() >= SWEEP_AT {
            last.retain(|_, t| now - *t < MIN_INTERVAL);
        }
        last.insert(uid, now);
        true
    }
}

pub(super) fn router(state: Arc<OwnMetrics>) -> Router {
    Router::new()
        .route(METRICS_PATH, post(export))
        .with_state(state)
}

fn answer(outcome: &'static str, status: StatusCode, text: &str) -> Response {
    metrics::counter!(EXPORTS, "outcome" => outcome).increment(1);
    (status, format!("{text}\n")).into_response()
}

/// Why an export's sender is not taken.
enum Unknown {
    /// No credential, or one that does not verify.
    Credential,
    /// A client certificate that does not verify (the reason's label).
    Certificate(&'static str),
}

impl Unknown {
    fn answer(self) -> Response {
        match self {
            Unknown::Credential => {
                metrics::counter!(EXPORTS, "outcome" => "unauthenticated").increment(1);
                (
                    StatusCode::UNAUTHORIZED,
                    [(WWW_AUTHENTICATE, "Bearer")],
                    "own metrics need this agent's credential (from its own_metrics settings) or its identity certificate\n",
                )
                    .into_response()
            }
            Unknown::Certificate(why) => answer(
                "bad_certificate",
                StatusCode::UNAUTHORIZED,
                &format!("client certificate {why}"),
            ),
        }
    }
}

/// Who is exporting: the credential first, else a verified client certificate.
fn who(h: &OwnMetrics, req: &Request) -> Result<InstanceUid, Unknown> {
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    if !token.is_empty() {
        return MetricsCredential::verify(&h.key, token).ok_or(Unknown::Credential);
    }
    let g = &h.gateway;
    let origin = super::auth::origin_of(&g.cfg.trusted_proxies, g.cfg.proxy_secret.as_ref(), req);
    let chain = super::auth::presented_chain(g, req, &origin);
    match (g.cfg.identity.as_ref(), chain) {
        (Some(trust), Some(chain)) => trust
            .verify(&chain)
            .map(|id| id.uid)
            .map_err(|why| Unknown::Certificate(why.as_str())),
        _ => Err(Unknown::Credential),
    }
}

async fn export(State(h): State<Arc<OwnMetrics>>, req: Request) -> Response {
    let uid = match who(&h, &req) {
        Ok(uid) => uid,
        Err(unknown) => return unknown.answer(),
    };
    if !h.turns.take(uid, Instant::now()) {
        metrics::counter!(EXPORTS, "outcome" => "too_frequent").increment(1);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(RETRY_AFTER, "1")],
            "at most one export per second per agent\n",
        )
            .into_response();
    }
    let media = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !media.starts_with("application/x-protobuf") {
        return answer(
            "unsupported_media_type",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "own metrics are taken as OTLP/HTTP protobuf (application/x-protobuf)",
        );
    }
    let gzip = match req.headers().get(CONTENT_ENCODING).map(|v| v.as_bytes()) {
        None | Some(b"identity") => false,
        Some(b"gzip") => true,
        Some(_) => {
            return answer(
                "unsupported_media_type",
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Content-Encoding must be gzip or none",
            )
        }
    };
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return answer(
                "too_large",
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("an export may be at most {MAX_BODY} bytes"),
            )
        }
    };
    let figures = match decode(&body, gzip) {
        Ok(f) => f,
        Err((outcome, status, why)) => return answer(outcome, status, &why),
    };
    let ev = CoordinatorEvent::OwnMetrics {
        uid,
        figures: Box::new(figures),
    };
    if let Err(e) = h
        .gateway
        .bus
        .notify(Route::Partition(uid.partition()), ev)
        .await
    {
        tracing::debug!(instance_uid = %uid, error = %e, "relaying own metrics failed");
        metrics::counter!(EXPORTS, "outcome" => "unavailable").increment(1);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(RETRY_AFTER, "5")],
            "the agent's coordinator cannot be reached now\n",
        )
            .into_response();
    }
    metrics::counter!(EXPORTS, "outcome" => "accepted").increment(1);
    (
        [(CONTENT_TYPE, "application/x-protobuf")],
        Body::from(ExportMetricsServiceResponse::default().encode_to_vec()),
    )
        .into_response()
}

type Refusal = (&'static str, StatusCode, String);

/// The figures of one export body (gzip-compressed when `gzip`).
pub(crate) fn decode(body: &[u8], gzip: bool) -> Result<Figures, Refusal> {
    let inflated;
    let bytes = if gzip {
        let mut out = Vec::new();
        let read = flate2::read::GzDecoder::new(body)
            .take(MAX_INFLATED as u64 + 1)
            .read_to_end(&mut out);
        if read.is_err() {
            return Err((
                "malformed",
                StatusCode::BAD_REQUEST,
                "the body is not valid gzip".into(),
            ));
        }
        if out.len() > MAX_INFLATED {
            return Err((
                "too_large",
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("an export may inflate to at most {MAX_INFLATED} bytes"),
            ));
        }
        inflated = out;
        &inflated[..]
    } else {
        body
    };
    let req = ExportMetricsServiceRequest::decode(bytes).map_err(|e| {
        (
            "malformed",
            StatusCode::BAD_REQUEST,
            format!("not an OTLP ExportMetricsServiceRequest: {e}"),
        )
    })?;
    Ok(figures_of(&req))
}

/// Sums the Collector's throughput counters over every data point (every receiver, exporter
/// and transport), keeping cumulative and delta sums apart, and the exporters' queue sizes.
pub(crate) fn figures_of(req: &ExportMetricsServiceRequest) -> Figures {
    let mut f = Figures::default();
    let value = |p: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint| match p.value {
        Some(number_data_point::Value::AsDouble(d)) if d.is_finite() => d,
        Some(number_data_point::Value::AsInt(i)) => i as f64,
        _ => 0.0,
    };
    let metrics = req
        .resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics);
    for m in metrics {
        match (&m.data, counter_of(&m.name)) {
            (Some(metric::Data::Sum(sum)), Some(slot)) => {
                let delta = sum.aggregation_temporality == AggregationTemporality::Delta as i32;
                let total: f64 = sum.data_points.iter().map(value).sum();
                if delta {
                    f.delta[slot] += total;
                } else {
                    f.cumulative[slot] += total;
                }
                f.present[slot] = true;
            }
            (Some(metric::Data::Gauge(g)), None) if is_queue_size(&m.name) => {
                let q: f64 = g.data_points.iter().map(value).sum();
                *f.queue_size.get_or_insert(0.0) += q;
            }
            _ => {}
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::metrics::v1::{
        Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    };
    use shared::own_telemetry::{slot, Flow, Signal};

    fn point(v: i64) -> NumberDataPoint {
        NumberDataPoint {
            value: Some(number_data_point::Value::AsInt(v)),
            ..Default::default()
        }
    }

    fn sum(name: &str, temporality: AggregationTemporality, values: &[i64]) -> Metric {
        Metric {
            name: name.into(),
            data: Some(metric::Data::Sum(Sum {
                data_points: values.iter().map(|v| point(*v)).collect(),
                aggregation_temporality: temporality as i32,
                is_monotonic: true,
            })),
            ..Default::default()
        }
    }

    fn export(metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                scope_metrics: vec![ScopeMetrics {
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn a_collectors_counters_are_summed_per_signal_and_flow() {
        let req = export(vec![
            // Two receivers.
            sum(
                "otelcol_receiver_accepted_spans",
                AggregationTemporality::Cumulative,
                &[100, 23],
            ),
            sum(
                "otelcol_exporter_send_failed_log_records",
                AggregationTemporality::Delta,
                &[4],
            ),
            sum(
                "otelcol_process_cpu_seconds",
                AggregationTemporality::Cumulative,
                &[9],
            ),
            Metric {
                name: "otelcol_exporter_queue_size".into(),
                data: Some(metric::Data::Gauge(Gauge {
                    data_points: vec![point(5), point(7)],
                })),
                ..Default::default()
            },
        ]);
        let f = figures_of(&req);
        let accepted = slot(Signal::Traces, Flow::Accepted);
        let failed = slot(Signal::Logs, Flow::Failed);
        assert_eq!(f.cumulative[accepted], 123.0);
        assert_eq!(f.delta[failed], 4.0);
        assert!(f.present[accepted] && f.present[failed]);
        assert_eq!(f.present.iter().filter(|p| **p).count(), 2);
        assert_eq!(f.queue_size, Some(12.0));
    }

    #[test]
    fn one_export_per_agent_per_interval() {
        let turns = Turns::default();
        let (a, b) = (InstanceUid([1; 16]), InstanceUid([2; 16]));
        let t0 = Instant::now();
        assert!(turns.take(a, t0));
        assert!(!turns.take(a, t0 + MIN_INTERVAL / 2), "too soon");
        assert!(turns.take(b, t0), "another agent has its own turn");
        assert!(turns.take(a, t0 + MIN_INTERVAL));
        for i in 0..SWEEP_AT as u32 + 1 {
            let mut uid = [0u8; 16];
            uid[..4].copy_from_slice(&i.to_be_bytes());
            uid[15] = 9;
            turns.take(InstanceUid(uid), t0);
        }
        turns.take(a, t0 + MIN_INTERVAL * 3);
        let kept = turns.0.lock().map(|m| m.len()).unwrap_or(0);
        assert!(kept <= 2, "old turns swept: {kept} kept");
    }

    #[test]
    fn bodies_are_bounded_and_checked() {
        let req = export(vec![sum(
            "otelcol_exporter_sent_metric_points",
            AggregationTemporality::Cumulative,
            &[10],
        )]);
        let plain = req.encode_to_vec();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &plain).expect("gzip");
        let gz = gz.finish().expect("gzip");
        assert_eq!(
            decode(&plain, false).map(|f| f.cumulative),
            decode(&gz, true).map(|f| f.cumulative)
        );
        assert_eq!(decode(&plain, true).map_err(|e| e.0), Err("malformed"));
        assert_eq!(
            decode(b"\xff\xff\xff", false).map_err(|e| e.0),
            Err("malformed")
        );
        // A gzip bomb: small on the wire, far over the limit once inflated.
        let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut bomb, &vec![0u8; MAX_INFLATED + 1024]).expect("gzip");
        let bomb = bomb.finish().expect("gzip");
        assert!(bomb.len() < MAX_BODY);
        assert_eq!(decode(&bomb, true).map_err(|e| e.0), Err("too_large"));
    }
}
