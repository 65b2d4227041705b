//! The `upgrade` scenario (issue 20): a fleet of the agent library's own [`Agent`]s, each
//! taking packages, is upgraded by a one-stage rollout (100%) to a signed build of
//! `artifact_mib` MiB through Ampora's own hosting, at most `cap` agents at once
//! (`packages.max_concurrent_upgrades`, and as many downloads per gateway). On the embedded
//! default (`ampora serve`), or with `gateways` > 0 on a cluster of that many gateways and
//! `coordinators` coordinators (Postgres, NATS, Redis), the agents spread over the gateways
//! and downloading through a round-robin TCP balancer in front of them, as behind a load
//! balancer. Timed from the stage start to the last agent that installed the build and came
//! back on it, and to the last one the server counts verified; the servers' RSS, the
//! downloads in flight and the upgrade slots held are sampled throughout (RSS must not grow
//! with the artifact size × downloads), and each gateway's reads of the store counted.
//!
//! Then the download path alone, against a plain static file server: `cap` clients fetch the
//! same file `agents` times in all, from Ampora's download endpoint (with a real credential
//! from an offer) and from nginx serving the file from disk, in the same run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::agent::{Agent, AgentOptions, WsConnection};
use anyhow::{bail, Context as _};
use base64::Engine as _;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::api::Api;
use crate::cluster::{Cluster, ClusterSpec};
use crate::procs::{rss_kib, spawn_ampora, Spawned};

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct UpgradeOptions {
    pub exe: PathBuf,
    pub agents: usize,
    pub artifact_mib: usize,
    pub cap: usize,
    pub timeout: Duration,
    /// 0: the embedded default; else a cluster of this many gateways.
    pub gateways: usize,
    pub coordinators: usize,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct UpgradeReport {
    pub agents: usize,
    pub artifact_bytes: usize,
    pub cap: usize,
    pub gateways: usize,
    pub coordinators: usize,
    /// From the stage start to the first / half / last agent back on the new version.
    pub first_ms: u64,
    pub p50_ms: u64,
    pub last_ms: u64,
    /// From the stage start to the server counting every agent of the stage verified.
    pub verified_ms: u64,
    /// The most downloads in flight (all gateways) and upgrade slots held (all
    /// coordinators) seen at once, sampled every 200 ms.
    pub peak_downloads_in_flight: u64,
    pub peak_upgrades_in_progress: u64,
    /// Per gateway: blobs read from the store into its cache (cluster only).
    pub store_reads: Vec<u64>,
    /// Bytes the agents downloaded per second over the whole upgrade.
    pub upgrade_mib_per_s: f64,
    /// The server processes' RSS, summed.
    pub rss_before_kib: u64,
    pub rss_peak_kib: u64,
    pub rss_after_kib: u64,
    /// Each server process's peak RSS (`gw-0`, `coord-0`, or `serve`).
    pub node_rss_peak_kib: BTreeMap<String, u64>,
    /// The download path alone: `agents` GETs by `cap` clients.
    pub ampora_download_s: f64,
    pub nginx_download_s: f64,
}

/// A file of `n` bytes that does not compress (a build mostly does not).
fn artifact(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The servers under test: one `ampora serve`, or a cluster behind a balancer.
enum Servers {
    Embedded(Spawned),
    Cluster {
        cluster: Box<Cluster>,
        balancer: Balancer,
        _key: tempfile::TempDir,
    },
}

impl Servers {
    async fn start(o: &UpgradeOptions, sets: Vec<String>) -> anyhow::Result<Self> {
        if o.gateways == 0 {
            return Ok(Self::Embedded(spawn_ampora(&o.exe, &sets, false).await?));
        }
        let key = tempfile::tempdir()?;
        let key_file = key.path().join("download.key");
        let bytes: [u8; 32] = rand::random();
        let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&key_file, text)?;
        let balancer = Balancer::bind().await?;
        let mut spec = ClusterSpec::new(&o.exe, o.gateways, o.coordinators.max(1));
        spec.sets = sets;
        spec.sets.extend([
            format!("packages.download_key_file={}", key_file.display()),
            format!("packages.download_url=http://{}", balancer.addr),
        ]);
        let cluster = Box::new(Cluster::start(&spec).await?);
        let balancer = balancer.serve(cluster.gateway_addrs());
        Ok(Self::Cluster {
            cluster,
            balancer,
            _key: key,
        })
    }

    fn api(&self) -> anyhow::Result<Api> {
        match self {
            Self::Embedded(s) => Api::new(
                &format!("http://{}", s.addr),
                s.admin_token.as_deref().unwrap_or_default(),
            ),
            Self::Cluster { cluster, .. } => Api::new(&cluster.api_url(), &cluster.admin_token),
        }
    }

    /// Where agents connect, spread over in turn.
    fn agent_urls(&self) -> Vec<String> {
        match self {
            Self::Embedded(s) => vec![format!("ws://{}/v1/opamp", s.addr)],
            Self::Cluster { cluster, .. } => cluster.ws_urls(),
        }
    }

    /// Every server process: its name, pid and `host:port`.
    fn nodes(&self) -> Vec<(String, u32, String)> {
        match self {
            Self::Embedded(s) => vec![("serve".into(), s.pid, s.addr.clone())],
            Self::Cluster { cluster, .. } => {
                let gw = cluster
                    .gateway_pids()
                    .into_iter()
                    .zip(cluster.gateway_addrs())
                    .enumerate()
                    .map(|(i, (p, a))| (format!("gw-{i}"), p, a));
                let co = cluster
                    .coordinator_pids()
                    .into_iter()
                    .zip(cluster.coordinator_addrs())
                    .enumerate()
                    .map(|(i, (p, a))| (format!("coord-{i}"), p, a));
                gw.chain(co).collect()
            }
        }
    }

    async fn stop(self) {
        match self {
            Self::Embedded(s) => s.stop().await,
            Self::Cluster {
                cluster, balancer, ..
            } => {
                drop(balancer);
                cluster.stop().await;
            }
        }
    }
}

/// One sample of every server: RSS, downloads in flight, upgrade slots held.
async fn sample(http: &reqwest::Client, nodes: &[(String, u32, String)]) -> (Vec<u64>, u64, u64) {
    let mut rss = Vec::with_capacity(nodes.len());
    let (mut downloads, mut slots) = (0, 0);
    for (_, pid, addr) in nodes {
        rss.push(rss_kib(*pid).unwrap_or(0));
        let text = scrape(http, addr).await;
        downloads += metric(&text, "ampora_package_downloads_in_flight");
        slots += metric(&text, "ampora_package_upgrades_in_progress");
    }
    (rss, downloads, slots)
}

async fn scrape(http: &reqwest::Client, addr: &str) -> String {
    match http.get(format!("http://{addr}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The value of an unlabelled sample (or of the one whose labels follow `name{`), 0 if absent.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = rest.rsplit(' ').next()?;
            (rest.starts_with(' ') || rest.starts_with('{')).then(|| value.parse::<f64>().ok())?
        })
        .map_or(0, |v| v.max(0.0) as u64)
}

pub async fn run(o: &UpgradeOptions) -> anyhow::Result<UpgradeReport> {
    let data = artifact(o.artifact_mib << 20);
    let signer = minisign::KeyPair::generate_unencrypted_keypair()?;
    let signature = minisign::sign(
        Some(&signer.pk),
        &signer.sk,
        std::io::Cursor::new(&data),
        Some("loadtest build"),
        None,
    )?
    .to_string();
    let sets = vec![
        format!("packages.trusted_keys=[\"{}\"]", signer.pk.to_base64()),
        format!("packages.max_concurrent_upgrades={}", o.cap),
        format!("packages.max_downloads_per_gateway={}", o.cap),
        format!("packages.max_artifact_bytes={}", data.len() + 1),
    ];
    let servers = Servers::start(o, sets).await?;
    let api = servers.api()?;
    let urls = servers.agent_urls();
    let tokens = api.bootstrap_tokens(o.agents, 86_400).await?;
    let mut agents = Vec::with_capacity(o.agents);
    for (i, token) in tokens.into_iter().enumerate() {
        agents.push(Agent::start(AgentOptions {
            endpoint: urls[i % urls.len()].clone(),
            token: Some(token),
            description: vec![
                ("service.name".into(), "otelcol".into()),
                ("service.version".into(), "0.1.0".into()),
            ],
            non_identifying: vec![
                ("os.type".into(), "linux".into()),
                ("host.arch".into(), "amd64".into()),
            ],
            heartbeat: Duration::from_secs(5),
            accept_packages: true,
            ..AgentOptions::default()
        }));
    }
    let deadline = Instant::now() + o.timeout;
    for a in &agents {
        let left = deadline.saturating_duration_since(Instant::now());
        ::agent::wait_for(&mut a.status(), left, |s| s.connected && s.replies > 0).await?;
    }
    let nodes = servers.nodes();
    let http = reqwest::Client::new();
    let (rss, _, _) = sample(&http, &nodes).await;
    let rss_before_kib: u64 = rss.iter().sum();

    // Import, then one stage of every agent; the clock starts with the stage.
    let b64 = base64::engine::general_purpose::STANDARD.encode(&signature);
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/packages", api.base()))
        .query(&[
            ("name", ""),
            ("version", "0.2.0"),
            ("platform", "linux/amd64"),
        ])
        .bearer_auth(api.token())
        .header("x-ampora-signature", b64)
        .body(data.clone())
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("import: {} {}", resp.status(), resp.text().await?);
    }
    let started = Instant::now();
    let rollout = api
        .post(
            "/api/v1/rollouts",
            json!({ "package": "", "version": "0.2.0", "all": true, "stages": "100%",
                    "soak": "1h", "deadline": "1h" }),
        )
        .await?;
    let rollout_id = rollout["id"].as_i64().context("no rollout id")?;
    let peaks = Arc::new(std::sync::Mutex::new((
        BTreeMap::<String, u64>::new(),
        0u64,
        0u64,
        rss_before_kib,
    )));
    let sampler = {
        let (peaks, nodes, http) = (peaks.clone(), nodes.clone(), http.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let (rss, downloads, slots) = sample(&http, &nodes).await;
                let mut p = peaks.lock().unwrap_or_else(|e| e.into_inner());
                for ((name, _, _), k) in nodes.iter().zip(&rss) {
                    let e = p.0.entry(name.clone()).or_default();
                    *e = (*e).max(*k);
                }
                p.1 = p.1.max(downloads);
                p.2 = p.2.max(slots);
                p.3 = p.3.max(rss.iter().sum::<u64>());
            }
        })
    };
    let mut done = JoinSet::new();
    for a in &agents {
        let mut rx = a.status();
        done.spawn(async move {
            let left = deadline.saturating_duration_since(Instant::now());
            ::agent::wait_for(&mut rx, left, |s| {
                s.packages
                    .get("")
                    .is_some_and(|p| p.status == "Installed" && p.version == "0.2.0")
                    && s.connected
            })
            .await
            .map(|_| started.elapsed())
        });
    }
    let mut times = Vec::with_capacity(o.agents);
    let mut late = 0;
    while let Some(t) = done.join_next().await {
        match t? {
            Ok(t) => times.push(t),
            Err(_) => late += 1,
        }
    }
    if late > 0 {
        // Where the stragglers stand, grouped: what to look at in the server's log.
        let mut states: BTreeMap<String, usize> = BTreeMap::new();
        for a in &agents {
            let s = a.status().borrow().clone();
            let p = s.packages.get("");
            let done = p.is_some_and(|p| p.status == "Installed" && p.version == "0.2.0");
            if !(done && s.connected) {
                let key = format!(
                    "connected={} status={} error={}",
                    s.connected,
                    p.map_or("none", |p| p.status),
                    p.and_then(|p| p.error.clone()).unwrap_or_default()
                );
                *states.entry(key).or_default() += 1;
            }
        }
        bail!(
            "{late} of {} agents did not upgrade in time: {states:#?}",
            o.agents
        );
    }
    // The server's own count: every member verified (no status lost on the way), polled
    // every 100 ms.
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    let verified_ms = loop {
        poll.tick().await;
        let v = api.get(&format!("/api/v1/rollouts/{rollout_id}")).await?;
        let applied = v["stages"][0]["progress"]["applied"].as_u64().unwrap_or(0);
        if applied as usize == o.agents {
            break started.elapsed().as_millis() as u64;
        }
        if Instant::now() > deadline {
            bail!(
                "the server counts {applied} of {} agents verified: {v}",
                o.agents
            );
        }
    };
    times.sort();
    let last = times.last().copied().unwrap_or_default();
    sampler.abort();
    let (rss, _, _) = sample(&http, &nodes).await;
    let rss_after_kib: u64 = rss.iter().sum();
    let (node_rss_peak_kib, peak_downloads_in_flight, peak_upgrades_in_progress, peak_sum) =
        peaks.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut store_reads = Vec::new();
    for (name, _, addr) in &nodes {
        if name.starts_with("gw-") {
            let text = scrape(&http, addr).await;
            store_reads.push(metric(
                &text,
                "ampora_gateway_blob_fetches_total{outcome=\"stored\"}",
            ));
        }
    }
    for a in agents {
        a.stop().await;
    }

    // The download path alone, one Ampora node then nginx, the same client and concurrency.
    let (download_url, auth) = credential(&urls[0], &api).await?;
    let direct = match &servers {
        Servers::Cluster { cluster, .. } => {
            let path = download_url.splitn(4, '/').nth(3).unwrap_or_default();
            format!("http://{}/{path}", cluster.gateway_addrs()[0])
        }
        Servers::Embedded(_) => download_url,
    };
    let ampora_download_s = fetch_all(&direct, Some(&auth), o.agents, o.cap, data.len()).await?;
    let dir = tempfile::tempdir()?;
    let name = "build.bin";
    std::fs::write(dir.path().join(name), &data)?;
    let nginx = Nginx::start(dir.path()).await?;
    let nginx_download_s = fetch_all(
        &format!("http://{}/{name}", nginx.addr),
        None,
        o.agents,
        o.cap,
        data.len(),
    )
    .await?;
    drop(nginx);
    servers.stop().await;

    let at = |q: f64| {
        let i = ((times.len() as f64 - 1.0) * q).round() as usize;
        times.get(i).map_or(0, |d| d.as_millis() as u64)
    };
    Ok(UpgradeReport {
        agents: o.agents,
        artifact_bytes: data.len(),
        cap: o.cap,
        gateways: o.gateways,
        coordinators: if o.gateways == 0 {
            1
        } else {
            o.coordinators.max(1)
        },
        first_ms: at(0.0),
        p50_ms: at(0.5),
        last_ms: last.as_millis() as u64,
        verified_ms,
        peak_downloads_in_flight,
        peak_upgrades_in_progress,
        store_reads,
        upgrade_mib_per_s: (o.agents * o.artifact_mib) as f64 / last.as_secs_f64().max(1e-9),
        rss_before_kib,
        rss_peak_kib: peak_sum.max(rss_after_kib),
        rss_after_kib,
        node_rss_peak_kib,
        ampora_download_s,
        nginx_download_s,
    })
}

