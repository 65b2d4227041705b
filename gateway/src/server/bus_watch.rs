//! Losing the bus. Every frame a gateway answers is a bus request, so a gateway cut off from
//! NATS cannot serve its agents. It says so at once: readiness fails (balancers stop sending
//! agents here) and new upgrades get 503. Once the outage has lasted `bus_lost_drain` it
//! closes its agents with 1001 (going away) so they reconnect through a gateway that can
//! serve them. A shorter outage, such as a NATS restart, keeps the sockets; their messages
//! are answered Unavailable with retry info meanwhile.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use super::Inner;

/// How often the bus's connection state is looked at: well under any useful drain delay.
const CHECK_EVERY: Duration = Duration::from_millis(250);

const BUS_CONNECTED: &str = "ampora_gateway_bus_connected";
const BUS_LOST_CLOSES: &str = "ampora_gateway_bus_lost_closes_total";

pub(super) fn describe() {
    metrics::describe_gauge!(
        BUS_CONNECTED,
        "1 while this gateway's bus (NATS) connection is up, 0 while it is lost"
    );
    metrics::describe_counter!(
        BUS_LOST_CLOSES,
        "Agent connections closed because the bus stayed lost longer than cluster.bus_lost_drain_secs"
    );
    metrics::counter!(BUS_LOST_CLOSES).increment(0);
}

/// Runs for the gateway's life (aborted with it).
pub(super) async fn watch(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut lost_since: Option<Instant> = None;
    loop {
        tick.tick().await;
        let up = inner.bus.is_connected();
        inner.bus_lost.store(!up, Ordering::Relaxed);
        metrics::gauge!(BUS_CONNECTED).set(if up { 1.0 } else { 0.0 });
        match (up, lost_since) {
            (true, None) => {}
            (true, Some(since)) => {
                tracing::info!(after = ?since.elapsed(), "bus reachable again: ready");
                lost_since = None;
            }
            (false, None) => {
                tracing::warn!("bus lost: not ready, new agents refused");
                lost_since = Some(Instant::now());
                inner.bus_lost_changed.notify_waiters();
            }
            (false, Some(since)) => {
                let Some(after) = inner.cfg.bus_lost_drain else {
                    continue;
                };
                if since.elapsed() >= after {
                    let closed = close_all(&inner);
                    if closed > 0 {
                        tracing::warn!(closed, "bus still lost: agents closed to move elsewhere");
                        metrics::counter!(BUS_LOST_CLOSES).increment(closed as u64);
                    }
                }
            }
        }
    }
}

/// Asks every open connection to close; returns how many were asked for the first time.
fn close_all(inner: &Inner) -> usize {
    let open: Vec<_> = inner.conns().open.values().cloned().collect();
    open.iter()
        .filter(|c| c.request_close(1001, "bus unreachable"))
        .count()
}
