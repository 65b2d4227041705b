//! The in-process cluster sandbox: gateways and coordinators on port 0 against the real NATS,
//! Redis and Postgres, each node in its own tokio runtime so that killing one drops every task
//! and socket it owns at once, as a crashed process would.
//!
//! Every sandbox gets its own NATS subject prefix, Redis key prefix and Postgres database, so
//! sandboxes of parallel tests never see each other.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use coordinator::cluster::{self, CoordinatorNode, GatewayNode};
use coordinator::config::Config;
use coordinator::store::postgres::{test_admin_url, TestDatabase};
use shared::ids::InstanceUid;
use tokio::runtime::Runtime;

use crate::{Api, Fleet};

/// One node and the runtime it lives in.
pub struct Node<T> {
    pub addr: SocketAddr,
    pub id: String,
    node: Option<T>,
    rt: Option<Runtime>,
}

impl<T> Node<T> {
    /// Drops the runtime with every task and socket of the node, without any goodbye.
    fn kill(mut self) {
        self.node = None;
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl<T> Drop for Node<T> {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Starts `start` on a fresh runtime and waits for it from the caller's runtime.
async fn spawn_node<T, F, Fut>(start: F) -> anyhow::Result<(Runtime, T)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let node = rt.spawn(start()).await??;
    Ok((rt, node))
}

pub struct Cluster {
    /// The configuration every node starts from (node ids and listeners aside).
    pub base: Config,
    pub gateways: Vec<Option<Node<GatewayNode>>>,
    pub coordinators: Vec<Option<Node<CoordinatorNode>>>,
    admin_token: String,
    api: Api,
    /// Dropped (best effort) even when a test fails half-way.
    db: Option<TestDatabase>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `coordinators` coordinators (one after the other: the first creates the admin
    /// token) and `gateways` gateways, with `tweak` applied to the shared configuration.
    pub async fn start(
        gateways: usize,
        coordinators: usize,
        tweak: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(coordinators > 0, "a cluster needs a coordinator");
        let dir = tempfile::tempdir()?;
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let tag = &tag[..12];
        let db = TestDatabase::create(&test_admin_url())
            .await
            .context("creating the sandbox database (is Postgres running on 127.0.0.1:5432?)")?;
        let mut base = Config::default();
        base.server.data_dir = dir.path().to_path_buf();
        base.server.listen = "127.0.0.1:0".into();
        base.self_agent.enabled = false;
        base.store.flush_interval_ms = 100;
        base.audit.refusal_window_secs = 1;
        base.cluster.subject_prefix = format!("t{tag}");
        base.cluster.redis_key_prefix = format!("t{tag}");
        base.cluster.postgres_url = db.url().to_string();
        base.cluster.postgres_max_connections = 8;
        base.cluster.lease_ttl_ms = 3_000;
        base.cluster.ownership_ttl_secs = 6;
        base.cluster.drain_window_secs = 1;
        // Gateways here are plaintext (as behind a TLS-terminating proxy); explicit, so the
        // tests keep working whatever the default.
        base.opamp.bootstrap_plaintext_allowed = true;
        crate::per_ip_limits_off(&mut base);
        tweak(&mut base);
        // Coordinators offer agents an endpoint, as a balancer's address would be: here the
        // first gateway's, bound before they start.
        let mut first_gateway = None;
        if base.server.public_endpoint.is_empty() {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let scheme = if base.tls.cert_file.as_os_str().is_empty() {
                "ws"
            } else {
                "wss"
            };
            base.server.public_endpoint = format!("{scheme}://{}/v1/opamp", listener.local_addr()?);
            if gateways > 0 {
                first_gateway = Some(listener);
            }
        }

        let mut this = Self {
            base,
            gateways: Vec::new(),
            coordinators: Vec::new(),
            admin_token: String::new(),
            api: Api::new(SocketAddr::from(([127, 0, 0, 1], 0)), String::new()),
            db: Some(db),
            _dir: dir,
        };
        for _ in 0..coordinators {
            this.add_coordinator().await?;
        }
        for _ in 0..gateways {
            this.add_gateway_on(
                first_gateway
                    .take()
                    .map_or_else(|| std::net::TcpListener::bind("127.0.0.1:0"), Ok)?,
            )
            .await?;
        }
        this.settled().await?;
        Ok(this)
    }

    /// Waits until every partition has a live lease and every live coordinator holds some:
    /// the hand-overs a join starts are over.
    pub async fn settled(&self) -> anyhow::Result<()> {
        let live: std::collections::BTreeSet<String> = self
            .coordinators
            .iter()
            .flatten()
            .map(|n| n.id.clone())
            .collect();
        crate::eventually("partition leases settled", crate::DEADLINE, || async {
            let v = self.api.get("/api/v1/cluster").await?;
            let now = shared::now_ms();
            let leases: Vec<(String, i64)> = v["partitions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| {
                    Some((l["holder"].as_str()?.to_string(), l["expires_ms"].as_i64()?))
                })
                .collect();
            let holders: std::collections::BTreeSet<String> =
                leases.iter().map(|(h, _)| h.clone()).collect();
            let all_live = leases.len() == usize::from(shared::ids::PARTITIONS)
                && leases.iter().all(|(_, exp)| *exp > now);
            // ...and each coordinator has finished taking its share (agents loaded, subjects
            // subscribed), not just won the leases.
            let served: Vec<usize> = self
                .coordinators
                .iter()
                .flatten()
                .filter_map(|n| n.node.as_ref())
                .map(|n| n.coordinator.partitions_served())
                .collect();
            let all_served = served.iter().sum::<usize>() == usize::from(shared::ids::PARTITIONS)
                && served.iter().all(|&n| n > 0);
            Ok((all_live && holders == live && all_served).then_some(()))
        })
        .await
    }

    fn node_config(&self, id: &str) -> Config {
        let mut cfg = self.base.clone();
        cfg.cluster.node_id = id.to_string();
        cfg
    }

    /// Starts one more coordinator; returns its index.
    pub async fn add_coordinator(&mut self) -> anyhow::Result<usize> {
        let i = self.coordinators.len();
        let id = format!("coord-{i}");
        let cfg = self.node_config(&id);
        let (rt, node) = spawn_node(|| async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            cluster::start_coordinator(&cfg, listener).await
        })
        .await
        .with_context(|| format!("starting {id} (are NATS, Redis and Postgres running?)"))?;
        if let Some(t) = &node.admin_token {
            self.admin_token = t.clone();
        }
        anyhow::ensure!(
            !self.admin_token.is_empty(),
            "the first coordinator must create the admin token"
        );
        if self.live_coordinator().is_none() {
            self.api = Api::new(node.addr, self.admin_token.clone());
        }
        self.coordinators.push(Some(Node {
            addr: node.addr,
            id,
            node: Some(node),
            rt: Some(rt),
        }));
        Ok(i)
    }

    /// Starts one more gateway; returns its index.
    pub async fn add_gateway(&mut self) -> anyhow::Result<usize> {
        self.add_gateway_on(std::net::TcpListener::bind("127.0.0.1:0")?)
            .await
    }

    /// Starts one more gateway on a listener bound beforehand, so its address can go into the
    /// configuration (`server.public_endpoint`, say) before the cluster starts.
    pub async fn add_gateway_on(
        &mut self,
        listener: std::net::TcpListener,
    ) -> anyhow::Result<usize> {
        let cfg = self.base.clone();
        self.add_gateway_configured(listener, cfg).await
    }

    /// Starts one more gateway with a configuration of its own (`base` with changes, say a
    /// NATS URL through a link the test can cut); returns its index.
    pub async fn add_gateway_with(&mut self, cfg: Config) -> anyhow::Result<usize> {
        self.add_gateway_configured(std::net::TcpListener::bind("127.0.0.1:0")?, cfg)
            .await
    }

    async fn add_gateway_configured(
        &mut self,
        listener: std::net::TcpListener,
        mut cfg: Config,
    ) -> anyhow::Result<usize> {
        let i = self.gateways.len();
        let id = format!("gw-{i}");
        cfg.cluster.node_id = id.clone();
        // Each gateway has a disk of its own, as on separate hosts.
        if cfg.packages.cache_dir.as_os_str().is_empty() {
            cfg.packages.cache_dir = cfg.server.data_dir.join(format!("{id}-package-cache"));
        }
        listener.set_nonblocking(true)?;
        let (rt, node) = spawn_node(|| async move {
            // Registered with the node's own runtime, which owns the socket from then on.
            let listener = tokio::net::TcpListener::from_std(listener)?;
            cluster::start_gateway(&cfg, listener).await
        })
        .await
        .with_context(|| format!("starting {id} (are NATS and Redis running?)"))?;
        self.gateways.push(Some(Node {
            addr: node.addr,
            id,
            node: Some(node),
            rt: Some(rt),
        }));
        Ok(i)
    }

    fn live_coordinator(&self) -> Option<&Node<CoordinatorNode>> {
        self.coordinators.iter().flatten().next()
    }

    /// An API client talking to coordinator `i`.
    pub fn api_of(&self, i: usize) -> anyhow::Result<Api> {
        let n = self.coordinators[i]
            .as_ref()
            .context("coordinator is gone")?;
        Ok(Api::new(n.addr, self.admin_token.clone()))
    }

    pub fn coordinator_addr(&self, i: usize) -> anyhow::Result<SocketAddr> {
        Ok(self.coordinators[i]
            .as_ref()
            .context("coordinator is gone")?
            .addr)
    }

    pub fn gateway_addr(&self, i: usize) -> anyhow::Result<SocketAddr> {
        Ok(self.gateways[i].as_ref().context("gateway is gone")?.addr)
    }

    pub fn ws_url_of(&self, i: usize) -> anyhow::Result<String> {
        Ok(format!("ws://{}/v1/opamp", self.gateway_addr(i)?))
    }

    pub fn http_url_of(&self, i: usize) -> anyhow::Result<String> {
        Ok(format!("http://{}/v1/opamp", self.gateway_addr(i)?))
    }

    /// Gateway `i` over TLS (it serves TLS only with `[tls]` files configured).
    pub fn wss_url_of(&self, i: usize) -> anyhow::Result<String> {
        Ok(format!("wss://{}/v1/opamp", self.gateway_addr(i)?))
    }

    /// Gateway `i` itself (its open connections, …).
    pub fn gateway_of(&self, i: usize) -> anyhow::Result<std::sync::Arc<gateway::Gateway>> {
        self.gateways
            .get(i)
            .and_then(Option::as_ref)
            .and_then(|n| n.node.as_ref())
            .map(|n| n.gateway.clone())
            .with_context(|| format!("gateway {i} is not running"))
    }

    /// Coordinator `i` itself (its token cache, …): per node, unlike the process-wide metrics.
    pub fn coordinator_of(
        &self,
        i: usize,
    ) -> anyhow::Result<std::sync::Arc<coordinator::service::Coordinator>> {
        self.coordinators
            .get(i)
            .and_then(Option::as_ref)
            .and_then(|n| n.node.as_ref())
            .map(|n| n.coordinator.clone())
            .with_context(|| format!("coordinator {i} is not running"))
    }

    /// Freezes coordinator `i` as SIGSTOP freezes a process: a task blocks its runtime's only
    /// worker thread, so none of its tasks, timers or sockets make progress until the returned
    /// guard is dropped (SIGCONT). Its memory stays as it was.
    pub async fn freeze_coordinator(&self, i: usize) -> anyhow::Result<Frozen> {
        let rt = self.coordinators[i]
            .as_ref()
            .and_then(|n| n.rt.as_ref())
            .context("coordinator is gone")?;
        let (thaw, wait) = std::sync::mpsc::channel::<()>();
        let (frozen_tx, frozen) = tokio::sync::oneshot::channel();
        rt.spawn(async move {
            let _ = frozen_tx.send(());
            // Blocking the worker is the point: this is the freeze. It ends when the guard
            // (the sender) is dropped.
            let _ = wait.recv();
        });
        frozen.await?;
        Ok(Frozen { _thaw: thaw })
    }

    /// Kills gateway `i` like a crash: sockets drop, nothing is released.
    pub fn kill_gateway(&mut self, i: usize) {
        if let Some(n) = self.gateways[i].take() {
            n.kill();
        }
    }

    /// Kills coordinator `i` like a crash: its leases stay until they expire.
    pub fn kill_coordinator(&mut self, i: usize) {
        if let Some(n) = self.coordinators[i].take() {
            n.kill();
        }
        self.repoint_api();
    }

    fn repoint_api(&mut self) {
        if let Some(addr) = self.live_coordinator().map(|n| n.addr) {
            self.api = Api::new(addr, self.admin_token.clone());
        }
    }

    /// Stops gateway `i` gracefully, draining its agents over `window`.
    pub async fn stop_gateway(&mut self, i: usize, window: Duration) -> anyhow::Result<()> {
        if let Some(mut n) = self.gateways[i].take() {
            if let (Some(node), Some(rt)) = (n.node.take(), n.rt.as_ref()) {
                rt.spawn(node.stop_within(window)).await??;
            }
        }
        Ok(())
    }

    /// Starts stopping gateway `i` gracefully over `window` and returns at once, so a test can
    /// watch the drain while it runs; the handle ends with the stop. (Take what the test needs
    /// of the gateway, its address or [`Cluster::gateway_of`], before: it is gone from here.)
    pub fn begin_stop_gateway(
        &mut self,
        i: usize,
        window: Duration,
    ) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        let taken = self.gateways[i].take();
        tokio::spawn(async move {
            if let Some(mut n) = taken {
                if let (Some(node), Some(rt)) = (n.node.take(), n.rt.as_ref()) {
                    rt.spawn(node.stop_within(window)).await??;
                }
            }
            Ok(())
        })
    }

