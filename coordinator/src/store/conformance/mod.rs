//! The behaviour every [`Store`] implementation must show.
//!
//! [`run_all`] exercises every trait method with strict assertions. It uses fresh random ids,
//! uids, names and time ranges, so it can run against a database that already holds data
//! (including data from earlier runs), but it assumes nothing else writes to the store while
//! it runs (it counts API tokens). It spawns tasks, so it needs a Tokio runtime; use a
//! multi-threaded one to make the redemption and lease races meaningful.
//!
//! Semantics pinned here beyond the trait docs:
//! - `upsert_agents` with the same uid twice in one batch keeps the last record;
//! - `create_assignment` with an unknown config id fails with [`StoreError::NotFound`];
//! - `create_artifact` for a name, version and platform already imported returns false and
//!   keeps the first; `put_component_set` of a hash already stored keeps the first body;
//! - creating a token or API token with a duplicate id or hash, or an API token with a name
//!   any other API token has (revoked or not), fails with [`StoreError::NotApplied`];
//!   `create_tokens` with such a duplicate creates none of the batch;
//! - `revoke_token` and `revoke_api_token` on an already revoked token return true and keep
//!   the first time; `find_api_token` does not find a revoked API token, `list_api_tokens`
//!   and `count_api_tokens` still count it;
//! - `tokens_created_since`: `since_ms` inclusive, oldest first by `created_ms` then id, each
//!   token in its current state (revoked, bound);
//! - `identities_changed_since`: identities created, confirmed or revoked at or after
//!   `since_ms` (inclusive), oldest first by `created_ms` then serial, in their current state;
//! - `redeem_token` checks revoked, then expired (`now_ms >= expires_ms`), then binding;
//! - `query_audit`: `since_ms` inclusive, `until_ms` exclusive, newest first by `at_ms` then
//!   id, at most `limit` entries (0 yields none); `append_audit` ignores `entry.id`;
//! - `scan_audit`: the same filters, oldest first by `at_ms` then id, strictly after the
//!   cursor; paging with the last entry's cursor visits every match exactly once;
//! - strings an agent reports may contain NUL characters and still round-trip;
//! - a coordinator is alive, and a lease live, while `now_ms < expires_ms`;
//! - a partition's first lease has fence 1; renewing a live lease keeps its fence;
//! - `release_leases` keeps the lease's row (so the fence keeps counting) but expires it, at
//!   or before the Unix epoch; releasing a lease another node holds does nothing;
//! - `upsert_agents_fenced` writes the agents of partitions leased to the writer, live at
//!   `now_ms`, at the fence it names, and returns the other partitions, ascending;
//! - `list_leases` lists every partition ever leased once, by partition, expired and released
//!   leases included (callers compare `expires_ms` with their clock).
//!
//! The lease checks need every partition free at some instant: they run at a `now_ms` later
//! than every lease already in the store, so earlier runs do not interfere either.
//!
//! The checks live in one module per area, each run by [`run_all`] in a fixed order:
//! `agents` (agent records), `leases` (membership and partition leases), `configs` (config
//! versions and assignments), `tokens` (bootstrap tokens, redemption, batch redemption and
//! the races), `api_tokens` (operator API tokens), `identities` (agent identities) and
//! `audit` (the audit log), `rollouts` (groups and rollouts), `restarts` (group restarts),
//! `packages` (package artifacts and assignments); `ping` and the shared fixtures stay here. Every check is
//! re-exported here under its own name.
//!
//! [`StoreError::NotFound`]: shared::store::StoreError::NotFound
//! [`StoreError::NotApplied`]: shared::store::StoreError::NotApplied

use std::sync::Arc;

use shared::domain::{ConfigFile, TokenRecord};
use shared::store::Store;

mod agents;
mod api_tokens;
mod audit;
mod configs;
mod identities;
mod leases;
mod packages;
mod restarts;
mod rollouts;
mod tokens;

pub use agents::{
    agents_bulk, agents_by_partition, agents_effective_config_files, agents_round_trip,
    agents_throughput_window, agents_upsert_updates,
};
pub use api_tokens::{api_token_revocation, api_tokens};
pub use audit::{assert_audit_intact, audit, audit_batch, audit_probe, audit_scan};
pub use configs::{assignments, configs};
pub use identities::identities;
pub use leases::{agents_fenced, lease_race, lease_race_between, leases, membership};
pub use packages::{artifacts, blob_chunks, component_sets, group_telemetry, package_assignments};
pub use restarts::restarts;
pub use rollouts::{groups, rollouts};
pub use tokens::{
    batch_redemption, redemption, redemption_race, redemption_race_between, tokens, tokens_batch,
    tokens_created_since, tokens_revoked_since,
};

/// Runs every check against `store`.
pub async fn run_all(store: Arc<dyn Store>) {
    ping(store.as_ref()).await;
    agents_round_trip(store.as_ref()).await;
    agents_upsert_updates(store.as_ref()).await;
    agents_effective_config_files(store.as_ref()).await;
    agents_throughput_window(store.as_ref()).await;
    agents_bulk(store.as_ref()).await;
    agents_by_partition(store.as_ref()).await;
    membership(store.as_ref()).await;
    leases(store.as_ref()).await;
    lease_race(store.clone()).await;
    agents_fenced(store.as_ref()).await;
    configs(store.as_ref()).await;
    assignments(store.as_ref()).await;
    tokens(store.as_ref()).await;
    tokens_batch(store.as_ref()).await;
    tokens_created_since(store.as_ref()).await;
    tokens_revoked_since(store.as_ref()).await;
    redemption(store.as_ref()).await;
    redemption_race(store.clone()).await;
    batch_redemption(store.as_ref()).await;
    api_tokens(store.as_ref()).await;
    api_token_revocation(store.as_ref()).await;
    identities(store.as_ref()).await;
    audit(store.as_ref()).await;
    audit_scan(store.as_ref()).await;
    audit_batch(store.as_ref()).await;
    groups(store.as_ref()).await;
    rollouts(store.as_ref()).await;
    restarts(store.as_ref()).await;
    artifacts(store.as_ref()).await;
    package_assignments(store.as_ref()).await;
    blob_chunks(store.as_ref()).await;
    component_sets(store.as_ref()).await;
    group_telemetry(store.as_ref()).await;
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn random_hash() -> [u8; 32] {
    rand::random()
}

fn file(body: &str, content_type: &str) -> ConfigFile {
    ConfigFile {
        body: body.into(),
        content_type: content_type.into(),
    }
}

fn new_token(expires_ms: i64) -> TokenRecord {
    TokenRecord {
        id: uuid::Uuid::new_v4().to_string(),
        name: unique("token"),
        prefix: "amp-bs.abcd…".into(),
        hash: random_hash(),
        created_ms: 1_700_000_000_000,
        expires_ms,
        revoked_ms: None,
        redeemed_ms: None,
        bound_uid: None,
        scope: None,
    }
}

/// `ping` answers.
pub async fn ping(store: &dyn Store) {
    store.ping().await.expect("ping");
}
