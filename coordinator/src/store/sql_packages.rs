//! Package artifacts and package assignments in SQL: [`PackageStore`] for [`SqlStore`], for
//! any dialect. Each row is one JSON record written once; the artifact's key columns repeat
//! its name, version and platform so a second import of the same build is refused by the
//! primary key.

use async_trait::async_trait;
use shared::packages::{Artifact, NewPackageAssignment, PackageAssignment};
use shared::store::{PackageStore, StoreResult};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Type};

use super::dialect::Dialect;
use super::sql::{all, before_commit, corrupt, to_json, IntoDomain};
use super::sql_store::SqlStore;

#[derive(sqlx::FromRow)]
struct BodyRow {
    id: i64,
    body: String,
}

impl IntoDomain<Artifact> for BodyRow {
    fn into_domain(self) -> StoreResult<Artifact> {
        serde_json::from_str(&self.body).map_err(|e| corrupt("package artifact", e))
    }
}

impl IntoDomain<PackageAssignment> for BodyRow {
    fn into_domain(self) -> StoreResult<PackageAssignment> {
        let mut a: PackageAssignment =
            serde_json::from_str(&self.body).map_err(|e| corrupt("package assignment", e))?;
        a.id = self.id;
        Ok(a)
    }
}

/// The record of a package assignment about to be stored (its id is the row's).
fn new_assignment(new: NewPackageAssignment) -> PackageAssignment {
    PackageAssignment {
        id: 0,
        name: new.name,
        version: new.version,
        target: new.target,
        author: new.author,
        created_ms: new.created_ms,
    }
}

/// The JSON body of a package assignment row, for writes made elsewhere (a succeeded upgrade
/// rollout's, in its own transaction).
pub(super) fn package_assignment_body(new: NewPackageAssignment) -> StoreResult<String> {
    to_json("package_assignment", &new_assignment(new))
}

/// The bounds say what these queries need of a backend, as the `Store` impl's do.
#[async_trait]
impl<D> PackageStore for SqlStore<D>
where
    D: Dialect,
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    for<'q> <D::Db as Database>::Arguments<'q>: IntoArguments<'q, D::Db>,
    i64: Type<D::Db> + for<'q> Encode<'q, D::Db> + for<'r> Decode<'r, D::Db>,
    str: Type<D::Db>,
    for<'q> &'q str: Encode<'q, D::Db>,
    String: Type<D::Db> + for<'r> Decode<'r, D::Db>,
    [u8]: Type<D::Db>,
    for<'q> &'q [u8]: Encode<'q, D::Db>,
    Vec<u8>: Type<D::Db> + for<'r> Decode<'r, D::Db>,
    usize: ColumnIndex<<D::Db as Database>::Row>,
    for<'r> &'r str: ColumnIndex<<D::Db as Database>::Row>,
{
    async fn create_artifact(&self, artifact: &Artifact) -> StoreResult<bool> {
        let body = to_json("create_artifact", artifact)?;
        let a = artifact.clone();
        let json = D::JSON;
        let sql = format!(
            "INSERT INTO package_artifacts (name, version, platform, sha256, body, created_ms) \
             VALUES ($1, $2, $3, $4, $5{json}, $6) \
             ON CONFLICT (name, version, platform) DO NOTHING"
        );
        self.in_tx("create_artifact", move |tx| {
            Box::pin(async move {
                let done = sqlx::query(&sql)
                    .bind(a.name.as_str())
                    .bind(a.version.as_str())
                    .bind(a.platform.as_str())
                    .bind(a.sha256.as_str())
                    .bind(body.as_str())
                    .bind(a.created_ms)
                    .execute(&mut **tx)
                    .await?;
                Ok(D::rows_affected(&done) > 0)
            })
        })
        .await
    }

    async fn list_artifacts(&self) -> StoreResult<Vec<Artifact>> {
        all::<BodyRow, _>(
            "list_artifacts",
            sqlx::query_as(
                "SELECT CAST(0 AS BIGINT) AS id, CAST(body AS TEXT) AS body FROM package_artifacts \
                 ORDER BY created_ms, name, version, platform",
            )
            .fetch_all(&self.pool)
            .await,
        )
    }

    async fn create_package_assignment(
        &self,
        new: NewPackageAssignment,
    ) -> StoreResult<PackageAssignment> {
        let created_ms = new.created_ms;
        let mut assignment = new_assignment(new);
        let body = to_json("create_package_assignment", &assignment)?;
        let json = D::JSON;
        let sql = format!(
            "INSERT INTO package_assignments (body, created_ms) VALUES ($1{json}, $2) RETURNING id"
        );
        assignment.id = self
            .in_tx("create_package_assignment", move |tx| {
                Box::pin(async move {
                    sqlx::query_scalar(&sql)
                        .bind(body.as_str())
                        .bind(created_ms)
                        .fetch_one(&mut **tx)
                        .await
                })
            })
            .await?;
        Ok(assignment)
    }

    async fn list_package_assignments(&self) -> StoreResult<Vec<PackageAssignment>> {
        all::<BodyRow, _>(
            "list_package_assignments",
            sqlx::query_as(
                "SELECT id, CAST(body AS TEXT) AS body FROM package_assignments ORDER BY id",
            )
            .fetch_all(&self.pool)
            .await,
        )
    }

    async fn put_blob_chunk(&self, sha256: &str, index: u32, bytes: &[u8]) -> StoreResult<()> {
        let (sha256, bytes) = (sha256.to_owned(), bytes.to_vec());
        self.in_tx("put_blob_chunk", move |tx| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO package_blobs (sha256, idx, bytes) VALUES ($1, $2, $3) \
                     ON CONFLICT (sha256, idx) DO NOTHING",
                )
                .bind(sha256.as_str())
                .bind(i64::from(index))
                .bind(bytes.as_slice())
                .execute(&mut **tx)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn blob_chunk(&self, sha256: &str, index: u32) -> StoreResult<Option<Vec<u8>>> {
        sqlx::query_scalar("SELECT bytes FROM package_blobs WHERE sha256 = $1 AND idx = $2")
            .bind(sha256)
            .bind(i64::from(index))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| before_commit("blob_chunk", e))
    }
}
