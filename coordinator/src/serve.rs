//! `ampora serve`: the embedded default. Gateway and coordinator in one process, SQLite instead
//! of Postgres, the in-process bus instead of NATS, in-memory ownership instead of Redis: the
//! same code above the seams as cluster mode.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agent::{Agent, AgentOptions, ClientTls, Endpoint};
use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use gateway::tls::{AgentCa, AgentListener, AgentTrust, LocalCa, ServerTls};
use gateway::Gateway;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use shared::bus::{Bus, InProcessBus};
use shared::domain::{ApiTokenRecord, Role};
use shared::ids::{GatewayId, InstanceUid};
use shared::ownership::MemoryOwnership;
use shared::store::Store;
use shared::{now_ms, token};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::service::{packages, Coordinator, CoordinatorConfig};
use crate::store::timed::TimedStore;
use crate::store::SqliteStore;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The process-wide Prometheus recorder. Installed once; every server in the process (tests
/// start several) renders the same registry.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = with_latency_buckets(PrometheusBuilder::new()).build_recorder();
            let handle = recorder.handle();
            spawn_upkeep(handle.clone());
            // Fails only if another recorder was installed first, in which case ours just
            // renders nothing; there is no other recorder in Ampora.
            let _ = metrics::set_global_recorder(recorder);
            gateway::server::describe_metrics();
            gateway::tls::describe_metrics();
            crate::api::describe_metrics();
            describe_metrics();
            handle
        })
        .clone()
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The recorder keeps every histogram sample until upkeep folds it into the buckets. A scrape
/// does that too, but an Ampora nobody scrapes (a laptop, a load test) would otherwise grow by
/// every latency it records: 43 MB in a 15-minute soak.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "no metrics upkeep thread: histograms grow until scraped");
    }
}

/// Latency buckets in seconds: from half a millisecond (an in-process bus hop, a small SQLite
/// read) past 10 s (the gateway's default bus request timeout) to 30 s (a long audit export).
const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every latency histogram of Ampora, rendered as a Prometheus histogram (`_bucket` series, so
/// quantiles can be aggregated across nodes) instead of the exporter's default summary.
pub const LATENCY_HISTOGRAMS: [&str; 4] = [
    crate::store::timed::QUERY_DURATION,
    gateway::server::BUS_REQUEST_DURATION,
    crate::api::REQUEST_DURATION,
    gateway::server::OPAMP_MESSAGE_DURATION,
];

fn with_latency_buckets(mut builder: PrometheusBuilder) -> PrometheusBuilder {
    for name in LATENCY_HISTOGRAMS {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_owned()), &LATENCY_BUCKETS)
            // Only an empty bucket list is refused.
            .expect("latency buckets are not empty");
    }
    builder
        .set_buckets_for_metric(
            Matcher::Full(packages::TIME_TO_VERIFIED.to_owned()),
            &packages::TIME_TO_VERIFIED_BUCKETS,
        )
        .expect("upgrade buckets are not empty")
}

fn describe_metrics() {
    metrics::describe_gauge!("ampora_agents_connected", "Agents currently connected");
    metrics::describe_gauge!(
        "ampora_agents_config_state",
        "Agents by config state (none, pending, applied, failed, drifted)"
    );
    metrics::describe_counter!(
        "ampora_config_remote_status_total",
        "Remote config status reports by status (applied, failed)"
    );
    metrics::describe_counter!(
        "ampora_tokens_redeemed_total",
        "Bootstrap tokens redeemed by their first agent"
    );
    metrics::describe_counter!(
        "ampora_coordinator_token_cache_misses_total",
        "Bootstrap tokens not in the coordinator's cache, looked up in the store"
    );
    metrics::describe_counter!(
        "ampora_auth_failures_total",
        "Agent authentications refused, by reason (the audited reason code)"
    );
    metrics::describe_gauge!(
        "ampora_coordinator_partitions",
        "Agent partitions this coordinator holds a lease on"
    );
    metrics::describe_gauge!(
        "ampora_cluster_partitions",
        "Agent partitions in all: each needs one coordinator holding it"
    );
    metrics::gauge!("ampora_cluster_partitions").set(f64::from(shared::ids::PARTITIONS));
    crate::store::timed::describe_metrics();
    crate::service::rollouts::describe_metrics();
    crate::service::packages::describe_metrics();
    crate::service::preflight::describe_metrics();
    crate::service::restarts::describe_metrics();
    crate::service::own_telemetry::describe_metrics();
    metrics::describe_counter!(
        "ampora_push_answers_overdue_total",
        "Bulk config offers no agent answered within 5 s (their place in the push window freed)"
    );
    metrics::describe_gauge!(
        "ampora_push_queue_jobs",
        "Bulk config pushes waiting for the delivery task"
    );
    metrics::describe_counter!(
        "ampora_store_agent_writes_total",
        "Agent records written to the store in batches"
    );
    for s in ["applied", "failed"] {
        metrics::counter!("ampora_config_remote_status_total", "status" => s).increment(0);
    }
    metrics::gauge!("ampora_agents_connected").set(0.0);
}

