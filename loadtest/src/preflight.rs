//! The pre-flight benchmark: a config checked against a large fleet of a few builds.
//!
//! Seeds a fresh SQLite store with `agents` synthetic agents spread over `builds` component
//! sets (one build lacks the `kafka` exporter the config uses), starts `ampora serve` on it,
//! and times, over one keep-alive connection, `POST /api/v1/configs/{id}/check` for every
//! agent and the push it refuses (`POST /api/v1/assignments`, answered 409 with the same
//! answer). Each answer is checked: the lean build's agents fail, the others pass.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use coordinator::store::SqliteStore;
use serde_json::{json, Value};
use shared::store::ComponentStore as _;

use crate::console::{seed, synthetic};
use crate::hist::{summarize, Latency};
use crate::procs;

pub struct PreflightOptions {
    pub exe: PathBuf,
    pub agents: usize,
    pub builds: usize,
    pub requests: usize,
}

pub struct PreflightReport {
    pub check: Latency,
    pub refused_push: Latency,
    pub failing: u64,
    pub passing: u64,
}

const CONFIG: &str = "receivers: {otlp: {}}\nprocessors: {batch: {}}\nexporters: {kafka: {}, debug: {}}\nservice:\n  pipelines:\n    traces: {receivers: [otlp], processors: [batch], exporters: [kafka, debug]}\n";

/// Build `b`'s components: every build has the config's components but the first, which
/// lacks `kafka`; each has a few of its own.
fn build(b: usize) -> BTreeMap<String, BTreeSet<String>> {
    let mut exporters: BTreeSet<String> = ["debug", "otlp", "otlphttp"].map(String::from).into();
    if b != 0 {
        exporters.insert("kafka".into());
    }
    exporters.insert(format!("custom{b}"));
    BTreeMap::from([
        (
            "receivers".into(),
            ["otlp", "hostmetrics"].map(String::from).into(),
        ),
        (
            "processors".into(),
            ["batch", "memory_limiter"].map(String::from).into(),
        ),
        ("exporters".into(), exporters),
    ])
}

pub async fn run(opts: &PreflightOptions) -> anyhow::Result<PreflightReport> {
    anyhow::ensure!(opts.builds >= 2, "--builds must be at least 2");
    let dir = procs::fresh_dir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    let now = shared::now_ms();
    {
        let store = SqliteStore::open(&data.join("ampora.db"))
            .await
            .context("seeding the store")?;
        for b in 0..opts.builds {
            let body = serde_json::to_string(&build(b))?;
            store
                .put_component_set(&format!("build{b}"), &body, now)
                .await?;
        }
        seed(&store, opts.agents, |i| {
            let mut a = synthetic(i, now);
            a.components_hash = Some(format!("build{}", i % opts.builds));
            a
        })
        .await?;
        store.close().await;
    }
    let server = procs::spawn_ampora_in(dir, &opts.exe, &[], false).await?;
    let base = format!("http://{}", server.addr);
    let token = server.admin_token.clone().context("admin token")?;
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("{base}/api/v1/configs"))
        .bearer_auth(&token)
        .json(&json!({ "name": "kafka", "body": CONFIG }))
        .send()
        .await?
        .json()
        .await?;
    let id = created["id"].as_i64().context("config id")?;
    let lean = opts.agents.div_ceil(opts.builds);
    let (mut checks, mut pushes) = (Vec::new(), Vec::new());
    let mut last = Value::Null;
    for _ in 0..opts.requests {
        let started = Instant::now();
        let resp = http
            .post(format!("{base}/api/v1/configs/{id}/check"))
            .bearer_auth(&token)
            .json(&json!({ "all": true }))
            .send()
            .await?;
        anyhow::ensure!(resp.status() == 200, "check: {}", resp.status());
        last = resp.json().await?;
        checks.push(started.elapsed().as_secs_f64() * 1_000.0);
        let started = Instant::now();
        let resp = http
            .post(format!("{base}/api/v1/assignments"))
            .bearer_auth(&token)
            .json(&json!({ "config_id": id, "all": true }))
            .send()
            .await?;
        anyhow::ensure!(resp.status() == 409, "push: {}", resp.status());
        let _ = resp.bytes().await?;
        pushes.push(started.elapsed().as_secs_f64() * 1_000.0);
    }
    let failing = last["failing"][0]["agents"].as_u64().unwrap_or(0);
    let passing = last["passing"].as_u64().unwrap_or(0);
    anyhow::ensure!(
        failing == lean as u64 && passing == (opts.agents - lean) as u64,
        "unexpected answer: {last}"
    );
    drop(server);
    Ok(PreflightReport {
        check: summarize(checks),
        refused_push: summarize(pushes),
        failing,
        passing,
    })
}
