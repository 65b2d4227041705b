//! Small runs of every scenario against an in-process embedded Ampora (and one against the
//! baseline), and of connect, hold, rollout and steady against a spawned cluster (2 gateways,
//! 2 coordinators on the local NATS, Redis and Postgres): correctness, not speed. Every wait
//! is bounded; nothing is left running.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use coordinator::config::Config;
use coordinator::serve::{self, Running};
use loadtest::api::Api;
use loadtest::cluster::{Cluster, ClusterSpec};
use loadtest::procs::Role;
use loadtest::{Phase, Report, RunOptions};
use shared::testing::poll;

const AGENTS: usize = 200;
/// Pause between two checks of a condition.
const POLL: Duration = Duration::from_millis(50);

struct Server {
    running: Running,
    api: Api,
    _dir: tempfile::TempDir,
}

impl Server {
    /// For plaintext agents: bootstrap tokens over plaintext allowed, whatever the default.
    async fn start() -> Server {
        Self::start_with(true).await
    }

    async fn start_with(plaintext_bootstrap: bool) -> Server {
        Self::start_tuned(|cfg| cfg.opamp.bootstrap_plaintext_allowed = plaintext_bootstrap).await
    }

    /// Plaintext bootstrap allowed, then `tune`.
    async fn start_tuned(tune: impl FnOnce(&mut Config)) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::default();
        cfg.server.data_dir = dir.path().to_path_buf();
        cfg.server.listen = "127.0.0.1:0".into();
        cfg.self_agent.enabled = false;
        cfg.store.flush_interval_ms = 100;
        cfg.opamp.bootstrap_plaintext_allowed = true;
        tune(&mut cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let running = serve::start(cfg, listener).await.expect("server starts");
        let token = running.admin_token.clone().expect("admin token");
        let api = Api::new(&format!("http://{}", running.addr), &token).expect("api");
        Server {
            running,
            api,
            _dir: dir,
        }
    }

    fn options(&self, scenario: &str, phases: Vec<Phase>) -> RunOptions {
        RunOptions {
            scenario: scenario.into(),
            phases,
            targets: vec![format!("ws://{}/v1/opamp", self.running.addr)],
            api: Some(self.api.clone()),
            agents: AGENTS,
            duration: Duration::from_millis(800),
            settle: Duration::ZERO,
            server_pids: vec![std::process::id()],
            timeout: Duration::from_secs(60),
            http_poll_secs: 1,
            progress: false,
            ..RunOptions::default()
        }
    }

    /// After a run no agent may still be connected (the fleet said goodbye), then stops.
    async fn finish(self) {
        none_connected(&self.api).await;
        self.running.stop().await.expect("server stops");
    }
}

/// The report round-trips through JSON with the fields tooling relies on.
fn check_json(r: &Report) -> serde_json::Value {
    let v = serde_json::to_value(r).expect("serializes");
    for key in [
        "scenario", "agents", "connect", "errors", "complete", "targets",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    for key in ["p50_ms", "p90_ms", "p99_ms", "max_ms"] {
        assert!(v["connect"]["latency"][key].is_number(), "{key}");
    }
    let back: Report = serde_json::from_value(v.clone()).expect("parses back");
    assert_eq!(back.agents, r.agents);
    v
}

/// A CPU figure in % of one core that this machine can have produced: at most every core busy
/// (with a little room for the clock ticks' granularity).
fn plausible_cpu_percent(p: f64) -> bool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    (0.0..=100.0 * cores + 10.0).contains(&p)
}

/// Every figure of a hold report follows from its samples by the formulas BENCHMARKS.md
/// states; each sample is a real process's (more than a MiB resident).
fn hold_consistent(h: &loadtest::scenario::HoldReport, agents: usize) {
    let mut growth = 0.0;
    for s in &h.servers {
        assert!(
            s.rss_before_kib > 1024 && s.rss_held_kib > 1024,
            "not a process's RSS: {s:?}"
        );
        let grew = s.rss_held_kib as f64 - s.rss_before_kib as f64;
        assert_eq!(s.kib_per_agent, grew / s.agents as f64, "{s:?}");
        assert!(plausible_cpu_percent(s.idle_cpu_percent), "{s:?}");
        growth += grew;
    }
    assert_eq!(h.kib_per_agent, growth / agents as f64, "{h:?}");
    let cpu: f64 = h.servers.iter().map(|s| s.idle_cpu_percent).sum();
    assert_eq!(h.idle_cpu_percent, cpu);
}

