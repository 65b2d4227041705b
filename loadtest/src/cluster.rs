//! A local Ampora cluster for the load tests: `ampora coordinator` and `ampora gateway`
//! processes on 127.0.0.1:0 against the local NATS, Redis and Postgres, in a sandbox of their
//! own (a fresh Postgres database, a random NATS subject prefix and Redis key prefix), torn
//! down again by [`Cluster::stop`].

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use sqlx::Connection as _;
use tokio::process::Command;

use crate::procs::{self, Spawned};
use crate::tls::GatewayCerts;

/// Where the cluster's backing services are and what it runs.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The `ampora` binary.
    pub exe: PathBuf,
    pub gateways: usize,
    pub coordinators: usize,
    /// `--set` for every node, applied after the harness's own (so they win).
    pub sets: Vec<String>,
    /// A Postgres server and credentials; the cluster gets a fresh database on it.
    pub postgres_url: String,
    pub redis_url: String,
    pub nats_url: String,
    /// Keep the nodes' logs here (else in the cluster's temporary directory, removed at stop).
    pub log_dir: Option<PathBuf>,
    /// Agents connect over TLS: the gateways serve a certificate of a CA created for the
    /// cluster ([`Cluster::ca_file`]). Else plaintext, with bootstrap tokens allowed over it.
    pub tls: bool,
}

impl ClusterSpec {
    pub fn new(exe: impl Into<PathBuf>, gateways: usize, coordinators: usize) -> Self {
        Self {
            exe: exe.into(),
            gateways,
            coordinators,
            sets: Vec::new(),
            postgres_url: DEFAULT_POSTGRES_URL.into(),
            redis_url: DEFAULT_REDIS_URL.into(),
            nats_url: DEFAULT_NATS_URL.into(),
            log_dir: None,
            tls: false,
        }
    }
}

pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// Databases the harness creates start with this, so they are recognisable (and only those
/// are ever dropped).
const DATABASE_PREFIX: &str = "ampora_lt_";

/// A running local cluster. Kill it with [`Cluster::stop`]; if it is dropped instead, the
/// processes are killed (`kill_on_drop`) but the database and Redis keys stay.
#[derive(Debug)]
pub struct Cluster {
    /// In start order; the first one created the admin token.
    pub coordinators: Vec<Spawned>,
    /// Gateway `i` serves `ws_urls()[i]`.
    pub gateways: Vec<Spawned>,
    pub admin_token: String,
    /// The sandbox: database name, NATS subject prefix and Redis key prefix.
    pub database: String,
    pub prefix: String,
    postgres_url: String,
    redis_url: String,
    /// Shared data directory (admin token) and, unless `log_dir`, the nodes' logs.
    dir: tempfile::TempDir,
    log_dir: Option<PathBuf>,
    /// The CA agents must trust when the gateways serve TLS.
    pub ca_file: Option<PathBuf>,
    /// What the nodes were started with, to start one again ([`Cluster::restart_coordinator`]).
    spec: ClusterSpec,
    common: Vec<String>,
}

/// `url` with its path (the database) replaced by `db`; the query string is kept.
fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .context("postgres URL without scheme")?;
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let query = tail.find('?').map_or("", |i| &tail[i..]);
    Ok(format!("{scheme}://{authority}/{db}{query}"))
}

async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .with_context(|| format!("connecting to Postgres at {admin_url}"))?;
    let res = sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    res.with_context(|| format!("CREATE DATABASE {name}"))?;
    Ok(())
}

async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        name.starts_with(DATABASE_PREFIX),
        "not a load-test database: {name}"
    );
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    let res = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    res?;
    Ok(())
}

/// Deletes every Redis key under `<prefix>:` (owner keys expire anyway; the epoch counter
/// would not).
async fn delete_redis_keys(url: &str, prefix: &str) -> anyhow::Result<usize> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{prefix}:*");
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let n: usize = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut conn)
                .await?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// The per-process open-file limit (soft), if it can be read.
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

