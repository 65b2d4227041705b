//! The metrics test binary: what Ampora counts, asserted as exact deltas.
//!
//! Every server in a process renders the one process-wide recorder, and the e2e binary runs its
//! tests in parallel, so there a counter can only be asserted to have grown, which another
//! test's increments satisfy as well. Here every test takes [`alone`] first and holds it to its
//! end: one server (or sandbox) at a time, nothing else counting meanwhile, so each step's
//! change to a family of series is asserted exactly: the series it should move by how much, and
//! every other series of the family unchanged.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Instant;

use tests::{Api, DEADLINE};

mod admission;
mod agents;
mod api;
mod auth;
mod connections;
mod decoding;
mod deploy;
mod frames;
mod latency;
mod packages;
mod preflight;
mod pushes;
mod rollouts;
mod tls;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Taken at the start of every test and held to its end: the tests of this binary run one at a
/// time.
pub async fn alone() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// The series of some metric families as rendered (`name{labels}` → value).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot(BTreeMap<String, f64>);

impl Snapshot {
    /// Whether the series is rendered at all (at zero included).
    pub fn has(&self, series: &str) -> bool {
        self.0.contains_key(series)
    }

    /// The value of one series (0 when absent).
    pub fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }
}

/// Where `/metrics` is read from.
pub trait Scrape {
    fn text(&self) -> impl Future<Output = anyhow::Result<String>> + Send;
}

impl Scrape for Api {
    fn text(&self) -> impl Future<Output = anyhow::Result<String>> + Send {
        self.metrics_text()
    }
}

/// `/metrics` of the server at this address, each read on a connection of its own that the
/// server closes after the answer (`Connection: close`). For the tests that count closed
/// connections: a pooled keep-alive connection would itself be closed by a limit (the idle
/// keep-alive's header timeout) and counted.
pub struct OneShot(pub SocketAddr);

impl Scrape for OneShot {
    fn text(&self) -> impl Future<Output = anyhow::Result<String>> + Send {
        let url = format!("http://{}/metrics", self.0);
        async move {
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()?;
            let resp = http.get(url).header("Connection", "close").send().await?;
            anyhow::ensure!(resp.status() == 200, "GET /metrics: {}", resp.status());
            Ok(resp.text().await?)
        }
    }
}

/// The series of `families` (metric names) on `api`'s `/metrics`.
pub async fn snapshot(api: &impl Scrape, families: &[&str]) -> anyhow::Result<Snapshot> {
    let text = api.text().await?;
    Ok(parse(&text, families))
}

fn parse(text: &str, families: &[&str]) -> Snapshot {
    Snapshot(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let name = series.split('{').next().unwrap_or(series);
                families
                    .contains(&name)
                    .then(|| Some((series.to_string(), value.parse().ok()?)))
                    .flatten()
            })
            .collect(),
    )
}

/// What changed from `before` to `after`: every series whose value differs, by how much.
fn changes(before: &Snapshot, after: &Snapshot) -> BTreeMap<String, f64> {
    let mut keys: Vec<&String> = before.0.keys().chain(after.0.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let d = after.get(k) - before.get(k);
            (d != 0.0).then(|| (k.clone(), d))
        })
        .collect()
}

/// Waits until `families` differ from `before` by exactly `expected` (`series`, delta): those
/// series moved by that much and no other series of the families moved. Returns the snapshot
/// that matched, the `before` of the next step (so an increment arriving late shows up there).
pub async fn expect_changes(
    api: &impl Scrape,
    families: &[&str],
    before: &Snapshot,
    expected: &[(&str, f64)],
) -> anyhow::Result<Snapshot> {
    let want: BTreeMap<String, f64> = expected
        .iter()
        .filter(|(_, d)| *d != 0.0)
        .map(|(s, d)| ((*s).to_string(), *d))
        .collect();
    let start = Instant::now();
    loop {
        let now = snapshot(api, families).await?;
        let got = changes(before, &now);
        if got == want {
            return Ok(now);
        }
        if start.elapsed() > DEADLINE {
            anyhow::bail!("after {DEADLINE:?} the changes are {got:?}, expected {want:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// Waits until the `families` (gauges) read exactly `expected`; series not named must read 0.
pub async fn expect_values(
    api: &impl Scrape,
    families: &[&str],
    expected: &[(&str, f64)],
) -> anyhow::Result<()> {
    expect_changes(api, families, &Snapshot::default(), expected)
        .await
        .map(|_| ())
}

/// `name{label="value"}`, as the exporter renders a one-label series.
pub fn series(name: &str, label: &str, value: &str) -> String {
    format!("{name}{{{label}=\"{value}\"}}")
}

pub const AUTH_FAILURES: &str = "ampora_auth_failures_total";
pub const REJECTED: &str = "ampora_opamp_frames_rejected_total";

pub fn auth_failure(reason: &str) -> String {
    series(AUTH_FAILURES, "reason", reason)
}

pub fn rejected(reason: &str) -> String {
    series(REJECTED, "reason", reason)
}

#[test]
fn changes_name_every_moved_series() {
    let text = "# TYPE a counter\na{r=\"x\"} 1\na{r=\"y\"} 2\nb 7\nab 1\n";
    let before = parse(text, &["a"]);
    assert_eq!(before.0.len(), 2);
    let after = parse("a{r=\"x\"} 1\na{r=\"y\"} 3\na{r=\"z\"} 1\nb 9\n", &["a"]);
    let got = changes(&before, &after);
    assert_eq!(
        got,
        BTreeMap::from([
            ("a{r=\"y\"}".to_string(), 1.0),
            ("a{r=\"z\"}".to_string(), 1.0)
        ])
    );
}
