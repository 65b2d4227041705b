//! `ampora-loadtest`: simulated OpAMP agents, the benchmark scenarios and the baseline
//! server. See BENCHMARKS.md for how to run them and what they measured.

pub mod agent;
pub mod api;
pub mod baseline;
pub mod cluster;
pub mod config;
pub mod console;
pub mod fleet;
pub mod hist;
mod measure;
pub mod options;
pub mod own_metrics;
pub mod preflight;
pub mod procs;
pub mod refused;
pub mod report;
pub mod scenario;
pub mod soak;
pub mod staged;
pub mod stagetimes;
pub mod tls;
pub mod upgrade;
pub mod worker;

pub use options::{Phase, RunOptions};
pub use scenario::{run, Comparison, Report};
