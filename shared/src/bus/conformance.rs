//! The behaviour every [`Bus`] implementation must show; run by each implementation's tests.
//!
//! [`run_all`] takes the two ends of one bus: the side a coordinator serves on and the side a
//! gateway sends from. For [`InProcessBus`](super::InProcessBus) both are the same value; for
//! NATS they are two connections with the same subject prefix, i.e. two processes. The suite
//! installs its own [`CoordinatorHandler`] and owns the partitions listed below on that bus,
//! so give it a bus nobody else uses (on NATS: a fresh random prefix).
//!
//! Every wait is a channel receive or a request bounded by [`WAIT`]; nothing sleeps.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{
    AgentFrame, AuthDecision, AuthFailure, AuthRequest, Bus, BusError, CertificateId, ControlEvent,
    CoordinatorEvent, CoordinatorHandler, CoordinatorReply, CoordinatorRequest, Credential,
    FrameReply, GatewayMessage, PresentedToken, Route,
};
use crate::domain::Transport;
use crate::ids::{GatewayId, InstanceUid};

/// The longest any single step may take before the suite fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// Partitions the coordinator side serves for the whole run.
const SERVED: [u16; 2] = [3, 200];
/// Never served by anyone.
const UNSERVED: u16 = 77;
/// Served, then handed away, within one check.
const HANDED_OVER: u16 = 150;

/// The hash of the token the suite's coordinator accepts (any 32 bytes do: the bus never
/// looks inside).
const GOOD_TOKEN_HASH: [u8; 32] = *b"conformance-good-token-hash-0123";

/// Large enough to exceed NATS's default 1 MiB `max_payload` several times over.
const LARGE: usize = 3 * 1024 * 1024;

/// Runs every check in order. Panics (with the failing check's message) on the first failure.
pub async fn run_all(coordinator_side: Arc<dyn Bus>, gateway_side: Arc<dyn Bus>) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let coordinator = Arc::new(TestCoordinator {
        events: events_tx,
        handled: AtomicUsize::new(0),
    });
    coordinator_side
        .serve_coordinator(coordinator.clone())
        .await
        .expect("serve_coordinator");
    coordinator_side
        .serve_partitions(&SERVED)
        .await
        .expect("serve_partitions");

    let (c, g) = (coordinator_side.as_ref(), gateway_side.as_ref());
    routed_request_is_answered(g).await;
    unserved_partition_has_no_responder(g).await;
    unserve_stops_the_partition(c, g).await;
    any_route_authenticates(g).await;
    notify_delivers_events(g, &mut events).await;
    deliver_reaches_only_its_gateway(c, g).await;
    broadcast_reaches_every_control_subscriber(c, g).await;
    large_frame_and_reply_round_trip(g).await;
    concurrent_requests_get_their_own_replies(g, &coordinator).await;
    many_deliveries_arrive_once_in_order_to_their_gateway(c, g).await;
    events_keep_their_order_per_subject(g, &mut events).await;
    concurrent_requests_to_an_unserved_partition_fail_fast(g).await;
}

/// The suite's coordinator: answers deterministically from the request alone, so the checks
/// can tell each reply belongs to its request, and hands events to the suite.
struct TestCoordinator {
    events: mpsc::UnboundedSender<CoordinatorEvent>,
    handled: AtomicUsize,
}

