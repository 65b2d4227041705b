//! Agents' own telemetry (OpAMP `own_metrics`, `own_traces`, `own_logs`, facts §3.5): where a
//! group's agents are told to send it ([`TelemetrySettings`]), the per-agent credential for
//! Ampora's own metrics endpoint ([`MetricsCredential`]), the throughput figures a gateway
//! reads out of one OTLP export ([`Figures`]), and the bounded rolling window of them kept on
//! each agent's record ([`Throughput`]).
//!
//! Pure: no I/O, no clock. The gateway decodes OTLP into [`Figures`]; the coordinator that
//! owns the agent folds them into its [`Throughput`].

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::download_token::DownloadKey;
use crate::ids::InstanceUid;

/// The path of Ampora's own-metrics endpoint on the agent listener (OTLP/HTTP's own path).
pub const METRICS_PATH: &str = "/v1/metrics";

/// Points kept per agent: one per minute, an hour.
pub const WINDOW_POINTS: usize = 60;

const MINUTE_MS: i64 = 60_000;

/// One destination for an agent's own telemetry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Destination {
    /// The full OTLP/HTTP URL, path included (`https://otel.example:4318/v1/metrics`).
    /// Empty with `ampora`.
    #[serde(default)]
    pub endpoint: String,
    /// Headers the agent sends with every export (an API key, say).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// PEM of the CA the agent should trust for `endpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// Ampora itself (own metrics only): this server's metrics endpoint, with a credential
    /// for the one agent in the headers.
    #[serde(default)]
    pub ampora: bool,
}

/// A group's own-telemetry settings: each signal offered to the group's agents that declare
/// they report it (ReportsOwnMetrics / ReportsOwnTraces / ReportsOwnLogs).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TelemetrySettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Destination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traces: Option<Destination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<Destination>,
}

/// Longest endpoint, header name or value, or CA accepted in settings.
const MAX_FIELD: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;

impl TelemetrySettings {
    pub fn is_empty(&self) -> bool {
        self.metrics.is_none() && self.traces.is_none() && self.logs.is_none()
    }

    /// Why these settings cannot be offered, if they cannot.
    pub fn problem(&self) -> Option<String> {
        for (signal, d) in [
            ("metrics", &self.metrics),
            ("traces", &self.traces),
            ("logs", &self.logs),
        ] {
            let Some(d) = d else { continue };
            if d.ampora {
                if signal != "metrics" {
                    return Some(format!(
                        "{signal}: Ampora can be the destination of own metrics only"
                    ));
                }
                if !d.endpoint.is_empty() {
                    return Some("metrics: give `endpoint` or `ampora`, not both".into());
                }
            } else {
                let e = d.endpoint.to_ascii_lowercase();
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    return Some(format!(
                        "{signal}: `endpoint` must be an http:// or https:// OTLP/HTTP URL"
                    ));
                }
            }
            if d.headers.len() > MAX_HEADERS {
                return Some(format!("{signal}: at most {MAX_HEADERS} headers"));
            }
            let fields = d
                .headers
                .iter()
                .flat_map(|(k, v)| [k, v])
                .chain([&d.endpoint])
                .chain(d.ca_pem.as_ref());
            for f in fields {
                if f.len() > MAX_FIELD || f.chars().any(|c| c.is_control() && c != '\n') {
                    return Some(format!(
                        "{signal}: fields must be text without control characters, at most {MAX_FIELD} bytes"
                    ));
                }
            }
            if d.headers.keys().any(|k| k.is_empty() || k.contains(':')) {
                return Some(format!("{signal}: a header name is empty or has a colon"));
            }
        }
        None
    }
}

const CREDENTIAL_PREFIX: &str = "amp-om.";

/// The credential an agent presents to Ampora's metrics endpoint:
/// `amp-om.<uid hex>.<HMAC-SHA256 hex>`, under the key gateways and coordinators share (the
/// download key). It names the one agent; any change to it fails the MAC. It does not
/// expire: it lives in the agent's telemetry settings as long as the offer does.
pub struct MetricsCredential;

impl MetricsCredential {
    pub fn mint(key: &DownloadKey, uid: InstanceUid) -> String {
        let body = format!("{CREDENTIAL_PREFIX}{}", hex::encode(uid.as_bytes()));
        format!("{body}.{}", hex::encode(key.sign(&body)))
    }

    /// The agent `token` names, if it was minted under `key`.
    pub fn verify(key: &DownloadKey, token: &str) -> Option<InstanceUid> {
        let (body, mac) = token.rsplit_once('.')?;
        let uid = body.strip_prefix(CREDENTIAL_PREFIX)?;
        let uid = InstanceUid::from_slice(&hex::decode(uid).ok()?)?;
        key.verify_signed(body, &hex::decode(mac).ok()?)
            .then_some(uid)
    }
}

