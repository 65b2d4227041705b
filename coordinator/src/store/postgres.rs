//! The cluster store: one Postgres database shared by every coordinator, through sqlx.
//!
//! Every mutation runs in one transaction through [`PgStore::in_tx`] (commit or roll back,
//! nothing else). Transactions run at READ COMMITTED; what keeps concurrent coordinators
//! correct is the statements themselves:
//!
//! - token redemption locks the batch's tokens (`SELECT … FOR UPDATE`) before deciding, so of
//!   many concurrent redemptions of one token exactly one binds, and the others read the row
//!   as the winner committed it;
//! - a lease changes hands only through `INSERT … ON CONFLICT DO UPDATE … WHERE` the current
//!   lease has expired, which Postgres evaluates against the latest committed row under a row
//!   lock, so of many coordinators racing for a partition exactly one takes it;
//! - statements that lock many rows lock them in one fixed order (tokens by id, leases by
//!   partition, agents by uid), so concurrent transactions queue instead of deadlocking.
//!
//! Agent upserts and batch redemptions send whole columns as arrays (`UNNEST($1::bytea[], …)`),
//! so a flush of thousands of agents is a handful of statements, not thousands.
//!
//! # Error mapping
//!
//! As in the SQLite store, sqlx errors become [`StoreError`] by *where* they happened:
//!
//! - anything before `COMMIT` is sent (no connection, pool timeout, I/O, constraint
//!   violation, deadlock victim, decode error, bad JSON) → [`StoreError::NotApplied`]: the
//!   transaction was rolled back or never began (a connection lost mid-transaction is rolled
//!   back by the server), so nothing took effect;
//!   - except a missing row the operation needs (`RowNotFound`, or a foreign-key violation
//!     such as an assignment naming an unknown config) → [`StoreError::NotFound`], which also
//!     means nothing took effect;
//! - any error from `COMMIT` itself → [`StoreError::MaybeApplied`]: the server may have
//!   committed before the reply was lost, so callers must reload before assuming either;
//! - read-only calls have nothing to apply; their failures are reported as `NotApplied`
//!   (safe to retry).
//!
//! # Test databases
//!
//! Tests (this crate's and the workspace's end-to-end tests) get a database of their own from
//! [`TestDatabase::create`] (or [`PgStore::create_test_database`]), on the server named by
//! [`TEST_URL_ENV`], so parallel tests and reruns never see each other's data.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
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
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres, QueryBuilder, Transaction};

use super::sql::{
    agent_from, before_commit, corrupt, during_commit, latest_per_uid, leases_from,
    push_audit_filters, push_audit_page, redemption, role_str, scope_json, sorted_partitions,
    to_json, ApiTokenListingRow, ApiTokenRow, AssignmentRow, AuditRow, ConfigRow, IdentityRow,
    LeaseRow, TokenRow, TokenState, IDENTITY_COLUMNS, PRUNE_DEAD_AFTER_MS, RELEASED_EXPIRES_MS,
    TOKEN_COLUMNS,
};

/// Agents per upsert statement. The arrays are bound as single parameters, so this only bounds
/// the size of one message (about 2 KB of JSON per agent).
const UPSERT_CHUNK: usize = 1_000;

const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The environment variable naming the Postgres server tests create their databases on.
pub const TEST_URL_ENV: &str = "AMPORA_TEST_POSTGRES_URL";

/// The server tests use when [`TEST_URL_ENV`] is not set.
pub const DEFAULT_TEST_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Every test database's name starts with this; nothing else is ever dropped.
const TEST_DATABASE_PREFIX: &str = "ampora_test_";

/// The future a transaction body returns; it borrows the transaction for `'c`.
type TxFuture<'c, T> = Pin<Box<dyn Future<Output = Result<T, sqlx::Error>> + Send + 'c>>;

