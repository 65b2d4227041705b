//! Restarts on the embedded default: one agent restarted by an operator (audited), one that
//! does not declare AcceptsRestartCommand refused and never sent the command; a fleet
//! restarted in batches, where an agent that never comes back stops the restart and the
//! agents of later batches are never sent it.

use std::time::Duration;

use agent::{Agent, AgentOptions};
use reqwest::Method;
use serde_json::{json, Value};
use tests::{eventually, TestServer};

const WAIT: Duration = Duration::from_secs(20);

async fn start(
    server: &TestServer,
    name: &str,
    restartable: bool,
    never_returns: bool,
) -> anyhow::Result<(Agent, String)> {
    let token = server.api.token(name).await?;
    let mut caps = agent::DEFAULT_CAPABILITIES;
    if restartable {
        caps |= proto::agent_caps::ACCEPTS_RESTART_COMMAND;
    }
    tests::connected_agent(AgentOptions {
        endpoint: server.ws_url(),
        token: Some(token),
        description: vec![("service.name".into(), name.into())],
        non_identifying: vec![("env".into(), "canary".into())],
        capabilities: caps,
        restart_never_returns: never_returns,
        heartbeat: Duration::from_millis(300),
        ..AgentOptions::default()
    })
    .await
}

#[tokio::test]
async fn an_operator_restarts_one_agent_and_not_one_that_cannot() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let (able, able_uid) = start(&server, "able", true, false).await?;
    let (unable, unable_uid) = start(&server, "unable", false, false).await?;
    let (status, _) = server
        .api
        .raw(
            Method::POST,
            &format!("/api/v1/agents/{able_uid}/restart"),
            None,
        )
        .await?;
    assert_eq!(status, 204);
    // It took the command and came back on a new connection.
    let s = agent::wait_for(&mut able.status(), WAIT, |s| {
        s.restart_commands == 1 && s.connected && s.connections_established >= 2
    })
    .await?;
    assert_eq!(s.restart_commands, 1);
    let (status, body) = server
        .api
        .raw(
            Method::POST,
            &format!("/api/v1/agents/{unable_uid}/restart"),
            None,
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("AcceptsRestartCommand")),
        "{body}"
    );
    let audit = server.api.get("/api/v1/audit?limit=100").await?;
    let restarts: Vec<&Value> = audit
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter(|r| r["action"] == "agent.restart")
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(restarts.len(), 1, "{audit}");
    assert_eq!(restarts[0]["instance_uid"], able_uid);
    assert_eq!(restarts[0]["actor"], "api:admin");
    assert_eq!(unable.status().borrow().restart_commands, 0);
    able.stop().await;
    unable.stop().await;
    server.stop().await
}

#[tokio::test]
async fn a_fleet_restarts_in_batches_and_stops_at_one_that_never_comes_back() -> anyhow::Result<()>
{
    let server = TestServer::start().await?;
    let mut agents = Vec::new();
    for (i, never) in [false, true, false, false, false].into_iter().enumerate() {
        agents.push(start(&server, &format!("collector-{i}"), true, never).await?);
    }
    let (old, old_uid) = start(&server, "no-restart", false, false).await?;
    let job = server
        .api
        .post(
            "/api/v1/restarts",
            json!({ "labels": { "env": "canary" }, "batch": 2, "deadline": "3s", "budget": 0 }),
        )
        .await?;
    let id = job["id"].as_u64().expect("restart id");
    assert_eq!(job["unable"], json!([old_uid]), "{job}");
    let done = eventually("the restart ended", WAIT, || async {
        let v = server.api.get(&format!("/api/v1/restarts/{id}")).await?;
        Ok((v["state"] != "running").then_some(v))
    })
    .await?;
    assert_eq!(done["state"], "stopped", "{done}");
    assert!(
        done["reason"]
            .as_str()
            .is_some_and(|r| r.contains("budget")),
        "{done}"
    );
    let members = done["members"].as_array().cloned().unwrap_or_default();
    let state_of = |uid: &str| {
        members
            .iter()
            .find(|m| m["uid"] == uid)
            .map(|m| m["state"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    // Members are restarted in batches of two, in the order listed: the one that never came
    // back failed; the batches before it and its partner restarted; later ones were not sent.
    let failed_at = members
        .iter()
        .position(|m| m["state"] == "failed")
        .expect("a failed member");
    assert_eq!(state_of(&agents[1].1), "failed", "{done}");
    for (i, m) in members.iter().enumerate() {
        let want = if i == failed_at {
            "failed"
        } else if i / 2 <= failed_at / 2 {
            "restarted"
        } else {
            "not_sent"
        };
        assert_eq!(m["state"], want, "member {i}: {done}");
    }
    for (agent, uid) in &agents {
        let commands = agent.status().borrow().restart_commands;
        let sent = u64::from(state_of(uid) != "not_sent");
        assert_eq!(commands, sent, "{uid}: {done}");
    }
    assert_eq!(old.status().borrow().restart_commands, 0);
    for (a, _) in agents {
        a.stop().await;
    }
    old.stop().await;
    server.stop().await
}

/// From the console: the agent page's Restart button, then the Restarts page restarting every
/// agent one at a time, watched until it succeeded.
#[tokio::test]
async fn an_operator_restarts_from_the_console() -> anyhow::Result<()> {
    use crate::console::{click_confirmed, sign_in};
    let server = TestServer::start().await?;
    let (first, first_uid) = start(&server, "console-first", true, false).await?;
    let (second, _) = start(&server, "console-second", true, false).await?;
    let b = tests::browser::Browser::start().await?;
    sign_in(&b, &server, &server.api.token).await?;
    b.goto(&format!("http://{}/ui/agents/{first_uid}", server.addr))
        .await?;
    b.screenshot("51-agent-restart").await?;
    click_confirmed(&b, "#restart button").await?;
    agent::wait_for(&mut first.status(), WAIT, |s| s.restart_commands == 1).await?;

    // From the Groups page: the group's Restart… link opens the form with it chosen.
    server
        .api
        .put_json(
            "/api/v1/groups/canary",
            json!({ "labels": { "env": "canary" } }),
        )
        .await?;
    b.goto(&format!("http://{}/ui/groups", server.addr)).await?;
    b.click("tr[data-group=canary] a.restart-group").await?;
    let chosen = b
        .client
        .execute(
            "return document.querySelector('#new-restart select[name=group]').value;",
            vec![],
        )
        .await?;
    assert_eq!(chosen, json!("canary"));
    b.client
        .execute(
            "document.querySelector('#new-restart input[name=batch]').value = '1';\
             document.querySelector('#new-restart input[name=deadline]').value = '10s';",
            vec![],
        )
        .await?;
    click_confirmed(&b, "#new-restart button").await?;
    eventually("the restart succeeded on the page", WAIT, || async {
        b.client.refresh().await?;
        let t = b.text("section.restart").await?;
        Ok(t.contains("succeeded").then_some(()))
    })
    .await?;
    let page = b.text("section.restart").await?;
    assert!(
        page.contains("batches of 1") && page.contains("deadline 10 s"),
        "{page}"
    );
    assert_eq!(first.status().borrow().restart_commands, 2);
    assert_eq!(second.status().borrow().restart_commands, 1);
    b.no_markup_ran().await?;
    b.screenshot("52-restarts").await?;
    first.stop().await;
    second.stop().await;
    server.stop().await
}
