//! Publishing through the lanes of `batch` (whose module docs give the design): queueing a
//! message behind what its subject already has, the flusher task of each busy lane (gather
//! while a burst goes on, then publish in order), and publishing each NATS message
//! [`split`] makes, batches marked with `Ampora-Batch`.

use std::sync::Arc;
use std::time::Instant;

use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::sync::oneshot;

use super::batch::{split, Item, LaneKind, Outgoing, Queued};
use super::headers::H_BATCH;
use super::state::{lock, unavailable, Inner};
use super::telemetry::record_envelopes;
use crate::bus::wire::{self, BatchEntry};
use crate::bus::BusError;

impl Inner {
    /// Publishes `item` on `subject` after everything sent there before: through the
    /// subject's lane when coalescing, else at once. Returns once its NATS message is handed
    /// to the client (or could not be).
    pub(super) async fn send_in_order(
        self: &Arc<Self>,
        subject: String,
        kind: LaneKind,
        item: Item,
    ) -> Result<(), BusError> {
        if !self.lingers() {
            return self.publish_one(&subject, kind, item).await;
        }
        let (tx, rx) = oneshot::channel();
        self.enqueue(
            subject,
            kind,
            vec![Queued {
                item,
                done: Some(tx),
            }],
        );
        sent(rx).await
    }

    /// Queues `items` on `subject`'s lane, starting its flusher if the lane was idle.
    pub(super) fn enqueue(self: &Arc<Self>, subject: String, kind: LaneKind, items: Vec<Queued>) {
        let idle = lock(&self.lanes).push(&subject, kind, items);
        if idle {
            tokio::spawn(self.clone().run_lane(subject));
        }
    }

    /// A lane's flusher: gathers, publishes everything queued in order, and again, until the
    /// lane is found empty (which forgets it, see `Lanes`).
    async fn run_lane(self: Arc<Self>, subject: String) {
        loop {
            self.gather(&subject).await;
            let Some((kind, items)) = lock(&self.lanes).take(&subject) else {
                return;
            };
            for out in split(items, self.batch_limit()) {
                self.publish_outgoing(&subject, kind, out).await;
            }
        }
    }

    /// Lets the runtime run while each turn adds to the lane, up to a full batch or the
    /// linger: a lone message costs one turn, a burst is gathered (see `batch`).
    async fn gather(&self, subject: &str) {
        let deadline = Instant::now() + self.opts.batch_linger;
        let limit = self.batch_limit();
        let mut seen = lock(&self.lanes).queued(subject);
        while seen.0 > 0 && seen.1 < limit && Instant::now() < deadline {
            tokio::task::yield_now().await;
            let now = lock(&self.lanes).queued(subject);
            if now.0 == seen.0 {
                break;
            }
            seen = now;
        }
    }

    async fn publish_outgoing(&self, subject: &str, kind: LaneKind, out: Outgoing) {
        match out {
            Outgoing::Single(q) => {
                let res = self.publish_one(subject, kind, q.item).await;
                record_envelopes(kind.label(), 1);
                finish(q.done, &res);
            }
            Outgoing::Batch(run) => {
                record_envelopes(kind.label(), run.len());
                let (entries, dones): (Vec<BatchEntry>, Vec<_>) = run
                    .into_iter()
                    .filter_map(|q| match q.item {
                        Item::Envelope(e) => Some((e, q.done)),
                        // `split` only batches envelopes.
                        Item::Alone { .. } => None,
                    })
                    .unzip();
                let res = self.publish_batch(subject, kind, entries).await;
                for done in dones {
                    finish(done, &res);
                }
            }
        }
    }

    /// One item as a single NATS message, exactly as it would go without coalescing.
    pub(super) async fn publish_one(
        &self,
        subject: &str,
        kind: LaneKind,
        item: Item,
    ) -> Result<(), BusError> {
        let (headers, reply, payload) = match item {
            Item::Envelope(BatchEntry { body, reply, error }) if kind == LaneKind::Replies => {
                // A reply goes to its own reply subject, not the lane's.
                let Some(reply) = reply else {
                    return Err(BusError::Unavailable("reply without a subject".into()));
                };
                return match error {
                    Some(text) => self.publish_error(reply, &text).await,
                    None => self
                        .client
                        .publish(reply, Bytes::from(body))
                        .await
                        .map_err(unavailable),
                };
            }
            Item::Envelope(e) => (None, e.reply, Bytes::from(e.body)),
            Item::Alone {
                headers,
                reply,
                payload,
            } => (headers, reply, payload),
        };
        let subject = subject.to_string();
        let res = match (headers, reply) {
            // Chunked when large: only plain subscriptions get such bodies.
            (None, None) => return self.publish_direct(subject, payload).await,
            (None, Some(reply)) => {
                self.client
                    .publish_with_reply(subject, reply, payload)
                    .await
            }
            (Some(h), None) => self.client.publish_with_headers(subject, h, payload).await,
            (Some(h), Some(reply)) => {
                self.client
                    .publish_with_reply_and_headers(subject, reply, h, payload)
                    .await
            }
        };
        res.map_err(unavailable)
    }

    /// Several envelopes as one `Batch`. A request batch carries a reply subject of its own,
    /// so that the server's "no responders" (nobody serves the subject) fails its requests at
    /// once, as it would each single request.
    async fn publish_batch(
        &self,
        subject: &str,
        kind: LaneKind,
        entries: Vec<BatchEntry>,
    ) -> Result<(), BusError> {
        let mut headers = HeaderMap::new();
        headers.insert(H_BATCH, entries.len().to_string());
        let requests: Vec<u64> = match kind {
            LaneKind::Coordinator => entries
                .iter()
                .filter_map(|e| e.reply.as_deref())
                .filter_map(|r| self.subjects.request_id(r))
                .collect(),
            LaneKind::Replies | LaneKind::Gateway => Vec::new(),
        };
        let payload = Bytes::from(wire::encode_batch(entries));
        let subject = subject.to_string();
        let res = if requests.is_empty() {
            self.client
                .publish_with_headers(subject, headers, payload)
                .await
        } else {
            let id = self.next_id();
            lock(&self.batch_waits).insert(id, requests, Instant::now());
            let reply = self.subjects.reply(id);
            self.client
                .publish_with_reply_and_headers(subject, reply, headers, payload)
                .await
        };
        res.map_err(unavailable)
    }
}

/// Waits for a queued item's NATS message to be handed to the client.
pub(super) async fn sent(rx: oneshot::Receiver<Result<(), BusError>>) -> Result<(), BusError> {
    rx.await
        .unwrap_or_else(|_| Err(BusError::Unavailable("bus closed".into())))
}

fn finish(done: Option<super::batch::Done>, res: &Result<(), BusError>) {
    if let Some(done) = done {
        // The caller may have given up (cancelled); then nobody needs to know.
        let _ = done.send(match res {
            Ok(()) => Ok(()),
            Err(BusError::Unavailable(text)) => Err(BusError::Unavailable(text.clone())),
            Err(e) => Err(BusError::Unavailable(e.to_string())),
        });
    }
}
