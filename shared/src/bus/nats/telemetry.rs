//! The bus's metrics: their names, their descriptions and the bounded label values created at
//! zero, plus the counting helpers every other part of the NATS bus calls. A leaf: it knows
//! the metric names and nothing else, so sending, receiving and buffering code can all count
//! without depending on one another.

// Metric names (see `describe_metrics`).
pub(super) const SENT: &str = "ampora_bus_messages_sent_total";
pub(super) const RECEIVED: &str = "ampora_bus_messages_received_total";
pub(super) const DROPPED: &str = "ampora_bus_messages_dropped_total";
pub(super) const REQUESTS: &str = "ampora_bus_requests_total";
pub(super) const CHUNKED: &str = "ampora_bus_chunked_messages_total";
pub(super) const BUFFERED: &str = "ampora_bus_buffered_bytes";
pub(super) const ENVELOPES: &str = "ampora_bus_envelopes_per_message";

const KINDS: [&str; 5] = ["request", "reply", "event", "delivery", "control"];
const DROP_REASONS: [&str; 8] = [
    "malformed",
    "incomplete_chunks",
    "too_large",
    "buffer_full",
    "unfetched",
    "pull_failed",
    "queue_full",
    "slow_consumer",
];
const OUTCOMES: [&str; 5] = ["ok", "no_responder", "timeout", "too_large", "error"];

/// Registers descriptions for the bus metrics and creates the bounded-label series at zero, so
/// dashboards and alerts see them before the first event. Called by `NatsBus::connect`.
pub fn describe_metrics() {
    metrics::describe_counter!(
        SENT,
        "Logical bus messages sent, by kind (request, reply, event, delivery, control)"
    );
    metrics::describe_counter!(
        RECEIVED,
        "Logical bus messages received and decoded, by kind (request, reply, event, delivery, control)"
    );
    metrics::describe_counter!(
        DROPPED,
        "Bus messages dropped, by reason (malformed, incomplete_chunks, too_large, buffer_full, unfetched, pull_failed, queue_full, slow_consumer)"
    );
    metrics::describe_counter!(
        REQUESTS,
        "Bus requests sent, by outcome (ok, no_responder, timeout, too_large, error)"
    );
    metrics::describe_counter!(
        CHUNKED,
        "Logical bus messages larger than the NATS payload limit, by direction (sent, received)"
    );
    metrics::describe_gauge!(
        BUFFERED,
        metrics::Unit::Bytes,
        "Bytes of large bus messages held, by buffer (reassembly, outbox)"
    );
    metrics::describe_histogram!(
        ENVELOPES,
        "Bus envelopes per NATS message published while coalescing, by lane (coordinator, reply, delivery)"
    );
    for kind in KINDS {
        metrics::counter!(SENT, "kind" => kind).increment(0);
        metrics::counter!(RECEIVED, "kind" => kind).increment(0);
    }
    for reason in DROP_REASONS {
        metrics::counter!(DROPPED, "reason" => reason).increment(0);
    }
    for outcome in OUTCOMES {
        metrics::counter!(REQUESTS, "outcome" => outcome).increment(0);
    }
    for direction in ["sent", "received"] {
        metrics::counter!(CHUNKED, "direction" => direction).increment(0);
    }
    for buffer in ["reassembly", "outbox"] {
        metrics::gauge!(BUFFERED, "buffer" => buffer).set(0.0);
    }
}

pub(super) fn count_sent(kind: &'static str) {
    metrics::counter!(SENT, "kind" => kind).increment(1);
}

pub(super) fn count_received(kind: &'static str) {
    metrics::counter!(RECEIVED, "kind" => kind).increment(1);
}

pub(super) fn count_dropped(reason: &'static str) {
    metrics::counter!(DROPPED, "reason" => reason).increment(1);
}

/// One NATS message published by a lane of `lane` kind, carrying `envelopes` envelopes.
pub(super) fn record_envelopes(lane: &'static str, envelopes: usize) {
    metrics::histogram!(ENVELOPES, "lane" => lane).record(envelopes as f64);
}
