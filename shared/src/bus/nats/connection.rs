//! The [`NatsBus`] handle and its lifetime: connecting (with the inbox and sweeper tasks and a
//! first barrier), the connection's events, and stopping every task when the bus drops.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use super::batch::{BatchWaits, Lanes};
use super::incoming::{run_inbox, run_sweeper};
use super::large::{Outbox, Reassembler, BUFFERED_MESSAGES};
use super::options::NatsBusOptions;
use super::state::{lock, unavailable, Inner};
use super::subjects::{validate_prefix, Subjects};
use super::subscription::Serving;
use super::telemetry::{count_dropped, describe_metrics};
use crate::bus::BusError;

/// The NATS bus. One per process (its node id names its inbox); share it as `Arc<dyn Bus>`.
/// Dropping it stops its subscriptions.
pub struct NatsBus {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("node", &self.inner.opts.node)
            .field("subject_prefix", &self.inner.opts.subject_prefix)
            .finish_non_exhaustive()
    }
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
            lanes: Mutex::new(Lanes::default()),
            batch_waits: Mutex::new(BatchWaits::default()),
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