fn all_connected(r: &Report) {
    assert_eq!(
        r.connect.connected,
        AGENTS,
        "{}",
        loadtest::scenario::summary(r)
    );
    assert!(r.connect.seconds > 0.0 && r.connect.rate_per_sec > 0.0);
    assert_eq!(r.connect.latency.count, AGENTS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_hold() {
    let s = Server::start().await;
    let r = loadtest::run(&s.options("hold", vec![Phase::Hold]))
        .await
        .expect("run");
    all_connected(&r);
    assert!(r.complete);
    let h = r.hold.as_ref().expect("hold report");
    assert_eq!(h.servers.len(), 1);
    assert_eq!(
        (h.servers[0].pid, h.servers[0].role, h.servers[0].agents),
        (std::process::id(), Role::Server, AGENTS)
    );
    // The window is the hold's duration (800 ms), measured.
    assert!((0.8..60.0).contains(&h.window_secs), "{h:?}");
    // (The server shares this process with the agents and with the other tests, so its growth
    // can have any sign; the figures must still follow from the samples.)
    hold_consistent(h, AGENTS);
    let v = check_json(&r);
    assert_eq!(v["hold"]["kib_per_agent"].as_f64(), Some(h.kib_per_agent));
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_reaches_every_agent_over_ws_and_http() {
    let s = Server::start().await;
    let opts = RunOptions {
        http_share: 0.1,
        fail_share: 0.1,
        ..s.options("rollout", vec![Phase::Rollout])
    };
    let r = loadtest::run(&opts).await.expect("run");
    all_connected(&r);
    assert_eq!(r.http_agents, 20);
    assert_eq!(r.failing_agents, 20);
    let ro = r.rollout.as_ref().expect("rollout report");
    assert_eq!(ro.reported, AGENTS, "100 % reported");
    assert_eq!((ro.applied, ro.failed), (180, 20));
    assert_eq!((ro.api_applied, ro.api_failed), (180, 20), "server agrees");
    assert!(ro.p50_ms <= ro.p90_ms && ro.p99_ms <= ro.p100_ms);
    assert!(r.complete);
    check_json(&r);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_rollout_is_timed_stage_by_stage() {
    let s = Server::start().await;
    let opts = RunOptions {
        stages: Some("1,10%,50%,100%".into()),
        soak: "0s".into(),
        ..s.options("rollout", vec![Phase::Rollout])
    };
    let r = loadtest::run(&opts).await.expect("run");
    all_connected(&r);
    let ro = r.rollout.as_ref().expect("rollout report");
    let st = ro.staged.as_ref().expect("staged report");
    assert_eq!(st.state, "succeeded", "{st:?}");
    assert_eq!(st.target, "labels loadtest=true");
    assert_eq!((ro.reported, ro.applied, ro.failed), (AGENTS, AGENTS, 0));
    assert_eq!(
        (ro.api_applied, ro.api_failed),
        (AGENTS, 0),
        "the gates agree"
    );
    let t = &st.times;
    assert_eq!(t.early, 0);
    let planned: Vec<u64> = t.stages.iter().map(|f| f.planned).collect();
    assert_eq!(planned, [1, 19, 80, 100]);
    let agents: Vec<u64> = t.stages.iter().map(|f| f.agents as u64).collect();
    assert_eq!(agents, planned, "each agent answered in its own stage");
    let sizes: Vec<&str> = t.stages.iter().map(|f| f.size.as_str()).collect();
    assert_eq!(sizes, ["1", "10%", "50%", "100%"]);
    assert!(t.stages[0].engine_ms.is_none() && t.stages[0].push_to_last_ms.is_some());
    for f in &t.stages[1..] {
        let e = f.engine_ms.expect("engine time");
        assert!(e > 0.0 && e < 60_000.0, "stage {}: {e} ms", f.stage);
    }
    assert!(t.total_ms.is_some_and(|ms| ms > 0.0));
    assert!(t.apply_p50_ms <= t.apply_p99_ms);
    assert!(r.complete);
    let v = check_json(&r);
    assert!(v["rollout"]["staged"]["times"]["stages"][3]["engine_ms"].is_number());
    assert!(loadtest::scenario::summary(&r).contains("engine: prev. gate → last answer"));
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady() {
    let s = Server::start().await;
    let r = loadtest::run(&s.options("steady", vec![Phase::Steady]))
        .await
        .expect("run");
    all_connected(&r);
    let st = r.steady.as_ref().expect("steady report");
    assert!(st.messages > AGENTS as u64, "{st:?}");
    assert!(st.rate_per_sec > 0.0 && st.latency.count == st.messages);
    assert_eq!(st.rate_per_sec, st.messages as f64 / st.seconds);
    // The server (this process) was busy answering: its CPU over the window is real work.
    assert_eq!(st.cpu.len(), 1);
    assert_eq!(st.cpu[0].pid, std::process::id());
    assert!(
        st.cpu[0].cpu_percent > 0.0 && plausible_cpu_percent(st.cpu[0].cpu_percent),
        "{st:?}"
    );
    check_json(&r);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused() {
    // A short audit window, so that the summary rows with the repeat counts come in time.
    let s = Server::start_tuned(|cfg| cfg.audit.refusal_window_secs = 1).await;
    let opts = RunOptions {
        refused_agents: 20,
        duration: Duration::from_secs(2),
        ..s.options("refused", vec![Phase::Refused])
    };
    let r = loadtest::run(&opts).await.expect("run");
    all_connected(&r);
    let rf = r.refused.as_ref().expect("refused report");
    let summary = loadtest::scenario::summary(&r);
    for w in [&rf.baseline, &rf.with_refused] {
        assert!(w.messages > 0 && w.latency.count == w.messages, "{summary}");
    }
    assert!(rf.p99_ratio > 0.0, "{summary}");
    let agents: Vec<usize> = rf.kinds.iter().map(|k| k.agents).collect();
    assert_eq!(agents, [10, 5, 5], "{summary}");
    for k in &rf.kinds {
        let after_upgrade = k.reason == "already_redeemed";
        assert!(k.refusals() >= k.agents as u64, "{summary}");
        assert_eq!(k.refused_after_upgrade > 0, after_upgrade, "{summary}");
        assert_eq!(k.refused_at_upgrade > 0, !after_upgrade, "{summary}");
        let audit = rf
            .audit
            .iter()
            .find(|a| a.reason == k.reason)
            .expect("audit");
        assert!(
            audit.rows_at_end >= 1 && audit.count >= k.refusals(),
            "{summary}"
        );
    }
    check_json(&r);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn() {
    let s = Server::start().await;
    // Long enough for several leave/rejoin cycles (each waits for the closing handshake) even
    // on a loaded machine.
    let opts = RunOptions {
        duration: Duration::from_secs(3),
        ..s.options("churn", vec![Phase::Churn])
    };
    let r = loadtest::run(&opts).await.expect("run");
    all_connected(&r);
    let ch = r.churn.as_ref().expect("churn report");
    assert!(ch.connects > 0, "{ch:?}");
    assert!(r.complete);
    check_json(&r);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_processes_share_the_fleet() {
    let s = Server::start().await;
    let opts = RunOptions {
        workers: Some(2),
        worker_exe: Some(env!("CARGO_BIN_EXE_ampora-loadtest").into()),
        ..s.options("rollout", vec![Phase::Rollout])
    };
    let r = loadtest::run(&opts).await.expect("run");
    all_connected(&r);
    assert_eq!(r.worker_processes, 2);
    assert_eq!(r.rollout.as_ref().map(|ro| ro.applied), Some(AGENTS));
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_connect_hold_steady() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(loadtest::baseline::serve(listener));
    let opts = RunOptions {
        scenario: "baseline".into(),
        phases: vec![Phase::Hold, Phase::Steady],
        targets: vec![format!("ws://{addr}/")],
        no_auth: true,
        agents: AGENTS,
        duration: Duration::from_millis(500),
        settle: Duration::ZERO,
        server_pids: vec![std::process::id()],
        timeout: Duration::from_secs(60),
        progress: false,
        ..RunOptions::default()
    };
    let r = loadtest::run(&opts).await.expect("run");
    all_connected(&r);
    assert!(r.steady.as_ref().is_some_and(|s| s.messages > 0));
    check_json(&r);
    server.abort();
}

/// wss:// and https:// agents trusting the server's local CA, against a server that refuses
/// bootstrap tokens over plaintext: every agent connecting and applying proves none of them
/// fell back to plaintext. Two worker processes: the CA travels to them with the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_agents_over_wss_and_https() {
    let s = Server::start_with(false).await;
    let ca = s.running.tls_ca_cert.clone().expect("local CA");
    let opts = RunOptions {
        targets: vec![format!("wss://{}/v1/opamp", s.running.addr)],
        ca_pem: Some(std::fs::read_to_string(ca).expect("ca.pem")),
        http_share: 0.1,
        workers: Some(2),
        worker_exe: Some(env!("CARGO_BIN_EXE_ampora-loadtest").into()),
        ..s.options("rollout", vec![Phase::Rollout])
    };
    let r = loadtest::run(&opts).await.expect("run");
    all_connected(&r);
    assert_eq!(r.http_agents, 20);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let ro = r.rollout.as_ref().expect("rollout report");
    assert_eq!((ro.applied, ro.api_applied), (AGENTS, AGENTS));
    assert!(r.complete);
    s.finish().await;
}

/// A wss:// target without a CA is refused before any agent starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_without_a_ca_is_refused() {
    let s = Server::start().await;
    let opts = RunOptions {
        targets: vec![format!("wss://{}/v1/opamp", s.running.addr)],
        ..s.options("connect", vec![])
    };
    let err = loadtest::run(&opts).await.expect_err("must refuse");
    assert!(err.to_string().contains("CA"), "{err}");
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_auth_is_refused_against_ampora() {
    let s = Server::start().await;
    let opts = RunOptions {
        no_auth: true,
        ..s.options("connect", vec![])
    };
    let err = loadtest::run(&opts).await.expect_err("must refuse");
    assert!(err.to_string().contains("baseline"), "{err}");
    s.finish().await;
}

// ---- Cluster mode: the harness spawns `ampora coordinator` / `ampora gateway` processes ----

/// Settings for the small cluster runs: few Postgres connections (parallel tests share the
/// server), fast flushes so the API catches up quickly.
const CLUSTER_SETS: [&str; 2] = [
    "cluster.postgres_max_connections=4",
    "store.flush_interval_ms=100",
];

/// The `ampora` binary: `$AMPORA_BIN`, else built once by cargo in this test's profile (it is
/// another package's binary, so cargo does not build it for this package's tests).
fn ampora_exe() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        if let Some(p) = std::env::var_os("AMPORA_BIN") {
            return p.into();
        }
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "coordinator", "--bin", "ampora"])
            .arg("--message-format=json-render-diagnostics")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(std::process::Stdio::inherit());
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("running cargo build");
        assert!(out.status.success(), "cargo build of ampora failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"]["name"] == "ampora")
            .find_map(|v| v["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported the ampora executable")
    })
    .clone()
}

async fn ampora() -> PathBuf {
    tokio::task::spawn_blocking(ampora_exe)
        .await
        .expect("locating ampora")
}

async fn start_cluster() -> Cluster {
    let mut spec = ClusterSpec::new(ampora().await, 2, 2);
    spec.sets = CLUSTER_SETS.iter().map(|s| s.to_string()).collect();
    Cluster::start(&spec)
        .await
        .expect("cluster starts (are NATS, Redis and Postgres running?)")
}

fn cluster_options(c: &Cluster, api: &Api, scenario: &str, phases: Vec<Phase>) -> RunOptions {
    RunOptions {
        scenario: scenario.into(),
        phases,
        targets: c.ws_urls(),
        api: Some(api.clone()),
        agents: AGENTS,
        duration: Duration::from_millis(800),
        settle: Duration::ZERO,
        gateway_pids: c.gateway_pids(),
        coordinator_pids: c.coordinator_pids(),
        timeout: Duration::from_secs(60),
        http_poll_secs: 1,
        progress: false,
        ..RunOptions::default()
    }
}

/// No agent of a finished run is still connected, as any coordinator's API reports it.
async fn none_connected(api: &Api) {
    let left = std::cell::Cell::new(0);
    let seen = &left;
    let gone = poll(Duration::from_secs(20), POLL, || async move {
        let v = api
            .get("/api/v1/agents?connected=true")
            .await
            .expect("list");
        seen.set(v.as_array().map_or(0, Vec::len));
        (seen.get() == 0).then_some(())
    })
    .await;
    assert!(gone.is_some(), "{} agents still connected", left.get());
}

/// connect + hold, rollout (WebSocket and HTTP agents) and steady, one after another on one
/// spawned cluster of 2 gateways and 2 coordinators.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_connect_hold_rollout_steady() {
    let c = start_cluster().await;
    assert_eq!((c.gateways.len(), c.coordinators.len()), (2, 2));
    let api = Api::new(&c.api_url(), &c.admin_token).expect("api");
    // The second coordinator's API sees the same cluster.
    let api2 = Api::new(
        &format!("http://{}", c.coordinators[1].addr),
        &c.admin_token,
    )
    .expect("api");

    // connect (ramped: 2 steps of 100 agents) + hold: memory per agent of each gateway, over
    // the agents on it.
    let opts = RunOptions {
        connect_rate: 1000.0,
        ..cluster_options(&c, &api, "hold", vec![Phase::Hold])
    };
    let r = loadtest::run(&opts).await.expect("hold run");
    all_connected(&r);
    assert_eq!(r.connect_rate, 1000.0);
    assert!(r.complete);
    assert_eq!(r.targets.len(), 2);
    let h = r.hold.as_ref().expect("hold report");
    let roles: Vec<Role> = h.servers.iter().map(|s| s.role).collect();
    assert_eq!(
        roles,
        [
            Role::Gateway,
            Role::Gateway,
            Role::Coordinator,
            Role::Coordinator
        ]
    );
    for (g, s) in h.servers[..2].iter().enumerate() {
        assert_eq!(s.pid, c.gateways[g].pid);
        assert_eq!(s.agents, AGENTS / 2, "round-robin over the gateways");
        // A gateway process of its own holding 100 WebSockets more than before.
        assert!(s.kib_per_agent > 0.0, "{s:?}");
    }
    for (i, s) in h.servers[2..].iter().enumerate() {
        assert_eq!((s.pid, s.agents), (c.coordinators[i].pid, AGENTS));
    }
    hold_consistent(h, AGENTS);
    // The split: the gateways' own figures averaged, the coordinators' growth over all agents.
    let gw = (h.servers[0].kib_per_agent + h.servers[1].kib_per_agent) / 2.0;
    assert_eq!(h.gateway_kib_per_agent, Some(gw));
    let coord_growth: f64 = h.servers[2..]
        .iter()
        .map(|s| s.rss_held_kib as f64 - s.rss_before_kib as f64)
        .sum();
    assert_eq!(
        h.coordinator_kib_per_agent,
        Some(coord_growth / AGENTS as f64)
    );
    let v = check_json(&r);
    assert_eq!(v["hold"]["gateway_kib_per_agent"].as_f64(), Some(gw));
    none_connected(&api2).await;

    // rollout through NATS, state in Postgres; 10 % over HTTP, 10 % failing.
    let opts = RunOptions {
        http_share: 0.1,
        fail_share: 0.1,
        ..cluster_options(&c, &api, "rollout", vec![Phase::Rollout])
    };
    let r = loadtest::run(&opts).await.expect("rollout run");
    all_connected(&r);
    let ro = r.rollout.as_ref().expect("rollout report");
    assert_eq!(ro.reported, AGENTS, "100 % reported");
    assert_eq!((ro.applied, ro.failed), (180, 20));
    assert_eq!((ro.api_applied, ro.api_failed), (180, 20), "server agrees");
    assert!(r.complete, "{}", loadtest::scenario::summary(&r));
    none_connected(&api2).await;

    // steady: status reports through the gateways and NATS; CPU of every node measured.
    let r = loadtest::run(&cluster_options(&c, &api, "steady", vec![Phase::Steady]))
        .await
        .expect("steady run");
    all_connected(&r);
    let st = r.steady.as_ref().expect("steady report");
    assert!(st.messages > AGENTS as u64, "{st:?}");
    assert_eq!(st.cpu.len(), 4);
    let pids: Vec<u32> = st.cpu.iter().map(|s| s.pid).collect();
    assert_eq!(pids, [c.gateway_pids(), c.coordinator_pids()].concat());
    // Every node relayed or answered the reports: real CPU, within what the machine has.
    for s in &st.cpu {
        assert!(
            s.cpu_percent > 0.0 && plausible_cpu_percent(s.cpu_percent),
            "{s:?}"
        );
    }
    check_json(&r);
    none_connected(&api2).await;

    let (db, prefix) = (c.database.clone(), c.prefix.clone());
    c.stop().await;
    assert!(!database_exists(&db).await, "{db} was dropped");
    assert!(prefix.starts_with("lt"));
}

async fn database_exists(name: &str) -> bool {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(loadtest::cluster::DEFAULT_POSTGRES_URL)
        .await
        .expect("postgres");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_one(&mut conn)
        .await
        .expect("query");
    n > 0
}

/// Runs `ampora-loadtest connect ARGS --agents 200 --json-out …` and returns its report and
/// stderr. The spawned servers' default refuses bootstrap tokens over plaintext (through the
/// environment, which their `--set`s override), so plaintext runs pass only if the harness
/// opts in to plaintext itself.
async fn cli_connect(args: &[&str]) -> (Report, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("connect.json");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_ampora-loadtest"));
    cmd.arg("connect")
        .args(args)
        .args(["--agents", "200", "--timeout", "60"])
        .arg("--json-out")
        .arg(&json)
        .env("AMPORA_OPAMP__BOOTSTRAP_PLAINTEXT_ALLOWED", "false")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .expect("finishes within 180 s")
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let r: Report =
        serde_json::from_slice(&std::fs::read(&json).expect("report written")).expect("json");
    all_connected(&r);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    (r, stderr)
}

/// `connect --spawn-server`, in plaintext and with `--tls` (wss://, the server's local CA).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_spawn_server_connect_plaintext_and_tls() {
    let exe = ampora().await;
    let exe = exe.to_str().expect("utf-8 path");
    let (r, _) = cli_connect(&["--spawn-server", exe]).await;
    assert!(r.targets.iter().all(|t| t.starts_with("ws://127.0.0.1:")));
    let (r, _) = cli_connect(&["--spawn-server", exe, "--tls"]).await;
    assert!(r.targets.iter().all(|t| t.starts_with("wss://127.0.0.1:")));
}

/// The command line end to end: `connect --spawn-cluster` starts the cluster, runs, writes the
/// report and tears everything down (processes, database); then the same with `--tls`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_spawn_cluster_connect() {
    let exe = ampora().await;
    let mut args = vec!["--spawn-cluster", exe.to_str().expect("utf-8 path")];
    args.extend(["--gateways", "2", "--coordinators", "2"]);
    for s in CLUSTER_SETS {
        args.extend(["--server-set", s]);
    }
    let (r, stderr) = cli_connect(&args).await;
    assert_eq!(r.targets.len(), 2);
    assert!(r.targets.iter().all(|t| t.starts_with("ws://127.0.0.1:")));
    // The database it announced is gone.
    let db = stderr
        .split("database ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .expect("the database is announced");
    assert!(db.starts_with("ampora_lt_"), "{db}");
    assert!(!database_exists(db).await, "{db} was dropped");

    args.push("--tls");
    let (r, _) = cli_connect(&args).await;
    assert!(r.targets.iter().all(|t| t.starts_with("wss://127.0.0.1:")));
}
