//! Coalescing of small bus messages, without I/O: the per-subject [`Lanes`] that queue what is
//! to be published in order, [`split`] that turns a lane's queue into NATS messages (batches
//! of envelopes bounded in bytes, everything else alone in its place), and [`BatchWaits`], the
//! requests each coalesced request batch carries (so a "no responders" for the batch fails
//! them all at once). The publishing side is `coalesce`.
//!
//! # Why and what
//!
//! A NATS message costs the server, both clients and a subscriber wake-up, whatever its size;
//! the bus's envelopes are mostly a few hundred bytes. So with `batch_linger` above zero,
//! small envelopes to one subject are coalesced into one NATS message carrying a `Batch`
//! (`proto/bus.proto`): requests and events to `a2s.<partition>` / `any`, replies to one
//! process's inbox (published on its `inbox.<node>.batch`), deliveries to `gw.<gateway>`.
//! Only one subject's messages share a batch, and a lane publishes its queue strictly in
//! order, so nothing is reordered for a subject; a batch to a queue group goes to one member,
//! which is right because every message in it is for that subject. A batch is at most
//! `batch_max_bytes` (64 KiB by default) and never above the chunk limit; a message too big to
//! join one (chunked, pulled, or merely above the batch bound) is published alone, in its
//! place in the lane. A run of one envelope is published as a plain single message, exactly as
//! without batching.
//!
//! # Latency: gather only while a burst goes on
//!
//! A lane has no timer. The first message to an idle lane starts its flusher task, which lets
//! the runtime run once (`yield_now`: other tasks and the I/O driver get their turn) and keeps
//! doing so only while each turn added messages, until the lane holds a full batch or
//! `batch_linger` has passed since it started gathering; then it publishes everything queued
//! and starts over, and ends when the lane is empty. A lone request therefore waits one
//! scheduler turn (microseconds), not the linger; under load, messages that arrive while the
//! flusher gathers or publishes join the next batch. (A timed linger would also be coarse:
//! Tokio's timers tick in milliseconds.) `batch_linger` zero turns coalescing off: every
//! message is published at once, alone, by its caller.
//!
//! # Compatibility
//!
//! Receivers accept single envelopes as before and batches marked with the `Ampora-Batch`
//! header (or arriving on the `batch` inbox subject). Replies are coalesced only for requests
//! that arrived in a batch, so a sender that does not batch never receives a batched reply.
//! Versions before batching cannot read batches: during a rolling upgrade from one, run the new
//! nodes with `batch_linger` zero until no old node is left.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::sync::oneshot;

use crate::bus::wire::{batch_entry_len, BatchEntry};
use crate::bus::BusError;

/// What a lane's subject carries, which decides how its batches are published and read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LaneKind {
    /// Requests and events to a coordinator subject (queue group).
    Coordinator,
    /// Replies to one process's inbox.
    Replies,
    /// Deliveries to one gateway.
    Gateway,
}

impl LaneKind {
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Coordinator => "coordinator",
            Self::Replies => "reply",
            Self::Gateway => "delivery",
        }
    }
}

/// One message to publish through a lane.
#[derive(Debug)]
pub(super) enum Item {
    /// Small enough to share a NATS message with its neighbours.
    Envelope(BatchEntry),
    /// A NATS message of its own, published in its place: a large message's stand-in (with
    /// its `Ampora-Pull` header), or a body above the batch bound (chunked when above the
    /// chunk limit, which only plain subscriptions receive).
    Alone {
        headers: Option<HeaderMap>,
        reply: Option<String>,
        payload: Bytes,
    },
}

impl Item {
    /// The bytes the item adds to a lane (what bounds a batch).
    fn len(&self) -> usize {
        match self {
            Self::Envelope(e) => batch_entry_len(e),
            Self::Alone { payload, .. } => payload.len(),
        }
    }
}

/// Told whether the item's NATS message was handed to the client.
pub(super) type Done = oneshot::Sender<Result<(), BusError>>;

#[derive(Debug)]
pub(super) struct Queued {
    pub(super) item: Item,
    pub(super) done: Option<Done>,
}

/// One NATS message a lane publishes.
#[derive(Debug)]
pub(super) enum Outgoing {
    /// An envelope or an alone item, published as a single message.
    Single(Queued),
    /// Two or more envelopes in one `Batch`, in queue order.
    Batch(Vec<Queued>),
}

