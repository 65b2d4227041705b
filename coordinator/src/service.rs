//! The coordinator runtime around the sans-I/O session core.
//!
//! It serves the partitions of agents it holds leases for ([`leases`]; in the embedded default
//! that is all of them), keeps those agents' [`AgentState`] in memory (the database is the
//! source of truth; this is a cache loaded when a partition is taken over), serialises each
//! agent's messages through a per-agent async mutex, writes changed agents to the store in
//! batches, and writes token redemptions, config versions, assignments and audit entries
//! synchronously. Operator changes made through any coordinator reach the owners of the
//! affected agents as [`ControlEvent`]s, and periodically from the store in case one was lost.
//!
//! This file holds the [`Coordinator`] itself (its state, start-up and background tasks, and
//! the bus entry points); each concern is a module of its own, extending it:
//! - [`frames`]: one agent frame, from the gateway's request to the reply;
//! - [`agents`]: the agent cache, its batched flush and sweep;
//! - [`partitions`] and [`leases`]: which partitions are held, taking and handing them over;
//! - [`tokens`], [`token_sessions`], [`scope`]: bootstrap tokens, who they speak for, scopes;
//! - [`identities`], [`issuance`], [`crl`]: agent certificates;
//! - [`assignments`]: config versions and assignments; [`deliveries`]: paced bulk pushes;
//!   [`drift`]: re-apply, adopt;
//! - [`rollouts`]: groups and staged rollouts (plan, gates, the driver, operator actions);
//! - [`packages`], [`package_import`], [`package_trust`], [`upgrade_slots`]: agent packages
//!   (catalog, offers, downloads' credentials, upgrade state), importing artifacts, the
//!   signatures that make them importable (minisign, cosign), and how many agents upgrade
//!   at once and when ([`maintenance`] windows);
//! - [`audit`], [`refusals`]: the audit log and aggregated refusals; [`api_tokens`];
//! - [`components`] and [`preflight`]: agents' builds and the checks of configs against them;
//!   [`restarts`] and [`restart_driver`]: restarting agents, group restarts in batches;
//!   [`custom_messages`]; [`own_telemetry`]: groups' own-telemetry settings
//!   and agents' throughput windows.

