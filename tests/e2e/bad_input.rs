//! Bad input is refused with the right status, and a well-behaved agent on the same server
//! keeps working throughout. (How each refusal is counted: the `metrics` test binary, whose
//! tests do not share the process's counters with others running at the same time.)

use std::time::Duration;

use agent::{wait_for, Agent, AgentOptions, HttpTransport, WsConnection};
use proto::Message;
use serde_json::json;
use shared::ids::InstanceUid;
use tests::{bearer, eventually, hello, TestServer, DEADLINE};

/// Status of a refused WebSocket upgrade with these headers.
async fn ws_refusal(
    server: &TestServer,
    headers: Vec<(String, String)>,
) -> anyhow::Result<(u16, String)> {
    match WsConnection::connect(&server.ws_url(), &headers).await {
        Ok(_) => anyhow::bail!("upgrade with {headers:?} must be refused"),
        Err(agent::ConnectError::Status { status, body, .. }) => Ok((status, body)),
        Err(e) => anyhow::bail!("unexpected connect error: {e}"),
    }
}

#[tokio::test]
async fn bad_input_is_refused_while_a_good_agent_keeps_working() -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| c.opamp.max_frame_bytes = 64 * 1024).await?;

    // The well-behaved agent.
    let good = Agent::start(AgentOptions {
        endpoint: server.ws_url(),
        token: Some(server.api.token("good").await?),
        instance_uid: Some(InstanceUid::new_v7().0),
        description: vec![("service.name".into(), "good".into())],
        heartbeat: Duration::from_millis(200),
        ..AgentOptions::default()
    });
    let mut good_st = good.status();
    let s = wait_for(&mut good_st, DEADLINE, |s| s.connected && s.replies > 0).await?;
    let good_uid = InstanceUid(s.instance_uid.expect("uid")).to_string();

    // --- Authentication ------------------------------------------------------------------
    let (status, _) = ws_refusal(&server, vec![]).await?;
    assert_eq!(status, 401, "no Authorization header");
    let token = server.api.token("bare").await?;
    let (status, body) = ws_refusal(&server, vec![("Authorization".into(), token.clone())]).await?;
    assert_eq!(status, 401, "token without Bearer scheme");
    assert!(
        body.contains("Bearer"),
        "reason must name the scheme: {body}"
    );
    let (status, body) = ws_refusal(&server, bearer(&token[..token.len() - 3])).await?;
    assert_eq!(
        (status, body.as_str()),
        (401, "malformed token"),
        "truncated token"
    );
    let (status, body) = ws_refusal(&server, bearer("amp-bs.aaaaaaaa.00000000")).await?;
    assert_eq!(status, 401);
    assert_eq!(
        body, "malformed token",
        "CRC mismatch is reported as malformed"
    );

    let revoked = server
        .api
        .post("/api/v1/tokens", json!({ "name": "r" }))
        .await?;
    let (s, _) = server
        .api
        .raw(
            reqwest::Method::DELETE,
            &format!(
                "/api/v1/tokens/{}",
                revoked["record"]["id"].as_str().expect("id")
            ),
            None,
        )
        .await?;
    assert_eq!(s, 204);
    let (status, body) = ws_refusal(&server, bearer(revoked["token"].as_str().expect("t"))).await?;
    assert_eq!((status, body.as_str()), (401, "token revoked"));

    // Already redeemed by the good agent: another agent is refused (HTTP knows the uid up front).
    let good_token = server.api.token("once").await?;
    let mut first = HttpTransport::new(&server.http_url(), bearer(&good_token), false);
    first.exchange(&hello(InstanceUid::new_v7())).await?;
    let mut second = HttpTransport::new(&server.http_url(), bearer(&good_token), false);
    match second.exchange(&hello(InstanceUid::new_v7())).await {
        Err(agent::ClientError::Status { status, .. }) => assert_eq!(status, 401),
        other => anyhow::bail!("second redemption must get 401, got {other:?}"),
    }
    // ... and over WebSocket the first frame of the other agent closes the connection.
    let mut ws = WsConnection::connect(&server.ws_url(), &bearer(&good_token)).await?;
    ws.send(&hello(InstanceUid::new_v7())).await?;
    let reply = ws.recv().await?;
    assert!(
        reply.is_some_and(|r| r.error_response.is_some()),
        "refusal is answered"
    );
    assert_eq!(
        ws.recv().await?.map(|_| ()),
        None,
        "then the connection closes"
    );
    assert_eq!(ws.close_info().map(|(code, _)| code), Some(1008));

    let audit = server.api.get("/api/v1/audit?reason=revoked").await?;
    assert!(
        audit
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["source_ip"] == "127.0.0.1")),
        "auth failures are audited with the source ip: {audit}"
    );
    for reason in [
        "missing_credentials",
        "wrong_scheme",
        "malformed_token",
        "already_redeemed",
    ] {
        let audit = server
            .api
            .get(&format!("/api/v1/audit?reason={reason}"))
            .await?;
        assert!(
            audit.as_array().is_some_and(|a| a
                .iter()
                .any(|e| e["action"] == "auth.failed" && e["source_ip"] == "127.0.0.1")),
            "{reason} must be audited: {audit}"
        );
    }

    // --- Frames --------------------------------------------------------------------------
    let token = server.api.token("frames").await?;
    let mut ws = WsConnection::connect(&server.ws_url(), &bearer(&token)).await?;
    let uid = InstanceUid::new_v7();
    ws.send(&hello(uid)).await?;
    assert!(ws.recv().await?.is_some());

    ws.send_raw(&[0x00, 0xFF, 0xFF, 0xFF], true).await?;
    let reply = ws.recv().await?.expect("malformed frame gets an answer");
    assert_eq!(
        reply.error_response.map(|e| e.r#type),
        Some(proto::v1::ServerErrorResponseType::BadRequest as i32)
    );
    // A non-zero varint header is malformed too.
    ws.send_raw(&[0x05, 0x0A, 0x00], true).await?;
    assert!(ws.recv().await?.is_some_and(|r| r.error_response.is_some()));

    // The connection survives malformed frames.
    let mut ok = hello(uid);
    ok.sequence_num = 1;
    ws.send(&ok).await?;
    assert!(ws.recv().await?.is_some_and(|r| r.error_response.is_none()));

    let mut big = hello(uid);
    big.sequence_num = 2;
    big.agent_description = Some(proto::v1::AgentDescription {
        identifying_attributes: vec![proto::v1::KeyValue {
            key: "blob".into(),
            value: Some(proto::v1::AnyValue {
                value: Some(proto::v1::any_value::Value::StringValue(
                    "x".repeat(100 * 1024),
                )),
            }),
        }],
        ..Default::default()
    });
    ws.send(&big).await?;
    assert_eq!(
        ws.recv().await?.map(|_| ()),
        None,
        "oversize closes the connection"
    );
    assert_eq!(ws.close_info().map(|(c, _)| c), Some(1009));

    // Plain HTTP: oversize → 413, garbage → 400, header/body uid mismatch → 400.
    let mut http = HttpTransport::new(&server.http_url(), bearer(&token), false);
    let ct = vec![("Content-Type".into(), "application/x-protobuf".into())];
    let (status, _) = http.post_raw(big.encode_to_vec(), &ct).await?;
    assert_eq!(status, 413);
    let (status, _) = http.post_raw(vec![0xFF, 0xFF, 0xFF], &ct).await?;
    assert_eq!(status, 400);
    let mut hdr = ct.clone();
    hdr.push(("OpAMP-Instance-UID".into(), "not-a-uuid".into()));
    let (status, _) = http.post_raw(hello(uid).encode_to_vec(), &hdr).await?;
    assert_eq!(status, 400, "wrong OpAMP-Instance-UID header value");

    // --- The good agent never noticed --------------------------------------------------------
    let replies = good_st.borrow().replies;
    let s = wait_for(&mut good_st, DEADLINE, |s| {
        s.connected && s.replies > replies + 2
    })
    .await?;
    assert!(s.connected);
    let (id, hash) = server.api.config("still-works", "a: 1\n").await?;
    server
        .api
        .assign(json!({ "config_id": id, "agent": good_uid }))
        .await?;
    eventually("good agent applied", DEADLINE, || async {
        Ok(server
            .api
            .agent(&good_uid)
            .await?
            .filter(|a| a["config_state"] == "applied" && a["remote_config"]["hash"] == hash))
    })
    .await?;
    good.stop().await;
    server.stop().await
}
