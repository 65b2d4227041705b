//! The Store seam: the durable source of truth for agents, configs, assignments, tokens and
//! audit. Embedded mode uses SQLite, cluster mode Postgres; one conformance suite runs against
//! both (see the coordinator's store tests).

use async_trait::async_trait;

use crate::domain::{
    AgentRecord, ApiTokenListing, ApiTokenRecord, Assignment, AuditEntry, ConfigMap, ConfigVersion,
    IdentityRecord, Redemption, Target, TokenRecord,
};
use crate::ids::InstanceUid;
use crate::packages::{Artifact, NewPackageAssignment, PackageAssignment};
use crate::rollout::{Fence, Group, Member, NewRollout, Rollout, RolloutEvent, RolloutState};

/// Storage failures, sorted by what the caller may assume about the write.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The operation certainly did not take effect (constraint violation, bad input, the
    /// connection could not be had): safe to report or retry.
    #[error("not applied: {0}")]
    NotApplied(String),
    /// The outcome is unknown (the connection broke during commit): reload state before
    /// acting on any assumption about it.
    #[error("outcome unknown: {0}")]
    MaybeApplied(String),
    /// A record the operation needs does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The store could not be reached (connection refused or lost, no pooled connection in
    /// time) before anything was sent to commit: nothing took effect, and a retry later may
    /// succeed. The API answers 503 with `Retry-After`.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A config version about to be created.
#[derive(Debug, Clone)]
pub struct NewConfigVersion {
    pub name: String,
    pub files: ConfigMap,
    pub hash: String,
    pub author: String,
    pub created_ms: i64,
}

/// An assignment about to be created.
#[derive(Debug, Clone)]
pub struct NewAssignment {
    pub config_id: i64,
    pub target: Target,
    pub author: String,
    pub created_ms: i64,
}

/// What a rollout that succeeded leaves behind, in the same transaction as its last write: an
/// assignment of its target to what it rolled out, so its agents keep it.
#[derive(Debug, Clone)]
pub enum Finish {
    Config(NewAssignment),
    Package(crate::packages::NewPackageAssignment),
}

/// One redemption in a batch: bind `token_id` to `uid`; if it binds, append `audit`.
#[derive(Debug, Clone)]
pub struct RedeemRequest {
    pub token_id: String,
    pub uid: InstanceUid,
    pub audit: AuditEntry,
}

/// Filters for listing audit entries; `None` means "any". `since_ms` is inclusive, `until_ms`
/// exclusive; results are newest first and at most `limit` (so a limit of 0 returns nothing,
/// never "everything").
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub instance_uid: Option<InstanceUid>,
    pub actor: Option<String>,
    pub reason: Option<String>,
    pub limit: u32,
}

/// A position in the audit log's oldest-first order ([`Store::scan_audit`]): the `at_ms` and
/// `id` of the last entry already read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditCursor {
    pub at_ms: i64,
    pub id: i64,
}

impl AuditCursor {
    /// The cursor just past `entry`.
    pub fn after(entry: &AuditEntry) -> Self {
        Self {
            at_ms: entry.at_ms,
            id: entry.id,
        }
    }
}

/// A coordinator's lease on one partition of agents. `fence` grows by one every time the
/// partition changes hands (or is re-acquired after expiring), so a holder can tell a lease it
/// kept from one it lost and got back.
/// The leases a coordinator believes it holds, for [`Store::upsert_agents_fenced`].
#[derive(Debug, Clone)]
pub struct HeldLeases {
    pub node: String,
    /// Partition → the fence this holder got it at.
    pub fences: std::collections::HashMap<u16, i64>,
    pub now_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub partition: u16,
    pub holder: String,
    pub fence: i64,
    pub expires_ms: i64,
}

