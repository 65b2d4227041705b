//! Custom capabilities and messages on the embedded default: the agent's declared
//! capabilities are recorded and Ampora announces the one it relays; an operator's message
//! for a declared capability reaches the agent and its reply is kept; a message for a
//! capability the agent did not declare is refused and never sent; the agent's messages for a
//! capability Ampora does not relay are ignored.

use std::time::Duration;

use agent::{Agent, AgentOptions, Scheme};
use reqwest::Method;
use serde_json::json;
use tests::{eventually, TestServer};

const WAIT: Duration = Duration::from_secs(20);
const ECHO: &str = "com.example.echo";
const OTHER: &str = "com.example.other/v2";

async fn echoing_agent(server: &TestServer, endpoint: String) -> anyhow::Result<(Agent, String)> {
    let token = server.api.token("custom").await?;
    tests::connected_agent(AgentOptions {
        endpoint,
        token: Some(token),
        description: vec![("service.name".into(), "custom".into())],
        custom_capabilities: vec![ECHO.into(), OTHER.into()],
        echo_custom_messages: true,
        heartbeat: Duration::from_millis(200),
        ..AgentOptions::default()
    })
    .await
}

async fn round_trip(server: &TestServer, agent: &Agent, uid: &str) -> anyhow::Result<()> {
    let path = format!("/api/v1/agents/{uid}/custom-messages");
    let declared = server.api.get(&path).await?;
    assert_eq!(declared["capabilities"], json!([ECHO, OTHER]), "{declared}");
    assert_eq!(declared["relayed"], json!([ECHO]), "{declared}");
    assert_eq!(agent.status().borrow().server_custom_capabilities, [ECHO]);

    // A capability the agent did not declare: refused, nothing sent.
    let (status, body) = server
        .api
        .raw(
            Method::POST,
            &path,
            Some(json!({ "capability": "com.example.absent", "type": "ping", "data": "x" })),
        )
        .await?;
    assert_eq!(status, 409, "{body}");

    // One the agent declared but Ampora does not relay: sent; the agent's echo is ignored.
    let (status, body) = server
        .api
        .raw(
            Method::POST,
            &path,
            Some(json!({ "capability": OTHER, "type": "ping", "data": "not kept" })),
        )
        .await?;
    assert_eq!(status, 204, "{body}");
    // The relayed one: the reply is kept.
    let (status, body) = server
        .api
        .raw(
            Method::POST,
            &path,
            Some(json!({ "capability": ECHO, "type": "ping", "data": "hello" })),
        )
        .await?;
    assert_eq!(status, 204, "{body}");
    let kept = eventually("the echo kept", WAIT, || async {
        let v = server.api.get(&path).await?;
        let msgs = v["messages"].as_array().cloned().unwrap_or_default();
        Ok((!msgs.is_empty()).then_some(msgs))
    })
    .await?;
    assert_eq!(
        kept.len(),
        1,
        "only the relayed capability's reply: {kept:?}"
    );
    assert_eq!(kept[0]["capability"], ECHO);
    assert_eq!(kept[0]["type"], "ping.reply");
    assert_eq!(kept[0]["text"], "hello");
    let got = agent.status().borrow().custom_messages.clone();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().all(|(c, _, _)| c != "com.example.absent"));
    let audit = server.api.get("/api/v1/audit?limit=50").await?;
    let sent = audit.as_array().map_or(0, |rows| {
        rows.iter()
            .filter(|r| r["action"] == "agent.custom_message")
            .count()
    });
    assert_eq!(sent, 2, "{audit}");
    Ok(())
}

#[tokio::test]
async fn a_custom_message_round_trip_over_websocket_and_http() -> anyhow::Result<()> {
    let server =
        TestServer::start_with(|c| c.opamp.custom_capabilities = vec![ECHO.into()]).await?;
    let (ws, ws_uid) = echoing_agent(&server, server.ws_url()).await?;
    round_trip(&server, &ws, &ws_uid).await?;
    ws.stop().await;

    let other = TestServer::start_with(|c| c.opamp.custom_capabilities = vec![ECHO.into()]).await?;
    let (http, http_uid) = echoing_agent(&other, other.http_url()).await?;
    assert_eq!(http.status().borrow().transport, Some(Scheme::Http));
    round_trip(&other, &http, &http_uid).await?;
    http.stop().await;
    other.stop().await?;
    server.stop().await
}
