//! `ampora_config_preflight_total{stage,outcome}`: every pre-flight check of a config counted
//! once, when a version is created and when it is pushed.

use std::collections::BTreeMap;
use std::time::Duration;

use agent::{Agent, AgentOptions};
use reqwest::Method;
use serde_json::json;
use shared::ids::InstanceUid;
use tests::{eventually, TestServer, DEADLINE};

use crate::{alone, expect_changes, snapshot};

const CHECKS: &str = "ampora_config_preflight_total";

fn check(stage: &str, outcome: &str) -> String {
    format!("{CHECKS}{{stage=\"{stage}\",outcome=\"{outcome}\"}}")
}

const KAFKA: &str = "receivers: {otlp: {}}\nexporters: {kafka: {}}\nservice:\n  pipelines:\n    logs: {receivers: [otlp], exporters: [kafka]}\n";

#[tokio::test]
async fn each_preflight_check_is_counted_by_stage_and_outcome() -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start().await?;
    let api = &server.api;
    let agent = Agent::start(AgentOptions {
        endpoint: server.ws_url(),
        token: Some(api.token("lean").await?),
        description: vec![("service.name".into(), "otelcol".into())],
        capabilities: agent::DEFAULT_CAPABILITIES | proto::agent_caps::REPORTS_AVAILABLE_COMPONENTS,
        available_components: BTreeMap::from([
            ("receivers".to_owned(), vec!["otlp".to_owned()]),
            ("exporters".to_owned(), vec!["debug".to_owned()]),
        ]),
        heartbeat: Duration::from_millis(300),
        ..AgentOptions::default()
    });
    let s = agent::wait_for(&mut agent.status(), DEADLINE, |s| {
        s.connected && s.instance_uid.is_some()
    })
    .await?;
    let uid = InstanceUid(s.instance_uid.unwrap_or_default());
    eventually("the set stored", DEADLINE, || async {
        let v = api.get(&format!("/api/v1/agents/{uid}/components")).await?;
        Ok((!v["components"].is_null()).then_some(()))
    })
    .await?;

    let before = snapshot(api, &[CHECKS]).await?;
    let broken = json!({ "name": "broken", "body": "a:\n\tb: 1\n" });
    let (status, _) = api
        .raw(Method::POST, "/api/v1/configs", Some(broken.clone()))
        .await?;
    assert_eq!(status, 409);
    let mut forced = broken;
    forced["force"] = json!(true);
    api.post("/api/v1/configs", forced).await?;
    let (id, _) = api.config("kafka", KAFKA).await?;
    let push = json!({ "config_id": id, "all": true });
    let (status, _) = api
        .raw(Method::POST, "/api/v1/assignments", Some(push))
        .await?;
    assert_eq!(status, 409);
    api.assign(json!({ "config_id": id, "all": true, "force": true }))
        .await?;
    expect_changes(
        api,
        &[CHECKS],
        &before,
        &[
            (&check("create", "refused"), 1.0),
            (&check("create", "forced"), 1.0),
            (&check("create", "passed"), 1.0),
            (&check("push", "refused"), 1.0),
            (&check("push", "forced"), 1.0),
        ],
    )
    .await?;
    agent.stop().await;
    server.stop().await
}
