//! The one end-to-end test binary: real listeners on port 0, real WebSockets and HTTP, the
//! Rust test agent and a third-party Python client.

/// Runs `$name(&fleet)` in both modes, with `$tweak` applied to the configuration.
macro_rules! both_modes {
    ($name:ident, $tweak:expr) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn embedded() -> anyhow::Result<()> {
                let fleet = TestServer::start_with($tweak).await?;
                super::$name(&fleet).await?;
                fleet.stop().await
            }

            #[tokio::test]
            async fn cluster() -> anyhow::Result<()> {
                let fleet = tests::cluster::Cluster::start(2, 2, $tweak).await?;
                super::$name(&fleet).await?;
                fleet.stop().await
            }
        }
    };
}

mod admission;
mod api;
mod api_security;
mod audit;
mod bad_input;
mod cli_rollouts;
mod cluster;
mod cluster_identity;
mod cluster_opamp;
mod cluster_packages;
mod components;
mod console;
mod console_rollouts;
mod custom_messages;
mod faults;
mod hostile;
mod hostile_input;
mod identity;
mod nginx;
mod nginx_packages;
mod offers;
mod opamp;
mod own_telemetry;
mod package_profiles;
mod packages;
mod promises;
mod proxy_trust;
mod python;
mod reference_client;
mod refused;
mod restarts;
mod rollouts;
mod security;
mod tls;
mod tokens;
mod upgrade_rollouts;
