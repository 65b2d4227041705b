//! The cluster store: one Postgres database shared by every coordinator, through sqlx.
//! [`PgStore`] is the shared [`SqlStore`] on [`PgDialect`]; this module holds how the
//! database is reached, Postgres' side of `store::dialect`, and the test-database helpers.
//!
//! Transactions run at READ COMMITTED; what keeps concurrent coordinators correct is the
//! statements themselves:
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
//! # Test databases
//!
//! Tests (this crate's and the workspace's end-to-end tests) get a database of their own from
//! [`TestDatabase::create`] (or [`PgStore::create_test_database`]), on the server named by
//! [`TEST_URL_ENV`], so parallel tests and reruns never see each other's data.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use shared::domain::{AuditEntry, Redemption};
use shared::store::StoreError;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgQueryResult};
use sqlx::{Connection, Postgres};

use super::dialect::{Claim, Dialect, SqlResult, Tx};
use super::sql::{
    redemption, AgentRow, RecordRow, TokenState, AGENT_RECORD_OWNED, RELEASED_EXPIRES_MS,
};
use super::sql_store::SqlStore;

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

/// The Postgres implementation of [`shared::store::Store`].
pub type PgStore = SqlStore<PgDialect>;

/// Postgres' side of the SQL store (see `store::dialect`).
pub struct PgDialect;

/// `url` parsed, naming the connections `application` in Postgres' views.
fn connect_options(url: &str, application: &str) -> Result<PgConnectOptions, StoreError> {
    Ok(PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::NotApplied(format!("parsing postgres url: {e}")))?
        .application_name(application))
}

fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(ACQUIRE_TIMEOUT)
}

impl PgStore {
    /// Connects a pool of up to `max_connections` to `url` (a `postgres://` URL) and brings the
    /// schema up to date. Coordinators starting together are safe: sqlx serialises migrations
    /// with an advisory lock.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let pool = pool_options(max_connections)
            .connect_with(connect_options(url, "ampora")?)
            .await
            .map_err(|e| StoreError::NotApplied(format!("connecting to postgres: {e}")))?;
        sqlx::migrate!("migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| StoreError::NotApplied(format!("migrating database: {e}")))?;
        Ok(Self::new(pool))
    }

    /// A pool of up to `max_connections` to `url` that connects on first use, in the runtime
    /// that uses it (the lease thread's), without migrating: for a second pool beside the
    /// one [`PgStore::connect`] opened.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let pool =
            pool_options(max_connections).connect_lazy_with(connect_options(url, "ampora-leases")?);
        Ok(Self::new(pool))
    }

    /// Creates an empty database with a fresh random name (`ampora_test_…`) on the server
    /// `admin_url` points at, and returns `admin_url` with its database replaced by the new one.
    /// For tests; drop it with [`PgStore::drop_test_database`] (or use [`TestDatabase`]).
    pub async fn create_test_database(admin_url: &str) -> Result<String, StoreError> {
        let name = format!("{TEST_DATABASE_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let url = url_with_database(admin_url, &name)?;
        // A database name cannot be a bound parameter; this one is our prefix and hex digits.
        let create = format!("CREATE DATABASE {name}");
        admin_execute(admin_url, &create, "creating test database").await?;
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
        // Checked above to be our prefix and hex digits, so safe to splice in.
        let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        admin_execute(admin_url, &drop, "dropping test database").await
    }
}

/// Runs `sql` on a connection of its own to the server `admin_url` points at (for the test
/// databases: `CREATE DATABASE` and `DROP DATABASE` cannot run in a transaction or a pool).
async fn admin_execute(admin_url: &str, sql: &str, what: &str) -> Result<(), StoreError> {
    let mut conn = PgConnection::connect(admin_url).await.map_err(|e| {
        StoreError::NotApplied(format!("connecting to the postgres server for tests: {e}"))
    })?;
    let done = sqlx::query(sql).execute(&mut conn).await;
    if let Err(e) = conn.close().await {
        tracing::debug!(%e, "closing an admin connection failed");
    }
    done.map(|_| ())
        .map_err(|e| StoreError::NotApplied(format!("{what}: {e}")))
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

/// One upsert statement's worth of agents, as columns.
#[derive(Default)]
struct AgentColumns {
    uids: Vec<Vec<u8>>,
    partitions: Vec<i32>,
    records: Vec<String>,
    files: Vec<Option<String>>,
    windows: Vec<Option<String>>,
    connected: Vec<bool>,
    last_seen_ms: Vec<i64>,
}

impl AgentColumns {
    /// `rows` as column arrays of at most [`UPSERT_CHUNK`] rows each, in order.
    fn chunks(rows: Vec<AgentRow>) -> Vec<Self> {
        let mut out = Vec::new();
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let mut c = Self::default();
            for r in rows.by_ref().take(UPSERT_CHUNK) {
                c.uids.push(r.uid);
                c.partitions.push(i32::from(r.partition));
                c.records.push(r.record);
                c.files.push(r.effective_config);
                c.windows.push(r.throughput);
                c.connected.push(r.connected);
                c.last_seen_ms.push(r.last_seen_ms);
            }
            out.push(c);
        }
        out
    }
}

/// Partitions as the `int4[]` the statements bind.
fn partitions_param(partitions: &[u16]) -> Vec<i32> {
    partitions.iter().copied().map(i32::from).collect()
}

#[derive(sqlx::FromRow)]
struct LockedToken {
    id: String,
    #[sqlx(flatten)]
    state: TokenState,
}

