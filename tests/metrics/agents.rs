//! The fleet gauges (`ampora_agents_connected`, `ampora_agents_config_state{state}`) and the
//! remote-config counters (`ampora_config_remote_status_total{status}`, and
//! `ampora_opamp_frames_rejected_total{reason="cap_mismatch"}` for a config held back).

use agent::{wait_for, Agent, AgentOptions, AgentStatus};
use serde_json::json;
use shared::ids::InstanceUid;
use tests::{TestServer, DEADLINE};

use crate::{alone, expect_changes, expect_values, rejected, series, snapshot, REJECTED};

const CONNECTED: &str = "ampora_agents_connected";
const CONFIG_STATE: &str = "ampora_agents_config_state";
const REMOTE_STATUS: &str = "ampora_config_remote_status_total";

fn state(s: &str) -> String {
    series(CONFIG_STATE, "state", s)
}

fn status(s: &str) -> String {
    series(REMOTE_STATUS, "status", s)
}

fn agent(server: &TestServer, token: String, env: &str, caps: Option<u64>) -> Agent {
    let mut o = AgentOptions {
        endpoint: server.ws_url(),
        token: Some(token),
        instance_uid: Some(InstanceUid::new_v7().0),
        description: vec![("service.name".into(), format!("{env}-collector"))],
        non_identifying: vec![("env".into(), env.into())],
        heartbeat: std::time::Duration::from_millis(200),
        ..AgentOptions::default()
    };
    if let Some(caps) = caps {
        o.capabilities = caps;
    }
    Agent::start(o)
}

fn uid_of(s: &AgentStatus) -> String {
    s.instance_uid
        .map(|u| InstanceUid(u).to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn config_states_and_remote_statuses_are_counted() -> anyhow::Result<()> {
    let _alone = alone().await;
    // Offered to the agents: heartbeats come quickly.
    let server = TestServer::start_with(|c| c.opamp.heartbeat_interval_secs = 1).await?;
    let api = &server.api;
    let gauges = &[CONNECTED, CONFIG_STATE];
    // No agent yet.
    expect_values(api, gauges, &[]).await?;

    let applying = agent(&server, api.token("a").await?, "prod", None);
    let idle = agent(&server, api.token("i").await?, "dev", None);
    let failing = {
        let mut o = AgentOptions {
            endpoint: server.ws_url(),
            token: Some(api.token("f").await?),
            instance_uid: Some(InstanceUid::new_v7().0),
            description: vec![("service.name".into(), "failing-collector".into())],
            non_identifying: vec![("env".into(), "prod".into())],
            heartbeat: std::time::Duration::from_millis(200),
            ..AgentOptions::default()
        };
        o.fail_configs = true;
        Agent::start(o)
    };
    // Reports status and heartbeats only: a config for it is held back.
    let mute = agent(&server, api.token("m").await?, "prod", Some(0x1 | 0x2000));
    let mut uids = Vec::new();
    for a in [&applying, &idle, &failing, &mute] {
        let s = wait_for(&mut a.status(), DEADLINE, |s| s.connected && s.replies > 0).await?;
        uids.push(uid_of(&s));
    }
    for uid in &uids {
        api.wait_agent(uid, "listed", |a| a["connected"] == true)
            .await?;
    }
    expect_values(api, gauges, &[(CONNECTED, 4.0), (&state("none"), 4.0)]).await?;

    let counters = &[REMOTE_STATUS, REJECTED];
    let before = snapshot(api, counters).await?;
    let (id, _) = api.config("prod", "exporters: {}\n").await?;
    let res = api
        .assign(json!({ "config_id": id, "labels": { "env": "prod" } }))
        .await?;
    assert_eq!(res["matched_agents"], 3);
    api.wait_agent(&uids[0], "applied", |a| a["config_state"] == "applied")
        .await?;
    api.wait_agent(&uids[2], "failed", |a| a["config_state"] == "failed")
        .await?;
    api.wait_agent(&uids[3], "pending", |a| a["config_state"] == "pending")
        .await?;
    expect_values(
        api,
        gauges,
        &[
            (CONNECTED, 4.0),
            (&state("applied"), 1.0),
            (&state("none"), 1.0),
            (&state("failed"), 1.0),
            (&state("pending"), 1.0),
        ],
    )
    .await?;
    // One report each, and the config held back from the agent that cannot take it counted
    // once on its connection (not again when its next frame is not answered with it).
    let after = expect_changes(
        api,
        counters,
        &before,
        &[
            (&status("applied"), 1.0),
            (&status("failed"), 1.0),
            (&rejected("cap_mismatch"), 1.0),
        ],
    )
    .await?;
    // Heartbeats after that change nothing.
    for a in [&applying, &failing, &mute] {
        let mut st = a.status();
        let replies = st.borrow().replies;
        wait_for(&mut st, DEADLINE, |s| s.replies >= replies + 3).await?;
    }
    expect_changes(api, counters, &after, &[]).await?;

    idle.stop().await;
    expect_values(
        api,
        gauges,
        &[
            (CONNECTED, 3.0),
            (&state("applied"), 1.0),
            (&state("none"), 1.0),
            (&state("failed"), 1.0),
            (&state("pending"), 1.0),
        ],
    )
    .await?;
    for a in [applying, failing, mute] {
        a.stop().await;
    }
    server.stop().await
}
