//! Messages built to make the gateway spend memory on decoding (issue 17, finding 11): a
//! description of millions of empty attributes is refused before it is decoded
//! (`too_many_fields`), and large messages at once are held to the decode budget
//! (`memory_budget`: 503 / Unavailable with a retry delay), while a normal agent carries on.
//! How each refusal is counted is asserted in the serial metrics binary
//! (`tests/metrics/decoding.rs`).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use agent::{wait_for, Agent, AgentOptions, ClientError, HttpTransport, WsConnection};
use anyhow::{bail, Context as _};
use proto::v1::{AgentDescription, KeyValue, ServerErrorResponseType};
use proto::AgentToServer;
use shared::ids::InstanceUid;
use tests::{bearer, eventually, hello, TestServer, DEADLINE};

/// A hello of `uid` describing itself with `n` attributes whose keys are `key_len` bytes long
/// (empty attributes for 0: two bytes each on the wire).
fn described(uid: InstanceUid, n: usize, key_len: usize) -> AgentToServer {
    let attribute = KeyValue {
        key: "k".repeat(key_len),
        value: None,
    };
    AgentToServer {
        agent_description: Some(AgentDescription {
            identifying_attributes: Vec::new(),
            non_identifying_attributes: vec![attribute; n],
        }),
        ..hello(uid)
    }
}

/// A normal agent, connected and answered.
async fn normal_agent(server: &TestServer) -> anyhow::Result<Agent> {
    let token = server.api.token("normal").await?;
    let agent = Agent::start(AgentOptions {
        endpoint: server.ws_url(),
        token: Some(token),
        instance_uid: Some(InstanceUid::new_v7().0),
        heartbeat: Duration::from_millis(200),
        ..AgentOptions::default()
    });
    let mut st = agent.status();
    wait_for(&mut st, DEADLINE, |s| s.connected && s.replies > 0).await?;
    Ok(agent)
}

/// The agent is still connected and answered: two more replies after `now`.
async fn still_served(agent: &Agent) -> anyhow::Result<()> {
    let mut st = agent.status();
    let replies = st.borrow().replies;
    wait_for(&mut st, DEADLINE, |s| {
        s.connected && s.replies >= replies + 2
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn millions_of_empty_attributes_are_refused_before_decoding() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let agent = normal_agent(&server).await?;

    // The review's message: 4 MB of empty attributes, two million of them.
    let uid = InstanceUid::new_v7();
    let hostile = described(uid, 2_000_000, 0);

    // Plain HTTP: 400, saying why.
    let token = server.api.token("hostile-http").await?;
    let mut http = HttpTransport::new(&server.http_url(), bearer(&token), false);
    match http.exchange(&hostile).await {
        Err(ClientError::Status { status, body, .. }) => {
            assert_eq!(status, 400, "{body}");
            assert!(body.contains("attributes"), "{body}");
        }
        other => bail!("expected 400, got {other:?}"),
    }
    // WebSocket: a BadRequest error response, addressed to the agent, on an open connection.
    let token = server.api.token("hostile-ws").await?;
    let mut ws = WsConnection::connect_with(&server.ws_url(), &bearer(&token), None, None).await?;
    ws.send(&hostile).await?;
    let reply = ws.recv().await?.context("closed instead of answering")?;
    let error = reply.error_response.context("an error response")?;
    assert_eq!(error.r#type, ServerErrorResponseType::BadRequest as i32);
    assert!(error.error_message.contains("attributes"), "{error:?}");
    assert_eq!(reply.instance_uid, uid.0.to_vec());
    ws.close(1000, "done").await;

    // Never reached a coordinator: the agent does not exist.
    assert!(server.api.agent(&uid.to_string()).await?.is_none());
    still_served(&agent).await?;
    agent.stop().await;
    server.stop().await
}

/// Messages of this gateway's frame limit at once.
const CONCURRENT: usize = 12;

#[tokio::test]
async fn concurrent_large_messages_are_held_to_the_decode_budget() -> anyhow::Result<()> {
    // Room for one of the messages below (each costs ~9 MB to hold decoded), not two.
    let server = TestServer::start_with(|c| c.opamp.decode_budget_bytes = 16 << 20).await?;
    let agent = normal_agent(&server).await?;

    // 4,000 attributes (within opamp.max_attributes) of 900-byte keys: ~3.6 MB each.
    let uid = InstanceUid::new_v7();
    let large = described(uid, 4000, 900);
    let token = server.api.token("large").await?;
    let transport = |i: usize| {
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 1, u8::try_from(i + 1).unwrap_or(1)));
        HttpTransport::new(&server.http_url(), bearer(&token), false).with_source_ip(Some(source))
    };
    // Bind the token to the agent first, so every large message is the same agent's.
    transport(0).exchange(&hello(uid)).await?;

    // Bursts until one is refused for the budget (the others are decoded and answered).
    eventually("a burst refused for the decode budget", DEADLINE, || {
        let mut sends = tokio::task::JoinSet::new();
        for i in 0..CONCURRENT {
            let mut http = transport(i + 1);
            let msg = large.clone();
            sends.spawn(async move { http.exchange(&msg).await });
        }
        async move {
            let mut refused = 0;
            while let Some(result) = sends.join_next().await {
                match result? {
                    Ok(reply) => {
                        anyhow::ensure!(reply.error_response.is_none(), "{reply:?}")
                    }
                    Err(ClientError::Status {
                        status: 503,
                        retry_after,
                        body,
                    }) if body.contains("busy") => {
                        anyhow::ensure!(retry_after.is_some(), "503 without Retry-After");
                        refused += 1;
                    }
                    Err(e) => bail!("expected 200 or 503 busy, got {e}"),
                }
            }
            Ok((refused > 0).then_some(()))
        }
    })
    .await?;
    still_served(&agent).await?;
    agent.stop().await;
    server.stop().await
}