/// The Postgres implementation of [`Store`].
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects a pool of up to `max_connections` to `url` (a `postgres://` URL) and brings the
    /// schema up to date. Coordinators starting together are safe: sqlx serialises migrations
    /// with an advisory lock.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::NotApplied(format!("parsing postgres url: {e}")))?
            .application_name("ampora");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::NotApplied(format!("connecting to postgres: {e}")))?;
        sqlx::migrate!("migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| StoreError::NotApplied(format!("migrating database: {e}")))?;
        Ok(Self { pool })
    }

    /// Closes all connections; later calls fail with `NotApplied`.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Runs `body` in one transaction and commits it; the single path every mutation takes.
    /// Errors are classified as described in the module docs.
    async fn in_tx<T, F>(&self, what: &'static str, body: F) -> StoreResult<T>
    where
        T: Send,
        F: for<'c> FnOnce(&'c mut Transaction<'static, Postgres>) -> TxFuture<'c, T> + Send,
    {
        let mut tx = self
            .pool
            .begin()
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

    /// Creates an empty database with a fresh random name (`ampora_test_…`) on the server
    /// `admin_url` points at, and returns `admin_url` with its database replaced by the new one.
    /// For tests; drop it with [`PgStore::drop_test_database`] (or use [`TestDatabase`]).
    pub async fn create_test_database(admin_url: &str) -> Result<String, StoreError> {
        let name = format!("{TEST_DATABASE_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let url = url_with_database(admin_url, &name)?;
        let mut conn = PgConnection::connect(admin_url).await.map_err(|e| {
            StoreError::NotApplied(format!("connecting to the postgres server for tests: {e}"))
        })?;
        // A database name cannot be a bound parameter; this one is our prefix and hex digits.
        let created = sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await;
        close_quietly(conn).await;
        created.map_err(|e| StoreError::NotApplied(format!("creating test database: {e}")))?;
        Ok(url)
    }

    /// Drops the test database `url` names, first disconnecting anyone still using it. Refuses
    /// any database not made by [`PgStore::create_test_database`].
    pub async fn drop_test_database(admin_url: &str, url: &str) -> Result<(), StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::NotApplied(format!("parsing postgres url: {e}")))?;
        let name = options.get_database().unwrap_or_default();
        let generated = name
            .strip_prefix(TEST_DATABASE_PREFIX)
            .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_hexdigit()));
        if !generated {
            return Err(StoreError::NotApplied(format!(
                "refusing to drop {name:?}: not a test database"
            )));
        }
        let mut conn = PgConnection::connect(admin_url).await.map_err(|e| {
            StoreError::NotApplied(format!("connecting to the postgres server for tests: {e}"))
        })?;
        // Checked above to be our prefix and hex digits, so safe to splice in.
        let dropped = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await;
        close_quietly(conn).await;
        dropped.map_err(|e| StoreError::NotApplied(format!("dropping test database: {e}")))?;
        Ok(())
    }
}

async fn close_quietly(conn: PgConnection) {
    if let Err(e) = conn.close().await {
        tracing::debug!(%e, "closing an admin connection failed");
    }
}

/// The server tests use: [`TEST_URL_ENV`] if set, else [`DEFAULT_TEST_URL`].
pub fn test_admin_url() -> String {
    std::env::var(TEST_URL_ENV).unwrap_or_else(|_| DEFAULT_TEST_URL.to_owned())
}

/// `url` with its database (the path) replaced by `database`; user, host, port and query
/// parameters are kept.
fn url_with_database(url: &str, database: &str) -> Result<String, StoreError> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let (scheme, rest) = base
        .split_once("://")
        .filter(|(scheme, _)| matches!(*scheme, "postgres" | "postgresql"))
        .ok_or_else(|| StoreError::NotApplied("not a postgres:// url".to_owned()))?;
    let authority = rest
        .split_once('/')
        .map_or(rest, |(authority, _)| authority);
    let mut out = format!("{scheme}://{authority}/{database}");
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Ok(out)
}

/// A database of its own for one test, dropped by [`TestDatabase::remove`] or, if the test
/// ends without calling it (a panic), on drop, best effort.
pub struct TestDatabase {
    admin_url: String,
    url: String,
    /// Set once `remove` has run, so drop does not try again.
    removed: bool,
}

impl TestDatabase {
    /// A fresh database on the server `admin_url` points at (see
    /// [`PgStore::create_test_database`]).
    pub async fn create(admin_url: &str) -> Result<Self, StoreError> {
        let url = PgStore::create_test_database(admin_url).await?;
        Ok(Self {
            admin_url: admin_url.to_owned(),
            url,
            removed: false,
        })
    }