/// Splits a lane's queue, in order, into NATS messages: consecutive envelopes coalesce while
/// their batch stays within `max` bytes; an alone item ends the run before it.
pub(super) fn split(items: Vec<Queued>, max: usize) -> Vec<Outgoing> {
    let mut out = Vec::new();
    let mut run: Vec<Queued> = Vec::new();
    let mut run_bytes = 0;
    let close = |run: &mut Vec<Queued>, out: &mut Vec<Outgoing>| match run.len() {
        0 => {}
        1 => out.extend(run.pop().map(Outgoing::Single)),
        _ => out.push(Outgoing::Batch(std::mem::take(run))),
    };
    for q in items {
        match &q.item {
            Item::Envelope(e) => {
                let len = batch_entry_len(e);
                if !run.is_empty() && run_bytes + len > max {
                    close(&mut run, &mut out);
                    run_bytes = 0;
                }
                run_bytes += len;
                run.push(q);
            }
            Item::Alone { .. } => {
                close(&mut run, &mut out);
                run_bytes = 0;
                out.push(Outgoing::Single(q));
            }
        }
    }
    close(&mut run, &mut out);
    out
}

/// The queue of each subject with a flusher running. A subject is here exactly while its
/// flusher runs: the push that finds it missing starts one, and the flusher removes it when it
/// finds it empty, so there is never more than one flusher (and so one order) per subject.
#[derive(Debug, Default)]
pub(super) struct Lanes {
    lanes: HashMap<String, Lane>,
}

#[derive(Debug)]
struct Lane {
    kind: LaneKind,
    queue: Vec<Queued>,
    bytes: usize,
}

impl Lanes {
    /// Queues `items` on `subject` after what is there; true when the lane was idle, so the
    /// caller must start its flusher.
    pub(super) fn push(
        &mut self,
        subject: &str,
        kind: LaneKind,
        items: impl IntoIterator<Item = Queued>,
    ) -> bool {
        let idle = !self.lanes.contains_key(subject);
        if idle {
            let lane = Lane {
                kind,
                queue: Vec::new(),
                bytes: 0,
            };
            self.lanes.insert(subject.to_string(), lane);
        }
        if let Some(lane) = self.lanes.get_mut(subject) {
            for q in items {
                lane.bytes += q.item.len();
                lane.queue.push(q);
            }
        }
        idle
    }

    /// How many items and bytes wait on `subject`.
    pub(super) fn queued(&self, subject: &str) -> (usize, usize) {
        self.lanes
            .get(subject)
            .map_or((0, 0), |l| (l.queue.len(), l.bytes))
    }

    /// Everything queued on `subject`, in order; `None` when nothing is, and then the lane is
    /// forgotten (its flusher ends, the next push starts another).
    pub(super) fn take(&mut self, subject: &str) -> Option<(LaneKind, Vec<Queued>)> {
        let lane = self.lanes.get_mut(subject)?;
        if lane.queue.is_empty() {
            self.lanes.remove(subject);
            return None;
        }
        lane.bytes = 0;
        Some((lane.kind, std::mem::take(&mut lane.queue)))
    }
}

/// The requests of each coalesced request batch in flight, by the batch's own request id (its
/// NATS reply subject): the server answers "no responders" to the batch, not to its entries.
/// Nobody answers a batch that reached a coordinator, so entries expire after the request
/// timeout, like the requests themselves.
#[derive(Debug, Default)]
pub(super) struct BatchWaits {
    by_id: HashMap<u64, (Instant, Vec<u64>)>,
}

impl BatchWaits {
    pub(super) fn insert(&mut self, batch: u64, requests: Vec<u64>, now: Instant) {
        self.by_id.insert(batch, (now, requests));
    }

    /// The requests of `batch`, which an answer to the batch itself applies to.
    pub(super) fn take(&mut self, batch: u64) -> Option<Vec<u64>> {
        self.by_id.remove(&batch).map(|(_, requests)| requests)
    }