mod agents;
mod api_tokens;
mod assignments;
mod audit;
mod collector_validate;
mod components;
mod crl;
pub mod custom_messages;
mod deliveries;
mod drift;
pub mod fleet;
mod frames;
mod identities;
mod issuance;
mod leases;
pub mod maintenance;
pub mod own_telemetry;
pub mod package_import;
pub mod package_trust;
pub mod packages;
mod partitions;
pub mod preflight;
mod refusals;
mod restart_driver;
pub mod restarts;
pub mod rollouts;
mod scope;
mod token_sessions;
mod tokens;
mod upgrade_slots;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex as StdMutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use shared::bus::{
    Bus, ControlEvent, CoordinatorEvent, CoordinatorHandler, CoordinatorReply, CoordinatorRequest,
};
use shared::domain::{Assignment, IdentityRecord};
use shared::ids::{GatewayId, InstanceUid};
use shared::now_ms;
use shared::ownership::Ownership;
use shared::store::{Store, StoreError};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::session::{self, AgentState, Desired, OpampOffer};
use audit::{run_agent_audit, AgentAudit, AGENT_AUDIT_BATCH};
use identities::IDENTITY_SYNC_INTERVAL;
use refusals::{Refusals, Refused};
use tokens::{run_redeemer, run_token_sync, RedeemJob, TokenCache, REDEEM_BATCH};

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
    /// Bulk config offers unanswered at once ([`deliveries`]).
    pub push_window: usize,
    /// Package artifacts hosted and offered ([`packages`]); `None`: packages off.
    pub packages: Option<packages::PackageHosting>,
    /// Custom capabilities whose messages are relayed ([`custom_messages`]).
    pub custom_capabilities: Vec<String>,
    /// A Collector binary whose `validate` checks new configs, and its time limit
    /// ([`collector_validate`]); `None`: not run.
    pub collector_validate: Option<(std::path::PathBuf, Duration)>,
    /// Ampora as a destination of agents' own metrics ([`own_telemetry`]); `None`: not
    /// offered (no shared key).
    pub metrics_host: Option<own_telemetry::MetricsHost>,
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
    /// Counts agent changes (see [`Coordinator::fleet_generation`]).
    fleet_generation: AtomicU64,
    /// Config versions that are assigned to someone, ready to send.
    desired: RwLock<HashMap<i64, Arc<Desired>>>,
    /// All assignments, oldest first; the newest match wins.
    assignments: RwLock<Vec<Assignment>>,
    /// Package artifacts and assignments, and the offers made of them ([`packages`]).
    package_catalog: RwLock<packages::Catalog>,
    /// The component sets agents reported, by hash ([`components`]).
    component_sets: RwLock<components::Sets>,
    /// Groups' own-telemetry settings ([`own_telemetry`]).
    group_settings: RwLock<own_telemetry::GroupSettings>,
    /// Agents upgrading now, at most `packages.max_concurrent_upgrades` ([`upgrade_slots`]).
    upgrade_slots: upgrade_slots::UpgradeSlots,
    /// Poked when an upgrade slot frees up.
    upgrade_fill: Arc<tokio::sync::Notify>,
    /// Rollouts that decide some agents' configs, oldest first ([`rollouts`]).
    rollouts: RwLock<Vec<rollouts::Live>>,
    /// Keeps re-reads of the rollouts from overlapping.
    rollout_sync: Mutex<()>,
    /// One rollout creation at a time in this process (the overlap check).
    rollout_create: Mutex<()>,
    /// Poked when a group restart starts here, so the restart driver looks at once.
    restart_wake: Arc<tokio::sync::Notify>,
    /// Poked when an agent answers a config offer, so the rollout driver looks at once instead
    /// of at its next tick (see `rollouts::run_engine`).
    rollout_wake: Arc<tokio::sync::Notify>,
    /// Members seen unhealthy during the soak of the stage being driven, by rollout.
    rollout_soak: StdMutex<HashMap<i64, (usize, HashSet<InstanceUid>)>>,
    /// The last time this coordinator's leases lapsed and were renewed (the store away, a
    /// stall): agents kept away by it get a longer reconnect grace in rollout gates
    /// (`rollouts::gates::within_grace`).
    lease_outage: StdMutex<Option<rollouts::gates::Outage>>,
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
    /// Pushes to many agents go through one delivery task ([`deliveries`]), paced by `offers`.
    deliveries: mpsc::UnboundedSender<Vec<deliveries::Push>>,
    offers: deliveries::OfferWindow,
    /// Token redemptions go through one batching task (see [`run_redeemer`]).
    redeemer: mpsc::Sender<RedeemJob>,
    /// Agent events for the audit log go through one batching task (see [`run_agent_audit`]).
    agent_audit: mpsc::Sender<AgentAudit>,
    /// Partitions this coordinator holds a lease on and which of them it serves. Written by
    /// [`leases::round`], the partition worker and [`Coordinator::shutdown`].
    partitions: StdMutex<partitions::PartitionTable>,
    /// Lease rounds never overlap, nor a release with a round.
    rebalancing: Mutex<()>,
    /// Held by the partition worker while it carries out moves, and by shutdown.
    partition_work: Mutex<()>,
    /// Starts a lease round at once (a coordinator joined or left).
    lease_wake: Arc<tokio::sync::Notify>,
    /// When (Unix ms) the coordinator's runtime last ran its beat task: lease rounds, on a
    /// thread of their own, renew only while the runtime that serves the partitions runs.
    runtime_beat: std::sync::atomic::AtomicI64,
    /// Set by `shutdown`: no more lease rounds, partitions are being handed over.
    stopping: AtomicBool,
    /// When (Unix ms) the last successful lease round asked for its leases: they hold until
    /// this plus the TTL, and not provably after (see `lease_lapsed`).
    leased_at: std::sync::atomic::AtomicI64,
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

