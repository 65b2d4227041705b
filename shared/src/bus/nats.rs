//! The cluster implementation of the [`Bus`] seam over core NATS (async-nats).
//!
//! # Subjects
//!
//! Every subject starts with the configured prefix (`ampora` by default; tests use a random one
//! so parallel runs on one server never see each other):
//!
//! | subject | carries | subscribers |
//! |---|---|---|
//! | `<prefix>.a2s.<partition>` | partition-routed requests **and** events | coordinators serving the partition, queue group `coord` |
//! | `<prefix>.any` | [`Route::Any`] requests and events | every coordinator, queue group `coord` |
//! | `<prefix>.gw.<gateway>` | [`GatewayMessage`]s for one gateway | that gateway |
//! | `<prefix>.ctl` | [`ControlEvent`] broadcasts | every process that called `subscribe_control`, plain subscription (the sender hears its own) |
//! | `<prefix>.inbox.<node>.>` | replies (`r.<id>`), and large-message fetches (`fetch`) | the one process named `node` |
//!
//! Requests and events share the partition subject so that an agent's `Disconnected` event is
//! ordered after its frames. The queue group means that during a hand-over, when two
//! coordinators briefly serve one partition, each message is still handled once. Node and
//! gateway ids are made single subject tokens by replacing `.`, `*`, `>` and whitespace with
//! `_` (ids differing only there would collide; node ids carry a random suffix).
//!
//! # Wire format
//!
//! Payloads are the protobuf envelopes of `proto/bus.proto` (package `ampora.bus.v1`), which
//! embed the OpAMP `AgentToServer` / `ServerToAgent` messages unchanged: a
//! `CoordinatorMessage` (a `CoordinatorRequest` or a `CoordinatorEvent`) on the coordinator
//! subjects, a `CoordinatorReply` on the inbox, a `GatewayMessage` on `gw.*`, a `ControlEvent`
//! on `ctl`. UIDs travel as 16 bytes, addresses as text, the transport as an enum. A message
//! that does not decode, or decodes to something invalid (a 15-byte UID, an unknown enum), is
//! logged, counted as `ampora_bus_messages_dropped_total{reason="malformed"}` and dropped; a
//! malformed request is additionally answered with an error header so its sender fails fast.
//! Three headers carry the transport's own signalling, never payload:
//!
//! - `Ampora-Chunk: <msg-id> <index> <count> <total-bytes>` on each chunk of a large message;
//! - `Ampora-Pull: <fetch-subject> <msg-id> <total-bytes>` on a large message's stand-in;
//! - `Ampora-Error: <text>` on a reply that replaces the real one (the request was malformed,
//!   the reply too large, the pulled message gone); the requester gets
//!   [`BusError::Unavailable`] at once instead of waiting for its timeout.
//!
//! # Requests and replies
//!
//! Each process holds one wildcard subscription on its inbox and a map from request id to the
//! waiting caller. A request is published with reply subject `<prefix>.inbox.<node>.r.<id>` and
//! waits at most `request_timeout` ([`BusError::Timeout`]). When nobody is subscribed to the
//! target, the NATS server itself answers on the reply subject with a 503 status, which becomes
//! [`BusError::NoResponder`]: that is how an unserved partition is detected, without
//! waiting. The coordinator handles every request in its own task and publishes the reply to
//! the request's reply subject; per-agent order holds because a gateway keeps at most one
//! request in flight per agent connection. Events are handled in arrival order, inline in
//! their subscription's task.
//!
//! `serve_partitions`, `unserve_partitions`, `subscribe_gateway` and `subscribe_control`
//! return once the server has processed the (un)subscription: they end with a message to the
//! process's own inbox, which the server handles after everything the connection sent before
//! (async-nats' `flush` only writes the socket). So a request sent after `serve_partitions`
//! returns finds the coordinator, and one sent after `unserve_partitions` returns gets
//! `NoResponder` unless another coordinator serves the partition. (In a NATS cluster the
//! interest reaches the other servers shortly after, asynchronously.) Messages a coordinator
//! had already received when it unserves a partition are still handled, not dropped.
//!
//! # Large messages
//!
//! A NATS message must fit the server's `max_payload` (1 MiB by default), headers included;
//! configs can be larger. Any encoded message bigger than `max_payload` minus 8 KiB of
//! headroom travels in one of two ways:
//!
//! - **to a plain subscription** (a reply to an inbox, a delivery to a gateway, a control
//!   broadcast) it is split into chunks published back to back on the same subject, each with
//!   an `Ampora-Chunk` header. One publisher's messages reach a subscriber in order, so every
//!   receiver (each control subscriber included) reassembles the chunks in sequence.
//! - **to a queue group** (`a2s.*`, `any`), chunks could be spread over several members, so
//!   the sender keeps the encoded message in a local outbox and publishes only a small
//!   stand-in with an `Ampora-Pull` header (and the request's reply subject). The one member
//!   the queue group picks then fetches the body with a request to the sender's
//!   `<prefix>.inbox.<node>.fetch`, which is answered by chunks on that member's own inbox as
//!   above. The stand-in is what the queue group routes, so `NoResponder` and "handled once"
//!   hold unchanged; the cost is one extra round trip, for large messages only. An event
//!   fetched this way is handled after the fetch, so it may overtake smaller events sent later.
//!
//! Partial messages are buffered up to 4 × `max_message_bytes` in total per process and dropped
//! after `request_timeout` (`reason="incomplete_chunks"`, as are chunk sequences with a gap, e.g.
//! after a reconnect); a message that would overflow the buffer is refused at its first chunk
//! (`reason="buffer_full"`). Outbox entries nobody fetched within `request_timeout` are dropped too
//! (`reason="unfetched"`); the outbox has the same bound, and when full, sending another large
//! message fails with [`BusError::Unavailable`]. A message whose encoding exceeds
//! `max_message_bytes` is never sent: the caller gets [`BusError::TooLarge`]
//! (`reason="too_large"`), and a receiver refuses chunks that announce more.
//!
//! # Failure semantics
//!
//! At most once, like the bus contract: no retries, no persistence. `notify`, `deliver` and
//! `broadcast` return once the message is handed to the client; unlike
//! [`InProcessBus`](super::InProcessBus) they cannot report that nobody was listening. The
//! connection is named after the node and reconnects forever; while disconnected, publishes queue
//! in the client and requests time out. A subscriber that falls behind loses messages (the client
//! reports a slow consumer, counted as `reason="slow_consumer"`), and a local queue that is full
//! drops the message (`reason="queue_full"`). All of this the protocol heals, as the module docs of
//! [`super`] explain.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap, Message, StatusCode, Subscriber};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::wire::{self, Inbound};
use super::{
    Bus, BusError, ControlEvent, CoordinatorEvent, CoordinatorHandler, CoordinatorReply,
    CoordinatorRequest, GatewayMessage, Route, CONTROL_QUEUE, GATEWAY_QUEUE,
};
use crate::ids::GatewayId;

