//! The partitions this coordinator holds and what holding one means: taking one loads its
//! agents and reconciles them with the assignments, giving one up hands its agents over after a
//! flush, and shutdown hands every partition over. The lease round that decides which to hold
//! is [`super::leases`]. Keeps the invariant that one coordinator at a time serves a partition.

use super::{Coordinator, Slot};
use crate::session::{self};
use shared::bus::ControlEvent;
use shared::domain::Transport;
use shared::ids::{InstanceUid, PARTITIONS};
use shared::store::StoreError;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

impl Coordinator {
    pub(super) fn held(&self) -> HashMap<u16, i64> {
        self.held.lock().map(|h| h.clone()).unwrap_or_default()
    }

    pub(super) fn set_held(&self, held: HashMap<u16, i64>) {
        metrics::gauge!("ampora_coordinator_partitions").set(held.len() as f64);
        if let Ok(mut h) = self.held.lock() {
            *h = held;
        }
    }

    pub(super) fn held_count(&self) -> usize {
        self.held.lock().map(|h| h.len()).unwrap_or(0)
    }

    pub(super) fn holds(&self, partition: u16) -> bool {
        self.held.lock().is_ok_and(|h| h.contains_key(&partition))
    }

    /// True once the leases from the last successful round have run out: a coordinator
    /// that stalled (frozen, starved) that long may have been taken over and must not answer
    /// for its partitions until a round proves it still holds them.
    pub(super) fn lease_lapsed(&self) -> bool {
        let ttl = i64::try_from(self.cfg.lease_ttl.as_millis()).unwrap_or(i64::MAX);
        let leased_at = self.leased_at.load(Ordering::Relaxed);
        shared::now_ms() >= leased_at.saturating_add(ttl)
    }

    pub(super) fn holds_all(&self) -> bool {
        self.held_count() == usize::from(PARTITIONS)
    }

    /// Whether every agent is served here (the embedded default): then memory is the whole
    /// fleet and no other coordinator changes agents.
    pub fn serves_every_partition(&self) -> bool {
        self.holds_all()
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Slots of the agents in `partitions`.
    pub(super) fn slots_in(&self, partitions: &[u16]) -> Vec<(InstanceUid, Slot)> {
        let wanted: HashSet<u16> = partitions.iter().copied().collect();
        self.agents
            .iter()
            .filter_map(|s| {
                s.lock().ok().map(|s| {
                    s.iter()
                        .filter(|(u, _)| wanted.contains(&u.partition()))
                        .map(|(u, s)| (*u, s.clone()))
                        .collect::<Vec<_>>()
                })
            })
            .flatten()
            .collect()
    }

    /// Graceful hand-over: stop taking their frames, write their agents, forget them.
    pub(super) async fn hand_over(&self, partitions: &[u16]) {
        if let Err(e) = self.bus.unserve_partitions(partitions).await {
            tracing::warn!(error = %e, "unsubscribing partitions failed");
        }
        if let Err(e) = self.flush().await {
            tracing::error!(error = %e, "flush before partition hand-over failed");
        }
        self.forget_partitions(partitions);
        if let Ok(mut h) = self.held.lock() {
            for p in partitions {
                h.remove(p);
            }
        }
    }

    /// The leases are gone (expired under us, or someone else holds them now): whatever we
    /// have in memory may be older than the new owner's, so it is dropped, not written.
    pub(super) async fn drop_partitions(&self, partitions: &[u16]) {
        if let Err(e) = self.bus.unserve_partitions(partitions).await {
            tracing::warn!(error = %e, "unsubscribing partitions failed");
        }
        self.forget_partitions(partitions);
    }

    pub(super) fn forget_partitions(&self, partitions: &[u16]) {
        let gone: Vec<InstanceUid> = self
            .slots_in(partitions)
            .into_iter()
            .map(|(u, _)| u)
            .collect();
        for uid in &gone {
            self.forget(uid);
        }
        if let Ok(mut d) = self.dirty.lock() {
            for uid in &gone {
                d.remove(uid);
            }
        }
    }

    /// Loads the agents of newly leased partitions and starts serving them. Agents whose
    /// connection no gateway holds any more are taken offline (a disconnect notice sent while
    /// nobody served the partition was lost).
    pub(super) async fn take_partitions(&self, partitions: &[u16]) -> Result<(), StoreError> {
        let records = self.store.load_agents_in(partitions).await?;
        let mut check = Vec::new();
        for record in records {
            if record.connected && record.transport == Some(Transport::WebSocket) {
                check.push(record.instance_uid);
            }
            // The live connection is learnt again from the agent's next frame.
            self.insert_entry(record);
        }
        if let Err(e) = self.bus.serve_partitions(partitions).await {
            return Err(StoreError::NotApplied(format!("bus: {e}")));
        }
        // One round trip per batch: taking over 50,000 agents one lookup at a time kept the
        // lease round busy past its TTL under load. A failed lookup leaves them as they are.
        match self.ownership.lookup_many(&check).await {
            Ok(owners) => {
                for (uid, owner) in check.into_iter().zip(owners) {
                    if owner.is_none() {
                        self.disconnected_any(uid).await;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "looking up the owners of taken agents failed"),
        }
        self.reconcile(partitions).await;
        Ok(())
    }

    /// Brings the agents of `partitions` in line with the current assignments and pushes
    /// their desired config to those connected over WebSocket that don't report it yet (the
    /// previous owner may have died before pushing). Pushes are idempotent by config hash.
    pub(super) async fn reconcile(&self, partitions: &[u16]) {
        let mut pushes = Vec::new();
        for (uid, slot) in self.slots_in(partitions) {
            let mut e = slot.lock().await;
            if self.reassign(&mut e.state) {
                self.mark_dirty(uid);
            }
            let r = &e.state.record;
            if !r.connected || r.transport != Some(Transport::WebSocket) {
                continue;
            }
            if let Some(d) = self.desired_of(r) {
                if let Some(msg) = session::push_config(&mut e.state, &d, shared::now_ms()) {
                    pushes.push((uid, msg));
                }
            }
        }
        self.deliver_all(pushes).await;
    }

    /// Hands every partition over and leaves the membership, so the other coordinators take
    /// the agents at once instead of after the lease TTL. Flushes changed agents.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _round = self.rebalancing.lock().await;
        if let Err(e) = self.store.coordinator_leave(&self.cfg.node).await {
            tracing::warn!(error = %e, "leaving the coordinator membership failed");
        }
        let all: Vec<u16> = self.held().into_keys().collect();
        self.hand_over(&all).await;
        if let Err(e) = self.store.release_leases(&self.cfg.node, &all).await {
            tracing::warn!(error = %e, "releasing partition leases failed");
        }
        self.set_held(HashMap::new());
        self.serving.store(0, Ordering::Relaxed);
        let _ = self.bus.broadcast(ControlEvent::MembershipChanged).await;
        self.write_refusal_summaries(i64::MAX).await;
        self.flush_agent_audit().await;
    }
}
