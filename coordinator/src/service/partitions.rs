//! The partitions this coordinator holds and what holding one means: taking one loads its
//! agents and reconciles them with the assignments, giving one up hands its agents over after a
//! flush, and shutdown hands every partition over. The lease round that decides which to hold
//! is [`super::leases`]; it only records its decisions here ([`PartitionTable`]) and leaves the
//! slow part (loading, flushing, subscribing) to one worker task ([`run_moves`]), so no amount
//! of such work can delay the renewal of the leases. Keeps the invariant that one coordinator at
//! a time serves a partition.

use super::{Coordinator, Slot};
use crate::session::{self};
use shared::bus::ControlEvent;
use shared::domain::Transport;
use shared::ids::{InstanceUid, PARTITIONS};
use shared::store::StoreError;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;
use tokio::sync::mpsc;

/// A failed load of taken partitions is tried again this long after (or at the next move).
const LOAD_RETRY: Duration = Duration::from_secs(1);

/// Which partitions this coordinator holds a lease on, and which of those it answers for.
/// `serving` and `leaving` are disjoint subsets of `held`.
#[derive(Debug, Default)]
pub(super) struct PartitionTable {
    /// Leases held in the store, with their fence; renewed by every lease round.
    held: HashMap<u16, i64>,
    /// Loaded and subscribed: frames for these are answered. Taken partitions join once the
    /// worker has loaded them; until then their agents are told to retry.
    serving: HashSet<u16>,
    /// No longer ours by the membership: the worker flushes them, then releases the lease.
    /// Rounds keep renewing them meanwhile, so the taker never loads before the flush.
    leaving: HashSet<u16>,
}

/// What one lease round decided, carried out by the worker in the order rounds ran.
#[derive(Debug, Default)]
pub(crate) struct Moves {
    /// Leases gone (expired under us, or taken): memory is dropped, not written.
    pub lost: Vec<u16>,
    /// To hand over: flush, forget, release.
    pub give: Vec<u16>,
    /// Newly leased: load, subscribe, then serve.
    pub gained: Vec<u16>,
}

impl Moves {
    pub(crate) fn is_empty(&self) -> bool {
        self.lost.is_empty() && self.give.is_empty() && self.gained.is_empty()
    }
}

/// Carries out lease rounds' moves one after another. Taken partitions that failed to load
/// are retried until they load or are no longer held.
pub(super) async fn run_moves(weak: Weak<Coordinator>, mut moves: mpsc::UnboundedReceiver<Moves>) {
    let mut to_load: BTreeSet<u16> = BTreeSet::new();
    loop {
        let next = if to_load.is_empty() {
            moves.recv().await
        } else {
            tokio::time::timeout(LOAD_RETRY, moves.recv())
                .await
                .unwrap_or_else(|_| Some(Moves::default()))
        };
        let Some(mut m) = next else { return };
        // Rounds that ran while the last load did: their losses and hand-overs first, so the
        // load below skips what is no longer ours.
        while let Ok(more) = moves.try_recv() {
            m.lost.extend(more.lost);
            m.give.extend(more.give);
            m.gained.extend(more.gained);
        }
        let Some(c) = weak.upgrade() else { return };
        if c.is_stopping() {
            return;
        }
        to_load.extend(&m.gained);
        match c.carry_out(&m, &to_load).await {
            Ok(()) => to_load.clear(),
            Err(e) => tracing::warn!(error = %e, "loading taken partitions failed; retrying"),
        }
    }
}

impl Coordinator {
    fn table(&self) -> std::sync::MutexGuard<'_, PartitionTable> {
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every lease held, with its fence (those being handed over included).
    pub(super) fn held(&self) -> HashMap<u16, i64> {
        self.table().held.clone()
    }

    pub(super) fn leaving(&self) -> HashSet<u16> {
        self.table().leaving.clone()
    }

    /// Records a lease round's result: `held` are the leases it holds now, `leaving` those of
    /// them being handed over, `lost` those it no longer holds at the fence it had. Lost and
    /// leaving partitions stop being answered at once.
    pub(super) fn record_round(
        &self,
        held: HashMap<u16, i64>,
        leaving: HashSet<u16>,
        lost: &[u16],
    ) {
        metrics::gauge!("ampora_coordinator_partitions").set(held.len() as f64);
        let mut t = self.table();
        for p in lost {
            t.serving.remove(p);
        }
        t.serving
            .retain(|p| held.contains_key(p) && !leaving.contains(p));
        t.held = held;
        t.leaving = leaving;
    }