/// The prefix of every subject unless configured otherwise.
pub const DEFAULT_SUBJECT_PREFIX: &str = "ampora";
/// The largest logical message unless configured otherwise.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// How long a request waits for its reply unless configured otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The queue group of every coordinator subscription.
const QUEUE_GROUP: &str = "coord";

const H_CHUNK: &str = "Ampora-Chunk";
const H_PULL: &str = "Ampora-Pull";
const H_ERROR: &str = "Ampora-Error";

/// Part of `max_payload` left for headers: NATS counts them against the limit, and ours are
/// well under 1 KiB.
const HEADROOM: usize = 8 * 1024;
/// Bytes buffered for reassembly (and, separately, in the outbox) are bounded by this many
/// maximal messages.
const BUFFERED_MESSAGES: usize = 4;
/// How often stale partial messages and unfetched outbox entries are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

// Metric names (see `describe_metrics`).
const SENT: &str = "ampora_bus_messages_sent_total";
const RECEIVED: &str = "ampora_bus_messages_received_total";
const DROPPED: &str = "ampora_bus_messages_dropped_total";
const REQUESTS: &str = "ampora_bus_requests_total";
const REQUEST_DURATION: &str = "ampora_bus_request_duration_seconds";
const CHUNKED: &str = "ampora_bus_chunked_messages_total";
const BUFFERED: &str = "ampora_bus_buffered_bytes";

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
/// dashboards and alerts see them before the first event. Called by [`NatsBus::connect`].
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
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time from sending a bus request to its reply (or failure)"
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

