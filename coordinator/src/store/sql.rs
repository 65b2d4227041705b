//! What every SQL query shares, whatever the dialect: error classification by phase, the
//! row types and their conversion to domain types, the column lists, and the decision rules
//! that must not differ between backends (token redemption, lease release, batch order).
//!
//! The row types derive `sqlx::FromRow` for any backend. JSON columns (`json` in Postgres,
//! TEXT in SQLite) are selected as `CAST(… AS TEXT)`, so both decode into the same Rust types.

use std::net::IpAddr;
use std::str::FromStr;

use shared::domain::{
    AgentRecord, ApiTokenListing, ApiTokenRecord, Assignment, AuditEntry, ConfigMap, ConfigVersion,
    IdentityRecord, Redemption, Role, Target, TokenRecord, TokenScope,
};
use shared::ids::InstanceUid;
use shared::store::{AuditCursor, AuditQuery, Lease, StoreError, StoreResult};
use sqlx::error::ErrorKind;
use sqlx::{Arguments, Database, Encode, Type};

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
    let unreachable = matches!(
        e,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
    );
    if missing {
        StoreError::NotFound(format!("{what}: {e}"))
    } else if unreachable {
        StoreError::Unavailable(format!("{what}: {e}"))
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

/// A row type that converts into its domain type `T` (or reports itself corrupt).
pub(super) trait IntoDomain<T> {
    fn into_domain(self) -> StoreResult<T>;
}

/// The rows of a read, converted; a failed read is `NotApplied` (nothing to apply, safe to
/// retry).
pub(super) fn all<R: IntoDomain<T>, T>(
    what: &str,
    rows: Result<Vec<R>, sqlx::Error>,
) -> StoreResult<Vec<T>> {
    rows.map_err(|e| before_commit(what, e))?
        .into_iter()
        .map(R::into_domain)
        .collect()
}

/// [`all`] for a read of at most one row.
pub(super) fn one<R: IntoDomain<T>, T>(
    what: &str,
    row: Result<Option<R>, sqlx::Error>,
) -> StoreResult<Option<T>> {
    row.map_err(|e| before_commit(what, e))?
        .map(R::into_domain)
        .transpose()
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

/// An `agents.record` as selected by [`AGENT_RECORD`], or with its effective config files
/// by [`AGENT_RECORD_WITH_FILES`]. (`pub` only because the dialects' methods name it; the
/// module is private.)
#[derive(sqlx::FromRow)]
pub struct RecordRow {
    record: String,
    effective_config: Option<String>,
    throughput: Option<String>,
}

/// The columns a [`RecordRow`] reads when many agents are loaded: the record, whose
/// effective config is only its hash. The files stay in the store (`agents.effective_config`)
/// and are read one agent at a time; rows written before they had a column of their own
/// still carry them in the record.
/// An own-metrics window's points likewise (`agents.throughput`): the record keeps only the
/// rates.
pub(super) const AGENT_RECORD: &str = "CAST(record AS TEXT) AS record, \
     CAST(NULL AS TEXT) AS effective_config, CAST(NULL AS TEXT) AS throughput";
/// [`AGENT_RECORD`] with the own-metrics window: what the coordinator taking an agent over
/// keeps in memory.
pub(super) const AGENT_RECORD_OWNED: &str = "CAST(record AS TEXT) AS record, \
     CAST(NULL AS TEXT) AS effective_config, throughput";
/// [`AGENT_RECORD_OWNED`] with the effective config files.
pub(super) const AGENT_RECORD_WITH_FILES: &str =
    "CAST(record AS TEXT) AS record, effective_config, throughput";

impl IntoDomain<AgentRecord> for RecordRow {
    fn into_domain(self) -> StoreResult<AgentRecord> {
        let mut record: AgentRecord =
            serde_json::from_str(&self.record).map_err(|e| corrupt("agent record", e))?;
        if let Some(files) = self.effective_config {
            record.effective_config =
                Some(serde_json::from_str(&files).map_err(|e| corrupt("effective config", e))?);
        }
        if let (Some(points), Some(t)) = (self.throughput, record.throughput.as_mut()) {
            t.points = serde_json::from_str(&points).map_err(|e| corrupt("throughput", e))?;
        }
        Ok(record)
    }
}

/// An agent row ready to bind, serialised before the write transaction begins (to keep it
/// short). (`pub` like [`RecordRow`].)
pub struct AgentRow {
    pub(super) uid: Vec<u8>,
    pub(super) partition: u16,
    pub(super) record: String,
    /// The effective config files (JSON) when the record carries them; `None` leaves the
    /// stored ones as they are.
    pub(super) effective_config: Option<String>,
    /// The own-metrics window's points (JSON) when the record has a window; `None` leaves
    /// the stored ones as they are.
    pub(super) throughput: Option<String>,
    pub(super) connected: bool,
    pub(super) last_seen_ms: i64,
}

/// The rows an upsert of `agents` writes: the last record per uid, in uid order (see
/// [`latest_per_uid`]).
pub(super) fn agent_rows(agents: &[AgentRecord]) -> StoreResult<Vec<AgentRow>> {
    latest_per_uid(agents)
        .into_iter()
        .map(|a| {
            let (record, effective_config) = match &a.effective_config {
                Some(files) => (
                    to_json("upsert_agents", &a.without_effective_config())?,
                    Some(to_json("upsert_agents", files)?),
                ),
                None => (to_json("upsert_agents", a)?, None),
            };
            let throughput = match &a.throughput {
                Some(t) => Some(to_json("upsert_agents", &t.points)?),
                None => None,
            };
            Ok(AgentRow {
                uid: a.instance_uid.as_bytes().to_vec(),
                partition: a.instance_uid.partition(),
                record,
                effective_config,
                throughput,
                connected: a.connected,
                last_seen_ms: a.last_seen_ms,
            })
        })
        .collect()
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

// The columns each row type reads, JSON columns cast to text (see the module docs).

/// The `config_versions` columns a [`ConfigRow`] reads.
pub(super) const CONFIG_COLUMNS: &str =
    "id, name, CAST(files AS TEXT) AS files, hash, author, created_ms";

/// The `assignments` columns an [`AssignmentRow`] reads.
pub(super) const ASSIGNMENT_COLUMNS: &str =
    "id, config_id, CAST(target AS TEXT) AS target, author, created_ms";

/// The `identities` columns an [`IdentityRow`] reads.
pub(super) const IDENTITY_COLUMNS: &str =
    "serial, instance_uid, created_ms, not_after_ms, confirmed_ms, revoked_ms, fingerprint, \
     cert_pem";

/// The `tokens` columns a [`TokenRow`] reads.
pub(super) const TOKEN_COLUMNS: &str =
    "id, name, prefix, hash, created_ms, expires_ms, revoked_ms, redeemed_ms, bound_uid, \
     CAST(scope AS TEXT) AS scope";

/// The `audit` columns an [`AuditRow`] reads.
pub(super) const AUDIT_COLUMNS: &str =
    "id, at_ms, actor, action, instance_uid, source_ip, reason, CAST(detail AS TEXT) AS detail";

/// The `partition_leases` columns a [`LeaseRow`] reads.
pub(super) const LEASE_COLUMNS: &str =
    "CAST(partition AS BIGINT) AS partition, holder, fence, expires_ms";

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

impl IntoDomain<ConfigVersion> for ConfigRow {
    fn into_domain(self) -> StoreResult<ConfigVersion> {
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

impl IntoDomain<Assignment> for AssignmentRow {
    fn into_domain(self) -> StoreResult<Assignment> {
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

impl IntoDomain<TokenRecord> for TokenRow {
    fn into_domain(self) -> StoreResult<TokenRecord> {
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

impl IntoDomain<IdentityRecord> for IdentityRow {
    fn into_domain(self) -> StoreResult<IdentityRecord> {
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

impl IntoDomain<ApiTokenRecord> for ApiTokenRow {
    fn into_domain(self) -> StoreResult<ApiTokenRecord> {
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

impl IntoDomain<ApiTokenListing> for ApiTokenListingRow {
    fn into_domain(self) -> StoreResult<ApiTokenListing> {
        Ok(ApiTokenListing {
            token: self.token.into_domain()?,
            revoked_ms: self.revoked_ms,
        })
    }
}

/// The order an audit read returns entries in: newest first
/// ([`shared::store::Store::query_audit`]), or oldest first strictly after a cursor
/// ([`shared::store::Store::scan_audit`]).
pub(super) enum AuditOrder {
    NewestFirst,
    After(Option<AuditCursor>),
}

/// The SQL and arguments of an audit read: `query`'s filters (one `AND` each), `order`, and
/// `query.limit`. The arguments are collected here rather than in a `QueryBuilder`, whose
/// borrow of itself a generic caller could not end; placeholders are numbered (`$N`), which
/// both drivers bind by number.
pub(super) fn audit_select<'a, DB>(
    query: &'a AuditQuery,
    order: AuditOrder,
) -> Result<(String, DB::Arguments<'a>), sqlx::Error>
where
    DB: Database,
    i64: Encode<'a, DB> + Type<DB>,
    &'a str: Encode<'a, DB> + Type<DB>,
    &'a [u8]: Encode<'a, DB> + Type<DB>,
{
    let mut sql = format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE TRUE");
    let mut args = DB::Arguments::default();
    if let Some(since) = query.since_ms {
        push_bind(&mut sql, &mut args, " AND at_ms >= ", since)?;
    }
    if let Some(until) = query.until_ms {
        push_bind(&mut sql, &mut args, " AND at_ms < ", until)?;
    }
    if let Some(uid) = &query.instance_uid {
        push_bind(
            &mut sql,
            &mut args,
            " AND instance_uid = ",
            uid.as_bytes().as_slice(),
        )?;
    }
    if let Some(actor) = &query.actor {
        push_bind(&mut sql, &mut args, " AND actor = ", actor.as_str())?;
    }
    if let Some(reason) = &query.reason {
        push_bind(&mut sql, &mut args, " AND reason = ", reason.as_str())?;
    }
    match order {
        AuditOrder::NewestFirst => sql.push_str(" ORDER BY at_ms DESC, id DESC"),
        AuditOrder::After(after) => {
            // Written as `at_ms > t OR (at_ms = t AND id > i)` rather than a row comparison,
            // which SQLite's planner uses indexes for less reliably.
            if let Some(c) = after {
                push_bind(&mut sql, &mut args, " AND (at_ms > ", c.at_ms)?;
                push_bind(&mut sql, &mut args, " OR (at_ms = ", c.at_ms)?;
                push_bind(&mut sql, &mut args, " AND id > ", c.id)?;
                sql.push_str("))");
            }
            sql.push_str(" ORDER BY at_ms ASC, id ASC");
        }
    }
    push_bind(&mut sql, &mut args, " LIMIT ", i64::from(query.limit))?;
    Ok((sql, args))
}

/// Appends `before` and the placeholder of `value`, bound as the next argument.
fn push_bind<'a, DB, T>(
    sql: &mut String,
    args: &mut DB::Arguments<'a>,
    before: &str,
    value: T,
) -> Result<(), sqlx::Error>
where
    DB: Database,
    T: 'a + Encode<'a, DB> + Type<DB>,
{
    args.add(value).map_err(sqlx::Error::Encode)?;
    sql.push_str(before);
    sql.push('$');
    sql.push_str(&args.len().to_string());
    Ok(())
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

impl IntoDomain<AuditEntry> for AuditRow {
    fn into_domain(self) -> StoreResult<AuditEntry> {
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

/// A `partition_leases` row. The partition column is wider than `u16` in both schemas (and
/// 32-bit in Postgres, hence the cast in [`LEASE_COLUMNS`]), so it is checked on the way out.
#[derive(sqlx::FromRow)]
pub(super) struct LeaseRow {
    partition: i64,
    holder: String,
    fence: i64,
    expires_ms: i64,
}

impl IntoDomain<Lease> for LeaseRow {
    fn into_domain(self) -> StoreResult<Lease> {
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
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            before_commit("x", sqlx::Error::Protocol("bad message".into())),
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
