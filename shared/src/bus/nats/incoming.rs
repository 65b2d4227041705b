//! The receiving side of plain subscriptions: the inbox task (replies, coalesced replies, a
//! request batch's refusal, fetches of this process's large messages), turning a received
//! message into a body through the reassembly, gateway deliveries (coalesced or not) and
//! control events, and the sweeper that drops stale large messages and request batches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Message, StatusCode, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::headers::{header, ChunkHeader, H_BATCH, H_CHUNK, H_ERROR};
use super::large::Chunk;
use super::state::{lock, Inner};
use super::subscription::Flow;
use super::telemetry::{count_dropped, count_received, CHUNKED};
use crate::bus::wire;
use crate::bus::{BusError, GatewayMessage};

/// How often stale partial messages and unfetched outbox entries are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub(super) async fn run_inbox(inner: Arc<Inner>, mut sub: Subscriber) {
    while let Some(msg) = sub.next().await {
        let Some(rest) = msg.subject.as_str().strip_prefix(&inner.subjects.inbox) else {
            continue;
        };
        if rest == "fetch" {
            // Publishing a large body takes a while; keep the inbox free for replies.
            tokio::spawn(serve_fetch(inner.clone(), msg));
        } else if rest == "batch" {
            inner.on_reply_batch(&msg);
        } else if let Some(id) = rest.strip_prefix("r.").and_then(|s| s.parse::<u64>().ok()) {
            inner.on_reply(id, msg);
        } else {
            count_dropped("malformed");
            tracing::debug!(subject = %msg.subject, "unexpected inbox subject");
        }
    }
}

pub(super) async fn run_sweeper(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let timeout = inner.opts.request_timeout;
        let incomplete = lock(&inner.reassembly).expire(now, timeout);
        let unfetched = lock(&inner.outbox).expire(now, timeout);
        // Batches nobody refused: their requests got replies or timed out by now.
        lock(&inner.batch_waits).expire(now, timeout);
        for _ in 0..incomplete {
            count_dropped("incomplete_chunks");
        }
        for _ in 0..unfetched {
            count_dropped("unfetched");
        }
        if incomplete + unfetched > 0 {
            tracing::warn!(incomplete, unfetched, "dropped stale large bus messages");
        }
    }
}

/// Answers another process's fetch of a large message this one published as a stand-in.
async fn serve_fetch(inner: Arc<Inner>, msg: Message) {
    let Some(reply) = msg.reply else {
        count_dropped("malformed");
        return;
    };
    let body = std::str::from_utf8(&msg.payload)
        .ok()
        .and_then(|id| lock(&inner.outbox).take(id));
    let res = match body {
        Some(body) => inner.publish_direct(reply.to_string(), body).await,
        None => {
            inner
                .publish_error(
                    reply.to_string(),
                    "large message expired or already fetched",
                )
                .await
        }
    };
    if let Err(e) = res {
        tracing::warn!(error = %e, "could not answer a large message fetch");
    }
}

/// Result of feeding one received NATS message to the reassembly.
enum Body {
    /// A whole logical message.
    Complete(Bytes),
    /// A chunk; the message is not complete yet (or this chunk belongs to one already dropped).
    Pending,
    /// This chunk made its message undeliverable (already counted).
    Dropped(&'static str),
}

impl Inner {
    /// A message on this process's inbox for request `id`: the reply, a chunk of it, the
    /// server's "no responders", or an error in its place.
    fn on_reply(&self, id: u64, msg: Message) {
        let outcome = if let Some(status) = msg.status {
            Some(Err(if status == StatusCode::NO_RESPONDERS {
                BusError::NoResponder
            } else {
                BusError::Unavailable(format!("nats status {status}"))
            }))
        } else if let Some(text) = header(&msg, H_ERROR) {
            Some(Err(BusError::Unavailable(text.to_string())))
        } else {
            match self.receive_body(&msg) {
                Body::Complete(body) => Some(Ok(body)),
                Body::Pending => None,
                Body::Dropped(reason) => Some(Err(BusError::Unavailable(format!(
                    "reply dropped: {reason}"
                )))),
            }
        };
        let Some(outcome) = outcome else {
            return;
        };
        let waiter = lock(&self.pending).remove(&id);
        if let Some(waiter) = waiter {
            // The waiter may have timed out just now; then nobody needs this.
            let _ = waiter.send(outcome);
            return;
        }
        // Not a request: a request batch's own subject, which only hears of the batch as a
        // whole (nobody serves it, or it was malformed): that answers each of its requests.
        let Err(e) = outcome else {
            return;
        };
        let requests = lock(&self.batch_waits).take(id).unwrap_or_default();
        let mut pending = lock(&self.pending);
        for request in requests {
            if let Some(waiter) = pending.remove(&request) {
                let _ = waiter.send(Err(match &e {
                    BusError::NoResponder => BusError::NoResponder,
                    other => BusError::Unavailable(other.to_string()),
                }));
            }
        }
    }

