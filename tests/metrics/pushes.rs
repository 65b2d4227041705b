//! The push window (`opamp.push_window`, `ampora_push_answers_overdue_total`): a push to more
//! agents than the window holds reaches every one of them, each agent's answer freeing its
//! place, so no offer waits for the overdue deadline.

use agent::{wait_for, Agent, AgentOptions};
use serde_json::json;
use shared::ids::InstanceUid;
use tests::{TestServer, DEADLINE};

use crate::{alone, expect_changes, snapshot};

const OVERDUE: &str = "ampora_push_answers_overdue_total";

#[tokio::test]
async fn a_push_wider_than_the_window_is_paced_by_the_answers() -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start_with(|c| c.opamp.push_window = 2).await?;
    let api = &server.api;
    let mut agents = Vec::new();
    let mut uids = Vec::new();
    for i in 0..12 {
        let o = AgentOptions {
            endpoint: server.ws_url(),
            token: Some(api.token(&format!("paced-{i}")).await?),
            instance_uid: Some(InstanceUid::new_v7().0),
            non_identifying: vec![("fleet".into(), "paced".into())],
            // Only the offers make them speak: the window is freed by answers, not heartbeats.
            heartbeat: std::time::Duration::from_secs(600),
            ..AgentOptions::default()
        };
        let a = Agent::start(o);
        let s = wait_for(&mut a.status(), DEADLINE, |s| s.connected && s.replies > 0).await?;
        uids.push(InstanceUid(s.instance_uid.unwrap_or_default()).to_string());
        agents.push(a);
    }
    for uid in &uids {
        api.wait_agent(uid, "listed", |a| a["connected"] == true)
            .await?;
    }
    let before = snapshot(api, &[OVERDUE]).await?;

    let (id, hash) = api.config("paced", "receivers: {}\n").await?;
    api.assign(json!({ "config_id": id, "labels": { "fleet": "paced" } }))
        .await?;
    // Six windows of two: with places freed only by the 5 s deadline this takes 30 s.
    for uid in &uids {
        api.wait_agent(uid, "the push applied", |a| {
            a["remote_config"]["hash"] == hash.as_str() && a["remote_config"]["status"] == "APPLIED"
        })
        .await?;
    }
    // Every place was freed by an answer.
    expect_changes(api, &[OVERDUE], &before, &[]).await?;
    for a in agents {
        a.stop().await;
    }
    Ok(())
}
