//! Component sets in SQL: [`ComponentStore`] for [`SqlStore`], for any dialect. A set is
//! written once under its hash; a second report of the same hash changes nothing.

use async_trait::async_trait;
use shared::store::{ComponentStore, StoreResult};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Type};

use super::dialect::Dialect;
use super::sql::before_commit;
use super::sql_store::SqlStore;

#[async_trait]
impl<D> ComponentStore for SqlStore<D>
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
    async fn put_component_set(&self, hash: &str, body: &str, now_ms: i64) -> StoreResult<()> {
        let (hash, body) = (hash.to_owned(), body.to_owned());
        self.in_tx("put_component_set", move |tx| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO component_sets (hash, body, created_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (hash) DO NOTHING",
                )
                .bind(hash.as_str())
                .bind(body.as_str())
                .bind(now_ms)
                .execute(&mut **tx)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn list_component_sets(&self) -> StoreResult<Vec<(String, String)>> {
        sqlx::query_as("SELECT hash, body FROM component_sets ORDER BY created_ms, hash")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| before_commit("list_component_sets", e))
    }
}