/// Groups and staged rollouts (see `coordinator::service::rollouts`): a part of [`Store`] of
/// its own, so each backend implements it beside the rest.
#[async_trait]
pub trait RolloutStore: Send + Sync + 'static {
    /// Creates the group or replaces its labels (the author and creation time stay the first).
    async fn put_group(&self, group: &Group) -> StoreResult<Group>;
    /// Every group, by name.
    async fn list_groups(&self) -> StoreResult<Vec<Group>>;
    /// False when there is no such group.
    async fn delete_group(&self, name: &str) -> StoreResult<bool>;
    /// In one transaction: the rollout (state pending, rev 1), its members and its `created`
    /// event.
    async fn create_rollout(
        &self,
        new: NewRollout,
        members: &[Member],
        created: RolloutEvent,
    ) -> StoreResult<Rollout>;
    /// Every rollout, oldest first, without members.
    async fn list_rollouts(&self) -> StoreResult<Vec<Rollout>>;
    /// The rollouts in one of `states`, oldest first, without members: what coordinators
    /// re-read often, so it does not grow with the history.
    async fn list_rollouts_in(&self, states: &[RolloutState]) -> StoreResult<Vec<Rollout>>;
    /// How many rollouts are in each state (states with none are left out).
    async fn count_rollouts(&self) -> StoreResult<Vec<(RolloutState, u64)>>;
    async fn get_rollout(&self, id: i64) -> StoreResult<Option<Rollout>>;
    async fn rollout_members(&self, id: i64) -> StoreResult<Vec<Member>>;
    /// In one transaction, only if the stored rollout still has `rollout.rev - 1` (nobody
    /// wrote it since it was read) and, with a `fence`, that partition lease is still the
    /// writer's and unexpired: writes `rollout`, appends `events`, and creates `finish` (the
    /// assignment a succeeded rollout leaves behind). False when either check fails.
    async fn update_rollout(
        &self,
        rollout: &Rollout,
        fence: Option<&Fence>,
        events: &[RolloutEvent],
        finish: Option<Finish>,
    ) -> StoreResult<bool>;
    /// The rollout's history, oldest first.
    async fn rollout_events(&self, id: i64) -> StoreResult<Vec<RolloutEvent>>;
}

/// Imported package artifacts (their metadata; the bytes live in a blob store) and package
/// assignments: a part of [`Store`] of its own, like [`RolloutStore`].
#[async_trait]
pub trait PackageStore: Send + Sync + 'static {
    /// Records an artifact; false (and nothing written) if one for its name, version and
    /// platform exists.
    async fn create_artifact(&self, artifact: &Artifact) -> StoreResult<bool>;
    /// Every artifact, oldest first.
    async fn list_artifacts(&self) -> StoreResult<Vec<Artifact>>;
    async fn create_package_assignment(
        &self,
        new: NewPackageAssignment,
    ) -> StoreResult<PackageAssignment>;
    /// Every package assignment in id order.
    async fn list_package_assignments(&self) -> StoreResult<Vec<PackageAssignment>>;
    /// Stores piece `index` of blob `sha256`; writing a piece that exists changes nothing
    /// (the same bytes: blobs are content-addressed).
    async fn put_blob_chunk(&self, sha256: &str, index: u32, bytes: &[u8]) -> StoreResult<()>;
    /// Piece `index` of blob `sha256`, if stored.
    async fn blob_chunk(&self, sha256: &str, index: u32) -> StoreResult<Option<Vec<u8>>>;
}

/// The component sets agents report (OpAMP AvailableComponents), each stored once under the
/// hash its agents report: a fleet has few distinct builds.
#[async_trait]
pub trait ComponentStore: Send + Sync + 'static {
    /// Stores set `body` (JSON) under `hash`; a hash already stored keeps its set.
    async fn put_component_set(&self, hash: &str, body: &str, now_ms: i64) -> StoreResult<()>;
    /// Every stored set: (hash, JSON body).
    async fn list_component_sets(&self) -> StoreResult<Vec<(String, String)>>;
}

/// Groups' own-telemetry settings (`own_telemetry::TelemetrySettings`, as JSON), one row per
/// group: offered to the group's agents that report their own telemetry.
#[async_trait]
pub trait TelemetryStore: Send + Sync + 'static {
    /// Sets (or replaces) the settings of `group`.
    async fn put_group_telemetry(&self, group: &str, body: &str, now_ms: i64) -> StoreResult<()>;
    /// False when the group had none.
    async fn delete_group_telemetry(&self, group: &str) -> StoreResult<bool>;
    /// Every group's settings: (group, JSON body), by group name.
    async fn list_group_telemetry(&self) -> StoreResult<Vec<(String, String)>>;
}

/// A group restart as stored: the coordinator's job as JSON, with the revision and state the
/// store compares and selects by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRestart {
    pub id: i64,
    pub rev: i64,
    pub state: String,
    pub body: String,
}

/// Group restarts, kept in the store so that every coordinator shows them and a take-over
/// continues them: written, like rollouts, by the holder of one partition's lease.
#[async_trait]
pub trait RestartStore: Send + Sync + 'static {
    /// Stores a new restart at revision 1; returns its id.
    async fn create_restart(&self, state: &str, body: &str, created_ms: i64) -> StoreResult<i64>;
    /// Writes revision `rev` of restart `id`, only if the stored one is `rev - 1` and, with a
    /// `fence`, that partition lease is still the writer's and unexpired. False otherwise.
    async fn update_restart(
        &self,
        id: i64,
        rev: i64,
        state: &str,
        body: &str,
        fence: Option<&Fence>,
    ) -> StoreResult<bool>;
    async fn get_restart(&self, id: i64) -> StoreResult<Option<StoredRestart>>;
    /// The newest `limit` restarts, newest first.
    async fn list_restarts(&self, limit: u32) -> StoreResult<Vec<StoredRestart>>;
    /// The restarts in `state`, oldest first.
    async fn list_restarts_in(&self, state: &str) -> StoreResult<Vec<StoredRestart>>;
}

