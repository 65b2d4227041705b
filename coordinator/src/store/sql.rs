//! What the two SQL stores share: error classification by phase, row ↔ domain conversions
//! and the decision rules that must not differ between them (token redemption, lease
//! release). Kept here so SQLite and Postgres cannot drift apart on semantics.
//!
//! The row types derive `sqlx::FromRow` for any backend; the Postgres queries select JSON
//! columns as `::text` so both decode into the same Rust types.

use std::net::IpAddr;
use std::str::FromStr;

use shared::domain::{
    AgentRecord, ApiTokenListing, ApiTokenRecord, Assignment, AuditEntry, ConfigMap, ConfigVersion,
    IdentityRecord, Redemption, Role, Target, TokenRecord, TokenScope,
};
use shared::ids::InstanceUid;
use shared::store::{AuditCursor, AuditQuery, Lease, StoreError, StoreResult};
use sqlx::error::ErrorKind;
use sqlx::{Database, QueryBuilder};

/// The `expires_ms` a released lease is given. The row is kept rather than deleted so the
/// partition's fence keeps growing across hand-overs; an expiry at the Unix epoch means "free"
/// to every caller whose clock is a real one. (Not `i64::MIN`: callers subtract clocks from
/// expiries and must not overflow.)
pub(super) const RELEASED_EXPIRES_MS: i64 = 0;

/// Membership rows expired for longer than this are deleted on heartbeat, so node names of
/// long-gone processes do not pile up. It is far beyond any clock skew between coordinators,
/// so no coordinator can still consider a pruned node alive.
pub(super) const PRUNE_DEAD_AFTER_MS: i64 = 60 * 60 * 1000;

/// An error before `COMMIT` was sent: nothing took effect.
pub(super) fn before_commit(what: &str, e: sqlx::Error) -> StoreError {
    let missing = match &e {
        sqlx::Error::RowNotFound => true,
        sqlx::Error::Database(db) => db.kind() == ErrorKind::ForeignKeyViolation,
        _ => false,
    };
    if missing {
        StoreError::NotFound(format!("{what}: {e}"))
    } else {
        StoreError::NotApplied(format!("{what}: {e}"))
    }
}

/// An error from `COMMIT` itself: the outcome is unknown.
pub(super) fn during_commit(what: &str, e: sqlx::Error) -> StoreError {
    StoreError::MaybeApplied(format!("{what}: commit failed: {e}"))
}

/// A stored row that does not decode into its domain type.
pub(super) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::NotApplied(format!("{what}: corrupt row: {e}"))
}

pub(super) fn uid_from(bytes: &[u8]) -> Result<InstanceUid, String> {
    InstanceUid::from_slice(bytes).ok_or_else(|| format!("instance uid of {} bytes", bytes.len()))
}

pub(super) fn hash_from(bytes: &[u8]) -> Result<[u8; 32], String> {
    <[u8; 32]>::try_from(bytes).map_err(|_| format!("token hash of {} bytes", bytes.len()))
}

pub(super) fn role_str(role: Role) -> &'static str {
    match role {
        Role::Viewer => "viewer",
        Role::Operator => "operator",
        Role::Admin => "admin",
    }
}

fn role_from(s: &str) -> Result<Role, String> {
    match s {
        "viewer" => Ok(Role::Viewer),
        "operator" => Ok(Role::Operator),
        "admin" => Ok(Role::Admin),
        other => Err(format!("unknown role {other:?}")),
    }
}

pub(super) fn to_json<T: serde::Serialize>(what: &str, value: &T) -> StoreResult<String> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::NotApplied(format!("{what}: encoding JSON: {e}")))
}

pub(super) fn agent_from(what: &str, json: &str) -> StoreResult<AgentRecord> {
    serde_json::from_str(json).map_err(|e| corrupt(what, e))
}

/// Partitions deduplicated and ascending. Ascending order matters on Postgres: every
/// transaction that locks several lease rows locks them in this order, so concurrent
/// coordinators queue behind each other instead of deadlocking.
pub(super) fn sorted_partitions(partitions: &[u16]) -> Vec<u16> {
    let mut out = partitions.to_vec();
    out.sort_unstable();
    out.dedup();
    out
}