    /// Coalesced replies (`batch` inbox subject): each entry answers the request its reply
    /// subject names, as a single reply on that subject would.
    fn on_reply_batch(&self, msg: &Message) {
        let entries = match wire::decode_batch(&msg.payload) {
            Ok(entries) => entries,
            Err(e) => {
                // Its requests time out: which they were cannot be read.
                count_dropped("malformed");
                tracing::warn!(error = %e, "malformed reply batch dropped");
                return;
            }
        };
        let mut pending = lock(&self.pending);
        for entry in entries {
            let Some(id) = entry
                .reply
                .as_deref()
                .and_then(|r| self.subjects.request_id(r))
            else {
                count_dropped("malformed");
                tracing::warn!("batched reply without a request id dropped");
                continue;
            };
            let outcome = match entry.error {
                Some(text) => Err(BusError::Unavailable(text)),
                None => Ok(Bytes::from(entry.body)),
            };
            if let Some(waiter) = pending.remove(&id) {
                let _ = waiter.send(outcome);
            }
        }
    }

    /// The payload of a plain message, or what its `Ampora-Chunk` header makes of it.
    fn receive_body(&self, msg: &Message) -> Body {
        let Some(value) = header(msg, H_CHUNK) else {
            return Body::Complete(msg.payload.clone());
        };
        let Some(chunk) = ChunkHeader::parse(value) else {
            count_dropped("malformed");
            return Body::Dropped("malformed");
        };
        let outcome = {
            let mut r = lock(&self.reassembly);
            let key = (msg.subject.to_string(), chunk.msg_id.to_string());
            r.add(key, &chunk, &msg.payload, Instant::now())
        };
        match outcome {
            Chunk::Pending | Chunk::Ignored => Body::Pending,
            Chunk::Complete(body) => {
                metrics::counter!(CHUNKED, "direction" => "received").increment(1);
                Body::Complete(body)
            }
            Chunk::Dropped(reason) => {
                count_dropped(reason);
                tracing::warn!(reason, subject = %msg.subject, "large bus message dropped");
                Body::Dropped(reason)
            }
        }
    }

    pub(super) fn on_delivery(&self, msg: &Message, tx: &mpsc::Sender<GatewayMessage>) -> Flow {
        if header(msg, H_BATCH).is_some() {
            let entries = match wire::decode_batch(&msg.payload) {
                Ok(entries) => entries,
                Err(e) => {
                    count_dropped("malformed");
                    tracing::warn!(error = %e, "malformed delivery batch dropped");
                    return Flow::Continue;
                }
            };
            for entry in entries {
                if let Flow::Stop = self.deliver_body(&entry.body, tx) {
                    return Flow::Stop;
                }
            }
            return Flow::Continue;
        }
        let Body::Complete(body) = self.receive_body(msg) else {
            return Flow::Continue;
        };
        self.deliver_body(&body, tx)
    }

    /// One delivery, decoded, to the gateway's queue.
    fn deliver_body(&self, body: &[u8], tx: &mpsc::Sender<GatewayMessage>) -> Flow {
        match wire::decode_gateway(body) {
            Ok(delivery) => {
                count_received("delivery");
                match tx.try_send(delivery) {
                    Ok(()) => Flow::Continue,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        count_dropped("queue_full");
                        Flow::Continue
                    }
                    // The gateway dropped its receiver: stop listening.
                    Err(mpsc::error::TrySendError::Closed(_)) => Flow::Stop,
                }
            }
            Err(e) => {
                count_dropped("malformed");
                tracing::warn!(error = %e, "malformed delivery dropped");
                Flow::Continue
            }
        }
    }

    pub(super) fn on_control(&self, msg: &Message) {
        let Body::Complete(body) = self.receive_body(msg) else {
            return;
        };
        let ev = match wire::decode_control(&body) {
            Ok(ev) => ev,
            Err(e) => {
                count_dropped("malformed");
                tracing::warn!(error = %e, "malformed control event dropped");
                return;
            }
        };
        count_received("control");
        let mut subs = lock(&self.control_subscribers);
        subs.retain(|tx| !tx.is_closed());
        for tx in subs.iter() {
            // A subscriber this far behind loses the event; owners also reconcile periodically.
            if tx.try_send(ev.clone()).is_err() {
                count_dropped("queue_full");
            }
        }
    }
}
