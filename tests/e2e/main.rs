//! The one end-to-end test binary: real listeners on port 0, real WebSockets and HTTP, the
//! Rust test agent and a third-party Python client.

mod admission;
mod api;
mod audit;
mod bad_input;
mod cluster;
mod identity;
mod nginx;
mod opamp;
mod python;
mod tls;
