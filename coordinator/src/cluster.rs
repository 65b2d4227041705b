//! Cluster mode: `ampora gateway` and `ampora coordinator`, any number of each.
//!
//! The same [`Gateway`] and [`Coordinator`] as the embedded default, on the production side of
//! the seams: NATS for the bus, Redis for agent ownership, Postgres for the store. A gateway
//! never opens a database connection; a coordinator never holds an agent's socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use gateway::tls::{AgentListener, ServerTls};
use gateway::Gateway;
use shared::bus::nats::{NatsBus, NatsBusOptions};
use shared::bus::Bus;
use shared::ids::GatewayId;
use shared::ownership::redis::RedisOwnership;
use shared::ownership::Ownership;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::node_config::{
    connection_limits, coordinator_agent_ca, gateway_agent_trust, gateway_config,
    gateway_proxy_secret, identity_validity,
};
use crate::serve::{self, metrics_handle, VERSION};
use crate::service::{Coordinator, CoordinatorConfig};
use crate::store::timed::TimedStore;
use crate::store::PgStore;

/// This node's id: the configured one, else the host name with a random suffix (two
/// processes on one host must never share an id: gateway ids address deliveries).
pub fn node_id(config: &Config, role: &str) -> String {
    if !config.cluster.node_id.is_empty() {
        return config.cluster.node_id.clone();
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{role}-{host}-{}", &suffix[..8])
}

async fn connect_bus(config: &Config, node: &str) -> anyhow::Result<Arc<dyn Bus>> {
    let opts = NatsBusOptions {
        url: config.cluster.nats_url.clone(),
        subject_prefix: config.cluster.subject_prefix.clone(),
        node: node.to_string(),
        request_timeout: Duration::from_secs(config.opamp.request_timeout_secs),
        max_message_bytes: usize::try_from(config.cluster.max_bus_message_bytes)
            .unwrap_or(usize::MAX),
        ..NatsBusOptions::new(config.cluster.nats_url.clone())
    };
    let bus = NatsBus::connect(opts).await.with_context(|| {
        format!(
            "connecting to NATS at {}",
            redact_url(&config.cluster.nats_url)
        )
    })?;
    Ok(Arc::new(bus))
}

async fn connect_ownership(config: &Config) -> anyhow::Result<Arc<dyn Ownership>> {
    let own = RedisOwnership::connect(
        &config.cluster.redis_url,
        &config.cluster.redis_key_prefix,
        Duration::from_secs(config.cluster.ownership_ttl_secs),
    )
    .await
    .with_context(|| {
        format!(
            "connecting to Redis at {}",
            redact_url(&config.cluster.redis_url)
        )
    })?;
    Ok(Arc::new(own))
}

/// A running node's HTTP server, stopped through `stop`.
struct Server {
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Serves `app` on `listener` (a TCP listener is plaintext only) within `limits`.
    fn spawn(
        listener: impl Into<AgentListener>,
        app: Router,
        limits: gateway::serve::ConnectionLimits,
    ) -> Self {
        let listener = listener.into();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway::serve::serve(listener, app, limits, async move {
            let _ = stopped.await;
        }));
        Self { stop, task }
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(10), self.task).await {
            Ok(joined) => joined??,
            Err(_) => tracing::warn!("listener did not stop within 10 s"),
        }
        Ok(())
    }
}

/// A running gateway node.
pub struct GatewayNode {
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    drain_window: Duration,
    server: Server,
}

impl std::fmt::Debug for GatewayNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayNode")
            .field("addr", &self.addr)
            .field("id", self.gateway.id())
            .finish_non_exhaustive()
    }
}

/// Starts a gateway on `listener`: `/v1/opamp`, `/health/live`, `/health/ready` (fails while
/// draining), `/metrics`. With `[tls]` files it serves TLS and plaintext on the one port;
/// without, plaintext only (a gateway behind a TLS-terminating proxy).
pub async fn start_gateway(config: &Config, listener: TcpListener) -> anyhow::Result<GatewayNode> {
    let metrics = metrics_handle();
    let addr = listener.local_addr()?;
    let tls = match config.tls.files() {
        Some((cert, key)) => Some(
            ServerTls::from_files(
                cert,
                key,
                Duration::from_secs(config.tls.reload_interval_secs),
            )
            .context("loading the TLS certificate")?,
        ),
        None => None,
    };
    let trust = gateway_agent_trust(config)?;
    let tls = match (tls, &trust) {
        (Some(tls), Some(trust)) => Some(tls.with_agent_trust(trust)?),
        (tls, _) => tls,
    };
    let limits = connection_limits(config);
    let listener = AgentListener::with_limits(listener, tls, &limits)?;
    let node = node_id(config, "gateway");
    let bus = connect_bus(config, &node).await?;
    let ownership = connect_ownership(config).await?;
    let mut gw_config = gateway_config(config);
    gw_config.identity = trust;
    gw_config.proxy_secret = gateway_proxy_secret(config)?;
    gw_config.downloads = crate::node_config::gateway_downloads(config)?;
    gw_config.own_metrics_key = crate::node_config::download_key(config)?;
    let gateway = Gateway::start(GatewayId(node), bus, ownership, gw_config).await?;
    let health = Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(gateway_ready))
        .with_state(gateway.clone())
        .route("/metrics", get(move || serve::render(metrics.clone())));
    let app = Router::new().merge(gateway.router()).merge(health);
    Ok(GatewayNode {
        addr,
        gateway,
        drain_window: Duration::from_secs(config.cluster.drain_window_secs),
        server: Server::spawn(listener, app, limits),
    })
}

