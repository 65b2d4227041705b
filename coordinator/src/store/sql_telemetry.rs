//! Groups' own-telemetry settings in SQL: [`TelemetryStore`] for [`SqlStore`], for any
//! dialect. One row per group; a put replaces it.

use async_trait::async_trait;
use shared::store::{StoreResult, TelemetryStore};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Type};

use super::dialect::Dialect;
use super::sql::before_commit;
use super::sql_store::SqlStore;

#[async_trait]
impl<D> TelemetryStore for SqlStore<D>
where
    D: Dialect,
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    for<'q> <D::Db as Database>::Arguments<'q>: IntoArguments<'q, D::Db>,
    i64: Type<D::Db> + for<'q> Encode<'q, D::Db>,
    str: Type<D::Db>,
    for<'q> &'q str: Encode<'q, D::Db>,
    String: Type<D::Db> + for<'r> Decode<'r, D::Db>,
    (String, String): for<'r> sqlx::FromRow<'r, <D::Db as Database>::Row>,
    usize: ColumnIndex<<D::Db as Database>::Row>,
{
    async fn put_group_telemetry(&self, group: &str, body: &str, now_ms: i64) -> StoreResult<()> {
        let (group, body) = (group.to_owned(), body.to_owned());
        self.in_tx("put_group_telemetry", move |tx| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO group_telemetry (group_name, body, updated_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (group_name) DO UPDATE SET body = excluded.body, \
                     updated_ms = excluded.updated_ms",
                )
                .bind(group.as_str())
                .bind(body.as_str())
                .bind(now_ms)
                .execute(&mut **tx)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn delete_group_telemetry(&self, group: &str) -> StoreResult<bool> {
        let group = group.to_owned();
        self.in_tx("delete_group_telemetry", move |tx| {
            Box::pin(async move {
                let done = sqlx::query("DELETE FROM group_telemetry WHERE group_name = $1")
                    .bind(group.as_str())
                    .execute(&mut **tx)
                    .await?;
                Ok(D::rows_affected(&done) > 0)
            })
        })
        .await
    }

    async fn list_group_telemetry(&self) -> StoreResult<Vec<(String, String)>> {
        sqlx::query_as("SELECT group_name, body FROM group_telemetry ORDER BY group_name")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| before_commit("list_group_telemetry", e))
    }
}
