//! The console benchmark: the Fleet page's server time with a large fleet in the store.
//!
//! Seeds a fresh SQLite store with `agents` synthetic agents (names, labels, health and
//! config states spread over them), starts `ampora serve` on it, signs in as the admin and
//! asks each page shape `requests` times in a row over one keep-alive connection: the
//! unfiltered first page, a page half-way through (keyset), label, text and health filters,
//! and the rows fragment a live page fetches. Latency is measured at the client over
//! loopback, so it is the server's time plus one local round trip.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use coordinator::store::SqliteStore;
use shared::domain::{AgentRecord, Health};
use shared::ids::InstanceUid;
use shared::store::Store as _;

use crate::hist::{summarize, Latency};
use crate::procs;

pub struct ConsoleOptions {
    pub exe: PathBuf,
    pub agents: usize,
    pub requests: usize,
}

pub struct Shape {
    pub name: &'static str,
    pub path: String,
    pub latency: Latency,
    pub bytes: usize,
}

/// Seeds in batches of this many (one transaction each).
const SEED_BATCH: usize = 5_000;

pub(crate) fn synthetic(i: usize, now: i64) -> AgentRecord {
    let mut a = AgentRecord::new(InstanceUid::new_v7(), now);
    let d = &mut a.description;
    d.identifying
        .insert("service.name".into(), format!("collector-{i}").into());
    d.identifying.insert(
        "service.version".into(),
        format!("0.{}.0", 90 + i % 10).into(),
    );
    d.non_identifying.insert(
        "env".into(),
        if i.is_multiple_of(4) {
            "staging"
        } else {
            "prod"
        }
        .into(),
    );
    d.non_identifying
        .insert("region".into(), format!("eu-{}", i % 8).into());
    d.non_identifying
        .insert("host.name".into(), format!("host-{i:06}").into());
    a.capabilities = agent::DEFAULT_CAPABILITIES;
    a.health = Some(Health {
        healthy: !i.is_multiple_of(50),
        status: "running".into(),
        ..Health::default()
    });
    a.last_seen_ms = now - (i as i64 % 3_600) * 1_000;
    a
}

/// Signs in to the console at `base`: a client that follows no redirects, and the session
/// cookie (`ampora_session=…`) to send with it.
pub async fn sign_in(base: &str, token: &str) -> anyhow::Result<(reqwest::Client, String)> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let signed = http
        .post(format!("{base}/ui/login"))
        .form(&[("token", token)])
        .send()
        .await?;
    let cookie = signed
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .context("no session cookie")?
        .to_string();
    Ok((http, cookie))
}

/// Writes `n` agents made by `make` to `store` in batches; their uids.
pub(crate) async fn seed(
    store: &SqliteStore,
    n: usize,
    make: impl Fn(usize) -> AgentRecord,
) -> anyhow::Result<Vec<InstanceUid>> {
    let mut uids = Vec::with_capacity(n);
    let mut batch = Vec::with_capacity(SEED_BATCH);
    for i in 0..n {
        let a = make(i);
        uids.push(a.instance_uid);
        batch.push(a);
        if batch.len() == SEED_BATCH {
            store.upsert_agents(&batch).await?;
            batch.clear();
        }
    }
    store.upsert_agents(&batch).await?;
    Ok(uids)
}

pub async fn run(opts: &ConsoleOptions) -> anyhow::Result<Vec<Shape>> {
    let dir = procs::fresh_dir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    let now = shared::now_ms();
    let mut uids = {
        let store = SqliteStore::open(&data.join("ampora.db"))
            .await
            .context("seeding the store")?;
        let uids = seed(&store, opts.agents, |i| synthetic(i, now)).await?;
        store.close().await;
        uids
    };
    uids.sort();
    let server = procs::spawn_ampora_in(dir, &opts.exe, &[], false).await?;
    let base = format!("http://{}", server.addr);
    let token = server.admin_token.clone().context("admin token")?;
    let (http, cookie) = sign_in(&base, &token).await?;
    let middle = uids
        .get(uids.len() / 2)
        .map(ToString::to_string)
        .unwrap_or_default();
    let shapes: [(&'static str, String); 6] = [
        ("unfiltered, first page", "/ui/".into()),
        (
            "unfiltered, page at the middle",
            format!("/ui/?after={middle}"),
        ),
        (
            "label env=staging,region=eu-3",
            "/ui/?label=env%3Dstaging%2Cregion%3Deu-3".into(),
        ),
        ("text `collector-4242`", "/ui/?q=collector-4242".into()),
        (
            "unhealthy, page at the middle",
            format!("/ui/?health=unhealthy&after={middle}"),
        ),
        ("live rows fragment", "/ui/fleet/rows?".into()),
    ];
    let mut out = Vec::new();
    for (name, path) in shapes {
        let url = format!("{base}{path}");
        let mut samples = Vec::with_capacity(opts.requests);
        let mut bytes = 0;
        for _ in 0..opts.requests {
            let started = Instant::now();
            let resp = http.get(&url).header("cookie", &cookie).send().await?;
            anyhow::ensure!(resp.status() == 200, "{path}: {}", resp.status());
            bytes = resp.bytes().await?.len();
            samples.push(started.elapsed().as_secs_f64() * 1_000.0);
        }
        out.push(Shape {
            name,
            path,
            latency: summarize(samples),
            bytes,
        });
    }
    drop(server);
    Ok(out)
}

/// Console pages open during a run, each as a browser's Fleet page: signed in, holding the
/// page's event stream, fetching the rows fragment on every event.
pub struct Watchers {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    refreshes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Watchers {
    pub async fn start(base: &str, token: &str, n: usize) -> anyhow::Result<Self> {
        let refreshes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let (http, cookie) = sign_in(base, token).await?;
            let mut events = http
                .get(format!("{base}/ui/fleet/events"))
                .header("cookie", &cookie)
                .send()
                .await?;
            let rows = format!("{base}/ui/fleet/rows?");
            let count = refreshes.clone();
            tasks.push(tokio::spawn(async move {
                while let Ok(Some(chunk)) = events.chunk().await {
                    if !chunk.windows(7).any(|w| w == b"changed") {
                        continue;
                    }
                    let page = http.get(&rows).header("cookie", &cookie).send().await;
                    if let Ok(page) = page {
                        let _ = page.bytes().await;
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }));
        }
        Ok(Self { tasks, refreshes })
    }

    /// Closes the pages; returns how many times they fetched their rows.
    pub fn stop(self) -> u64 {
        for t in &self.tasks {
            t.abort();
        }
        self.refreshes.load(std::sync::atomic::Ordering::Relaxed)
    }
}
