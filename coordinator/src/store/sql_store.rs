//! The one SQL implementation of [`Store`]: [`SqlStore`], generic over a [`Dialect`]. Every
//! query that reads the same on SQLite and Postgres is written here once; what differs is
//! behind the `Dialect` trait (see `store::dialect`).
//!
//! # Transactions and error mapping
//!
//! Every mutation runs in one short transaction through [`SqlStore::in_tx`] (commit or roll
//! back, nothing else), opened with the dialect's `BEGIN` and, where the dialect asks for it,
//! after queueing on this process's write gate. sqlx errors become [`StoreError`] by *where*
//! they happened, since that is what decides what the caller may assume about the write:
//!
//! - anything before `COMMIT` is sent (no connection, pool timeout, I/O, busy timeout,
//!   constraint violation, deadlock victim, decode error, bad JSON) → [`StoreError::NotApplied`]:
//!   the transaction was rolled back or never began (a connection lost mid-transaction is
//!   rolled back by the server), so nothing took effect;
//!   - except a missing row the operation needs (`RowNotFound`, or a foreign-key violation
//!     such as an assignment naming an unknown config) → [`StoreError::NotFound`], which also
//!     means nothing took effect;
//!   - and except a store that cannot be reached (I/O error, pool timeout, closed pool) →
//!     [`StoreError::Unavailable`]: nothing took effect, retry later (the API's 503);
//! - any error from `COMMIT` itself → [`StoreError::MaybeApplied`]: the commit may or may not
//!   have been made durable, so callers must reload before assuming either;
//! - read-only calls have nothing to apply; their failures are reported the same way
//!   (safe to retry).
//!
//! The classification and the row conversions live in `store::sql`.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

use async_trait::async_trait;
use shared::domain::{
    AgentRecord, ApiTokenListing, ApiTokenRecord, Assignment, AuditEntry, ConfigVersion,
    IdentityRecord, Redemption, TokenRecord,
};
use shared::ids::InstanceUid;
use shared::store::{
    AuditCursor, AuditQuery, HeldLeases, Lease, NewAssignment, NewConfigVersion, RedeemRequest,
    Store, StoreResult,
};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Type};
use tokio::sync::Mutex;

use super::dialect::{Claim, Dialect, SqlResult, Tx};
use super::sql::{
    agent_rows, all, audit_select, before_commit, corrupt, during_commit, leases_from, one,
    role_str, scope_json, sorted_partitions, to_json, AgentRow, ApiTokenListingRow, ApiTokenRow,
    AssignmentRow, AuditOrder, AuditRow, ConfigRow, IdentityRow, LeaseRow, RecordRow, TokenRow,
    AGENT_RECORD, AGENT_RECORD_WITH_FILES, ASSIGNMENT_COLUMNS, CONFIG_COLUMNS, IDENTITY_COLUMNS,
    LEASE_COLUMNS, PRUNE_DEAD_AFTER_MS, TOKEN_COLUMNS,
};

/// The future a transaction body returns; it borrows the transaction for `'c`.
pub(super) type TxFuture<'c, T> = Pin<Box<dyn Future<Output = SqlResult<T>> + Send + 'c>>;

