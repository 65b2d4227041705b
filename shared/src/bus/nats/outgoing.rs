//! The sending side: publishing on plain subjects (chunked when large), announcing large
//! messages to a queue group through the outbox, requests and their replies through the inbox,
//! deliveries, what goes through a lane as an envelope (`coalesce`) and what alone, and the
//! barrier that proves the server processed a (un)subscription.

use std::sync::Arc;
use std::time::Instant;

use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::sync::oneshot;

use super::batch::{Item, LaneKind, Queued};
use super::coalesce::sent;
use super::headers::{H_CHUNK, H_ERROR, H_PULL};
use super::state::{lock, unavailable, Inner};
use super::telemetry::{count_dropped, count_sent, CHUNKED};
use crate::bus::wire::{batch_entry_len, BatchEntry};
use crate::bus::BusError;

impl Inner {
    /// Publishes `body` on a plain (non-queue) subject, in chunks if it is large.
    pub(super) async fn publish_direct(
        &self,
        subject: String,
        body: Bytes,
    ) -> Result<(), BusError> {
        let limit = self.chunk_limit();
        if body.len() <= limit {
            return self
                .client
                .publish(subject, body)
                .await
                .map_err(unavailable);
        }
        let msg_id = self.new_msg_id();
        let total = body.len();
        let count = total.div_ceil(limit);
        for index in 0..count {
            let part = body.slice(index * limit..total.min((index + 1) * limit));
            let mut headers = HeaderMap::new();
            headers.insert(H_CHUNK, format!("{msg_id} {index} {count} {total}"));
            self.client
                .publish_with_headers(subject.clone(), headers, part)
                .await
                .map_err(unavailable)?;
        }
        metrics::counter!(CHUNKED, "direction" => "sent").increment(1);
        Ok(())
    }

    pub(super) async fn publish_error(&self, subject: String, text: &str) -> Result<(), BusError> {
        let mut headers = HeaderMap::new();
        headers.insert(H_ERROR, text);
        self.client
            .publish_with_headers(subject, headers, Bytes::new())
            .await
            .map_err(unavailable)
    }

    /// Keeps a large body for one fetch and returns the `Ampora-Pull` header announcing it.
    pub(super) fn stash(&self, body: Bytes) -> Result<(String, HeaderMap), BusError> {
        let msg_id = self.new_msg_id();
        let len = body.len();
        if !lock(&self.outbox).put(msg_id.clone(), body, Instant::now()) {
            count_dropped("buffer_full");
            return Err(BusError::Unavailable(
                "too many large bus messages waiting to be fetched".into(),
            ));
        }
        let mut headers = HeaderMap::new();
        headers.insert(H_PULL, format!("{} {msg_id} {len}", self.subjects.fetch));
        metrics::counter!(CHUNKED, "direction" => "sent").increment(1);
        Ok((msg_id, headers))
    }

    /// Publishes one message on a coordinator (queue group) subject, after everything sent
    /// there before: coalesced when small and lingering (see `batch`), else as is when it
    /// fits, else as a stand-in for a fetch. Waits for the reply when there is one to wait for.
    pub(super) async fn send_to_coordinators(
        self: &Arc<Self>,
        subject: String,
        body: Vec<u8>,
        expect_reply: bool,
    ) -> Result<Option<Bytes>, BusError> {
        self.check_size(body.len())?;
        let waiting = expect_reply.then(|| self.expect_reply());
        let reply = waiting.as_ref().map(|w| self.subjects.reply(w.id));
        let mut stashed = None;
        let item = match self.envelope(body, reply.clone()) {
            Ok(envelope) => envelope,
            Err(body) if body.len() <= self.chunk_limit() => Item::Alone {
                headers: None,
                reply,
                payload: Bytes::from(body),
            },
            Err(body) => {
                let (msg_id, headers) = self.stash(Bytes::from(body))?;
                stashed = Some(msg_id);
                Item::Alone {
                    headers: Some(headers),
                    reply,
                    payload: Bytes::new(),
                }
            }
        };
        let res = match self
            .send_in_order(subject, LaneKind::Coordinator, item)
            .await
        {
            Err(e) => Err(e),
            Ok(()) => match waiting {
                None => Ok(None),
                Some(w) => self.await_reply(w.rx).await.map(Some),
            },
        };
        if let Some(msg_id) = stashed.filter(|_| expect_reply) {
            // Fetched already if the request got anywhere; otherwise (no responder, timeout)
            // free it now instead of at the next sweep. (An event's waits for its fetch.)
            lock(&self.outbox).take(&msg_id);
        }
        res
    }