    /// Stops coordinator `i` gracefully: it hands its partitions over.
    pub async fn stop_coordinator(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut n) = self.coordinators[i].take() {
            if let (Some(node), Some(rt)) = (n.node.take(), n.rt.as_ref()) {
                rt.spawn(node.stop()).await??;
            }
        }
        self.repoint_api();
        Ok(())
    }

    /// Stops every node gracefully (gateways first) and drops the sandbox database.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for i in 0..self.gateways.len() {
            self.stop_gateway(i, Duration::ZERO).await?;
        }
        for i in 0..self.coordinators.len() {
            self.stop_coordinator(i).await?;
        }
        if let Some(db) = self.db.take() {
            db.remove().await?;
        }
        Ok(())
    }
}

impl Fleet for Cluster {
    fn ws_url(&self) -> String {
        self.ws_url_of(0).unwrap_or_default()
    }

    fn http_url(&self) -> String {
        self.http_url_of(0).unwrap_or_default()
    }

    fn api(&self) -> &Api {
        &self.api
    }

    fn coordinator(&self) -> anyhow::Result<std::sync::Arc<coordinator::service::Coordinator>> {
        let i = self
            .coordinators
            .iter()
            .position(Option::is_some)
            .context("no coordinator is running")?;
        self.coordinator_of(i)
    }
}