#[async_trait]
impl CoordinatorHandler for TestCoordinator {
    async fn handle(&self, req: CoordinatorRequest) -> CoordinatorReply {
        self.handled.fetch_add(1, Ordering::Relaxed);
        match req {
            CoordinatorRequest::Authenticate(a)
                if a.token.as_ref().is_some_and(|t| t.hash == GOOD_TOKEN_HASH) =>
            {
                CoordinatorReply::Auth(AuthDecision::Accept(Credential::BootstrapToken {
                    token_id: describe_auth(&a),
                    bound_uid: a.uid_hint,
                }))
            }
            CoordinatorRequest::Authenticate(a) if a.token.is_none() => {
                CoordinatorReply::Auth(AuthDecision::Reject(AuthFailure::MissingCredentials))
            }
            CoordinatorRequest::Authenticate(_) => {
                CoordinatorReply::Auth(AuthDecision::Reject(AuthFailure::UnknownToken))
            }
            CoordinatorRequest::Frame(f) => CoordinatorReply::Frame(Box::new(answer(&f))),
            CoordinatorRequest::RevokedSerials => {
                CoordinatorReply::RevokedSerials(vec!["4a01".into(), "7fff".into()])
            }
            CoordinatorRequest::BlobChunk { index, .. } => {
                CoordinatorReply::BlobChunk(super::BlobChunk::Bytes(vec![
                    u8::try_from(index % 256)
                        .unwrap_or(0);
                    3
                ]))
            }
        }
    }

    async fn event(&self, ev: CoordinatorEvent) {
        // The receiver lives as long as the suite; after that nobody is listening anyway.
        let _ = self.events.send(ev);
    }
}

/// The reply to a frame: echoes the sequence number in `capabilities`, every connection field
/// in `close`, and for a frame with an effective config, the SHA-256 of its body as
/// `config_hash` next to a large remote config derived from the sequence number.
fn answer(f: &AgentFrame) -> FrameReply {
    let remote_config = f
        .msg
        .effective_config
        .as_ref()
        .and_then(|c| c.config_map.as_ref())
        .and_then(|m| m.config_map.get("big.yaml"))
        .map(|file| proto::v1::AgentRemoteConfig {
            config: Some(config_map(pattern(f.msg.sequence_num, LARGE))),
            config_hash: Sha256::digest(&file.body).to_vec(),
        });
    FrameReply {
        msg: proto::ServerToAgent {
            instance_uid: f.msg.instance_uid.clone(),
            capabilities: f.msg.sequence_num,
            remote_config,
            ..Default::default()
        },
        bind: InstanceUid::from_slice(&f.msg.instance_uid),
        close: Some(describe_frame(f)),
    }
}

/// Every field of an authentication request, so the reply shows whether all arrived intact.
fn describe_auth(a: &AuthRequest) -> String {
    format!(
        "{:?}|{:?}|{}|{:?}|{:?}",
        a.token, a.certificate, a.source_ip, a.uid_hint, a.transport
    )
}

fn describe_frame(f: &AgentFrame) -> String {
    format!(
        "{}|{}|{}|{:?}|{:?}|{}|{}",
        f.gateway, f.conn_id, f.epoch, f.transport, f.credential, f.source_ip, f.secure
    )
}

/// Deterministic, non-repeating-looking bytes (xorshift), so a reassembly that reorders or
/// drops a chunk cannot go unnoticed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A push of a remote config with `body` to `uid` at `epoch`.
fn config_push(uid: InstanceUid, epoch: u64, body: Vec<u8>, hash: Vec<u8>) -> GatewayMessage {
    GatewayMessage::Deliver {
        uid,
        epoch,
        msg: Box::new(proto::ServerToAgent {
            instance_uid: uid.0.to_vec(),
            remote_config: Some(proto::v1::AgentRemoteConfig {
                config: Some(config_map(body)),
                config_hash: hash,
            }),
            ..Default::default()
        }),
    }
}

fn config_map(body: Vec<u8>) -> proto::v1::AgentConfigMap {
    proto::v1::AgentConfigMap {
        config_map: BTreeMap::from([(
            "big.yaml".to_string(),
            proto::v1::AgentConfigFile {
                body,
                content_type: "text/yaml".into(),
            },
        )]),
    }
}

fn ip() -> IpAddr {
    IpAddr::from([192, 0, 2, 7])
}