impl Dialect for PgDialect {
    type Db = Postgres;
    const BEGIN: &'static str = "BEGIN";
    const WRITE_GATE: bool = false;
    const JSON: &'static str = "::json";
    /// SKIP LOCKED: when several coordinators prune at once, each deletes what the others are
    /// not already deleting, and none waits.
    const LOCK_READ: &'static str = " FOR SHARE";
    const PRUNE_COORDINATORS: &'static str = "DELETE FROM coordinators WHERE node IN \
        (SELECT node FROM coordinators WHERE expires_ms < $1 FOR UPDATE SKIP LOCKED)";

    fn rows_affected(done: &PgQueryResult) -> u64 {
        done.rows_affected()
    }

    /// The rows come deduplicated (Postgres refuses to touch one row twice in a statement)
    /// and sorted by uid (one lock order for every writer).
    async fn upsert_agents(tx: &mut Tx<Self>, rows: Vec<AgentRow>) -> SqlResult<()> {
        for c in &AgentColumns::chunks(rows) {
            sqlx::query(
                "INSERT INTO agents \
                 (instance_uid, partition, record, effective_config, throughput, connected, \
                  last_seen_ms) \
                 SELECT r.uid, r.part, r.rec::json, r.files, r.win, r.conn, r.seen \
                 FROM UNNEST($1::bytea[], $2::int4[], $3::text[], $4::text[], $5::text[], \
                             $6::bool[], $7::int8[]) \
                      AS r(uid, part, rec, files, win, conn, seen) \
                 ON CONFLICT (instance_uid) DO UPDATE SET \
                 partition = EXCLUDED.partition, record = EXCLUDED.record, \
                 effective_config = COALESCE(EXCLUDED.effective_config, \
                                             agents.effective_config), \
                 throughput = COALESCE(EXCLUDED.throughput, agents.throughput), \
                 connected = EXCLUDED.connected, last_seen_ms = EXCLUDED.last_seen_ms",
            )
            .bind(&c.uids)
            .bind(&c.partitions)
            .bind(&c.records)
            .bind(&c.files)
            .bind(&c.windows)
            .bind(&c.connected)
            .bind(&c.last_seen_ms)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    async fn agents_in(pool: &PgPool, partitions: Vec<u16>) -> SqlResult<Vec<RecordRow>> {
        let sql =
            format!("SELECT {AGENT_RECORD_OWNED} FROM agents WHERE partition = ANY($1::int4[])");
        sqlx::query_as(&sql)
            .bind(partitions_param(&partitions))
            .fetch_all(pool)
            .await
    }

    async fn take_leases(
        tx: &mut Tx<Self>,
        node: &str,
        want: &[u16],
        now_ms: i64,
        expires_ms: i64,
    ) -> SqlResult<()> {
        // Renewal and take-over in one statement over `want` plus our live leases, in
        // partition order: every row lock this transaction takes, it takes here and in
        // ascending order, so racing coordinators cannot deadlock. Postgres locks each
        // conflicting row and evaluates the WHERE on its latest committed version, so a lease
        // another coordinator just took stays theirs. Our live lease is extended as is; any
        // other change of hands (including re-taking our own expired lease) bumps the fence.
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
        .bind(node)
        .bind(partitions_param(want))
        .bind(expires_ms)
        .bind(now_ms)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn release_leases(tx: &mut Tx<Self>, node: &str, partitions: &[u16]) -> SqlResult<()> {
        // Locked in partition order first, like `take_leases`, so the two cannot deadlock.
        sqlx::query(
            "UPDATE partition_leases SET expires_ms = $3 \
             WHERE holder = $1 AND partition IN ( \
                 SELECT partition FROM partition_leases \
                 WHERE holder = $1 AND partition = ANY($2::int4[]) \
                 ORDER BY partition FOR UPDATE)",
        )
        .bind(node)
        .bind(partitions_param(partitions))
        .bind(RELEASED_EXPIRES_MS)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Locks the tokens `reqs` name (in id order), decides every request in order as if they
    /// ran one by one, and binds the winners in one statement.
    async fn redeem(tx: &mut Tx<Self>, reqs: &[Claim], now_ms: i64) -> SqlResult<Vec<Redemption>> {
        let mut ids: Vec<&str> = reqs.iter().map(|(id, _)| id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        // FOR UPDATE makes a concurrent batch naming one of these tokens wait for our commit
        // and then read the row as we left it, so it sees our binding and cannot bind again.
        let rows: Vec<LockedToken> = sqlx::query_as(
            "SELECT id, revoked_ms, expires_ms, bound_uid FROM tokens \
             WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        let mut states: HashMap<String, TokenState> =
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

    /// In one statement, whatever the batch size.
    async fn insert_audits(tx: &mut Tx<Self>, entries: &[(&AuditEntry, &str)]) -> SqlResult<()> {
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
             FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::bytea[], $5::text[], \
                         $6::text[], $7::text[]) \
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shared::domain::AgentRecord;
    use shared::ids::InstanceUid;
    use shared::store::Store;

    use super::*;
    use crate::store::{conformance, testing};

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
        testing::assert_audit_append_only(&store, &["DELETE FROM audit", "TRUNCATE audit"]).await;
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
        testing::upsert_10k(&store, "postgres", &agents).await;
        store.close().await;
        db.remove().await.expect("drop test database");
    }

    #[tokio::test]
    async fn closed_store_reports_unavailable() {
        let db = test_database().await;
        let store = connect(&db).await;
        store.close().await;
        assert!(matches!(
            store.ping().await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store
                .upsert_agents(&[AgentRecord::new(InstanceUid::new_v7(), 1)])
                .await,
            Err(StoreError::Unavailable(_))
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
