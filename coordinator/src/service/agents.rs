//! The agent cache: one entry per agent of the held partitions, behind a per-agent async
//! mutex, written to the store in batches (`flush`), swept for HTTP agents gone quiet and for
//! sessions whose token expired. The database is the source of truth; this is its cache.

use super::{shard_of, Coordinator, Entry, Slot};
use crate::session::AgentState;
use shared::bus::AuthFailure;
use shared::domain::{AgentRecord, ConfigState, Transport};
use shared::ids::{GatewayId, InstanceUid};
use shared::now_ms;
use shared::store::{HeldLeases, StoreError};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::Mutex;

/// Agents written per transaction. A fenced write holds its leases' rows until it commits
/// and renewing those leases waits for it: 50,000 agents with their effective configs in one
/// transaction kept a busy coordinator's renewal waiting past the lease TTL.
const FLUSH_CHUNK: usize = 1_000;

impl Coordinator {
    pub(super) fn insert_entry(&self, record: AgentRecord) -> Slot {
        let uid = record.instance_uid;
        let slot = Arc::new(Mutex::new(Entry {
            identity: None,
            state: AgentState::new(record),
            token_id: None,
            conn: None,
            conn_token: None,
            issued_ms: Vec::new(),
        }));
        if let Ok(mut shard) = self.agents[shard_of(&uid)].lock() {
            shard.insert(uid, slot.clone());
        }
        slot
    }

    pub(super) fn slot(&self, uid: &InstanceUid) -> Option<Slot> {
        self.agents[shard_of(uid)]
            .lock()
            .ok()
            .and_then(|s| s.get(uid).cloned())
    }

    pub(super) fn all_slots(&self) -> Vec<Slot> {
        self.agents
            .iter()
            .filter_map(|s| {
                s.lock()
                    .ok()
                    .map(|s| s.values().cloned().collect::<Vec<_>>())
            })
            .flatten()
            .collect()
    }