/// Binds `addr` (HOST:PORT) for agents: see [`gateway::server::listen`].
pub fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    gateway::server::listen(addr)
}

/// A running embedded server.
pub struct Running {
    pub addr: SocketAddr,
    /// The admin API token, when this process knows it (it was created now, or read back from
    /// the data directory).
    pub admin_token: Option<String>,
    pub admin_token_path: PathBuf,
    /// The local CA's certificate, which agents must trust, when no certificate is configured
    /// (`<data_dir>/tls/ca.pem`); `None` when serving the configured files.
    pub tls_ca_cert: Option<PathBuf>,
    pub coordinator: Arc<Coordinator>,
    pub gateway: Arc<Gateway>,
    self_agent: Option<Agent>,
    stop: oneshot::Sender<()>,
    server: JoinHandle<std::io::Result<()>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct AppState {
    coordinator: Arc<Coordinator>,
    metrics: PrometheusHandle,
}

/// Starts everything on `listener` and returns once the server accepts connections.
pub async fn start(config: Config, listener: TcpListener) -> anyhow::Result<Running> {
    let metrics = metrics_handle();
    let addr = listener.local_addr()?;
    let data_dir = config.server.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    // Keys, tokens and the database live here: the owner's only.
    restrict(&data_dir, 0o700)?;
    // First, so a certificate problem stops the start before anything runs.
    let mut tls = server_tls(&config, &data_dir, addr)?;
    // Agent identities: the configured agent CA, else the local CA (its key is right here).
    let (agent_ca, trust) = match (
        crate::node_config::coordinator_agent_ca(&config)?,
        &tls.local_ca,
    ) {
        (Some(ca), _) => (Some(ca), crate::node_config::gateway_agent_trust(&config)?),
        (None, Some(local)) => (
            Some(Arc::new(
                AgentCa::from_files(&local.ca_cert_path, &local.ca_key_path)
                    .context("loading the local CA as agent CA")?,
            )),
            Some(AgentTrust::from_ca_file(&local.ca_cert_path)?),
        ),
        (None, None) => (None, None),
    };
    if let Some(trust) = &trust {
        tls.server = tls.server.clone().with_agent_trust(trust)?;
    }
    let store = TimedStore::wrap(Arc::new(
        SqliteStore::open(&data_dir.join("ampora.db"))
            .await
            .context("opening the embedded database")?,
    ));
    for file in ["ampora.db", "ampora.db-wal", "ampora.db-shm"] {
        let path = data_dir.join(file);
        if path.exists() {
            restrict(&path, 0o600)?;
        }
    }
    let bus: Arc<dyn Bus> = Arc::new(InProcessBus::new());
    let ownership = Arc::new(MemoryOwnership::new());

    let packages = package_hosting(&config, &data_dir, addr)?;
    let metrics_key = crate::node_config::embedded_metrics_key(&config, &data_dir)?;
    let coordinator = Coordinator::start(
        store.clone(),
        store.clone(),
        bus.clone(),
        ownership.clone(),
        CoordinatorConfig {
            opamp_endpoint: config.public_endpoint(addr),
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
            // One coordinator, always the same name: a restart renews its own leases.
            node: "embedded".into(),
            lease_ttl: Duration::from_millis(config.cluster.lease_ttl_ms),
            agent_ca,
            identity_validity: crate::node_config::identity_validity(&config),
            refusal_window: Duration::from_secs(config.audit.refusal_window_secs),
            push_window: usize::try_from(config.opamp.push_window).unwrap_or(usize::MAX),
            packages: packages.clone(),
            metrics_host: Some(crate::service::own_telemetry::MetricsHost {
                endpoint: crate::node_config::metrics_endpoint(&config.public_endpoint(addr)),
                key: metrics_key.clone(),
            }),
        },
    )
    .await
    .context("starting the coordinator")?;

    let gateway_id = GatewayId(format!("embedded-{}", uuid::Uuid::now_v7().simple()));
    let mut gw_config = crate::node_config::gateway_config(&config);
    gw_config.identity = trust;
    gw_config.own_metrics_key = Some(metrics_key);
    gw_config.downloads = packages.map(|p| gateway::server::downloads::Downloads {
        dir: p.dir,
        key: p.key,
        fetch_missing: false,
        cache_max_bytes: u64::MAX,
        max_in_flight: usize::try_from(config.packages.max_downloads_per_gateway)
            .unwrap_or(usize::MAX),
    });
    let proxy_secret = crate::node_config::gateway_proxy_secret(&config)?;
    gw_config.proxy_secret = proxy_secret.clone();
    let gateway = Gateway::start(gateway_id, bus.clone(), ownership, gw_config).await?;

    let (admin_token, admin_token_path) = ensure_admin_token(&*store, &data_dir).await?;
    let limits = crate::node_config::connection_limits(&config);
    let listener = AgentListener::with_limits(listener, Some(tls.server.clone()), &limits)?;

    let app = Router::new()
        .merge(gateway.router())
        .merge(crate::api::router(
            coordinator.clone(),
            &config,
            proxy_secret,
            crate::console::router(),
        ))
        .merge(health_router(coordinator.clone(), metrics));
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(gateway::serve::serve(listener, app, limits, async move {
        let _ = stopped.await;
    }));

    let self_agent = if config.self_agent.enabled {
        Some(start_self_agent(&coordinator, &data_dir, addr, &tls).await?)
    } else {
        None
    };

    Ok(Running {
        addr,
        admin_token,
        admin_token_path,
        tls_ca_cert: tls.ca_cert,
        coordinator,
        gateway,
        self_agent,
        stop,
        server,
    })
}

/// Package hosting of the embedded default: blobs under `<data_dir>/packages`, served by its
/// own gateway at the public endpoint's host, with a download key made for this process
/// (tokens in offers made before a restart stop working; agents are offered new ones).
fn package_hosting(
    config: &Config,
    data_dir: &std::path::Path,
    addr: SocketAddr,
) -> anyhow::Result<Option<crate::service::packages::PackageHosting>> {
    let dir = data_dir.join("packages");
    // Imports cut short by a crash leave their temporary files; nothing refers to them.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".import-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let base = crate::node_config::download_base(&config.public_endpoint(addr));
    crate::node_config::package_hosting(
        config,
        dir,
        &base,
        shared::download_token::DownloadKey::random(),
        false,
    )
    .map(Some)
}

impl Running {
    /// Ordered shutdown: the Self-Agent says goodbye, the gateway closes its agents, the
    /// listener stops, and changed agent state is flushed.
    pub async fn stop(self) -> anyhow::Result<()> {
        if let Some(a) = self.self_agent {
            a.stop().await;
        }
        self.gateway.shutdown().await;
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(10), self.server).await {
            Ok(joined) => joined??,
            Err(_) => tracing::warn!("listener did not stop within 10 s"),
        }
        self.coordinator.shutdown().await;
        Ok(())
    }
}