#[async_trait]
pub trait Store:
    RolloutStore + PackageStore + ComponentStore + TelemetryStore + RestartStore
{
    /// Cheap round trip; readiness depends on it.
    async fn ping(&self) -> StoreResult<()>;

    // Agents. Status is written in batches by the coordinator; records are whole rows.
    /// One transaction; when a uid appears twice in `agents`, the last record wins.
    async fn upsert_agents(&self, agents: &[AgentRecord]) -> StoreResult<()>;
    /// [`Store::upsert_agents`] by a lease holder: in the same transaction, only the agents of
    /// partitions whose lease is still `held.node`'s, at the fence it holds, unexpired at
    /// `held.now_ms`, are written. Returns the partitions refused (ascending): a coordinator
    /// that was frozen past its lease and taken over never overwrites the new holder's agents.
    async fn upsert_agents_fenced(
        &self,
        held: &HeldLeases,
        agents: &[AgentRecord],
    ) -> StoreResult<Vec<u16>>;
    async fn load_agents(&self) -> StoreResult<Vec<AgentRecord>>;
    async fn get_agent(&self, uid: InstanceUid) -> StoreResult<Option<AgentRecord>>;
    /// The agents whose uid falls in one of `partitions` ([`InstanceUid::partition`]).
    async fn load_agents_in(&self, partitions: &[u16]) -> StoreResult<Vec<AgentRecord>>;

    // Coordinator membership and partition leases (see `coordinator::leases`).
    /// Marks coordinator `node` alive until `now_ms + ttl_ms` and returns every coordinator
    /// alive at `now_ms` (this one included), sorted.
    async fn coordinator_heartbeat(
        &self,
        node: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> StoreResult<Vec<String>>;
    /// Removes `node` from the membership at once (graceful leave).
    async fn coordinator_leave(&self, node: &str) -> StoreResult<()>;
    /// In one transaction: extends every unexpired lease `node` holds to `now_ms + ttl_ms`,
    /// then takes each partition of `want` that has no lease or whose lease has expired
    /// (bumping its fence). Returns every lease `node` holds afterwards, by partition.
    async fn acquire_leases(
        &self,
        node: &str,
        want: &[u16],
        now_ms: i64,
        ttl_ms: i64,
    ) -> StoreResult<Vec<Lease>>;
    /// Gives up `node`'s leases on `partitions` (others may take them at once).
    async fn release_leases(&self, node: &str, partitions: &[u16]) -> StoreResult<()>;
    async fn list_leases(&self) -> StoreResult<Vec<Lease>>;

    // Config versions are immutable once created.
    async fn create_config(&self, new: NewConfigVersion) -> StoreResult<ConfigVersion>;
    async fn get_config(&self, id: i64) -> StoreResult<Option<ConfigVersion>>;
    async fn list_configs(&self) -> StoreResult<Vec<ConfigVersion>>;
    async fn create_assignment(&self, new: NewAssignment) -> StoreResult<Assignment>;
    /// Oldest first, so replaying them in order yields the newest match per agent.
    async fn list_assignments(&self) -> StoreResult<Vec<Assignment>>;

    // Bootstrap tokens.
    async fn create_token(&self, token: &TokenRecord) -> StoreResult<()>;
    /// All of `tokens` or none, in one transaction (one commit for many tokens).
    async fn create_tokens(&self, tokens: &[TokenRecord]) -> StoreResult<()>;
    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>>;
    /// Tokens with `created_ms >= since_ms`, in their current state, oldest first (by
    /// `created_ms`, then id). How a coordinator learns the tokens another one created
    /// without a lookup per token.
    async fn tokens_created_since(&self, since_ms: i64) -> StoreResult<Vec<TokenRecord>>;
    /// Tokens with `revoked_ms >= since_ms`: how a coordinator that missed a revocation
    /// broadcast still learns of it within a lease round.
    async fn tokens_revoked_since(&self, since_ms: i64) -> StoreResult<Vec<TokenRecord>>;
    async fn find_token(&self, hash: &[u8; 32]) -> StoreResult<Option<TokenRecord>>;
    /// The token with this id, whatever its state.
    async fn get_token(&self, id: &str) -> StoreResult<Option<TokenRecord>>;
    /// Marks the token revoked; false when there is no such token.
    /// Revoking twice keeps the first revocation time.
    async fn revoke_token(&self, id: &str, at_ms: i64) -> StoreResult<bool>;
    /// Atomically binds the token to `uid` unless it is revoked, expired or bound to another
    /// agent. Of many concurrent calls for one token, exactly one gets [`Redemption::Bound`].
    async fn redeem_token(
        &self,
        id: &str,
        uid: InstanceUid,
        now_ms: i64,
    ) -> StoreResult<Redemption>;

    /// [`Store::redeem_token`] for many tokens at once, each binding audited, ideally in one
    /// transaction (a connect storm redeems thousands of tokens per second). Results are in
    /// request order. The default does them one by one.
    async fn redeem_tokens(
        &self,
        reqs: &[RedeemRequest],
        now_ms: i64,
    ) -> StoreResult<Vec<Redemption>> {
        let mut out = Vec::with_capacity(reqs.len());
        for r in reqs {
            let outcome = self.redeem_token(&r.token_id, r.uid, now_ms).await?;
            if outcome == Redemption::Bound {
                self.append_audit(&r.audit).await?;
            }
            out.push(outcome);
        }
        Ok(out)
    }

    // Operator API tokens.
    /// Fails with [`StoreError::NotApplied`] when the id, hash or name is taken (by a revoked
    /// token too: names are never reused, so an audit actor names one token for good).
    async fn create_api_token(&self, token: &ApiTokenRecord) -> StoreResult<()>;
    /// The live token with this hash: a revoked token is not found.
    async fn find_api_token(&self, hash: &[u8; 32]) -> StoreResult<Option<ApiTokenRecord>>;
    /// Every API token ever created, revoked ones included, oldest first.
    async fn list_api_tokens(&self) -> StoreResult<Vec<ApiTokenListing>>;
    /// Marks the API token revoked; false when there is no such token.
    /// Revoking twice keeps the first revocation time.
    async fn revoke_api_token(&self, id: &str, at_ms: i64) -> StoreResult<bool>;
    /// All API tokens ever created, revoked ones included.
    async fn count_api_tokens(&self) -> StoreResult<u64>;

    // Agent identities (mTLS client certificates issued by the coordinator).
    /// Fails with [`StoreError::NotApplied`] when the serial is taken.
    async fn create_identity(&self, identity: &IdentityRecord) -> StoreResult<()>;
    /// Every identity ever issued, revoked ones included, oldest first.
    async fn list_identities(&self) -> StoreResult<Vec<IdentityRecord>>;
    /// The identities issued, confirmed or revoked at or after `since_ms`, oldest first, in
    /// their current state.
    async fn identities_changed_since(&self, since_ms: i64) -> StoreResult<Vec<IdentityRecord>>;
    async fn get_identity(&self, serial: &str) -> StoreResult<Option<IdentityRecord>>;
    /// The identities issued to `uid`, oldest first.
    async fn identities_of(&self, uid: InstanceUid) -> StoreResult<Vec<IdentityRecord>>;
    /// Records the first mTLS connection with the identity; false when there is no such
    /// identity. Confirming twice keeps the first time.
    async fn confirm_identity(&self, serial: &str, at_ms: i64) -> StoreResult<bool>;
    /// Marks the identity revoked; false when there is no such identity. Revoking twice keeps
    /// the first revocation time.
    async fn revoke_identity(&self, serial: &str, at_ms: i64) -> StoreResult<bool>;
    /// Every revoked identity (for CRLs and the gateways' revocation sets).
    async fn revoked_identities(&self) -> StoreResult<Vec<IdentityRecord>>;

    // Audit: append-only. The SQL stores have the database enforce it (triggers refuse any
    // UPDATE or DELETE of an entry), so not even a bug here can rewrite history.
    async fn append_audit(&self, entry: &AuditEntry) -> StoreResult<i64>;
    /// Many entries, ideally in one transaction (agent events arrive in storms). The default
    /// writes them one by one.
    async fn append_audits(&self, entries: &[AuditEntry]) -> StoreResult<()> {
        for e in entries {
            self.append_audit(e).await?;
        }
        Ok(())
    }
    async fn query_audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditEntry>>;
    /// Entries matching `query`'s filters, oldest first (by `at_ms`, then id), strictly after
    /// `after` when given, at most `query.limit`: one bounded query per page, so a whole log
    /// can be exported page by page. Entries appended during such an export with an `at_ms`
    /// behind the cursor are not seen by it.
    async fn scan_audit(
        &self,
        query: &AuditQuery,
        after: Option<AuditCursor>,
    ) -> StoreResult<Vec<AuditEntry>>;
}
