//! The coordinator: owns agent state, configs, tokens and audit (through the Store seam), runs
//! the sans-I/O OpAMP session core for the agents of the partitions it serves, and serves the
//! REST API. `ampora serve` ([`serve`]) runs it together with a gateway in one process;
//! [`cluster`] runs the gateway and coordinator roles as separate processes.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod console;
pub mod node_config;
pub mod serve;
pub mod service;
pub mod session;
pub mod store;
