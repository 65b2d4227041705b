//! The opamp-go client behaviours the agent can take on (reconnect at once, restart on every
//! offer, forget its certificate on restart, transport from the offered scheme).

use super::*;

/// Messages the server received on connection `conn`.
fn on_conn(msgs: &[(usize, AgentToServer)], conn: usize) -> Vec<AgentToServer> {
    msgs.iter()
        .filter(|(c, _)| *c == conn)
        .map(|(_, m)| m.clone())
        .collect()
}

#[tokio::test]
async fn reconnect_at_once_after_server_close_and_error_responses() {
    // Every connection: an Unavailable error (retry in 30 s), then Close 1008.
    let srv = FakeServer::start(Script {
        error_then_close: Some((ServerErrorResponseType::Unavailable, 1008)),
        ..Script::default()
    })
    .await;
    let agent = Agent::start(AgentOptions {
        endpoint: srv.ws_url("/v1/opamp"),
        instance_uid: Some([0x21; 16]),
        reconnect_at_once_after_close: true,
        ..AgentOptions::default()
    });
    // Neither the error's retry delay nor a growing back-off holds it back: a new connection
    // cycle starts at once after every close.
    let s = wait_for(&mut agent.status(), DEADLINE, |s| {
        s.connections_established >= 6
    })
    .await
    .expect("reconnects at once");
    assert_eq!(
        s.last_close_reason.as_deref(),
        Some("1008 identity_required")
    );
    assert!(s.connections_attempted >= s.connections_established);
    assert_eq!(s.upgrade_refusals, 0);
    assert_eq!(s.transport, Some(Scheme::Ws));
    agent.stop().await;
    let msgs = srv.msgs();
    for conn in 1..=5 {
        let m = on_conn(&msgs, conn);
        assert!(
            m.iter().all(|m| m.agent_disconnect.is_none()),
            "an error response does not make it leave: connection {conn}"
        );
        assert!(m[0].agent_description.is_some(), "full state first");
    }
    // Accepted back to back: no gap of a back-off step between the first five.
    let log = srv.log.lock().expect("lock");
    let gaps: Vec<Duration> = log.accepted.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().take(4).all(|g| *g < Duration::from_millis(200)),
        "{gaps:?}"
    );
}

#[tokio::test]
async fn reconnect_at_once_backs_off_refusals_at_the_upgrade_and_honours_retry_after() {
    let srv = FakeServer::start(Script::default()).await;
    let agent = Agent::start(AgentOptions {
        endpoint: srv.ws_url("/deny"),
        instance_uid: Some([0x22; 16]),
        reconnect_at_once_after_close: true,
        ..AgentOptions::default()
    });
    let s = wait_for(&mut agent.status(), DEADLINE, |s| s.upgrade_refusals >= 3)
        .await
        .expect("refused three times");
    agent.stop().await;
    assert_eq!(s.connections_established, 0);
    assert!(s.connections_attempted >= 3);
    assert_eq!(s.transport, None);
    let accepted = srv.log.lock().expect("lock").accepted.clone();
    // 0.5 s then 1 s, each ±50 % (a little slack above for a loaded machine).
    let (g1, g2) = (accepted[1] - accepted[0], accepted[2] - accepted[1]);
    assert!(
        g1 >= Duration::from_millis(250) && g1 <= Duration::from_millis(1000),
        "first retry after 0.5 s ± 50 %: {g1:?}"
    );
    assert!(
        g2 >= Duration::from_millis(500) && g2 <= Duration::from_millis(2000),
        "then 1 s ± 50 %: {g2:?}"
    );

    // 503 with Retry-After: 1 s wins over the 0.25–0.75 s step.
    let srv = FakeServer::start(Script::default()).await;
    let agent = Agent::start(AgentOptions {
        endpoint: srv.ws_url("/busy1"),
        instance_uid: Some([0x23; 16]),
        reconnect_at_once_after_close: true,
        ..AgentOptions::default()
    });
    wait_for(&mut agent.status(), DEADLINE, |s| s.upgrade_refusals >= 2)
        .await
        .expect("refused twice");
    agent.stop().await;
    let accepted = srv.log.lock().expect("lock").accepted.clone();
    assert!(
        accepted[1] - accepted[0] >= Duration::from_secs(1),
        "Retry-After honoured: {:?}",
        accepted[1] - accepted[0]
    );

    // Plain HTTP: refused requests back off the same way and count as refusals.
    let srv = FakeServer::start(Script::default()).await;
    let agent = Agent::start(AgentOptions {
        endpoint: srv.http_url("/deny"),
        instance_uid: Some([0x24; 16]),
        reconnect_at_once_after_close: true,
        ..AgentOptions::default()
    });
    let s = wait_for(&mut agent.status(), DEADLINE, |s| s.upgrade_refusals >= 2)
        .await
        .expect("refused twice");
    agent.stop().await;
    assert!(s.connections_attempted >= 1 && s.connections_established >= 1);
    assert_eq!(s.replies, 0);
}

