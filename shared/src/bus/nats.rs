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
//! | `<prefix>.inbox.<node>.>` | replies (`r.<id>`), coalesced replies (`batch`), and large-message fetches (`fetch`) | the one process named `node` |
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
//! Small envelopes to one subject may travel coalesced, several in one `Batch` (see `batch`).
//! Four headers carry the transport's own signalling, never payload:
//!
//! - `Ampora-Batch: <count>` on a coalesced message (coordinator and gateway subjects; on an
//!   inbox, the `batch` subject says it);
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
//! waiting. A coalesced batch of requests carries a reply subject of its own for that answer,
//! which then fails every request in it; each entry names its request's reply subject. The
//! coordinator handles every request in its own task and publishes the reply to the request's
//! reply subject (coalesced with other replies to the same inbox when the request came in a
//! batch); per-agent order holds because a gateway keeps at most one request in flight per
//! agent connection. Events are handled in arrival order, inline in their subscription's task
//! (a batch's in the batch's order).
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
//!
//! # Layout
//!
//! Dependencies point one way, from the top of this list to the bottom; this file only declares
//! the modules and re-exports the public names.
//!
//! - `bus_impl`: the [`Bus`] trait methods, in terms of everything below;
//! - `connection`: the [`NatsBus`] handle: connecting, connection events, stopping on drop;
//! - `coordinator`: serving the coordinator subjects (queue group, pulls, batches, dispatch,
//!   replies);
//! - `incoming`: the inbox task, received bodies, deliveries and control events, the sweeper;
//! - `outgoing`: publishing (chunked when large), stand-ins, requests, deliveries, the barrier;
//! - `coalesce`: the lanes' flusher tasks, publishing batches in order;
//! - `state`: what the handle shares with its tasks, and its plain accessors;
//! - `subscription`: the task behind each subscription and how it stops;
//! - `large`: reassembly and outbox bookkeeping, without I/O;
//! - `batch`: coalescing bookkeeping (lanes, splitting into messages), without I/O; its module
//!   docs give the design (bounds, linger, why a lone message does not wait);
//! - `headers`, `subjects`, `options`, `telemetry`: leaves (header parsing, subject names,
//!   configuration, metrics).
//!
//! [`Bus`]: super::Bus
//! [`BusError::NoResponder`]: super::BusError::NoResponder
//! [`BusError::Timeout`]: super::BusError::Timeout
//! [`BusError::TooLarge`]: super::BusError::TooLarge
//! [`BusError::Unavailable`]: super::BusError::Unavailable
//! [`ControlEvent`]: super::ControlEvent
//! [`GatewayMessage`]: super::GatewayMessage
//! [`Route::Any`]: super::Route::Any

mod batch;
mod bus_impl;
mod coalesce;
mod connection;
mod coordinator;
mod headers;
mod incoming;
mod large;
mod options;
mod outgoing;
mod state;
mod subjects;
mod subscription;
mod telemetry;
#[cfg(test)]
mod tests;

pub use connection::NatsBus;
pub use options::{
    NatsBusOptions, DEFAULT_BATCH_LINGER, DEFAULT_BATCH_MAX_BYTES, DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_REQUEST_TIMEOUT, DEFAULT_SUBJECT_PREFIX,
};
pub use telemetry::describe_metrics;