/// A frozen coordinator ([`Cluster::freeze_coordinator`]); dropping it wakes the node.
pub struct Frozen {
    _thaw: std::sync::mpsc::Sender<()>,
}

/// A TCP load balancer for the failure tests: each connection goes to the first backend, in
/// the given order, that accepts it; so agents all land on the first live gateway and move to
/// the next when it dies, as behind a real balancer with health checks.
pub struct Balancer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    pub async fn start(backends: Vec<SocketAddr>) -> anyhow::Result<Self> {
        Self::start_checked(backends, false).await
    }

    /// With `health_checked`, a backend is skipped while its `/health/ready` does not answer
    /// 200, as a balancer polling readiness would (here: asked on every connection).
    pub async fn start_checked(
        backends: Vec<SocketAddr>,
        health_checked: bool,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let backends = backends.clone();
                let http = http.clone();
                tokio::spawn(async move {
                    for b in backends {
                        if health_checked && !ready(&http, b).await {
                            continue;
                        }
                        if let Ok(mut server) = tokio::net::TcpStream::connect(b).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self { addr, task })
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/opamp", self.addr)
    }
}

async fn ready(http: &reqwest::Client, backend: SocketAddr) -> bool {
    let url = format!("http://{backend}/health/ready");
    http.get(url)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Cluster {
    /// Open WebSocket connections on gateway `i` (0 once it is gone).
    pub fn gateway_connections(&self, i: usize) -> usize {
        self.gateways[i]
            .as_ref()
            .and_then(|n| n.node.as_ref())
            .map_or(0, |n| n.gateway.connected())
    }

    /// The lease holder of every partition, as the API reports it.
    pub async fn partition_holders(&self) -> anyhow::Result<Vec<(u16, String)>> {
        let v = self.api.get("/api/v1/cluster").await?;
        Ok(v["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| {
                Some((
                    u16::try_from(l["partition"].as_u64()?).ok()?,
                    l["holder"].as_str()?.to_string(),
                ))
            })
            .collect())
    }

    /// The index of the coordinator that holds `uid`'s partition (node ids are `coord-<i>`).
    pub async fn owner_of(&self, uid: InstanceUid) -> anyhow::Result<usize> {
        let partition = uid.partition();
        let holder = self
            .partition_holders()
            .await?
            .into_iter()
            .find(|(p, _)| *p == partition)
            .map(|(_, h)| h)
            .with_context(|| format!("partition {partition} has no holder"))?;
        holder
            .strip_prefix("coord-")
            .and_then(|i| i.parse().ok())
            .with_context(|| format!("holder {holder} is not a sandbox coordinator"))
    }
}
