//! Store implementations owned by the coordinator.
//!
//! - [`sqlite`]: the embedded store (`ampora serve`), one SQLite file in the data directory;
//! - [`conformance`]: the behaviour every [`shared::store::Store`] must show, run by each
//!   implementation's tests (and reusable by integration tests and future stores).

pub mod conformance;
pub mod sqlite;

pub use sqlite::SqliteStore;
