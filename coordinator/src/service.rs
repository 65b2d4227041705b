//! The coordinator runtime around the sans-I/O session core.
//!
//! It serves the partitions of agents it holds leases for ([`leases`]; in the embedded default
//! that is all of them), keeps those agents' [`AgentState`] in memory (the database is the
//! source of truth; this is a cache loaded when a partition is taken over), serialises each
//! agent's messages through a per-agent async mutex, writes changed agents to the store in
//! batches, and writes token redemptions, config versions, assignments and audit entries
//! synchronously. Operator changes made through any coordinator reach the owners of the
//! affected agents as [`ControlEvent`]s, and periodically from the store in case one was lost.

mod crl;
mod issuance;
mod leases;
mod refusals;
mod scope;
mod token_sessions;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use proto::v1::ServerErrorResponseType;
use shared::bus::{
    AgentFrame, AuthDecision, AuthFailure, AuthRequest, Bus, ControlEvent, CoordinatorEvent,
    CoordinatorHandler, CoordinatorReply, CoordinatorRequest, Credential, FrameReply,
    GatewayMessage,
};
use shared::domain::{
    AgentRecord, ApiTokenListing, ApiTokenRecord, Assignment, AuditEntry, ConfigMap, ConfigState,
    ConfigVersion, IdentityRecord, Redemption, Role, Target, TokenRecord, TokenScope, Transport,
};
use shared::ids::{GatewayId, InstanceUid, PARTITIONS};
use shared::ownership::Ownership;
use shared::store::{NewAssignment, NewConfigVersion, RedeemRequest, Store, StoreError};
use shared::{now_ms, token};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::session::{self, AgentState, Context, Desired, Event, IdentityOffer, OpampOffer};
use refusals::{Refusals, Refused};

/// Settings the coordinator needs from the configuration.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub opamp_endpoint: String,
    pub heartbeat_interval_secs: u64,
    pub flush_interval: Duration,
    pub default_token_ttl: Duration,
    /// This coordinator's name in the membership and on its partition leases; unique in the
    /// cluster and stable across restarts where possible (a restarted coordinator with the
    /// same name renews its old leases instead of waiting for them to expire).
    pub node: String,
    /// Partition lease TTL; leases are renewed every third of it.
    pub lease_ttl: Duration,
    /// The agent CA that signs identities; `None`: identities off.
    pub agent_ca: Option<Arc<gateway::tls::AgentCa>>,
    /// Lifetime of an issued identity; renewed after two thirds of it.
    pub identity_validity: Duration,
    /// Refused authentications are audited once per source and reason per window, with the
    /// count of repeats ([`refusals`]).
    pub refusal_window: Duration,
}

/// One agent as the coordinator holds it.
struct Entry {
    state: AgentState,
    /// The bootstrap token this agent was admitted with and already redeemed: later frames
    /// with it need no store round trip.
    token_id: Option<String>,
    /// The identity offered on this agent's connections (the certificate it must repeat,
    /// facts §5.1); set when issued or first needed.
    identity: Option<session::IdentityOffer>,
    /// The live connection (gateway, connection id, epoch) if any. Used to tell a reconnect
    /// from a UID collision and to ignore stale disconnect notices.
    conn: Option<(GatewayId, u64, u64)>,
    /// The bootstrap token the live connection authenticated with (`None` on a certificate):
    /// revoking or expiring it ends the connection.
    conn_token: Option<String>,
    /// When identities were last issued to this agent, for the issuance limit.
    issued_ms: Vec<i64>,
}

type Slot = Arc<Mutex<Entry>>;

const SHARDS: usize = 64;

pub struct Coordinator {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    ownership: Arc<dyn Ownership>,
    cfg: CoordinatorConfig,
    offer: OpampOffer,
    /// Agents by uid, sharded so that looking one up never contends with the whole fleet.
    agents: Vec<StdMutex<HashMap<InstanceUid, Slot>>>,
    /// Agents changed since the last flush; the flusher drains it.
    dirty: StdMutex<HashSet<InstanceUid>>,
    /// Config versions that are assigned to someone, ready to send.
    desired: RwLock<HashMap<i64, Arc<Desired>>>,
    /// All assignments, oldest first; the newest match wins.
    assignments: RwLock<Vec<Assignment>>,
    /// Bootstrap tokens, write-through: every create, redeem and revoke in this process updates
    /// it after the store, so authentication needs no database round trip. Tokens another
    /// coordinator created are loaded by [`Coordinator::sync_tokens`] (on `TokensCreated` and
    /// every lease round), with a lookup on a miss as the fallback; revocations are broadcast.
    tokens: RwLock<TokenCache>,
    /// What [`Coordinator::sync_tokens`] has read: the later of the newest `created_ms` loaded
    /// and the local time a read started. The lock keeps syncs from overlapping.
    token_watermark: Mutex<i64>,
    /// Asks [`run_token_sync`] for a sync (capacity 1: one pending sync covers any number of
    /// `TokensCreated` events).
    token_sync: mpsc::Sender<()>,
    /// Authentications answered from the token cache, and those that had to look the token
    /// up in the store (per coordinator, for tests; the miss count is also a metric).
    token_hits: AtomicU64,
    token_misses: AtomicU64,
    /// Token redemptions go through one batching task (see [`run_redeemer`]).
    redeemer: mpsc::Sender<RedeemJob>,
    /// Partitions this coordinator holds a lease on, with the lease's fence. Written only by
    /// [`leases::rebalance`] and [`Coordinator::shutdown`].
    held: StdMutex<HashMap<u16, i64>>,
    /// Lease rounds never overlap (the timer and membership events both start them).
    rebalancing: Mutex<()>,
    /// Set by `shutdown`: no more lease rounds, partitions are being handed over.
    stopping: AtomicBool,
    /// Partitions held and served (agents loaded, subscribed) as of the end of the last lease
    /// round; for readiness checks and tests.
    serving: std::sync::atomic::AtomicUsize,
    /// Agent identities by agent (every one ever issued, oldest first): loaded at start,
    /// write-through for this coordinator's changes; others' arrive by broadcast (one identity
    /// read each), on first sight of an unknown certificate, and by [`Coordinator::sync_identities`].
    identities: RwLock<HashMap<InstanceUid, Vec<IdentityRecord>>>,
    /// When [`Coordinator::sync_identities`] last read (local clock); the lock keeps syncs
    /// from overlapping.
    identity_watermark: Mutex<i64>,
    /// Refused authentications, counted and aggregated for the audit log.
    refusals: Refusals,
    /// The last signed CRL ([`crl`]); the lock also keeps two requests from signing at once.
    crl_cache: Mutex<Option<Arc<crl::SignedCrl>>>,
    /// Where the last re-read of revoked tokens started (the lock keeps reads from
    /// overlapping); see [`Coordinator::sync_token_revocations`].
    revocation_watermark: Mutex<i64>,
}

#[derive(Default)]
struct TokenCache {
    by_hash: HashMap<[u8; 32], TokenRecord>,
    hash_of: HashMap<String, [u8; 32]>,
    /// Scopes of bound tokens by agent (token id, scope): see [`scope`].
    scopes: HashMap<InstanceUid, Vec<(String, TokenScope)>>,
}

impl TokenCache {
    fn insert(&mut self, mut rec: TokenRecord) {
        // A token only moves forward (bound, revoked; never back), so a copy read before a
        // change this cache already has (a sync racing a redemption or revocation) must not
        // undo it.
        if let Some(old) = self.by_hash.get(&rec.hash) {
            rec.revoked_ms = rec.revoked_ms.or(old.revoked_ms);
            rec.redeemed_ms = rec.redeemed_ms.or(old.redeemed_ms);
            rec.bound_uid = rec.bound_uid.or(old.bound_uid);
        }
        self.index_scope(&rec);
        self.hash_of.insert(rec.id.clone(), rec.hash);
        self.by_hash.insert(rec.hash, rec);
    }

    fn update(&mut self, id: &str, f: impl FnOnce(&mut TokenRecord)) {
        if let Some(rec) = self.hash_of.get(id).and_then(|h| self.by_hash.get_mut(h)) {
            f(rec);
            let rec = rec.clone();
            self.index_scope(&rec);
        }
    }
}

type RedeemJob = (RedeemRequest, oneshot::Sender<Result<Redemption, String>>);

/// Why an agent's frame was refused at redemption: its token, or the token's scope. Scope
/// mismatches are decided here, in the coordinator, so they need no place in the bus's
/// [`AuthFailure`] (which the gateway decides on before any frame exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Auth(AuthFailure),
    /// The token is scoped and the agent's first frame does not describe it with every label
    /// of the scope (or carries no description at all).
    ScopeMismatch,
    /// A certificate-authenticated frame about another agent than the certificate names.
    IdentityMismatch,
}

impl Refusal {
    /// The audited reason code.
    fn as_str(self) -> &'static str {
        match self {
            Self::Auth(f) => f.as_str(),
            Self::ScopeMismatch => "scope_mismatch",
            Self::IdentityMismatch => "identity_mismatch",
        }
    }

    /// Human text for the error reply and the close reason.
    fn message(self) -> &'static str {
        match self {
            Self::Auth(f) => f.message(),
            Self::ScopeMismatch => "agent description does not match the token scope",
            Self::IdentityMismatch => "instance uid does not match the client certificate",
        }
    }
}

impl From<AuthFailure> for Refusal {
    fn from(f: AuthFailure) -> Self {
        Self::Auth(f)
    }
}

/// Pushes in flight at once during a rollout (each waits on Redis and NATS round trips).
const DELIVERY_CONCURRENCY: usize = 256;

/// Most redemptions committed in one transaction.
const REDEEM_BATCH: usize = 512;

