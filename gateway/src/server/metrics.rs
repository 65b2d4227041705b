//! The gateway's own metrics: their names, [`describe`] (descriptions and zeroed series), and
//! the helpers that count frames, refusals, dropped deliveries and open connections. The
//! latency histograms live in `latency`, the proxy's counters in `proxy`.

use shared::domain::Transport;

use super::admission::{Refusal, REFUSAL_REASONS};

// Metric names (see `describe`).
const FRAMES_RECEIVED: &str = "ampora_opamp_frames_received_total";
const FRAMES_SENT: &str = "ampora_opamp_frames_sent_total";
const FRAMES_REJECTED: &str = "ampora_opamp_frames_rejected_total";
const CONNECTIONS: &str = "ampora_opamp_connections";
const DELIVERIES_DROPPED: &str = "ampora_gateway_deliveries_dropped_total";
const ADMISSION_REFUSED: &str = "ampora_gateway_admission_refused_total";
const ADMISSION_MAX_CONNECTIONS: &str = "ampora_gateway_admission_max_connections";
const UNTRUSTED_CERT_HEADER: &str = "ampora_gateway_untrusted_cert_header_total";

/// Every `reason` of `ampora_opamp_frames_rejected_total` (cap_mismatch is counted by the
/// coordinator, the others here).
const REJECT_REASONS: [&str; 6] = [
    "oversize",
    "malformed",
    "cap_mismatch",
    "auth_failed",
    "too_many_fields",
    "memory_budget",
];
const DROP_REASONS: [&str; 3] = ["stale", "queue_full", "gone"];

/// Registers descriptions for the metrics named here and creates their bounded-label series at
/// zero, so dashboards and alerts see them before the first event.
pub(super) fn describe() {
    metrics::describe_counter!(
        FRAMES_RECEIVED,
        "OpAMP AgentToServer messages received, by transport (ws, http)"
    );
    metrics::describe_counter!(
        FRAMES_SENT,
        "OpAMP ServerToAgent messages sent, by transport (ws, http)"
    );
    metrics::describe_counter!(
        FRAMES_REJECTED,
        "OpAMP messages or requests refused, by reason (oversize, malformed, cap_mismatch, auth_failed, too_many_fields, memory_budget)"
    );
    metrics::describe_gauge!(CONNECTIONS, "Open OpAMP WebSocket connections");
    metrics::describe_counter!(
        DELIVERIES_DROPPED,
        "Coordinator deliveries the gateway dropped, by reason (stale, queue_full, gone)"
    );
    metrics::describe_counter!(
        ADMISSION_REFUSED,
        "Connections and requests refused before the upgrade, by reason (connection_cap: 503; rate, ip_connection_cap, credential_connection_cap, ip_rate: 429)"
    );
    metrics::describe_gauge!(
        ADMISSION_MAX_CONNECTIONS,
        "This gateway's cap on open WebSocket connections (0: unlimited)"
    );
    for reason in REFUSAL_REASONS {
        metrics::counter!(ADMISSION_REFUSED, "reason" => reason).increment(0);
    }
    for reason in REJECT_REASONS {
        metrics::counter!(FRAMES_REJECTED, "reason" => reason).increment(0);
    }
    for reason in DROP_REASONS {
        metrics::counter!(DELIVERIES_DROPPED, "reason" => reason).increment(0);
    }
    metrics::gauge!(CONNECTIONS, "transport" => "ws").increment(0.0);
    metrics::describe_counter!(
        UNTRUSTED_CERT_HEADER,
        "Requests carrying the client-certificate header from an address that is not a trusted proxy (header ignored)"
    );
    metrics::counter!(UNTRUSTED_CERT_HEADER).increment(0);
}

pub(super) fn count_rejected(reason: &'static str) {
    metrics::counter!(FRAMES_REJECTED, "reason" => reason).increment(1);
}

pub(super) fn count_dropped(reason: &'static str) {
    metrics::counter!(DELIVERIES_DROPPED, "reason" => reason).increment(1);
}

pub(super) fn transport_label(t: Transport) -> &'static str {
    match t {
        Transport::WebSocket => "ws",
        Transport::Http => "http",
    }
}

pub(super) fn count_received(t: Transport) {
    metrics::counter!(FRAMES_RECEIVED, "transport" => transport_label(t)).increment(1);
}

pub(super) fn count_sent(t: Transport) {
    metrics::counter!(FRAMES_SENT, "transport" => transport_label(t)).increment(1);
}

pub(super) fn count_admission_refused(refusal: Refusal) {
    metrics::counter!(ADMISSION_REFUSED, "reason" => refusal.reason()).increment(1);
}

/// Shows the cap next to `ampora_opamp_connections`, so "how close to full" is a ratio.
pub(super) fn set_max_connections(max_connections: usize) {
    metrics::gauge!(ADMISSION_MAX_CONNECTIONS).set(max_connections as f64);
}

/// A WebSocket connection entered the registry.
pub(super) fn ws_connection_opened() {
    metrics::gauge!(CONNECTIONS, "transport" => "ws").increment(1.0);
}

/// A WebSocket connection left the registry.
pub(super) fn ws_connection_closed() {
    metrics::gauge!(CONNECTIONS, "transport" => "ws").decrement(1.0);
}

/// A client-certificate header from an address that is not an authenticated proxy (ignored).
pub(super) fn count_untrusted_cert_header() {
    metrics::counter!(UNTRUSTED_CERT_HEADER).increment(1);
}