/// A round-robin TCP balancer in front of the gateways, for downloads (the offered URL):
/// each connection goes to the next gateway in turn, as an L4 load balancer would.
struct Balancer {
    addr: std::net::SocketAddr,
    listener: Option<tokio::net::TcpListener>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Balancer {
    /// Bound first: its address goes into the nodes' configuration before they start.
    async fn bind() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Ok(Self {
            addr: listener.local_addr()?,
            listener: Some(listener),
            task: None,
        })
    }

    fn serve(mut self, backends: Vec<String>) -> Self {
        let Some(listener) = self.listener.take() else {
            return self;
        };
        self.task = Some(tokio::spawn(async move {
            let mut next = 0usize;
            while let Ok((mut client, _)) = listener.accept().await {
                let backend = backends[next % backends.len()].clone();
                next += 1;
                tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&backend).await {
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        }));
        self
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// A download URL and credential from a fresh offer (one more agent, over its own
/// connection), as an agent would get them.
async fn credential(url: &str, api: &Api) -> anyhow::Result<(String, String)> {
    let token = api
        .bootstrap_tokens(1, 3_600)
        .await?
        .pop()
        .context("no token")?;
    let headers = vec![("Authorization".to_string(), format!("Bearer {token}"))];
    let mut conn = WsConnection::connect(url, &headers).await?;
    let uid = *uuid::Uuid::now_v7().as_bytes();
    let kv = |k: &str, v: &str| proto::v1::KeyValue {
        key: k.into(),
        value: Some(proto::v1::AnyValue {
            value: Some(proto::v1::any_value::Value::StringValue(v.into())),
        }),
    };
    conn.send(&proto::AgentToServer {
        instance_uid: uid.to_vec(),
        capabilities: 0x1 | 0x8 | 0x10,
        agent_description: Some(proto::v1::AgentDescription {
            identifying_attributes: vec![kv("service.name", "probe")],
            non_identifying_attributes: vec![kv("os.type", "linux"), kv("host.arch", "amd64")],
        }),
        ..Default::default()
    })
    .await?;
    let reply = conn.recv().await?.unwrap_or_default();
    let file = reply
        .packages_available
        .and_then(|p| p.packages.get("").cloned())
        .and_then(|p| p.file)
        .context("no offer for the probe")?;
    let auth = file
        .headers
        .and_then(|h| h.headers.into_iter().find(|h| h.key == "Authorization"))
        .context("no credential in the offer")?
        .value;
    Ok((file.download_url, auth))
}

/// `n` GETs of `url` by `clients` concurrent clients, each body read whole and its length
/// checked; seconds for all.
async fn fetch_all(
    url: &str,
    auth: Option<&str>,
    n: usize,
    clients: usize,
    len: usize,
) -> anyhow::Result<f64> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let gate = Arc::new(Semaphore::new(clients));
    let started = Instant::now();
    let mut all = JoinSet::new();
    for _ in 0..n {
        let permit = gate.clone().acquire_owned().await?;
        let mut req = http.get(url);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        all.spawn(async move {
            let _permit = permit;
            let body = req.send().await?.error_for_status()?.bytes().await?;
            anyhow::ensure!(body.len() == len, "got {} of {len} bytes", body.len());
            Ok(())
        });
    }
    while let Some(r) = all.join_next().await {
        r??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// nginx serving `root` on a free loopback port, as a static file server and nothing else.
struct Nginx {
    child: tokio::process::Child,
    addr: std::net::SocketAddr,
    _prefix: tempfile::TempDir,
}

impl Nginx {
    async fn start(root: &Path) -> anyhow::Result<Self> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("nginx is not installed (apt-get install nginx-light)")?;
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let prefix = tempfile::tempdir()?;
        std::fs::create_dir(prefix.path().join("logs"))?;
        let conf = prefix.path().join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\npid {p}/nginx.pid;\nevents {{ worker_connections 4096; }}\n\
                 http {{ access_log off; sendfile on; server {{ listen {addr}; root {root}; }} }}\n",
                p = prefix.path().display(),
                root = root.display()
            ),
        )?;
        let child = tokio::process::Command::new(bin)
            .arg("-p")
            .arg(format!("{}/", prefix.path().display()))
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(prefix.path().join("logs/error.log"))
            .args(["-g", "daemon off; master_process off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let up = Instant::now();
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if up.elapsed() > Duration::from_secs(10) {
                bail!("nginx did not listen on {addr}");
            }
            tokio::task::yield_now().await;
        }
        Ok(Self {
            child,
            addr,
            _prefix: prefix,
        })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
