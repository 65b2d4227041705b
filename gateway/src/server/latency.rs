//! The gateway's latency histograms: a bus request to its reply, and an OpAMP message to the
//! reply written to its agent. One `Instant` and one record each, so the hot path stays cheap.

use std::time::Instant;

use shared::bus::{Bus, BusError, CoordinatorReply, CoordinatorRequest, Route};
use shared::domain::Transport;

use super::metrics::transport_label;

pub const BUS_REQUEST_DURATION: &str = "ampora_bus_request_duration_seconds";
pub const OPAMP_MESSAGE_DURATION: &str = "ampora_opamp_message_duration_seconds";

pub(super) fn describe_metrics() {
    metrics::describe_histogram!(
        BUS_REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time from sending a bus request to its reply, by kind (authenticate, frame, \
         revoked_serials) and outcome (ok, error, timeout: the bus or the caller gave up waiting)"
    );
    metrics::describe_histogram!(
        OPAMP_MESSAGE_DURATION,
        metrics::Unit::Seconds,
        "Time from an AgentToServer received by the gateway to its ServerToAgent written \
         (ws) or handed to the HTTP server (http), by transport"
    );
}

fn kind(req: &CoordinatorRequest) -> &'static str {
    match req {
        CoordinatorRequest::Authenticate(_) => "authenticate",
        CoordinatorRequest::Frame(_) => "frame",
        CoordinatorRequest::RevokedSerials => "revoked_serials",
        CoordinatorRequest::BlobChunk { .. } => "blob_chunk",
    }
}

/// Records on drop, so a request its caller stops waiting for (a timeout drops the future)
/// is still measured, as `timeout`.
struct Pending {
    kind: &'static str,
    started: Instant,
    outcome: &'static str,
}

impl Drop for Pending {
    fn drop(&mut self) {
        metrics::histogram!(BUS_REQUEST_DURATION, "kind" => self.kind, "outcome" => self.outcome)
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// `bus.request(route, req)`, timed in [`BUS_REQUEST_DURATION`].
pub(super) async fn bus_request(
    bus: &dyn Bus,
    route: Route,
    req: CoordinatorRequest,
) -> Result<CoordinatorReply, BusError> {
    let mut pending = Pending {
        kind: kind(&req),
        started: Instant::now(),
        outcome: "timeout",
    };
    let res = bus.request(route, req).await;
    pending.outcome = match &res {
        Ok(_) => "ok",
        Err(BusError::Timeout) => "timeout",
        Err(_) => "error",
    };
    res
}

/// Records one message's round trip: `started` is when the whole message had been read.
pub(super) fn observe_message(t: Transport, started: Instant) {
    metrics::histogram!(OPAMP_MESSAGE_DURATION, "transport" => transport_label(t))
        .record(started.elapsed().as_secs_f64());
}