/// Acts on control events from any coordinator (this one's own included).
async fn run_control(weak: std::sync::Weak<Coordinator>, mut events: mpsc::Receiver<ControlEvent>) {
    while let Some(ev) = events.recv().await {
        let Some(c) = weak.upgrade() else { return };
        match ev {
            ControlEvent::AssignmentCreated { .. } => c.sync_assignments().await,
            ControlEvent::RolloutChanged { .. } => c.sync_rollouts().await,
            ControlEvent::PackagesChanged => c.sync_packages().await,
            ControlEvent::TelemetryChanged => c.sync_telemetry().await,
            ControlEvent::ReapplyConfig { uid } => c.reapply_here(uid).await,
            ControlEvent::RestartAgent { uid } => c.restart_here(uid).await,
            ControlEvent::CustomMessage {
                uid,
                capability,
                kind,
                data,
            } => {
                let message = proto::v1::CustomMessage {
                    capability,
                    r#type: kind,
                    data,
                };
                c.custom_here(uid, message).await
            }
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
            ControlEvent::MembershipChanged => c.lease_wake.notify_one(),
        }
    }
}

/// Marks the runtime alive several times per lease round (see `runtime_beat`). Holds the
/// sender whose drop, with the runtime, ends the lease thread.
async fn run_beat(weak: std::sync::Weak<Coordinator>, _runtime_alive: oneshot::Sender<()>) {
    let period = match weak.upgrade() {
        Some(c) => c.cfg.lease_ttl / 12,
        None => return,
    };
    let mut beats = tokio::time::interval(period);
    loop {
        beats.tick().await;
        let Some(c) = weak.upgrade() else { return };
        c.runtime_beat
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// Every third of the lease TTL, picks up assignments, rollouts, tokens and identities whose
/// control event was lost (the bus is at-most-once). The leases themselves are renewed on
/// their own thread ([`leases::spawn_rounds`]).
async fn run_syncs(weak: std::sync::Weak<Coordinator>) {
    let mut identities_synced = tokio::time::Instant::now();
    let period = match weak.upgrade() {
        Some(c) => c.cfg.lease_ttl / 3,
        None => return,
    };
    let mut rounds = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        rounds.tick().await;
        let Some(c) = weak.upgrade() else { return };
        if c.is_stopping() {
            return;
        }
        c.sync_assignments().await;
        c.sync_rollouts().await;
        c.sync_packages().await;
        c.sync_components().await;
        c.sync_telemetry().await;
        c.sync_tokens().await;
        c.sync_token_revocations().await;
        if identities_synced.elapsed() >= IDENTITY_SYNC_INTERVAL {
            c.sync_identities().await;
            identities_synced = tokio::time::Instant::now();
        }
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
    /// Valid, but the current state forbids it (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// Ours, not the caller's (a signature that failed, say).
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A config that fails its pre-flight check (HTTP 409, with the answer).
    #[error("pre-flight check failed: {}", .0.summary())]
    Preflight(Box<preflight::Preflight>),
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
    /// (status flusher, HTTP liveness reaper, lease thread). Lease rounds after the first use
    /// `lease_store`: in a cluster a small pool of its own that connects from the lease thread,
    /// so that they never queue behind agent writes nor wait for the main runtime's I/O.
    /// Call [`Coordinator::shutdown`] on shutdown.
    pub async fn start(
        store: Arc<dyn Store>,
        lease_store: Arc<dyn Store>,
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
        let (deliveries, delivery_jobs) = mpsc::unbounded_channel();
        let (agent_audit, events) = mpsc::channel(4 * AGENT_AUDIT_BATCH);
        tokio::spawn(run_agent_audit(store.clone(), events));
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
        let upgrade_cap = cfg
            .packages
            .as_ref()
            .map_or(1, |p| p.max_concurrent_upgrades);
        let this = Arc::new(Self {
            partitions: StdMutex::new(partitions::PartitionTable::default()),
            rebalancing: Mutex::new(()),
            partition_work: Mutex::new(()),
            lease_wake: Arc::new(tokio::sync::Notify::new()),
            runtime_beat: std::sync::atomic::AtomicI64::new(now_ms()),
            stopping: AtomicBool::new(false),
            leased_at: std::sync::atomic::AtomicI64::new(0),
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
            agent_audit,
            deliveries,
            offers: deliveries::OfferWindow::new(cfg.push_window),
            store: store.clone(),
            bus,
            ownership,
            cfg,
            offer,
            agents: (0..SHARDS).map(|_| StdMutex::new(HashMap::new())).collect(),
            dirty: StdMutex::new(HashSet::new()),
            fleet_generation: AtomicU64::new(0),
            desired: RwLock::new(HashMap::new()),
            assignments: RwLock::new(Vec::new()),
            package_catalog: RwLock::new(packages::Catalog::default()),
            component_sets: RwLock::new(components::Sets::default()),
            group_settings: RwLock::new(Vec::new()),
            upgrade_slots: upgrade_slots::UpgradeSlots::new(upgrade_cap),
            upgrade_fill: Arc::new(tokio::sync::Notify::new()),
            rollouts: RwLock::new(Vec::new()),
            rollout_sync: Mutex::new(()),
            rollout_create: Mutex::new(()),
            restart_wake: Arc::new(tokio::sync::Notify::new()),
            rollout_soak: StdMutex::new(HashMap::new()),
            lease_outage: StdMutex::new(None),
            rollout_wake: Arc::new(tokio::sync::Notify::new()),
        });
        let assignments = store.list_assignments().await?;
        for a in &assignments {
            this.load_desired(a.config_id).await?;
        }
        if let Ok(mut w) = this.assignments.write() {
            *w = assignments;
        }
        // Before the first lease round loads agents, so their configs follow the rollouts.
        this.load_rollouts().await?;
        this.sync_packages().await;
        this.sync_components().await;
        this.sync_telemetry().await;
        let control = this
            .bus
            .subscribe_control()
            .await
            .map_err(|e| StoreError::NotApplied(format!("bus: {e}")))?;
        this.bus
            .serve_coordinator(this.clone())
            .await
            .map_err(|e| StoreError::NotApplied(format!("bus: {e}")))?;
        // Ready only once this coordinator holds and serves its share: the first round also
        // tells the others (through the membership) that it joined.
        let first = leases::round(&this, &*this.store).await?;
        this.carry_out(&first, &first.gained.iter().copied().collect())
            .await?;
        let _ = this.bus.broadcast(ControlEvent::MembershipChanged).await;
        let (runtime_alive, runtime_gone) = oneshot::channel();
        tokio::spawn(run_beat(Arc::downgrade(&this), runtime_alive));
        let (moves, moved) = mpsc::unbounded_channel();
        tokio::spawn(partitions::run_moves(Arc::downgrade(&this), moved));
        leases::spawn_rounds(
            Arc::downgrade(&this),
            lease_store,
            moves,
            this.lease_wake.clone(),
            this.cfg.lease_ttl / 3,
            runtime_gone,
        )
        .map_err(|e| StoreError::NotApplied(format!("starting the lease thread: {e}")))?;
        tokio::spawn(upgrade_slots::run_fill(Arc::downgrade(&this)));
        tokio::spawn(deliveries::run_deliveries(
            Arc::downgrade(&this),
            delivery_jobs,
        ));
        tokio::spawn(run_control(Arc::downgrade(&this), control));
        tokio::spawn(run_syncs(Arc::downgrade(&this)));
        tokio::spawn(run_token_sync(Arc::downgrade(&this), token_sync_wanted));
        tokio::spawn(rollouts::run_engine(Arc::downgrade(&this)));
        tokio::spawn(restart_driver::run_restarts(Arc::downgrade(&this)));
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

    pub async fn ready(&self) -> bool {
        self.store.ping().await.is_ok()
    }

    /// This coordinator's node name (its name on partition leases).
    pub fn node(&self) -> &str {
        &self.cfg.node
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
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
            CoordinatorRequest::BlobChunk { sha256, index } => {
                CoordinatorReply::BlobChunk(self.blob_chunk(&sha256, index).await)
            }
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
            CoordinatorEvent::OwnMetrics { uid, figures } => self.own_metrics(uid, &figures).await,
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
