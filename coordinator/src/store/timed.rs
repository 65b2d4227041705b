//! [`TimedStore`]: any [`Store`] with the latency of each call recorded in
//! `ampora_store_query_duration_seconds{op, outcome}`, `op` the method's name and `outcome`
//! `ok` or `error`. The coordinator wraps its store in it (embedded and cluster), so both SQL
//! stores are measured alike without either knowing about metrics.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use shared::domain::{
    AgentRecord, ApiTokenListing, ApiTokenRecord, Assignment, AuditEntry, ConfigVersion,
    IdentityRecord, Redemption, TokenRecord,
};
use shared::ids::InstanceUid;
use shared::packages::{Artifact, NewPackageAssignment, PackageAssignment};
use shared::rollout::{Fence, Group, Member, NewRollout, Rollout, RolloutEvent, RolloutState};
use shared::store::{
    AuditCursor, AuditQuery, ComponentStore, Finish, HeldLeases, Lease, NewAssignment,
    NewConfigVersion, PackageStore, RedeemRequest, RestartStore, RolloutStore, Store, StoreResult,
    StoredRestart, TelemetryStore,
};

pub const QUERY_DURATION: &str = "ampora_store_query_duration_seconds";

pub fn describe_metrics() {
    metrics::describe_histogram!(
        QUERY_DURATION,
        metrics::Unit::Seconds,
        "Store calls from start to result, by op (the Store method) and outcome (ok, error)"
    );
}

/// Wraps a store; every call goes to it unchanged and is timed.
pub struct TimedStore {
    inner: Arc<dyn Store>,
}

impl TimedStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self { inner }
    }

    /// `inner` wrapped, as the `Arc<dyn Store>` the coordinator takes.
    pub fn wrap(inner: Arc<dyn Store>) -> Arc<dyn Store> {
        Arc::new(Self::new(inner))
    }
}

