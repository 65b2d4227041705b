//! Messages refused for what decoding them would cost
//! (`ampora_opamp_frames_rejected_total`: `too_many_fields` before decoding, `memory_budget`
//! beyond the decode budget), counted once per refusal. The answers themselves (400,
//! BadRequest, 503 + Retry-After) and that a normal agent carries on are e2e's
//! (`e2e/hostile_input.rs`).

use std::net::{IpAddr, Ipv4Addr};

use agent::{ClientError, HttpTransport, WsConnection};
use proto::v1::{AgentDescription, KeyValue};
use proto::AgentToServer;
use shared::ids::InstanceUid;
use tests::{bearer, hello, TestServer, DEADLINE};

use crate::{alone, expect_changes, rejected, snapshot, REJECTED};

/// A hello of `uid` with `n` attributes whose keys are `key_len` bytes long.
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

#[tokio::test]
async fn too_many_fields_is_counted_once_per_message() -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start().await?;
    let api = &server.api;
    let hostile = described(InstanceUid::new_v7(), 2_000_000, 0);
    let (t_http, t_ws) = (api.token("http").await?, api.token("ws").await?);
    let s = snapshot(api, &[REJECTED]).await?;

    let mut http = HttpTransport::new(&server.http_url(), bearer(&t_http), false);
    match http.exchange(&hostile).await {
        Err(ClientError::Status { status: 400, .. }) => {}
        other => anyhow::bail!("expected 400, got {other:?}"),
    }
    let s = expect_changes(api, &[REJECTED], &s, &[(&rejected("too_many_fields"), 1.0)]).await?;

    let mut ws = WsConnection::connect(&server.ws_url(), &bearer(&t_ws)).await?;
    ws.send(&hostile).await?;
    let reply = ws.recv().await?;
    assert!(reply.is_some_and(|r| r.error_response.is_some()));
    let s = expect_changes(api, &[REJECTED], &s, &[(&rejected("too_many_fields"), 1.0)]).await?;

    // The same connection's next, normal message is no refusal.
    ws.send(&AgentToServer {
        sequence_num: 1,
        ..hello(InstanceUid::new_v7())
    })
    .await?;
    assert!(ws.recv().await?.is_some());
    expect_changes(api, &[REJECTED], &s, &[]).await?;
    ws.close(1000, "done").await;
    server.stop().await
}

const CONCURRENT: usize = 12;

#[tokio::test]
async fn memory_budget_is_counted_once_per_refused_message() -> anyhow::Result<()> {
    let _alone = alone().await;
    // Room for one of the messages below (~9 MB each held decoded), not two.
    let server = TestServer::start_with(|c| c.opamp.decode_budget_bytes = 16 << 20).await?;
    let api = &server.api;
    let uid = InstanceUid::new_v7();
    let large = described(uid, 4000, 900);
    let token = api.token("large").await?;
    let transport = |i: usize| {
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 1, u8::try_from(i + 1).unwrap_or(1)));
        HttpTransport::new(&server.http_url(), bearer(&token), false).with_source_ip(Some(source))
    };
    transport(0).exchange(&hello(uid)).await?;
    let s = snapshot(api, &[REJECTED]).await?;

    // Bursts until at least one message is refused for the budget; every refusal seen is
    // counted, and nothing else.
    let start = std::time::Instant::now();
    let mut busy = 0;
    while busy == 0 {
        anyhow::ensure!(start.elapsed() < DEADLINE, "no burst was refused");
        let mut sends = tokio::task::JoinSet::new();
        for i in 0..CONCURRENT {
            let mut http = transport(i + 1);
            let msg = large.clone();
            sends.spawn(async move { http.exchange(&msg).await });
        }
        while let Some(result) = sends.join_next().await {
            match result? {
                Ok(reply) => anyhow::ensure!(reply.error_response.is_none(), "{reply:?}"),
                Err(ClientError::Status { status: 503, .. }) => busy += 1,
                Err(e) => anyhow::bail!("expected 200 or 503, got {e}"),
            }
        }
    }
    expect_changes(
        api,
        &[REJECTED],
        &s,
        &[(&rejected("memory_budget"), f64::from(busy))],
    )
    .await?;
    server.stop().await
}
