//! The state one `NatsBus` shares with its tasks: the [`Inner`] struct (the client, the
//! subjects, the waiting requests, the large-message buffers and the subscriptions) and its
//! plain accessors. The sending, receiving and serving parts each add methods to
//! `Inner` in their own module; this one depends on none of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use async_nats::Client;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::batch::{BatchWaits, Lanes};
use super::large::{Outbox, Reassembler, HEADROOM};
use super::options::NatsBusOptions;
use super::subjects::Subjects;
use super::subscription::Serving;
use super::telemetry::count_dropped;
use crate::bus::{BusError, ControlEvent, CoordinatorHandler};
use crate::ids::GatewayId;

/// What `request` waits on: the reply's body, or why there is none.
pub(super) type Waiter = oneshot::Sender<Result<Bytes, BusError>>;

pub(super) struct Inner {
    pub(super) client: Client,
    pub(super) opts: NatsBusOptions,
    pub(super) subjects: Subjects,
    /// Source of request ids and message ids; never reused within the process.
    pub(super) next_id: AtomicU64,
    /// Random per connection, so message ids of two processes never collide even when they
    /// share a node name by mistake.
    pub(super) nonce: String,
    /// Requests waiting for a reply, by id. The inbox task sends into an entry; the waiter
    /// removes its own entry (guard) whether it got a reply, timed out or was cancelled.
    pub(super) pending: Mutex<HashMap<u64, Waiter>>,
    /// Large messages published as stand-ins on a queue subject, waiting to be fetched.
    pub(super) outbox: Mutex<Outbox>,
    /// Chunks of large messages received so far.
    pub(super) reassembly: Mutex<Reassembler>,
    /// Messages waiting to be coalesced, per subject; each lane's flusher task (`coalesce`)
    /// takes from it, callers push to it.
    pub(super) lanes: Mutex<Lanes>,
    /// Requests carried by each coalesced request batch, so "no responders" to the batch
    /// reaches them. Written by the flushers, read by the inbox task, pruned by the sweeper.
    pub(super) batch_waits: Mutex<BatchWaits>,
    /// Given by `serve_coordinator`; read by every coordinator subscription per message.
    pub(super) handler: RwLock<Option<Arc<dyn CoordinatorHandler>>>,
    /// Serialises the (async) subscribe / unsubscribe calls below, so two concurrent
    /// serve/unserve calls never leave a partition subscribed twice or half-stopped.
    pub(super) admin: tokio::sync::Mutex<()>,
    /// Subscription tasks, stopped by unserve / re-subscribe and aborted when the bus drops.
    pub(super) any: Mutex<Option<Serving>>,
    pub(super) partitions: Mutex<HashMap<u16, Serving>>,
    pub(super) gateways: Mutex<HashMap<GatewayId, Serving>>,
    pub(super) control: Mutex<Option<Serving>>,
    /// Local receivers of control events; the one `ctl` subscription fans out to them.
    pub(super) control_subscribers: Mutex<Vec<mpsc::Sender<ControlEvent>>>,
    /// The inbox and sweeper tasks, aborted when the bus drops.
    pub(super) background: Mutex<Vec<JoinHandle<()>>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks (plain map operations); should it happen, the
    // data is still consistent, so carry on rather than poison the whole bus.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl Inner {
    pub(super) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(super) fn new_msg_id(&self) -> String {
        format!("{}-{}", self.nonce, self.next_id())
    }

    /// The largest payload sent as one NATS message; read per message because a reconnect may
    /// land on a server with another limit.
    pub(super) fn chunk_limit(&self) -> usize {
        let max_payload = self.client.server_info().max_payload;
        // Half the payload at most for headroom, should a server announce a tiny limit.
        max_payload
            .saturating_sub(HEADROOM.min(max_payload / 2))
            .max(1)
    }

    /// Whether small messages are coalesced (`batch_linger` above zero).
    pub(super) fn lingers(&self) -> bool {
        !self.opts.batch_linger.is_zero()
    }

    /// The largest coalesced NATS message: the configured bound, and always below the chunk
    /// limit. An envelope above it is published alone.
    pub(super) fn batch_limit(&self) -> usize {
        self.opts.batch_max_bytes.min(self.chunk_limit())
    }

    pub(super) fn check_size(&self, len: usize) -> Result<(), BusError> {
        let limit = self.opts.max_message_bytes;
        if len > limit {
            count_dropped("too_large");
            tracing::warn!(bytes = len, limit, "bus message too large, not sent");
            return Err(BusError::TooLarge { bytes: len, limit });
        }
        Ok(())
    }

    pub(super) fn handler(&self) -> Option<Arc<dyn CoordinatorHandler>> {
        self.handler
            .read()
            .map(|h| h.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }
}
