//! Groups and rollouts in SQL: [`RolloutStore`] for [`SqlStore`], for any dialect. Every
//! query here reads the same on SQLite and Postgres. A rollout is one JSON row (written whole,
//! compared by revision), its members one blob, its history an append-only event table.

use std::collections::BTreeMap;

use async_trait::async_trait;
use shared::rollout::{
    decode_members, encode_members, Fence, Group, Member, NewRollout, Rollout, RolloutEvent,
    RolloutState,
};
use shared::store::{Finish, NewAssignment, RolloutStore, StoreResult};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Type};

use super::dialect::{Dialect, SqlResult, Tx};
use super::sql::{all, before_commit, corrupt, one, to_json, IntoDomain};
use super::sql_packages::package_assignment_body;
use super::sql_store::SqlStore;

#[derive(sqlx::FromRow)]
struct GroupRow {
    name: String,
    labels: String,
    author: String,
    created_ms: i64,
}

impl IntoDomain<Group> for GroupRow {
    fn into_domain(self) -> StoreResult<Group> {
        let labels: BTreeMap<String, String> =
            serde_json::from_str(&self.labels).map_err(|e| corrupt("group", e))?;
        Ok(Group {
            name: self.name,
            labels,
            author: self.author,
            created_ms: self.created_ms,
        })
    }
}

const GROUP_COLUMNS: &str = "name, CAST(labels AS TEXT) AS labels, author, created_ms";

#[derive(sqlx::FromRow)]
struct RolloutRow {
    id: i64,
    state: String,
    rev: i64,
    body: String,
}

impl IntoDomain<Rollout> for RolloutRow {
    fn into_domain(self) -> StoreResult<Rollout> {
        let mut r: Rollout = serde_json::from_str(&self.body).map_err(|e| corrupt("rollout", e))?;
        // The columns are what writes compare; they win over the copies in the body.
        r.id = self.id;
        r.rev = self.rev;
        r.state = RolloutState::parse(&self.state)
            .ok_or_else(|| corrupt("rollout", format!("state `{}`", self.state)))?;
        Ok(r)
    }
}

const ROLLOUT_COLUMNS: &str = "id, state, rev, CAST(body AS TEXT) AS body";

#[derive(sqlx::FromRow)]
struct EventRow {
    rollout_id: i64,
    at_ms: i64,
    kind: String,
    actor: String,
    stage: Option<i64>,
    detail: String,
}

impl IntoDomain<RolloutEvent> for EventRow {
    fn into_domain(self) -> StoreResult<RolloutEvent> {
        Ok(RolloutEvent {
            rollout_id: self.rollout_id,
            at_ms: self.at_ms,
            kind: self.kind,
            actor: self.actor,
            stage: self.stage.and_then(|s| usize::try_from(s).ok()),
            detail: serde_json::from_str(&self.detail).map_err(|e| corrupt("rollout event", e))?,
        })
    }
}

const EVENT_COLUMNS: &str = "rollout_id, at_ms, kind, actor, stage, CAST(detail AS TEXT) AS detail";

/// An event with its detail encoded, ready to insert.
type EncodedEvent = (RolloutEvent, String);

fn encode_events(what: &str, events: &[RolloutEvent]) -> StoreResult<Vec<EncodedEvent>> {
    events
        .iter()
        .map(|e| Ok((e.clone(), to_json(what, &e.detail)?)))
        .collect()
}

