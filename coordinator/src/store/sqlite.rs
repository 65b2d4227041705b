//! The embedded store: one SQLite file, accessed through sqlx.
//!
//! Every mutation runs in one short `BEGIN IMMEDIATE` transaction through [`SqliteStore::in_tx`],
//! and writers inside this process queue on an async gate before asking SQLite for the write
//! lock, so they wait in FIFO order instead of spinning in SQLite's busy handler (which still
//! covers other processes, up to `busy_timeout`). Readers use the pool concurrently (WAL).
//!
//! # Error mapping
//!
//! sqlx errors become [`StoreError`] by *where* they happened, since that is what decides what
//! the caller may assume about the write:
//!
//! - anything before `COMMIT` is sent (no connection, pool timeout, I/O, busy timeout,
//!   constraint violation, decode error, bad JSON) → [`StoreError::NotApplied`]: the
//!   transaction was rolled back or never began, so nothing took effect;
//!   - except a missing row the operation needs (`RowNotFound`, or a foreign-key violation
//!     such as an assignment naming an unknown config) → [`StoreError::NotFound`], which also
//!     means nothing took effect;
//! - any error from `COMMIT` itself → [`StoreError::MaybeApplied`]: the commit may or may not
//!   have reached the file, so callers must reload before assuming either;
//! - read-only calls have nothing to apply; their failures are reported as `NotApplied`
//!   (safe to retry).
//!
//! The classification and the row conversions live in the private `store::sql` module,
//! shared with the Postgres store.
//!
//! # Partitions
//!
//! Each agent row carries its partition ([`InstanceUid::partition`], FNV-1a over the uid),
//! which SQL cannot compute. Migration `0002_cluster` added the column with `-1` ("unknown")
//! for the rows already there; [`SqliteStore::open`] fills those in from Rust right after
//! migrating, and every later write sets it.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use shared::domain::{
    AgentRecord, ApiTokenListing, ApiTokenRecord, Assignment, AuditEntry, ConfigVersion,
    IdentityRecord, Redemption, TokenRecord,
};
use shared::ids::InstanceUid;
use shared::store::{
    AuditCursor, AuditQuery, Lease, NewAssignment, NewConfigVersion, RedeemRequest, Store,
    StoreError, StoreResult,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite, Transaction};
use tokio::sync::Mutex;

use super::sql::{
    agent_from, before_commit, corrupt, during_commit, latest_per_uid, leases_from,
    push_audit_filters, push_audit_page, redemption, role_str, scope_json, sorted_partitions,
    to_json, uid_from, ApiTokenListingRow, ApiTokenRow, AssignmentRow, AuditRow, ConfigRow,
    IdentityRow, LeaseRow, TokenRow, TokenState, IDENTITY_COLUMNS, PRUNE_DEAD_AFTER_MS,
    RELEASED_EXPIRES_MS, TOKEN_COLUMNS,
};

/// Rows per multi-row statement (agent upserts, partition backfill, `IN` lists): at most 5
/// binds each, far below SQLite's limit of 32766 bound parameters per statement.
const CHUNK: usize = 500;

/// The `partition` of agent rows written before migration `0002_cluster`.
const UNKNOWN_PARTITION: i64 = -1;

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: u32 = 8;

/// The future a transaction body returns; it borrows the transaction for `'c`.
type TxFuture<'c, T> = Pin<Box<dyn Future<Output = Result<T, sqlx::Error>> + Send + 'c>>;

/// The embedded SQLite implementation of [`Store`].
pub struct SqliteStore {
    pool: SqlitePool,
    /// Serialises this process's write transactions (see the module docs).
    write_gate: Mutex<()>,
}

impl SqliteStore {
    /// Opens (creating it if missing) the database file at `path` and brings its schema up to
    /// date. WAL journal, `synchronous=NORMAL`, foreign keys on, 5 s busy timeout.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| {
                StoreError::NotApplied(format!("opening database {}: {e}", path.display()))
            })?;
        Self::migrate(pool).await
    }

    /// A private in-memory database for tests. The pool holds exactly one connection that is
    /// never recycled, so every call sees the same database for the life of the store.
    pub async fn open_in_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .in_memory(true)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .min_connections(1)
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::NotApplied(format!("opening in-memory database: {e}")))?;
        Self::migrate(pool).await
    }

    async fn migrate(pool: SqlitePool) -> Result<Self, StoreError> {
        sqlx::migrate!("migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| StoreError::NotApplied(format!("migrating database: {e}")))?;
        let store = Self {
            pool,
            write_gate: Mutex::new(()),
        };
        store.backfill_partitions().await?;
        Ok(store)
    }

    /// Sets the partition of agent rows that predate the column (see the module docs). Cheap
    /// when there are none (an index lookup), so it simply runs at every open; it is
    /// idempotent and, being one write transaction, safe with other processes doing the same.
    async fn backfill_partitions(&self) -> StoreResult<()> {
        let filled = self
            .in_tx("backfill_partitions", |tx| {
                Box::pin(async move {
                    let uids: Vec<Vec<u8>> =
                        sqlx::query_scalar("SELECT instance_uid FROM agents WHERE partition = ?")
                            .bind(UNKNOWN_PARTITION)
                            .fetch_all(&mut **tx)
                            .await?;
                    let mut rows = Vec::with_capacity(uids.len());
                    for uid in uids {
                        let partition = uid_from(&uid)
                            .map_err(|e| sqlx::Error::Decode(e.into()))?
                            .partition();
                        rows.push((uid, i64::from(partition)));
                    }
                    for chunk in rows.chunks(CHUNK) {
                        let mut q: QueryBuilder<'_, Sqlite> =
                            QueryBuilder::new("UPDATE agents SET partition = v.column2 FROM (");
                        q.push_values(chunk, |mut b, (uid, partition)| {
                            b.push_bind(uid.as_slice()).push_bind(*partition);
                        });
                        q.push(") AS v WHERE agents.instance_uid = v.column1");
                        q.build().execute(&mut **tx).await?;
                    }
                    Ok(rows.len())
                })
            })
            .await?;
        if filled > 0 {
            tracing::info!(agents = filled, "agent partitions backfilled");
        }
        Ok(())
    }

    /// Closes all connections (checkpointing the WAL); later calls fail with `NotApplied`.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Runs `body` in one `BEGIN IMMEDIATE` transaction and commits it; the single path every
    /// mutation takes. Errors are classified as described in the module docs.
    async fn in_tx<T, F>(&self, what: &'static str, body: F) -> StoreResult<T>
    where
        T: Send,
        F: for<'c> FnOnce(&'c mut Transaction<'static, Sqlite>) -> TxFuture<'c, T> + Send,
    {
        let _gate = self.write_gate.lock().await;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| before_commit(what, e))?;
        match body(&mut tx).await {
            Ok(value) => {
                tx.commit().await.map_err(|e| during_commit(what, e))?;
                Ok(value)
            }
            Err(e) => {
                if let Err(rollback) = tx.rollback().await {
                    tracing::debug!(%rollback, what, "rollback after a failed transaction failed");
                }
                Err(before_commit(what, e))
            }
        }
    }
}