fn frame(uid: InstanceUid, seq: u64) -> AgentFrame {
    AgentFrame {
        gateway: GatewayId("conformance-gw".into()),
        conn_id: 1000 + seq,
        epoch: 5,
        transport: Transport::WebSocket,
        credential: Credential::BootstrapToken {
            token_id: "tok-1".into(),
            bound_uid: Some(uid),
        },
        source_ip: ip(),
        // Varies, so both values are seen to arrive.
        secure: seq % 2 == 1,
        msg: proto::AgentToServer {
            instance_uid: uid.0.to_vec(),
            sequence_num: seq,
            ..Default::default()
        },
    }
}

async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
}

async fn send_frame(
    bus: &dyn Bus,
    route: Route,
    f: AgentFrame,
) -> Result<CoordinatorReply, BusError> {
    within(
        "request",
        bus.request(route, CoordinatorRequest::Frame(Box::new(f))),
    )
    .await
}

fn frame_reply(reply: CoordinatorReply) -> FrameReply {
    match reply {
        CoordinatorReply::Frame(f) => *f,
        other => panic!("expected a frame reply, got {other:?}"),
    }
}

async fn routed_request_is_answered(g: &dyn Bus) {
    for p in SERVED {
        let uid = InstanceUid::new_v7();
        let f = frame(uid, 11);
        let expected = describe_frame(&f);
        let reply = frame_reply(
            send_frame(g, Route::Partition(p), f)
                .await
                .unwrap_or_else(|e| panic!("request to served partition {p}: {e}")),
        );
        assert_eq!(reply.msg.instance_uid, uid.0.to_vec());
        assert_eq!(reply.msg.capabilities, 11);
        assert_eq!(reply.bind, Some(uid));
        assert_eq!(
            reply.close.as_deref(),
            Some(expected.as_str()),
            "every frame field must reach the coordinator intact"
        );
    }
}

async fn unserved_partition_has_no_responder(g: &dyn Bus) {
    let res = send_frame(
        g,
        Route::Partition(UNSERVED),
        frame(InstanceUid::new_v7(), 1),
    )
    .await;
    assert!(
        matches!(res, Err(BusError::NoResponder)),
        "unserved partition must answer NoResponder, got {res:?}"
    );
}

async fn unserve_stops_the_partition(c: &dyn Bus, g: &dyn Bus) {
    let route = Route::Partition(HANDED_OVER);
    let before = send_frame(g, route, frame(InstanceUid::new_v7(), 1)).await;
    assert!(matches!(before, Err(BusError::NoResponder)), "{before:?}");
    c.serve_partitions(&[HANDED_OVER]).await.expect("serve");
    send_frame(g, route, frame(InstanceUid::new_v7(), 2))
        .await
        .expect("request to a newly served partition");
    c.unserve_partitions(&[HANDED_OVER]).await.expect("unserve");
    let after = send_frame(g, route, frame(InstanceUid::new_v7(), 3)).await;
    assert!(
        matches!(after, Err(BusError::NoResponder)),
        "an unserved partition must answer NoResponder again, got {after:?}"
    );
    // Serving it again works: hand-overs go back and forth.
    c.serve_partitions(&[HANDED_OVER]).await.expect("serve");
    send_frame(g, route, frame(InstanceUid::new_v7(), 4))
        .await
        .expect("request after serving again");
    c.unserve_partitions(&[HANDED_OVER]).await.expect("unserve");
}