/// The bounds say what these queries need of a backend, as the `Store` impl's do.
#[async_trait]
impl<D> RolloutStore for SqlStore<D>
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
    String: Type<D::Db> + for<'r> Decode<'r, D::Db>,
    Vec<u8>: Type<D::Db> + for<'r> Decode<'r, D::Db>,
    usize: ColumnIndex<<D::Db as Database>::Row>,
    for<'r> &'r str: ColumnIndex<<D::Db as Database>::Row>,
{
    async fn put_group(&self, group: &Group) -> StoreResult<Group> {
        let labels = to_json("put_group", &group.labels)?;
        let g = group.clone();
        let json = D::JSON;
        let sql = format!(
            "INSERT INTO agent_groups (name, labels, author, created_ms) \
             VALUES ($1, $2{json}, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET labels = excluded.labels \
             RETURNING {GROUP_COLUMNS}"
        );
        let row: GroupRow = self
            .in_tx("put_group", move |tx| {
                Box::pin(async move {
                    sqlx::query_as(&sql)
                        .bind(g.name.as_str())
                        .bind(labels.as_str())
                        .bind(g.author.as_str())
                        .bind(g.created_ms)
                        .fetch_one(&mut **tx)
                        .await
                })
            })
            .await?;
        row.into_domain()
    }

    async fn list_groups(&self) -> StoreResult<Vec<Group>> {
        let sql = format!("SELECT {GROUP_COLUMNS} FROM agent_groups ORDER BY name");
        all::<GroupRow, _>(
            "list_groups",
            sqlx::query_as(&sql).fetch_all(&self.pool).await,
        )
    }

    async fn delete_group(&self, name: &str) -> StoreResult<bool> {
        let name = name.to_owned();
        self.in_tx("delete_group", move |tx| {
            Box::pin(async move {
                let done = sqlx::query("DELETE FROM agent_groups WHERE name = $1")
                    .bind(name.as_str())
                    .execute(&mut **tx)
                    .await?;
                Ok(D::rows_affected(&done) > 0)
            })
        })
        .await
    }

    async fn create_rollout(
        &self,
        new: NewRollout,
        members: &[Member],
        created: RolloutEvent,
    ) -> StoreResult<Rollout> {
        let mut rollout = Rollout {
            id: 0,
            config_id: new.config_id,
            config_hash: new.config_hash,
            package: new.package,
            group: new.group,
            target: new.target,
            stages: new.stages,
            budget: new.budget,
            deadline_ms: new.deadline_ms,
            on_failure: new.on_failure,
            state: RolloutState::Pending,
            stage: 0,
            reason: None,
            cannot_receive: new.cannot_receive,
            rollback_started_ms: None,
            author: new.author,
            created_ms: new.created_ms,
            updated_ms: new.created_ms,
            rev: 1,
        };
        let body = to_json("create_rollout", &rollout)?;
        let blob = encode_members(members);
        let events = encode_events("create_rollout", std::slice::from_ref(&created))?;
        // An upgrade refers to no config version.
        let config_id = rollout.package.is_none().then_some(rollout.config_id);
        let created_ms = rollout.created_ms;
        let json = D::JSON;
        let insert = format!(
            "INSERT INTO rollouts (config_id, state, rev, body, created_ms) \
             VALUES ($1, 'pending', 1, $2{json}, $3) RETURNING id"
        );
        // An unknown config_id is a foreign-key violation, reported as NotFound.
        let id: i64 = self
            .in_tx("create_rollout", move |tx| {
                Box::pin(async move {
                    let id: i64 = sqlx::query_scalar(&insert)
                        .bind(config_id)
                        .bind(body.as_str())
                        .bind(created_ms)
                        .fetch_one(&mut **tx)
                        .await?;
                    sqlx::query(
                        "INSERT INTO rollout_members (rollout_id, members) VALUES ($1, $2)",
                    )
                    .bind(id)
                    .bind(blob.as_slice())
                    .execute(&mut **tx)
                    .await?;
                    insert_events::<D>(tx, id, &events).await?;
                    Ok(id)
                })
            })
            .await?;
        rollout.id = id;
        Ok(rollout)
    }

    async fn list_rollouts(&self) -> StoreResult<Vec<Rollout>> {
        let sql = format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY id");
        all::<RolloutRow, _>(
            "list_rollouts",
            sqlx::query_as(&sql).fetch_all(&self.pool).await,
        )
    }

    async fn list_rollouts_in(&self, states: &[RolloutState]) -> StoreResult<Vec<Rollout>> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        // The states are the enum's own names, never input: written into the text.
        let names: Vec<String> = states.iter().map(|s| format!("'{}'", s.as_str())).collect();
        let sql = format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE state IN ({}) ORDER BY id",
            names.join(", ")
        );
        all::<RolloutRow, _>(
            "list_rollouts_in",
            sqlx::query_as(&sql).fetch_all(&self.pool).await,
        )
    }

    async fn count_rollouts(&self) -> StoreResult<Vec<(RolloutState, u64)>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM rollouts GROUP BY state")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| before_commit("count_rollouts", e))?;
        rows.into_iter()
            .map(|(state, n)| {
                let s = RolloutState::parse(&state)
                    .ok_or_else(|| corrupt("rollout", format!("state `{state}`")))?;
                Ok((s, u64::try_from(n).unwrap_or(0)))
            })
            .collect()
    }

    async fn get_rollout(&self, id: i64) -> StoreResult<Option<Rollout>> {
        let sql = format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = $1");
        let row = sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await;
        one::<RolloutRow, _>("get_rollout", row)
    }

    async fn rollout_members(&self, id: i64) -> StoreResult<Vec<Member>> {
        let blob: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT members FROM rollout_members WHERE rollout_id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| before_commit("rollout_members", e))?;
        match blob {
            Some(b) => decode_members(&b).map_err(|e| corrupt("rollout members", e)),
            None => Ok(Vec::new()),
        }
    }

    async fn update_rollout(
        &self,
        rollout: &Rollout,
        fence: Option<&Fence>,
        events: &[RolloutEvent],
        finish: Option<Finish>,
    ) -> StoreResult<bool> {
        let body = to_json("update_rollout", rollout)?;
        let events = encode_events("update_rollout", events)?;
        let finish = match finish {
            Some(Finish::Config(a)) => {
                Some(Finishing::Config(to_json("update_rollout", &a.target)?, a))
            }
            Some(Finish::Package(p)) => {
                let created_ms = p.created_ms;
                Some(Finishing::Package(package_assignment_body(p)?, created_ms))
            }
            None => None,
        };
        let (id, rev, state) = (rollout.id, rollout.rev, rollout.state.as_str());
        let fence = fence.cloned();
        let json = D::JSON;
        let update = format!(
            "UPDATE rollouts SET state = $1, rev = $2, body = $3{json} WHERE id = $4 AND rev = $5"
        );
        let assign = format!(
            "INSERT INTO assignments (config_id, target, author, created_ms) \
             VALUES ($1, $2{json}, $3, $4)"
        );
        let assign_package =
            format!("INSERT INTO package_assignments (body, created_ms) VALUES ($1{json}, $2)");
        self.in_tx("update_rollout", move |tx| {
            Box::pin(async move {
                if !fence_holds::<D>(tx, fence.as_ref()).await? {
                    return Ok(false);
                }
                let done = sqlx::query(&update)
                    .bind(state)
                    .bind(rev)
                    .bind(body.as_str())
                    .bind(id)
                    .bind(rev - 1)
                    .execute(&mut **tx)
                    .await?;
                if D::rows_affected(&done) == 0 {
                    return Ok(false);
                }
                insert_events::<D>(tx, id, &events).await?;
                match &finish {
                    Some(Finishing::Config(target, a)) => {
                        sqlx::query(&assign)
                            .bind(a.config_id)
                            .bind(target.as_str())
                            .bind(a.author.as_str())
                            .bind(a.created_ms)
                            .execute(&mut **tx)
                            .await?;
                    }
                    Some(Finishing::Package(body, created_ms)) => {
                        sqlx::query(&assign_package)
                            .bind(body.as_str())
                            .bind(*created_ms)
                            .execute(&mut **tx)
                            .await?;
                    }
                    None => {}
                }
                Ok(true)
            })
        })
        .await
    }

    async fn rollout_events(&self, id: i64) -> StoreResult<Vec<RolloutEvent>> {
        let sql =
            format!("SELECT {EVENT_COLUMNS} FROM rollout_events WHERE rollout_id = $1 ORDER BY id");
        let rows = sqlx::query_as(&sql).bind(id).fetch_all(&self.pool).await;
        all::<EventRow, _>("rollout_events", rows)
    }
}