/// Where a browser on this machine reaches a listener bound to `addr` (an unspecified address
/// is reachable on loopback).
fn console_host(addr: std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// Runs until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let running = start(config, listener).await?;
    if let Some(ca) = &running.tls_ca_cert {
        println!("agents must trust the CA at {}", ca.display());
    }
    // Printed only once everything is up: scripts wait for this line.
    println!("ampora {VERSION} listening on {}", running.addr);
    println!(
        "console: http://{}/ui/ (sign in with the API token in {})",
        console_host(running.addr),
        running.admin_token_path.display()
    );
    tracing::info!(addr = %running.addr, version = VERSION, "ampora is serving (embedded mode)");
    shutdown.await;
    tracing::info!("shutting down");
    running.stop().await
}

/// `/health/live`, `/health/ready` (the store answers) and `/metrics` of a coordinator.
pub(crate) fn health_router(coordinator: Arc<Coordinator>, metrics: PrometheusHandle) -> Router {
    let state = AppState {
        coordinator,
        metrics,
    };
    Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .route(
            "/metrics",
            get(|State(s): State<AppState>| render(s.metrics)),
        )
        .with_state(state)
}

async fn ready(State(s): State<AppState>) -> impl IntoResponse {
    if s.coordinator.ready().await {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
    }
}

/// The Prometheus text exposition of this process's metrics.
pub(crate) async fn render(metrics: PrometheusHandle) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        metrics.render(),
    )
}

/// Sets the permission bits of `path` (owner-only modes; a no-op off Unix).
fn restrict(path: &Path, mode: u32) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// Writes `contents` to `path` readable by the owner only.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// On first start, creates the admin API token and writes it to `<data_dir>/admin-token`.
pub(crate) async fn ensure_admin_token(
    store: &dyn Store,
    data_dir: &Path,
) -> anyhow::Result<(Option<String>, PathBuf)> {
    let path = data_dir.join("admin-token");
    if store.count_api_tokens().await? > 0 {
        let known = std::fs::read_to_string(&path)
            .ok()
            .map(|t| t.trim().to_string());
        return Ok((known, path));
    }
    let text = token::new_api_token();
    store
        .create_api_token(&ApiTokenRecord {
            id: uuid::Uuid::now_v7().simple().to_string(),
            name: "admin".into(),
            role: Role::Admin,
            hash: token::hash_token(&text),
            created_ms: now_ms(),
        })
        .await?;
    write_private(&path, &format!("{text}\n"))?;
    println!("admin API token written to {}", path.display());
    Ok((Some(text), path))
}