/// What the figures count, per signal: items accepted and refused by the Collector's
/// receivers, and sent and failed (send or enqueue) by its exporters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Accepted = 0,
    Refused = 1,
    Sent = 2,
    Failed = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Traces = 0,
    Metrics = 1,
    Logs = 2,
}

impl Signal {
    pub const ALL: [Self; 3] = [Self::Traces, Self::Metrics, Self::Logs];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Traces => "traces",
            Self::Metrics => "metrics",
            Self::Logs => "logs",
        }
    }
}

/// Counters: 3 signals × 4 flows.
pub const COUNTERS: usize = 12;

/// Where a counter sits in the 12.
pub fn slot(signal: Signal, flow: Flow) -> usize {
    signal as usize * 4 + flow as usize
}

/// Which counter a Collector internal metric feeds (`otelcol_receiver_accepted_spans`, with
/// or without the `otelcol_` prefix or a Prometheus `_total`, dots or underscores), if any.
pub fn counter_of(metric_name: &str) -> Option<usize> {
    let name = metric_name.replace('.', "_");
    let name = name.strip_prefix("otelcol_").unwrap_or(&name);
    let name = name.strip_suffix("_total").unwrap_or(name);
    let (flow, item) = if let Some(r) = name.strip_prefix("receiver_accepted_") {
        (Flow::Accepted, r)
    } else if let Some(r) = name.strip_prefix("receiver_refused_") {
        (Flow::Refused, r)
    } else if let Some(r) = name.strip_prefix("exporter_sent_") {
        (Flow::Sent, r)
    } else if let Some(r) = name
        .strip_prefix("exporter_send_failed_")
        .or_else(|| name.strip_prefix("exporter_enqueue_failed_"))
    {
        (Flow::Failed, r)
    } else {
        return None;
    };
    let signal = match item {
        "spans" => Signal::Traces,
        "metric_points" => Signal::Metrics,
        "log_records" => Signal::Logs,
        _ => return None,
    };
    Some(slot(signal, flow))
}

/// Whether a metric is the exporters' queue size gauge.
pub fn is_queue_size(metric_name: &str) -> bool {
    let name = metric_name.replace('.', "_");
    let name = name.strip_prefix("otelcol_").unwrap_or(&name);
    name == "exporter_queue_size"
}

/// The throughput figures of one OTLP export, summed over every receiver and exporter:
/// cumulative sums (the Collector's default) and delta sums kept apart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    pub cumulative: [f64; COUNTERS],
    pub delta: [f64; COUNTERS],
    /// Which counters the export had at all (cumulative or delta).
    pub present: [bool; COUNTERS],
    /// Items queued in all exporters, if reported.
    pub queue_size: Option<f64>,
}

impl Figures {
    /// True when the export carried none of the figures Ampora keeps.
    pub fn is_empty(&self) -> bool {
        !self.present.iter().any(|p| *p) && self.queue_size.is_none()
    }
}

/// One minute of an agent's throughput: items per flow and signal counted in that minute,
/// and the exporters' queue size last reported in it. Serialised as one array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<i64>", into = "Vec<i64>")]
pub struct Point {
    /// Unix minute (ms / 60,000).
    pub minute: i64,
    pub counts: [u32; COUNTERS],
    pub queue: u32,
}

impl Point {
    fn flow(&self, flow: Flow) -> u64 {
        Signal::ALL
            .iter()
            .map(|s| u64::from(self.counts[slot(*s, flow)]))
            .sum()
    }

    /// Items the receivers accepted, all signals.
    pub fn accepted(&self) -> u64 {
        self.flow(Flow::Accepted)
    }

    pub fn sent(&self) -> u64 {
        self.flow(Flow::Sent)
    }

    /// Refused by receivers plus failed by exporters: data lost or pushed back.
    pub fn dropped(&self) -> u64 {
        self.flow(Flow::Refused) + self.flow(Flow::Failed)
    }
}

impl From<Vec<i64>> for Point {
    fn from(v: Vec<i64>) -> Self {
        let at = |i: usize| {
            v.get(i)
                .map_or(0, |x| u32::try_from((*x).max(0)).unwrap_or(u32::MAX))
        };
        Point {
            minute: v.first().copied().unwrap_or_default(),
            counts: std::array::from_fn(|i| at(i + 1)),
            queue: at(COUNTERS + 1),
        }
    }
}

impl From<Point> for Vec<i64> {
    fn from(p: Point) -> Self {
        std::iter::once(p.minute)
            .chain(p.counts.iter().map(|c| i64::from(*c)))
            .chain([i64::from(p.queue)])
            .collect()
    }
}