fn count_sent(kind: &'static str) {
    metrics::counter!(SENT, "kind" => kind).increment(1);
}

fn count_received(kind: &'static str) {
    metrics::counter!(RECEIVED, "kind" => kind).increment(1);
}

fn count_dropped(reason: &'static str) {
    metrics::counter!(DROPPED, "reason" => reason).increment(1);
}

/// How to reach NATS and how to name things on it.
#[derive(Debug, Clone)]
pub struct NatsBusOptions {
    /// A NATS URL (`nats://host:4222`), or several separated by commas.
    pub url: String,
    /// First token(s) of every subject (default `ampora`); processes that must talk share it.
    pub subject_prefix: String,
    /// This process's id, unique in the cluster: names its inbox and its NATS connection.
    pub node: String,
    /// How long a request waits for its reply; also how long partial large messages are kept.
    pub request_timeout: Duration,
    /// The largest logical message (encoded) sent or accepted (default 64 MiB).
    pub max_message_bytes: usize,
}

impl NatsBusOptions {
    /// Defaults for everything but the URL; the node id is random.
    pub fn new(url: impl Into<String>) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            url: url.into(),
            subject_prefix: DEFAULT_SUBJECT_PREFIX.into(),
            node: format!("node-{}", &id[..12]),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

impl Default for NatsBusOptions {
    fn default() -> Self {
        Self::new("nats://127.0.0.1:4222")
    }
}

/// The NATS bus. One per process (its node id names its inbox); share it as `Arc<dyn Bus>`.
/// Dropping it stops its subscriptions.
pub struct NatsBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("node", &self.inner.opts.node)
            .field("subject_prefix", &self.inner.opts.subject_prefix)
            .finish_non_exhaustive()
    }
}

/// A subscription's task and the way to stop it cleanly (unsubscribe, then return).
struct Serving {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Serving {
    /// Unsubscribes and waits for the task to finish the message it is on.
    async fn stop(self) {
        let _ = self.stop.send(());
        // The task only ends by itself or by this signal; a panic in it is already logged.
        let _ = self.task.await;
    }
}

/// What `request` waits on: the reply's body, or why there is none.
type Waiter = oneshot::Sender<Result<Bytes, BusError>>;

struct Inner {
    client: Client,
    opts: NatsBusOptions,
    subjects: Subjects,
    /// Source of request ids and message ids; never reused within the process.
    next_id: AtomicU64,
    /// Random per connection, so message ids of two processes never collide even when they
    /// share a node name by mistake.
    nonce: String,
    /// Requests waiting for a reply, by id. The inbox task sends into an entry; the waiter
    /// removes its own entry (guard) whether it got a reply, timed out or was cancelled.
    pending: Mutex<HashMap<u64, Waiter>>,
    /// Large messages published as stand-ins on a queue subject, waiting to be fetched.
    outbox: Mutex<Outbox>,
    /// Chunks of large messages received so far.
    reassembly: Mutex<Reassembler>,
    /// Given by `serve_coordinator`; read by every coordinator subscription per message.
    handler: RwLock<Option<Arc<dyn CoordinatorHandler>>>,
    /// Serialises the (async) subscribe / unsubscribe calls below, so two concurrent
    /// serve/unserve calls never leave a partition subscribed twice or half-stopped.
    admin: tokio::sync::Mutex<()>,
    /// Subscription tasks, stopped by unserve / re-subscribe and aborted when the bus drops.
    any: Mutex<Option<Serving>>,
    partitions: Mutex<HashMap<u16, Serving>>,
    gateways: Mutex<HashMap<GatewayId, Serving>>,
    control: Mutex<Option<Serving>>,
    /// Local receivers of control events; the one `ctl` subscription fans out to them.
    control_subscribers: Mutex<Vec<mpsc::Sender<ControlEvent>>>,
    /// The inbox and sweeper tasks, aborted when the bus drops.
    background: Mutex<Vec<JoinHandle<()>>>,
}

struct Subjects {
    prefix: String,
    /// `<prefix>.inbox.<node>.`, the start of every subject this process's inbox receives.
    inbox: String,
    /// Where other processes fetch this one's large messages from.
    fetch: String,
}

impl Subjects {
    fn new(prefix: &str, node: &str) -> Self {
        let inbox = format!("{prefix}.inbox.{}.", token(node));
        Self {
            prefix: prefix.to_string(),
            fetch: format!("{inbox}fetch"),
            inbox,
        }
    }