/// The single winner: only an unbound, live token changes here, and SQLite runs one write
/// transaction at a time.
async fn redeem_in(
    tx: &mut Transaction<'static, Sqlite>,
    id: &str,
    uid: InstanceUid,
    now_ms: i64,
) -> Result<Redemption, sqlx::Error> {
    let bound = sqlx::query(
        "UPDATE tokens SET bound_uid = ?, redeemed_ms = ? \
         WHERE id = ? AND bound_uid IS NULL AND revoked_ms IS NULL \
         AND expires_ms > ?",
    )
    .bind(uid.as_bytes().as_slice())
    .bind(now_ms)
    .bind(id)
    .bind(now_ms)
    .execute(&mut **tx)
    .await?;
    if bound.rows_affected() == 1 {
        return Ok(Redemption::Bound);
    }
    // Nothing changed: say why, from the row as this transaction sees it.
    let state: Option<TokenState> =
        sqlx::query_as("SELECT revoked_ms, expires_ms, bound_uid FROM tokens WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
    match redemption(state.as_ref(), uid, now_ms) {
        // Live and unbound, yet the update matched nothing: cannot happen inside one write
        // transaction.
        Redemption::Bound => Err(sqlx::Error::Protocol(
            "token is live and unbound but did not bind".into(),
        )),
        refused => Ok(refused),
    }
}

async fn insert_audit(
    tx: &mut Transaction<'static, Sqlite>,
    e: &AuditEntry,
    detail: String,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO audit (at_ms, actor, action, instance_uid, source_ip, reason, detail) \
         VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(e.at_ms)
    .bind(e.actor.as_str())
    .bind(e.action.as_str())
    .bind(e.instance_uid.as_ref().map(|u| u.as_bytes().as_slice()))
    .bind(e.source_ip.map(|ip| ip.to_string()))
    .bind(e.reason.as_deref())
    .bind(detail)
    .fetch_one(&mut **tx)
    .await
}

/// An agent row ready to bind.
struct AgentRow {
    uid: Vec<u8>,
    partition: i64,
    record: String,
    connected: bool,
    last_seen_ms: i64,
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(|e| before_commit("ping", e))?;
        Ok(())
    }

    async fn upsert_agents(&self, agents: &[AgentRecord]) -> StoreResult<()> {
        if agents.is_empty() {
            return Ok(());
        }
        // Serialise before taking the write lock, to keep the transaction short.
        let rows = latest_per_uid(agents)
            .into_iter()
            .map(|a| {
                Ok(AgentRow {
                    uid: a.instance_uid.as_bytes().to_vec(),
                    partition: i64::from(a.instance_uid.partition()),
                    record: to_json("upsert_agents", a)?,
                    connected: a.connected,
                    last_seen_ms: a.last_seen_ms,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        self.in_tx("upsert_agents", move |tx| {
            Box::pin(async move {
                for chunk in rows.chunks(CHUNK) {
                    let mut q: QueryBuilder<'_, Sqlite> = QueryBuilder::new(
                        "INSERT INTO agents \
                         (instance_uid, partition, record, connected, last_seen_ms) ",
                    );
                    q.push_values(chunk, |mut b, r| {
                        b.push_bind(r.uid.as_slice())
                            .push_bind(r.partition)
                            .push_bind(r.record.as_str())
                            .push_bind(r.connected)
                            .push_bind(r.last_seen_ms);
                    });
                    // A uid's partition never changes; setting it anyway also fixes a row
                    // still at the pre-migration -1.
                    q.push(
                        " ON CONFLICT (instance_uid) DO UPDATE SET \
                         partition = excluded.partition, record = excluded.record, \
                         connected = excluded.connected, last_seen_ms = excluded.last_seen_ms",
                    );
                    q.build().execute(&mut **tx).await?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn load_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT record FROM agents")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| before_commit("load_agents", e))?;
        rows.iter()
            .map(|(json,)| agent_from("load_agents", json))
            .collect()
    }

    async fn get_agent(&self, uid: InstanceUid) -> StoreResult<Option<AgentRecord>> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT record FROM agents WHERE instance_uid = ?")
                .bind(uid.as_bytes().as_slice())
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| before_commit("get_agent", e))?;
        row.map(|(json,)| agent_from("get_agent", &json))
            .transpose()
    }

    async fn load_agents_in(&self, partitions: &[u16]) -> StoreResult<Vec<AgentRecord>> {
        let mut agents = Vec::new();
        // Deduplicated, so an agent is returned once however often its partition is named.
        for chunk in sorted_partitions(partitions).chunks(CHUNK) {
            let mut q: QueryBuilder<'_, Sqlite> =
                QueryBuilder::new("SELECT record FROM agents WHERE partition IN (");
            let mut list = q.separated(", ");
            for p in chunk {
                list.push_bind(i64::from(*p));
            }
            q.push(")");
            let rows: Vec<(String,)> = q
                .build_query_as()
                .fetch_all(&self.pool)
                .await
                .map_err(|e| before_commit("load_agents_in", e))?;
            for (json,) in &rows {
                agents.push(agent_from("load_agents_in", json)?);
            }
        }
        Ok(agents)
    }

    async fn coordinator_heartbeat(
        &self,
        node: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> StoreResult<Vec<String>> {
        let node = node.to_owned();
        let mut alive = self
            .in_tx("coordinator_heartbeat", move |tx| {
                Box::pin(async move {
                    sqlx::query("DELETE FROM coordinators WHERE expires_ms < ?")
                        .bind(now_ms.saturating_sub(PRUNE_DEAD_AFTER_MS))
                        .execute(&mut **tx)
                        .await?;
                    sqlx::query(
                        "INSERT INTO coordinators (node, expires_ms) VALUES (?, ?) \
                         ON CONFLICT (node) DO UPDATE SET expires_ms = excluded.expires_ms",
                    )
                    .bind(node.as_str())
                    .bind(now_ms.saturating_add(ttl_ms))
                    .execute(&mut **tx)
                    .await?;
                    sqlx::query_scalar::<_, String>(
                        "SELECT node FROM coordinators WHERE expires_ms > ?",
                    )
                    .bind(now_ms)
                    .fetch_all(&mut **tx)
                    .await
                })
            })
            .await?;
        // Sorted here rather than by SQL, so both stores order names the same (bytewise).
        alive.sort_unstable();
        Ok(alive)
    }

    async fn coordinator_leave(&self, node: &str) -> StoreResult<()> {
        let node = node.to_owned();
        self.in_tx("coordinator_leave", move |tx| {
            Box::pin(async move {
                sqlx::query("DELETE FROM coordinators WHERE node = ?")
                    .bind(node)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            })
        })
        .await
    }

    /// A lease is live while `now_ms < expires_ms`. Rows are never deleted, so a partition's
    /// fence only grows; a new row starts at fence 1.
    async fn acquire_leases(
        &self,
        node: &str,
        want: &[u16],
        now_ms: i64,
        ttl_ms: i64,
    ) -> StoreResult<Vec<Lease>> {
        let node = node.to_owned();
        let want = sorted_partitions(want);
        let expires_ms = now_ms.saturating_add(ttl_ms);
        let rows = self
            .in_tx("acquire_leases", move |tx| {
                Box::pin(async move {
                    // Renew first, so the take below sees our own live leases as taken (no
                    // fence bump for a lease we kept).
                    sqlx::query(
                        "UPDATE partition_leases SET expires_ms = ? \
                         WHERE holder = ? AND expires_ms > ?",
                    )
                    .bind(expires_ms)
                    .bind(node.as_str())
                    .bind(now_ms)
                    .execute(&mut **tx)
                    .await?;
                    for chunk in want.chunks(CHUNK) {
                        let mut q: QueryBuilder<'_, Sqlite> = QueryBuilder::new(
                            "INSERT INTO partition_leases (partition, holder, fence, expires_ms) ",
                        );
                        q.push_values(chunk, |mut b, p| {
                            b.push_bind(i64::from(*p))
                                .push_bind(node.as_str())
                                .push_bind(1_i64)
                                .push_bind(expires_ms);
                        });
                        // Only a free (expired or released) lease changes hands, and every
                        // change of hands, including re-taking our own expired lease, bumps
                        // the fence.
                        q.push(
                            " ON CONFLICT (partition) DO UPDATE SET holder = excluded.holder, \
                             fence = partition_leases.fence + 1, \
                             expires_ms = excluded.expires_ms \
                             WHERE partition_leases.expires_ms <= ",
                        )
                        .push_bind(now_ms);
                        q.build().execute(&mut **tx).await?;
                    }
                    sqlx::query_as::<_, LeaseRow>(
                        "SELECT partition, holder, fence, expires_ms FROM partition_leases \
                         WHERE holder = ? AND expires_ms > ?",
                    )
                    .bind(node.as_str())
                    .bind(now_ms)
                    .fetch_all(&mut **tx)
                    .await
                })
            })
            .await?;
        leases_from(rows)
    }

    async fn release_leases(&self, node: &str, partitions: &[u16]) -> StoreResult<()> {
        let node = node.to_owned();
        let partitions = sorted_partitions(partitions);
        self.in_tx("release_leases", move |tx| {
            Box::pin(async move {
                for chunk in partitions.chunks(CHUNK) {
                    let mut q: QueryBuilder<'_, Sqlite> =
                        QueryBuilder::new("UPDATE partition_leases SET expires_ms = ");
                    q.push_bind(RELEASED_EXPIRES_MS)
                        .push(" WHERE holder = ")
                        .push_bind(node.as_str())
                        .push(" AND partition IN (");
                    let mut list = q.separated(", ");
                    for p in chunk {
                        list.push_bind(i64::from(*p));
                    }
                    q.push(")");
                    q.build().execute(&mut **tx).await?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn list_leases(&self) -> StoreResult<Vec<Lease>> {
        let rows: Vec<LeaseRow> =
            sqlx::query_as("SELECT partition, holder, fence, expires_ms FROM partition_leases")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| before_commit("list_leases", e))?;
        leases_from(rows)
    }

    async fn create_config(&self, new: NewConfigVersion) -> StoreResult<ConfigVersion> {
        let files = to_json("create_config", &new.files)?;
        let (name, hash, author, created_ms) = (
            new.name.clone(),
            new.hash.clone(),
            new.author.clone(),
            new.created_ms,
        );
        let id: i64 = self
            .in_tx("create_config", move |tx| {
                Box::pin(async move {
                    sqlx::query_scalar(
                        "INSERT INTO config_versions (name, files, hash, author, created_ms) \
                         VALUES (?, ?, ?, ?, ?) RETURNING id",
                    )
                    .bind(name)
                    .bind(files)
                    .bind(hash)
                    .bind(author)
                    .bind(created_ms)
                    .fetch_one(&mut **tx)
                    .await
                })
            })
            .await?;
        Ok(ConfigVersion {
            id,
            name: new.name,
            files: new.files,
            hash: new.hash,
            author: new.author,
            created_ms: new.created_ms,
        })
    }

    async fn get_config(&self, id: i64) -> StoreResult<Option<ConfigVersion>> {
        let row: Option<ConfigRow> = sqlx::query_as(
            "SELECT id, name, files, hash, author, created_ms FROM config_versions WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| before_commit("get_config", e))?;
        row.map(ConfigRow::into_domain).transpose()
    }

    async fn list_configs(&self) -> StoreResult<Vec<ConfigVersion>> {
        let rows: Vec<ConfigRow> = sqlx::query_as(
            "SELECT id, name, files, hash, author, created_ms FROM config_versions ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| before_commit("list_configs", e))?;
        rows.into_iter().map(ConfigRow::into_domain).collect()
    }

    async fn create_assignment(&self, new: NewAssignment) -> StoreResult<Assignment> {
        let target = to_json("create_assignment", &new.target)?;
        let (config_id, author, created_ms) = (new.config_id, new.author.clone(), new.created_ms);
        // An unknown config_id is a foreign-key violation, reported as NotFound.
        let id: i64 = self
            .in_tx("create_assignment", move |tx| {
                Box::pin(async move {
                    sqlx::query_scalar(
                        "INSERT INTO assignments (config_id, target, author, created_ms) \
                         VALUES (?, ?, ?, ?) RETURNING id",
                    )
                    .bind(config_id)
                    .bind(target)
                    .bind(author)
                    .bind(created_ms)
                    .fetch_one(&mut **tx)
                    .await
                })
            })
            .await?;
        Ok(Assignment {
            id,
            config_id: new.config_id,
            target: new.target,
            author: new.author,
            created_ms: new.created_ms,
        })
    }

    async fn list_assignments(&self) -> StoreResult<Vec<Assignment>> {
        let rows: Vec<AssignmentRow> = sqlx::query_as(
            "SELECT id, config_id, target, author, created_ms FROM assignments ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| before_commit("list_assignments", e))?;
        rows.into_iter().map(AssignmentRow::into_domain).collect()
    }

    async fn create_token(&self, token: &TokenRecord) -> StoreResult<()> {
        let t = token.clone();
        let scope = scope_json(token)?;
        self.in_tx("create_token", move |tx| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO tokens (id, name, prefix, hash, created_ms, expires_ms, \
                     revoked_ms, redeemed_ms, bound_uid, scope) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(t.id.as_str())
                .bind(t.name.as_str())
                .bind(t.prefix.as_str())
                .bind(t.hash.as_slice())
                .bind(t.created_ms)
                .bind(t.expires_ms)
                .bind(t.revoked_ms)
                .bind(t.redeemed_ms)
                .bind(t.bound_uid.as_ref().map(|u| u.as_bytes().as_slice()))
                .bind(scope)
                .execute(&mut **tx)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        let rows: Vec<TokenRow> = sqlx::query_as(&format!(
            "SELECT {TOKEN_COLUMNS}, scope FROM tokens ORDER BY created_ms, id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| before_commit("list_tokens", e))?;
        rows.into_iter().map(TokenRow::into_domain).collect()
    }

    async fn tokens_created_since(&self, since_ms: i64) -> StoreResult<Vec<TokenRecord>> {
        let rows: Vec<TokenRow> = sqlx::query_as(&format!(
            "SELECT {TOKEN_COLUMNS}, scope FROM tokens WHERE created_ms >= ? \
             ORDER BY created_ms, id"
        ))
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| before_commit("tokens_created_since", e))?;
        rows.into_iter().map(TokenRow::into_domain).collect()
    }

    async fn tokens_revoked_since(&self, since_ms: i64) -> StoreResult<Vec<TokenRecord>> {
        let rows: Vec<TokenRow> = sqlx::query_as(&format!(
            "SELECT {TOKEN_COLUMNS}, scope FROM tokens WHERE revoked_ms >= ? \
             ORDER BY revoked_ms, id"
        ))
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| before_commit("tokens_revoked_since", e))?;
        rows.into_iter().map(TokenRow::into_domain).collect()
    }

    async fn find_token(&self, hash: &[u8; 32]) -> StoreResult<Option<TokenRecord>> {
        let row: Option<TokenRow> = sqlx::query_as(&format!(
            "SELECT {TOKEN_COLUMNS}, scope FROM tokens WHERE hash = ?"
        ))
        .bind(hash.as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| before_commit("find_token", e))?;
        row.map(TokenRow::into_domain).transpose()
    }

    async fn get_token(&self, id: &str) -> StoreResult<Option<TokenRecord>> {
        let row: Option<TokenRow> = sqlx::query_as(&format!(
            "SELECT {TOKEN_COLUMNS}, scope FROM tokens WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| before_commit("get_token", e))?;
        row.map(TokenRow::into_domain).transpose()
    }

    async fn revoke_token(&self, id: &str, at_ms: i64) -> StoreResult<bool> {
        let id = id.to_owned();
        // Revoking twice keeps the first revocation time.
        self.in_tx("revoke_token", move |tx| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE tokens SET revoked_ms = COALESCE(revoked_ms, ?) WHERE id = ?",
                )
                .bind(at_ms)
                .bind(id)
                .execute(&mut **tx)
                .await?;
                Ok(done.rows_affected() > 0)
            })
        })
        .await
    }

    async fn redeem_token(
        &self,
        id: &str,
        uid: InstanceUid,
        now_ms: i64,
    ) -> StoreResult<Redemption> {
        let id = id.to_owned();
        self.in_tx("redeem_token", move |tx| {
            Box::pin(async move { redeem_in(tx, &id, uid, now_ms).await })
        })
        .await
    }

    /// All in one transaction: a connect storm commits once per batch, not once per agent.
    async fn redeem_tokens(
        &self,
        reqs: &[RedeemRequest],
        now_ms: i64,
    ) -> StoreResult<Vec<Redemption>> {
        let mut owned = Vec::with_capacity(reqs.len());
        for r in reqs {
            owned.push((r.clone(), to_json("redeem_tokens", &r.audit.detail)?));
        }
        self.in_tx("redeem_tokens", move |tx| {
            Box::pin(async move {
                let mut out = Vec::with_capacity(owned.len());
                for (r, detail) in &owned {
                    let outcome = redeem_in(tx, &r.token_id, r.uid, now_ms).await?;
                    if outcome == Redemption::Bound {
                        insert_audit(tx, &r.audit, detail.clone()).await?;
                    }
                    out.push(outcome);
                }
                Ok(out)
            })
        })
        .await
    }

    async fn create_api_token(&self, token: &ApiTokenRecord) -> StoreResult<()> {
        let t = token.clone();
        self.in_tx("create_api_token", move |tx| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO api_tokens (id, name, role, hash, created_ms) \
                     VALUES (?, ?, ?, ?, ?)",
                )
                .bind(t.id.as_str())
                .bind(t.name.as_str())
                .bind(role_str(t.role))
                .bind(t.hash.as_slice())
                .bind(t.created_ms)
                .execute(&mut **tx)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn find_api_token(&self, hash: &[u8; 32]) -> StoreResult<Option<ApiTokenRecord>> {
        let row: Option<ApiTokenRow> = sqlx::query_as(
            "SELECT id, name, role, hash, created_ms FROM api_tokens \
             WHERE hash = ? AND revoked_ms IS NULL",
        )
        .bind(hash.as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| before_commit("find_api_token", e))?;
        row.map(ApiTokenRow::into_domain).transpose()
    }

    async fn list_api_tokens(&self) -> StoreResult<Vec<ApiTokenListing>> {
        let rows: Vec<ApiTokenListingRow> = sqlx::query_as(
            "SELECT id, name, role, hash, created_ms, revoked_ms FROM api_tokens \
             ORDER BY created_ms, id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| before_commit("list_api_tokens", e))?;
        rows.into_iter()
            .map(ApiTokenListingRow::into_domain)
            .collect()
    }

    async fn revoke_api_token(&self, id: &str, at_ms: i64) -> StoreResult<bool> {
        let id = id.to_owned();
        // Revoking twice keeps the first revocation time.
        self.in_tx("revoke_api_token", move |tx| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE api_tokens SET revoked_ms = COALESCE(revoked_ms, ?) WHERE id = ?",
                )
                .bind(at_ms)
                .bind(id)
                .execute(&mut **tx)
                .await?;
                Ok(done.rows_affected() > 0)
            })
        })
        .await
    }

    async fn count_api_tokens(&self) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_tokens")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| before_commit("count_api_tokens", e))?;
        u64::try_from(n).map_err(|e| corrupt("count_api_tokens", e))
    }

    async fn create_identity(&self, identity: &IdentityRecord) -> StoreResult<()> {
        let i = identity.clone();
        self.in_tx("create_identity", move |tx| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO identities (serial, instance_uid, created_ms, not_after_ms, \
                     confirmed_ms, revoked_ms, fingerprint, cert_pem) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(i.serial.as_str())
                .bind(i.instance_uid.as_bytes().as_slice())
                .bind(i.created_ms)
                .bind(i.not_after_ms)
                .bind(i.confirmed_ms)
                .bind(i.revoked_ms)
                .bind(i.fingerprint.as_str())
                .bind(i.cert_pem.as_str())
                .execute(&mut **tx)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn list_identities(&self) -> StoreResult<Vec<IdentityRecord>> {
        let rows: Vec<IdentityRow> = sqlx::query_as(&format!(
            "SELECT {IDENTITY_COLUMNS} FROM identities ORDER BY created_ms, serial"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| before_commit("list_identities", e))?;
        rows.into_iter().map(IdentityRow::into_domain).collect()
    }

    async fn identities_changed_since(&self, since_ms: i64) -> StoreResult<Vec<IdentityRecord>> {
        let rows: Vec<IdentityRow> = sqlx::query_as(&format!(
            "SELECT {IDENTITY_COLUMNS} FROM identities \
             WHERE created_ms >= ? OR confirmed_ms >= ? OR revoked_ms >= ? \
             ORDER BY created_ms, serial"
        ))
        .bind(since_ms)
        .bind(since_ms)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| before_commit("identities_changed_since", e))?;
        rows.into_iter().map(IdentityRow::into_domain).collect()
    }

    async fn get_identity(&self, serial: &str) -> StoreResult<Option<IdentityRecord>> {
        let row: Option<IdentityRow> = sqlx::query_as(&format!(
            "SELECT {IDENTITY_COLUMNS} FROM identities WHERE serial = ?"
        ))
        .bind(serial)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| before_commit("get_identity", e))?;
        row.map(IdentityRow::into_domain).transpose()
    }

    async fn identities_of(&self, uid: InstanceUid) -> StoreResult<Vec<IdentityRecord>> {
        let rows: Vec<IdentityRow> = sqlx::query_as(&format!(
            "SELECT {IDENTITY_COLUMNS} FROM identities WHERE instance_uid = ? \
             ORDER BY created_ms, serial"
        ))
        .bind(uid.as_bytes().as_slice())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| before_commit("identities_of", e))?;
        rows.into_iter().map(IdentityRow::into_domain).collect()
    }

    async fn confirm_identity(&self, serial: &str, at_ms: i64) -> StoreResult<bool> {
        let serial = serial.to_owned();
        self.in_tx("confirm_identity", move |tx| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE identities SET confirmed_ms = COALESCE(confirmed_ms, ?) \
                     WHERE serial = ?",
                )
                .bind(at_ms)
                .bind(serial)
                .execute(&mut **tx)
                .await?;
                Ok(done.rows_affected() > 0)
            })
        })
        .await
    }

    async fn revoke_identity(&self, serial: &str, at_ms: i64) -> StoreResult<bool> {
        let serial = serial.to_owned();
        self.in_tx("revoke_identity", move |tx| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE identities SET revoked_ms = COALESCE(revoked_ms, ?) \
                     WHERE serial = ?",
                )
                .bind(at_ms)
                .bind(serial)
                .execute(&mut **tx)
                .await?;
                Ok(done.rows_affected() > 0)
            })
        })
        .await
    }

    async fn revoked_identities(&self) -> StoreResult<Vec<IdentityRecord>> {
        let rows: Vec<IdentityRow> = sqlx::query_as(&format!(
            "SELECT {IDENTITY_COLUMNS} FROM identities WHERE revoked_ms IS NOT NULL \
             ORDER BY revoked_ms, serial"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| before_commit("revoked_identities", e))?;
        rows.into_iter().map(IdentityRow::into_domain).collect()
    }

    /// Appends `entry` and returns its new id; `entry.id` is ignored.
    async fn append_audit(&self, entry: &AuditEntry) -> StoreResult<i64> {
        let detail = to_json("append_audit", &entry.detail)?;
        let e = entry.clone();
        self.in_tx("append_audit", move |tx| {
            Box::pin(async move { insert_audit(tx, &e, detail).await })
        })
        .await
    }

    /// Newest first (by `at_ms`, then by id); `since_ms` is inclusive, `until_ms` exclusive;
    /// at most `limit` entries (so a limit of 0 yields none).
    async fn query_audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        let mut q: QueryBuilder<'_, Sqlite> = QueryBuilder::new(
            "SELECT id, at_ms, actor, action, instance_uid, source_ip, reason, detail \
             FROM audit WHERE 1 = 1",
        );
        push_audit_filters(&mut q, query);
        q.push(" ORDER BY at_ms DESC, id DESC LIMIT ")
            .push_bind(i64::from(query.limit));
        let rows: Vec<AuditRow> = q
            .build_query_as()
            .fetch_all(&self.pool)
            .await
            .map_err(|e| before_commit("query_audit", e))?;
        rows.into_iter().map(AuditRow::into_domain).collect()
    }

    async fn scan_audit(
        &self,
        query: &AuditQuery,
        after: Option<AuditCursor>,
    ) -> StoreResult<Vec<AuditEntry>> {
        let mut q: QueryBuilder<'_, Sqlite> = QueryBuilder::new(
            "SELECT id, at_ms, actor, action, instance_uid, source_ip, reason, detail \
             FROM audit WHERE 1 = 1",
        );
        push_audit_filters(&mut q, query);
        push_audit_page(&mut q, after, query.limit);
        let rows: Vec<AuditRow> = q
            .build_query_as()
            .fetch_all(&self.pool)
            .await
            .map_err(|e| before_commit("scan_audit", e))?;
        rows.into_iter().map(AuditRow::into_domain).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::Instant;

    use shared::domain::{ConfigFile, Health, Transport};

    use super::*;
    use crate::store::conformance;

    /// A database file in the temp dir, removed (with its WAL files) when dropped.
    struct TempDb(PathBuf);

    impl TempDb {
        fn new() -> Self {
            Self(std::env::temp_dir().join(format!(
                "ampora-store-test-{}.db",
                uuid::Uuid::new_v4().simple()
            )))
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let mut p = self.0.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn in_memory_conforms() {
        let store = SqliteStore::open_in_memory().await.expect("open");
        conformance::run_all(Arc::new(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn file_conforms() {
        let db = TempDb::new();
        let store = Arc::new(SqliteStore::open(&db.0).await.expect("open"));
        conformance::run_all(store.clone()).await;
        // A second run against the now non-empty database must pass as well.
        conformance::run_all(store.clone()).await;
        store.close().await;
    }

    /// `INSERT OR REPLACE` deletes the old row without firing the delete trigger: refused.
    #[tokio::test]
    async fn audit_rows_cannot_be_replaced() {
        let store = SqliteStore::open_in_memory().await.expect("open");
        let entry = AuditEntry {
            id: 0,
            at_ms: 1,
            actor: "api:admin".into(),
            action: "config.create".into(),
            instance_uid: None,
            source_ip: None,
            reason: None,
            detail: serde_json::json!({}),
        };
        let id = store.append_audit(&entry).await.expect("append");
        let replaced = sqlx::query(
            "INSERT OR REPLACE INTO audit (id, at_ms, actor, action, detail) \
             VALUES (?, 2, 'forger', 'nothing', '{}')",
        )
        .bind(id)
        .execute(&store.pool)
        .await;
        assert!(replaced.is_err(), "an audit row was replaced");
        let rows = store
            .query_audit(&AuditQuery {
                limit: 10,
                ..AuditQuery::default()
            })
            .await
            .expect("query");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].actor, "api:admin");
    }

    /// Two stores on one file stand in for two processes: their write gates are separate, so
    /// only SQLite's locking (BEGIN IMMEDIATE + busy timeout) and the conditional UPDATE keep
    /// the redemption single-winner.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redemption_race_across_stores() {
        let db = TempDb::new();
        let stores = [
            Arc::new(SqliteStore::open(&db.0).await.expect("open")),
            Arc::new(SqliteStore::open(&db.0).await.expect("open again")),
        ];
        conformance::redemption_race_between(&stores.clone().map(|s| s as Arc<dyn Store>)).await;
        for store in stores {
            store.close().await;
        }
    }

    /// Two stores on one file race for every partition lease (see above).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn lease_race_across_stores() {
        let db = TempDb::new();
        let stores: [Arc<dyn Store>; 2] = [
            Arc::new(SqliteStore::open(&db.0).await.expect("open")),
            Arc::new(SqliteStore::open(&db.0).await.expect("open again")),
        ];
        conformance::lease_race_between(&stores).await;
    }

    /// Agents written before migration 0002 get their partition when the store opens.
    #[tokio::test]
    async fn partitions_are_backfilled() {
        let db = TempDb::new();
        let agents: Vec<AgentRecord> = (0..1_200)
            .map(|i| AgentRecord::new(InstanceUid::new_v7(), i))
            .collect();
        {
            // The schema as it was before 0002: migrate with 0001 alone.
            let only_first = tempfile::tempdir().expect("tempdir");
            std::fs::copy(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite/0001_init.sql"),
                only_first.path().join("0001_init.sql"),
            )
            .expect("copy 0001");
            let options = SqliteConnectOptions::new()
                .filename(&db.0)
                .create_if_missing(true);
            let pool = SqlitePoolOptions::new()
                .connect_with(options)
                .await
                .expect("open");
            sqlx::migrate::Migrator::new(only_first.path())
                .await
                .expect("read 0001")
                .run(&pool)
                .await
                .expect("migrate to 0001");
            for a in &agents {
                sqlx::query(
                    "INSERT INTO agents (instance_uid, record, connected, last_seen_ms) \
                     VALUES (?, ?, ?, ?)",
                )
                .bind(a.instance_uid.as_bytes().as_slice())
                .bind(serde_json::to_string(a).expect("json"))
                .bind(a.connected)
                .bind(a.last_seen_ms)
                .execute(&pool)
                .await
                .expect("insert old row");
            }
            pool.close().await;
        }
        let store = SqliteStore::open(&db.0).await.expect("open and migrate");
        let unknown: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM agents WHERE partition = -1")
            .fetch_one(&store.pool)
            .await
            .expect("count");
        assert_eq!(unknown, 0, "every old row has its partition");
        let all: Vec<u16> = (0..shared::ids::PARTITIONS).collect();
        assert_eq!(
            store.load_agents_in(&all).await.expect("load").len(),
            agents.len()
        );
        for a in agents.iter().take(20) {
            let found = store
                .load_agents_in(&[a.instance_uid.partition()])
                .await
                .expect("load_agents_in");
            assert!(found.contains(a), "{} in its partition", a.instance_uid);
        }
        store.close().await;
    }

    /// The database itself refuses to change or remove audit entries (migration 0003), whoever
    /// sends the SQL; a DELETE without WHERE (which SQLite would otherwise run as a truncate)
    /// included.
    #[tokio::test]
    async fn audit_is_append_only() {
        let store = SqliteStore::open_in_memory().await.expect("open");
        let entry = conformance::audit_probe(&store).await;
        for sql in [
            "UPDATE audit SET actor = 'mallory' WHERE id = ?",
            "UPDATE audit SET detail = '{}' WHERE id = ?",
            "DELETE FROM audit WHERE id = ?",
        ] {
            let err = sqlx::query(sql)
                .bind(entry.id)
                .execute(&store.pool)
                .await
                .expect_err(sql);
            assert!(err.to_string().contains("append-only"), "{sql}: {err}");
        }
        let err = sqlx::query("DELETE FROM audit")
            .execute(&store.pool)
            .await
            .expect_err("delete all");
        assert!(err.to_string().contains("append-only"), "{err}");
        conformance::assert_audit_intact(&store, &entry).await;
    }

    #[tokio::test]
    async fn file_pragmas_are_set() {
        let db = TempDb::new();
        let store = SqliteStore::open(&db.0).await.expect("open");
        let mut conn = store.pool.acquire().await.expect("acquire");
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut *conn)
            .await
            .expect("journal_mode");
        assert_eq!(journal, "wal");
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *conn)
            .await
            .expect("synchronous");
        assert_eq!(sync, 1, "synchronous=NORMAL");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&mut *conn)
            .await
            .expect("foreign_keys");
        assert_eq!(fk, 1);
        let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(&mut *conn)
            .await
            .expect("busy_timeout");
        assert_eq!(busy, 5000);
        drop(conn);
        store.close().await;
    }

    #[tokio::test]
    async fn reopen_persists() {
        let db = TempDb::new();
        let uid = InstanceUid::new_v7();
        let mut agent = AgentRecord::new(uid, 1_700_000_000_000);
        agent.connected = true;
        agent.transport = Some(Transport::Http);
        let token = TokenRecord {
            id: uuid::Uuid::new_v4().to_string(),
            name: "persist".into(),
            prefix: "amp-bs.abcd…".into(),
            hash: [7; 32],
            created_ms: 1,
            expires_ms: i64::MAX,
            revoked_ms: None,
            redeemed_ms: None,
            bound_uid: None,
            scope: None,
        };
        let config_id = {
            let store = SqliteStore::open(&db.0).await.expect("open");
            store.upsert_agents(&[agent.clone()]).await.expect("upsert");
            let config = store
                .create_config(NewConfigVersion {
                    name: "persisted".into(),
                    files: BTreeMap::from([(
                        String::new(),
                        ConfigFile {
                            body: "receivers: {}".into(),
                            content_type: "text/yaml".into(),
                        },
                    )]),
                    hash: "ab".into(),
                    author: "test".into(),
                    created_ms: 2,
                })
                .await
                .expect("create_config");
            store.create_token(&token).await.expect("create_token");
            assert_eq!(
                store.redeem_token(&token.id, uid, 3).await.expect("redeem"),
                Redemption::Bound
            );
            store.close().await;
            config.id
        };
        let store = SqliteStore::open(&db.0).await.expect("reopen");
        assert_eq!(
            store.get_agent(uid).await.expect("get_agent"),
            Some(agent.clone())
        );
        assert_eq!(store.load_agents().await.expect("load"), vec![agent]);
        let config = store
            .get_config(config_id)
            .await
            .expect("get_config")
            .expect("config persisted");
        assert_eq!(config.name, "persisted");
        let found = store
            .find_token(&[7; 32])
            .await
            .expect("find_token")
            .expect("token persisted");
        assert_eq!(found.bound_uid, Some(uid));
        assert_eq!(found.redeemed_ms, Some(3));
        assert_eq!(
            store.redeem_token(&token.id, uid, 4).await.expect("redeem"),
            Redemption::AlreadyBoundToSame
        );
        store.close().await;
    }

    fn bulk_agent(i: usize) -> AgentRecord {
        let mut a = AgentRecord::new(InstanceUid::new_v7(), 1_700_000_000_000);
        a.description
            .identifying
            .insert("service.name".into(), "otelcol-contrib".into());
        a.description
            .identifying
            .insert("service.instance.id".into(), format!("instance-{i}").into());
        a.description.non_identifying.insert(
            "host.name".into(),
            format!("host-{i}.example.internal").into(),
        );
        a.description
            .non_identifying
            .insert("os.type".into(), "linux".into());
        a.capabilities = 0x1fff;
        a.health = Some(Health {
            healthy: true,
            status: "StatusOK".into(),
            start_time_unix_nano: 1_700_000_000_000_000_000,
            status_time_unix_nano: 1_700_000_000_500_000_000,
            components: BTreeMap::from([(
                "pipeline:traces".into(),
                Health {
                    healthy: true,
                    status: "StatusOK".into(),
                    ..Health::default()
                },
            )]),
            ..Health::default()
        });
        a.effective_config = Some(BTreeMap::from([(
            String::new(),
            ConfigFile {
                body: "receivers:\n  otlp:\n    protocols:\n      grpc: {}\n".repeat(8),
                content_type: "text/yaml".into(),
            },
        )]));
        a.effective_config_hash = Some("ab".repeat(32));
        a.connected = i % 3 != 1;
        a.transport = Some(Transport::WebSocket);
        a.gateway = Some("gw-1".into());
        a.sequence_num = i as u64;
        a
    }

    async fn upsert_10k(store: &SqliteStore, label: &str) {
        let agents: Vec<AgentRecord> = (0..10_000).map(bulk_agent).collect();
        let started = Instant::now();
        store.upsert_agents(&agents).await.expect("upsert");
        let inserted = started.elapsed();
        let started = Instant::now();
        store.upsert_agents(&agents).await.expect("upsert again");
        let updated = started.elapsed();
        let started = Instant::now();
        let loaded = store.load_agents().await.expect("load");
        let load = started.elapsed();
        eprintln!(
            "{label}: upsert 10k new {inserted:?}, upsert 10k existing {updated:?}, \
             load {load:?}"
        );
        assert_eq!(loaded.len(), agents.len());
        let by_uid: std::collections::HashMap<InstanceUid, AgentRecord> =
            loaded.into_iter().map(|a| (a.instance_uid, a)).collect();
        for a in &agents {
            assert_eq!(by_uid.get(&a.instance_uid), Some(a));
        }
    }

    #[tokio::test]
    async fn upsert_10k_agents_in_memory() {
        let store = SqliteStore::open_in_memory().await.expect("open");
        upsert_10k(&store, "in-memory").await;
    }

    #[tokio::test]
    async fn upsert_10k_agents_file() {
        let db = TempDb::new();
        let store = SqliteStore::open(&db.0).await.expect("open");
        upsert_10k(&store, "file").await;
        store.close().await;
    }

    #[tokio::test]
    async fn closed_store_reports_not_applied() {
        let store = SqliteStore::open_in_memory().await.expect("open");
        store.close().await;
        assert!(matches!(store.ping().await, Err(StoreError::NotApplied(_))));
        assert!(matches!(
            store.upsert_agents(&[bulk_agent(0)]).await,
            Err(StoreError::NotApplied(_))
        ));
    }
}