async fn any_route_authenticates(g: &dyn Bus) {
    let uid = InstanceUid::new_v7();
    // Both credentials at once (a gateway sends one or the other), so every field is seen.
    let good = AuthRequest {
        token: Some(PresentedToken {
            hash: GOOD_TOKEN_HASH,
            prefix: "amp-bs.good…".into(),
        }),
        source_ip: "2001:db8::5".parse().expect("ip"),
        uid_hint: Some(uid),
        transport: Transport::Http,
        certificate: Some(CertificateId {
            uid,
            serial: "4abc".into(),
        }),
    };
    let expected = describe_auth(&good);
    let reply = within(
        "authenticate",
        g.request(Route::Any, CoordinatorRequest::Authenticate(good)),
    )
    .await
    .expect("authenticate");
    match reply {
        CoordinatorReply::Auth(AuthDecision::Accept(Credential::BootstrapToken {
            token_id,
            bound_uid,
        })) => {
            assert_eq!(token_id, expected, "every auth field must arrive intact");
            assert_eq!(bound_uid, Some(uid));
        }
        other => panic!("expected accept, got {other:?}"),
    }
    let bad = AuthRequest {
        token: Some(PresentedToken {
            hash: [9; 32],
            prefix: "amp-bs.nope…".into(),
        }),
        source_ip: ip(),
        uid_hint: None,
        transport: Transport::WebSocket,
        certificate: None,
    };
    let revoked = within(
        "revoked serials",
        g.request(Route::Any, CoordinatorRequest::RevokedSerials),
    )
    .await
    .expect("revoked serials");
    assert!(
        matches!(&revoked, CoordinatorReply::RevokedSerials(s) if s == &["4a01", "7fff"]),
        "{revoked:?}"
    );
    let chunk = within(
        "blob chunk",
        g.request(
            Route::Any,
            CoordinatorRequest::BlobChunk {
                sha256: "ab".repeat(32),
                index: 5,
            },
        ),
    )
    .await
    .expect("blob chunk");
    assert!(
        matches!(&chunk, CoordinatorReply::BlobChunk(super::BlobChunk::Bytes(b)) if b == &[5, 5, 5]),
        "{chunk:?}"
    );
    let reply = within(
        "authenticate",
        g.request(Route::Any, CoordinatorRequest::Authenticate(bad)),
    )
    .await
    .expect("authenticate");
    assert!(
        matches!(
            reply,
            CoordinatorReply::Auth(AuthDecision::Reject(AuthFailure::UnknownToken))
        ),
        "{reply:?}"
    );
    let neither = AuthRequest {
        token: None,
        source_ip: ip(),
        uid_hint: None,
        transport: Transport::WebSocket,
        certificate: None,
    };
    let reply = within(
        "authenticate",
        g.request(Route::Any, CoordinatorRequest::Authenticate(neither)),
    )
    .await
    .expect("authenticate");
    assert!(
        matches!(
            reply,
            CoordinatorReply::Auth(AuthDecision::Reject(AuthFailure::MissingCredentials))
        ),
        "an absent token must arrive absent: {reply:?}"
    );
}

