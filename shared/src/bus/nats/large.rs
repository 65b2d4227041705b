//! The bookkeeping of large messages, without I/O: the [`Reassembler`] that puts chunks back
//! together within a memory budget, and the [`Outbox`] that keeps bodies announced by a
//! stand-in until one fetch takes them. Both are pure (time is passed in), which is what lets
//! them be tested without a server.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::headers::ChunkHeader;
use super::telemetry::BUFFERED;

/// Part of `max_payload` left for headers: NATS counts them against the limit, and ours are
/// well under 1 KiB.
pub(super) const HEADROOM: usize = 8 * 1024;
/// Bytes buffered for reassembly (and, separately, in the outbox) are bounded by this many
/// maximal messages.
pub(super) const BUFFERED_MESSAGES: usize = 4;

/// (subject, message id): one publisher's message on one subscription.
pub(super) type ChunkKey = (String, String);

/// What one chunk did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Chunk {
    Pending,
    Complete(Bytes),
    /// The message cannot be completed; count it with this reason.
    Dropped(&'static str),
    /// A later chunk of a message already dropped (and counted).
    Ignored,
}

/// Reassembles chunked messages. Chunks of one message come from one publisher on one
/// subject, so they arrive in order: anything else (a gap after a reconnect, a first chunk
/// lost to a slow consumer) drops the message. Memory is reserved for a message's declared
/// total at its first chunk, which is what keeps the total bounded.
pub(super) struct Reassembler {
    /// Bytes reserved by all partial messages together may not exceed this.
    limit: usize,
    /// Largest message accepted.
    max_message: usize,
    /// Bytes reserved by `partial`.
    pub(super) reserved: usize,
    pub(super) partial: HashMap<ChunkKey, Partial>,
    /// Messages dropped before their last chunk: their remaining chunks are ignored rather
    /// than counted again. Swept like partial messages.
    pub(super) dropped: HashMap<ChunkKey, Instant>,
}

pub(super) struct Partial {
    data: Vec<u8>,
    next: usize,
    count: usize,
    total: usize,
    started: Instant,
}

impl Reassembler {
    pub(super) fn new(limit: usize, max_message: usize) -> Self {
        Self {
            limit,
            max_message,
            reserved: 0,
            partial: HashMap::new(),
            dropped: HashMap::new(),
        }
    }

    pub(super) fn add(
        &mut self,
        key: ChunkKey,
        h: &ChunkHeader<'_>,
        payload: &[u8],
        now: Instant,
    ) -> Chunk {
        let last = h.index + 1 == h.count;
        if h.index == 0 {
            if let Some(stale) = self.partial.remove(&key) {
                // A message id reused while its predecessor is unfinished: drop the old one.
                self.release(&stale);
            }
            self.dropped.remove(&key);
            let refused = if h.total > self.max_message {
                Some("too_large")
            } else if self.reserved.saturating_add(h.total) > self.limit {
                Some("buffer_full")
            } else if h.count > h.total.max(1) {
                Some("malformed")
            } else {
                None
            };
            if let Some(reason) = refused {
                if !last {
                    self.dropped.insert(key, now);
                }
                return Chunk::Dropped(reason);
            }
            self.reserved += h.total;
            metrics::gauge!(BUFFERED, "buffer" => "reassembly").set(self.reserved as f64);
            self.partial.insert(
                key.clone(),
                Partial {
                    data: Vec::with_capacity(h.total),
                    next: 0,
                    count: h.count,
                    total: h.total,
                    started: now,
                },
            );
        }
        let Some(p) = self.partial.get_mut(&key) else {
            // The first chunk never arrived, or this message was dropped already.
            if self.dropped.contains_key(&key) {
                if last {
                    self.dropped.remove(&key);
                }
                return Chunk::Ignored;
            }
            if !last {
                self.dropped.insert(key, now);
            }
            return Chunk::Dropped("incomplete_chunks");
        };
        let fits = p.data.len() + payload.len() <= p.total;
        if h.index != p.next || h.count != p.count || h.total != p.total || !fits {
            let reason = if h.index != p.next {
                "incomplete_chunks"
            } else {
                "malformed"
            };
            if let Some(p) = self.partial.remove(&key) {
                self.release(&p);
            }
            if !last {
                self.dropped.insert(key, now);
            }
            return Chunk::Dropped(reason);
        }
        p.data.extend_from_slice(payload);
        p.next += 1;
        if !last {
            return Chunk::Pending;
        }
        let Some(p) = self.partial.remove(&key) else {
            return Chunk::Dropped("malformed");
        };
        self.release(&p);
        if p.data.len() == p.total {
            Chunk::Complete(Bytes::from(p.data))
        } else {
            Chunk::Dropped("malformed")
        }
    }

    fn release(&mut self, p: &Partial) {
        self.reserved = self.reserved.saturating_sub(p.total);
        metrics::gauge!(BUFFERED, "buffer" => "reassembly").set(self.reserved as f64);
    }

    /// Drops partial messages older than `timeout`; returns how many.
    pub(super) fn expire(&mut self, now: Instant, timeout: Duration) -> usize {
        let stale: Vec<ChunkKey> = self
            .partial
            .iter()
            .filter(|(_, p)| now.duration_since(p.started) >= timeout)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &stale {
            if let Some(p) = self.partial.remove(key) {
                self.release(&p);
            }
        }
        self.dropped
            .retain(|_, since| now.duration_since(*since) < timeout);
        metrics::gauge!(BUFFERED, "buffer" => "reassembly").set(self.reserved as f64);
        stale.len()
    }
}

/// Large messages this process announced on a queue subject, kept until one fetch takes them.
pub(super) struct Outbox {
    limit: usize,
    pub(super) held: usize,
    entries: HashMap<String, (Bytes, Instant)>,
}

impl Outbox {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            limit,
            held: 0,
            entries: HashMap::new(),
        }
    }

    /// False (and nothing kept) when holding `body` would exceed the limit.
    pub(super) fn put(&mut self, id: String, body: Bytes, now: Instant) -> bool {
        if self.held.saturating_add(body.len()) > self.limit {
            return false;
        }
        self.held += body.len();
        self.entries.insert(id, (body, now));
        self.gauge();
        true
    }

    pub(super) fn take(&mut self, id: &str) -> Option<Bytes> {
        let (body, _) = self.entries.remove(id)?;
        self.held -= body.len();
        self.gauge();
        Some(body)
    }

    /// Drops entries older than `timeout`; returns how many.
    pub(super) fn expire(&mut self, now: Instant, timeout: Duration) -> usize {
        let before = self.entries.len();
        let mut freed = 0;
        self.entries.retain(|_, (body, since)| {
            let keep = now.duration_since(*since) < timeout;
            if !keep {
                freed += body.len();
            }
            keep
        });
        self.held -= freed;
        self.gauge();
        before - self.entries.len()
    }

    fn gauge(&self) {
        metrics::gauge!(BUFFERED, "buffer" => "outbox").set(self.held as f64);
    }
}