    fn route(&self, route: Route) -> String {
        match route {
            Route::Partition(p) => self.partition(p),
            Route::Any => format!("{}.any", self.prefix),
        }
    }

    fn partition(&self, p: u16) -> String {
        format!("{}.a2s.{p}", self.prefix)
    }

    fn gateway(&self, gateway: &GatewayId) -> String {
        format!("{}.gw.{}", self.prefix, token(&gateway.0))
    }

    fn control(&self) -> String {
        format!("{}.ctl", self.prefix)
    }

    fn reply(&self, id: u64) -> String {
        format!("{}r.{id}", self.inbox)
    }

    fn is_inbox(&self, subject: &str) -> bool {
        subject
            .strip_prefix(&self.prefix)
            .is_some_and(|rest| rest.starts_with(".inbox."))
    }
}

/// `s` as one subject token: the characters NATS gives meaning to become `_`.
fn token(s: &str) -> String {
    if s.is_empty() {
        return "_".into();
    }
    s.chars()
        .map(|c| match c {
            '.' | '*' | '>' => '_',
            c if c.is_whitespace() || c.is_control() => '_',
            c => c,
        })
        .collect()
}

fn validate_prefix(prefix: &str) -> Result<(), BusError> {
    let ok = !prefix.is_empty()
        && prefix.split('.').all(|t| {
            !t.is_empty()
                && !t
                    .chars()
                    .any(|c| c == '*' || c == '>' || c.is_whitespace() || c.is_control())
        });
    if ok {
        Ok(())
    } else {
        Err(BusError::Unavailable(format!(
            "invalid subject prefix {prefix:?}: dot-separated tokens without wildcards or spaces"
        )))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks (plain map operations); should it happen, the
    // data is still consistent, so carry on rather than poison the whole bus.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl NatsBus {
    /// Connects and starts the inbox. Fails if NATS is unreachable now (later outages are
    /// reconnected forever) or the options are invalid.
    pub async fn connect(opts: NatsBusOptions) -> Result<NatsBus, BusError> {
        validate_prefix(&opts.subject_prefix)?;
        describe_metrics();
        let client = async_nats::ConnectOptions::new()
            .name(format!("ampora-{}", opts.node))
            // Unlimited, which is also the default: a coordinator or gateway outlives any NATS
            // outage and never has to be restarted to reconnect.
            .max_reconnects(None)
            .event_callback(|event| async move { on_connection_event(event) })
            .connect(opts.url.as_str())
            .await
            .map_err(|e| {
                BusError::Unavailable(format!("cannot connect to NATS at {}: {e}", opts.url))
            })?;
        let budget = opts.max_message_bytes.saturating_mul(BUFFERED_MESSAGES);
        let nonce = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let inner = Arc::new(Inner {
            subjects: Subjects::new(&opts.subject_prefix, &opts.node),
            client,
            next_id: AtomicU64::new(1),
            nonce,
            pending: Mutex::new(HashMap::new()),
            outbox: Mutex::new(Outbox::new(budget)),
            reassembly: Mutex::new(Reassembler::new(budget, opts.max_message_bytes)),
            handler: RwLock::new(None),
            admin: tokio::sync::Mutex::new(()),
            any: Mutex::new(None),
            partitions: Mutex::new(HashMap::new()),
            gateways: Mutex::new(HashMap::new()),
            control: Mutex::new(None),
            control_subscribers: Mutex::new(Vec::new()),
            background: Mutex::new(Vec::new()),
            opts,
        });
        let inbox = inner
            .client
            .subscribe(format!("{}>", inner.subjects.inbox))
            .await
            .map_err(unavailable)?;
        let inbox_task = tokio::spawn(run_inbox(inner.clone(), inbox));
        let sweeper = tokio::spawn(run_sweeper(inner.clone()));
        lock(&inner.background).extend([inbox_task, sweeper]);
        let bus = NatsBus { inner };
        // Proves the inbox works end to end before anyone relies on it.
        bus.inner.barrier().await?;
        Ok(bus)
    }
}

impl Drop for NatsBus {
    fn drop(&mut self) {
        // The tasks hold the shared state; stopping them is what lets it (and the NATS
        // connection) go. Requests being handled right now still finish and reply.
        let inner = &self.inner;
        for task in lock(&inner.background).drain(..) {
            task.abort();
        }
        let mut serving: Vec<Serving> = Vec::new();
        serving.extend(lock(&inner.any).take());
        serving.extend(lock(&inner.control).take());
        serving.extend(lock(&inner.partitions).drain().map(|(_, s)| s));
        serving.extend(lock(&inner.gateways).drain().map(|(_, s)| s));
        for s in serving {
            s.task.abort();
        }
    }
}

fn on_connection_event(event: async_nats::Event) {
    match event {
        async_nats::Event::Connected => tracing::info!("nats connected"),
        async_nats::Event::Disconnected => tracing::warn!("nats disconnected, reconnecting"),
        async_nats::Event::LameDuckMode => {
            tracing::warn!("nats server entering lame duck mode, will reconnect elsewhere")
        }
        async_nats::Event::SlowConsumer(sid) => {
            count_dropped("slow_consumer");
            tracing::warn!(sid, "nats subscription too slow, messages dropped");
        }
        other => tracing::warn!(event = %other, "nats connection event"),
    }
}

/// Spawns the task of one subscription: `on_message` for each message until `on_message` says
/// stop, or until the subscription ends, or until stopped through [`Serving::stop`]. Then it
/// unsubscribes; when stopped, it still handles the messages the client had already received
/// (a partition handed over keeps the requests that reached this coordinator first).
fn spawn_subscription<F, Fut>(mut sub: Subscriber, mut on_message: F) -> Serving
where
    F: FnMut(Message) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Flow> + Send,
{
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let drain = loop {
            tokio::select! {
                biased;
                _ = &mut stopped => break true,
                msg = sub.next() => match msg {
                    Some(msg) => {
                        if let Flow::Stop = on_message(msg).await {
                            break false;
                        }
                    }
                    None => return,
                },
            }
        };
        if let Err(e) = sub.unsubscribe().await {
            tracing::debug!(error = %e, "nats unsubscribe failed (connection closing)");
        }
        if drain {
            // `unsubscribe` closed the client's queue: this ends with what was already in it.
            while let Some(msg) = sub.next().await {
                if let Flow::Stop = on_message(msg).await {
                    break;
                }
            }
        }
    });
    Serving { stop, task }
}