    /// Deliveries to one gateway, in order: coalesced when small and lingering, else each
    /// alone (chunked when large). One too large is not sent (the others are); the first
    /// error is returned.
    pub(super) async fn deliver_bodies(
        self: &Arc<Self>,
        subject: String,
        bodies: Vec<Vec<u8>>,
    ) -> Result<(), BusError> {
        let mut first_error = None;
        let mut items = Vec::with_capacity(bodies.len());
        for body in bodies {
            match self.check_size(body.len()) {
                Ok(()) => items.push(match self.envelope(body, None) {
                    Ok(envelope) => envelope,
                    Err(body) => Item::Alone {
                        headers: None,
                        reply: None,
                        payload: Bytes::from(body),
                    },
                }),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let mut results = Vec::with_capacity(items.len());
        if self.lingers() {
            let mut receivers = Vec::with_capacity(items.len());
            let queued = items
                .into_iter()
                .map(|item| {
                    let (tx, rx) = oneshot::channel();
                    receivers.push(rx);
                    Queued {
                        item,
                        done: Some(tx),
                    }
                })
                .collect();
            self.enqueue(subject, LaneKind::Gateway, queued);
            for rx in receivers {
                results.push(sent(rx).await);
            }
        } else {
            for item in items {
                results.push(self.publish_one(&subject, LaneKind::Gateway, item).await);
            }
        }
        for res in results {
            match res {
                Ok(()) => count_sent("delivery"),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// `body` as an envelope to coalesce, when coalescing and it fits a batch; else `body`
    /// back, to go alone.
    pub(super) fn envelope(&self, body: Vec<u8>, reply: Option<String>) -> Result<Item, Vec<u8>> {
        if !self.lingers() {
            return Err(body);
        }
        let entry = BatchEntry {
            body,
            reply,
            error: None,
        };
        if batch_entry_len(&entry) <= self.batch_limit() {
            Ok(Item::Envelope(entry))
        } else {
            Err(entry.body)
        }
    }

    /// Registers a request id whose reply the inbox task will hand over.
    fn expect_reply(&self) -> Waiting<'_> {
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        Waiting {
            id,
            rx,
            _guard: PendingGuard { inner: self, id },
        }
    }

    /// Publishes with a reply subject on this process's inbox and waits for the reply body.
    pub(super) async fn raw_request(
        &self,
        subject: String,
        headers: Option<HeaderMap>,
        payload: Bytes,
    ) -> Result<Bytes, BusError> {
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let _guard = PendingGuard { inner: self, id };
        let reply = self.subjects.reply(id);
        let published = match headers {
            Some(h) => {
                self.client
                    .publish_with_reply_and_headers(subject, reply, h, payload)
                    .await
            }
            None => {
                self.client
                    .publish_with_reply(subject, reply, payload)
                    .await
            }
        };
        published.map_err(unavailable)?;
        self.await_reply(rx).await
    }

    async fn await_reply(
        &self,
        rx: oneshot::Receiver<Result<Bytes, BusError>>,
    ) -> Result<Bytes, BusError> {
        match tokio::time::timeout(self.opts.request_timeout, rx).await {
            Ok(Ok(res)) => res,
            Ok(Err(_)) => Err(BusError::Unavailable("bus closed".into())),
            Err(_) => Err(BusError::Timeout),
        }
    }

    /// Returns once the server has processed everything this connection sent before, so a
    /// subscription made (or removed) before is in effect for every client of that server. A
    /// message to our own inbox proves it: the server handles one connection's operations in
    /// order. (async-nats' `flush` only writes the socket, which proves nothing.) In a NATS
    /// cluster, the change still reaches the other servers asynchronously, shortly after.
    pub(super) async fn barrier(&self) -> Result<(), BusError> {
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let _guard = PendingGuard { inner: self, id };
        self.client
            .publish(self.subjects.reply(id), Bytes::new())
            .await
            .map_err(unavailable)?;
        self.await_reply(rx).await.map(drop)
    }
}

/// A registered request: its id, where its reply arrives, and the guard that unregisters it.
struct Waiting<'a> {
    id: u64,
    rx: oneshot::Receiver<Result<Bytes, BusError>>,
    _guard: PendingGuard<'a>,
}

/// Removes a request's waiter however the request ends (reply, timeout, cancellation).
struct PendingGuard<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.inner.pending).remove(&self.id);
    }
}