async fn gateway_ready(State(g): State<Arc<Gateway>>) -> impl IntoResponse {
    if g.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if g.is_bus_lost() {
        (StatusCode::SERVICE_UNAVAILABLE, "bus unreachable")
    } else {
        (StatusCode::OK, "ready")
    }
}

impl GatewayNode {
    /// Graceful stop: not ready, no new agents, open agents closed over the drain window
    /// (ownership released, coordinators told), then the listener stops.
    pub async fn stop(self) -> anyhow::Result<()> {
        let window = self.drain_window;
        self.stop_within(window).await
    }

    pub async fn stop_within(self, drain_window: Duration) -> anyhow::Result<()> {
        self.gateway.drain(drain_window).await;
        self.server.stop().await
    }
}

/// A running coordinator node.
pub struct CoordinatorNode {
    pub addr: SocketAddr,
    pub node: String,
    pub coordinator: Arc<Coordinator>,
    pub admin_token: Option<String>,
    pub admin_token_path: PathBuf,
    server: Server,
}

impl std::fmt::Debug for CoordinatorNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorNode")
            .field("addr", &self.addr)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// A cluster coordinator's package hosting, on when `packages.download_key_file` is set:
/// imports pass through `<data_dir>/package-imports` into Postgres, and agents download
/// from `packages.download_url` (else the offered OpAMP endpoint's host), the gateways.
fn cluster_hosting(
    config: &Config,
) -> anyhow::Result<Option<crate::service::packages::PackageHosting>> {
    let Some(key) = crate::node_config::download_key(config)? else {
        return Ok(None);
    };
    let base = if config.packages.download_url.is_empty() {
        crate::node_config::download_base(&config.server.public_endpoint)
    } else {
        format!(
            "{}{}",
            config.packages.download_url.trim_end_matches('/'),
            gateway::server::downloads::DOWNLOAD_PATH
        )
    };
    let dir = config.server.data_dir.join("package-imports");
    crate::node_config::package_hosting(config, dir, &base, key, true).map(Some)
}

/// Starts a coordinator on `listener`: the REST API, `/health/live`, `/health/ready`,
/// `/metrics`. Returns once it holds its share of the partitions.
pub async fn start_coordinator(
    config: &Config,
    listener: TcpListener,
) -> anyhow::Result<CoordinatorNode> {
    let agent_ca = coordinator_agent_ca(config)?;
    check_offered_endpoint(&config.server.public_endpoint, agent_ca.is_some())?;
    // The API believes a proxy's forwarding headers by the gateways' rule.
    let proxy_secret = gateway_proxy_secret(config)?;
    let metrics = metrics_handle();
    let addr = listener.local_addr()?;
    let node = node_id(config, "coordinator");
    let store = TimedStore::wrap(Arc::new(
        PgStore::connect(
            &config.cluster.postgres_url,
            u32::try_from(config.cluster.postgres_max_connections).unwrap_or(16),
        )
        .await
        .context("connecting to Postgres")?,
    ));
    // Two connections for lease rounds alone: under load the main pool is busy with agent
    // writes, and a round that waits for a connection lets the leases lapse.
    let lease_store = TimedStore::wrap(Arc::new(
        PgStore::connect_lazy(&config.cluster.postgres_url, 2)
            .context("connecting to Postgres for leases")?,
    ));
    let bus = connect_bus(config, &node).await?;
    let ownership = connect_ownership(config).await?;
    let coordinator = Coordinator::start(
        store.clone(),
        lease_store,
        bus,
        ownership,
        CoordinatorConfig {
            opamp_endpoint: config.server.public_endpoint.clone(),
            heartbeat_interval_secs: config.opamp.heartbeat_interval_secs,
            custom_capabilities: config.opamp.custom_capabilities.clone(),
            collector_validate: (!config.preflight.collector_binary.as_os_str().is_empty()).then(
                || {
                    (
                        config.preflight.collector_binary.clone(),
                        std::time::Duration::from_secs(config.preflight.validate_timeout_secs),
                    )
                },
            ),
            flush_interval: Duration::from_millis(config.store.flush_interval_ms),
            default_token_ttl: Duration::from_secs(config.tokens.default_ttl_secs),
            node: node.clone(),
            lease_ttl: Duration::from_millis(config.cluster.lease_ttl_ms),
            agent_ca,
            identity_validity: identity_validity(config),
            refusal_window: Duration::from_secs(config.audit.refusal_window_secs),
            push_window: usize::try_from(config.opamp.push_window).unwrap_or(usize::MAX),
            packages: cluster_hosting(config)?,
            metrics_host: crate::node_config::download_key(config)?.map(|key| {
                crate::service::own_telemetry::MetricsHost {
                    endpoint: crate::node_config::metrics_endpoint(&config.server.public_endpoint),
                    key,
                }
            }),
        },
    )
    .await
    .context("starting the coordinator")?;
    let data_dir = config.server.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let (admin_token, admin_token_path) = serve::ensure_admin_token(&*store, &data_dir).await?;
    let app = Router::new()
        .merge(crate::api::router(
            coordinator.clone(),
            config,
            proxy_secret,
            crate::console::router(),
        ))
        .merge(serve::health_router(coordinator.clone(), metrics));
    Ok(CoordinatorNode {
        addr,
        node,
        coordinator,
        admin_token,
        admin_token_path,
        server: Server::spawn(listener, app, connection_limits(config)),
    })
}