/// Group commit for token redemptions: each waits for a commit (they must never be lost), but
/// whatever queued up while one batch was committing goes into the next transaction together.
async fn run_redeemer(store: Arc<dyn Store>, mut rx: mpsc::Receiver<RedeemJob>) {
    let mut jobs = Vec::with_capacity(REDEEM_BATCH);
    while rx.recv_many(&mut jobs, REDEEM_BATCH).await > 0 {
        let (reqs, replies): (Vec<_>, Vec<_>) = jobs.drain(..).unzip();
        let mut outcome = store.redeem_tokens(&reqs, now_ms()).await;
        if matches!(outcome, Err(StoreError::MaybeApplied(_))) {
            // The commit's fate is unknown: ask again. Redemption is idempotent per uid, so
            // a batch that did commit now reads back as `AlreadyBoundToSame` (and its audit
            // entries are not written twice).
            outcome = store.redeem_tokens(&reqs, now_ms()).await;
        }
        match outcome {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

/// Acts on control events from any coordinator (this one's own included).
async fn run_control(weak: std::sync::Weak<Coordinator>, mut events: mpsc::Receiver<ControlEvent>) {
    while let Some(ev) = events.recv().await {
        let Some(c) = weak.upgrade() else { return };
        match ev {
            ControlEvent::AssignmentCreated { .. } => c.sync_assignments().await,
            ControlEvent::TokenChanged { token_id } => c.reload_token(&token_id).await,
            // Full: a sync is pending already and will see these tokens too.
            ControlEvent::TokensCreated => drop(c.token_sync.try_send(())),
            ControlEvent::IdentityRevoked { serial } => {
                c.crl_changed().await;
                // A failed read is logged; the next full reload catches up.
                let _ = c.load_identity(&serial).await;
            }
            ControlEvent::IdentityConfirmed { serial } => {
                let _ = c.load_identity(&serial).await;
            }
            ControlEvent::MembershipChanged => {
                if let Err(e) = leases::rebalance(&c).await {
                    tracing::error!(error = %e, "partition rebalance failed");
                }
            }
        }
    }
}

/// How often a coordinator reads the identities changed in the store since its last look, the
/// safety net for lost confirmation and revocation broadcasts (each of which reads its one
/// identity at once); gateways refresh their revoked set this often too.
const IDENTITY_SYNC_INTERVAL: Duration = Duration::from_secs(30);

/// How far back from its last look an identity sync reads again: changes are stamped with
/// the clock of the coordinator that made them, which may be behind, and may commit late.
const IDENTITY_SYNC_OVERLAP: Duration = Duration::from_secs(30);

/// Renews leases every third of their TTL; also picks up assignments whose control event was
/// lost (the bus is at-most-once).
async fn run_leases(weak: std::sync::Weak<Coordinator>) {
    let mut identities_synced = tokio::time::Instant::now();
    loop {
        let period = match weak.upgrade() {
            Some(c) => c.cfg.lease_ttl / 3,
            None => return,
        };
        tokio::time::sleep(period).await;
        let Some(c) = weak.upgrade() else { return };
        if c.is_stopping() {
            return;
        }
        if let Err(e) = leases::rebalance(&c).await {
            tracing::error!(error = %e, "partition lease renewal failed");
        }
        c.sync_assignments().await;
        c.sync_tokens().await;
        c.sync_token_revocations().await;
        if identities_synced.elapsed() >= IDENTITY_SYNC_INTERVAL {
            c.sync_identities().await;
            identities_synced = tokio::time::Instant::now();
        }
    }
}

/// How far back from its watermark a token sync reads again. A token created elsewhere can
/// commit after a newer one was read (a slow insert under load) or carry an older time (its
/// creator's clock is behind); this covers both. Whatever slips past is still found by a
/// lookup on a miss.
const TOKEN_SYNC_OVERLAP: Duration = Duration::from_secs(30);

/// Least time between two syncs started by `TokensCreated` events, so that tokens created one
/// API call at a time cost a few syncs per second rather than one each.
const TOKEN_SYNC_SPACING: Duration = Duration::from_millis(100);

/// Tokens merged into the cache per write-lock hold, so that authentications are not held
/// up while a large batch is loaded.
const TOKEN_SYNC_CHUNK: usize = 1024;

/// Runs the token syncs `TokensCreated` events ask for, one at a time and spaced.
async fn run_token_sync(weak: std::sync::Weak<Coordinator>, mut wanted: mpsc::Receiver<()>) {
    while wanted.recv().await.is_some() {
        let Some(c) = weak.upgrade() else { return };
        c.sync_tokens().await;
        drop(c);
        tokio::time::sleep(TOKEN_SYNC_SPACING).await;
    }
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").finish_non_exhaustive()
    }
}

/// API-facing failures, mapped to HTTP statuses in one place (`api`).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// Ours, not the caller's (a signature that failed, say).
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `text` with control characters escaped and at most `max` characters kept, for logging
/// what an agent wrote.
fn log_safe(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

fn shard_of(uid: &InstanceUid) -> usize {
    usize::from(uid.0[15]) % SHARDS
}

impl Coordinator {
    /// Loads agents, configs and assignments from the store and starts the background tasks
    /// (status flusher, HTTP liveness reaper). Call [`Coordinator::flush`] on shutdown.
    pub async fn start(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        ownership: Arc<dyn Ownership>,
        cfg: CoordinatorConfig,
    ) -> Result<Arc<Self>, StoreError> {
        let offer = OpampOffer {
            endpoint: cfg.opamp_endpoint.clone(),
            heartbeat_interval_secs: cfg.heartbeat_interval_secs.max(1),
        };
        let (redeemer, jobs) = mpsc::channel(4 * REDEEM_BATCH);
        tokio::spawn(run_redeemer(store.clone(), jobs));
        let mut tokens = TokenCache::default();
        let mut token_watermark = now_ms();
        for t in store.list_tokens().await? {
            token_watermark = token_watermark.max(t.created_ms);
            tokens.insert(t);
        }
        let (token_sync, token_sync_wanted) = mpsc::channel(1);
        // Every identity, once; later only what changed (`sync_identities`).
        let identities_read_at = now_ms();
        let mut identities: HashMap<InstanceUid, Vec<IdentityRecord>> = HashMap::new();
        for i in store.list_identities().await? {
            identities.entry(i.instance_uid).or_default().push(i);
        }
        let this = Arc::new(Self {
            held: StdMutex::new(HashMap::new()),
            rebalancing: Mutex::new(()),
            stopping: AtomicBool::new(false),
            serving: std::sync::atomic::AtomicUsize::new(0),
            identities: RwLock::new(identities),
            identity_watermark: Mutex::new(identities_read_at),
            refusals: Refusals::new(cfg.refusal_window),
            revocation_watermark: Mutex::new(now_ms()),
            crl_cache: Mutex::new(None),
            tokens: RwLock::new(tokens),
            token_watermark: Mutex::new(token_watermark),
            token_sync,
            token_hits: AtomicU64::new(0),
            token_misses: AtomicU64::new(0),
            redeemer,
            store: store.clone(),
            bus,
            ownership,
            cfg,
            offer,
            agents: (0..SHARDS).map(|_| StdMutex::new(HashMap::new())).collect(),
            dirty: StdMutex::new(HashSet::new()),
            desired: RwLock::new(HashMap::new()),
            assignments: RwLock::new(Vec::new()),
        });
        let assignments = store.list_assignments().await?;
        for a in &assignments {
            this.load_desired(a.config_id).await?;
        }
        if let Ok(mut w) = this.assignments.write() {
            *w = assignments;
        }
        let control = this
            .bus
            .subscribe_control()
            .await
            .map_err(|e| StoreError::NotApplied(format!("bus: {e}")))?;
        this.bus
            .serve_coordinator(this.clone())
            .await
            .map_err(|e| StoreError::NotApplied(format!("bus: {e}")))?;
        // Ready only once this coordinator holds its share: the first round also tells the
        // others (through the membership) that it joined.
        leases::rebalance(&this).await?;
        let _ = this.bus.broadcast(ControlEvent::MembershipChanged).await;
        tokio::spawn(run_control(Arc::downgrade(&this), control));
        tokio::spawn(run_leases(Arc::downgrade(&this)));
        tokio::spawn(run_token_sync(Arc::downgrade(&this), token_sync_wanted));
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            loop {
                let interval = match weak.upgrade() {
                    Some(c) => c.cfg.flush_interval,
                    None => return,
                };
                tokio::time::sleep(interval).await;
                let Some(c) = weak.upgrade() else { return };
                if let Err(e) = c.flush().await {
                    tracing::error!(error = %e, "agent status flush failed");
                }
                c.sweep().await;
                c.write_refusal_summaries(now_ms()).await;
            }
        });
        Ok(this)
    }

    // ---- Partitions ----------------------------------------------------------------------

    fn held(&self) -> HashMap<u16, i64> {
        self.held.lock().map(|h| h.clone()).unwrap_or_default()
    }

    fn set_held(&self, held: HashMap<u16, i64>) {
        metrics::gauge!("ampora_coordinator_partitions").set(held.len() as f64);
        if let Ok(mut h) = self.held.lock() {
            *h = held;
        }
    }

    fn held_count(&self) -> usize {
        self.held.lock().map(|h| h.len()).unwrap_or(0)
    }

    fn holds(&self, partition: u16) -> bool {
        self.held.lock().is_ok_and(|h| h.contains_key(&partition))
    }

    fn holds_all(&self) -> bool {
        self.held_count() == usize::from(PARTITIONS)
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Slots of the agents in `partitions`.
    fn slots_in(&self, partitions: &[u16]) -> Vec<(InstanceUid, Slot)> {
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
    async fn hand_over(&self, partitions: &[u16]) {
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
    async fn drop_partitions(&self, partitions: &[u16]) {
        if let Err(e) = self.bus.unserve_partitions(partitions).await {
            tracing::warn!(error = %e, "unsubscribing partitions failed");
        }
        self.forget_partitions(partitions);
    }

    fn forget_partitions(&self, partitions: &[u16]) {
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
    async fn take_partitions(&self, partitions: &[u16]) -> Result<(), StoreError> {
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
        for uid in check {
            if matches!(self.ownership.lookup(uid).await, Ok(None)) {
                self.disconnected_any(uid).await;
            }
        }
        self.reconcile(partitions).await;
        Ok(())
    }

    /// Brings the agents of `partitions` in line with the current assignments and pushes
    /// their desired config to those connected over WebSocket that don't report it yet (the
    /// previous owner may have died before pushing). Pushes are idempotent by config hash.
    async fn reconcile(&self, partitions: &[u16]) {
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
                if let Some(msg) = session::push_config(&mut e.state, &d) {
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
    }

    /// Loads assignments created by any coordinator since we last looked and applies them to
    /// our agents (pushing configs). Idempotent: pushes go by config hash.
    async fn sync_assignments(&self) {
        let all = match self.store.list_assignments().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "loading assignments failed");
                return;
            }
        };
        let known: HashSet<i64> = self
            .assignments
            .read()
            .map(|a| a.iter().map(|a| a.id).collect())
            .unwrap_or_default();
        for a in all.into_iter().filter(|a| !known.contains(&a.id)) {
            if let Err(e) = self.load_desired(a.config_id).await {
                tracing::warn!(error = %e, config_id = a.config_id, "loading assigned config failed");
                continue;
            }
            if let Ok(mut w) = self.assignments.write() {
                w.push(a.clone());
                w.sort_by_key(|a| a.id);
            }
            self.apply_assignment(&a).await;
        }
    }

    /// A coordinator changed a token: reload our copy (a sync racing this keeps the change,
    /// see [`TokenCache::insert`]) and end the sessions of a revoked one.
    async fn reload_token(&self, token_id: &str) {
        match self.store.get_token(token_id).await {
            Ok(Some(rec)) => {
                let revoked = rec.revoked_ms.is_some();
                self.cache_token(rec);
                if revoked {
                    self.close_token_sessions(token_id).await;
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, token_id, "reloading token failed"),
        }
    }

    fn insert_entry(&self, record: AgentRecord) -> Slot {
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

    fn slot(&self, uid: &InstanceUid) -> Option<Slot> {
        self.agents[shard_of(uid)]
            .lock()
            .ok()
            .and_then(|s| s.get(uid).cloned())
    }

    fn all_slots(&self) -> Vec<Slot> {
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

    fn mark_dirty(&self, uid: InstanceUid) {
        if let Ok(mut d) = self.dirty.lock() {
            d.insert(uid);
        }
    }

    async fn load_desired(&self, config_id: i64) -> Result<Arc<Desired>, StoreError> {
        if let Some(d) = self
            .desired
            .read()
            .ok()
            .and_then(|m| m.get(&config_id).cloned())
        {
            return Ok(d);
        }
        let version = self
            .store
            .get_config(config_id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("config version {config_id}")))?;
        let d = Arc::new(Desired::new(version.id, &version.files));
        if let Ok(mut m) = self.desired.write() {
            m.insert(config_id, d.clone());
        }
        Ok(d)
    }

    fn desired_of(&self, record: &AgentRecord) -> Option<Arc<Desired>> {
        let id = record.assigned_config?;
        self.desired.read().ok()?.get(&id).cloned()
    }

    /// The newest assignment matching `record`, if any.
    fn match_assignment(&self, record: &AgentRecord) -> Option<i64> {
        let all = self.assignments.read().ok()?;
        all.iter()
            .rev()
            .find(|a| self.target_admits(&a.target, record))
            .map(|a| a.config_id)
    }

    /// Re-evaluates the assignment of one agent; true when it changed.
    fn reassign(&self, state: &mut AgentState) -> bool {
        let want = self.match_assignment(&state.record);
        if want == state.record.assigned_config {
            return false;
        }
        state.record.assigned_config = want;
        state.record.assigned_config_hash = want.and_then(|id| {
            self.desired
                .read()
                .ok()?
                .get(&id)
                .map(|d| d.hash_hex.clone())
        });
        true
    }

    /// Writes every changed agent in one batch.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let uids: Vec<InstanceUid> = match self.dirty.lock() {
            Ok(mut d) => d.drain().collect(),
            Err(_) => return Ok(0),
        };
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
        if let Err(e) = self.store.upsert_agents(&records).await {
            // Keep them dirty: the next flush retries the whole batch (upserts are idempotent).
            if let Ok(mut d) = self.dirty.lock() {
                d.extend(uids);
            }
            return Err(e);
        }
        metrics::counter!("ampora_store_agent_writes_total").increment(records.len() as u64);
        Ok(records.len())
    }

    /// Once per flush: takes HTTP agents that missed three polls offline (they have no
    /// connection to lose) and refreshes the fleet gauges, in one pass over the agents.
    async fn sweep(&self) {
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

    async fn audit(
        &self,
        actor: &str,
        action: &str,
        uid: Option<InstanceUid>,
        ip: Option<IpAddr>,
        reason: Option<&str>,
        detail: serde_json::Value,
    ) {
        let entry = AuditEntry {
            id: 0,
            at_ms: now_ms(),
            actor: actor.to_string(),
            action: action.to_string(),
            instance_uid: uid,
            source_ip: ip,
            reason: reason.map(str::to_string),
            detail,
        };
        if let Err(e) = self.append_audit(&entry).await {
            tracing::error!(error = %e, action, "audit write failed");
        }
    }

    /// [`Coordinator::audit`] for an operator's change: the change is already made, so a
    /// failed audit write fails the call (the operator sees an error and can look) instead of
    /// passing unrecorded.
    async fn audit_op(
        &self,
        actor: &str,
        action: &str,
        uid: Option<InstanceUid>,
        detail: serde_json::Value,
    ) -> Result<(), ServiceError> {
        let entry = AuditEntry {
            id: 0,
            at_ms: now_ms(),
            actor: actor.to_string(),
            action: action.to_string(),
            instance_uid: uid,
            source_ip: None,
            reason: None,
            detail,
        };
        self.append_audit(&entry).await.map_err(ServiceError::from)
    }

    /// Writes an audit entry, retrying a failed write twice (a database restart, a lost
    /// connection); counts writes that still failed.
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let mut last = None;
        for backoff_ms in [0u64, 50, 250] {
            if backoff_ms > 0 {
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            }
            // A retry after `MaybeApplied` may write the row twice: better than losing it.
            match self.store.append_audit(entry).await {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        metrics::counter!("ampora_audit_write_failures_total").increment(1);
        Err(last.unwrap_or_else(|| StoreError::NotApplied("audit write".into())))
    }

    /// Counts a refused authentication and audits it (aggregated, see [`refusals`]).
    async fn refused(&self, r: Refused) {
        tracing::debug!(source_ip = %r.ip, reason = r.reason, "authentication refused");
        if let Some(row) = self.refusals.note(r, now_ms()) {
            if let Err(e) = self.append_audit(&row).await {
                tracing::error!(error = %e, "audit write failed");
            }
        }
    }

    /// Writes the summary rows of refusal windows that have ended (all of them with
    /// `i64::MAX`, at shutdown).
    async fn write_refusal_summaries(&self, now: i64) {
        for row in self.refusals.due(now) {
            if let Err(e) = self.append_audit(&row).await {
                tracing::error!(error = %e, "audit write failed");
            }
        }
    }

    // ---- Authentication -------------------------------------------------------------------

    async fn authenticate(&self, req: AuthRequest) -> AuthDecision {
        let decision = match &req.certificate {
            Some(cert) => self.check_certificate(cert.uid, &cert.serial).await,
            None => self.check_token(&req).await,
        };
        if let AuthDecision::Reject(f) = &decision {
            let detail = match &req.certificate {
                Some(cert) => serde_json::json!({ "certificate": cert.serial }),
                None => match &req.token {
                    Some(t) => serde_json::json!({ "token": t.prefix }),
                    None => serde_json::Value::Null,
                },
            };
            self.refused(Refused {
                ip: req.source_ip,
                reason: refusals::reason_label(f.as_str()),
                uid_hint: req.uid_hint,
                detail,
            })
            .await;
        }
        decision
    }

    /// A bootstrap token, known here only by its hash: the gateway checked its format (and
    /// refused a malformed one itself) and never sends its text.
    async fn check_token(&self, req: &AuthRequest) -> AuthDecision {
        let Some(hash) = req.token.as_ref().map(|t| t.hash) else {
            return AuthDecision::Reject(AuthFailure::MissingCredentials);
        };
        let cached = self
            .tokens
            .read()
            .ok()
            .and_then(|c| c.by_hash.get(&hash).cloned());
        let rec = match cached {
            Some(r) => {
                self.token_hits.fetch_add(1, Ordering::Relaxed);
                r
            }
            None => {
                self.token_misses.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("ampora_coordinator_token_cache_misses_total").increment(1);
                match self.store.find_token(&hash).await {
                    Ok(Some(r)) => {
                        if let Ok(mut c) = self.tokens.write() {
                            c.insert(r.clone());
                        }
                        r
                    }
                    Ok(None) => return AuthDecision::Reject(AuthFailure::UnknownToken),
                    Err(e) => {
                        // The token may well be good: "retry later", not 401.
                        tracing::error!(error = %e, "token lookup failed");
                        return AuthDecision::Unavailable;
                    }
                }
            }
        };
        if rec.revoked_ms.is_some() {
            return AuthDecision::Reject(AuthFailure::Revoked);
        }
        if rec.expires_ms <= now_ms() {
            return AuthDecision::Reject(AuthFailure::Expired);
        }
        if let (Some(bound), Some(hint)) = (rec.bound_uid, req.uid_hint) {
            if bound != hint {
                return AuthDecision::Reject(AuthFailure::AlreadyRedeemed);
            }
        }
        // After its first mTLS connection an agent is on the certificate path for good.
        if rec
            .bound_uid
            .or(req.uid_hint)
            .is_some_and(|u| self.identity_confirmed(u))
        {
            return AuthDecision::Reject(AuthFailure::IdentityRequired);
        }
        AuthDecision::Accept(Credential::BootstrapToken {
            token_id: rec.id,
            bound_uid: rec.bound_uid,
        })
    }

    // ---- Identities -----------------------------------------------------------------------

    /// Merges the identities issued, confirmed or revoked since the last sync (less
    /// [`IDENTITY_SYNC_OVERLAP`]) into the cache: only what changed, not the whole table with
    /// a certificate per agent. A failed read is retried from the same point next time.
    pub(crate) async fn sync_identities(&self) {
        let mut watermark = self.identity_watermark.lock().await;
        let started = now_ms();
        let overlap = i64::try_from(IDENTITY_SYNC_OVERLAP.as_millis()).unwrap_or(i64::MAX);
        match self
            .store
            .identities_changed_since(watermark.saturating_sub(overlap))
            .await
        {
            Ok(changed) => {
                self.merge_identities(changed);
                *watermark = started;
            }
            Err(e) => tracing::warn!(error = %e, "loading changed identities failed"),
        }
    }

    /// Puts identities read from the store into the cache. Confirmation and revocation only
    /// ever get set: a read that raced with a local change must not undo it.
    fn merge_identities(&self, records: impl IntoIterator<Item = IdentityRecord>) {
        let Ok(mut c) = self.identities.write() else {
            return;
        };
        for record in records {
            let ids = c.entry(record.instance_uid).or_default();
            match ids.iter_mut().find(|i| i.serial == record.serial) {
                Some(i) => {
                    i.confirmed_ms = i.confirmed_ms.or(record.confirmed_ms);
                    i.revoked_ms = i.revoked_ms.or(record.revoked_ms);
                }
                // In creation order, as the newest-last lookups expect.
                None => {
                    let at = ids.partition_point(|i| i.created_ms <= record.created_ms);
                    ids.insert(at, record);
                }
            }
        }
    }

    fn identity(&self, serial: &str, uid: InstanceUid) -> Option<IdentityRecord> {
        let cache = self.identities.read().ok()?;
        cache
            .get(&uid)?
            .iter()
            .find(|i| i.serial == serial)
            .cloned()
    }

    /// Identity `serial` as the store has it, merged into the cache (another coordinator
    /// issued or confirmed it); `None` when the store does not have it.
    async fn load_identity(&self, serial: &str) -> Result<Option<IdentityRecord>, StoreError> {
        let Some(record) = self.store.get_identity(serial).await.inspect_err(|e| {
            tracing::warn!(error = %e, "identity lookup failed");
        })?
        else {
            return Ok(None);
        };
        self.merge_identities([record.clone()]);
        Ok(Some(record))
    }

    /// True when `uid` has a live identity it has connected with: bootstrap tokens are then
    /// refused for it.
    fn identity_confirmed(&self, uid: InstanceUid) -> bool {
        self.identities.read().is_ok_and(|c| {
            c.get(&uid).is_some_and(|ids| {
                ids.iter()
                    .any(|i| i.confirmed_ms.is_some() && i.revoked_ms.is_none())
            })
        })
    }

    /// The newest live identity of `uid` that is not due for renewal (two thirds of its
    /// validity left behind).
    fn current_identity(&self, uid: InstanceUid, now: i64) -> Option<IdentityRecord> {
        let cache = self.identities.read().ok()?;
        let newest = cache
            .get(&uid)?
            .iter()
            .rev()
            .find(|i| i.revoked_ms.is_none())?;
        let renew_at = newest.created_ms + (newest.not_after_ms - newest.created_ms) * 2 / 3;
        (now < renew_at).then(|| newest.clone())
    }

    /// A certificate the gateway verified: its identity must be known here and not revoked
    /// (the gateway's revocation set may lag by a broadcast). In a cluster, one unknown here
    /// was usually issued a moment ago by another coordinator, before this one's next reload
    /// (the agent reconnects with it at once), so it is looked up in the store.
    async fn check_certificate(&self, uid: InstanceUid, serial: &str) -> AuthDecision {
        let known = match self.identity(serial, uid) {
            Some(i) => Some(i),
            None => match self.load_identity(serial).await {
                Ok(found) => found.filter(|i| i.instance_uid == uid),
                // A certificate the gateway verified may well be good: "retry later".
                Err(_) => return AuthDecision::Unavailable,
            },
        };
        match known {
            Some(i) if i.revoked_ms.is_none() => AuthDecision::Accept(Credential::Certificate {
                uid,
                serial: serial.to_string(),
            }),
            _ => AuthDecision::Reject(AuthFailure::IdentityRevoked),
        }
    }

    /// Issues a new identity for `uid` (from `csr` when the agent sent one), stores and
    /// audits it. `Err(message)` for a bad CSR: the agent gets `BadRequest` (facts §5.3).
    async fn issue_identity(
        &self,
        uid: InstanceUid,
        csr: Option<&str>,
        source_ip: IpAddr,
    ) -> Result<Option<IdentityOffer>, String> {
        let Some(ca) = self.cfg.agent_ca.clone() else {
            return Ok(None);
        };
        let validity = self.cfg.identity_validity;
        let csr_owned = csr.map(str::to_string);
        // Key generation and signing are CPU work; keep them off the async workers.
        let issued = tokio::task::spawn_blocking(move || {
            ca.issue(uid, csr_owned.as_deref(), validity)
                .map(|i| (i, ca.ca_pem().to_string()))
        })
        .await;
        let (issued, ca_pem) = match issued {
            Ok(Ok(pair)) => pair,
            Ok(Err(gateway::tls::IssueError::BadCsr(m))) => return Err(m),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "issuing an identity failed");
                return Ok(None);
            }
            Err(e) => {
                tracing::error!(error = %e, "issuing an identity failed");
                return Ok(None);
            }
        };
        let record = IdentityRecord {
            serial: issued.serial.clone(),
            instance_uid: uid,
            created_ms: now_ms(),
            not_after_ms: issued.not_after_ms,
            confirmed_ms: None,
            revoked_ms: None,
            fingerprint: issued.fingerprint.clone(),
            cert_pem: issued.cert_pem.clone(),
        };
        if let Err(e) = self.store.create_identity(&record).await {
            tracing::error!(error = %e, "storing an identity failed");
            return Ok(None);
        }
        let superseded = match self.identities.write() {
            Ok(mut c) => {
                let ids = c.entry(uid).or_default();
                let stale = ids
                    .iter()
                    .filter(|i| i.confirmed_ms.is_none() && i.revoked_ms.is_none())
                    .map(|i| i.serial.clone())
                    .collect::<Vec<_>>();
                ids.push(record);
                stale
            }
            Err(_) => Vec::new(),
        };
        self.audit(
            "agent",
            "identity.issue",
            Some(uid),
            Some(source_ip),
            None,
            serde_json::json!({ "serial": issued.serial, "csr": csr.is_some() }),
        )
        .await;
        for serial in superseded {
            self.retire_identity(uid, &serial, "superseded").await;
        }
        Ok(Some(IdentityOffer {
            serial: issued.serial,
            cert_pem: issued.cert_pem,
            ca_pem,
            private_key_pem: issued.private_key_pem,
        }))
    }

    /// The identity to offer this agent on this frame: the one it holds, or a new one when it
    /// came in with a bootstrap token and accepts OpAMP connection settings but has none
    /// (or it is due for renewal, or it sent a CSR).
    async fn identity_offer(
        &self,
        entry: &mut Entry,
        frame: &AgentFrame,
        uid: InstanceUid,
        new_conn: bool,
    ) -> Result<(), String> {
        let msg = &frame.msg;
        let caps = if msg.capabilities != 0 {
            msg.capabilities
        } else {
            entry.state.record.capabilities
        };
        if caps & proto::agent_caps::ACCEPTS_OPAMP_CONNECTION_SETTINGS == 0
            || msg.agent_disconnect.is_some()
        {
            return Ok(());
        }
        let csr = msg
            .connection_settings_request
            .as_ref()
            .and_then(|r| r.opamp.as_ref())
            .and_then(|o| o.certificate_request.as_ref())
            .map(|c| String::from_utf8_lossy(&c.csr).into_owned());
        if self.cfg.agent_ca.is_none() {
            // Say so, rather than leave the agent waiting for a certificate that never comes.
            return match csr {
                Some(_) => Err("not supported here: no agent CA is configured".into()),
                None => Ok(()),
            };
        }
        let current = self.current_identity(uid, now_ms());
        let offers = |e: &Entry, c: &IdentityRecord| {
            e.identity.as_ref().is_some_and(|i| i.serial == c.serial)
        };
        match (&csr, &current) {
            (Some(csr), Some(c)) => {
                // The key of the current certificate again: nothing new to sign.
                if issuance::same_key(csr, &c.cert_pem)? {
                    if !offers(entry, c) {
                        entry.identity = self.repeat_offer(c);
                    }
                    return Ok(());
                }
            }
            (Some(csr), None) => issuance::check_csr(csr)?,
            (None, Some(c)) => {
                let using = matches!(&frame.credential,
                    Credential::Certificate { serial, .. } if *serial == c.serial);
                // Its generated key is here, not sent yet (or sent on this very connection:
                // the agent has yet to switch).
                let key_pending = offers(entry, c)
                    && entry
                        .identity
                        .as_ref()
                        .is_some_and(|i| i.private_key_pem.is_some());
                // Back on a new connection without it, after its key went out (or was never
                // known here: a restart, another coordinator): the agent lost it, and a key is
                // never kept to be sent again.
                let lost = !using && new_conn && !key_pending && c.confirmed_ms.is_none();
                if !lost {
                    if !offers(entry, c) {
                        entry.identity = self.repeat_offer(c);
                    }
                    return Ok(());
                }
            }
            (None, None) => {}
        }
        // A generated private key never travels over plaintext.
        if csr.is_none() && !frame.secure {
            return Ok(());
        }
        let now = now_ms();
        if !issuance::allowed(&mut entry.issued_ms, now) {
            metrics::counter!("ampora_identity_issue_throttled_total").increment(1);
            return Ok(());
        }
        if let Some(offer) = self
            .issue_identity(uid, csr.as_deref(), frame.source_ip)
            .await?
        {
            entry.identity = Some(offer);
            entry.issued_ms.push(now);
        }
        Ok(())
    }

    /// An offer repeating identity `c` (its certificate; the key is never kept).
    fn repeat_offer(&self, c: &IdentityRecord) -> Option<IdentityOffer> {
        let ca = self.cfg.agent_ca.as_ref()?;
        Some(IdentityOffer {
            serial: c.serial.clone(),
            cert_pem: c.cert_pem.clone(),
            ca_pem: ca.ca_pem().to_string(),
            private_key_pem: None,
        })
    }

    /// Marks the identity confirmed on its first mTLS frame (facts §5.1 step 7): from then on
    /// bootstrap tokens are refused for the agent.
    async fn confirm_identity(&self, uid: InstanceUid, serial: &str, source_ip: IpAddr) {
        let confirmed = self
            .identity(serial, uid)
            .is_some_and(|i| i.confirmed_ms.is_some());
        if confirmed {
            return;
        }
        let at = now_ms();
        match self.store.confirm_identity(serial, at).await {
            Ok(_) => {
                // The agent's other live identities are older (a newer one would have been
                // offered instead of this): they go now that this one works.
                let replaced = match self.identities.write() {
                    Ok(mut c) => c.get_mut(&uid).map_or_else(Vec::new, |ids| {
                        if let Some(i) = ids.iter_mut().find(|i| i.serial == serial) {
                            i.confirmed_ms.get_or_insert(at);
                        }
                        ids.iter()
                            .filter(|i| i.serial != serial && i.revoked_ms.is_none())
                            .map(|i| i.serial.clone())
                            .collect()
                    }),
                    Err(_) => Vec::new(),
                };
                for old in replaced {
                    self.retire_identity(uid, &old, "replaced").await;
                }
                // The other coordinators refuse the bootstrap token from now on too, not only
                // after their next full reload (this one hears it as well, in case it did not
                // hold the record).
                let event = ControlEvent::IdentityConfirmed {
                    serial: serial.to_string(),
                };
                if let Err(e) = self.bus.broadcast(event).await {
                    tracing::warn!(error = %e, "identity confirmation broadcast failed");
                }
                self.audit(
                    "agent",
                    "identity.confirm",
                    Some(uid),
                    Some(source_ip),
                    None,
                    serde_json::json!({ "serial": serial }),
                )
                .await;
            }
            Err(e) => tracing::error!(error = %e, "confirming an identity failed"),
        }
    }

    /// Every identity, oldest first.
    pub async fn identities(&self) -> Result<Vec<IdentityRecord>, ServiceError> {
        Ok(self.store.list_identities().await?)
    }

    pub async fn get_identity(&self, serial: &str) -> Result<IdentityRecord, ServiceError> {
        self.store
            .get_identity(serial)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("identity {serial}")))
    }

    /// Revokes an identity: stored, audited, broadcast (gateways refuse it at the handshake
    /// from then on) and the agent's live connection closed.
    pub async fn revoke_identity(&self, serial: &str, author: &str) -> Result<(), ServiceError> {
        let identity = self.get_identity(serial).await?;
        self.store.revoke_identity(serial, now_ms()).await?;
        self.crl_changed().await;
        self.load_identity(serial).await?;
        // The revocation stands whatever happens to its audit row; its error is returned
        // once the gateways have been told.
        let audited = self
            .audit_op(
                author,
                "identity.revoke",
                Some(identity.instance_uid),
                serde_json::json!({ "serial": serial }),
            )
            .await;
        if let Err(e) = self
            .bus
            .broadcast(ControlEvent::IdentityRevoked {
                serial: serial.to_string(),
            })
            .await
        {
            tracing::warn!(error = %e, "identity revocation broadcast failed");
        }
        match self.ownership.lookup(identity.instance_uid).await {
            Ok(Some(owner)) => {
                let close = GatewayMessage::Close {
                    uid: identity.instance_uid,
                    epoch: owner.epoch,
                    reason: "auth: identity revoked".into(),
                };
                if let Err(e) = self.bus.deliver(&owner.gateway, close).await {
                    tracing::warn!(error = %e, "closing a revoked agent failed");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "ownership lookup failed"),
        }
        audited
    }

    /// Revokes an identity that a newer one of the same agent makes redundant: `superseded`,
    /// issued but never used (an agent that came back with its token before switching to its
    /// certificate gets a new one, as a server-generated key cannot be sent twice), or
    /// `replaced`, once the agent has connected with its renewed certificate (facts §5.1
    /// step 7: the old credentials go). Unlike [`revoke_identity`](Self::revoke_identity) no
    /// connection is closed: the agent is on its current credentials.
    async fn retire_identity(&self, uid: InstanceUid, serial: &str, reason: &str) {
        let at = now_ms();
        if let Err(e) = self.store.revoke_identity(serial, at).await {
            tracing::warn!(error = %e, "revoking a superseded identity failed");
            return;
        }
        self.crl_changed().await;
        if let Ok(mut c) = self.identities.write() {
            if let Some(i) = c
                .get_mut(&uid)
                .and_then(|ids| ids.iter_mut().find(|i| i.serial == serial))
            {
                i.revoked_ms.get_or_insert(at);
            }
        }
        self.audit(
            "agent",
            "identity.revoke",
            Some(uid),
            None,
            None,
            serde_json::json!({ "serial": serial, "reason": reason }),
        )
        .await;
        let event = ControlEvent::IdentityRevoked {
            serial: serial.to_string(),
        };
        if let Err(e) = self.bus.broadcast(event).await {
            tracing::warn!(error = %e, "identity revocation broadcast failed");
        }
    }

    /// Revoked identities not expired yet, for a CRL: (serial, revoked at ms).
    pub async fn revoked_identities(&self) -> Result<Vec<(String, i64)>, ServiceError> {
        let revoked = self.store.revoked_identities().await?;
        Ok(crl::still_revoked(revoked, now_ms())
            .into_iter()
            .filter_map(|i| i.revoked_ms.map(|at| (i.serial, at)))
            .collect())
    }

    pub fn agent_ca(&self) -> Option<&Arc<gateway::tls::AgentCa>> {
        self.cfg.agent_ca.as_ref()
    }

    /// Binds the connection's token to `uid` on first use; `Err` carries the refusal.
    async fn redeem(
        &self,
        entry: &mut Entry,
        frame: &AgentFrame,
        uid: InstanceUid,
    ) -> Result<(), Refusal> {
        let (token_id, bound_uid) = match &frame.credential {
            Credential::BootstrapToken {
                token_id,
                bound_uid,
            } => (token_id, bound_uid),
            Credential::Certificate { uid: cert_uid, .. } => {
                // The certificate names the agent; the message must be about that agent.
                return if *cert_uid == uid {
                    Ok(())
                } else {
                    Err(Refusal::IdentityMismatch)
                };
            }
        };
        if self.identity_confirmed(uid) {
            return Err(AuthFailure::IdentityRequired.into());
        }
        if entry.token_id.as_deref() == Some(token_id.as_str()) {
            return Ok(());
        }
        if let Some(b) = bound_uid {
            if *b != uid {
                return Err(AuthFailure::AlreadyRedeemed.into());
            }
        }
        self.check_scope(token_id, frame, uid).await?;
        let audit = AuditEntry {
            id: 0,
            at_ms: now_ms(),
            actor: "agent".into(),
            action: "token.redeem".into(),
            instance_uid: Some(uid),
            source_ip: Some(frame.source_ip),
            reason: None,
            detail: serde_json::json!({ "token_id": token_id }),
        };
        let (reply, outcome) = oneshot::channel();
        let req = RedeemRequest {
            token_id: token_id.clone(),
            uid,
            audit,
        };
        let outcome = match self.redeemer.send((req, reply)).await {
            Ok(()) => outcome.await.map_err(|e| e.to_string()).and_then(|r| r),
            Err(e) => Err(e.to_string()),
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "token redemption failed");
                return Err(AuthFailure::UnknownToken.into());
            }
        };
        match outcome {
            Redemption::Bound => {
                metrics::counter!("ampora_tokens_redeemed_total").increment(1);
                if let Ok(mut c) = self.tokens.write() {
                    c.update(token_id, |t| {
                        t.bound_uid = Some(uid);
                        t.redeemed_ms = Some(now_ms());
                    });
                }
            }
            Redemption::AlreadyBoundToSame => {}
            Redemption::BoundToOther => return Err(AuthFailure::AlreadyRedeemed.into()),
            Redemption::Revoked => return Err(AuthFailure::Revoked.into()),
            Redemption::Expired => return Err(AuthFailure::Expired.into()),
            Redemption::NotFound => return Err(AuthFailure::UnknownToken.into()),
        }
        entry.token_id = Some(token_id.clone());
        Ok(())
    }

    /// A scoped token binds only to an agent whose first frame describes it with every label
    /// of the scope, identifying or not. A first frame without a description is refused too:
    /// the agent has not shown it matches, and the binding, once made, is never checked again.
    ///
    /// Only a token not yet bound is checked (a bound one passed when it was bound). The scope
    /// never changes, so a cached copy tells whether there is one; whether the token is bound
    /// yet, only the store knows for sure (another coordinator may have bound it), so a scoped
    /// token not known here to be bound to `uid` is read from the store.
    async fn check_scope(
        &self,
        token_id: &str,
        frame: &AgentFrame,
        uid: InstanceUid,
    ) -> Result<(), Refusal> {
        let cached = self.tokens.read().ok().and_then(|c| {
            c.hash_of
                .get(token_id)
                .and_then(|h| c.by_hash.get(h))
                .cloned()
        });
        match &cached {
            Some(t) if t.scope.is_none() || t.bound_uid == Some(uid) => return Ok(()),
            _ => {}
        }
        let rec = match self.store.get_token(token_id).await {
            Ok(Some(rec)) => rec,
            Ok(None) => return Err(AuthFailure::UnknownToken.into()),
            Err(e) => {
                tracing::error!(error = %e, "token lookup failed");
                return Err(AuthFailure::UnknownToken.into());
            }
        };
        // Bound already: the redemption decides (same agent: fine; another: refused).
        let (None, Some(scope)) = (rec.bound_uid, &rec.scope) else {
            return Ok(());
        };
        let admitted = frame
            .msg
            .agent_description
            .as_ref()
            .is_some_and(|d| scope.admits(&session::description_from_proto(d)));
        if admitted {
            Ok(())
        } else {
            Err(Refusal::ScopeMismatch)
        }
    }

    // ---- Agent frames ---------------------------------------------------------------------

    async fn frame(&self, frame: AgentFrame) -> FrameReply {
        let msg = &frame.msg;
        let asked = msg.flags & proto::agent_flags::REQUEST_INSTANCE_UID != 0;
        let claimed = InstanceUid::from_slice(&msg.instance_uid);
        let token_id = match &frame.credential {
            Credential::BootstrapToken { token_id, .. } => token_id.clone(),
            Credential::Certificate { serial, .. } => format!("certificate:{serial}"),
        };
        // The gateway routed this frame by the partition of the uid it carries (0 without
        // one). Right after a hand-over it may reach a coordinator that no longer serves that
        // partition: the agent retries and finds the new owner.
        let routed = claimed.map_or(0, |u| u.partition());
        if !self.holds(routed) {
            return FrameReply {
                msg: session::unavailable_reply(&msg.instance_uid, "partition is moving, retry"),
                bind: None,
                close: None,
            };
        }

        // A token that can no longer be used ends the session that rests on it, at once,
        // whatever the gateway's (older) authentication said.
        if let Credential::BootstrapToken { token_id, .. } = &frame.credential {
            if let Some(f) = self.token_unusable(token_id, now_ms()) {
                return self.refuse_frame(&frame, claimed, f.into()).await;
            }
        }

        // Decide which uid this message is about.
        let (uid, assigned) = match claimed {
            Some(uid) if !asked => {
                // A spare token never takes over a UID that exists: the agent gets a new one.
                let may_claim = match &frame.credential {
                    Credential::BootstrapToken {
                        token_id,
                        bound_uid,
                    } => match self.token_may_claim(token_id, *bound_uid, uid).await {
                        Ok(may) => may,
                        Err(()) => {
                            return FrameReply {
                                msg: session::unavailable_reply(
                                    &msg.instance_uid,
                                    "authentication unavailable, retry",
                                ),
                                bind: None,
                                close: None,
                            }
                        }
                    },
                    Credential::Certificate { .. } => true,
                };
                if !may_claim {
                    metrics::counter!("ampora_agent_uid_reassigned_total", "reason" => "uid_taken")
                        .increment(1);
                    self.refused(Refused {
                        ip: frame.source_ip,
                        reason: "uid_taken",
                        uid_hint: Some(uid),
                        detail: serde_json::json!({ "token_id": token_id, "outcome": "new_uid" }),
                    })
                    .await;
                }
                let collides = !may_claim
                    || match self.slot(&uid) {
                        Some(slot) => {
                            let e = slot.lock().await;
                            // Live elsewhere under another credential: a clone, not a reconnect.
                            e.conn.as_ref().is_some_and(|(gw, conn, _)| {
                                (gw, *conn) != (&frame.gateway, frame.conn_id)
                            }) && e.state.record.transport == Some(Transport::WebSocket)
                                && e.token_id.as_deref().is_some_and(|t| t != token_id)
                        }
                        None => false,
                    };
                if collides {
                    // Same partition, so the clone stays with this coordinator.
                    (InstanceUid::new_v7_in(uid.partition()), true)
                } else {
                    (uid, false)
                }
            }
            _ => (InstanceUid::new_v7(), true),
        };

        let (slot, fresh) = match self.slot(&uid) {
            Some(s) => (s, false),
            None => (self.insert_entry(AgentRecord::new(uid, now_ms())), true),
        };
        let mut entry = slot.lock().await;

        if let Err(f) = self.redeem(&mut entry, &frame, uid).await {
            drop(entry);
            // A refused newcomer leaves no record behind (it never got in).
            if assigned || fresh {
                self.forget(&uid);
            }
            return self.refuse_frame(&frame, Some(uid), f).await;
        }
        entry.conn_token = match &frame.credential {
            Credential::BootstrapToken { token_id, .. } => Some(token_id.clone()),
            Credential::Certificate { .. } => None,
        };

        let new_conn = match (&entry.conn, frame.transport) {
            (_, Transport::Http) => entry.conn.is_none(),
            (Some((gw, conn, _)), Transport::WebSocket) => {
                (gw, *conn) != (&frame.gateway, frame.conn_id)
            }
            (None, Transport::WebSocket) => true,
        };
        if new_conn {
            // After a move between gateways, frames in flight on the old path may have been
            // lost (the bus is at-most-once): unless this one is a full report, ask for it.
            let moved = entry
                .state
                .record
                .gateway
                .as_deref()
                .is_some_and(|g| g != frame.gateway.0);
            entry.state.connection_started();
            if moved {
                entry.state.complete = false;
            }
        }
        entry.conn = Some((frame.gateway.clone(), frame.conn_id, frame.epoch));
        entry.state.record.gateway = Some(frame.gateway.0.clone());

        if let Credential::Certificate { serial, .. } = &frame.credential {
            self.confirm_identity(uid, serial, frame.source_ip).await;
        }
        if let Err(bad_csr) = self.identity_offer(&mut entry, &frame, uid, new_conn).await {
            self.refused(Refused {
                ip: frame.source_ip,
                reason: "bad_csr",
                uid_hint: Some(uid),
                detail: serde_json::json!({ "error": bad_csr }),
            })
            .await;
            return FrameReply {
                msg: session::error_reply(
                    &msg.instance_uid,
                    ServerErrorResponseType::BadRequest,
                    &format!("certificate request refused: {bad_csr}"),
                ),
                bind: None,
                close: None,
            };
        }
        let desired = self.desired_of(&entry.state.record);
        if let (Credential::Certificate { serial, .. }, Some(id)) =
            (&frame.credential, entry.identity.clone())
        {
            if *serial == id.serial {
                session::identity_in_use(&mut entry.state, &self.offer, &id, frame.transport);
            }
        }
        // A key still to be sent waits for a TLS connection.
        let identity = entry
            .identity
            .clone()
            .filter(|i| frame.secure || i.private_key_pem.is_none());
        let ctx = Context {
            now_ms: now_ms(),
            transport: frame.transport,
            desired: desired.as_deref(),
            opamp_offer: Some(&self.offer),
            identity: identity.as_ref(),
            assign_uid: assigned.then_some(uid),
        };
        let mut outcome = session::handle(&mut entry.state, msg, &ctx);
        // A generated key goes out in one offer, then is forgotten.
        let key_sent = outcome
            .reply
            .connection_settings
            .as_ref()
            .and_then(|c| c.opamp.as_ref())
            .and_then(|o| o.certificate.as_ref())
            .is_some_and(|c| !c.private_key.is_empty());
        if key_sent {
            if let Some(mut key) = entry
                .identity
                .as_mut()
                .and_then(|i| i.private_key_pem.take())
            {
                zeroize::Zeroize::zeroize(&mut key);
            }
        }

        for ev in &outcome.events {
            match ev {
                Event::ConfigFailed { hash, error } => {
                    metrics::counter!("ampora_config_remote_status_total", "status" => "failed")
                        .increment(1);
                    // The agent wrote `error`: escaped (no forged log lines) and cut short.
                    let error = log_safe(error, 512);
                    tracing::warn!(instance_uid = %uid, config_hash = %hash, error = %error, "agent failed to apply remote config");
                }
                Event::ConfigApplied { .. } => {
                    metrics::counter!("ampora_config_remote_status_total", "status" => "applied")
                        .increment(1);
                }
                Event::CapMismatch { what } => {
                    metrics::counter!("ampora_opamp_frames_rejected_total", "reason" => "cap_mismatch")
                        .increment(1);
                    tracing::debug!(instance_uid = %uid, what, "capability mismatch");
                }
                Event::Disconnected => entry.conn = None,
                Event::DescriptionChanged => {}
            }
        }
        // A description can change which assignment matches; a newly matched config goes out
        // in this very reply.
        let may_match = outcome.events.contains(&Event::DescriptionChanged)
            || entry.state.record.assigned_config.is_none();
        if may_match && self.reassign(&mut entry.state) {
            outcome.changed = true;
            let sendable = outcome.reply.error_response.is_none() && msg.agent_disconnect.is_none();
            if let (true, Some(d)) = (sendable, self.desired_of(&entry.state.record)) {
                if let Some(push) = session::push_config(&mut entry.state, &d) {
                    outcome.reply.remote_config = push.remote_config;
                }
            }
        }
        if assigned && !self.holds(uid.partition()) {
            // A fresh uid belongs to whichever coordinator serves its partition: that one
            // gets the agent's next frame, finds it new and asks for its full state.
            drop(entry);
            self.forget(&uid);
            outcome.reply.flags |= proto::server_flags::REPORT_FULL_STATE;
        } else {
            self.mark_dirty(uid);
        }

        let bind = (frame.transport == Transport::WebSocket
            && !assigned
            && frame.epoch == 0
            && msg.agent_disconnect.is_none())
        .then_some(uid);
        FrameReply {
            msg: outcome.reply,
            bind,
            close: None,
        }
    }

    /// The reply to a refused frame (the connection is closed after it), audited.
    async fn refuse_frame(
        &self,
        frame: &AgentFrame,
        uid: Option<InstanceUid>,
        f: Refusal,
    ) -> FrameReply {
        let presented = match &frame.credential {
            Credential::BootstrapToken { token_id, .. } => {
                serde_json::json!({ "token_id": token_id })
            }
            Credential::Certificate { serial, .. } => serde_json::json!({ "certificate": serial }),
        };
        self.refused(Refused {
            ip: frame.source_ip,
            reason: refusals::reason_label(f.as_str()),
            uid_hint: uid,
            detail: presented,
        })
        .await;
        FrameReply {
            msg: session::error_reply(
                &frame.msg.instance_uid,
                ServerErrorResponseType::BadRequest,
                f.message(),
            ),
            bind: None,
            close: Some(format!("auth: {}", f.message())),
        }
    }

    fn forget(&self, uid: &InstanceUid) {
        if let Ok(mut s) = self.agents[shard_of(uid)].lock() {
            s.remove(uid);
        }
    }

    /// Takes the agent offline whatever connection it had (no gateway holds it any more).
    async fn disconnected_any(&self, uid: InstanceUid) {
        let Some(slot) = self.slot(&uid) else { return };
        let mut e = slot.lock().await;
        if e.state.record.connected {
            e.conn = None;
            e.state.record.connected = false;
            e.state.record.gateway = None;
            self.mark_dirty(uid);
        }
    }

    /// Only the connection the agent currently talks through can take it offline: a late
    /// notice from a connection it already replaced changes nothing.
    async fn disconnected(&self, uid: InstanceUid, gateway: GatewayId, conn_id: u64) {
        let Some(slot) = self.slot(&uid) else { return };
        let mut e = slot.lock().await;
        let current = matches!(&e.conn, Some((gw, c, _)) if *gw == gateway && *c == conn_id);
        if current {
            e.conn = None;
            e.state.record.connected = false;
            e.state.record.last_seen_ms = now_ms();
            self.mark_dirty(uid);
        }
    }

    // ---- Operator operations (the API calls these) ----------------------------------------

    pub async fn ready(&self) -> bool {
        self.store.ping().await.is_ok()
    }

    /// How many partitions this coordinator fully serves (see `serving`).
    pub fn partitions_served(&self) -> usize {
        self.serving.load(Ordering::Relaxed)
    }

    /// This coordinator's node name (its name on partition leases).
    pub fn node(&self) -> &str {
        &self.cfg.node
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Every agent, sorted by uid. The ones this coordinator serves come from memory; in a
    /// cluster the others come from the store, as fresh as their owner's last batch write.
    pub async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let mut by_uid: HashMap<InstanceUid, AgentRecord> = HashMap::new();
        if !self.holds_all() {
            for r in self.store.load_agents().await? {
                by_uid.insert(r.instance_uid, r);
            }
        }
        for slot in self.all_slots() {
            let r = slot.lock().await.state.record.clone();
            by_uid.insert(r.instance_uid, r);
        }
        let mut out: Vec<AgentRecord> = by_uid.into_values().collect();
        out.sort_by_key(|r| r.instance_uid);
        Ok(out)
    }

    /// One agent: from memory when this coordinator serves it, else from the store.
    pub async fn agent(&self, uid: InstanceUid) -> Result<Option<AgentRecord>, StoreError> {
        if let Some(slot) = self.slot(&uid) {
            return Ok(Some(slot.lock().await.state.record.clone()));
        }
        if self.holds(uid.partition()) {
            return Ok(None);
        }
        self.store.get_agent(uid).await
    }

    pub async fn create_config(
        &self,
        name: String,
        files: ConfigMap,
        author: &str,
    ) -> Result<ConfigVersion, ServiceError> {
        if files.is_empty() {
            return Err(ServiceError::Invalid(
                "a config needs at least one file".into(),
            ));
        }
        let hash = hex::encode(session::config_hash(&files));
        let v = self
            .store
            .create_config(NewConfigVersion {
                name,
                files,
                hash,
                author: author.to_string(),
                created_ms: now_ms(),
            })
            .await?;
        self.audit_op(
            author,
            "config.create",
            None,
            serde_json::json!({ "config_id": v.id, "hash": v.hash }),
        )
        .await?;
        Ok(v)
    }

    /// Assigns a config version and pushes it at once to every matching agent that is
    /// connected over WebSocket; HTTP agents get it in their next poll. Returns the
    /// assignment and how many agents it now applies to.
    pub async fn assign(
        &self,
        config_id: i64,
        target: Target,
        author: &str,
    ) -> Result<(Assignment, usize), ServiceError> {
        match self.load_desired(config_id).await {
            Ok(_) => {}
            Err(StoreError::NotFound(m)) => return Err(ServiceError::NotFound(m)),
            Err(e) => return Err(e.into()),
        };
        let created = self
            .store
            .create_assignment(NewAssignment {
                config_id,
                target: target.clone(),
                author: author.to_string(),
                created_ms: now_ms(),
            })
            .await;
        let assignment = match created {
            Ok(a) => a,
            Err(e @ StoreError::MaybeApplied(_)) => {
                // It may exist after all: reload, so our agents follow the store either way.
                self.sync_assignments().await;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        if let Ok(mut a) = self.assignments.write() {
            a.push(assignment.clone());
        }
        // Tell the owners of the other partitions first, so they push in parallel with us
        // (they also find it in the store on their next lease round if this is lost).
        let _ = self
            .bus
            .broadcast(ControlEvent::AssignmentCreated {
                assignment_id: assignment.id,
            })
            .await;
        self.apply_assignment(&assignment).await;
        let uid = match &target {
            Target::Agent(u) => Some(*u),
            _ => None,
        };
        self.audit_op(
            author,
            "config.assign",
            uid,
            serde_json::json!({ "config_id": config_id, "assignment_id": assignment.id }),
        )
        .await?;
        let matched = self
            .agents()
            .await?
            .iter()
            .filter(|r| self.target_admits(&target, r))
            .count();
        Ok((assignment, matched))
    }

    /// Points every agent this coordinator serves that `a` matches at its config and pushes
    /// it to those connected over WebSocket.
    async fn apply_assignment(&self, a: &Assignment) {
        let Some(desired) = self
            .desired
            .read()
            .ok()
            .and_then(|m| m.get(&a.config_id).cloned())
        else {
            return;
        };
        let (target, config_id) = (&a.target, a.config_id);
        let mut pushes = Vec::new();
        for slot in self.all_slots() {
            let mut e = slot.lock().await;
            if !self.target_admits(target, &e.state.record) {
                continue;
            }
            let uid = e.state.record.instance_uid;
            e.state.record.assigned_config = Some(config_id);
            e.state.record.assigned_config_hash = Some(desired.hash_hex.clone());
            self.mark_dirty(uid);
            if !e.state.record.connected || e.state.record.transport != Some(Transport::WebSocket) {
                continue;
            }
            if e.state.record.capabilities & proto::agent_caps::ACCEPTS_REMOTE_CONFIG == 0 {
                metrics::counter!("ampora_opamp_frames_rejected_total", "reason" => "cap_mismatch")
                    .increment(1);
                continue;
            }
            if let Some(msg) = session::push_config(&mut e.state, &desired) {
                pushes.push((uid, msg));
            }
        }
        self.deliver_all(pushes).await;
    }

    /// Delivers many pushes with bounded concurrency: each is an ownership lookup and a bus
    /// publish, and awaiting them one by one made a rollout as slow as their sum.
    async fn deliver_all(&self, pushes: Vec<(InstanceUid, proto::ServerToAgent)>) {
        use futures::StreamExt as _;
        futures::stream::iter(pushes)
            .for_each_concurrent(DELIVERY_CONCURRENCY, |(uid, msg)| self.deliver(uid, msg))
            .await;
    }

    async fn deliver(&self, uid: InstanceUid, msg: proto::ServerToAgent) {
        match self.ownership.lookup(uid).await {
            Ok(Some(owner)) => {
                let m = GatewayMessage::Deliver {
                    uid,
                    epoch: owner.epoch,
                    msg: Box::new(msg),
                };
                if let Err(e) = self.bus.deliver(&owner.gateway, m).await {
                    // At-most-once: the next report from the agent re-triggers the offer.
                    tracing::debug!(instance_uid = %uid, error = %e, "push not delivered");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(instance_uid = %uid, error = %e, "ownership lookup failed"),
        }
    }

    pub async fn create_token(
        &self,
        name: String,
        ttl: Option<Duration>,
        author: &str,
    ) -> Result<(String, TokenRecord), ServiceError> {
        self.create_scoped_token(name, ttl, None, author).await
    }

    /// [`Coordinator::create_token`] for a token only agents matching `scope` may redeem.
    pub async fn create_scoped_token(
        &self,
        name: String,
        ttl: Option<Duration>,
        scope: Option<TokenScope>,
        author: &str,
    ) -> Result<(String, TokenRecord), ServiceError> {
        let (text, rec) = self.new_token(name, ttl, scope);
        self.store.create_token(&rec).await?;
        self.cache_token(rec.clone());
        self.announce_tokens().await;
        self.audit_token_created(author, std::slice::from_ref(&rec.id), &rec)
            .await?;
        Ok((text, rec))
    }

    /// A re-bootstrap token: minted for agent `uid` (bound from the start), so it may speak
    /// for that agent, which a spare token never may once the agent exists. The agent's old
    /// identity must be revoked first, else the token is refused (`identity_required`).
    pub async fn create_token_for(
        &self,
        uid: InstanceUid,
        name: String,
        ttl: Option<Duration>,
        author: &str,
    ) -> Result<(String, TokenRecord), ServiceError> {
        let (text, mut rec) = self.new_token(name, ttl, None);
        rec.bound_uid = Some(uid);
        self.store.create_token(&rec).await?;
        self.cache_token(rec.clone());
        self.announce_tokens().await;
        self.audit_token_created(author, std::slice::from_ref(&rec.id), &rec)
            .await?;
        Ok((text, rec))
    }

    /// Loads the tokens created since the watermark (less [`TOKEN_SYNC_OVERLAP`]) into the
    /// cache: how a coordinator learns the tokens others created before their agents
    /// connect. Cheap when few are being created: an index range scan that returns only the
    /// tokens created within the overlap.
    pub(crate) async fn sync_tokens(&self) {
        let mut watermark = self.token_watermark.lock().await;
        let overlap = i64::try_from(TOKEN_SYNC_OVERLAP.as_millis()).unwrap_or(i64::MAX);
        let started = now_ms();
        let fresh = match self
            .store
            .tokens_created_since(watermark.saturating_sub(overlap))
            .await
        {
            Ok(fresh) => fresh,
            Err(e) => {
                // The next lease round tries again; misses meanwhile are looked up.
                tracing::warn!(error = %e, "loading new tokens failed");
                return;
            }
        };
        // A token that commits after this read began carries a creation time no earlier than
        // `started` (or the newest one read) less the overlap, as long as clock skew and
        // commit delays stay within it; so the next read starts from the later of the two.
        // (Not from the newest token alone: the overlap's worth of tokens before it would
        // then be read again on every round until a newer one is created.)
        *watermark = fresh
            .iter()
            .map(|t| t.created_ms)
            .fold(watermark.max(started), i64::max);
        let mut fresh = fresh.into_iter();
        loop {
            let Ok(mut c) = self.tokens.write() else {
                return;
            };
            let mut merged = 0;
            for rec in fresh.by_ref().take(TOKEN_SYNC_CHUNK) {
                c.insert(rec);
                merged += 1;
            }
            if merged < TOKEN_SYNC_CHUNK {
                return;
            }
        }
    }

    /// Token cache (hits, misses) of this coordinator's authentications so far.
    pub fn token_cache_stats(&self) -> (u64, u64) {
        (
            self.token_hits.load(Ordering::Relaxed),
            self.token_misses.load(Ordering::Relaxed),
        )
    }

    /// Whether the token with this hash is in this coordinator's cache.
    pub fn token_cached(&self, hash: &[u8; 32]) -> bool {
        self.tokens
            .read()
            .is_ok_and(|c| c.by_hash.contains_key(hash))
    }

    /// Creates `count` tokens in one call; one audit entry names them all.
    pub async fn create_tokens(
        &self,
        name: String,
        ttl: Option<Duration>,
        count: u32,
        scope: Option<TokenScope>,
        author: &str,
    ) -> Result<Vec<String>, ServiceError> {
        let mut texts = Vec::with_capacity(count as usize);
        let mut ids = Vec::with_capacity(count as usize);
        let mut last = None;
        for _ in 0..count {
            let (text, rec) = self.new_token(name.clone(), ttl, scope.clone());
            self.store.create_token(&rec).await?;
            self.cache_token(rec.clone());
            texts.push(text);
            ids.push(rec.id.clone());
            last = Some(rec);
        }
        if let Some(rec) = last {
            self.announce_tokens().await;
            self.audit_token_created(author, &ids, &rec).await?;
        }
        Ok(texts)
    }

    /// Tells the other coordinators that tokens were created (committed, so a sync finds
    /// them). Best effort: their next lease round syncs anyway.
    async fn announce_tokens(&self) {
        let _ = self.bus.broadcast(ControlEvent::TokensCreated).await;
    }

    fn cache_token(&self, rec: TokenRecord) {
        if let Ok(mut c) = self.tokens.write() {
            c.insert(rec);
        }
    }

    fn new_token(
        &self,
        name: String,
        ttl: Option<Duration>,
        scope: Option<TokenScope>,
    ) -> (String, TokenRecord) {
        let text = token::new_bootstrap_token();
        let now = now_ms();
        let ttl = ttl.unwrap_or(self.cfg.default_token_ttl);
        let rec = TokenRecord {
            id: uuid::Uuid::now_v7().simple().to_string(),
            name,
            prefix: token::display_prefix(&text),
            hash: token::hash_token(&text),
            created_ms: now,
            expires_ms: now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
            revoked_ms: None,
            redeemed_ms: None,
            bound_uid: None,
            scope,
        };
        (text, rec)
    }

    async fn audit_token_created(
        &self,
        author: &str,
        ids: &[String],
        rec: &TokenRecord,
    ) -> Result<(), ServiceError> {
        self.audit_op(
            author,
            "token.create",
            rec.bound_uid,
            serde_json::json!({
                "token_ids": ids,
                "name": rec.name,
                "expires_ms": rec.expires_ms,
                "scope": rec.scope,
            }),
        )
        .await
    }

    pub async fn revoke_token(&self, id: &str, author: &str) -> Result<(), ServiceError> {
        let now = now_ms();
        if !self.store.revoke_token(id, now).await? {
            return Err(ServiceError::NotFound(format!("token {id}")));
        }
        if let Ok(mut c) = self.tokens.write() {
            c.update(id, |t| {
                t.revoked_ms.get_or_insert(now);
            });
        }
        let _ = self
            .bus
            .broadcast(ControlEvent::TokenChanged {
                token_id: id.to_string(),
            })
            .await;
        let audited = self
            .audit_op(
                author,
                "token.revoke",
                None,
                serde_json::json!({ "token_id": id }),
            )
            .await;
        self.close_token_sessions(id).await;
        audited
    }

    /// Creates an operator API token; returns its text (shown once, only the hash is kept)
    /// and record. Names are unique for good (see [`ApiTokenRecord`]): the check here gives a
    /// clear error, the database's unique index settles races.
    pub async fn create_api_token(
        &self,
        name: String,
        role: Role,
        author: &str,
    ) -> Result<(String, ApiTokenRecord), ServiceError> {
        if name.is_empty() {
            return Err(ServiceError::Invalid("an api token needs a name".into()));
        }
        let taken = self
            .store
            .list_api_tokens()
            .await?
            .iter()
            .any(|t| t.token.name == name);
        if taken {
            return Err(ServiceError::Invalid(format!(
                "an api token named `{name}` exists already (names are never reused)"
            )));
        }
        let text = token::new_api_token();
        let rec = ApiTokenRecord {
            id: uuid::Uuid::now_v7().simple().to_string(),
            name,
            role,
            hash: token::hash_token(&text),
            created_ms: now_ms(),
        };
        self.store.create_api_token(&rec).await?;
        self.audit_op(
            author,
            "api_token.create",
            None,
            serde_json::json!({ "api_token_id": rec.id, "name": rec.name, "role": rec.role }),
        )
        .await?;
        Ok((text, rec))
    }

    pub async fn list_api_tokens(&self) -> Result<Vec<ApiTokenListing>, ServiceError> {
        Ok(self.store.list_api_tokens().await?)
    }

    /// Revokes an API token: every coordinator refuses it from the next request on, since API
    /// tokens are looked up in the store on every request and never cached. The last live
    /// admin token cannot be revoked, so the API is not locked out by accident. (The check
    /// reads, then writes: two admins revoking each other at the same instant can still both
    /// succeed.)
    pub async fn revoke_api_token(&self, id: &str, author: &str) -> Result<(), ServiceError> {
        let tokens = self.store.list_api_tokens().await?;
        let Some(target) = tokens.iter().find(|t| t.token.id == id) else {
            return Err(ServiceError::NotFound(format!("api token {id}")));
        };
        let live_admins = tokens
            .iter()
            .filter(|t| t.token.role == Role::Admin && t.revoked_ms.is_none())
            .count();
        if target.token.role == Role::Admin && target.revoked_ms.is_none() && live_admins <= 1 {
            return Err(ServiceError::Invalid(
                "cannot revoke the last admin api token".into(),
            ));
        }
        if !self.store.revoke_api_token(id, now_ms()).await? {
            return Err(ServiceError::NotFound(format!("api token {id}")));
        }
        self.audit_op(
            author,
            "api_token.revoke",
            None,
            serde_json::json!({ "api_token_id": id, "name": target.token.name }),
        )
        .await?;
        Ok(())
    }
}

#[async_trait]
impl CoordinatorHandler for Coordinator {
    async fn handle(&self, req: CoordinatorRequest) -> CoordinatorReply {
        match req {
            CoordinatorRequest::Authenticate(a) => {
                CoordinatorReply::Auth(self.authenticate(a).await)
            }
            CoordinatorRequest::RevokedSerials => {
                let serials = match self.store.revoked_identities().await {
                    Ok(all) => crl::still_revoked(all, now_ms())
                        .into_iter()
                        .map(|i| i.serial)
                        .collect(),
                    Err(e) => {
                        // Never answer an empty set for an unknown one: it would un-revoke
                        // everything at the gateway. The cache is at most a lease round old.
                        tracing::warn!(error = %e, "loading revoked identities failed");
                        self.identities.read().map_or_else(
                            |_| Vec::new(),
                            |c| {
                                c.values()
                                    .flatten()
                                    .filter(|i| i.revoked_ms.is_some())
                                    .map(|i| i.serial.clone())
                                    .collect()
                            },
                        )
                    }
                };
                CoordinatorReply::RevokedSerials(serials)
            }
            CoordinatorRequest::Frame(f) => CoordinatorReply::Frame(Box::new(self.frame(*f).await)),
        }
    }

    async fn event(&self, ev: CoordinatorEvent) {
        match ev {
            CoordinatorEvent::Disconnected {
                uid,
                gateway,
                conn_id,
                ..
            } => self.disconnected(uid, gateway, conn_id).await,
            CoordinatorEvent::AuthFailed { source_ip, reason } => {
                self.refused(Refused {
                    ip: source_ip,
                    reason: refusals::reason_label(&reason),
                    uid_hint: None,
                    detail: serde_json::Value::Null,
                })
                .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_safe;

    #[test]
    fn agent_text_is_escaped_and_cut_for_the_log() {
        assert_eq!(
            log_safe("bad\nlevel=ERROR forged", 100),
            "bad\\nlevel=ERROR forged"
        );
        let long = "x".repeat(10_000);
        let cut = log_safe(&long, 512);
        assert_eq!(cut.chars().count(), 513, "512 characters and an ellipsis");
        assert!(cut.ends_with('…'));
    }
}
