//! Small runs of every scenario against an in-process embedded Ampora (and one against the
//! baseline): correctness, not speed. Every wait is bounded; nothing is left running.

use std::time::Duration;

use coordinator::config::Config;
use coordinator::serve::{self, Running};
use loadtest::api::Api;
use loadtest::{Phase, Report, RunOptions};

const AGENTS: usize = 200;
/// Pause between two checks of a condition.
const POLL: Duration = Duration::from_millis(50);

struct Server {
    running: Running,
    api: Api,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::default();
        cfg.server.data_dir = dir.path().to_path_buf();
        cfg.server.listen = "127.0.0.1:0".into();
        cfg.self_agent.enabled = false;
        cfg.store.flush_interval_ms = 100;
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
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let v = self
                .api
                .get("/api/v1/agents?connected=true")
                .await
                .expect("list");
            let left = v.as_array().map_or(0, Vec::len);
            if left == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{left} agents still connected"
            );
            tokio::time::sleep(POLL).await;
        }
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
    assert!(h.servers[0].rss_held_kib > 0 && h.window_secs > 0.0);
    let v = check_json(&r);
    assert!(v["hold"]["kib_per_agent"].is_number());
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
async fn steady() {
    let s = Server::start().await;
    let r = loadtest::run(&s.options("steady", vec![Phase::Steady]))
        .await
        .expect("run");
    all_connected(&r);
    let st = r.steady.as_ref().expect("steady report");
    assert!(st.messages > AGENTS as u64, "{st:?}");
    assert!(st.rate_per_sec > 0.0 && st.latency.count == st.messages);
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
