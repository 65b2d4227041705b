//! The WebSocket and HTTP transports against the fake server: connect, uid assignment,
//! config, heartbeats and polling, reconnects, refusals, goodbye.

use super::*;

#[tokio::test]
async fn ws_agent_gets_uid_applies_config_heartbeats_and_says_goodbye() {
    let srv = FakeServer::start(Script {
        assign_uid: true,
        config_at: Some((1, b"h1", "x: 1\n")),
        ..Script::default()
    })
    .await;
    let agent = Agent::start(AgentOptions {
        endpoint: srv.ws_url("/v1/opamp"),
        token: Some("tok".into()),
        description: vec![("service.name".into(), "t".into())],
        // Long enough that no heartbeat slips in before the first replies.
        heartbeat: Duration::from_millis(300),
        initial_config: "x: 0\n".into(),
        ..AgentOptions::default()
    });
    let mut st = agent.status();
    let s = wait_for(&mut st, DEADLINE, |s| {
        s.connected && s.applied_configs == 1 && s.replies >= 6
    })
    .await
    .expect("agent progresses");
    assert_eq!(s.instance_uid, Some(NEW_UID));
    assert_eq!(s.effective_config, "x: 1\n");
    assert_eq!(s.last_remote_config_hash.as_deref(), Some(&b"h1"[..]));
    assert_eq!(s.server_capabilities, 0x67);
    agent.stop().await;
    srv.until("close 1000", |l| l.close_codes == [1000]).await;

    let msgs = srv.msgs();
    assert_consecutive(&msgs);
    let first = &msgs[0].1;
    assert_eq!(first.sequence_num, 0);
    assert_eq!(first.flags, agent_flags::REQUEST_INSTANCE_UID);
    assert!(first.agent_description.is_some() && first.effective_config.is_some());
    // Reply 0 assigned the uid: message 1 is the full report under it; reply 1 carried the
    // config, so APPLYING and APPLIED follow.
    assert_eq!(msgs[1].1.instance_uid, NEW_UID.to_vec());
    assert_eq!(msgs[1].1.flags, 0);
    assert!(msgs[1].1.agent_description.is_some());
    assert_eq!(
        status_of(&msgs[2].1),
        Some(RemoteConfigStatuses::Applying as i32)
    );
    assert_eq!(
        status_of(&msgs[3].1),
        Some(RemoteConfigStatuses::Applied as i32)
    );
    // Heartbeats: header only.
    let hb = &msgs[4].1;
    assert!(hb.agent_description.is_none() && hb.remote_config_status.is_none());
    assert_eq!(hb.instance_uid, NEW_UID.to_vec());
    let last = &msgs.last().expect("some").1;
    assert!(last.agent_disconnect.is_some(), "last message says goodbye");
    let log = srv.log.lock().expect("lock");
    assert_eq!(log.headers[0][0].as_deref(), Some("Bearer tok"));
    assert_eq!(log.connections, 1);
}

#[tokio::test]
async fn ws_agent_adopts_server_heartbeat() {
    let srv = FakeServer::start(Script {
        heartbeat_secs: Some(3600),
        ..Script::default()
    })
    .await;
    let agent = Agent::start(AgentOptions {
        endpoint: srv.ws_url("/v1/opamp"),
        instance_uid: Some([1; 16]),
        heartbeat: Duration::from_millis(150),
        ..AgentOptions::default()
    });
    let s = wait_for(&mut agent.status(), DEADLINE, |s| s.heartbeat_secs == 3600)
        .await
        .expect("adopted");
    assert_eq!(s.replies, 1);
    // With a one-hour interval no heartbeat follows the first exchange: over a window of
    // several of the old 150 ms intervals, a second message never arrives.
    let second = poll(QUIET_WINDOW, POLL, || {
        std::future::ready((srv.msgs().len() >= 2).then_some(()))
    })
    .await;
    assert!(
        second.is_none(),
        "a heartbeat was sent: {:?}",
        srv.msgs().len()
    );
    assert_eq!(srv.msgs().len(), 1);
    agent.stop().await;
}

