//! `ampora-loadtest`: see BENCHMARKS.md.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use loadtest::api::Api;
use loadtest::cluster::{self, Cluster, ClusterSpec, Servers};
use loadtest::procs;
use loadtest::soak::{Restarter, SoakPlan};
use loadtest::tls;
use loadtest::{Comparison, Phase, RunOptions};

#[derive(Parser)]
#[command(
    name = "ampora-loadtest",
    version,
    about = "Simulated OpAMP fleets and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// N agents connect at once; time until all are acknowledged.
    Connect(Common),
    /// N idle agents; server RSS per agent and idle CPU.
    Hold(Common),
    /// One config pushed to all; time to 50/90/99/100 % APPLIED. With --stages: a staged
    /// rollout to the run's agents, timed stage by stage.
    Rollout(RolloutArgs),
    /// Status report → reply loops for --duration; messages per second.
    Steady(Common),
    /// Agents disconnect and reconnect for --duration; connects/s and errors.
    Churn(Common),
    /// Admitted agents' report latency for --duration, then again with --refused agents
    /// refused by the server and looping as opamp-go clients do.
    Refused(RefusedArgs),
    /// A long run: the fleet connects, then for --duration a share of it reconnects every
    /// second and a new config is pushed to all at a fixed period; server RSS and open
    /// descriptors are sampled (CSV for `plot-soak.py`) and their slopes after warm-up
    /// reported, with every push's time until all agents applied it.
    Soak(SoakArgs),
    /// Spawns the baseline and Ampora (--spawn-server or --spawn-cluster) and runs hold +
    /// steady on each; with --tls both serve TLS (the baseline with Ampora's handshake
    /// settings and a local CA of its own).
    Compare(Common),
    /// The console's Fleet page with --agents agents in the store: server time per page
    /// shape (spawns `PATH serve` on a seeded store).
    Console {
        #[arg(long)]
        spawn_server: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        agents: usize,
        /// Requests per page shape.
        #[arg(long, default_value_t = 200)]
        requests: usize,
    },
    /// A config checked against --agents agents of --builds builds (spawns `PATH serve` on a
    /// seeded store): the check's and the refused push's server time.
    Preflight {
        #[arg(long)]
        spawn_server: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        agents: usize,
        #[arg(long, default_value_t = 5)]
        builds: usize,
        /// Requests of each kind.
        #[arg(long, default_value_t = 30)]
        requests: usize,
    },
    /// Every one of --agents agents exports its own metrics twice (spawns `PATH serve` on a
    /// seeded store): exports per second, their latency, and the server's RSS with one-point
    /// and with full (60-point) windows.
    OwnMetrics {
        #[arg(long)]
        spawn_server: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        agents: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// A signed build of --artifact-mib MiB offered to --agents agents at most --cap at a
    /// time (spawns `PATH serve`): time to the last agent back on the new version, server
    /// RSS; then the download path alone against nginx serving the same file.
    Upgrade {
        #[arg(long)]
        spawn_server: PathBuf,
        #[arg(long, default_value_t = 1_000)]
        agents: usize,
        #[arg(long, default_value_t = 20)]
        artifact_mib: usize,
        #[arg(long, default_value_t = 500)]
        cap: usize,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Run a cluster of this many gateways (Postgres, NATS, Redis on their default
        /// local ports) instead of `serve`.
        #[arg(long, default_value_t = 0)]
        gateways: usize,
        #[arg(long, default_value_t = 1)]
        coordinators: usize,
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// The bare fastwebsockets server used as this machine's limit.
    Baseline {
        #[arg(long, default_value = "127.0.0.1:4330")]
        listen: String,
        /// Serve TLS only, with a local CA and server certificate for 127.0.0.1 / localhost
        /// kept in DIR (created if missing; agents trust DIR/ca.pem).
        #[arg(long)]
        tls_dir: Option<PathBuf>,
    },
    /// Internal: a worker process driven over stdin/stdout.
    #[command(hide = true)]
    Worker,
}

#[derive(Args, Clone)]
struct Common {
    /// OpAMP URL (repeatable; agents are spread over them).
    #[arg(long)]
    target: Vec<String>,
    /// Agents connect over TLS (wss://, https://): to a spawned server trusting the local CA
    /// it creates in <data_dir>/tls/ca.pem, to spawned gateways with a CA created for the
    /// cluster, to --target URLs (ws:// becomes wss://) trusting --ca-file.
    #[arg(long)]
    tls: bool,
    /// The CA (PEM) that wss:// / https:// --target servers are trusted by.
    #[arg(long, conflicts_with_all = ["spawn_server", "spawn_cluster"])]
    ca_file: Option<PathBuf>,
    /// Ampora's API base URL, e.g. http://127.0.0.1:4320.
    #[arg(long)]
    api: Option<String>,
    #[arg(long, env = "AMPORA_API_TOKEN")]
    api_token: Option<String>,
    /// Read the admin token from DIR/admin-token.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Start `PATH serve` on 127.0.0.1 with a fresh data dir and the Self-Agent off.
    #[arg(long, conflicts_with = "spawn_cluster")]
    spawn_server: Option<PathBuf>,
    /// Start a local cluster of `PATH coordinator` and `PATH gateway` processes on 127.0.0.1
    /// (fresh Postgres database, random NATS subject and Redis key prefixes); agents are
    /// spread round-robin over the gateways, the API is the first coordinator's.
    #[arg(long)]
    spawn_cluster: Option<PathBuf>,
    /// Gateway processes of --spawn-cluster.
    #[arg(long, default_value_t = 2)]
    gateways: usize,
    /// Coordinator processes of --spawn-cluster.
    #[arg(long, default_value_t = 2)]
    coordinators: usize,
    /// --spawn-cluster: Postgres server (and credentials) to create the fresh database on.
    #[arg(long, default_value = cluster::DEFAULT_POSTGRES_URL)]
    postgres_url: String,
    /// --spawn-cluster: Redis for agent ownership.
    #[arg(long, default_value = cluster::DEFAULT_REDIS_URL)]
    redis_url: String,
    /// --spawn-cluster: NATS for the bus.
    #[arg(long, default_value = cluster::DEFAULT_NATS_URL)]
    nats_url: String,
    /// `--set` for the spawned server or every cluster node (repeatable), e.g.
    /// opamp.heartbeat_interval_secs=60.
    #[arg(long)]
    server_set: Vec<String>,
    /// Server process to measure (repeatable).
    #[arg(long)]
    server_pid: Vec<u32>,
    /// No credentials: only accepted against the baseline server.
    #[arg(long)]
    no_auth: bool,
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// rollout: console Fleet pages open meanwhile (event stream + rows fetch per event).
    #[arg(long, default_value_t = 0)]
    console_watchers: usize,
    /// Share of agents using plain HTTP instead of WebSocket.
    #[arg(long, default_value_t = 0.0)]
    http_share: f64,
    /// Share of agents that report FAILED for remote configs.
    #[arg(long, default_value_t = 0.0)]
    fail_share: f64,
    #[arg(long, default_value_t = 2048)]
    config_bytes: usize,
    /// Seconds: hold CPU window, steady and churn duration.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait after connecting before reading memory.
    #[arg(long, default_value_t = 3.0)]
    settle: f64,
    #[arg(long, default_value_t = 30)]
    heartbeat_secs: u64,
    #[arg(long, default_value_t = 5)]
    http_poll_secs: u64,
    /// Worker processes (default: in-process up to --per-worker agents).
    #[arg(long)]
    workers: Option<usize>,
    #[arg(long, default_value_t = 8000)]
    per_worker: usize,
    /// Spread agents over 127.0.0.2 … 127.0.0.(1+N) (loopback targets; 0: off).
    #[arg(long, default_value_t = 16)]
    source_ips: u8,
    /// Seconds any wait on the fleet may take.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// Start agents at this many per second instead of all at once (0: all at once).
    #[arg(long, default_value_t = 0.0)]
    connect_rate: f64,
    /// --spawn-cluster: keep the nodes' logs (stderr) in DIR as <node id>.log.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct RolloutArgs {
    #[command(flatten)]
    common: Common,
    /// A staged rollout (POST /api/v1/rollouts) to the run's agents with these cumulative
    /// stages, e.g. 1,5%,25%,100%, instead of one assignment to all.
    #[arg(long)]
    stages: Option<String>,
    /// With --stages: each stage's soak, e.g. 0s, 90s.
    #[arg(long, default_value = "0s")]
    soak: String,
}

#[derive(Args, Clone)]
struct SoakArgs {
    #[command(flatten)]
    common: Common,
    /// Share of the fleet reconnecting per second (0.01: 1 %).
    #[arg(long, default_value_t = 0.01)]
    churn_per_sec: f64,
    /// Seconds between config pushes to every agent.
    #[arg(long, default_value_t = 60.0)]
    push_every: f64,
    /// Seconds between samples of RSS, descriptors and connections.
    #[arg(long, default_value_t = 5.0)]
    sample_every: f64,
    /// Seconds of samples left out of the slopes.
    #[arg(long, default_value_t = 300.0)]
    warmup: f64,
    /// The samples as CSV (rewritten at every sample).
    #[arg(long)]
    csv_out: Option<PathBuf>,
    /// --spawn-cluster: kill the last coordinator this many seconds in and start it again.
    #[arg(long)]
    restart_coordinator_after: Option<f64>,
}

#[derive(Args, Clone)]
struct RefusedArgs {
    #[command(flatten)]
    common: Common,
    /// Refused agents started at once for the second window: half with a token bound to
    /// another agent, a quarter with a revoked and a quarter with an unknown token.
    #[arg(long, default_value_t = 1000)]
    refused: usize,
    /// Each admitted agent sends a status report every this many milliseconds.
    #[arg(long, default_value_t = 200)]
    report_every_ms: u64,
}

impl Common {
    /// Resolves the target, API and server pids, spawning the server if asked.
    async fn options(
        &self,
        scenario: &str,
        phases: Vec<Phase>,
    ) -> anyhow::Result<(RunOptions, Option<Servers>)> {
        let mut opts = RunOptions {
            scenario: scenario.into(),
            phases,
            targets: if self.tls {
                self.target.iter().map(|t| tls::secure_url(t)).collect()
            } else {
                self.target.clone()
            },
            ca_pem: self.ca_file.as_deref().map(tls::read_ca_pem).transpose()?,
            no_auth: self.no_auth,
            agents: self.agents,
            http_share: self.http_share,
            fail_share: self.fail_share,
            config_bytes: self.config_bytes,
            duration: Duration::from_secs_f64(self.duration),
            settle: Duration::from_secs_f64(self.settle),
            heartbeat_secs: self.heartbeat_secs,
            http_poll_secs: self.http_poll_secs,
            workers: self.workers,
            per_worker: self.per_worker.max(1),
            source_ips: self.source_ips,
            server_pids: self.server_pid.clone(),
            timeout: Duration::from_secs_f64(self.timeout),
            connect_rate: self.connect_rate.max(0.0),
            console_watchers: self.console_watchers,
            ..RunOptions::default()
        };
        let mut spawned = None;
        let mut api_url = self.api.clone();
        let mut token = self.api_token.clone();
        if let Some(dir) = &self.data_dir {
            let path = dir.join("admin-token");
            token = Some(
                std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
            );
        }
        if let Some(exe) = &self.spawn_server {
            let s = procs::spawn_ampora(exe, &self.server_set, self.tls).await?;
            eprintln!("started {} (pid {}) on {}", exe.display(), s.pid, s.addr);
            let scheme = if self.tls { "wss" } else { "ws" };
            opts.targets = vec![format!("{scheme}://{}/v1/opamp", s.addr)];
            if self.tls {
                let ca = s.ca_file.as_deref().context("the server's CA")?;
                opts.ca_pem = Some(tls::read_ca_pem(ca)?);
            }
            opts.server_pids.push(s.pid);
            api_url = Some(format!("http://{}", s.addr));
            token = s.admin_token.clone();
            spawned = Some(Servers::Server(s));
        }
        if let Some(exe) = &self.spawn_cluster {
            cluster::check_fd_budget(self.agents, self.gateways)?;
            let spec = ClusterSpec {
                sets: self.server_set.clone(),
                postgres_url: self.postgres_url.clone(),
                redis_url: self.redis_url.clone(),
                nats_url: self.nats_url.clone(),
                log_dir: self.log_dir.clone(),
                tls: self.tls,
                ..ClusterSpec::new(exe, self.gateways, self.coordinators)
            };
            let c = Cluster::start(&spec).await?;
            if let Some(ca) = &c.ca_file {
                opts.ca_pem = Some(tls::read_ca_pem(ca)?);
            }
            eprintln!(
                "started a cluster: coordinators {:?} (pids {:?}), gateways {:?} (pids {:?}); database {}, prefix {}, logs in {}",
                c.coordinators.iter().map(|n| &n.addr).collect::<Vec<_>>(),
                c.coordinator_pids(),
                c.gateways.iter().map(|n| &n.addr).collect::<Vec<_>>(),
                c.gateway_pids(),
                c.database,
                c.prefix,
                c.log_dir().display()
            );
            opts.targets = c.ws_urls();
            opts.gateway_pids = c.gateway_pids();
            opts.coordinator_pids = c.coordinator_pids();
            api_url = Some(c.api_url());
            token = Some(c.admin_token.clone());
            spawned = Some(Servers::Cluster(c));
        }
        if let (Some(url), Some(token)) = (api_url, token) {
            opts.api = Some(Api::new(&url, &token)?);
        }
        Ok((opts, spawned))
    }
}

fn write_json(path: &Option<PathBuf>, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_vec_pretty(value)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Runs `opts`; on Ctrl-C the run is abandoned (its workers are killed) with an error.
async fn run_interruptible(opts: &RunOptions) -> anyhow::Result<loadtest::Report> {
    tokio::select! {
        r = loadtest::run(opts) => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
    }
}

/// Spawns what `c` asks for; stopped again even when startup is interrupted.
async fn options_interruptible(
    c: &Common,
    name: &str,
    phases: Vec<Phase>,
) -> anyhow::Result<(RunOptions, Option<Servers>)> {
    tokio::select! {
        r = c.options(name, phases) => r,
        // Dropping the half-started cluster kills its processes (kill_on_drop).
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
    }
}

/// `tune` sets what only this scenario has options for.
async fn scenario(
    c: Common,
    name: &str,
    phases: Vec<Phase>,
    tune: impl FnOnce(&mut RunOptions),
) -> anyhow::Result<()> {
    let (mut opts, spawned) = options_interruptible(&c, name, phases).await?;
    tune(&mut opts);
    let res = run_interruptible(&opts).await;
    if let Some(s) = spawned {
        s.stop().await;
    }
    let report = res?;
    print!("{}", loadtest::scenario::summary(&report));
    write_json(&c.json_out, &report)
}

async fn soak(a: SoakArgs) -> anyhow::Result<()> {
    let (mut opts, spawned) = options_interruptible(&a.common, "soak", vec![Phase::Soak]).await?;
    // The nodes are shared with the restart hook; taken back to stop them.
    let servers = Arc::new(tokio::sync::Mutex::new(spawned));
    let restarter = match a.restart_coordinator_after {
        None => None,
        Some(_) => {
            let servers = servers.clone();
            Some(Restarter(Arc::new(move || {
                let servers = servers.clone();
                Box::pin(async move {
                    match &mut *servers.lock().await {
                        Some(Servers::Cluster(c)) => {
                            let last = c.coordinators.len().saturating_sub(1);
                            c.restart_coordinator(last).await
                        }
                        _ => anyhow::bail!("--restart-coordinator-after needs --spawn-cluster"),
                    }
                })
            })))
        }
    };
    opts.soak_plan = Some(SoakPlan {
        churn_per_sec: a.churn_per_sec,
        push_every: Duration::from_secs_f64(a.push_every.max(1.0)),
        sample_every: Duration::from_secs_f64(a.sample_every.max(0.5)),
        warmup: Duration::from_secs_f64(a.warmup.max(0.0)),
        csv_out: a.csv_out.clone(),
        restart_after: a.restart_coordinator_after.map(Duration::from_secs_f64),
        restarter,
    });
    let res = run_interruptible(&opts).await;
    if let Some(s) = servers.lock().await.take() {
        s.stop().await;
    }
    let report = res?;
    print!("{}", loadtest::scenario::summary(&report));
    write_json(&a.common.json_out, &report)
}

async fn compare(c: Common) -> anyhow::Result<()> {
    anyhow::ensure!(
        c.spawn_server.is_some() || c.spawn_cluster.is_some(),
        "compare needs --spawn-server or --spawn-cluster PATH_TO_AMPORA"
    );
    // Both sides use the same transport: TLS on one side only would skew every ratio.
    let phases = vec![Phase::Hold, Phase::Steady];
    let exe = std::env::current_exe()?;
    let certs_dir = tempfile::Builder::new()
        .prefix("ampora-lt-baseline-")
        .tempdir()?;
    let base = if c.tls {
        loadtest::baseline::spawn_tls(&exe, certs_dir.path()).await?
    } else {
        procs::spawn_baseline(&exe).await?
    };
    let scheme = if c.tls { "wss" } else { "ws" };
    eprintln!("baseline (pid {}) on {scheme}://{}/", base.pid, base.addr);
    let base_ca = base.ca_file.as_deref().map(tls::read_ca_pem).transpose()?;
    // The same options without the Ampora side (no server spawned, no API).
    let bare = Common {
        spawn_server: None,
        spawn_cluster: None,
        api: None,
        data_dir: None,
        server_pid: Vec::new(),
        ..c.clone()
    };
    let bopts = RunOptions {
        targets: vec![format!("{scheme}://{}/", base.addr)],
        ca_pem: base_ca,
        server_pids: vec![base.pid],
        no_auth: true,
        api: None,
        ..bare.options("compare", phases.clone()).await?.0
    };
    let baseline = run_interruptible(&bopts).await;
    base.stop().await;
    let baseline = baseline?;
    let (opts, spawned) = options_interruptible(&c, "compare", phases).await?;
    let ampora = run_interruptible(&opts).await;
    if let Some(s) = spawned {
        s.stop().await;
    }
    let cmp = Comparison::new(ampora?, baseline);
    print!("{}", cmp.summary());
    write_json(&c.json_out, &cmp)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Command::Connect(c) => scenario(c, "connect", vec![], |_| {}).await,
        Command::Hold(c) => scenario(c, "hold", vec![Phase::Hold], |_| {}).await,
        Command::Rollout(a) => {
            scenario(a.common, "rollout", vec![Phase::Rollout], |o| {
                o.stages = a.stages;
                o.soak = a.soak;
            })
            .await
        }
        Command::Steady(c) => scenario(c, "steady", vec![Phase::Steady], |_| {}).await,
        Command::Churn(c) => scenario(c, "churn", vec![Phase::Churn], |_| {}).await,
        Command::Refused(a) => {
            // The admitted agents in a worker process of their own (unless --workers says
            // otherwise): the refused agents run in this one, and must not share a runtime
            // with the agents whose latency is measured.
            let workers = a.common.workers.or(Some(1));
            scenario(a.common, "refused", vec![Phase::Refused], |o| {
                o.refused_agents = a.refused;
                o.report_every = Duration::from_millis(a.report_every_ms.max(1));
                o.workers = workers;
            })
            .await
        }
        Command::Soak(a) => soak(a).await,
        Command::Compare(c) => compare(c).await,
        Command::Preflight {
            spawn_server,
            agents,
            builds,
            requests,
        } => {
            let opts = loadtest::preflight::PreflightOptions {
                exe: spawn_server,
                agents,
                builds,
                requests,
            };
            let r = loadtest::preflight::run(&opts).await?;
            println!("Pre-flight, {agents} agents of {builds} builds, {requests} requests each (ms, client-side over loopback)");
            println!("| request | p50 | p90 | p99 | max |");
            println!("|---|---|---|---|---|");
            for (name, l) in [("check", &r.check), ("refused push", &r.refused_push)] {
                println!(
                    "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
                );
            }
            println!(
                "answer: {} failing (the lean build), {} passing",
                r.failing, r.passing
            );
            Ok(())
        }
        Command::OwnMetrics {
            spawn_server,
            agents,
            concurrency,
        } => {
            let opts = loadtest::own_metrics::OwnMetricsOptions {
                exe: spawn_server,
                agents,
                concurrency,
            };
            let r = loadtest::own_metrics::run(&opts).await?;
            println!("Own metrics, {agents} agents, two exports each, {concurrency} in flight (client-side over loopback)");
            println!(
                "exports: {:.0}/s; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} agents' rates checked through the API)",
                r.exports_per_sec, r.exports.p50_ms, r.exports.p99_ms, r.exports.max_ms, r.checked
            );
            let per_agent =
                |kib: u64| (kib.saturating_sub(r.rss_start_kib) * 1024) as f64 / agents as f64;
            println!(
                "server RSS: {} KiB at start, {} KiB after the exports ({:.0} B/agent), {} KiB at start with full windows ({:.0} B/agent)",
                r.rss_start_kib,
                r.rss_after_kib,
                per_agent(r.rss_after_kib),
                r.rss_full_windows_kib,
                per_agent(r.rss_full_windows_kib)
            );
            println!(
                "a full window as stored: {} bytes of JSON points beside the record, {} in it",
                r.window_json_bytes, r.window_record_bytes
            );
            Ok(())
        }
        Command::Console {
            spawn_server,
            agents,
            requests,
        } => {
            let opts = loadtest::console::ConsoleOptions {
                exe: spawn_server,
                agents,
                requests,
            };
            let shapes = loadtest::console::run(&opts).await?;
            println!("Fleet page, {agents} agents in the store, {requests} requests per shape (ms, client-side over loopback)");
            println!("| shape | p50 | p99 | max | page bytes |");
            println!("|---|---|---|---|---|");
            for s in shapes {
                println!(
                    "| {} | {:.1} | {:.1} | {:.1} | {} |",
                    s.name, s.latency.p50_ms, s.latency.p99_ms, s.latency.max_ms, s.bytes
                );
            }
            Ok(())
        }
        Command::Upgrade {
            spawn_server,
            agents,
            artifact_mib,
            cap,
            timeout,
            gateways,
            coordinators,
            json_out,
        } => {
            let opts = loadtest::upgrade::UpgradeOptions {
                exe: spawn_server,
                agents,
                artifact_mib,
                cap,
                timeout: std::time::Duration::from_secs(timeout),
                gateways,
                coordinators,
            };
            let r = loadtest::upgrade::run(&opts).await?;
            println!(
                "upgrade: {} agents, {} MiB build, cap {}: first {} ms, p50 {} ms, last {} ms ({:.1} MiB/s); server RSS {} -> peak {} -> {} KiB",
                r.agents, artifact_mib, r.cap, r.first_ms, r.p50_ms, r.last_ms,
                r.upgrade_mib_per_s, r.rss_before_kib, r.rss_peak_kib, r.rss_after_kib
            );
            println!(
                "verified by the server at {} ms; peaks: {} downloads in flight, {} upgrade slots held; store reads per gateway {:?}; peak RSS by node {:?} KiB",
                r.verified_ms,
                r.peak_downloads_in_flight,
                r.peak_upgrades_in_progress,
                r.store_reads,
                r.node_rss_peak_kib
            );
            println!(
                "downloads alone ({} GETs, {} at once): Ampora {:.2} s, nginx {:.2} s ({:.2}x)",
                r.agents,
                r.cap,
                r.ampora_download_s,
                r.nginx_download_s,
                r.ampora_download_s / r.nginx_download_s.max(1e-9)
            );
            write_json(&json_out, &r)
        }
        Command::Baseline { listen, tls_dir } => {
            // Same listener as `ampora serve`, so the two are compared like for like.
            let listener = gateway::server::listen(listen.parse()?)?;
            let config = match &tls_dir {
                Some(dir) => Some(loadtest::baseline::server_config(
                    &tls::GatewayCerts::create(dir)?,
                )?),
                None => None,
            };
            println!(
                "ampora-loadtest baseline listening on {}",
                listener.local_addr()?
            );
            match config {
                Some(config) => loadtest::baseline::serve_tls(listener, config).await?,
                None => loadtest::baseline::serve(listener).await?,
            }
            Ok(())
        }
        Command::Worker => {
            loadtest::worker::serve_stdio().await?;
            // Don't wait for the blocking stdin reader: the parent may keep the pipe open.
            std::process::exit(0)
        }
    }
}
