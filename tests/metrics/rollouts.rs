//! The rollout metrics: `ampora_rollouts{state}`, `ampora_rollout_gate_failures_total{reason}`
//! and `ampora_rollout_agents{state}` (members of running rollouts by where they stand).

use agent::{wait_for, Agent, AgentOptions, AgentStatus};
use serde_json::{json, Value};
use shared::ids::InstanceUid;
use tests::{eventually, TestServer, DEADLINE};

use crate::{alone, expect_changes, expect_values, series, snapshot};

const ROLLOUTS: &str = "ampora_rollouts";
const GATE_FAILURES: &str = "ampora_rollout_gate_failures_total";
const MEMBERS: &str = "ampora_rollout_agents";
/// What the test agents refuse.
const BAD: &str = "exporter: broken";

async fn ring(server: &TestServer, ring: &str, n: usize) -> anyhow::Result<Vec<Agent>> {
    let mut out = Vec::new();
    for i in 0..n {
        let a = Agent::start(AgentOptions {
            endpoint: server.ws_url(),
            token: Some(server.api.token(&format!("{ring}-{i}")).await?),
            instance_uid: Some(InstanceUid::new_v7().0),
            non_identifying: vec![("ring".into(), ring.into())],
            fail_configs_containing: Some(BAD.into()),
            heartbeat: std::time::Duration::from_millis(200),
            ..AgentOptions::default()
        });
        let s: AgentStatus =
            wait_for(&mut a.status(), DEADLINE, |s| s.connected && s.replies > 0).await?;
        server
            .api
            .wait_agent(
                &InstanceUid(s.instance_uid.unwrap_or_default()).to_string(),
                "listed",
                |a| a["connected"] == true,
            )
            .await?;
        out.push(a);
    }
    Ok(out)
}

async fn wait_state(server: &TestServer, id: &Value, state: &str) -> anyhow::Result<()> {
    let path = format!("/api/v1/rollouts/{id}");
    eventually(&format!("rollout {id} {state}"), DEADLINE, || async {
        let v = server.api.get(&path).await?;
        Ok((v["rollout"]["state"] == state).then_some(()))
    })
    .await
}

#[tokio::test]
async fn rollouts_gate_failures_and_members_are_counted() -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start().await?;
    let api = &server.api;
    // Every series exists at zero before the first rollout (alert rules see them).
    expect_values(api, &[ROLLOUTS, MEMBERS], &[]).await?;
    let zero = snapshot(api, &[GATE_FAILURES]).await?;
    for reason in [
        "failed",
        "straggler",
        "disconnected",
        "unhealthy",
        "mismatched",
    ] {
        assert!(
            zero.has(&series(GATE_FAILURES, "reason", reason)),
            "{reason} at zero"
        );
    }

    // A canary that refuses the config: one failed gate, one failed rollout.
    let failing = ring(&server, "m-bad", 2).await?;
    let (bad, _) = api.config("m-bad", &format!("{BAD}\n")).await?;
    let r = api
        .post(
            "/api/v1/rollouts",
            json!({ "config_id": bad, "labels": { "ring": "m-bad" }, "stages": "1,100%", "soak": "0s" }),
        )
        .await?;
    wait_state(&server, &r["id"], "failed").await?;
    expect_values(
        api,
        &[ROLLOUTS],
        &[(&series(ROLLOUTS, "state", "failed"), 1.0)],
    )
    .await?;
    expect_changes(
        api,
        &[GATE_FAILURES],
        &zero,
        &[(&series(GATE_FAILURES, "reason", "failed"), 1.0)],
    )
    .await?;

    // A healthy rollout soaking its canary: one member applied, one not reached yet.
    let healthy = ring(&server, "m-good", 2).await?;
    let (good, _) = api.config("m-good", "exporter: fine\n").await?;
    let r = api
        .post(
            "/api/v1/rollouts",
            json!({ "config_id": good, "labels": { "ring": "m-good" }, "stages": "1,100%", "soak": "1h" }),
        )
        .await?;
    expect_values(
        api,
        &[MEMBERS],
        &[
            (&series(MEMBERS, "state", "applied"), 1.0),
            (&series(MEMBERS, "state", "not_reached"), 1.0),
        ],
    )
    .await?;
    expect_values(
        api,
        &[ROLLOUTS],
        &[
            (&series(ROLLOUTS, "state", "failed"), 1.0),
            (&series(ROLLOUTS, "state", "running"), 1.0),
        ],
    )
    .await?;
    api.post(&format!("/api/v1/rollouts/{}/abort", r["id"]), json!({}))
        .await?;
    expect_values(api, &[MEMBERS], &[]).await?;
    for a in failing.into_iter().chain(healthy) {
        a.stop().await;
    }
    server.stop().await
}
