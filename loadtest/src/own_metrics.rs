//! The own-metrics benchmark: what agents' own metrics cost the server.
//!
//! Seeds a fresh SQLite store with `agents` synthetic agents and the own-metrics key, starts
//! `ampora serve` on it, and has every agent export its Collector counters twice (two passes,
//! `concurrency` requests in flight, each agent's own credential): the exports per second and
//! their latency, and the server's RSS before and after (each agent then has a window of one
//! point). A second server is started on a store whose agents all carry a full window (60
//! points), so the resident cost of the largest window shows as the RSS over the first
//! server's at start.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use coordinator::store::SqliteStore;
use futures::StreamExt as _;
use shared::download_token::DownloadKey;
use shared::ids::InstanceUid;
use shared::own_telemetry::{Figures, MetricsCredential, Throughput, COUNTERS, WINDOW_POINTS};

use crate::console::{seed, synthetic};
use crate::hist::{summarize, Latency};
use crate::procs;

pub struct OwnMetricsOptions {
    pub exe: PathBuf,
    pub agents: usize,
    pub concurrency: usize,
}

pub struct OwnMetricsReport {
    pub exports: Latency,
    pub exports_per_sec: f64,
    /// Server RSS at start, after both passes, and at start with full windows (KiB).
    pub rss_start_kib: u64,
    pub rss_after_kib: u64,
    pub rss_full_windows_kib: u64,
    /// A full window as stored: its points (`agents.throughput`) and the rest, in the record
    /// (JSON bytes).
    pub window_json_bytes: usize,
    pub window_record_bytes: usize,
    /// Agents whose API view shows the second pass's rates (checked on a sample).
    pub checked: usize,
}

const KEY: [u8; 32] = [42; 32];

/// A window of [`WINDOW_POINTS`] minutes, every counter busy.
fn full_window(now_ms: i64) -> Throughput {
    let mut t = Throughput::default();
    let mut f = Figures {
        present: [true; COUNTERS],
        ..Default::default()
    };
    for m in 0..=WINDOW_POINTS as i64 {
        for (i, c) in f.cumulative.iter_mut().enumerate() {
            *c = (m * 60_000 + i as i64 * 1_000) as f64;
        }
        f.queue_size = Some(100.0);
        t.record(&f, now_ms - (WINDOW_POINTS as i64 - m) * 60_000);
    }
    t
}

async fn seeded(
    agents: usize,
    full: bool,
) -> anyhow::Result<(tempfile::TempDir, Vec<InstanceUid>)> {
    let dir = procs::fresh_dir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("own-metrics.key"), hex::encode(KEY))?;
    let now = shared::now_ms();
    let window = full.then(|| Box::new(full_window(now)));
    let store = SqliteStore::open(&data.join("ampora.db"))
        .await
        .context("seeding the store")?;
    let uids = seed(&store, agents, |i| {
        let mut a = synthetic(i, now);
        a.throughput = window.clone();
        a
    })
    .await?;
    store.close().await;
    Ok((dir, uids))
}

fn body(pass: u64) -> Vec<u8> {
    let c = ::agent::own_metrics::CollectorCounters {
        accepted: [1_000 * pass, 500 * pass, 200 * pass],
        sent: [990 * pass, 500 * pass, 200 * pass],
        failed: [10 * pass, 0, 0],
        queue_size: 5,
        ..Default::default()
    };
    proto::Message::encode_to_vec(&::agent::own_metrics::export_request(&c))
}

pub async fn run(opts: &OwnMetricsOptions) -> anyhow::Result<OwnMetricsReport> {
    let key = DownloadKey::new(KEY);
    let (dir, uids) = seeded(opts.agents, false).await?;
    let server = procs::spawn_ampora_in(dir, &opts.exe, &[], false).await?;
    let rss_start_kib = procs::rss_kib(server.pid)?;
    let url = format!("http://{}/v1/metrics", server.addr);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.concurrency)
        .build()?;
    let credentials: Arc<Vec<String>> = Arc::new(
        uids.iter()
            .map(|u| format!("Bearer {}", MetricsCredential::mint(&key, *u)))
            .collect(),
    );
    let mut latencies = Vec::with_capacity(2 * uids.len());
    let started = Instant::now();
    for pass in 1..=2u64 {
        let body = bytes::Bytes::from(body(pass));
        let results: Vec<anyhow::Result<f64>> = futures::stream::iter(0..uids.len())
            .map(|i| {
                let (http, url, body, credentials) =
                    (http.clone(), url.clone(), body.clone(), credentials.clone());
                async move {
                    let t = Instant::now();
                    let resp = http
                        .post(url)
                        .header("Authorization", &credentials[i])
                        .header("Content-Type", "application/x-protobuf")
                        .body(body)
                        .send()
                        .await?;
                    anyhow::ensure!(resp.status() == 200, "export: {}", resp.status());
                    let _ = resp.bytes().await?;
                    Ok(t.elapsed().as_secs_f64() * 1_000.0)
                }
            })
            .buffer_unordered(opts.concurrency)
            .collect()
            .await;
        for r in results {
            latencies.push(r?);
        }
    }
    let exports_per_sec = latencies.len() as f64 / started.elapsed().as_secs_f64();
    // A sample of agents, read back through the API: their rates come from the two passes.
    let token = server.admin_token.clone().context("admin token")?;
    let mut checked = 0;
    for uid in uids.iter().step_by((uids.len() / 50).max(1)) {
        let v: serde_json::Value = http
            .get(format!(
                "http://{}/api/v1/agents/{uid}/telemetry",
                server.addr
            ))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        let dropped = v["rates"]["dropped_per_s"].as_f64().unwrap_or(0.0);
        anyhow::ensure!(
            dropped > 0.0,
            "agent {uid}: no rates after two exports: {v}"
        );
        checked += 1;
    }
    let rss_after_kib = procs::rss_kib(server.pid)?;
    server.stop().await;

    let (dir, _) = seeded(opts.agents, true).await?;
    let full = procs::spawn_ampora_in(dir, &opts.exe, &[], false).await?;
    let rss_full_windows_kib = procs::rss_kib(full.pid)?;
    full.stop().await;
    let window = full_window(shared::now_ms());
    let window_json_bytes = serde_json::to_vec(&window.points)?.len();
    let window_record_bytes = serde_json::to_vec(&window)?.len();
    Ok(OwnMetricsReport {
        exports: summarize(latencies),
        exports_per_sec,
        rss_start_kib,
        rss_after_kib,
        rss_full_windows_kib,
        window_json_bytes,
        window_record_bytes,
        checked,
    })
}