/// The last record per uid (a batch may report an agent twice), ordered by uid. The order
/// gives every writer the same row-lock order.
pub(super) fn latest_per_uid(agents: &[AgentRecord]) -> Vec<&AgentRecord> {
    let mut latest = std::collections::BTreeMap::new();
    for a in agents {
        latest.insert(a.instance_uid, a);
    }
    latest.into_values().collect()
}

/// A token's redemption-relevant state as a transaction sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(super) struct TokenState {
    pub revoked_ms: Option<i64>,
    pub expires_ms: i64,
    pub bound_uid: Option<Vec<u8>>,
}

/// What redeeming a token in `state` for `uid` at `now_ms` yields. [`Redemption::Bound`]
/// means the token is live and unbound, and the caller must bind it in the same transaction.
/// Revoked and expired come first: a dead token is refused even to its own agent.
pub(super) fn redemption(state: Option<&TokenState>, uid: InstanceUid, now_ms: i64) -> Redemption {
    match state {
        None => Redemption::NotFound,
        Some(t) if t.revoked_ms.is_some() => Redemption::Revoked,
        Some(t) if now_ms >= t.expires_ms => Redemption::Expired,
        Some(TokenState {
            bound_uid: Some(bound),
            ..
        }) if bound.as_slice() == uid.as_bytes() => Redemption::AlreadyBoundToSame,
        Some(TokenState {
            bound_uid: Some(_), ..
        }) => Redemption::BoundToOther,
        Some(_) => Redemption::Bound,
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct ConfigRow {
    id: i64,
    name: String,
    files: String,
    hash: String,
    author: String,
    created_ms: i64,
}

impl ConfigRow {
    pub(super) fn into_domain(self) -> StoreResult<ConfigVersion> {
        let files: ConfigMap =
            serde_json::from_str(&self.files).map_err(|e| corrupt("config version", e))?;
        Ok(ConfigVersion {
            id: self.id,
            name: self.name,
            files,
            hash: self.hash,
            author: self.author,
            created_ms: self.created_ms,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct AssignmentRow {
    id: i64,
    config_id: i64,
    target: String,
    author: String,
    created_ms: i64,
}

impl AssignmentRow {
    pub(super) fn into_domain(self) -> StoreResult<Assignment> {
        let target: Target =
            serde_json::from_str(&self.target).map_err(|e| corrupt("assignment", e))?;
        Ok(Assignment {
            id: self.id,
            config_id: self.config_id,
            target,
            author: self.author,
            created_ms: self.created_ms,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct TokenRow {
    id: String,
    name: String,
    prefix: String,
    hash: Vec<u8>,
    created_ms: i64,
    expires_ms: i64,
    revoked_ms: Option<i64>,
    redeemed_ms: Option<i64>,
    bound_uid: Option<Vec<u8>>,
    scope: Option<String>,
}

impl TokenRow {
    pub(super) fn into_domain(self) -> StoreResult<TokenRecord> {
        Ok(TokenRecord {
            scope: self
                .scope
                .as_deref()
                .map(serde_json::from_str::<TokenScope>)
                .transpose()
                .map_err(|e| corrupt("token", e))?,
            hash: hash_from(&self.hash).map_err(|e| corrupt("token", e))?,
            bound_uid: self
                .bound_uid
                .as_deref()
                .map(uid_from)
                .transpose()
                .map_err(|e| corrupt("token", e))?,
            id: self.id,
            name: self.name,
            prefix: self.prefix,
            created_ms: self.created_ms,
            expires_ms: self.expires_ms,
            revoked_ms: self.revoked_ms,
            redeemed_ms: self.redeemed_ms,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct IdentityRow {
    serial: String,
    instance_uid: Vec<u8>,
    created_ms: i64,
    not_after_ms: i64,
    confirmed_ms: Option<i64>,
    revoked_ms: Option<i64>,
    fingerprint: String,
    cert_pem: String,
}

/// The `identities` columns an [`IdentityRow`] reads.
pub(super) const IDENTITY_COLUMNS: &str =
    "serial, instance_uid, created_ms, not_after_ms, confirmed_ms, revoked_ms, fingerprint, \
     cert_pem";

impl IdentityRow {
    pub(super) fn into_domain(self) -> StoreResult<IdentityRecord> {
        Ok(IdentityRecord {
            instance_uid: uid_from(&self.instance_uid).map_err(|e| corrupt("identity", e))?,
            serial: self.serial,
            created_ms: self.created_ms,
            not_after_ms: self.not_after_ms,
            confirmed_ms: self.confirmed_ms,
            revoked_ms: self.revoked_ms,
            fingerprint: self.fingerprint,
            cert_pem: self.cert_pem,
        })
    }
}

/// The `tokens` columns a [`TokenRow`] reads, but for `scope`, which each store selects in its
/// own way (Postgres as `scope::text`).
pub(super) const TOKEN_COLUMNS: &str =
    "id, name, prefix, hash, created_ms, expires_ms, revoked_ms, redeemed_ms, bound_uid";

/// A token's scope as stored: JSON text, or NULL for none.
pub(super) fn scope_json(token: &TokenRecord) -> StoreResult<Option<String>> {
    token
        .scope
        .as_ref()
        .map(|s| to_json("token scope", s))
        .transpose()
}

#[derive(sqlx::FromRow)]
pub(super) struct ApiTokenRow {
    id: String,
    name: String,
    role: String,
    hash: Vec<u8>,
    created_ms: i64,
}

impl ApiTokenRow {
    pub(super) fn into_domain(self) -> StoreResult<ApiTokenRecord> {
        Ok(ApiTokenRecord {
            role: role_from(&self.role).map_err(|e| corrupt("api token", e))?,
            hash: hash_from(&self.hash).map_err(|e| corrupt("api token", e))?,
            id: self.id,
            name: self.name,
            created_ms: self.created_ms,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct ApiTokenListingRow {
    #[sqlx(flatten)]
    token: ApiTokenRow,
    revoked_ms: Option<i64>,
}

impl ApiTokenListingRow {
    pub(super) fn into_domain(self) -> StoreResult<ApiTokenListing> {
        Ok(ApiTokenListing {
            token: self.token.into_domain()?,
            revoked_ms: self.revoked_ms,
        })
    }
}

/// Appends `query`'s filters to a `… WHERE <condition>` already in `q`, one `AND` each.
/// Both stores bind the same types, so one function serves both.
pub(super) fn push_audit_filters<'a, DB>(q: &mut QueryBuilder<'a, DB>, query: &'a AuditQuery)
where
    DB: Database,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a [u8]: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    if let Some(since) = query.since_ms {
        q.push(" AND at_ms >= ").push_bind(since);
    }
    if let Some(until) = query.until_ms {
        q.push(" AND at_ms < ").push_bind(until);
    }
    if let Some(uid) = &query.instance_uid {
        q.push(" AND instance_uid = ")
            .push_bind(uid.as_bytes().as_slice());
    }
    if let Some(actor) = &query.actor {
        q.push(" AND actor = ").push_bind(actor.as_str());
    }
    if let Some(reason) = &query.reason {
        q.push(" AND reason = ").push_bind(reason.as_str());
    }
}

/// Appends the oldest-first page condition and order of [`shared::store::Store::scan_audit`].
/// Written as `at_ms > t OR (at_ms = t AND id > i)` rather than a row comparison, which
/// SQLite's planner uses indexes for less reliably.
pub(super) fn push_audit_page<'a, DB>(
    q: &mut QueryBuilder<'a, DB>,
    after: Option<AuditCursor>,
    limit: u32,
) where
    DB: Database,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    if let Some(c) = after {
        q.push(" AND (at_ms > ")
            .push_bind(c.at_ms)
            .push(" OR (at_ms = ")
            .push_bind(c.at_ms)
            .push(" AND id > ")
            .push_bind(c.id)
            .push("))");
    }
    q.push(" ORDER BY at_ms ASC, id ASC LIMIT ")
        .push_bind(i64::from(limit));
}

#[derive(sqlx::FromRow)]
pub(super) struct AuditRow {
    id: i64,
    at_ms: i64,
    actor: String,
    action: String,
    instance_uid: Option<Vec<u8>>,
    source_ip: Option<String>,
    reason: Option<String>,
    detail: String,
}

impl AuditRow {
    pub(super) fn into_domain(self) -> StoreResult<AuditEntry> {
        Ok(AuditEntry {
            instance_uid: self
                .instance_uid
                .as_deref()
                .map(uid_from)
                .transpose()
                .map_err(|e| corrupt("audit entry", e))?,
            source_ip: self
                .source_ip
                .as_deref()
                .map(IpAddr::from_str)
                .transpose()
                .map_err(|e| corrupt("audit entry", e))?,
            detail: serde_json::from_str(&self.detail).map_err(|e| corrupt("audit entry", e))?,
            id: self.id,
            at_ms: self.at_ms,
            actor: self.actor,
            action: self.action,
            reason: self.reason,
        })
    }
}

/// A `partition_leases` row. The partition column is wider than `u16` in both schemas, so it
/// is checked on the way out.
#[derive(sqlx::FromRow)]
pub(super) struct LeaseRow {
    partition: i64,
    holder: String,
    fence: i64,
    expires_ms: i64,
}

impl LeaseRow {
    pub(super) fn into_domain(self) -> StoreResult<Lease> {
        Ok(Lease {
            partition: u16::try_from(self.partition).map_err(|e| corrupt("lease", e))?,
            holder: self.holder,
            fence: self.fence,
            expires_ms: self.expires_ms,
        })
    }
}

/// Leases ordered by partition, as the trait returns them.
pub(super) fn leases_from(rows: Vec<LeaseRow>) -> StoreResult<Vec<Lease>> {
    let mut leases = rows
        .into_iter()
        .map(LeaseRow::into_domain)
        .collect::<StoreResult<Vec<_>>>()?;
    leases.sort_by_key(|l| l.partition);
    Ok(leases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_phase() {
        assert!(matches!(
            before_commit("x", sqlx::Error::PoolTimedOut),
            StoreError::NotApplied(_)
        ));
        assert!(matches!(
            before_commit("x", sqlx::Error::RowNotFound),
            StoreError::NotFound(_)
        ));
        assert!(matches!(
            during_commit("x", sqlx::Error::WorkerCrashed),
            StoreError::MaybeApplied(_)
        ));
    }

    #[test]
    fn redemption_rules_in_order() {
        let (a, b) = (InstanceUid::new_v7(), InstanceUid::new_v7());
        let live = TokenState {
            revoked_ms: None,
            expires_ms: 100,
            bound_uid: None,
        };
        let bound_to_a = TokenState {
            bound_uid: Some(a.as_bytes().to_vec()),
            ..live.clone()
        };
        assert_eq!(redemption(None, a, 0), Redemption::NotFound);
        assert_eq!(redemption(Some(&live), a, 99), Redemption::Bound);
        assert_eq!(redemption(Some(&live), a, 100), Redemption::Expired);
        assert_eq!(
            redemption(Some(&bound_to_a), a, 0),
            Redemption::AlreadyBoundToSame
        );
        assert_eq!(
            redemption(Some(&bound_to_a), b, 0),
            Redemption::BoundToOther
        );
        assert_eq!(redemption(Some(&bound_to_a), a, 100), Redemption::Expired);
        let revoked = TokenState {
            revoked_ms: Some(1),
            ..bound_to_a
        };
        assert_eq!(redemption(Some(&revoked), a, 100), Redemption::Revoked);
    }

    #[test]
    fn batches_keep_the_last_record_per_uid_in_uid_order() {
        let (a, b) = (InstanceUid([2; 16]), InstanceUid([1; 16]));
        let mut first = AgentRecord::new(a, 1);
        first.sequence_num = 1;
        let mut last = AgentRecord::new(a, 1);
        last.sequence_num = 2;
        let other = AgentRecord::new(b, 1);
        let batch = [first, other.clone(), last.clone()];
        assert_eq!(latest_per_uid(&batch), vec![&other, &last]);
        assert_eq!(sorted_partitions(&[5, 1, 5, 0]), vec![0, 1, 5]);
    }
}
