//! Test helpers both SQL backends' tests share: checks that go below the `Store` trait (raw
//! SQL against the database) or time it, and so are not part of the conformance suite.

use std::collections::HashMap;
use std::time::Instant;

use shared::domain::AgentRecord;
use shared::ids::InstanceUid;
use shared::store::Store;
use sqlx::{Database, Encode, Executor, IntoArguments, Type};

use super::conformance;
use super::dialect::Dialect;
use super::sql_store::SqlStore;

/// The database itself refuses to change or remove audit entries, whoever sends the SQL: each
/// per-row statement (bound to a probe entry's id) and each of `whole_table` fails with an
/// "append-only" error, and the probe entry stays intact.
pub async fn assert_audit_append_only<D>(store: &SqlStore<D>, whole_table: &[&str])
where
    D: Dialect,
    SqlStore<D>: Store,
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    for<'q> <D::Db as Database>::Arguments<'q>: IntoArguments<'q, D::Db>,
    i64: Type<D::Db> + for<'q> Encode<'q, D::Db>,
{
    let entry = conformance::audit_probe(store).await;
    for sql in [
        "UPDATE audit SET actor = 'mallory' WHERE id = $1",
        "UPDATE audit SET detail = '{}' WHERE id = $1",
        "DELETE FROM audit WHERE id = $1",
    ] {
        let err = sqlx::query(sql)
            .bind(entry.id)
            .execute(&store.pool)
            .await
            .map(|_| ())
            .expect_err(sql);
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    for &sql in whole_table {
        let done = sqlx::query(sql).execute(&store.pool).await;
        let err = done.map(|_| ()).expect_err(sql);
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    conformance::assert_audit_intact(store, &entry).await;
}

/// Upserts `agents` (10k of them, new), then again (existing), then loads them all, printing
/// how long each took under `label`; every agent must come back as written.
pub async fn upsert_10k(store: &dyn Store, label: &str, agents: &[AgentRecord]) {
    let started = Instant::now();
    store.upsert_agents(agents).await.expect("upsert");
    let inserted = started.elapsed();
    let started = Instant::now();
    store.upsert_agents(agents).await.expect("upsert again");
    let updated = started.elapsed();
    let started = Instant::now();
    let loaded = store.load_agents().await.expect("load");
    let load = started.elapsed();
    eprintln!(
        "{label}: upsert 10k new {inserted:?}, upsert 10k existing {updated:?}, load {load:?}"
    );
    assert_eq!(loaded.len(), agents.len());
    let by_uid: HashMap<InstanceUid, AgentRecord> =
        loaded.into_iter().map(|a| (a.instance_uid, a)).collect();
    for a in agents {
        assert_eq!(
            by_uid.get(&a.instance_uid),
            Some(&a.without_effective_config())
        );
    }
}
