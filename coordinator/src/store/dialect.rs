//! What differs between the SQL backends, in one trait: [`Dialect`]. Everything else (every
//! other query, the transaction path, error classification) is written once, for any
//! dialect, in `store::sql_store`; `store::sqlite` and `store::postgres` implement this trait
//! and otherwise hold only how they open their database (and, for Postgres, the helpers that
//! give each test a database of its own).
//!
//! The differences come from what each engine offers concurrent writers and bulk statements:
//!
//! | | SQLite | Postgres |
//! | --- | --- | --- |
//! | write transactions | one at a time: `BEGIN IMMEDIATE`, queued on an in-process gate | concurrent, READ COMMITTED; row locks taken in one fixed order |
//! | many rows in one statement | multi-row `VALUES` and `IN (…)` lists, in chunks under the bind limit | whole columns bound as arrays: `UNNEST($1::bytea[], …)`, `= ANY($1)` |
//! | token redemption | conditional `UPDATE` per token (the write lock makes it single-winner) | `SELECT … FOR UPDATE` of the batch's tokens in id order, then one `UPDATE` |
//! | lease take-over | renew, then `INSERT … ON CONFLICT DO UPDATE … WHERE` expired, per chunk | one statement over the wanted and held partitions, in partition order |
//! | JSON columns | TEXT | `json`: a bound text needs `::json` |
//!
//! Query texts written out use `$N` placeholders, which sqlx's SQLite driver binds by number
//! too, so one text serves both; SQLite's `QueryBuilder` statements get its own `?`.

use std::future::Future;

use shared::domain::{AuditEntry, Redemption};
use shared::ids::InstanceUid;
use sqlx::{Database, Pool, Transaction};

use super::sql::{AgentRow, RecordRow};

/// A write transaction of dialect `D`.
pub type Tx<D> = Transaction<'static, <D as Dialect>::Db>;

/// What a dialect's statements return: raw sqlx errors, classified by the caller.
pub type SqlResult<T> = Result<T, sqlx::Error>;

/// One redemption: bind the token with this id to this agent.
pub type Claim = (String, InstanceUid);

/// One SQL backend's side of the store. Implemented by [`super::SqliteDialect`] and
/// [`super::PgDialect`]; the methods run inside the write transaction they are given (or, for
/// reads, on the pool) and report raw sqlx errors, which the caller classifies.
pub trait Dialect: Sized + Send + Sync + 'static {
    type Db: Database;

    /// The statement that opens a write transaction.
    const BEGIN: &'static str;
    /// Whether this process's writers queue on an async gate before [`Dialect::BEGIN`], so
    /// they wait in FIFO order instead of in the engine's busy handler.
    const WRITE_GATE: bool;
    /// What follows a placeholder that binds JSON text to a JSON column.
    const JSON: &'static str;
    /// Deletes the `coordinators` rows that expired before `$1`.
    const PRUNE_COORDINATORS: &'static str;
    /// What follows a `SELECT` inside a write transaction to keep the rows read from changing
    /// until commit (empty where write transactions run one at a time).
    const LOCK_READ: &'static str;

    /// How many rows a statement changed.
    fn rows_affected(done: &<Self::Db as Database>::QueryResult) -> u64;

    /// Inserts or replaces `rows` (one per uid, in uid order).
    fn upsert_agents(
        tx: &mut Tx<Self>,
        rows: Vec<AgentRow>,
    ) -> impl Future<Output = SqlResult<()>> + Send;

    /// The records of the agents in `partitions` (deduplicated, ascending).
    fn agents_in(
        pool: &Pool<Self::Db>,
        partitions: Vec<u16>,
    ) -> impl Future<Output = SqlResult<Vec<RecordRow>>> + Send;

    /// Extends `node`'s live leases to `expires_ms` and takes each partition of `want`
    /// (deduplicated, ascending) that is free at `now_ms`, bumping the fence of every lease
    /// that changes hands.
    fn take_leases(
        tx: &mut Tx<Self>,
        node: &str,
        want: &[u16],
        now_ms: i64,
        expires_ms: i64,
    ) -> impl Future<Output = SqlResult<()>> + Send;

    /// Expires `node`'s leases on `partitions` (deduplicated, ascending), keeping the rows.
    fn release_leases(
        tx: &mut Tx<Self>,
        node: &str,
        partitions: &[u16],
    ) -> impl Future<Output = SqlResult<()>> + Send;

    /// Decides each claim in order, as if they ran one by one, and binds the winners. One
    /// outcome per claim.
    fn redeem(
        tx: &mut Tx<Self>,
        reqs: &[Claim],
        now_ms: i64,
    ) -> impl Future<Output = SqlResult<Vec<Redemption>>> + Send;

    /// Appends `entries` (each with its detail already encoded), ids growing in that order.
    fn insert_audits(
        tx: &mut Tx<Self>,
        entries: &[(&AuditEntry, &str)],
    ) -> impl Future<Output = SqlResult<()>> + Send;
}