impl CoordinatorNode {
    /// Graceful stop: the listener stops, partitions are handed over (changed agents written
    /// first) and the membership is left, so the other coordinators take over at once.
    pub async fn stop(self) -> anyhow::Result<()> {
        let stopped = self.server.stop().await;
        self.coordinator.shutdown().await;
        stopped
    }
}

/// `ampora gateway`: runs until `shutdown` resolves, then drains.
pub async fn run_gateway(
    config: Config,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let node = start_gateway(&config, listener).await?;
    println!(
        "ampora {VERSION} gateway {} listening on {}",
        node.gateway.id(),
        node.addr
    );
    shutdown.await;
    tracing::info!(window_secs = node.drain_window.as_secs(), "draining");
    node.stop().await
}

/// `ampora coordinator`: runs until `shutdown` resolves, then hands its partitions over.
pub async fn run_coordinator(
    config: Config,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let node = start_coordinator(&config, listener).await?;
    println!(
        "ampora {VERSION} coordinator {} listening on {}",
        node.node, node.addr
    );
    shutdown.await;
    tracing::info!("handing partitions over");
    node.stop().await
}

/// A coordinator offers agents `server.public_endpoint` (in the agent's own transport): it
/// must be set, and when identities are on (certificates are offered with it, and usable
/// only over TLS) it must be a TLS one, since it is never rewritten to a scheme its port may
/// not speak.
pub(crate) fn check_offered_endpoint(endpoint: &str, identities: bool) -> anyhow::Result<()> {
    let scheme = endpoint
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        None => anyhow::bail!(
            "server.public_endpoint must be set on coordinators (e.g. wss://opamp.example.com/v1/opamp): \
             it is the endpoint offered to agents, and an offer may not be empty"
        ),
        Some("ws" | "http") if identities => anyhow::bail!(
            "server.public_endpoint is {endpoint}, but agent identities are on \
             (tls.agent_ca_cert_file / tls.agent_ca_key_file): certificates are offered only \
             with a wss:// or https:// endpoint, so give the TLS endpoint agents reach"
        ),
        Some("ws" | "wss" | "http" | "https") => Ok(()),
        Some(other) => anyhow::bail!(
            "server.public_endpoint has the scheme `{other}`: use ws, wss, http or https"
        ),
    }
}

/// `url` with any password in it replaced, for error messages and logs.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let host_start = rest.find('/').unwrap_or(rest.len());
    match rest[..host_start].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***{}", &rest[at..])
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn coordinators_refuse_an_endpoint_they_could_not_offer() {
        use super::check_offered_endpoint as check;
        assert!(check("", false).is_err(), "empty");
        assert!(check("ws://h:1/v1/opamp", false).is_ok());
        let e = check("ws://h:1/v1/opamp", true).expect_err("plaintext with identities");
        assert!(e.to_string().contains("server.public_endpoint"), "{e}");
        assert!(check("wss://h/v1/opamp", true).is_ok());
        assert!(check("ftp://h", false).is_err());
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("redis://app:s3cret@cache:6379/0"),
            "redis://app:***@cache:6379/0"
        );
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(
            redact_url("postgres://u:p@db/x?sslmode=require"),
            "postgres://u:***@db/x?sslmode=require"
        );
    }
}