/// Per-second rates over the interval between an agent's last two exports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Rates {
    /// Items accepted by receivers per second.
    pub in_per_s: f64,
    /// Items sent by exporters per second.
    pub out_per_s: f64,
    /// Items refused by receivers or failed by exporters per second.
    pub dropped_per_s: f64,
}

/// An agent's own-metrics window: the last [`WINDOW_POINTS`] minutes and the latest rates.
/// About 60 × 64 bytes at most, whatever the agent sends.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// Cumulative totals of the last export, to difference the next one against.
    #[serde(default)]
    pub totals: Vec<f64>,
    /// When the last export arrived (Unix ms); 0 before the first.
    pub last_ms: i64,
    pub rates: Rates,
    /// Oldest first, at most one per minute and none older than the window. Not part of the
    /// record's JSON: the store keeps them apart (`agents.throughput`), so views of many
    /// agents read the rates without them.
    #[serde(skip)]
    pub points: VecDeque<Point>,
}

impl Throughput {
    /// Folds one export received at `now_ms` in. A cumulative counter that went down was
    /// reset (the Collector restarted): its new value is what was counted since. The first
    /// export only sets the baseline of cumulative counters. Returns true when a new minute
    /// began.
    pub fn record(&mut self, f: &Figures, now_ms: i64) -> bool {
        let first = self.last_ms == 0;
        self.totals.resize(COUNTERS, 0.0);
        let mut counted = [0f64; COUNTERS];
        for (i, (n, total)) in counted.iter_mut().zip(&mut self.totals).enumerate() {
            if !f.present[i] {
                continue;
            }
            let cum = f.cumulative[i];
            let since = if cum >= *total { cum - *total } else { cum };
            *n = f.delta[i] + if first { 0.0 } else { since };
            *total = cum;
        }
        let secs = (now_ms - self.last_ms) as f64 / 1000.0;
        if !first && secs > 0.0 {
            let sum = |flows: &[Flow]| -> f64 {
                Signal::ALL
                    .iter()
                    .flat_map(|s| flows.iter().map(move |fl| counted[slot(*s, *fl)]))
                    .sum()
            };
            self.rates = Rates {
                in_per_s: sum(&[Flow::Accepted]) / secs,
                out_per_s: sum(&[Flow::Sent]) / secs,
                dropped_per_s: sum(&[Flow::Refused, Flow::Failed]) / secs,
            };
        }
        self.last_ms = now_ms;
        let minute = now_ms.div_euclid(MINUTE_MS);
        let began = self.points.back().is_none_or(|p| p.minute != minute);
        if began {
            self.points.push_back(Point {
                minute,
                counts: [0; COUNTERS],
                queue: 0,
            });
        }
        if let Some(p) = self.points.back_mut() {
            for (c, n) in p.counts.iter_mut().zip(counted) {
                *c = c.saturating_add(clamp_u32(n));
            }
            if let Some(q) = f.queue_size {
                p.queue = clamp_u32(q);
            }
        }
        while self
            .points
            .front()
            .is_some_and(|p| p.minute <= minute - WINDOW_POINTS as i64)
        {
            self.points.pop_front();
        }
        began
    }

    /// The rates, if the last export is recent (within three minutes of `now_ms`): an agent
    /// that stopped reporting shows none rather than stale ones.
    pub fn current(&self, now_ms: i64) -> Option<Rates> {
        (self.last_ms > 0 && now_ms - self.last_ms <= 3 * MINUTE_MS).then_some(self.rates)
    }

    /// Whether the agent is dropping data now.
    pub fn drops(&self, now_ms: i64) -> bool {
        self.current(now_ms).is_some_and(|r| r.dropped_per_s > 0.0)
    }
}

