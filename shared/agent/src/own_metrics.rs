//! The agent's own metrics, sent where the server's `own_metrics` offer says as a Collector
//! sends its internal telemetry: OTLP/HTTP protobuf, the throughput counters under the
//! Collector's names as cumulative sums, and the exporters' queue size as a gauge.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum,
};
use proto::Message as _;

use crate::error::ClientError;
use crate::http::HttpTransport;
use crate::options::OwnTelemetryOffer;
use crate::tls::ClientTls;

/// A Collector's throughput since it started, per signal (traces, metrics, logs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CollectorCounters {
    pub accepted: [u64; 3],
    pub refused: [u64; 3],
    pub sent: [u64; 3],
    pub failed: [u64; 3],
    pub queue_size: u64,
}

const ITEMS: [&str; 3] = ["spans", "metric_points", "log_records"];

fn point(v: u64, component: (&str, &str)) -> NumberDataPoint {
    NumberDataPoint {
        attributes: vec![KeyValue {
            key: component.0.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(component.1.into())),
            }),
            ..Default::default()
        }],
        value: Some(number_data_point::Value::AsInt(
            i64::try_from(v).unwrap_or(i64::MAX),
        )),
        ..Default::default()
    }
}

/// The export a Collector would send with these counters.
pub fn export_request(c: &CollectorCounters) -> ExportMetricsServiceRequest {
    let mut metrics = Vec::new();
    for (flow, values, component) in [
        ("receiver_accepted", c.accepted, ("receiver", "otlp")),
        ("receiver_refused", c.refused, ("receiver", "otlp")),
        ("exporter_sent", c.sent, ("exporter", "otlphttp")),
        ("exporter_send_failed", c.failed, ("exporter", "otlphttp")),
    ] {
        for (item, v) in ITEMS.iter().zip(values) {
            metrics.push(Metric {
                name: format!("otelcol_{flow}_{item}"),
                data: Some(metric::Data::Sum(Sum {
                    data_points: vec![point(v, component)],
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                })),
                ..Default::default()
            });
        }
    }
    metrics.push(Metric {
        name: "otelcol_exporter_queue_size".into(),
        data: Some(metric::Data::Gauge(Gauge {
            data_points: vec![point(c.queue_size, ("exporter", "otlphttp"))],
        })),
        ..Default::default()
    });
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

/// POSTs `counters` to the offered endpoint with the offered headers (`tls` for
/// `https://`, else the offer's CA). Returns the HTTP status.
pub async fn export(
    offer: &OwnTelemetryOffer,
    counters: &CollectorCounters,
    tls: Option<ClientTls>,
) -> Result<u16, ClientError> {
    let tls = match (tls, &offer.ca_pem) {
        (Some(t), _) => Some(t),
        (None, Some(ca)) => {
            Some(ClientTls::from_ca_pem(ca).map_err(|e| ClientError::Protocol(e.to_string()))?)
        }
        (None, None) => None,
    };
    let mut client =
        HttpTransport::new(&offer.endpoint, offer.headers.clone(), false).with_tls(tls);
    let body = export_request(counters).encode_to_vec();
    let content_type = [(
        "Content-Type".to_owned(),
        "application/x-protobuf".to_owned(),
    )];
    let (status, _) = client.post_raw(body, &content_type).await?;
    Ok(status)
}
