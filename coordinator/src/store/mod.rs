//! Store implementations owned by the coordinator.
//!
//! - [`sqlite`]: the embedded store (`ampora serve`), one SQLite file in the data directory;
//! - [`postgres`]: the cluster store, shared by every coordinator;
//! - [`conformance`]: the behaviour every [`shared::store::Store`] must show, run by each
//!   implementation's tests (and reusable by integration tests and future stores).
//!
//! Both SQL stores classify errors and decode rows through one private module (`sql`), so
//! they cannot drift apart on what an error means or how a token is redeemed.

pub mod conformance;
pub mod postgres;
mod sql;
pub mod sqlite;
pub mod timed;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;