#[tokio::test]
async fn ws_agent_reconnects_after_server_close_and_resends_full_state() {
    let srv = FakeServer::start(Script {
        close_first_with: Some(1001),
        ..Script::default()
    })
    .await;
    let agent = Agent::start(AgentOptions {
        endpoint: srv.ws_url("/v1/opamp"),
        instance_uid: Some([2; 16]),
        ..AgentOptions::default()
    });
    let s = wait_for(&mut agent.status(), DEADLINE, |s| {
        s.connected && s.replies >= 2
    })
    .await
    .expect("reconnected");
    assert!(
        s.last_error.as_deref().is_some_and(|e| e.contains("1001")),
        "{:?}",
        s.last_error
    );
    agent.stop().await;
    let msgs = srv.msgs();
    assert_consecutive(&msgs);
    let second = msgs
        .iter()
        .find(|(c, _)| *c == 2)
        .expect("second connection");
    assert!(
        second.1.agent_description.is_some(),
        "full state on reconnect"
    );
    assert!(
        second.1.sequence_num > 0,
        "sequence continues across reconnects"
    );
}

#[tokio::test]
async fn ws_refusals_carry_status_body_and_retry_after() {
    let srv = FakeServer::start(Script::default()).await;
    match WsConnection::connect(&srv.ws_url("/deny"), &[]).await {
        Err(ConnectError::Status {
            status,
            retry_after,
            body,
        }) => {
            assert_eq!(
                (status, retry_after, body.as_str()),
                (401, None, "unknown token")
            );
        }
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    match WsConnection::connect(&srv.ws_url("/busy"), &[]).await {
        Err(e) => assert_eq!(e.retry_after(), Some(Duration::from_secs(7))),
        Ok(_) => panic!("expected 503"),
    }
    assert!(matches!(
        WsConnection::connect(&srv.http_url("/v1/opamp"), &[]).await,
        Err(ConnectError::Url(_))
    ));
    // An agent keeps the refusal as its last error and does not count it as a reply.
    let agent = Agent::start(AgentOptions {
        endpoint: srv.ws_url("/deny"),
        ..AgentOptions::default()
    });
    let s = wait_for(&mut agent.status(), DEADLINE, |s| s.last_error.is_some())
        .await
        .expect("error");
    assert_eq!(s.last_error.as_deref(), Some("401: unknown token"));
    assert_eq!(s.replies, 0);
    agent.stop().await;
}

#[tokio::test]
async fn ws_connection_reports_server_close() {
    let srv = FakeServer::start(Script {
        close_first_with: Some(1008),
        ..Script::default()
    })
    .await;
    let mut ws = WsConnection::connect(&srv.ws_url("/v1/opamp"), &[])
        .await
        .expect("connect");
    ws.send(&AgentToServer {
        instance_uid: vec![3; 16],
        ..AgentToServer::default()
    })
    .await
    .expect("send");
    let reply = ws.recv().await.expect("recv").expect("a reply");
    assert_eq!(reply.instance_uid, vec![3; 16]);
    assert!(ws.recv().await.expect("clean close").is_none());
    assert_eq!(ws.close_info(), Some((1008, "go away".to_string())));
    assert!(ws.recv().await.expect("still closed").is_none());
}

#[tokio::test]
async fn http_exchange_sets_headers_gzips_and_reuses_the_connection() {
    let srv = FakeServer::start(Script::default()).await;
    let mut t = HttpTransport::new(
        &srv.http_url("/v1/opamp"),
        vec![("Authorization".into(), "Bearer x".into())],
        true,
    );
    let uid = [0x11u8; 16];
    for seq in 0..3 {
        let reply = t
            .exchange(&AgentToServer {
                instance_uid: uid.to_vec(),
                sequence_num: seq,
                ..AgentToServer::default()
            })
            .await
            .expect("exchange");
        assert_eq!(reply.instance_uid, uid.to_vec());
        assert_eq!(reply.capabilities, 0x67);
    }
    let log = srv.log.lock().expect("lock");
    assert_eq!(log.connections, 1, "kept alive");
    assert_eq!(log.msgs.len(), 3);
    let [auth, ct, ce, ae, uid_h] = log.headers[0].clone();
    assert_eq!(auth.as_deref(), Some("Bearer x"));
    assert_eq!(ct.as_deref(), Some("application/x-protobuf"));
    assert_eq!(ce.as_deref(), Some("gzip"));
    assert_eq!(ae.as_deref(), Some("gzip"));
    assert_eq!(
        uid_h.as_deref(),
        Some("11111111-1111-1111-1111-111111111111")
    );
}

#[tokio::test]
async fn http_errors_and_closed_connections() {
    let srv = FakeServer::start(Script {
        http_close: true,
        ..Script::default()
    })
    .await;
    let mut t = HttpTransport::new(&srv.http_url("/v1/opamp"), vec![], false);
    for _ in 0..2 {
        t.exchange(&AgentToServer::default())
            .await
            .expect("exchange");
    }
    assert_eq!(
        srv.log.lock().expect("lock").connections,
        2,
        "reconnects after close"
    );

    let mut busy = HttpTransport::new(&srv.http_url("/busy"), vec![], false);
    match busy.exchange(&AgentToServer::default()).await {
        Err(ClientError::Status {
            status,
            retry_after,
            body,
        }) => assert_eq!(
            (status, retry_after, body.as_str()),
            (503, Some(Duration::from_secs(7)), "overloaded")
        ),
        other => panic!("expected 503, got {other:?}"),
    }
    let (code, body) = busy.post_raw(vec![1, 2, 3], &[]).await.expect("raw");
    assert_eq!((code, body.as_slice()), (503, &b"overloaded"[..]));

    let mut bad = HttpTransport::new("ws://h/", vec![], false);
    assert!(matches!(
        bad.exchange(&AgentToServer::default()).await,
        Err(ClientError::Url(_))
    ));
}

#[tokio::test]
async fn http_agent_polls_applies_config_promptly_and_says_goodbye() {
    let srv = FakeServer::start(Script {
        config_at: Some((2, b"h9", "y: 2\n")),
        ..Script::default()
    })
    .await;
    let agent = Agent::start(AgentOptions {
        endpoint: srv.http_url("/v1/opamp"),
        instance_uid: Some([4; 16]),
        heartbeat: Duration::from_millis(30),
        ..AgentOptions::default()
    });
    let s = wait_for(&mut agent.status(), DEADLINE, |s| {
        s.applied_configs == 1 && s.replies >= 6
    })
    .await
    .expect("polls and applies");
    assert!(s.connected);
    assert!(s.last_error.is_none(), "{:?}", s.last_error);
    assert_eq!(s.effective_config, "y: 2\n");
    agent.stop().await;
    let msgs = srv.msgs();
    assert_consecutive(&msgs);
    assert!(msgs[0].1.agent_description.is_some());
    assert_eq!(
        status_of(&msgs[3].1),
        Some(RemoteConfigStatuses::Applying as i32)
    );
    assert_eq!(
        status_of(&msgs[4].1),
        Some(RemoteConfigStatuses::Applied as i32)
    );
    assert!(msgs
        .last()
        .is_some_and(|(_, m)| m.agent_disconnect.is_some()));
    let log = srv.log.lock().expect("lock");
    assert_eq!(
        log.connections, 1,
        "one kept-alive connection for all polls"
    );
    assert_eq!(
        log.headers[0][4].as_deref(),
        Some("04040404-0404-0404-0404-040404040404")
    );
}

#[tokio::test]
async fn unreachable_endpoint_backs_off_and_stops_promptly() {
    // Bind then drop: the port is (almost certainly) closed.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let agent = Agent::start(AgentOptions {
        endpoint: format!("ws://{addr}/v1/opamp"),
        ..AgentOptions::default()
    });
    let s = wait_for(&mut agent.status(), DEADLINE, |s| s.last_error.is_some())
        .await
        .expect("error");
    assert!(!s.connected);
    tokio::time::timeout(Duration::from_secs(1), agent.stop())
        .await
        .expect("stop does not wait for the backoff");
}