fn clamp_u32(x: f64) -> u32 {
    if x.is_nan() || x <= 0.0 {
        0
    } else if x >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        x.round() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(accepted: f64, sent: f64, failed: f64) -> Figures {
        let mut f = Figures::default();
        for (i, v) in [
            (slot(Signal::Traces, Flow::Accepted), accepted),
            (slot(Signal::Traces, Flow::Sent), sent),
            (slot(Signal::Traces, Flow::Failed), failed),
        ] {
            f.cumulative[i] = v;
            f.present[i] = true;
        }
        f
    }

    #[test]
    fn collector_metric_names_map_to_their_counter() {
        assert_eq!(
            counter_of("otelcol_receiver_accepted_spans"),
            Some(slot(Signal::Traces, Flow::Accepted))
        );
        assert_eq!(
            counter_of("otelcol_exporter_send_failed_log_records_total"),
            Some(slot(Signal::Logs, Flow::Failed))
        );
        assert_eq!(
            counter_of("otelcol.exporter.sent.metric_points"),
            Some(slot(Signal::Metrics, Flow::Sent))
        );
        assert_eq!(
            counter_of("exporter_enqueue_failed_metric_points"),
            Some(slot(Signal::Metrics, Flow::Failed))
        );
        assert_eq!(counter_of("otelcol_process_uptime"), None);
        assert!(is_queue_size("otelcol_exporter_queue_size"));
        assert!(!is_queue_size("otelcol_exporter_queue_capacity"));
    }

    #[test]
    fn cumulative_counters_become_rates_and_minutes() {
        let mut t = Throughput::default();
        let t0 = 10 * MINUTE_MS;
        assert!(t.record(&figures(1_000.0, 900.0, 0.0), t0));
        assert_eq!(
            t.points[0].accepted(),
            0,
            "the first export is the baseline"
        );
        assert_eq!(t.current(t0).map(|r| r.in_per_s), Some(0.0));
        // 30 s later: 600 more accepted, 600 more sent, 30 failed.
        assert!(!t.record(&figures(1_600.0, 1_500.0, 30.0), t0 + 30_000));
        let r = t.current(t0 + 30_000).expect("recent");
        assert_eq!(
            (r.in_per_s, r.out_per_s, r.dropped_per_s),
            (20.0, 20.0, 1.0)
        );
        assert!(t.drops(t0 + 30_000));
        assert_eq!((t.points[0].accepted(), t.points[0].dropped()), (600, 30));
        // A reset: the Collector restarted and counts from 0 again.
        assert!(t.record(&figures(50.0, 50.0, 30.0), t0 + MINUTE_MS));
        assert_eq!(t.points.len(), 2);
        assert_eq!(t.points[1].accepted(), 50);
        assert_eq!(t.points[1].dropped(), 0, "the failures did not change");
        assert!(!t.drops(t0 + MINUTE_MS));
        assert!(t.current(t0 + 5 * MINUTE_MS).is_none(), "stale");
    }

    #[test]
    fn the_window_keeps_an_hour_whatever_is_sent() {
        let mut t = Throughput::default();
        let mut f = figures(0.0, 0.0, 0.0);
        f.present[1] = true;
        let start = 1_000 * MINUTE_MS;
        for m in 0..500i64 {
            f.cumulative[0] = (m * 1_000_000_000) as f64;
            f.delta[1] = f64::MAX;
            f.queue_size = Some(-5.0);
            t.record(&f, start + m * MINUTE_MS);
        }
        assert_eq!(t.points.len(), WINDOW_POINTS);
        assert_eq!(t.points.front().map(|p| p.minute), Some(1_440));
        assert_eq!(
            t.points.back().map(|p| p.counts[0]),
            Some(1_000_000_000),
            "a minute's count is what it grew by"
        );
        assert_eq!(t.points.back().map(|p| p.counts[1]), Some(u32::MAX));
        assert_eq!(t.points.back().map(|p| p.queue), Some(0));
        let mut round: Throughput =
            serde_json::from_str(&serde_json::to_string(&t).expect("json")).expect("back");
        assert!(round.points.is_empty(), "the points travel apart");
        round.points = serde_json::from_str(&serde_json::to_string(&t.points).expect("json"))
            .expect("points back");
        assert_eq!(round, t);
    }

    #[test]
    fn a_credential_names_one_agent_under_one_key() {
        let key = DownloadKey::new([7; 32]);
        let a = InstanceUid::from_slice(&[1; 16]).expect("uid");
        let b = InstanceUid::from_slice(&[2; 16]).expect("uid");
        let t = MetricsCredential::mint(&key, a);
        assert_eq!(MetricsCredential::verify(&key, &t), Some(a));
        let forged = t.replacen(&hex::encode([1u8; 16]), &hex::encode([2u8; 16]), 1);
        assert_eq!(MetricsCredential::verify(&key, &forged), None);
        let other_key = DownloadKey::new([8; 32]);
        assert_eq!(MetricsCredential::verify(&other_key, &t), None);
        assert_eq!(
            MetricsCredential::verify(&key, &MetricsCredential::mint(&key, b)),
            Some(b)
        );
        assert_eq!(MetricsCredential::verify(&key, "amp-bs.abc.123"), None);
    }

    #[test]
    fn settings_are_checked_before_they_are_offered() {
        let ampora = Destination {
            ampora: true,
            ..Default::default()
        };
        let ok = TelemetrySettings {
            metrics: Some(ampora.clone()),
            ..Default::default()
        };
        assert_eq!(ok.problem(), None);
        let traces_to_ampora = TelemetrySettings {
            traces: Some(ampora),
            ..Default::default()
        };
        assert!(traces_to_ampora.problem().is_some());
        let bad_url = TelemetrySettings {
            logs: Some(Destination {
                endpoint: "ftp://x".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(bad_url.problem().is_some());
    }
}
