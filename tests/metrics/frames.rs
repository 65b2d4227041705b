//! Frames: the ones refused by reason (`malformed`, `oversize`: the WebSocket's 1009 and plain
//! HTTP's 413 and 400), the ones received and sent by transport, and the tokens redeemed.

use agent::{ClientError, HttpTransport, WsConnection};
use proto::Message;
use shared::ids::InstanceUid;
use tests::{bearer, hello, TestServer};

use crate::{alone, expect_changes, rejected, series, snapshot, REJECTED};

const RECEIVED: &str = "ampora_opamp_frames_received_total";
const SENT: &str = "ampora_opamp_frames_sent_total";
const REDEEMED: &str = "ampora_tokens_redeemed_total";

/// A message of agent `uid` over `max` bytes.
fn oversize(uid: InstanceUid, seq: u64, max: u64) -> proto::AgentToServer {
    let mut big = hello(uid);
    big.sequence_num = seq;
    big.agent_description = Some(proto::v1::AgentDescription {
        identifying_attributes: vec![proto::v1::KeyValue {
            key: "blob".into(),
            value: Some(proto::v1::AnyValue {
                value: Some(proto::v1::any_value::Value::StringValue(
                    "x".repeat(usize::try_from(max).unwrap_or(usize::MAX) + 1),
                )),
            }),
        }],
        ..Default::default()
    });
    big
}

#[tokio::test]
async fn refused_frames_are_counted_by_reason() -> anyhow::Result<()> {
    let _alone = alone().await;
    const MAX: u64 = 64 * 1024;
    let server = TestServer::start_with(|c| c.opamp.max_frame_bytes = MAX).await?;
    let api = &server.api;
    let token = api.token("frames").await?;
    let mut ws = WsConnection::connect(&server.ws_url(), &bearer(&token)).await?;
    let uid = InstanceUid::new_v7();
    ws.send(&hello(uid)).await?;
    assert!(ws.recv().await?.is_some());
    let fam = &[REJECTED];
    let s = snapshot(api, fam).await?;

    // Garbage after the header, and a non-zero header: each answered, each counted.
    ws.send_raw(&[0x00, 0xFF, 0xFF, 0xFF], true).await?;
    assert!(ws.recv().await?.is_some_and(|r| r.error_response.is_some()));
    ws.send_raw(&[0x05, 0x0A, 0x00], true).await?;
    assert!(ws.recv().await?.is_some_and(|r| r.error_response.is_some()));
    let s = expect_changes(api, fam, &s, &[(&rejected("malformed"), 2.0)]).await?;

    // A good frame in between is not counted as anything refused.
    let mut ok = hello(uid);
    ok.sequence_num = 1;
    ws.send(&ok).await?;
    assert!(ws.recv().await?.is_some_and(|r| r.error_response.is_none()));
    let s = expect_changes(api, fam, &s, &[]).await?;

    // Oversize closes the WebSocket (1009).
    ws.send(&oversize(uid, 2, MAX)).await?;
    assert_eq!(ws.recv().await?.map(|_| ()), None);
    assert_eq!(ws.close_info().map(|(c, _)| c), Some(1009));
    let s = expect_changes(api, fam, &s, &[(&rejected("oversize"), 1.0)]).await?;

    // Plain HTTP: 413 for oversize, 400 for garbage and for a bad uid header.
    let mut http = HttpTransport::new(&server.http_url(), bearer(&token), false);
    let ct = vec![("Content-Type".into(), "application/x-protobuf".into())];
    let (status, _) = http
        .post_raw(oversize(uid, 3, MAX).encode_to_vec(), &ct)
        .await?;
    assert_eq!(status, 413);
    let s = expect_changes(api, fam, &s, &[(&rejected("oversize"), 1.0)]).await?;
    let (status, _) = http.post_raw(vec![0xFF, 0xFF, 0xFF], &ct).await?;
    assert_eq!(status, 400);
    let s = expect_changes(api, fam, &s, &[(&rejected("malformed"), 1.0)]).await?;
    let mut hdr = ct.clone();
    hdr.push(("OpAMP-Instance-UID".into(), "not-a-uuid".into()));
    let (status, _) = http.post_raw(hello(uid).encode_to_vec(), &hdr).await?;
    assert_eq!(status, 400);
    expect_changes(api, fam, &s, &[(&rejected("malformed"), 1.0)]).await?;
    server.stop().await
}

#[tokio::test]
async fn frames_are_counted_by_transport_and_tokens_when_redeemed() -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start().await?;
    let api = &server.api;
    let fam = &[RECEIVED, SENT, REDEEMED];
    let (ws_in, ws_out) = (
        series(RECEIVED, "transport", "ws"),
        series(SENT, "transport", "ws"),
    );
    let (http_in, http_out) = (
        series(RECEIVED, "transport", "http"),
        series(SENT, "transport", "http"),
    );
    let s = snapshot(api, fam).await?;

    // Three frames over a WebSocket, three replies; its token redeemed once.
    let token = api.token("ws").await?;
    let mut ws = WsConnection::connect(&server.ws_url(), &bearer(&token)).await?;
    let uid = InstanceUid::new_v7();
    for seq in 0..3 {
        let mut msg = hello(uid);
        msg.sequence_num = seq;
        ws.send(&msg).await?;
        assert!(ws.recv().await?.is_some_and(|r| r.error_response.is_none()));
    }
    let s = expect_changes(
        api,
        fam,
        &s,
        &[(&ws_in, 3.0), (&ws_out, 3.0), (REDEEMED, 1.0)],
    )
    .await?;
    ws.close(1000, "done").await;

    // The same agent again on its token: no second redemption.
    let mut ws = WsConnection::connect(&server.ws_url(), &bearer(&token)).await?;
    ws.send(&hello(uid)).await?;
    assert!(ws.recv().await?.is_some_and(|r| r.error_response.is_none()));
    let s = expect_changes(api, fam, &s, &[(&ws_in, 1.0), (&ws_out, 1.0)]).await?;
    ws.close(1000, "done").await;

    // Two plain-HTTP exchanges of one agent; a refused redemption of its token by another
    // agent is neither a frame received nor a redemption.
    let token = api.token("http").await?;
    let mut http = HttpTransport::new(&server.http_url(), bearer(&token), false);
    let uid = InstanceUid::new_v7();
    for seq in 0..2 {
        let mut msg = hello(uid);
        msg.sequence_num = seq;
        assert!(http.exchange(&msg).await?.error_response.is_none());
    }
    let mut other = HttpTransport::new(&server.http_url(), bearer(&token), false);
    match other.exchange(&hello(InstanceUid::new_v7())).await {
        Err(ClientError::Status { status, .. }) => assert_eq!(status, 401),
        other => anyhow::bail!("a second redemption must get 401, got {other:?}"),
    }
    expect_changes(
        api,
        fam,
        &s,
        &[(&http_in, 2.0), (&http_out, 2.0), (REDEEMED, 1.0)],
    )
    .await?;
    server.stop().await
}