/// One record per call: the time since `started`, labelled by the result's outcome.
fn observe<T>(op: &'static str, started: Instant, res: &StoreResult<T>) {
    let outcome = if res.is_ok() { "ok" } else { "error" };
    metrics::histogram!(QUERY_DURATION, "op" => op, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

/// `self.inner.$op(args..)`, timed under the label `$op`.
macro_rules! timed {
    ($self:ident . $op:ident ( $($arg:expr),* )) => {{
        let started = Instant::now();
        let res = $self.inner.$op($($arg),*).await;
        observe(stringify!($op), started, &res);
        res
    }};
}

#[async_trait]
impl RolloutStore for TimedStore {
    async fn put_group(&self, group: &Group) -> StoreResult<Group> {
        timed!(self.put_group(group))
    }

    async fn list_groups(&self) -> StoreResult<Vec<Group>> {
        timed!(self.list_groups())
    }

    async fn delete_group(&self, name: &str) -> StoreResult<bool> {
        timed!(self.delete_group(name))
    }

    async fn create_rollout(
        &self,
        new: NewRollout,
        members: &[Member],
        created: RolloutEvent,
    ) -> StoreResult<Rollout> {
        timed!(self.create_rollout(new, members, created))
    }

    async fn list_rollouts(&self) -> StoreResult<Vec<Rollout>> {
        timed!(self.list_rollouts())
    }

    async fn list_rollouts_in(&self, states: &[RolloutState]) -> StoreResult<Vec<Rollout>> {
        timed!(self.list_rollouts_in(states))
    }

    async fn count_rollouts(&self) -> StoreResult<Vec<(RolloutState, u64)>> {
        timed!(self.count_rollouts())
    }

    async fn get_rollout(&self, id: i64) -> StoreResult<Option<Rollout>> {
        timed!(self.get_rollout(id))
    }

    async fn rollout_members(&self, id: i64) -> StoreResult<Vec<Member>> {
        timed!(self.rollout_members(id))
    }

    async fn update_rollout(
        &self,
        rollout: &Rollout,
        fence: Option<&Fence>,
        events: &[RolloutEvent],
        finish: Option<Finish>,
    ) -> StoreResult<bool> {
        timed!(self.update_rollout(rollout, fence, events, finish))
    }

    async fn rollout_events(&self, id: i64) -> StoreResult<Vec<RolloutEvent>> {
        timed!(self.rollout_events(id))
    }
}

#[async_trait]
impl ComponentStore for TimedStore {
    async fn put_component_set(&self, hash: &str, body: &str, now_ms: i64) -> StoreResult<()> {
        timed!(self.put_component_set(hash, body, now_ms))
    }

    async fn list_component_sets(&self) -> StoreResult<Vec<(String, String)>> {
        timed!(self.list_component_sets())
    }
}

#[async_trait]
impl TelemetryStore for TimedStore {
    async fn put_group_telemetry(&self, group: &str, body: &str, now_ms: i64) -> StoreResult<()> {
        timed!(self.put_group_telemetry(group, body, now_ms))
    }

    async fn delete_group_telemetry(&self, group: &str) -> StoreResult<bool> {
        timed!(self.delete_group_telemetry(group))
    }

    async fn list_group_telemetry(&self) -> StoreResult<Vec<(String, String)>> {
        timed!(self.list_group_telemetry())
    }
}

#[async_trait]
impl RestartStore for TimedStore {
    async fn create_restart(&self, state: &str, body: &str, created_ms: i64) -> StoreResult<i64> {
        timed!(self.create_restart(state, body, created_ms))
    }

    async fn update_restart(
        &self,
        id: i64,
        rev: i64,
        state: &str,
        body: &str,
        fence: Option<&Fence>,
    ) -> StoreResult<bool> {
        timed!(self.update_restart(id, rev, state, body, fence))
    }

    async fn get_restart(&self, id: i64) -> StoreResult<Option<StoredRestart>> {
        timed!(self.get_restart(id))
    }

    async fn list_restarts(&self, limit: u32) -> StoreResult<Vec<StoredRestart>> {
        timed!(self.list_restarts(limit))
    }

    async fn list_restarts_in(&self, state: &str) -> StoreResult<Vec<StoredRestart>> {
        timed!(self.list_restarts_in(state))
    }
}

#[async_trait]
impl PackageStore for TimedStore {
    async fn create_artifact(&self, artifact: &Artifact) -> StoreResult<bool> {
        timed!(self.create_artifact(artifact))
    }

    async fn list_artifacts(&self) -> StoreResult<Vec<Artifact>> {
        timed!(self.list_artifacts())
    }

    async fn create_package_assignment(
        &self,
        new: NewPackageAssignment,
    ) -> StoreResult<PackageAssignment> {
        timed!(self.create_package_assignment(new))
    }

    async fn list_package_assignments(&self) -> StoreResult<Vec<PackageAssignment>> {
        timed!(self.list_package_assignments())
    }

    async fn put_blob_chunk(&self, sha256: &str, index: u32, bytes: &[u8]) -> StoreResult<()> {
        timed!(self.put_blob_chunk(sha256, index, bytes))
    }

    async fn blob_chunk(&self, sha256: &str, index: u32) -> StoreResult<Option<Vec<u8>>> {
        timed!(self.blob_chunk(sha256, index))
    }
}

#[async_trait]
impl Store for TimedStore {
    async fn ping(&self) -> StoreResult<()> {
        timed!(self.ping())
    }

    async fn upsert_agents(&self, agents: &[AgentRecord]) -> StoreResult<()> {
        timed!(self.upsert_agents(agents))
    }

    async fn upsert_agents_fenced(
        &self,
        held: &HeldLeases,
        agents: &[AgentRecord],
    ) -> StoreResult<Vec<u16>> {
        timed!(self.upsert_agents_fenced(held, agents))
    }

    async fn load_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        timed!(self.load_agents())
    }

    async fn get_agent(&self, uid: InstanceUid) -> StoreResult<Option<AgentRecord>> {
        timed!(self.get_agent(uid))
    }

    async fn load_agents_in(&self, partitions: &[u16]) -> StoreResult<Vec<AgentRecord>> {
        timed!(self.load_agents_in(partitions))
    }

    async fn coordinator_heartbeat(
        &self,
        node: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> StoreResult<Vec<String>> {
        timed!(self.coordinator_heartbeat(node, now_ms, ttl_ms))
    }

    async fn coordinator_leave(&self, node: &str) -> StoreResult<()> {
        timed!(self.coordinator_leave(node))
    }

    async fn acquire_leases(
        &self,
        node: &str,
        want: &[u16],
        now_ms: i64,
        ttl_ms: i64,
    ) -> StoreResult<Vec<Lease>> {
        timed!(self.acquire_leases(node, want, now_ms, ttl_ms))
    }

    async fn release_leases(&self, node: &str, partitions: &[u16]) -> StoreResult<()> {
        timed!(self.release_leases(node, partitions))
    }

    async fn list_leases(&self) -> StoreResult<Vec<Lease>> {
        timed!(self.list_leases())
    }

    async fn create_config(&self, new: NewConfigVersion) -> StoreResult<ConfigVersion> {
        timed!(self.create_config(new))
    }

    async fn get_config(&self, id: i64) -> StoreResult<Option<ConfigVersion>> {
        timed!(self.get_config(id))
    }

    async fn list_configs(&self) -> StoreResult<Vec<ConfigVersion>> {
        timed!(self.list_configs())
    }

    async fn create_assignment(&self, new: NewAssignment) -> StoreResult<Assignment> {
        timed!(self.create_assignment(new))
    }

    async fn list_assignments(&self) -> StoreResult<Vec<Assignment>> {
        timed!(self.list_assignments())
    }

    async fn create_token(&self, token: &TokenRecord) -> StoreResult<()> {
        timed!(self.create_token(token))
    }

    async fn create_tokens(&self, tokens: &[TokenRecord]) -> StoreResult<()> {
        timed!(self.create_tokens(tokens))
    }

    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        timed!(self.list_tokens())
    }

    async fn tokens_created_since(&self, since_ms: i64) -> StoreResult<Vec<TokenRecord>> {
        timed!(self.tokens_created_since(since_ms))
    }

    async fn tokens_revoked_since(&self, since_ms: i64) -> StoreResult<Vec<TokenRecord>> {
        timed!(self.tokens_revoked_since(since_ms))
    }

    async fn find_token(&self, hash: &[u8; 32]) -> StoreResult<Option<TokenRecord>> {
        timed!(self.find_token(hash))
    }

    async fn get_token(&self, id: &str) -> StoreResult<Option<TokenRecord>> {
        timed!(self.get_token(id))
    }

    async fn revoke_token(&self, id: &str, at_ms: i64) -> StoreResult<bool> {
        timed!(self.revoke_token(id, at_ms))
    }

    async fn redeem_token(
        &self,
        id: &str,
        uid: InstanceUid,
        now_ms: i64,
    ) -> StoreResult<Redemption> {
        timed!(self.redeem_token(id, uid, now_ms))
    }

    // Forwarded, not left to the trait's default: the inner store's batch (one transaction)
    // must stay one call.
    async fn redeem_tokens(
        &self,
        reqs: &[RedeemRequest],
        now_ms: i64,
    ) -> StoreResult<Vec<Redemption>> {
        timed!(self.redeem_tokens(reqs, now_ms))
    }

    async fn create_api_token(&self, token: &ApiTokenRecord) -> StoreResult<()> {
        timed!(self.create_api_token(token))
    }

    async fn find_api_token(&self, hash: &[u8; 32]) -> StoreResult<Option<ApiTokenRecord>> {
        timed!(self.find_api_token(hash))
    }

    async fn list_api_tokens(&self) -> StoreResult<Vec<ApiTokenListing>> {
        timed!(self.list_api_tokens())
    }

    async fn revoke_api_token(&self, id: &str, at_ms: i64) -> StoreResult<bool> {
        timed!(self.revoke_api_token(id, at_ms))
    }

    async fn count_api_tokens(&self) -> StoreResult<u64> {
        timed!(self.count_api_tokens())
    }

    async fn create_identity(&self, identity: &IdentityRecord) -> StoreResult<()> {
        timed!(self.create_identity(identity))
    }

    async fn list_identities(&self) -> StoreResult<Vec<IdentityRecord>> {
        timed!(self.list_identities())
    }

    async fn identities_changed_since(&self, since_ms: i64) -> StoreResult<Vec<IdentityRecord>> {
        timed!(self.identities_changed_since(since_ms))
    }

    async fn get_identity(&self, serial: &str) -> StoreResult<Option<IdentityRecord>> {
        timed!(self.get_identity(serial))
    }

    async fn identities_of(&self, uid: InstanceUid) -> StoreResult<Vec<IdentityRecord>> {
        timed!(self.identities_of(uid))
    }

    async fn confirm_identity(&self, serial: &str, at_ms: i64) -> StoreResult<bool> {
        timed!(self.confirm_identity(serial, at_ms))
    }

    async fn revoke_identity(&self, serial: &str, at_ms: i64) -> StoreResult<bool> {
        timed!(self.revoke_identity(serial, at_ms))
    }

    async fn revoked_identities(&self) -> StoreResult<Vec<IdentityRecord>> {
        timed!(self.revoked_identities())
    }

    async fn append_audit(&self, entry: &AuditEntry) -> StoreResult<i64> {
        timed!(self.append_audit(entry))
    }

    // Forwarded for the same reason as `redeem_tokens`.
    async fn append_audits(&self, entries: &[AuditEntry]) -> StoreResult<()> {
        timed!(self.append_audits(entries))
    }

    async fn query_audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        timed!(self.query_audit(query))
    }

    async fn scan_audit(
        &self,
        query: &AuditQuery,
        after: Option<AuditCursor>,
    ) -> StoreResult<Vec<AuditEntry>> {
        timed!(self.scan_audit(query, after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;
    use crate::store::SqliteStore;

    /// The decorator changes no behaviour: the whole store contract holds through it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn timed_sqlite_conforms() {
        let store = SqliteStore::open_in_memory().await.expect("open");
        conformance::run_all(TimedStore::wrap(Arc::new(store))).await;
    }
}
