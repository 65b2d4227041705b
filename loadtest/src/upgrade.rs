//! The `upgrade` scenario (issue 20): a fleet of the agent library's own [`Agent`]s, each
//! taking packages, is offered a signed build of `artifact_mib` MiB through Ampora's own
//! hosting, at most `cap` agents at once (`packages.max_concurrent_upgrades`). Timed from the
//! assignment to the last agent that installed the build and came back on it, with the
//! server's RSS sampled throughout (it must not grow with the artifact size × downloads).
//!
//! Then the download path alone, against a plain static file server: `cap` clients fetch the
//! same file `agents` times in all, from Ampora's download endpoint (with a real credential
//! from an offer) and from nginx serving the file from disk, in the same run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
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
use crate::procs::{rss_kib, spawn_ampora};

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct UpgradeOptions {
    pub exe: PathBuf,
    pub agents: usize,
    pub artifact_mib: usize,
    pub cap: usize,
    pub timeout: Duration,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct UpgradeReport {
    pub agents: usize,
    pub artifact_bytes: usize,
    pub cap: usize,
    /// From the assignment to the first / half / last agent back on the new version.
    pub first_ms: u64,
    pub p50_ms: u64,
    pub last_ms: u64,
    /// Bytes the agents downloaded per second over the whole upgrade.
    pub upgrade_mib_per_s: f64,
    pub rss_before_kib: u64,
    pub rss_peak_kib: u64,
    pub rss_after_kib: u64,
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
    let sets = [
        format!("packages.trusted_keys=[\"{}\"]", signer.pk.to_base64()),
        format!("packages.max_concurrent_upgrades={}", o.cap),
        format!("packages.max_artifact_bytes={}", data.len() + 1),
    ];
    let server = spawn_ampora(&o.exe, &sets, false).await?;
    let api = Api::new(
        &format!("http://{}", server.addr),
        server.admin_token.as_deref().unwrap_or_default(),
    )?;
    let url = format!("ws://{}/v1/opamp", server.addr);
    let tokens = api.bootstrap_tokens(o.agents, 86_400).await?;
    let mut agents = Vec::with_capacity(o.agents);
    for token in tokens {
        agents.push(Agent::start(AgentOptions {
            endpoint: url.clone(),
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
    let rss_before_kib = rss_kib(server.pid)?;

    // Import and assign; the clock starts with the assignment.
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
    api.post(
        "/api/v1/packages/assignments",
        json!({ "name": "", "version": "0.2.0", "all": true }),
    )
    .await?;
    let pid = server.pid;
    let peak = Arc::new(AtomicU64::new(rss_before_kib));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                if let Ok(k) = rss_kib(pid) {
                    peak.fetch_max(k, Ordering::Relaxed);
                }
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
    times.sort();
    let last = times.last().copied().unwrap_or_default();
    sampler.abort();
    let rss_after_kib = rss_kib(server.pid)?;
    let rss_peak_kib = peak.load(Ordering::Relaxed).max(rss_after_kib);
    for a in agents {
        a.stop().await;
    }

    // The download path alone, Ampora then nginx, the same client and concurrency.
    let (download_url, auth) = credential(&url, &api).await?;
    let ampora_download_s =
        fetch_all(&download_url, Some(&auth), o.agents, o.cap, data.len()).await?;
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
    server.stop().await;

    let at = |q: f64| {
        let i = ((times.len() as f64 - 1.0) * q).round() as usize;
        times.get(i).map_or(0, |d| d.as_millis() as u64)
    };
    Ok(UpgradeReport {
        agents: o.agents,
        artifact_bytes: data.len(),
        cap: o.cap,
        first_ms: at(0.0),
        p50_ms: at(0.5),
        last_ms: last.as_millis() as u64,
        upgrade_mib_per_s: (o.agents * o.artifact_mib) as f64 / last.as_secs_f64().max(1e-9),
        rss_before_kib,
        rss_peak_kib,
        rss_after_kib,
        ampora_download_s,
        nginx_download_s,
    })
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