impl Cluster {
    /// Creates the sandbox, then starts the coordinators one after another (the first creates
    /// the admin token in the shared data directory) and then the gateways. On failure
    /// everything started so far is torn down again.
    pub async fn start(spec: &ClusterSpec) -> anyhow::Result<Self> {
        anyhow::ensure!(spec.coordinators > 0, "a cluster needs a coordinator");
        anyhow::ensure!(spec.gateways > 0, "a cluster needs a gateway");
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let tag = &tag[..12];
        let database = format!("{DATABASE_PREFIX}{tag}");
        if let Some(d) = &spec.log_dir {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        create_database(&spec.postgres_url, &database)
            .await
            .context("creating the load-test database (is Postgres running?)")?;
        let mut this = Self {
            coordinators: Vec::new(),
            gateways: Vec::new(),
            admin_token: String::new(),
            database,
            prefix: format!("lt{tag}"),
            postgres_url: spec.postgres_url.clone(),
            redis_url: spec.redis_url.clone(),
            dir: tempfile::Builder::new()
                .prefix("ampora-lt-cluster-")
                .tempdir()?,
            log_dir: spec.log_dir.clone(),
            ca_file: None,
            spec: spec.clone(),
            common: Vec::new(),
        };
        match this.start_nodes(spec).await {
            Ok(()) => Ok(this),
            Err(e) => {
                this.stop().await;
                Err(e)
            }
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Where the nodes write their stderr.
    pub fn log_dir(&self) -> &Path {
        self.log_dir.as_deref().unwrap_or(self.dir.path())
    }

    /// Where node `id` writes its stderr.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.log_dir().join(format!("{id}.log"))
    }

    async fn start_nodes(&mut self, spec: &ClusterSpec) -> anyhow::Result<()> {
        let db_url = with_database(&spec.postgres_url, &self.database)?;
        let mut gateway_sets = Vec::new();
        if spec.tls {
            let certs = GatewayCerts::create(&self.dir.path().join("tls"))?;
            gateway_sets = certs.sets();
            self.ca_file = Some(certs.ca_file);
        }
        let mut common = vec![
            "self_agent.enabled=false".to_string(),
            procs::plaintext_bootstrap_set(spec.tls),
            format!("cluster.nats_url={}", spec.nats_url),
            format!("cluster.redis_url={}", spec.redis_url),
            format!("cluster.postgres_url={db_url}"),
            format!("cluster.subject_prefix={}", self.prefix),
            format!("cluster.redis_key_prefix={}", self.prefix),
        ];
        common.extend(procs::per_ip_limits_off().map(String::from));
        // Coordinators must offer agents an endpoint (they refuse to start without one): the
        // first gateway's, as a balancer's would be. Its port is picked here and handed to it.
        let first_gateway = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let scheme = if spec.tls { "wss" } else { "ws" };
        common.push(format!(
            "server.public_endpoint={scheme}://{first_gateway}/v1/opamp"
        ));
        self.common = common.clone();
        for i in 0..spec.coordinators {
            let id = format!("{}-coord-{i}", self.prefix);
            let node = self
                .start_node(spec, "coordinator", &id, "127.0.0.1:0", &common, &[])
                .await
                .with_context(|| format!("starting coordinator {id}"))?;
            self.coordinators.push(node);
            if i == 0 {
                let path = self.data_dir().join("admin-token");
                self.admin_token = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .trim()
                    .to_string();
            }
        }
        for i in 0..spec.gateways {
            let id = format!("{}-gw-{i}", self.prefix);
            let listen = if i == 0 {
                first_gateway.to_string()
            } else {
                "127.0.0.1:0".to_string()
            };
            // Each gateway caches package blobs on a disk of its own, as on separate hosts.
            let mut own = gateway_sets.clone();
            own.push(format!(
                "packages.cache_dir={}",
                self.dir
                    .path()
                    .join(format!("{id}-package-cache"))
                    .display()
            ));
            let node = self
                .start_node(spec, "gateway", &id, &listen, &common, &own)
                .await
                .with_context(|| format!("starting gateway {id}"))?;
            self.gateways.push(node);
        }
        Ok(())
    }

    async fn start_node(
        &self,
        spec: &ClusterSpec,
        role: &str,
        id: &str,
        listen: &str,
        common: &[String],
        own: &[String],
    ) -> anyhow::Result<Spawned> {
        let mut cmd = Command::new(&spec.exe);
        cmd.arg(role)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen", listen])
            .args(["--set", &format!("cluster.node_id={id}")]);
        for s in common.iter().chain(own).chain(&spec.sets) {
            cmd.args(["--set", s]);
        }
        procs::spawn_listening(cmd, &self.log_path(id)).await
    }

    /// Kills coordinator `i` (SIGKILL, as a crash) and starts it again with the same node id,
    /// settings and address; returns its old and new pid. Its log gets a second part.
    pub async fn restart_coordinator(&mut self, i: usize) -> anyhow::Result<(u32, u32)> {
        anyhow::ensure!(i < self.coordinators.len(), "no coordinator {i}");
        let id = format!("{}-coord-{i}", self.prefix);
        let old = self.coordinators.remove(i);
        let (old_pid, addr) = (old.pid, old.addr.clone());
        old.stop().await;
        let log = self.log_path(&id);
        let _ = std::fs::rename(&log, log.with_extension("before-restart.log"));
        let node = self
            .start_node(&self.spec, "coordinator", &id, &addr, &self.common, &[])
            .await
            .with_context(|| format!("restarting coordinator {id}"))?;
        let new_pid = node.pid;
        self.coordinators.insert(i, node);
        Ok((old_pid, new_pid))
    }

    /// The gateways' OpAMP WebSocket URLs (`wss://` when they serve TLS), in gateway order.
    pub fn ws_urls(&self) -> Vec<String> {
        let scheme = if self.ca_file.is_some() { "wss" } else { "ws" };
        self.gateways
            .iter()
            .map(|g| format!("{scheme}://{}/v1/opamp", g.addr))
            .collect()
    }

    /// The API base URL of the first coordinator.
    pub fn api_url(&self) -> String {
        self.coordinators
            .first()
            .map(|c| format!("http://{}", c.addr))
            .unwrap_or_default()
    }

    /// Every gateway's `host:port`.
    pub fn gateway_addrs(&self) -> Vec<String> {
        self.gateways.iter().map(|g| g.addr.clone()).collect()
    }

    /// Every coordinator's `host:port`.
    pub fn coordinator_addrs(&self) -> Vec<String> {
        self.coordinators.iter().map(|c| c.addr.clone()).collect()
    }

    pub fn gateway_pids(&self) -> Vec<u32> {
        self.gateways.iter().map(|g| g.pid).collect()
    }

    pub fn coordinator_pids(&self) -> Vec<u32> {
        self.coordinators.iter().map(|c| c.pid).collect()
    }

    /// Kills every node (gateways first), then drops the database and deletes the Redis keys,
    /// best effort: problems are reported on stderr, never returned.
    pub async fn stop(self) {
        for node in self.gateways.into_iter().chain(self.coordinators) {
            node.stop().await;
        }
        if let Err(e) = drop_database(&self.postgres_url, &self.database).await {
            eprintln!("could not drop database {}: {e:#}", self.database);
        }
        if let Err(e) = delete_redis_keys(&self.redis_url, &self.prefix).await {
            eprintln!("could not delete Redis keys {}:*: {e:#}", self.prefix);
        }
    }
}

/// Room each process keeps for descriptors other than agent sockets.
const FD_SPARE: u64 = 200;

/// Fails early, with the fix, when a gateway would need more descriptors than the
/// per-process limit allows (agents are spread round-robin over the gateways).
pub fn check_fd_budget(agents: usize, gateways: usize) -> anyhow::Result<()> {
    let Some(limit) = open_file_limit() else {
        return Ok(());
    };
    let per_gateway = agents.div_ceil(gateways.max(1)) as u64;
    let room = limit.saturating_sub(FD_SPARE).max(1);
    anyhow::ensure!(
        per_gateway <= room,
        "{agents} agents over {gateways} gateways is {per_gateway} per gateway, but a process may \
         open {limit} files (ulimit -n); use --gateways {} or more",
        (agents as u64).div_ceil(room)
    );
    Ok(())
}

/// What the harness started for a run: one server or a cluster.
#[derive(Debug)]
pub enum Servers {
    Server(Spawned),
    Cluster(Cluster),
}

impl Servers {
    pub async fn stop(self) {
        match self {
            Servers::Server(s) => s.stop().await,
            Servers::Cluster(c) => c.stop().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_and_keeps_the_query() {
        let u = |s| with_database(s, "x").expect("url");
        assert_eq!(u("postgres://p@h:5432/postgres"), "postgres://p@h:5432/x");
        assert_eq!(u("postgres://p@h:5432"), "postgres://p@h:5432/x");
        assert_eq!(
            u("postgres://p:s@h/db?sslmode=disable"),
            "postgres://p:s@h/x?sslmode=disable"
        );
        assert_eq!(u("postgres://h?sslmode=off"), "postgres://h/x?sslmode=off");
    }
}