/// Runs `$sql`, an `UPDATE … SET col = COALESCE(col, $1) WHERE key = $2`, in one write
/// transaction of `$store`, binding `$at_ms` and `$key`; true when the row exists. A time set
/// this way keeps its first value. A macro rather than a method so that it needs no bounds of
/// its own: it expands inside the `Store` impl, whose bounds cover it.
macro_rules! stamp {
    ($store:expr, $what:literal, $sql:expr, $at_ms:expr, $key:expr) => {{
        let (sql, at_ms, key): (&'static str, i64, String) = ($sql, $at_ms, $key.to_owned());
        $store
            .in_tx($what, move |tx| {
                Box::pin(async move {
                    let done = sqlx::query(sql)
                        .bind(at_ms)
                        .bind(key.as_str())
                        .execute(&mut **tx)
                        .await?;
                    Ok(D::rows_affected(&done) > 0)
                })
            })
            .await
    }};
}

/// The [`Store`] on a SQL database of dialect `D` (see [`super::SqliteStore`] and
/// [`super::PgStore`]).
pub struct SqlStore<D: Dialect> {
    pub(super) pool: Pool<D::Db>,
    /// Serialises this process's write transactions when `D::WRITE_GATE` (see `store::dialect`).
    write_gate: Option<Mutex<()>>,
    dialect: PhantomData<D>,
}

impl<D: Dialect> SqlStore<D> {
    /// A store on `pool`, whose schema is already up to date.
    pub(super) fn new(pool: Pool<D::Db>) -> Self {
        Self {
            pool,
            write_gate: D::WRITE_GATE.then(|| Mutex::new(())),
            dialect: PhantomData,
        }
    }

    /// Closes all connections; later calls fail with `NotApplied`.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Runs `body` in one write transaction and commits it; the single path every mutation
    /// takes. Errors are classified as described in the module docs.
    pub(super) async fn in_tx<T, F>(&self, what: &'static str, body: F) -> StoreResult<T>
    where
        T: Send,
        F: for<'c> FnOnce(&'c mut Tx<D>) -> TxFuture<'c, T> + Send,
    {
        let _gate = match &self.write_gate {
            Some(gate) => Some(gate.lock().await),
            None => None,
        };
        let mut tx = self
            .pool
            .begin_with(D::BEGIN)
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

/// The bounds below say, once, what the shared queries need of a backend: to run on its
/// connections and pool, to bind integers, text and bytes, and to read them back by column.
#[async_trait]
impl<D> Store for SqlStore<D>
where
    D: Dialect,
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    for<'q> <D::Db as Database>::Arguments<'q>: IntoArguments<'q, D::Db>,
    i64: Type<D::Db> + for<'q> Encode<'q, D::Db> + for<'r> Decode<'r, D::Db>,
    str: Type<D::Db>,
    for<'q> &'q str: Encode<'q, D::Db>,
    [u8]: Type<D::Db>,
    for<'q> &'q [u8]: Encode<'q, D::Db>,
    for<'q> Option<i64>: Encode<'q, D::Db>,
    for<'q> Option<&'q str>: Encode<'q, D::Db>,
    for<'q> Option<&'q [u8]>: Encode<'q, D::Db>,
    String: Type<D::Db> + for<'r> Decode<'r, D::Db>,
    Vec<u8>: Type<D::Db> + for<'r> Decode<'r, D::Db>,
    usize: ColumnIndex<<D::Db as Database>::Row>,
    for<'r> &'r str: ColumnIndex<<D::Db as Database>::Row>,
{
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
        let rows = agent_rows(agents)?;
        self.in_tx("upsert_agents", move |tx| {
            Box::pin(D::upsert_agents(tx, rows))
        })
        .await
    }

    async fn upsert_agents_fenced(
        &self,
        held: &HeldLeases,
        agents: &[AgentRecord],
    ) -> StoreResult<Vec<u16>> {
        if agents.is_empty() {
            return Ok(Vec::new());
        }
        let rows = agent_rows(agents)?;
        let held = held.clone();
        // Postgres: the leases read are locked until commit, so a take-over waits for this
        // write and then loads it. SQLite: writers run one at a time anyway.
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM partition_leases \
             WHERE holder = $1 AND expires_ms > $2{}",
            D::LOCK_READ
        );
        self.in_tx("upsert_agents_fenced", move |tx| {
            Box::pin(async move {
                let live = sqlx::query_as::<_, LeaseRow>(&sql)
                    .bind(held.node.as_str())
                    .bind(held.now_ms)
                    .fetch_all(&mut **tx)
                    .await?;
                let live: HashMap<u16, i64> = leases_from(live)
                    .map_err(|e| sqlx::Error::Decode(e.into()))?
                    .into_iter()
                    .map(|l| (l.partition, l.fence))
                    .collect();
                let (mine, refused): (Vec<AgentRow>, Vec<AgentRow>) =
                    rows.into_iter().partition(|r| {
                        live.get(&r.partition)
                            .is_some_and(|f| held.fences.get(&r.partition) == Some(f))
                    });
                D::upsert_agents(tx, mine).await?;
                let refused: std::collections::BTreeSet<u16> =
                    refused.iter().map(|r| r.partition).collect();
                Ok(refused.into_iter().collect())
            })
        })
        .await
    }

    async fn load_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        let sql = format!("SELECT {AGENT_RECORD} FROM agents");
        all::<RecordRow, _>(
            "load_agents",
            sqlx::query_as(&sql).fetch_all(&self.pool).await,
        )
    }

    async fn get_agent(&self, uid: InstanceUid) -> StoreResult<Option<AgentRecord>> {
        let sql = format!("SELECT {AGENT_RECORD_WITH_FILES} FROM agents WHERE instance_uid = $1");
        let row = sqlx::query_as(&sql)
            .bind(uid.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await;
        one::<RecordRow, _>("get_agent", row)
    }

    /// Deduplicated, so an agent is returned once however often its partition is named.
    async fn load_agents_in(&self, partitions: &[u16]) -> StoreResult<Vec<AgentRecord>> {
        let rows = D::agents_in(&self.pool, sorted_partitions(partitions)).await;
        all("load_agents_in", rows)
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
                    sqlx::query(D::PRUNE_COORDINATORS)
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
                    sqlx::query_scalar("SELECT node FROM coordinators WHERE expires_ms > $1")
                        .bind(now_ms)
                        .fetch_all(&mut **tx)
                        .await
                })
            })
            .await?;
        // Sorted here, not by SQL: Postgres would sort by the database's collation, which need
        // not be bytewise, and every backend must agree.
        alive.sort_unstable();
        Ok(alive)
    }

    async fn coordinator_leave(&self, node: &str) -> StoreResult<()> {
        let node = node.to_owned();
        self.in_tx("coordinator_leave", move |tx| {
            Box::pin(async move {
                sqlx::query("DELETE FROM coordinators WHERE node = $1")
                    .bind(node.as_str())
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
                    D::take_leases(tx, &node, &want, now_ms, expires_ms).await?;
                    let sql = format!(
                        "SELECT {LEASE_COLUMNS} FROM partition_leases \
                         WHERE holder = $1 AND expires_ms > $2"
                    );
                    sqlx::query_as::<_, LeaseRow>(&sql)
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
            Box::pin(async move { D::release_leases(tx, &node, &partitions).await })
        })
        .await
    }

    async fn list_leases(&self) -> StoreResult<Vec<Lease>> {
        let sql = format!("SELECT {LEASE_COLUMNS} FROM partition_leases");
        let rows = sqlx::query_as(&sql).fetch_all(&self.pool).await;
        leases_from(rows.map_err(|e| before_commit("list_leases", e))?)
    }

    async fn create_config(&self, new: NewConfigVersion) -> StoreResult<ConfigVersion> {
        let files = to_json("create_config", &new.files)?;
        let (name, hash, author, created_ms) = (
            new.name.clone(),
            new.hash.clone(),
            new.author.clone(),
            new.created_ms,
        );
        let json = D::JSON;
        let sql = format!(
            "INSERT INTO config_versions (name, files, hash, author, created_ms) \
             VALUES ($1, $2{json}, $3, $4, $5) RETURNING id"
        );
        let id: i64 = self
            .in_tx("create_config", move |tx| {
                Box::pin(async move {
                    sqlx::query_scalar(&sql)
                        .bind(name.as_str())
                        .bind(files.as_str())
                        .bind(hash.as_str())
                        .bind(author.as_str())
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
        let sql = format!("SELECT {CONFIG_COLUMNS} FROM config_versions WHERE id = $1");
        let row = sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await;
        one::<ConfigRow, _>("get_config", row)
    }

    async fn list_configs(&self) -> StoreResult<Vec<ConfigVersion>> {
        let sql = format!("SELECT {CONFIG_COLUMNS} FROM config_versions ORDER BY id");
        all::<ConfigRow, _>(
            "list_configs",
            sqlx::query_as(&sql).fetch_all(&self.pool).await,
        )
    }

    async fn create_assignment(&self, new: NewAssignment) -> StoreResult<Assignment> {
        let target = to_json("create_assignment", &new.target)?;
        let (config_id, author, created_ms) = (new.config_id, new.author.clone(), new.created_ms);
        let json = D::JSON;
        let sql = format!(
            "INSERT INTO assignments (config_id, target, author, created_ms) \
             VALUES ($1, $2{json}, $3, $4) RETURNING id"
        );
        // An unknown config_id is a foreign-key violation, reported as NotFound.
        let id: i64 = self
            .in_tx("create_assignment", move |tx| {
                Box::pin(async move {
                    sqlx::query_scalar(&sql)
                        .bind(config_id)
                        .bind(target.as_str())
                        .bind(author.as_str())
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
        let sql = format!("SELECT {ASSIGNMENT_COLUMNS} FROM assignments ORDER BY id");
        let rows = sqlx::query_as(&sql).fetch_all(&self.pool).await;
        all::<AssignmentRow, _>("list_assignments", rows)
    }

    async fn create_token(&self, token: &TokenRecord) -> StoreResult<()> {
        self.create_tokens(std::slice::from_ref(token)).await
    }

    async fn create_tokens(&self, tokens: &[TokenRecord]) -> StoreResult<()> {
        let rows = tokens
            .iter()
            .map(|t| Ok((t.clone(), scope_json(t)?)))
            .collect::<StoreResult<Vec<_>>>()?;
        let json = D::JSON;
        let sql = format!(
            "INSERT INTO tokens (id, name, prefix, hash, created_ms, expires_ms, \
             revoked_ms, redeemed_ms, bound_uid, scope) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10{json})"
        );
        // One transaction for the whole batch: one commit, not one per token.
        self.in_tx("create_token", move |tx| {
            Box::pin(async move {
                for (t, scope) in &rows {
                    sqlx::query(&sql)
                        .bind(t.id.as_str())
                        .bind(t.name.as_str())
                        .bind(t.prefix.as_str())
                        .bind(t.hash.as_slice())
                        .bind(t.created_ms)
                        .bind(t.expires_ms)
                        .bind(t.revoked_ms)
                        .bind(t.redeemed_ms)
                        .bind(t.bound_uid.as_ref().map(|u| u.as_bytes().as_slice()))
                        .bind(scope.as_deref())
                        .execute(&mut **tx)
                        .await?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_ms, id");
        all::<TokenRow, _>(
            "list_tokens",
            sqlx::query_as(&sql).fetch_all(&self.pool).await,
        )
    }

    async fn tokens_created_since(&self, since_ms: i64) -> StoreResult<Vec<TokenRecord>> {
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE created_ms >= $1 ORDER BY created_ms, id"
        );
        let rows = sqlx::query_as(&sql).bind(since_ms).fetch_all(&self.pool);
        all::<TokenRow, _>("tokens_created_since", rows.await)
    }

    async fn tokens_revoked_since(&self, since_ms: i64) -> StoreResult<Vec<TokenRecord>> {
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE revoked_ms >= $1 ORDER BY revoked_ms, id"
        );
        let rows = sqlx::query_as(&sql).bind(since_ms).fetch_all(&self.pool);
        all::<TokenRow, _>("tokens_revoked_since", rows.await)
    }

    async fn find_token(&self, hash: &[u8; 32]) -> StoreResult<Option<TokenRecord>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = $1");
        let row = sqlx::query_as(&sql)
            .bind(hash.as_slice())
            .fetch_optional(&self.pool);
        one::<TokenRow, _>("find_token", row.await)
    }

    async fn get_token(&self, id: &str) -> StoreResult<Option<TokenRecord>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1");
        let row = sqlx::query_as(&sql).bind(id).fetch_optional(&self.pool);
        one::<TokenRow, _>("get_token", row.await)
    }

    /// Revoking twice keeps the first revocation time.
    async fn revoke_token(&self, id: &str, at_ms: i64) -> StoreResult<bool> {
        let sql = "UPDATE tokens SET revoked_ms = COALESCE(revoked_ms, $1) WHERE id = $2";
        stamp!(self, "revoke_token", sql, at_ms, id)
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
                Box::pin(async move { D::redeem(tx, &reqs, now_ms).await })
            })
            .await?;
        outcomes
            .into_iter()
            .next()
            .ok_or_else(|| corrupt("redeem_token", "no outcome for the request"))
    }

    /// All in one transaction: a connect storm commits once per batch, not once per agent.
    async fn redeem_tokens(
        &self,
        reqs: &[RedeemRequest],
        now_ms: i64,
    ) -> StoreResult<Vec<Redemption>> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let pairs: Vec<Claim> = reqs.iter().map(|r| (r.token_id.clone(), r.uid)).collect();
        let mut audits = Vec::with_capacity(reqs.len());
        for r in reqs {
            audits.push((r.audit.clone(), to_json("redeem_tokens", &r.audit.detail)?));
        }
        self.in_tx("redeem_tokens", move |tx| {
            Box::pin(async move {
                let outcomes = D::redeem(tx, &pairs, now_ms).await?;
                let bound: Vec<(&AuditEntry, &str)> = audits
                    .iter()
                    .zip(&outcomes)
                    .filter(|(_, outcome)| **outcome == Redemption::Bound)
                    .map(|((entry, detail), _)| (entry, detail.as_str()))
                    .collect();
                if !bound.is_empty() {
                    D::insert_audits(tx, &bound).await?;
                }
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
        let row = sqlx::query_as(
            "SELECT id, name, role, hash, created_ms FROM api_tokens \
             WHERE hash = $1 AND revoked_ms IS NULL",
        )
        .bind(hash.as_slice())
        .fetch_optional(&self.pool)
        .await;
        one::<ApiTokenRow, _>("find_api_token", row)
    }

    async fn list_api_tokens(&self) -> StoreResult<Vec<ApiTokenListing>> {
        let rows = sqlx::query_as(
            "SELECT id, name, role, hash, created_ms, revoked_ms FROM api_tokens \
             ORDER BY created_ms, id",
        )
        .fetch_all(&self.pool)
        .await;
        all::<ApiTokenListingRow, _>("list_api_tokens", rows)
    }

    /// Revoking twice keeps the first revocation time.
    async fn revoke_api_token(&self, id: &str, at_ms: i64) -> StoreResult<bool> {
        let sql = "UPDATE api_tokens SET revoked_ms = COALESCE(revoked_ms, $1) WHERE id = $2";
        stamp!(self, "revoke_api_token", sql, at_ms, id)
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
                     confirmed_ms, revoked_ms, fingerprint, cert_pem) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
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
        let sql = format!("SELECT {IDENTITY_COLUMNS} FROM identities ORDER BY created_ms, serial");
        all::<IdentityRow, _>(
            "list_identities",
            sqlx::query_as(&sql).fetch_all(&self.pool).await,
        )
    }

    async fn identities_changed_since(&self, since_ms: i64) -> StoreResult<Vec<IdentityRecord>> {
        let sql = format!(
            "SELECT {IDENTITY_COLUMNS} FROM identities \
             WHERE created_ms >= $1 OR confirmed_ms >= $1 OR revoked_ms >= $1 \
             ORDER BY created_ms, serial"
        );
        let rows = sqlx::query_as(&sql).bind(since_ms).fetch_all(&self.pool);
        all::<IdentityRow, _>("identities_changed_since", rows.await)
    }

    async fn get_identity(&self, serial: &str) -> StoreResult<Option<IdentityRecord>> {
        let sql = format!("SELECT {IDENTITY_COLUMNS} FROM identities WHERE serial = $1");
        let row = sqlx::query_as(&sql).bind(serial).fetch_optional(&self.pool);
        one::<IdentityRow, _>("get_identity", row.await)
    }

    async fn identities_of(&self, uid: InstanceUid) -> StoreResult<Vec<IdentityRecord>> {
        let sql = format!(
            "SELECT {IDENTITY_COLUMNS} FROM identities WHERE instance_uid = $1 \
             ORDER BY created_ms, serial"
        );
        let rows = sqlx::query_as(&sql)
            .bind(uid.as_bytes().as_slice())
            .fetch_all(&self.pool);
        all::<IdentityRow, _>("identities_of", rows.await)
    }

    /// Confirming twice keeps the first time.
    async fn confirm_identity(&self, serial: &str, at_ms: i64) -> StoreResult<bool> {
        let sql = "UPDATE identities SET confirmed_ms = COALESCE(confirmed_ms, $1) \
                   WHERE serial = $2";
        stamp!(self, "confirm_identity", sql, at_ms, serial)
    }

    /// Revoking twice keeps the first revocation time.
    async fn revoke_identity(&self, serial: &str, at_ms: i64) -> StoreResult<bool> {
        let sql = "UPDATE identities SET revoked_ms = COALESCE(revoked_ms, $1) WHERE serial = $2";
        stamp!(self, "revoke_identity", sql, at_ms, serial)
    }

    async fn revoked_identities(&self) -> StoreResult<Vec<IdentityRecord>> {
        let sql = format!(
            "SELECT {IDENTITY_COLUMNS} FROM identities WHERE revoked_ms IS NOT NULL \
             ORDER BY revoked_ms, serial"
        );
        let rows = sqlx::query_as(&sql).fetch_all(&self.pool).await;
        all::<IdentityRow, _>("revoked_identities", rows)
    }

    /// Appends `entry` and returns its new id; `entry.id` is ignored.
    async fn append_audit(&self, entry: &AuditEntry) -> StoreResult<i64> {
        let detail = to_json("append_audit", &entry.detail)?;
        let e = entry.clone();
        let source_ip = entry.source_ip.map(|ip| ip.to_string());
        let json = D::JSON;
        let sql = format!(
            "INSERT INTO audit (at_ms, actor, action, instance_uid, source_ip, reason, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7{json}) RETURNING id"
        );
        self.in_tx("append_audit", move |tx| {
            Box::pin(async move {
                sqlx::query_scalar(&sql)
                    .bind(e.at_ms)
                    .bind(e.actor.as_str())
                    .bind(e.action.as_str())
                    .bind(e.instance_uid.as_ref().map(|u| u.as_bytes().as_slice()))
                    .bind(source_ip.as_deref())
                    .bind(e.reason.as_deref())
                    .bind(detail.as_str())
                    .fetch_one(&mut **tx)
                    .await
            })
        })
        .await
    }

    /// One transaction for the whole batch (agent events arrive in storms).
    async fn append_audits(&self, entries: &[AuditEntry]) -> StoreResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut rows = Vec::with_capacity(entries.len());
        for e in entries {
            rows.push((e.clone(), to_json("append_audits", &e.detail)?));
        }
        self.in_tx("append_audits", move |tx| {
            Box::pin(async move {
                let bound: Vec<(&AuditEntry, &str)> =
                    rows.iter().map(|(e, d)| (e, d.as_str())).collect();
                D::insert_audits(tx, &bound).await
            })
        })
        .await
    }

    /// Newest first (by `at_ms`, then by id); `since_ms` is inclusive, `until_ms` exclusive;
    /// at most `limit` entries (so a limit of 0 yields none).
    async fn query_audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        let (sql, args) = audit_select::<D::Db>(query, AuditOrder::NewestFirst)
            .map_err(|e| before_commit("query_audit", e))?;
        let rows = sqlx::query_as_with(&sql, args).fetch_all(&self.pool).await;
        all::<AuditRow, _>("query_audit", rows)
    }

    async fn scan_audit(
        &self,
        query: &AuditQuery,
        after: Option<AuditCursor>,
    ) -> StoreResult<Vec<AuditEntry>> {
        let select = audit_select::<D::Db>(query, AuditOrder::After(after));
        let (sql, args) = select.map_err(|e| before_commit("scan_audit", e))?;
        let rows = sqlx::query_as_with(&sql, args).fetch_all(&self.pool).await;
        all::<AuditRow, _>("scan_audit", rows)
    }
}
