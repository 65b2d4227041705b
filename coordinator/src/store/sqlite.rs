//! The embedded store: one SQLite file, accessed through sqlx. [`SqliteStore`] is the shared
//! [`SqlStore`] on [`SqliteDialect`]; this module holds how the file is opened and SQLite's
//! side of `store::dialect`, nothing else.
//!
//! Every mutation runs in one short `BEGIN IMMEDIATE` transaction, and writers inside this
//! process queue on an async gate before asking SQLite for the write lock, so they wait in
//! FIFO order instead of spinning in SQLite's busy handler (which still covers other
//! processes, up to `busy_timeout`). Readers use the pool concurrently (WAL). As SQLite runs
//! one write transaction at a time, a conditional `UPDATE` is enough to make token
//! redemption and lease take-over single-winner. Statements over many rows use multi-row
//! `VALUES` and `IN (…)` lists, in chunks of [`CHUNK`] rows.
//! Their text varies with the chunk's length, so they are not kept as prepared statements
//! (`persistent(false)`): a cache entry per length seen grew the soak's memory by megabytes
//! a minute, and each statement runs once.
//!
//! # Partitions
//!
//! Each agent row carries its partition ([`InstanceUid::partition`], FNV-1a over the uid),
//! which SQL cannot compute. Migration `0002_cluster` added the column with `-1` ("unknown")
//! for the rows already there; [`SqliteStore::open`] fills those in from Rust right after
//! migrating, and every later write sets it.

use std::path::Path;
use std::time::Duration;

use shared::domain::{AuditEntry, Redemption};
use shared::ids::InstanceUid;
use shared::store::{StoreError, StoreResult};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteQueryResult,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite};

use super::dialect::{Claim, Dialect, SqlResult, Tx};
use super::sql::{
    redemption, uid_from, AgentRow, RecordRow, TokenState, AGENT_RECORD_OWNED, RELEASED_EXPIRES_MS,
};
use super::sql_store::SqlStore;

/// Rows per multi-row statement (agent upserts, audit appends, partition backfill, `IN`
/// lists): at most 7 binds each, far below SQLite's limit of 32766 bound parameters per
/// statement.
const CHUNK: usize = 500;

/// The `partition` of agent rows written before migration `0002_cluster`.
const UNKNOWN_PARTITION: i64 = -1;

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: u32 = 8;
/// Page cache per connection, in KiB (SQLite's default is 2 MiB). Agent state is served from
/// memory and written in batches, so the cache mostly holds pages a batch just wrote; eight
/// connections at the default grew to 16 MiB at scale for no measurable speed-up.
const CACHE_KIB: i64 = 512;

/// The embedded SQLite implementation of [`shared::store::Store`].
pub type SqliteStore = SqlStore<SqliteDialect>;

/// SQLite's side of the SQL store (see `store::dialect`).
pub struct SqliteDialect;

impl SqliteStore {
    /// Opens (creating it if missing) the database file at `path` and brings its schema up to
    /// date. WAL journal, `synchronous=NORMAL`, foreign keys on, 5 s busy timeout, a page
    /// cache of [`CACHE_KIB`] per connection.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            // A negative cache_size is in KiB.
            .pragma("cache_size", (-CACHE_KIB).to_string());
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
        let store = Self::new(pool);
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
                        sqlx::query_scalar("SELECT instance_uid FROM agents WHERE partition = $1")
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
                        q.build().persistent(false).execute(&mut **tx).await?;
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
}

/// A `WHERE … IN (…)` list of partitions.
fn push_partitions(q: &mut QueryBuilder<'_, Sqlite>, partitions: &[u16]) {
    q.push(" IN (");
    let mut list = q.separated(", ");
    for p in partitions {
        list.push_bind(i64::from(*p));
    }
    q.push(")");
}

