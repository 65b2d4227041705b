//! Health, metrics, the OpenAPI document, operator authentication and persistence.

use serde_json::{json, Value};
use tests::TestServer;

#[tokio::test]
async fn health_metrics_and_openapi_are_served() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let live = http.get(format!("{base}/health/live")).send().await?;
    assert_eq!(live.status(), 200);
    let ready = http.get(format!("{base}/health/ready")).send().await?;
    assert_eq!(ready.status(), 200);

    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    for reason in ["oversize", "malformed", "cap_mismatch", "auth_failed"] {
        let series = format!("ampora_opamp_frames_rejected_total{{reason=\"{reason}\"}}");
        assert!(text.contains(&series), "missing {series} in /metrics");
    }
    for name in [
        "ampora_agents_connected",
        "ampora_config_remote_status_total",
        "ampora_opamp_connections",
    ] {
        assert!(text.contains(name), "missing {name} in /metrics");
    }
    // The gauge is there with a count (its value, which every server in this process writes
    // to: the `metrics` test binary, one server at a time).
    let connected = text
        .lines()
        .find_map(|l| l.strip_prefix("ampora_agents_connected "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(
        connected.is_some_and(|v| v >= 0.0 && v.fract() == 0.0),
        "ampora_agents_connected: {connected:?}"
    );

    let doc: Value = http
        .get(format!("{base}/api/v1/openapi.json"))
        .send()
        .await?
        .json()
        .await?;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    for path in [
        "/api/v1/agents",
        "/api/v1/configs",
        "/api/v1/assignments",
        "/api/v1/tokens",
    ] {
        assert!(doc["paths"].get(path).is_some(), "openapi lacks {path}");
    }
    server.stop().await
}

#[tokio::test]
async fn the_api_requires_an_operator_token() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let url = format!("http://{}/api/v1/agents", server.addr);
    let http = reqwest::Client::new();
    let none = http.get(&url).send().await?;
    assert_eq!(none.status(), 401);
    let wrong = http
        .get(&url)
        .bearer_auth("amp-api.nottherightone")
        .send()
        .await?;
    assert_eq!(wrong.status(), 401);
    // A bootstrap token is not an API token.
    let agent_token = server.api.token("x").await?;
    let as_agent = http.get(&url).bearer_auth(agent_token).send().await?;
    assert_eq!(as_agent.status(), 401);

    let mode = std::fs::metadata(server.dir.path().join("admin-token"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }
    server.stop().await
}

/// Stops `server` and starts another on its data directory (kept alive by the returned guard).
async fn restart(
    server: TestServer,
) -> anyhow::Result<(coordinator::serve::Running, tempfile::TempDir)> {
    let TestServer {
        running, dir: tmp, ..
    } = server;
    running.expect("running").stop().await?;
    let mut cfg = coordinator::config::Config::default();
    cfg.server.data_dir = tmp.path().to_path_buf();
    cfg.self_agent.enabled = false;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok((coordinator::serve::start(cfg, listener).await?, tmp))
}

#[tokio::test]
async fn state_survives_a_restart() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let (id, hash) = server.api.config("kept", "k: v\n").await?;
    let token = server
        .api
        .post("/api/v1/tokens", json!({ "name": "kept" }))
        .await?;
    let api_token = server.api.token.clone();
    let (again, tmp) = restart(server).await?;
    assert_eq!(again.admin_token.as_deref(), Some(api_token.as_str()));
    let api = tests::Api::new(again.addr, api_token);
    let v = api.get(&format!("/api/v1/configs/{id}")).await?;
    assert_eq!(v["hash"], hash);
    let tokens = api.get("/api/v1/tokens").await?;
    assert!(tokens
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t["id"] == token["record"]["id"])));
    again.stop().await?;
    drop(tmp);
    Ok(())
}

/// Memory keeps an effective config's hash; the files are written to the store once. After a
/// restart (memory loaded from the store, without files, and the agent's goodbye written as a
/// record without them) the agent's detail still has its files.
#[tokio::test]
async fn effective_config_files_survive_in_the_store() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let token = server.api.token("files").await?;
    let mut o = crate::opamp::opts(server.ws_url(), token, "collector-files");
    o.initial_config = "receivers: {}\n".into();
    let agent = agent::Agent::start(o);
    let uid = crate::opamp::uid_of(&agent.status().borrow());
    let shown = server
        .api
        .wait_agent(&uid, "effective config", |a| {
            a["effective_config"][""]["body"] == "receivers: {}\n"
        })
        .await?;
    agent.stop().await;
    server
        .api
        .wait_agent(&uid, "offline", |a| a["connected"] == false)
        .await?;
    let api_token = server.api.token.clone();
    let (again, tmp) = restart(server).await?;
    let api = tests::Api::new(again.addr, api_token);
    let a = api.get(&format!("/api/v1/agents/{uid}")).await?;
    assert_eq!(a["effective_config"], shown["effective_config"]);
    assert_eq!(a["effective_config_hash"], shown["effective_config_hash"]);
    again.stop().await?;
    drop(tmp);
    Ok(())
}

#[tokio::test]
async fn names_with_control_characters_are_refused() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    for (path, body) in [
        ("/api/v1/tokens", serde_json::json!({ "name": "a\u{0}b" })),
        (
            "/api/v1/configs",
            serde_json::json!({ "name": "bad\nname", "body": "a: 1\n" }),
        ),
    ] {
        let (status, v) = server
            .api
            .raw(reqwest::Method::POST, path, Some(body))
            .await?;
        assert_eq!(status, 400, "{path}: {v}");
    }
    server.stop().await
}
