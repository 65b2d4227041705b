//! Store implementations owned by the coordinator.
//!
//! One SQL layer serves both backends: [`SqlStore`] implements [`shared::store::Store`] once,
//! for any `Dialect`; each backend module implements only what differs.
//!
//! - `sql_store`: [`SqlStore`], every query written once, the one transaction path and the
//!   error mapping;
//! - `dialect`: the `Dialect` trait, the one list of what differs between the backends;
//! - `sql_rollouts`: groups and rollouts ([`shared::store::RolloutStore`]), for any dialect;
//! - `sql_packages`: package artifacts and assignments ([`shared::store::PackageStore`]);
//! - `sql`: what every query shares (error classification, row types and conversions,
//!   column lists, the redemption and batch-order rules);
//! - [`sqlite`]: the embedded store (`ampora serve`), one SQLite file in the data directory:
//!   [`SqliteStore`] = `SqlStore<SqliteDialect>`;
//! - [`postgres`]: the cluster store, shared by every coordinator: [`PgStore`] =
//!   `SqlStore<PgDialect>`, and the test-database helpers;
//! - [`timed`]: [`timed::TimedStore`], any store with each call timed
//!   (`ampora_store_query_duration_seconds`), as both modes run it;
//! - [`conformance`]: the behaviour every [`shared::store::Store`] must show, run by each
//!   backend's tests (and reusable by integration tests and future stores).

pub mod conformance;
mod dialect;
pub mod postgres;
mod sql;
mod sql_components;
mod sql_packages;
mod sql_restarts;
mod sql_rollouts;
mod sql_store;
mod sql_telemetry;
pub mod sqlite;
#[cfg(test)]
mod testing;
pub mod timed;

pub use postgres::{PgDialect, PgStore};
pub use sql_store::SqlStore;
pub use sqlite::{SqliteDialect, SqliteStore};