/// Only an unbound, live token changes here, and SQLite runs one write transaction at a
/// time, so of many redemptions of one token exactly one binds.
async fn redeem_one(
    tx: &mut Tx<SqliteDialect>,
    id: &str,
    uid: InstanceUid,
    now_ms: i64,
) -> SqlResult<Redemption> {
    let bound = sqlx::query(
        "UPDATE tokens SET bound_uid = $1, redeemed_ms = $2 \
         WHERE id = $3 AND bound_uid IS NULL AND revoked_ms IS NULL AND expires_ms > $2",
    )
    .bind(uid.as_bytes().as_slice())
    .bind(now_ms)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    if bound.rows_affected() == 1 {
        return Ok(Redemption::Bound);
    }
    // Nothing changed: say why, from the row as this transaction sees it.
    let state: Option<TokenState> =
        sqlx::query_as("SELECT revoked_ms, expires_ms, bound_uid FROM tokens WHERE id = $1")
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

impl Dialect for SqliteDialect {
    type Db = Sqlite;
    const BEGIN: &'static str = "BEGIN IMMEDIATE";
    const WRITE_GATE: bool = true;
    const JSON: &'static str = "";
    const LOCK_READ: &'static str = "";
    const PRUNE_COORDINATORS: &'static str = "DELETE FROM coordinators WHERE expires_ms < $1";

    fn rows_affected(done: &SqliteQueryResult) -> u64 {
        done.rows_affected()
    }

    async fn upsert_agents(tx: &mut Tx<Self>, rows: Vec<AgentRow>) -> SqlResult<()> {
        for chunk in rows.chunks(CHUNK) {
            let mut q: QueryBuilder<'_, Sqlite> = QueryBuilder::new(
                "INSERT INTO agents \
                 (instance_uid, partition, record, effective_config, throughput, connected, \
                 last_seen_ms) ",
            );
            q.push_values(chunk, |mut b, r| {
                b.push_bind(r.uid.as_slice())
                    .push_bind(i64::from(r.partition))
                    .push_bind(r.record.as_str())
                    .push_bind(r.effective_config.as_deref())
                    .push_bind(r.throughput.as_deref())
                    .push_bind(r.connected)
                    .push_bind(r.last_seen_ms);
            });
            // A uid's partition never changes; setting it anyway also fixes a row still at
            // the pre-migration -1.
            q.push(
                " ON CONFLICT (instance_uid) DO UPDATE SET \
                 partition = excluded.partition, record = excluded.record, \
                 effective_config = COALESCE(excluded.effective_config, agents.effective_config), \
                 throughput = COALESCE(excluded.throughput, agents.throughput), \
                 connected = excluded.connected, last_seen_ms = excluded.last_seen_ms",
            );
            q.build().persistent(false).execute(&mut **tx).await?;
        }
        Ok(())
    }

    async fn agents_in(pool: &SqlitePool, partitions: Vec<u16>) -> SqlResult<Vec<RecordRow>> {
        let mut rows = Vec::new();
        for chunk in partitions.chunks(CHUNK) {
            let mut q = QueryBuilder::new(format!(
                "SELECT {AGENT_RECORD_OWNED} FROM agents WHERE partition"
            ));
            push_partitions(&mut q, chunk);
            rows.extend(q.build_query_as().persistent(false).fetch_all(pool).await?);
        }
        Ok(rows)
    }

    async fn take_leases(
        tx: &mut Tx<Self>,
        node: &str,
        want: &[u16],
        now_ms: i64,
        expires_ms: i64,
    ) -> SqlResult<()> {
        // Renew first, so the take below sees our own live leases as taken (no fence bump
        // for a lease we kept).
        sqlx::query(
            "UPDATE partition_leases SET expires_ms = $1 WHERE holder = $2 AND expires_ms > $3",
        )
        .bind(expires_ms)
        .bind(node)
        .bind(now_ms)
        .execute(&mut **tx)
        .await?;
        for chunk in want.chunks(CHUNK) {
            let mut q: QueryBuilder<'_, Sqlite> = QueryBuilder::new(
                "INSERT INTO partition_leases (partition, holder, fence, expires_ms) ",
            );
            q.push_values(chunk, |mut b, p| {
                b.push_bind(i64::from(*p))
                    .push_bind(node)
                    .push_bind(1_i64)
                    .push_bind(expires_ms);
            });
            // Only a free (expired or released) lease changes hands, and every change of
            // hands, including re-taking our own expired lease, bumps the fence.
            q.push(
                " ON CONFLICT (partition) DO UPDATE SET holder = excluded.holder, \
                 fence = partition_leases.fence + 1, expires_ms = excluded.expires_ms \
                 WHERE partition_leases.expires_ms <= ",
            )
            .push_bind(now_ms);
            q.build().persistent(false).execute(&mut **tx).await?;
        }
        Ok(())
    }

    async fn release_leases(tx: &mut Tx<Self>, node: &str, partitions: &[u16]) -> SqlResult<()> {
        for chunk in partitions.chunks(CHUNK) {
            let mut q: QueryBuilder<'_, Sqlite> =
                QueryBuilder::new("UPDATE partition_leases SET expires_ms = ");
            q.push_bind(RELEASED_EXPIRES_MS)
                .push(" WHERE holder = ")
                .push_bind(node)
                .push(" AND partition");
            push_partitions(&mut q, chunk);
            q.build().persistent(false).execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// One by one, in request order, each seeing the bindings before it.
    async fn redeem(tx: &mut Tx<Self>, reqs: &[Claim], now_ms: i64) -> SqlResult<Vec<Redemption>> {
        let mut out = Vec::with_capacity(reqs.len());
        for (id, uid) in reqs {
            out.push(redeem_one(tx, id, *uid, now_ms).await?);
        }
        Ok(out)
    }

    async fn insert_audits(tx: &mut Tx<Self>, entries: &[(&AuditEntry, &str)]) -> SqlResult<()> {
        for chunk in entries.chunks(CHUNK) {
            let mut q: QueryBuilder<'_, Sqlite> = QueryBuilder::new(
                "INSERT INTO audit (at_ms, actor, action, instance_uid, source_ip, reason, detail) ",
            );
            // Rows are inserted in VALUES order, so ids grow in that order.
            q.push_values(chunk, |mut b, (e, detail)| {
                b.push_bind(e.at_ms)
                    .push_bind(e.actor.as_str())
                    .push_bind(e.action.as_str())
                    .push_bind(e.instance_uid.as_ref().map(|u| u.as_bytes().as_slice()))
                    .push_bind(e.source_ip.map(|ip| ip.to_string()))
                    .push_bind(e.reason.as_deref())
                    .push_bind(*detail);
            });
            q.build().persistent(false).execute(&mut **tx).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::Arc;

    use shared::domain::{AgentRecord, ConfigFile, Health, TokenRecord, Transport};
    use shared::store::{AuditQuery, NewConfigVersion, Store};

    use super::*;
    use crate::store::{conformance, testing};

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
        testing::assert_audit_append_only(&store, &["DELETE FROM audit"]).await;
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
        let cache: i64 = sqlx::query_scalar("PRAGMA cache_size")
            .fetch_one(&mut *conn)
            .await
            .expect("cache_size");
        assert_eq!(cache, -CACHE_KIB, "cache capped, in KiB");
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

    fn bulk_agents() -> Vec<AgentRecord> {
        (0..10_000).map(bulk_agent).collect()
    }

    #[tokio::test]
    async fn upsert_10k_agents_in_memory() {
        let store = SqliteStore::open_in_memory().await.expect("open");
        testing::upsert_10k(&store, "in-memory", &bulk_agents()).await;
    }

    #[tokio::test]
    async fn upsert_10k_agents_file() {
        let db = TempDb::new();
        let store = SqliteStore::open(&db.0).await.expect("open");
        testing::upsert_10k(&store, "file", &bulk_agents()).await;
        store.close().await;
    }

    #[tokio::test]
    async fn closed_store_reports_unavailable() {
        let store = SqliteStore::open_in_memory().await.expect("open");
        store.close().await;
        assert!(matches!(
            store.ping().await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.upsert_agents(&[bulk_agent(0)]).await,
            Err(StoreError::Unavailable(_))
        ));
    }
}