#[tokio::test]
async fn restart_on_settings_offer_restarts_the_client_on_every_offer() {
    // The same offer (same hash) on the first reply of the first two connections.
    let srv = FakeServer::start(Script {
        offer_first_connections: Some((2, "")),
        ..Script::default()
    })
    .await;
    let agent = Agent::start(AgentOptions {
        endpoint: srv.ws_url("/v1/opamp"),
        instance_uid: Some([0x25; 16]),
        // It would report ConnectionSettingsStatus were it not restarting on offers.
        capabilities: DEFAULT_CAPABILITIES | proto::agent_caps::REPORTS_CONNECTION_SETTINGS_STATUS,
        restart_on_settings_offer: true,
        ..AgentOptions::default()
    });
    let s = wait_for(&mut agent.status(), DEADLINE, |s| {
        s.connected && s.connections_established == 3
    })
    .await
    .expect("restarted twice");
    assert_eq!((s.settings_offers, s.client_restarts), (2, 2));
    assert_eq!(s.settings_offers_with_key, 0);
    agent.stop().await;
    let msgs = srv.msgs();
    for conn in 1..=3 {
        let m = on_conn(&msgs, conn);
        assert_eq!(m[0].sequence_num, 0, "a new client numbers from 0: {conn}");
        assert!(m[0].agent_description.is_some(), "full state first: {conn}");
        assert_ne!(
            m[0].capabilities & proto::agent_caps::ACCEPTS_OPAMP_CONNECTION_SETTINGS,
            0
        );
    }
    assert_eq!(
        on_conn(&msgs, 1).len(),
        1,
        "nothing more on a connection torn down"
    );
    assert!(
        msgs.iter()
            .all(|(_, m)| m.connection_settings_status.is_none()),
        "never reports ConnectionSettingsStatus"
    );
    assert_eq!(srv.log.lock().expect("lock").connections, 3);
}

#[tokio::test]
async fn transport_from_offer_scheme_moves_between_websocket_and_http() {
    // WebSocket agent offered an http:// endpoint.
    let srv = FakeServer::start(Script {
        offer_first_connections: Some((1, "http://{addr}/v1/opamp")),
        ..Script::default()
    })
    .await;
    let agent = Agent::start(AgentOptions {
        endpoint: srv.ws_url("/v1/opamp"),
        instance_uid: Some([0x26; 16]),
        heartbeat: Duration::from_millis(50),
        restart_on_settings_offer: true,
        transport_from_offer_scheme: true,
        ..AgentOptions::default()
    });
    let s = wait_for(&mut agent.status(), DEADLINE, |s| {
        // One reply over WebSocket, one over HTTP (then polls every offered hour).
        s.connected && s.transport == Some(Scheme::Http) && s.replies >= 2
    })
    .await
    .expect("on HTTP");
    assert_eq!(s.offered_endpoints, vec![srv.http_url("/v1/opamp")]);
    assert_eq!(s.client_restarts, 1);
    agent.stop().await;
    {
        let log = srv.log.lock().expect("lock");
        // Request 0 was the upgrade; the rest are POSTs with a protobuf body.
        assert!(log.headers[1..]
            .iter()
            .all(|h| h[1].as_deref() == Some("application/x-protobuf")));
        let on_http = on_conn(&log.msgs, 2);
        assert_eq!(on_http[0].sequence_num, 0);
        assert!(on_http[0].agent_description.is_some());
    }

    // HTTP agent offered a ws:// endpoint.
    let srv = FakeServer::start(Script {
        offer_first_connections: Some((1, "ws://{addr}/v1/opamp")),
        ..Script::default()
    })
    .await;
    let agent = Agent::start(AgentOptions {
        endpoint: srv.http_url("/v1/opamp"),
        instance_uid: Some([0x27; 16]),
        restart_on_settings_offer: true,
        transport_from_offer_scheme: true,
        ..AgentOptions::default()
    });
    wait_for(&mut agent.status(), DEADLINE, |s| {
        s.connected && s.transport == Some(Scheme::Ws)
    })
    .await
    .expect("on WebSocket");
    agent.stop().await;

    // Without the option the other transport's endpoint is not taken.
    let srv = FakeServer::start(Script {
        offer_first_connections: Some((1, "http://{addr}/v1/opamp")),
        ..Script::default()
    })
    .await;
    let agent = Agent::start(AgentOptions {
        endpoint: srv.ws_url("/v1/opamp"),
        instance_uid: Some([0x28; 16]),
        restart_on_settings_offer: true,
        ..AgentOptions::default()
    });
    let s = wait_for(&mut agent.status(), DEADLINE, |s| {
        s.connected && s.client_restarts == 1
    })
    .await
    .expect("restarted");
    assert_eq!(s.transport, Some(Scheme::Ws));
    agent.stop().await;
}

#[tokio::test]
async fn restart_process_starts_a_new_client_with_the_same_uid() {
    let srv = FakeServer::start(Script {
        assign_uid: true,
        ..Script::default()
    })
    .await;
    let mut agent = Agent::start(AgentOptions {
        endpoint: srv.ws_url("/v1/opamp"),
        token: Some("tok".into()),
        forget_identity_on_restart: true,
        ..AgentOptions::default()
    });
    let mut st = agent.status();
    wait_for(&mut st, DEADLINE, |s| {
        s.connected && s.instance_uid == Some(NEW_UID) && s.replies >= 2
    })
    .await
    .expect("up");
    agent.restart_process().await;
    let s = wait_for(&mut st, DEADLINE, |s| {
        s.connected && s.connections_established == 2
    })
    .await
    .expect("back");
    assert_eq!(s.process_restarts, 1);
    assert_eq!(s.connections_attempted, 2, "the counters carry on");
    agent.stop().await;
    let msgs = srv.msgs();
    assert!(
        on_conn(&msgs, 1)
            .last()
            .is_some_and(|m| m.agent_disconnect.is_some()),
        "the old process said goodbye"
    );
    let second = on_conn(&msgs, 2);
    assert_eq!(second[0].sequence_num, 0, "a new process numbers from 0");
    assert_eq!(second[0].instance_uid, NEW_UID.to_vec(), "its uid is kept");
    assert_eq!(second[0].flags, 0, "no new uid asked for");
    assert!(second[0].agent_description.is_some());
    let log = srv.log.lock().expect("lock");
    assert_eq!(log.headers[1][0].as_deref(), Some("Bearer tok"));
}