    pub(super) fn mark_dirty(&self, uid: InstanceUid) {
        if let Ok(mut d) = self.dirty.lock() {
            d.insert(uid);
        }
        self.fleet_generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Grows whenever an agent this coordinator serves changes: the console's live views
    /// compare it to know whether to refresh.
    pub fn fleet_generation(&self) -> u64 {
        self.fleet_generation.load(Ordering::Relaxed)
    }

    /// Writes every changed agent, [`FLUSH_CHUNK`] to a transaction.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let uids: Vec<InstanceUid> = match self.dirty.lock() {
            Ok(mut d) => d.drain().collect(),
            Err(_) => return Ok(0),
        };
        let mut written = 0;
        let mut chunks = uids.chunks(FLUSH_CHUNK);
        while let Some(chunk) = chunks.next() {
            match self.flush_chunk(chunk.to_vec()).await {
                Ok(n) => written += n,
                Err(e) => {
                    // The rest stay dirty for the next flush, as the failed chunk does.
                    if let Ok(mut d) = self.dirty.lock() {
                        d.extend(chunks.flatten().copied());
                    }
                    return Err(e);
                }
            }
        }
        Ok(written)
    }

    async fn flush_chunk(&self, uids: Vec<InstanceUid>) -> Result<usize, StoreError> {
        if uids.is_empty() {
            return Ok(0);
        }
        let mut records = Vec::with_capacity(uids.len());
        // Only partitions still held: a frame in flight while a lease was lost may have
        // touched an agent that is someone else's now.
        for uid in uids.iter().filter(|u| self.holds(u.partition())) {
            if let Some(slot) = self.slot(uid) {
                records.push(slot.lock().await.state.record.clone());
            }
        }
        let held = HeldLeases {
            node: self.cfg.node.clone(),
            fences: self.held(),
            now_ms: now_ms(),
        };
        let refused = match self.store.upsert_agents_fenced(&held, &records).await {
            Ok(refused) => refused,
            Err(e) => {
                // Keep them dirty: the next flush retries the whole batch (idempotent).
                if let Ok(mut d) = self.dirty.lock() {
                    d.extend(uids);
                }
                return Err(e);
            }
        };
        if !refused.is_empty() {
            // Our lease on these lapsed (a stall longer than its TTL). The next lease round
            // either gets them back with our memory intact, and the retry writes them, or
            // finds them taken and drops them; either way the new holder's rows are safe.
            let refused: HashSet<u16> = refused.into_iter().collect();
            let retry: Vec<InstanceUid> = uids
                .iter()
                .filter(|u| refused.contains(&u.partition()))
                .copied()
                .collect();
            tracing::warn!(
                partitions = refused.len(),
                agents = retry.len(),
                "agent writes refused: lease no longer ours at its fence"
            );
            metrics::counter!("ampora_store_agent_writes_refused_total")
                .increment(retry.len() as u64);
            records.retain(|r| !refused.contains(&r.instance_uid.partition()));
            if let Ok(mut d) = self.dirty.lock() {
                d.extend(retry);
            }
        }
        metrics::counter!("ampora_store_agent_writes_total").increment(records.len() as u64);
        // Written: from now on the files are read from the store (`agent`), and memory keeps
        // only their hash. Unless the agent reported other files meanwhile.
        for r in records.iter().filter(|r| r.effective_config.is_some()) {
            if let Some(slot) = self.slot(&r.instance_uid) {
                let mut e = slot.lock().await;
                if e.state.record.effective_config_hash == r.effective_config_hash {
                    e.state.record.effective_config = None;
                }
            }
        }
        Ok(records.len())
    }

    /// Once per flush: takes HTTP agents that missed three polls offline (they have no
    /// connection to lose) and refreshes the fleet gauges, in one pass over the agents.
    pub(super) async fn sweep(&self) {
        let cutoff = now_ms()
            - i64::try_from(self.cfg.heartbeat_interval_secs.saturating_mul(3_000))
                .unwrap_or(i64::MAX);
        let mut connected = 0u64;
        let mut states: HashMap<ConfigState, u64> = HashMap::new();
        let now = now_ms();
        let (mut expired, mut revoked) = (Vec::new(), Vec::new());
        for slot in self.all_slots() {
            let mut e = slot.lock().await;
            // HTTP agents have no socket to close: their next poll is refused.
            let ws = e.state.record.transport == Some(Transport::WebSocket);
            if let (true, Some(t), Some(_)) = (ws, &e.conn_token, &e.conn) {
                match self.token_unusable(t, now) {
                    Some(AuthFailure::Expired) => expired.push(e.state.record.instance_uid),
                    Some(_) => revoked.push(e.state.record.instance_uid),
                    None => {}
                }
            }
            let r = &mut e.state.record;
            if r.connected && r.transport == Some(Transport::Http) && r.last_seen_ms < cutoff {
                r.connected = false;
                let uid = r.instance_uid;
                e.conn = None;
                self.mark_dirty(uid);
            }
            let r = &e.state.record;
            connected += u64::from(r.connected);
            *states.entry(r.config_state()).or_default() += 1;
        }
        self.close_sessions(expired, "auth: token expired").await;
        self.close_sessions(revoked, "auth: token revoked").await;
        metrics::gauge!("ampora_agents_connected").set(connected as f64);
        for state in ConfigState::ALL {
            let n = states.get(&state).copied().unwrap_or(0);
            metrics::gauge!("ampora_agents_config_state", "state" => state.as_str()).set(n as f64);
        }
    }

    pub(super) fn forget(&self, uid: &InstanceUid) {
        if let Ok(mut s) = self.agents[shard_of(uid)].lock() {
            s.remove(uid);
        }
    }

    /// Takes the agent offline whatever connection it had (no gateway holds it any more).
    pub(super) async fn disconnected_any(&self, uid: InstanceUid) {
        let Some(slot) = self.slot(&uid) else { return };
        let mut e = slot.lock().await;
        if e.state.record.connected {
            e.conn = None;
            e.state.record.connected = false;
            e.state.record.gateway = None;
            self.mark_dirty(uid);
            self.upgrade_gone(&uid);
        }
    }

    /// Only the connection the agent currently talks through can take it offline: a late
    /// notice from a connection it already replaced changes nothing.
    pub(super) async fn disconnected(&self, uid: InstanceUid, gateway: GatewayId, conn_id: u64) {
        self.offers.answered(&uid);
        let Some(slot) = self.slot(&uid) else { return };
        let mut e = slot.lock().await;
        let current = matches!(&e.conn, Some((gw, c, _)) if *gw == gateway && *c == conn_id);
        if current {
            e.conn = None;
            e.state.record.connected = false;
            e.state.record.last_seen_ms = now_ms();
            self.mark_dirty(uid);
            self.upgrade_gone(&uid);
        }
    }

    /// Every agent, sorted by uid, without effective config files (the hashes stay; one
    /// agent's files come with [`Coordinator::agent`]). The ones this coordinator serves come
    /// from memory; in a cluster the others come from the store, as fresh as their owner's
    /// last batch write.
    pub async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let mut out = self.agents_without_configs().await?;
        out.sort_by_key(|r| r.instance_uid);
        Ok(out)
    }

    /// [`Coordinator::agents`] unsorted: what the rollout engine judges, several times a
    /// second.
    pub(super) async fn agents_without_configs(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.collect_agents(AgentRecord::without_effective_config)
            .await
    }

    /// The agents this coordinator serves as `copy` makes them from memory, and in a cluster
    /// the others from the store.
    async fn collect_agents(
        &self,
        copy: impl Fn(&AgentRecord) -> AgentRecord,
    ) -> Result<Vec<AgentRecord>, StoreError> {
        let mut by_uid: HashMap<InstanceUid, AgentRecord> = HashMap::new();
        if !self.holds_all() {
            for r in self.store.load_agents().await? {
                by_uid.insert(r.instance_uid, r);
            }
        }
        for slot in self.all_slots() {
            let r = copy(&slot.lock().await.state.record);
            by_uid.insert(r.instance_uid, r);
        }
        Ok(by_uid.into_values().collect())
    }

    /// One agent, with its effective config files: from memory when this coordinator serves
    /// it (the files from the store once they were written, see [`Coordinator::flush`]),
    /// else from the store.
    pub async fn agent(&self, uid: InstanceUid) -> Result<Option<AgentRecord>, StoreError> {
        if let Some(slot) = self.slot(&uid) {
            let mut record = slot.lock().await.state.record.clone();
            if record.effective_config.is_none() && record.effective_config_hash.is_some() {
                let stored = self.store.get_agent(uid).await?;
                // Only the files of the config the record names: a report newer than the
                // store's copy keeps its own (it is still in memory then, not `None`).
                record.effective_config = stored
                    .filter(|s| s.effective_config_hash == record.effective_config_hash)
                    .and_then(|s| s.effective_config);
            }
            return Ok(Some(record));
        }
        if self.answers(uid.partition()) {
            return Ok(None);
        }
        self.store.get_agent(uid).await
    }
}