    /// Forgets batches older than `timeout`; returns how many.
    pub(super) fn expire(&mut self, now: Instant, timeout: Duration) -> usize {
        let before = self.by_id.len();
        self.by_id
            .retain(|_, (sent, _)| now.saturating_duration_since(*sent) < timeout);
        before - self.by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(n: u8, len: usize) -> Queued {
        Queued {
            item: Item::Envelope(BatchEntry {
                body: vec![n; len],
                reply: None,
                error: None,
            }),
            done: None,
        }
    }

    fn alone(n: u8) -> Queued {
        Queued {
            item: Item::Alone {
                headers: None,
                reply: None,
                payload: Bytes::from(vec![n; 10]),
            },
            done: None,
        }
    }

    fn first_byte(q: &Queued) -> u8 {
        match &q.item {
            Item::Envelope(e) => e.body[0],
            Item::Alone { payload, .. } => payload[0],
        }
    }

    /// What each NATS message carries, by first byte: `[n]` alone, `[a, b, ..]` a batch.
    fn shape(out: &[Outgoing]) -> Vec<Vec<u8>> {
        out.iter()
            .map(|o| match o {
                Outgoing::Single(q) => vec![first_byte(q)],
                Outgoing::Batch(run) => run.iter().map(first_byte).collect(),
            })
            .collect()
    }

    #[test]
    fn split_keeps_order_and_bounds_batches() {
        // Each 100-byte envelope adds 104 bytes to a batch: three fit in 320, four do not.
        assert_eq!(
            batch_entry_len(&BatchEntry {
                body: vec![0; 100],
                reply: None,
                error: None
            }),
            104
        );
        let items = vec![
            envelope(1, 100),
            envelope(2, 100),
            envelope(3, 100),
            envelope(4, 100),
            alone(5),
            envelope(6, 100),
            alone(7),
            alone(8),
            envelope(9, 100),
            envelope(10, 100),
            envelope(11, 1000),
            envelope(12, 100),
        ];
        let out = split(items, 320);
        assert_eq!(
            shape(&out),
            vec![
                vec![1, 2, 3],
                vec![4],
                vec![5],
                vec![6],
                vec![7],
                vec![8],
                vec![9, 10],
                vec![11],
                vec![12],
            ]
        );
        assert!(
            matches!(out[1], Outgoing::Single(_)),
            "a run of one goes as a single"
        );
        assert!(split(Vec::new(), 320).is_empty());
    }

    #[test]
    fn a_lane_runs_one_flusher_and_hands_everything_over_in_order() {
        let mut lanes = Lanes::default();
        assert!(
            lanes.push("a", LaneKind::Gateway, [envelope(1, 10)]),
            "idle: start"
        );
        assert!(!lanes.push("a", LaneKind::Gateway, [envelope(2, 10), alone(3)]));
        assert!(
            lanes.push("b", LaneKind::Coordinator, [envelope(9, 10)]),
            "its own lane"
        );
        assert_eq!(lanes.queued("a"), (3, 14 + 14 + 10));
        let (kind, items) = lanes.take("a").expect("queued");
        assert_eq!(kind, LaneKind::Gateway);
        assert_eq!(
            items.iter().map(first_byte).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(lanes.queued("a"), (0, 0));
        assert!(
            !lanes.push("a", LaneKind::Gateway, [envelope(4, 10)]),
            "flusher still on"
        );
        assert_eq!(lanes.take("a").map(|(_, i)| i.len()), Some(1));
        assert!(lanes.take("a").is_none(), "empty: the flusher ends");
        assert!(
            lanes.push("a", LaneKind::Gateway, [envelope(5, 10)]),
            "and the next starts one"
        );
        assert_eq!(
            lanes.take("b").map(|(k, i)| (k, i.len())),
            Some((LaneKind::Coordinator, 1))
        );
    }

    #[test]
    fn batch_waits_are_taken_once_and_expire() {
        let mut waits = BatchWaits::default();
        let t0 = Instant::now();
        waits.insert(1, vec![10, 11], t0);
        waits.insert(2, vec![12], t0 + Duration::from_secs(5));
        assert_eq!(waits.take(1), Some(vec![10, 11]));
        assert_eq!(waits.take(1), None);
        waits.insert(3, vec![13], t0);
        assert_eq!(
            waits.expire(t0 + Duration::from_secs(10), Duration::from_secs(10)),
            1
        );
        assert_eq!(waits.take(3), None);
        assert_eq!(waits.take(2), Some(vec![12]));
    }
}
