//! Group restarts in SQL: [`RestartStore`] for [`SqlStore`], for any dialect. A restart is
//! one row: the coordinator's job as JSON (opaque here), written whole and compared by
//! revision, fenced like a rollout's writes.

use async_trait::async_trait;
use shared::rollout::Fence;
use shared::store::{RestartStore, StoreResult, StoredRestart};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Type};

use super::dialect::Dialect;
use super::sql::{all, one, IntoDomain};
use super::sql_rollouts::fence_holds;
use super::sql_store::SqlStore;

const RESTART_COLUMNS: &str = "id, rev, state, body";

#[derive(sqlx::FromRow)]
struct RestartRow {
    id: i64,
    rev: i64,
    state: String,
    body: String,
}

impl IntoDomain<StoredRestart> for RestartRow {
    fn into_domain(self) -> StoreResult<StoredRestart> {
        Ok(StoredRestart {
            id: self.id,
            rev: self.rev,
            state: self.state,
            body: self.body,
        })
    }
}

#[async_trait]
impl<D> RestartStore for SqlStore<D>
where
    D: Dialect,
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    for<'q> <D::Db as Database>::Arguments<'q>: IntoArguments<'q, D::Db>,
    i64: Type<D::Db> + for<'q> Encode<'q, D::Db> + for<'r> Decode<'r, D::Db>,
    str: Type<D::Db>,
    for<'q> &'q str: Encode<'q, D::Db>,
    String: Type<D::Db> + for<'r> Decode<'r, D::Db>,
    usize: ColumnIndex<<D::Db as Database>::Row>,
    for<'r> &'r str: ColumnIndex<<D::Db as Database>::Row>,
{
    async fn create_restart(&self, state: &str, body: &str, created_ms: i64) -> StoreResult<i64> {
        let (state, body) = (state.to_owned(), body.to_owned());
        self.in_tx("create_restart", move |tx| {
            Box::pin(async move {
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO restarts (rev, state, body, created_ms) \
                     VALUES (1, $1, $2, $3) RETURNING id",
                )
                .bind(state.as_str())
                .bind(body.as_str())
                .bind(created_ms)
                .fetch_one(&mut **tx)
                .await?;
                Ok(id)
            })
        })
        .await
    }

    async fn update_restart(
        &self,
        id: i64,
        rev: i64,
        state: &str,
        body: &str,
        fence: Option<&Fence>,
    ) -> StoreResult<bool> {
        let (state, body, fence) = (state.to_owned(), body.to_owned(), fence.cloned());
        self.in_tx("update_restart", move |tx| {
            Box::pin(async move {
                if !fence_holds::<D>(tx, fence.as_ref()).await? {
                    return Ok(false);
                }
                let done = sqlx::query(
                    "UPDATE restarts SET rev = $1, state = $2, body = $3 \
                     WHERE id = $4 AND rev = $5",
                )
                .bind(rev)
                .bind(state.as_str())
                .bind(body.as_str())
                .bind(id)
                .bind(rev - 1)
                .execute(&mut **tx)
                .await?;
                Ok(D::rows_affected(&done) > 0)
            })
        })
        .await
    }

    async fn get_restart(&self, id: i64) -> StoreResult<Option<StoredRestart>> {
        let sql = format!("SELECT {RESTART_COLUMNS} FROM restarts WHERE id = $1");
        let row = sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await;
        one::<RestartRow, _>("get_restart", row)
    }

    async fn list_restarts(&self, limit: u32) -> StoreResult<Vec<StoredRestart>> {
        let sql = format!("SELECT {RESTART_COLUMNS} FROM restarts ORDER BY id DESC LIMIT $1");
        let rows = sqlx::query_as(&sql)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await;
        all::<RestartRow, _>("list_restarts", rows)
    }

    async fn list_restarts_in(&self, state: &str) -> StoreResult<Vec<StoredRestart>> {
        let sql = format!("SELECT {RESTART_COLUMNS} FROM restarts WHERE state = $1 ORDER BY id");
        let rows = sqlx::query_as(&sql).bind(state).fetch_all(&self.pool).await;
        all::<RestartRow, _>("list_restarts_in", rows)
    }
}