/// Whether `fence`'s partition lease is still its writer's and unexpired (true without one).
pub(super) async fn fence_holds<D>(tx: &mut Tx<D>, fence: Option<&Fence>) -> SqlResult<bool>
where
    D: Dialect,
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    for<'q> <D::Db as Database>::Arguments<'q>: IntoArguments<'q, D::Db>,
    i64: Type<D::Db> + for<'q> Encode<'q, D::Db> + for<'r> Decode<'r, D::Db>,
    str: Type<D::Db>,
    for<'q> &'q str: Encode<'q, D::Db>,
    usize: ColumnIndex<<D::Db as Database>::Row>,
{
    let Some(f) = fence else { return Ok(true) };
    let held: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM partition_leases \
         WHERE partition = $1 AND holder = $2 AND fence = $3 AND expires_ms > $4",
    )
    .bind(i64::from(f.partition))
    .bind(f.node.as_str())
    .bind(f.fence)
    .bind(f.now_ms)
    .fetch_one(&mut **tx)
    .await?;
    Ok(held > 0)
}

/// A [`Finish`] encoded for its insert: a config assignment's target, or a package
/// assignment's body with its creation time.
enum Finishing {
    Config(String, NewAssignment),
    Package(String, i64),
}

/// Appends `events` to rollout `id`'s history, in order.
async fn insert_events<D>(tx: &mut Tx<D>, id: i64, events: &[EncodedEvent]) -> SqlResult<()>
where
    D: Dialect,
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    for<'q> <D::Db as Database>::Arguments<'q>: IntoArguments<'q, D::Db>,
    i64: Type<D::Db> + for<'q> Encode<'q, D::Db>,
    str: Type<D::Db>,
    for<'q> &'q str: Encode<'q, D::Db>,
    for<'q> Option<i64>: Encode<'q, D::Db>,
{
    let sql = format!(
        "INSERT INTO rollout_events (rollout_id, at_ms, kind, actor, stage, detail) \
         VALUES ($1, $2, $3, $4, $5, $6{})",
        D::JSON
    );
    for (e, detail) in events {
        sqlx::query(&sql)
            .bind(id)
            .bind(e.at_ms)
            .bind(e.kind.as_str())
            .bind(e.actor.as_str())
            .bind(e.stage.and_then(|s| i64::try_from(s).ok()))
            .bind(detail.as_str())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}