/// The agent listener's TLS side, and where its CA certificate is when it is the local CA.
struct AgentTls {
    server: ServerTls,
    ca_cert: Option<PathBuf>,
    /// The local CA, when the listener serves its certificate.
    local_ca: Option<LocalCa>,
}

/// TLS from the configured files, else from the local CA in `<data_dir>/tls/`, created on
/// first start (its server certificate renewed before it expires, also while running).
fn server_tls(config: &Config, data_dir: &Path, bound: SocketAddr) -> anyhow::Result<AgentTls> {
    let every = Duration::from_secs(config.tls.reload_interval_secs);
    if let Some((cert, key)) = config.tls.files() {
        let server =
            ServerTls::from_files(cert, key, every).context("loading the TLS certificate")?;
        return Ok(AgentTls {
            server,
            ca_cert: None,
            local_ca: None,
        });
    }
    let mut names = LocalCa::default_names(&host_name());
    // The Self-Agent connects to the listen address, and agents to the public endpoint.
    let listen_ip = bound.ip();
    let extra = [
        (!listen_ip.is_unspecified() && !listen_ip.is_loopback()).then(|| listen_ip.to_string()),
        Endpoint::parse(&config.server.public_endpoint)
            .ok()
            .map(|ep| ep.host),
    ];
    for name in extra.into_iter().flatten() {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let ca = LocalCa::new(&data_dir.join("tls"), names);
    ca.ensure().context("creating the local TLS CA")?;
    let server =
        ServerTls::from_local_ca(&ca, every).context("loading the local TLS certificate")?;
    Ok(AgentTls {
        server,
        ca_cert: Some(ca.ca_cert_path.clone()),
        local_ca: Some(ca),
    })
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The Self-Agent: an ordinary OpAMP agent in this process that goes through the network path
/// like any other. Its identity and (bound) bootstrap token live in the data directory so it
/// stays the same agent across restarts.
async fn start_self_agent(
    coordinator: &Coordinator,
    data_dir: &Path,
    addr: SocketAddr,
    tls: &AgentTls,
) -> anyhow::Result<Agent> {
    let uid_path = data_dir.join("self-agent-uid");
    let uid = match std::fs::read_to_string(&uid_path)
        .ok()
        .and_then(|s| s.trim().parse::<InstanceUid>().ok())
    {
        Some(u) => u,
        None => {
            let u = InstanceUid::new_v7();
            write_private(&uid_path, &format!("{u}\n"))?;
            u
        }
    };
    let token_path = data_dir.join("self-agent-token");
    let token = match std::fs::read_to_string(&token_path) {
        Ok(t) => t.trim().to_string(),
        Err(_) => {
            let (t, _) = coordinator
                .create_token(
                    "self-agent".into(),
                    Some(Duration::from_secs(100 * 365 * 24 * 3600)),
                    "system",
                )
                .await?;
            write_private(&token_path, &format!("{t}\n"))?;
            t
        }
    };
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    // Over TLS like any agent should (bootstrap tokens may be refused over plaintext): trusting
    // the local CA as external agents do, or, with an operator's certificate (which rarely
    // names a loopback address), exactly the certificate this server presents.
    let client_tls = match &tls.ca_cert {
        Some(ca) => ClientTls::from_ca_file(ca)?,
        None => ClientTls::from_config(tls.server.pinned_client_config()?),
    };
    Ok(Agent::start(AgentOptions {
        endpoint: format!("wss://{target}/v1/opamp"),
        tls: Some(client_tls),
        token: Some(token),
        instance_uid: Some(uid.0),
        description: vec![
            ("service.name".into(), "ampora-self-agent".into()),
            ("service.version".into(), VERSION.into()),
        ],
        non_identifying: vec![
            ("host.name".into(), host_name()),
            ("os.type".into(), std::env::consts::OS.into()),
            ("ampora.self_agent".into(), "true".into()),
        ],
        ..AgentOptions::default()
    }))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    fn thread_names() -> Vec<String> {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return Vec::new();
        };
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_owned())
            .collect()
    }

    #[test]
    fn the_recorder_has_an_upkeep_thread() {
        let _handle = super::metrics_handle();
        // A new thread shows its parent's name until it has run far enough to name itself.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let names = thread_names();
            if names.iter().any(|n| n == "metrics-upkeep") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no metrics-upkeep thread among {names:?}"
            );
            std::thread::yield_now();
        }
    }
}