async fn notify_delivers_events(
    g: &dyn Bus,
    events: &mut mpsc::UnboundedReceiver<CoordinatorEvent>,
) {
    let uid = InstanceUid::new_v7();
    let big_reason = "x".repeat(LARGE);
    g.notify(
        Route::Partition(SERVED[0]),
        CoordinatorEvent::Disconnected {
            uid,
            gateway: GatewayId("conformance-gw".into()),
            conn_id: 9,
            epoch: 3,
        },
    )
    .await
    .expect("notify disconnected");
    g.notify(
        Route::Any,
        CoordinatorEvent::AuthFailed {
            source_ip: ip(),
            reason: "missing_credentials".into(),
        },
    )
    .await
    .expect("notify auth failed");
    g.notify(
        Route::Any,
        CoordinatorEvent::AuthFailed {
            source_ip: ip(),
            reason: big_reason.clone(),
        },
    )
    .await
    .expect("notify a large event");

    // Different subjects, so no order between them: collect all three.
    let (mut disconnected, mut small, mut large) = (false, false, false);
    for _ in 0..3 {
        match within("event", events.recv()).await.expect("events open") {
            CoordinatorEvent::Disconnected {
                uid: u,
                gateway,
                conn_id: 9,
                epoch: 3,
            } if u == uid && gateway.0 == "conformance-gw" => disconnected = true,
            CoordinatorEvent::AuthFailed { source_ip, reason } if source_ip == ip() => {
                if reason == "missing_credentials" {
                    small = true;
                } else {
                    assert!(reason == big_reason, "large event body corrupted");
                    large = true;
                }
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert!(disconnected && small && large);
}

async fn deliver_reaches_only_its_gateway(c: &dyn Bus, g: &dyn Bus) {
    let a = GatewayId("conformance-gw-a".into());
    let b = GatewayId("conformance-gw-b".into());
    let mut rx_a = g.subscribe_gateway(&a).await.expect("subscribe a");
    let mut rx_b = g.subscribe_gateway(&b).await.expect("subscribe b");
    let uid = InstanceUid::new_v7();
    let push = |epoch: u64, body: Vec<u8>| config_push(uid, epoch, body, vec![epoch as u8; 32]);
    let large = pattern(99, LARGE);
    c.deliver(&a, push(1, b"small".to_vec()))
        .await
        .expect("deliver to a");
    c.deliver(
        &b,
        GatewayMessage::Close {
            uid,
            epoch: 2,
            reason: "moved".into(),
        },
    )
    .await
    .expect("deliver to b");
    c.deliver(&a, push(3, large.clone()))
        .await
        .expect("large deliver to a");

    // One publisher, one subscriber per subject: order holds, so had anything meant for the
    // other gateway leaked, it would show up here before the expected message.
    let first = within("delivery to a", rx_a.recv()).await.expect("a open");
    assert_eq!(delivered_body(&first, 1).as_slice(), b"small");
    match within("delivery to b", rx_b.recv()).await.expect("b open") {
        GatewayMessage::Close {
            uid: u,
            epoch: 2,
            reason,
        } => {
            assert_eq!(u, uid);
            assert_eq!(reason, "moved");
        }
        other => panic!("gateway b got {other:?}"),
    }
    let second = within("large delivery to a", rx_a.recv())
        .await
        .expect("a open");
    assert!(
        delivered_body(&second, 3) == large,
        "large delivery corrupted"
    );
}

fn delivered_body(msg: &GatewayMessage, want_epoch: u64) -> Vec<u8> {
    match msg {
        GatewayMessage::Deliver { epoch, msg, .. } if *epoch == want_epoch => msg
            .remote_config
            .as_ref()
            .and_then(|r| r.config.as_ref())
            .and_then(|m| m.config_map.get("big.yaml"))
            .map(|f| f.body.clone())
            .unwrap_or_default(),
        other => panic!("expected a delivery at epoch {want_epoch}, got {other:?}"),
    }
}

async fn broadcast_reaches_every_control_subscriber(c: &dyn Bus, g: &dyn Bus) {
    let mut subs = vec![
        c.subscribe_control().await.expect("subscribe control"),
        c.subscribe_control().await.expect("subscribe control"),
        g.subscribe_control().await.expect("subscribe control"),
    ];
    let first = ControlEvent::AssignmentCreated { assignment_id: 41 };
    let second = ControlEvent::TokenChanged {
        token_id: "tok-9".into(),
    };
    c.broadcast(first.clone()).await.expect("broadcast");
    g.broadcast(second.clone()).await.expect("broadcast");
    for rx in &mut subs {
        // Two publishers: no order between their events.
        let mut got = vec![
            within("control event", rx.recv()).await.expect("open"),
            within("control event", rx.recv()).await.expect("open"),
        ];
        got.sort_by_key(|e| matches!(e, ControlEvent::TokenChanged { .. }));
        assert_eq!(got, vec![first.clone(), second.clone()]);
    }
}

async fn large_frame_and_reply_round_trip(g: &dyn Bus) {
    let uid = InstanceUid::new_v7();
    let mut f = frame(uid, 4242);
    let effective = pattern(7, LARGE);
    f.msg.effective_config = Some(proto::v1::EffectiveConfig {
        config_map: Some(config_map(effective.clone())),
    });
    let reply = frame_reply(
        send_frame(g, Route::Partition(SERVED[1]), f)
            .await
            .expect("large request"),
    );
    let remote = reply.msg.remote_config.expect("remote config in reply");
    assert_eq!(
        remote.config_hash,
        Sha256::digest(&effective).to_vec(),
        "the coordinator must see the effective config byte for byte"
    );
    let body = remote
        .config
        .and_then(|m| m.config_map.get("big.yaml").map(|f| f.body.clone()))
        .expect("remote config body");
    assert!(body == pattern(4242, LARGE), "large reply corrupted");
}

async fn concurrent_requests_get_their_own_replies(g: &dyn Bus, coordinator: &TestCoordinator) {
    const N: u64 = 1000;
    let before = coordinator.handled.load(Ordering::Relaxed);
    let uids: Vec<InstanceUid> = (0..N).map(|_| InstanceUid::new_v7()).collect();
    let requests = uids.iter().enumerate().map(|(i, uid)| {
        let seq = i as u64;
        let route = Route::Partition(SERVED[i % SERVED.len()]);
        async move { (seq, *uid, send_frame(g, route, frame(*uid, seq)).await) }
    });
    for (seq, uid, res) in futures::future::join_all(requests).await {
        let reply = frame_reply(res.unwrap_or_else(|e| panic!("request {seq}: {e}")));
        assert_eq!(reply.msg.capabilities, seq, "reply of another request");
        assert_eq!(reply.msg.instance_uid, uid.0.to_vec());
    }
    assert_eq!(
        coordinator.handled.load(Ordering::Relaxed) - before,
        N as usize,
        "each request handled exactly once"
    );
}

/// Many pushes at once, to two gateways, through `deliver` and `deliver_many`, with a large
/// one and closes among them: each gateway gets exactly its own, once, in the order sent.
/// (Coalescing buses batch these; a lost, repeated, reordered or misrouted entry shows here.)
async fn many_deliveries_arrive_once_in_order_to_their_gateway(c: &dyn Bus, g: &dyn Bus) {
    const N: u64 = 3000;
    let a = GatewayId("conformance-gw-many-a".into());
    let b = GatewayId("conformance-gw-many-b".into());
    let mut rx_a = g.subscribe_gateway(&a).await.expect("subscribe a");
    let mut rx_b = g.subscribe_gateway(&b).await.expect("subscribe b");
    let uid = InstanceUid::new_v7();
    // The epoch numbers the message; every 7th is a close, the 1000th is large.
    let message = |epoch: u64| {
        if epoch.is_multiple_of(7) {
            return GatewayMessage::Close {
                uid,
                epoch,
                reason: format!("close {epoch}"),
            };
        }
        let body = if epoch % N == 1000 {
            pattern(epoch, LARGE)
        } else {
            epoch.to_string().into_bytes()
        };
        config_push(uid, epoch, body, Vec::new())
    };
    let check = |got: &GatewayMessage, want: u64| match got {
        GatewayMessage::Close { epoch, reason, .. } => {
            let close = format!("close {want}");
            assert_eq!((*epoch, reason.as_str()), (want, close.as_str()));
        }
        GatewayMessage::Deliver { .. } => {
            let body = delivered_body(got, want);
            if want % N == 1000 {
                assert!(body == pattern(want, LARGE), "large delivery corrupted");
            } else {
                assert_eq!(body, want.to_string().into_bytes(), "delivery {want}");
            }
        }
    };

    // Single deliveries, the two gateways' interleaved: started in order (each is queued when
    // first polled) and awaited together, so a coalescing bus batches both subjects at once.
    let singles = (0..N).flat_map(|e| {
        let to_b = (e % 2 == 1).then(|| (b.clone(), e));
        std::iter::once((a.clone(), e)).chain(to_b)
    });
    let sends = singles.map(|(gw, e)| async move { c.deliver(&gw, message(e)).await });
    for res in futures::future::join_all(sends).await {
        res.expect("deliver");
    }
    for want in 0..N {
        check(
            &within("delivery to a", rx_a.recv()).await.expect("a open"),
            want,
        );
    }
    for want in (0..N).filter(|e| e % 2 == 1) {
        check(
            &within("delivery to b", rx_b.recv()).await.expect("b open"),
            want,
        );
    }

    // Groups of up to 500 by `deliver_many`, a single `deliver` between them.
    let mut epoch = N;
    while epoch < 2 * N {
        let group: Vec<GatewayMessage> = (epoch..(epoch + 500).min(2 * N)).map(message).collect();
        epoch += group.len() as u64;
        c.deliver_many(&a, group).await.expect("deliver_many");
        if epoch < 2 * N {
            c.deliver(&a, message(epoch)).await.expect("deliver");
            epoch += 1;
        }
    }
    c.deliver_many(&a, Vec::new()).await.expect("nothing");
    for want in N..2 * N {
        check(
            &within("delivery to a", rx_a.recv()).await.expect("a open"),
            want,
        );
    }
    // Nothing more: a repeat or a stray for the other gateway would be queued before these
    // (one publisher, one subscriber per subject: order holds).
    c.deliver(&a, message(2 * N)).await.expect("deliver to a");
    c.deliver(&b, message(2 * N + 2))
        .await
        .expect("deliver to b");
    check(
        &within("last to a", rx_a.recv()).await.expect("a open"),
        2 * N,
    );
    check(
        &within("last to b", rx_b.recv()).await.expect("b open"),
        2 * N + 2,
    );
}

/// Events sent one after another to one subject arrive in that order (a coalescing bus sends
/// them in batches, in order), each once; events to two subjects never mix up their own order.
async fn events_keep_their_order_per_subject(
    g: &dyn Bus,
    events: &mut mpsc::UnboundedReceiver<CoordinatorEvent>,
) {
    const N: u64 = 2000;
    let uid = InstanceUid::new_v7();
    let gateway = GatewayId("conformance-gw-events".into());
    let event = |conn_id: u64| CoordinatorEvent::Disconnected {
        uid,
        gateway: gateway.clone(),
        conn_id,
        epoch: conn_id % SERVED.len() as u64,
    };
    // Started in order (each is queued when first polled) and awaited together, so a
    // coalescing bus gets them all at once; conn_id says which partition (by parity).
    let sends = (0..N).map(|conn_id| {
        let route = Route::Partition(SERVED[(conn_id % SERVED.len() as u64) as usize]);
        g.notify(route, event(conn_id))
    });
    for res in futures::future::join_all(sends).await {
        res.expect("notify");
    }
    let mut next = [0u64, 1];
    for _ in 0..N {
        match within("event", events.recv()).await.expect("events open") {
            CoordinatorEvent::Disconnected {
                uid: u,
                conn_id,
                epoch,
                ..
            } if u == uid => {
                let subject = epoch as usize;
                assert_eq!(conn_id, next[subject], "events of one subject out of order");
                next[subject] += 2;
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(next, [N, N + 1], "every event once");
}

/// Many requests at once to a partition nobody serves all fail with `NoResponder` at once
/// (a coalesced batch of them too), not by timing out.
async fn concurrent_requests_to_an_unserved_partition_fail_fast(g: &dyn Bus) {
    let requests = (0..200).map(|seq| {
        let f = frame(InstanceUid::new_v7(), seq);
        g.request(
            Route::Partition(UNSERVED),
            CoordinatorRequest::Frame(Box::new(f)),
        )
    });
    let results = within(
        "requests to an unserved partition",
        futures::future::join_all(requests),
    )
    .await;
    for res in results {
        assert!(matches!(res, Err(BusError::NoResponder)), "{res:?}");
    }
}