    /// The URL to connect to the test database with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Drops the database now, disconnecting any pool still open on it.
    pub async fn remove(mut self) -> Result<(), StoreError> {
        self.removed = true;
        PgStore::drop_test_database(&self.admin_url, &self.url).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        // Drop cannot await and may run inside (or outside) a runtime, so the clean-up gets a
        // thread and a small runtime of its own. Failure only leaves a database behind.
        let (admin_url, url) = (self.admin_url.clone(), self.url.clone());
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(rt) => {
                    if let Err(e) = rt.block_on(PgStore::drop_test_database(&admin_url, &url)) {
                        tracing::warn!(%e, "test database left behind");
                    }
                }
                Err(e) => tracing::warn!(%e, "test database left behind"),
            }
        });
        if cleanup.join().is_err() {
            tracing::warn!("test database clean-up panicked");
        }
    }
}

#[derive(sqlx::FromRow)]
struct LockedToken {
    id: String,
    #[sqlx(flatten)]
    state: TokenState,
}

/// Locks the tokens `reqs` name (in id order), decides every request in order as if they ran
/// one by one, and binds the winners in one statement. Returns one outcome per request.
async fn redeem_in(
    tx: &mut Transaction<'static, Postgres>,
    reqs: &[(String, InstanceUid)],
    now_ms: i64,
) -> Result<Vec<Redemption>, sqlx::Error> {
    let mut ids: Vec<&str> = reqs.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    // FOR UPDATE makes a concurrent batch naming one of these tokens wait for our commit and
    // then read the row as we left it, so it sees our binding and cannot bind again.
    let rows: Vec<LockedToken> = sqlx::query_as(
        "SELECT id, revoked_ms, expires_ms, bound_uid FROM tokens \
         WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    let mut states: std::collections::HashMap<String, TokenState> =
        rows.into_iter().map(|t| (t.id, t.state)).collect();
    let mut outcomes = Vec::with_capacity(reqs.len());
    let (mut bind_ids, mut bind_uids) = (Vec::new(), Vec::new());
    for (id, uid) in reqs {
        let outcome = redemption(states.get(id), *uid, now_ms);
        if outcome == Redemption::Bound {
            // Later requests in this batch must see the binding, as they would one by one.
            if let Some(state) = states.get_mut(id) {
                state.bound_uid = Some(uid.as_bytes().to_vec());
            }
            bind_ids.push(id.as_str());
            bind_uids.push(uid.as_bytes().to_vec());
        }
        outcomes.push(outcome);
    }
    if !bind_ids.is_empty() {
        let bound = sqlx::query(
            "UPDATE tokens SET bound_uid = b.uid, redeemed_ms = $3 \
             FROM UNNEST($1::text[], $2::bytea[]) AS b(id, uid) \
             WHERE tokens.id = b.id AND tokens.bound_uid IS NULL",
        )
        .bind(&bind_ids)
        .bind(&bind_uids)
        .bind(now_ms)
        .execute(&mut **tx)
        .await?;
        // The rows are locked and were unbound, so every binding must land.
        if bound.rows_affected() != bind_ids.len() as u64 {
            return Err(sqlx::Error::Protocol(format!(
                "bound {} of {} locked tokens",
                bound.rows_affected(),
                bind_ids.len()
            )));
        }
    }
    Ok(outcomes)
}

/// Appends `entries` (each with its detail already encoded) in order, in one statement; ids
/// grow in that order.
async fn insert_audits(
    tx: &mut Transaction<'static, Postgres>,
    entries: &[(&AuditEntry, &str)],
) -> Result<(), sqlx::Error> {
    if entries.is_empty() {
        return Ok(());
    }
    let at_ms: Vec<i64> = entries.iter().map(|(e, _)| e.at_ms).collect();
    let actors: Vec<&str> = entries.iter().map(|(e, _)| e.actor.as_str()).collect();
    let actions: Vec<&str> = entries.iter().map(|(e, _)| e.action.as_str()).collect();
    let uids: Vec<Option<Vec<u8>>> = entries
        .iter()
        .map(|(e, _)| e.instance_uid.map(|u| u.as_bytes().to_vec()))
        .collect();
    let ips: Vec<Option<String>> = entries
        .iter()
        .map(|(e, _)| e.source_ip.map(|ip| ip.to_string()))
        .collect();
    let reasons: Vec<Option<&str>> = entries.iter().map(|(e, _)| e.reason.as_deref()).collect();
    let details: Vec<&str> = entries.iter().map(|(_, d)| *d).collect();
    sqlx::query(
        "INSERT INTO audit (at_ms, actor, action, instance_uid, source_ip, reason, detail) \
         SELECT a.at_ms, a.actor, a.action, a.uid, a.ip, a.reason, a.detail::json \
         FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::text[], \
                     $7::text[]) \
              WITH ORDINALITY AS a(at_ms, actor, action, uid, ip, reason, detail, n) \
         ORDER BY a.n",
    )
    .bind(&at_ms)
    .bind(&actors)
    .bind(&actions)
    .bind(&uids)
    .bind(&ips)
    .bind(&reasons)
    .bind(&details)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One upsert statement's worth of agents, as columns.
#[derive(Default)]
struct AgentColumns {
    uids: Vec<Vec<u8>>,
    partitions: Vec<i32>,
    records: Vec<String>,
    connected: Vec<bool>,
    last_seen_ms: Vec<i64>,
}

fn partitions_param(partitions: &[u16]) -> Vec<i32> {
    sorted_partitions(partitions)
        .into_iter()
        .map(i32::from)
        .collect()
}

#[async_trait]
impl Store for PgStore {
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
        // Deduplicated (Postgres refuses to touch one row twice in a statement) and sorted by
        // uid (one lock order for every writer); serialised before the transaction begins.
        let mut chunks = Vec::new();
        for chunk in latest_per_uid(agents).chunks(UPSERT_CHUNK) {
            let mut c = AgentColumns::default();
            for a in chunk {
                c.uids.push(a.instance_uid.as_bytes().to_vec());
                c.partitions.push(i32::from(a.instance_uid.partition()));
                c.records.push(to_json("upsert_agents", a)?);
                c.connected.push(a.connected);
                c.last_seen_ms.push(a.last_seen_ms);
            }
            chunks.push(c);
        }
        self.in_tx("upsert_agents", move |tx| {
            Box::pin(async move {
                for c in &chunks {
                    sqlx::query(
                        "INSERT INTO agents \
                         (instance_uid, partition, record, connected, last_seen_ms) \
                         SELECT r.uid, r.part, r.rec::json, r.conn, r.seen \
                         FROM UNNEST($1::bytea[], $2::int4[], $3::text[], $4::bool[], \
                                     $5::int8[]) AS r(uid, part, rec, conn, seen) \
                         ON CONFLICT (instance_uid) DO UPDATE SET \
                         partition = EXCLUDED.partition, record = EXCLUDED.record, \
                         connected = EXCLUDED.connected, last_seen_ms = EXCLUDED.last_seen_ms",
                    )
                    .bind(&c.uids)
                    .bind(&c.partitions)
                    .bind(&c.records)
                    .bind(&c.connected)
                    .bind(&c.last_seen_ms)
                    .execute(&mut **tx)
                    .await?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn load_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT record::text FROM agents")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| before_commit("load_agents", e))?;
        rows.iter()
            .map(|(json,)| agent_from("load_agents", json))
            .collect()
    }

    async fn get_agent(&self, uid: InstanceUid) -> StoreResult<Option<AgentRecord>> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT record::text FROM agents WHERE instance_uid = $1")
                .bind(uid.as_bytes().as_slice())
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| before_commit("get_agent", e))?;
        row.map(|(json,)| agent_from("get_agent", &json))
            .transpose()
    }

    async fn load_agents_in(&self, partitions: &[u16]) -> StoreResult<Vec<AgentRecord>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT record::text FROM agents WHERE partition = ANY($1::int4[])")
                .bind(partitions_param(partitions))
                .fetch_all(&self.pool)
                .await
                .map_err(|e| before_commit("load_agents_in", e))?;
        rows.iter()
            .map(|(json,)| agent_from("load_agents_in", json))
            .collect()
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
                    // SKIP LOCKED: when several coordinators prune at once, each deletes what
                    // the others are not already deleting, and none waits.
                    sqlx::query(
                        "DELETE FROM coordinators WHERE node IN (SELECT node FROM coordinators \
                         WHERE expires_ms < $1 FOR UPDATE SKIP LOCKED)",
                    )
                    .bind(now_ms.saturating_sub(PRUNE_DEAD_AFTER_MS))
                    .execute(&mut **tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO coordinators (node, expires_ms) VALUES ($1, $2) \
                         ON CONFLICT (node) DO UPDATE SET expires_ms = EXCLUDED.expires_ms",
                    )
                    .bind(node.as_str())
                    .bind(now_ms.saturating_add(ttl_ms))
                    .execute(&mut **tx)
                    .await?;
                    sqlx::query_scalar::<_, String>(
                        "SELECT node FROM coordinators WHERE expires_ms > $1",
                    )
                    .bind(now_ms)
                    .fetch_all(&mut **tx)
                    .await
                })
            })
            .await?;
        // Sorted here, not by SQL: Postgres would sort by the database's collation, which need
        // not be bytewise, and both stores must agree.
        alive.sort_unstable();
        Ok(alive)
    }

    async fn coordinator_leave(&self, node: &str) -> StoreResult<()> {
        let node = node.to_owned();
        self.in_tx("coordinator_leave", move |tx| {
            Box::pin(async move {
                sqlx::query("DELETE FROM coordinators WHERE node = $1")
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
        let want = partitions_param(want);
        let expires_ms = now_ms.saturating_add(ttl_ms);
        let rows = self
            .in_tx("acquire_leases", move |tx| {
                Box::pin(async move {
                    // Renewal and take-over in one statement over `want` plus our live leases,
                    // in partition order: every row lock this transaction takes, it takes here
                    // and in ascending order, so racing coordinators cannot deadlock. Postgres
                    // locks each conflicting row and evaluates the WHERE on its latest committed
                    // version, so a lease another coordinator just took stays theirs.
                    // Our live lease is extended as is; any other change of hands (including
                    // re-taking our own expired lease) bumps the fence.
                    sqlx::query(
                        "INSERT INTO partition_leases AS l (partition, holder, fence, expires_ms) \
                         SELECT p, $1::text, 1, $3::int8 FROM ( \
                             SELECT unnest($2::int4[]) AS p \
                             UNION \
                             SELECT partition FROM partition_leases \
                             WHERE holder = $1::text AND expires_ms > $4::int8 \
                         ) AS mine ORDER BY p \
                         ON CONFLICT (partition) DO UPDATE SET \
                         fence = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_ms > $4::int8 \
                                 THEN l.fence ELSE l.fence + 1 END, \
                         holder = EXCLUDED.holder, \
                         expires_ms = EXCLUDED.expires_ms \
                         WHERE l.expires_ms <= $4::int8 OR l.holder = EXCLUDED.holder",
                    )
                    .bind(node.as_str())
                    .bind(&want)
                    .bind(expires_ms)
                    .bind(now_ms)
                    .execute(&mut **tx)
                    .await?;
                    sqlx::query_as::<_, LeaseRow>(
                        "SELECT partition::int8 AS partition, holder, fence, expires_ms \
                         FROM partition_leases WHERE holder = $1 AND expires_ms > $2",
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
        let partitions = partitions_param(partitions);
        self.in_tx("release_leases", move |tx| {
            Box::pin(async move {
                // Locked in partition order first, like `acquire_leases`, so the two cannot
                // deadlock. The row stays (expired) so the fence keeps counting.
                sqlx::query(
                    "UPDATE partition_leases SET expires_ms = $3 \
                     WHERE holder = $1 AND partition IN ( \
                         SELECT partition FROM partition_leases \
                         WHERE holder = $1 AND partition = ANY($2::int4[]) \
                         ORDER BY partition FOR UPDATE)",
                )
                .bind(node.as_str())
                .bind(&partitions)
                .bind(RELEASED_EXPIRES_MS)
                .execute(&mut **tx)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn list_leases(&self) -> StoreResult<Vec<Lease>> {
        let rows: Vec<LeaseRow> = sqlx::query_as(
            "SELECT partition::int8 AS partition, holder, fence, expires_ms FROM partition_leases",
        )
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
                         VALUES ($1, $2::json, $3, $4, $5) RETURNING id",
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
            "SELECT id, name, files::text AS files, hash, author, created_ms \
             FROM config_versions WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| before_commit("get_config", e))?;
        row.map(ConfigRow::into_domain).transpose()
    }

    async fn list_configs(&self) -> StoreResult<Vec<ConfigVersion>> {
        let rows: Vec<ConfigRow> = sqlx::query_as(
            "SELECT id, name, files::text AS files, hash, author, created_ms \
             FROM config_versions ORDER BY id",
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
                         VALUES ($1, $2::json, $3, $4) RETURNING id",
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
            "SELECT id, config_id, target::text AS target, author, created_ms \
             FROM assignments ORDER BY id",
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
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::json)",
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
            "SELECT {TOKEN_COLUMNS}, scope::text AS scope FROM tokens ORDER BY created_ms, id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| before_commit("list_tokens", e))?;
        rows.into_iter().map(TokenRow::into_domain).collect()
    }

    async fn tokens_created_since(&self, since_ms: i64) -> StoreResult<Vec<TokenRecord>> {
        let rows: Vec<TokenRow> = sqlx::query_as(&format!(
            "SELECT {TOKEN_COLUMNS}, scope::text AS scope FROM tokens WHERE created_ms >= $1 \
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
            "SELECT {TOKEN_COLUMNS}, scope::text AS scope FROM tokens WHERE revoked_ms >= $1 \
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
            "SELECT {TOKEN_COLUMNS}, scope::text AS scope FROM tokens WHERE hash = $1"
        ))
        .bind(hash.as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| before_commit("find_token", e))?;
        row.map(TokenRow::into_domain).transpose()
    }

    async fn get_token(&self, id: &str) -> StoreResult<Option<TokenRecord>> {
        let row: Option<TokenRow> = sqlx::query_as(&format!(
            "SELECT {TOKEN_COLUMNS}, scope::text AS scope FROM tokens WHERE id = $1"
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
                    "UPDATE tokens SET revoked_ms = COALESCE(revoked_ms, $1) WHERE id = $2",
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
        let reqs = vec![(id.to_owned(), uid)];
        let outcomes = self
            .in_tx("redeem_token", move |tx| {
                Box::pin(async move { redeem_in(tx, &reqs, now_ms).await })
            })
            .await?;
        outcomes
            .into_iter()
            .next()
            .ok_or_else(|| corrupt("redeem_token", "no outcome for the request"))
    }

    /// One transaction of four statements whatever the batch size: lock the tokens, decide in
    /// request order, bind the winners, audit them.
    async fn redeem_tokens(
        &self,
        reqs: &[RedeemRequest],
        now_ms: i64,
    ) -> StoreResult<Vec<Redemption>> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let pairs: Vec<(String, InstanceUid)> =
            reqs.iter().map(|r| (r.token_id.clone(), r.uid)).collect();
        let mut audits = Vec::with_capacity(reqs.len());
        for r in reqs {
            audits.push((r.audit.clone(), to_json("redeem_tokens", &r.audit.detail)?));
        }
        self.in_tx("redeem_tokens", move |tx| {
            Box::pin(async move {
                let outcomes = redeem_in(tx, &pairs, now_ms).await?;
                let bound: Vec<(&AuditEntry, &str)> = audits
                    .iter()
                    .zip(&outcomes)
                    .filter(|(_, outcome)| **outcome == Redemption::Bound)
                    .map(|((entry, detail), _)| (entry, detail.as_str()))
                    .collect();
                insert_audits(tx, &bound).await?;
                Ok(outcomes)
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
                     VALUES ($1, $2, $3, $4, $5)",
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
             WHERE hash = $1 AND revoked_ms IS NULL",
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
                    "UPDATE api_tokens SET revoked_ms = COALESCE(revoked_ms, $1) WHERE id = $2",
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
                     confirmed_ms, revoked_ms, fingerprint, cert_pem) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
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
             WHERE created_ms >= $1 OR confirmed_ms >= $1 OR revoked_ms >= $1 \
             ORDER BY created_ms, serial"
        ))
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| before_commit("identities_changed_since", e))?;
        rows.into_iter().map(IdentityRow::into_domain).collect()
    }

    async fn get_identity(&self, serial: &str) -> StoreResult<Option<IdentityRecord>> {
        let row: Option<IdentityRow> = sqlx::query_as(&format!(
            "SELECT {IDENTITY_COLUMNS} FROM identities WHERE serial = $1"
        ))
        .bind(serial)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| before_commit("get_identity", e))?;
        row.map(IdentityRow::into_domain).transpose()
    }

    async fn identities_of(&self, uid: InstanceUid) -> StoreResult<Vec<IdentityRecord>> {
        let rows: Vec<IdentityRow> = sqlx::query_as(&format!(
            "SELECT {IDENTITY_COLUMNS} FROM identities WHERE instance_uid = $1 \
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
                    "UPDATE identities SET confirmed_ms = COALESCE(confirmed_ms, $1) \
                     WHERE serial = $2",
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
                    "UPDATE identities SET revoked_ms = COALESCE(revoked_ms, $1) \
                     WHERE serial = $2",
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
            Box::pin(async move {
                sqlx::query_scalar(
                    "INSERT INTO audit \
                     (at_ms, actor, action, instance_uid, source_ip, reason, detail) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7::json) RETURNING id",
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
            })
        })
        .await
    }

    /// Newest first (by `at_ms`, then by id); `since_ms` is inclusive, `until_ms` exclusive;
    /// at most `limit` entries (so a limit of 0 yields none).
    async fn query_audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        let mut q: QueryBuilder<'_, Postgres> = QueryBuilder::new(
            "SELECT id, at_ms, actor, action, instance_uid, source_ip, reason, \
             detail::text AS detail FROM audit WHERE TRUE",
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
        let mut q: QueryBuilder<'_, Postgres> = QueryBuilder::new(
            "SELECT id, at_ms, actor, action, instance_uid, source_ip, reason, \
             detail::text AS detail FROM audit WHERE TRUE",
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
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::store::conformance;

    /// A fresh database, or a failure that says what is missing: these tests never skip.
    async fn test_database() -> TestDatabase {
        let admin_url = test_admin_url();
        match TestDatabase::create(&admin_url).await {
            Ok(db) => db,
            Err(e) => panic!(
                "the Postgres store tests need a Postgres server at {admin_url} \
                 (set {TEST_URL_ENV} to use another): {e}"
            ),
        }
    }

    async fn connect(db: &TestDatabase) -> PgStore {
        PgStore::connect(db.url(), 16).await.expect("connect")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn conforms() {
        let db = test_database().await;
        let store = Arc::new(connect(&db).await);
        conformance::run_all(store.clone()).await;
        // A second run against the now non-empty database must pass as well.
        conformance::run_all(store.clone()).await;
        store.close().await;
        db.remove().await.expect("drop test database");
    }

    /// Two pools stand in for two coordinator processes: only Postgres' row locks keep the
    /// leases single-holder and the redemption single-winner.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn races_across_stores() {
        let db = test_database().await;
        let stores: [Arc<dyn Store>; 2] =
            [Arc::new(connect(&db).await), Arc::new(connect(&db).await)];
        conformance::lease_race_between(&stores).await;
        conformance::redemption_race_between(&stores).await;
        db.remove().await.expect("drop test database");
    }

    /// The database itself refuses to change or remove audit entries (migration 0002), whoever
    /// sends the SQL; TRUNCATE, which row triggers would not see, included.
    #[tokio::test]
    async fn audit_is_append_only() {
        let db = test_database().await;
        let store = connect(&db).await;
        let entry = conformance::audit_probe(&store).await;
        for sql in [
            "UPDATE audit SET actor = 'mallory' WHERE id = $1",
            "UPDATE audit SET detail = '{}'::json WHERE id = $1",
            "DELETE FROM audit WHERE id = $1",
        ] {
            let err = sqlx::query(sql)
                .bind(entry.id)
                .execute(&store.pool)
                .await
                .expect_err(sql);
            assert!(err.to_string().contains("append-only"), "{sql}: {err}");
        }
        for sql in ["DELETE FROM audit", "TRUNCATE audit"] {
            let err = sqlx::query(sql).execute(&store.pool).await.expect_err(sql);
            assert!(err.to_string().contains("append-only"), "{sql}: {err}");
        }
        conformance::assert_audit_intact(&store, &entry).await;
        store.close().await;
        db.remove().await.expect("drop test database");
    }

    /// Reconnecting finds the data and re-running the migrations is a no-op.
    #[tokio::test]
    async fn reconnect_persists() {
        let db = test_database().await;
        let uid = InstanceUid::new_v7();
        let agent = AgentRecord::new(uid, 1_700_000_000_000);
        {
            let store = connect(&db).await;
            store
                .upsert_agents(std::slice::from_ref(&agent))
                .await
                .expect("upsert");
            store.close().await;
        }
        let store = connect(&db).await;
        assert_eq!(store.get_agent(uid).await.expect("get_agent"), Some(agent));
        store.close().await;
        db.remove().await.expect("drop test database");
    }

    #[tokio::test]
    async fn upsert_10k_agents() {
        let db = test_database().await;
        let store = connect(&db).await;
        let agents: Vec<AgentRecord> = (0..10_000)
            .map(|i| {
                let mut a = AgentRecord::new(InstanceUid::new_v7(), 1_700_000_000_000);
                a.description
                    .identifying
                    .insert("service.instance.id".into(), format!("instance-{i}").into());
                a.effective_config_hash = Some("ab".repeat(32));
                a.connected = i % 3 != 1;
                a.sequence_num = i as u64;
                a
            })
            .collect();
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
            "postgres: upsert 10k new {inserted:?}, upsert 10k existing {updated:?}, \
             load {load:?}"
        );
        assert_eq!(loaded.len(), agents.len());
        store.close().await;
        db.remove().await.expect("drop test database");
    }

    #[tokio::test]
    async fn closed_store_reports_not_applied() {
        let db = test_database().await;
        let store = connect(&db).await;
        store.close().await;
        assert!(matches!(store.ping().await, Err(StoreError::NotApplied(_))));
        assert!(matches!(
            store
                .upsert_agents(&[AgentRecord::new(InstanceUid::new_v7(), 1)])
                .await,
            Err(StoreError::NotApplied(_))
        ));
        db.remove().await.expect("drop test database");
    }

    #[tokio::test]
    async fn test_database_helpers_fail_cleanly() {
        // Port 1: nothing listens there, so this fails fast with a connection error.
        let unreachable = "postgres://postgres@127.0.0.1:1/postgres";
        assert!(matches!(
            TestDatabase::create(unreachable).await,
            Err(StoreError::NotApplied(_))
        ));
        // Only databases made by create_test_database are ever dropped.
        for url in [
            "postgres://postgres@127.0.0.1:5432/postgres",
            "postgres://postgres@127.0.0.1:5432/ampora_test_",
            "postgres://postgres@127.0.0.1:5432/ampora_test_x;drop",
        ] {
            assert!(
                matches!(
                    PgStore::drop_test_database(&test_admin_url(), url).await,
                    Err(StoreError::NotApplied(_))
                ),
                "{url}"
            );
        }
    }

    #[test]
    fn database_is_replaced_in_urls() {
        let cases = [
            (
                "postgres://postgres@127.0.0.1:5432/postgres",
                "postgres://postgres@127.0.0.1:5432/db",
            ),
            ("postgresql://u:p@h", "postgresql://u:p@h/db"),
            (
                "postgres://u@h:1/x?sslmode=disable&application_name=a/b",
                "postgres://u@h:1/db?sslmode=disable&application_name=a/b",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(url_with_database(url, "db").expect(url), want);
        }
        assert!(url_with_database("mysql://h/x", "db").is_err());
        assert!(url_with_database("127.0.0.1:5432", "db").is_err());
    }
}