    pub(super) fn held_count(&self) -> usize {
        self.table().held.len()
    }

    /// Whether this coordinator holds `partition`'s lease (it may write its agents).
    pub(super) fn holds(&self, partition: u16) -> bool {
        self.table().held.contains_key(&partition)
    }

    /// Whether frames for `partition` are answered here: held, loaded, not being handed over.
    pub(super) fn answers(&self, partition: u16) -> bool {
        self.table().serving.contains(&partition)
    }

    /// How many partitions this coordinator fully serves (held and loaded).
    pub fn partitions_served(&self) -> usize {
        self.table().serving.len()
    }

    /// Whether some partition leased here is still being loaded (taken, not yet served).
    pub(super) fn loading(&self) -> bool {
        let t = self.table();
        t.held
            .keys()
            .any(|p| !t.serving.contains(p) && !t.leaving.contains(p))
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
        self.partitions_served() == usize::from(PARTITIONS)
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
    }

    /// One round's moves (see [`run_moves`]), then loads `to_load` (taken partitions not yet
    /// loaded) as far as they are still held and not leaving.
    pub(super) async fn carry_out(
        &self,
        m: &Moves,
        to_load: &BTreeSet<u16>,
    ) -> Result<(), StoreError> {
        let _work = self.partition_work.lock().await;
        if !m.lost.is_empty() {
            tracing::warn!(partitions = m.lost.len(), "partition leases lost");
            self.drop_partitions(&m.lost).await;
        }
        if !m.give.is_empty() {
            self.give_partitions(&m.give).await;
        }
        let load: Vec<u16> = {
            let t = self.table();
            to_load
                .iter()
                .copied()
                .filter(|p| {
                    t.held.contains_key(p) && !t.leaving.contains(p) && !t.serving.contains(p)
                })
                .collect()
        };
        if !load.is_empty() {
            // Identities confirmed through the previous owner refuse their agents' tokens here too.
            self.sync_identities().await;
            self.take_partitions(&load).await?;
        }
        if !m.is_empty() {
            tracing::info!(
                held = self.held_count(),
                serving = self.partitions_served(),
                gave = m.give.len(),
                gained = m.gained.len(),
                lost = m.lost.len(),
                "partitions moved"
            );
        }
        Ok(())
    }

    /// Hands `partitions` over, then releases their leases so the takers act at once.
    async fn give_partitions(&self, partitions: &[u16]) {
        self.hand_over(partitions).await;
        {
            // Under the round lock: a round that read `leaving` before this would otherwise
            // renew a lease just released.
            let _round = self.rebalancing.lock().await;
            let release: Vec<u16> = {
                let mut t = self.table();
                let release: Vec<u16> = partitions
                    .iter()
                    .copied()
                    .filter(|p| t.leaving.remove(p))
                    .collect();
                for p in &release {
                    t.held.remove(p);
                }
                release
            };
            // Unreleased (the store away), they expire: rounds no longer renew them.
            if let Err(e) = self.store.release_leases(&self.cfg.node, &release).await {
                tracing::warn!(error = %e, "releasing handed-over partitions failed");
            }
        }
        // The takers act at once instead of at their next round. Converges: a round that
        // gives nothing away broadcasts nothing.
        let _ = self.bus.broadcast(ControlEvent::MembershipChanged).await;
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
        let mut t = self.table();
        for p in partitions {
            if t.held.contains_key(p) && !t.leaving.contains(p) {
                t.serving.insert(*p);
            }
        }
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
        self.deliver_all(pushes);
    }

    /// Hands every partition over and leaves the membership, so the other coordinators take
    /// the agents at once instead of after the lease TTL. Flushes changed agents.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        // The worker's lock first: it takes the round lock while holding its own.
        let _work = self.partition_work.lock().await;
        let _round = self.rebalancing.lock().await;
        if let Err(e) = self.store.coordinator_leave(&self.cfg.node).await {
            tracing::warn!(error = %e, "leaving the coordinator membership failed");
        }
        let all: Vec<u16> = self.held().into_keys().collect();
        self.hand_over(&all).await;
        if let Err(e) = self.store.release_leases(&self.cfg.node, &all).await {
            tracing::warn!(error = %e, "releasing partition leases failed");
        }
        self.record_round(HashMap::new(), HashSet::new(), &[]);
        let _ = self.bus.broadcast(ControlEvent::MembershipChanged).await;
        self.write_refusal_summaries(i64::MAX).await;
        self.flush_agent_audit().await;
    }
}
