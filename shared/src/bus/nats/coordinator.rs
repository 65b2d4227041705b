//! The coordinator side: subscribing to the partition and `any` subjects in the queue group,
//! fetching large messages announced by a stand-in, unpacking coalesced batches, handing
//! requests and events to the [`CoordinatorHandler`](crate::bus::CoordinatorHandler), and
//! replying, coalesced to requesters that batch (or refusing malformed input so its sender
//! fails fast).

use std::sync::Arc;

use async_nats::Message;
use bytes::Bytes;

use super::batch::{Item, LaneKind};
use super::headers::{header, Pull, H_BATCH, H_CHUNK, H_PULL};
use super::state::{unavailable, Inner};
use super::subjects::QUEUE_GROUP;
use super::subscription::{spawn_subscription, Flow, Serving};
use super::telemetry::{count_dropped, count_received, count_sent};
use crate::bus::wire::{self, BatchEntry, Inbound};
use crate::bus::{BusError, CoordinatorReply};

/// How a request's reply is to be sent: alone, or coalesced with other replies to the same
/// inbox, which only a requester that sent a batch (and so reads batches) is sent.
#[derive(Debug, Clone, Copy)]
enum Replies {
    Single,
    Coalesced,
}

impl Inner {
    /// A message on a coordinator subject (`a2s.*` or `any`).
    async fn on_coordinator_message(self: &Arc<Self>, msg: Message) {
        let reply = msg.reply.as_ref().map(|r| r.to_string());
        if let Some(value) = header(&msg, H_PULL) {
            match Pull::parse(value) {
                Some(pull) if self.subjects.is_inbox(pull.fetch) => {
                    let (fetch, msg_id) = (pull.fetch.to_string(), pull.msg_id.to_string());
                    let len = pull.len;
                    tokio::spawn(self.clone().pull_and_dispatch(fetch, msg_id, len, reply));
                }
                _ => {
                    self.refuse(reply, "malformed large message announcement")
                        .await
                }
            }
            return;
        }
        if header(&msg, H_CHUNK).is_some() {
            // Chunks never go to a queue group (see the module docs).
            self.refuse(reply, "unexpected chunk on a coordinator subject")
                .await;
            return;
        }
        if header(&msg, H_BATCH).is_some() {
            self.dispatch_batch(&msg.payload, reply).await;
            return;
        }
        self.dispatch(msg.payload, reply, Replies::Single).await;
    }

    /// A coalesced message: each entry handled in order as if it had come alone. The
    /// batch's own reply subject only ever hears of the batch as a whole (malformed).
    async fn dispatch_batch(self: &Arc<Self>, payload: &[u8], reply: Option<String>) {
        match wire::decode_batch(payload) {
            Ok(entries) => {
                for entry in entries {
                    let body = Bytes::from(entry.body);
                    self.dispatch(body, entry.reply, Replies::Coalesced).await;
                }
            }
            Err(e) => self.refuse(reply, &e.to_string()).await,
        }
    }

    /// Fetches a large message announced by a stand-in, then handles it like any other.
    async fn pull_and_dispatch(
        self: Arc<Self>,
        fetch: String,
        msg_id: String,
        len: usize,
        reply: Option<String>,
    ) {
        if len > self.opts.max_message_bytes {
            count_dropped("too_large");
            self.refuse_quietly(reply, "message too large").await;
            return;
        }
        match self.raw_request(fetch, None, Bytes::from(msg_id)).await {
            Ok(body) => self.dispatch(body, reply, Replies::Single).await,
            Err(e) => {
                count_dropped("pull_failed");
                tracing::warn!(error = %e, "could not fetch a large bus message");
                self.refuse_quietly(reply, "large message could not be fetched")
                    .await;
            }
        }
    }

    /// Decodes a coordinator message and hands it to the handler: requests in their own task
    /// (replying when done), events inline so they keep their order.
    async fn dispatch(self: &Arc<Self>, body: Bytes, reply: Option<String>, replies: Replies) {
        let Some(handler) = self.handler() else {
            // Subscriptions are only made after `serve_coordinator`; unreachable in practice.
            self.refuse_quietly(reply, "no coordinator handler").await;
            return;
        };
        match wire::decode_inbound(&body) {
            Ok(Inbound::Event(ev)) => {
                count_received("event");
                handler.event(ev).await;
            }
            Ok(Inbound::Request(req)) => {
                count_received("request");
                let Some(reply) = reply else {
                    count_dropped("malformed");
                    tracing::warn!("bus request without a reply subject dropped");
                    return;
                };
                let inner = self.clone();
                tokio::spawn(async move {
                    let answer = handler.handle(req).await;
                    inner.send_reply(reply, answer, replies).await;
                });
            }
            Err(e) => self.refuse(reply, &e.to_string()).await,
        }
    }

    async fn send_reply(
        self: &Arc<Self>,
        reply: String,
        answer: CoordinatorReply,
        replies: Replies,
    ) {
        let body = wire::encode_reply(answer);
        let checked = self.check_size(body.len());
        let lane = match replies {
            Replies::Coalesced if self.lingers() => self.subjects.batch_inbox_of(&reply),
            _ => None,
        };
        let res = match (checked, lane) {
            (Ok(()), Some(lane)) => {
                count_sent("reply");
                match self.envelope(body, Some(reply.clone())) {
                    Ok(envelope) => self.send_in_order(lane, LaneKind::Replies, envelope).await,
                    // Replies need no order among themselves: a large one goes at once.
                    Err(body) => self.publish_direct(reply, Bytes::from(body)).await,
                }
            }
            (Ok(()), None) => {
                count_sent("reply");
                self.publish_direct(reply, Bytes::from(body)).await
            }
            // The requester learns at once rather than at its timeout.
            (Err(e), Some(lane)) => {
                let error = BatchEntry {
                    body: Vec::new(),
                    reply: Some(reply),
                    error: Some(e.to_string()),
                };
                let item = Item::Envelope(error);
                self.send_in_order(lane, LaneKind::Replies, item).await
            }
            (Err(e), None) => self.publish_error(reply, &e.to_string()).await,
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "could not publish a bus reply");
        }
    }

    /// Counts and logs a malformed message, answering its sender if it waits for a reply.
    async fn refuse(&self, reply: Option<String>, why: &str) {
        count_dropped("malformed");
        tracing::warn!(reason = why, "malformed bus message dropped");
        self.refuse_quietly(reply, why).await;
    }

    /// Answers a waiting sender with an error (the drop is counted by the caller).
    async fn refuse_quietly(&self, reply: Option<String>, why: &str) {
        if let Some(reply) = reply {
            if let Err(e) = self.publish_error(reply, why).await {
                tracing::debug!(error = %e, "could not answer a refused bus message");
            }
        }
    }

    /// Subscribes to a coordinator subject in the queue group and makes sure the server knows
    /// before returning, so a request sent right after finds it.
    pub(super) async fn serve_subject(
        self: &Arc<Self>,
        subject: String,
    ) -> Result<Serving, BusError> {
        let sub = self
            .client
            .queue_subscribe(subject, QUEUE_GROUP.into())
            .await
            .map_err(unavailable)?;
        self.barrier().await?;
        let inner = self.clone();
        Ok(spawn_subscription(sub, move |msg| {
            let inner = inner.clone();
            async move {
                inner.on_coordinator_message(msg).await;
                Flow::Continue
            }
        }))
    }
}