/// Whether a subscription goes on after a message.
enum Flow {
    Continue,
    Stop,
}

async fn run_inbox(inner: Arc<Inner>, mut sub: Subscriber) {
    while let Some(msg) = sub.next().await {
        let Some(rest) = msg.subject.as_str().strip_prefix(&inner.subjects.inbox) else {
            continue;
        };
        if rest == "fetch" {
            // Publishing a large body takes a while; keep the inbox free for replies.
            tokio::spawn(serve_fetch(inner.clone(), msg));
        } else if let Some(id) = rest.strip_prefix("r.").and_then(|s| s.parse::<u64>().ok()) {
            inner.on_reply(id, msg);
        } else {
            count_dropped("malformed");
            tracing::debug!(subject = %msg.subject, "unexpected inbox subject");
        }
    }
}

async fn run_sweeper(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let timeout = inner.opts.request_timeout;
        let incomplete = lock(&inner.reassembly).expire(now, timeout);
        let unfetched = lock(&inner.outbox).expire(now, timeout);
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
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn new_msg_id(&self) -> String {
        format!("{}-{}", self.nonce, self.next_id())
    }

    /// The largest payload sent as one NATS message; read per message because a reconnect may
    /// land on a server with another limit.
    fn chunk_limit(&self) -> usize {
        let max_payload = self.client.server_info().max_payload;
        // Half the payload at most for headroom, should a server announce a tiny limit.
        max_payload
            .saturating_sub(HEADROOM.min(max_payload / 2))
            .max(1)
    }

    fn check_size(&self, len: usize) -> Result<(), BusError> {
        let limit = self.opts.max_message_bytes;
        if len > limit {
            count_dropped("too_large");
            tracing::warn!(bytes = len, limit, "bus message too large, not sent");
            return Err(BusError::TooLarge { bytes: len, limit });
        }
        Ok(())
    }

    fn handler(&self) -> Option<Arc<dyn CoordinatorHandler>> {
        self.handler
            .read()
            .map(|h| h.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Publishes `body` on a plain (non-queue) subject, in chunks if it is large.
    async fn publish_direct(&self, subject: String, body: Bytes) -> Result<(), BusError> {
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

    async fn publish_error(&self, subject: String, text: &str) -> Result<(), BusError> {
        let mut headers = HeaderMap::new();
        headers.insert(H_ERROR, text);
        self.client
            .publish_with_headers(subject, headers, Bytes::new())
            .await
            .map_err(unavailable)
    }

    /// Keeps a large body for one fetch and returns the `Ampora-Pull` header announcing it.
    fn stash(&self, body: Bytes) -> Result<(String, HeaderMap), BusError> {
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

    /// Publishes one message on a coordinator (queue group) subject: as is when it fits, else
    /// as a stand-in for a fetch. Waits for the reply when there is one to wait for.
    async fn send_to_coordinators(
        self: &Arc<Self>,
        subject: String,
        body: Vec<u8>,
        expect_reply: bool,
    ) -> Result<Option<Bytes>, BusError> {
        self.check_size(body.len())?;
        let body = Bytes::from(body);
        if body.len() <= self.chunk_limit() {
            return if expect_reply {
                self.raw_request(subject, None, body).await.map(Some)
            } else {
                self.client
                    .publish(subject, body)
                    .await
                    .map(|()| None)
                    .map_err(unavailable)
            };
        }
        let (msg_id, headers) = self.stash(body)?;
        if !expect_reply {
            // The receiver fetches it; the sweeper drops it if nobody does.
            return self
                .client
                .publish_with_headers(subject, headers, Bytes::new())
                .await
                .map(|()| None)
                .map_err(unavailable);
        }
        let res = self.raw_request(subject, Some(headers), Bytes::new()).await;
        // Fetched already if the request got anywhere; otherwise (no responder, timeout) free
        // it now instead of at the next sweep.
        lock(&self.outbox).take(&msg_id);
        res.map(Some)
    }

    /// Publishes with a reply subject on this process's inbox and waits for the reply body.
    async fn raw_request(
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
    async fn barrier(&self) -> Result<(), BusError> {
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
        if let Some(outcome) = outcome {
            if let Some(waiter) = lock(&self.pending).remove(&id) {
                // The waiter may have timed out just now; then nobody needs this.
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
        self.dispatch(msg.payload, reply).await;
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
            Ok(body) => self.dispatch(body, reply).await,
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
    async fn dispatch(self: &Arc<Self>, body: Bytes, reply: Option<String>) {
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
                    inner.send_reply(reply, answer).await;
                });
            }
            Err(e) => self.refuse(reply, &e.to_string()).await,
        }
    }

    async fn send_reply(&self, reply: String, answer: CoordinatorReply) {
        let body = wire::encode_reply(answer);
        let res = match self.check_size(body.len()) {
            Ok(()) => {
                count_sent("reply");
                self.publish_direct(reply, Bytes::from(body)).await
            }
            // The requester learns at once rather than at its timeout.
            Err(e) => self.publish_error(reply, &e.to_string()).await,
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
    async fn serve_subject(self: &Arc<Self>, subject: String) -> Result<Serving, BusError> {
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

fn header<'a>(msg: &'a Message, name: &str) -> Option<&'a str> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
}

/// `Ampora-Pull: <fetch-subject> <msg-id> <total-bytes>`.
struct Pull<'a> {
    fetch: &'a str,
    msg_id: &'a str,
    len: usize,
}

impl<'a> Pull<'a> {
    fn parse(value: &'a str) -> Option<Self> {
        let mut parts = value.split(' ');
        let pull = Pull {
            fetch: parts.next()?,
            msg_id: parts.next()?,
            len: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(pull)
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn request(
        &self,
        route: Route,
        req: CoordinatorRequest,
    ) -> Result<CoordinatorReply, BusError> {
        let started = Instant::now();
        let inner = &self.inner;
        let body = wire::encode_request(req);
        let res = inner
            .send_to_coordinators(inner.subjects.route(route), body, true)
            .await
            .and_then(|reply| {
                let body = reply.unwrap_or_default();
                wire::decode_reply(&body).map_err(|e| {
                    count_dropped("malformed");
                    tracing::warn!(error = %e, "malformed bus reply dropped");
                    BusError::Unavailable(e.to_string())
                })
            });
        let outcome = match &res {
            Ok(_) => {
                count_received("reply");
                "ok"
            }
            Err(BusError::NoResponder) => "no_responder",
            Err(BusError::Timeout) => "timeout",
            Err(BusError::TooLarge { .. }) => "too_large",
            Err(BusError::Unavailable(_)) => "error",
        };
        if outcome != "too_large" {
            count_sent("request");
        }
        metrics::counter!(REQUESTS, "outcome" => outcome).increment(1);
        metrics::histogram!(REQUEST_DURATION).record(started.elapsed().as_secs_f64());
        res
    }

    async fn notify(&self, route: Route, ev: CoordinatorEvent) -> Result<(), BusError> {
        let inner = &self.inner;
        let body = wire::encode_event(ev);
        inner
            .send_to_coordinators(inner.subjects.route(route), body, false)
            .await?;
        count_sent("event");
        Ok(())
    }

    async fn deliver(&self, gateway: &GatewayId, msg: GatewayMessage) -> Result<(), BusError> {
        let inner = &self.inner;
        let body = wire::encode_gateway(msg);
        inner.check_size(body.len())?;
        inner
            .publish_direct(inner.subjects.gateway(gateway), Bytes::from(body))
            .await?;
        count_sent("delivery");
        Ok(())
    }

    async fn serve_coordinator(
        &self,
        handler: Arc<dyn CoordinatorHandler>,
    ) -> Result<(), BusError> {
        let inner = &self.inner;
        let _admin = inner.admin.lock().await;
        *inner.handler.write().unwrap_or_else(|e| e.into_inner()) = Some(handler);
        if lock(&inner.any).is_none() {
            let serving = inner
                .serve_subject(inner.subjects.route(Route::Any))
                .await?;
            *lock(&inner.any) = Some(serving);
        }
        Ok(())
    }

    async fn serve_partitions(&self, partitions: &[u16]) -> Result<(), BusError> {
        let inner = &self.inner;
        let _admin = inner.admin.lock().await;
        if inner.handler().is_none() {
            return Err(BusError::Unavailable(
                "serve_coordinator must be called before serve_partitions".into(),
            ));
        }
        for &p in partitions {
            if lock(&inner.partitions).contains_key(&p) {
                continue;
            }
            let serving = inner.serve_subject(inner.subjects.partition(p)).await?;
            lock(&inner.partitions).insert(p, serving);
        }
        Ok(())
    }

    async fn unserve_partitions(&self, partitions: &[u16]) -> Result<(), BusError> {
        let inner = &self.inner;
        let _admin = inner.admin.lock().await;
        let stopping: Vec<Serving> = {
            let mut served = lock(&inner.partitions);
            partitions.iter().filter_map(|p| served.remove(p)).collect()
        };
        for serving in stopping {
            serving.stop().await;
        }
        // The server has processed the unsubscribes once this returns, so a request sent
        // after `unserve_partitions` no longer reaches this coordinator.
        inner.barrier().await
    }

    async fn broadcast(&self, ev: ControlEvent) -> Result<(), BusError> {
        let inner = &self.inner;
        let body = wire::encode_control(ev);
        inner.check_size(body.len())?;
        inner
            .publish_direct(inner.subjects.control(), Bytes::from(body))
            .await?;
        count_sent("control");
        Ok(())
    }

    async fn subscribe_control(&self) -> Result<mpsc::Receiver<ControlEvent>, BusError> {
        let inner = &self.inner;
        let _admin = inner.admin.lock().await;
        if lock(&inner.control).is_none() {
            let sub = inner
                .client
                .subscribe(inner.subjects.control())
                .await
                .map_err(unavailable)?;
            inner.barrier().await?;
            let fanout = inner.clone();
            let serving = spawn_subscription(sub, move |msg| {
                let inner = fanout.clone();
                async move {
                    inner.on_control(&msg);
                    Flow::Continue
                }
            });
            *lock(&inner.control) = Some(serving);
        }
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
        lock(&inner.control_subscribers).push(tx);
        Ok(rx)
    }

    async fn subscribe_gateway(
        &self,
        gateway: &GatewayId,
    ) -> Result<mpsc::Receiver<GatewayMessage>, BusError> {
        let inner = &self.inner;
        let _admin = inner.admin.lock().await;
        // A gateway subscribes once; should it do so again, the newer receiver wins.
        let previous = lock(&inner.gateways).remove(gateway);
        if let Some(previous) = previous {
            previous.stop().await;
        }
        let sub = inner
            .client
            .subscribe(inner.subjects.gateway(gateway))
            .await
            .map_err(unavailable)?;
        inner.barrier().await?;
        let (tx, rx) = mpsc::channel(GATEWAY_QUEUE);
        let receiver = inner.clone();
        let serving = spawn_subscription(sub, move |msg| {
            let inner = receiver.clone();
            let tx = tx.clone();
            async move { inner.on_delivery(&msg, &tx) }
        });
        lock(&inner.gateways).insert(gateway.clone(), serving);
        Ok(rx)
    }
}

impl Inner {
    fn on_delivery(&self, msg: &Message, tx: &mpsc::Sender<GatewayMessage>) -> Flow {
        let Body::Complete(body) = self.receive_body(msg) else {
            return Flow::Continue;
        };
        match wire::decode_gateway(&body) {
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

    fn on_control(&self, msg: &Message) {
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

// ---- large messages ------------------------------------------------------------------------

/// `Ampora-Chunk: <msg-id> <index> <count> <total-bytes>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChunkHeader<'a> {
    msg_id: &'a str,
    index: usize,
    count: usize,
    total: usize,
}

impl<'a> ChunkHeader<'a> {
    fn parse(value: &'a str) -> Option<Self> {
        let mut parts = value.split(' ');
        let h = ChunkHeader {
            msg_id: parts.next()?,
            index: parts.next()?.parse().ok()?,
            count: parts.next()?.parse().ok()?,
            total: parts.next()?.parse().ok()?,
        };
        let valid = parts.next().is_none() && !h.msg_id.is_empty() && h.index < h.count;
        valid.then_some(h)
    }
}

/// (subject, message id): one publisher's message on one subscription.
type ChunkKey = (String, String);

/// What one chunk did.
#[derive(Debug, PartialEq, Eq)]
enum Chunk {
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
struct Reassembler {
    /// Bytes reserved by all partial messages together may not exceed this.
    limit: usize,
    /// Largest message accepted.
    max_message: usize,
    /// Bytes reserved by `partial`.
    reserved: usize,
    partial: HashMap<ChunkKey, Partial>,
    /// Messages dropped before their last chunk: their remaining chunks are ignored rather
    /// than counted again. Swept like partial messages.
    dropped: HashMap<ChunkKey, Instant>,
}

struct Partial {
    data: Vec<u8>,
    next: usize,
    count: usize,
    total: usize,
    started: Instant,
}

impl Reassembler {
    fn new(limit: usize, max_message: usize) -> Self {
        Self {
            limit,
            max_message,
            reserved: 0,
            partial: HashMap::new(),
            dropped: HashMap::new(),
        }
    }

    fn add(&mut self, key: ChunkKey, h: &ChunkHeader<'_>, payload: &[u8], now: Instant) -> Chunk {
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
    fn expire(&mut self, now: Instant, timeout: Duration) -> usize {
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
struct Outbox {
    limit: usize,
    held: usize,
    entries: HashMap<String, (Bytes, Instant)>,
}

impl Outbox {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            held: 0,
            entries: HashMap::new(),
        }
    }

    /// False (and nothing kept) when holding `body` would exceed the limit.
    fn put(&mut self, id: String, body: Bytes, now: Instant) -> bool {
        if self.held.saturating_add(body.len()) > self.limit {
            return false;
        }
        self.held += body.len();
        self.entries.insert(id, (body, now));
        self.gauge();
        true
    }

    fn take(&mut self, id: &str) -> Option<Bytes> {
        let (body, _) = self.entries.remove(id)?;
        self.held -= body.len();
        self.gauge();
        Some(body)
    }

    /// Drops entries older than `timeout`; returns how many.
    fn expire(&mut self, now: Instant, timeout: Duration) -> usize {
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

#[cfg(test)]
mod tests;
