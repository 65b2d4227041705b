//! Tests of the NATS bus: the shared conformance suite against a real server, what is specific
//! to NATS (chunking through queue groups, size limits, malformed input), and the pure
//! reassembly / outbox bookkeeping.
//!
//! They need NATS at `AMPORA_TEST_NATS_URL` (default `nats://127.0.0.1:4222`) and fail, never
//! skip, when it is not there. Each test uses its own random subject prefix.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::headers::{header, ChunkHeader, Pull, H_BATCH, H_CHUNK, H_ERROR};
use super::large::{Chunk, ChunkKey, Outbox, Reassembler};
use super::subjects::{token, Subjects};
use super::{NatsBus, NatsBusOptions};
use crate::bus::conformance::{self, WAIT};
use crate::bus::{
    AgentFrame, AuthDecision, AuthFailure, Bus, BusError, CoordinatorEvent, CoordinatorHandler,
    CoordinatorReply, CoordinatorRequest, Credential, FrameReply, GatewayMessage, Route,
};
use crate::domain::Transport;
use crate::ids::{GatewayId, InstanceUid};

fn nats_url() -> String {
    std::env::var("AMPORA_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn options(prefix: &str, node: &str) -> NatsBusOptions {
    NatsBusOptions {
        subject_prefix: prefix.into(),
        node: node.into(),
        ..NatsBusOptions::new(nats_url())
    }
}

fn random_prefix() -> String {
    format!("ampora-test-{}", uuid::Uuid::new_v4().simple())
}

async fn connect(opts: NatsBusOptions) -> NatsBus {
    let url = opts.url.clone();
    match NatsBus::connect(opts).await {
        Ok(bus) => bus,
        Err(e) => panic!(
            "these tests need a NATS server at {url} (set AMPORA_TEST_NATS_URL to use another): {e}"
        ),
    }
}

/// A coordinator side and a gateway side on one fresh prefix: two processes, as far as NATS
/// can tell.
async fn pair() -> (String, Arc<NatsBus>, Arc<NatsBus>) {
    let prefix = random_prefix();
    let c = connect(options(&prefix, "coord-1")).await;
    let g = connect(options(&prefix, "gw-1")).await;
    (prefix, Arc::new(c), Arc::new(g))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_bus_conforms() {
    let (_, c, g) = pair().await;
    conformance::run_all(c, g).await;
}

#[tokio::test]
async fn unreachable_nats_is_an_error_not_a_hang() {
    let mut opts = options(&random_prefix(), "n");
    opts.url = "nats://127.0.0.1:1".into();
    let res = tokio::time::timeout(WAIT, NatsBus::connect(opts))
        .await
        .expect("connect must give up on a refused connection");
    match res {
        Err(BusError::Unavailable(msg)) => assert!(msg.contains("127.0.0.1:1"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_prefixes_are_refused() {
    for prefix in ["", "a..b", "a.*", "a.>", "has space", ".a", "a."] {
        assert!(
            matches!(
                NatsBus::connect(options(prefix, "n")).await,
                Err(BusError::Unavailable(_))
            ),
            "{prefix:?} must be refused"
        );
    }
}

/// Counts requests and answers a frame with the SHA-256 and length of its effective config.
#[derive(Default)]
struct Hasher {
    handled: AtomicUsize,
}

#[async_trait]
impl CoordinatorHandler for Hasher {
    async fn handle(&self, req: CoordinatorRequest) -> CoordinatorReply {
        self.handled.fetch_add(1, Ordering::Relaxed);
        let CoordinatorRequest::Frame(f) = req else {
            return CoordinatorReply::Auth(AuthDecision::Reject(AuthFailure::UnknownToken));
        };
        let body = effective_body(&f.msg);
        CoordinatorReply::Frame(Box::new(FrameReply {
            msg: proto::ServerToAgent {
                instance_uid: Sha256::digest(&body).to_vec(),
                capabilities: body.len() as u64,
                ..Default::default()
            },
            bind: None,
            close: None,
        }))
    }

    async fn event(&self, _ev: CoordinatorEvent) {}
}

fn effective_body(msg: &proto::AgentToServer) -> Vec<u8> {
    msg.effective_config
        .as_ref()
        .and_then(|c| c.config_map.as_ref())
        .and_then(|m| m.config_map.get("c"))
        .map(|f| f.body.clone())
        .unwrap_or_default()
}

fn frame_with_config(body: Vec<u8>) -> CoordinatorRequest {
    let uid = InstanceUid::new_v7();
    CoordinatorRequest::Frame(Box::new(AgentFrame {
        gateway: GatewayId("gw".into()),
        conn_id: 1,
        epoch: 1,
        transport: Transport::WebSocket,
        credential: Credential::BootstrapToken {
            token_id: "t".into(),
            bound_uid: None,
        },
        source_ip: "127.0.0.1".parse().expect("ip"),
        secure: false,
        msg: proto::AgentToServer {
            instance_uid: uid.0.to_vec(),
            effective_config: Some(proto::v1::EffectiveConfig {
                config_map: Some(proto::v1::AgentConfigMap {
                    config_map: [(
                        "c".to_string(),
                        proto::v1::AgentConfigFile {
                            body,
                            content_type: String::new(),
                        },
                    )]
                    .into(),
                }),
            }),
            ..Default::default()
        },
    }))
}

fn body_of(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The queue-group case of chunking: while two coordinators serve one partition (a hand-over),
/// each large request is still received whole by exactly one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_requests_to_a_shared_partition_are_handled_once_and_whole() {
    let prefix = random_prefix();
    let c1 = connect(options(&prefix, "coord-1")).await;
    let c2 = connect(options(&prefix, "coord-2")).await;
    let g = connect(options(&prefix, "gw-1")).await;
    let h1 = Arc::new(Hasher::default());
    let h2 = Arc::new(Hasher::default());
    for (c, h) in [(&c1, &h1), (&c2, &h2)] {
        c.serve_coordinator(h.clone()).await.expect("serve");
        c.serve_partitions(&[9]).await.expect("serve partition");
    }
    const N: usize = 12;
    let requests = (0..N).map(|i| {
        let body = body_of(i as u8, 2 * 1024 * 1024 + i * 1000);
        let g = &g;
        async move {
            let want = (Sha256::digest(&body).to_vec(), body.len() as u64);
            let reply = tokio::time::timeout(
                WAIT,
                g.request(Route::Partition(9), frame_with_config(body)),
            )
            .await
            .expect("large request timed out");
            (want, reply)
        }
    });
    for ((hash, len), reply) in futures::future::join_all(requests).await {
        match reply {
            Ok(CoordinatorReply::Frame(f)) => {
                assert_eq!(f.msg.capabilities, len);
                assert_eq!(f.msg.instance_uid, hash, "body corrupted in transit");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let (n1, n2) = (
        h1.handled.load(Ordering::Relaxed),
        h2.handled.load(Ordering::Relaxed),
    );
    assert_eq!(
        n1 + n2,
        N,
        "each request handled exactly once ({n1} + {n2})"
    );
}

#[tokio::test]
async fn messages_above_the_limit_are_refused_before_sending() {
    let prefix = random_prefix();
    let mut opts = options(&prefix, "gw-1");
    opts.max_message_bytes = 1024 * 1024;
    let g = connect(opts).await;
    let res = g
        .request(
            Route::Partition(1),
            frame_with_config(vec![0; 2 * 1024 * 1024]),
        )
        .await;
    assert!(
        matches!(res, Err(BusError::TooLarge { limit, .. }) if limit == 1024 * 1024),
        "{res:?}"
    );
    let res = g
        .deliver(
            &GatewayId("x".into()),
            GatewayMessage::Close {
                uid: InstanceUid::new_v7(),
                epoch: 1,
                reason: "r".repeat(2 * 1024 * 1024),
            },
        )
        .await;
    assert!(matches!(res, Err(BusError::TooLarge { .. })), "{res:?}");
}

/// A coordinator with a smaller limit than its gateway refuses the large request at once
/// (an error reply), instead of leaving the gateway to time out.
#[tokio::test]
async fn a_receiver_refuses_what_exceeds_its_own_limit_and_says_so() {
    let prefix = random_prefix();
    let mut copts = options(&prefix, "coord-1");
    copts.max_message_bytes = 1536 * 1024;
    // Long enough that answering by timeout would fail the assertion below.
    copts.request_timeout = Duration::from_secs(60);
    let c = connect(copts).await;
    let mut gopts = options(&prefix, "gw-1");
    gopts.request_timeout = Duration::from_secs(60);
    let g = connect(gopts).await;
    let h = Arc::new(Hasher::default());
    c.serve_coordinator(h.clone()).await.expect("serve");
    c.serve_partitions(&[2]).await.expect("serve partition");
    let res = tokio::time::timeout(
        WAIT,
        g.request(
            Route::Partition(2),
            frame_with_config(vec![1; 3 * 1024 * 1024]),
        ),
    )
    .await
    .expect("refusal must be immediate");
    assert!(matches!(res, Err(BusError::Unavailable(_))), "{res:?}");
    assert_eq!(h.handled.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn malformed_messages_are_dropped_answered_and_survived() {
    let (prefix, c, g) = pair().await;
    let h = Arc::new(Hasher::default());
    c.serve_coordinator(h.clone()).await.expect("serve");
    c.serve_partitions(&[5]).await.expect("serve partition");
    let gw = GatewayId("gw-m".into());
    let mut deliveries = g.subscribe_gateway(&gw).await.expect("subscribe");

    let raw = async_nats::connect(nats_url()).await.expect("raw client");
    let inbox = format!("{prefix}.rawinbox");
    let mut replies = raw.subscribe(inbox.clone()).await.expect("subscribe");
    raw.flush().await.expect("flush");
    for garbage in [&b"\xff\xff\xff"[..], &b""[..]] {
        raw.publish_with_reply(
            format!("{prefix}.a2s.5"),
            inbox.clone(),
            Bytes::copy_from_slice(garbage),
        )
        .await
        .expect("publish");
        let reply = tokio::time::timeout(WAIT, replies.next())
            .await
            .expect("malformed request must be answered")
            .expect("subscription open");
        assert!(
            header(&reply, H_ERROR).is_some(),
            "expected an error header, got {reply:?}"
        );
    }
    // A bad chunk header and an undecodable delivery, then a good delivery: the gateway's
    // first message is the good one.
    let mut bad_chunk = HeaderMap::new();
    bad_chunk.insert(H_CHUNK, "nonsense");
    raw.publish_with_headers(
        format!("{prefix}.gw.gw-m"),
        bad_chunk,
        Bytes::from_static(b"x"),
    )
    .await
    .expect("publish");
    raw.publish(format!("{prefix}.gw.gw-m"), Bytes::from_static(b"\x0a\x01"))
        .await
        .expect("publish");
    raw.flush().await.expect("flush");
    let uid = InstanceUid::new_v7();
    c.deliver(
        &gw,
        GatewayMessage::Close {
            uid,
            epoch: 7,
            reason: "ok".into(),
        },
    )
    .await
    .expect("deliver");
    match tokio::time::timeout(WAIT, deliveries.recv()).await {
        Ok(Some(GatewayMessage::Close { epoch: 7, .. })) => {}
        other => panic!("expected the good delivery, got {other:?}"),
    }
    // And the coordinator still answers.
    let res = g
        .request(Route::Partition(5), frame_with_config(b"fine".to_vec()))
        .await;
    assert!(matches!(res, Ok(CoordinatorReply::Frame(_))), "{res:?}");
    assert_eq!(h.handled.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn serve_partitions_needs_a_handler() {
    let (_, c, _) = pair().await;
    assert!(matches!(
        c.serve_partitions(&[1]).await,
        Err(BusError::Unavailable(_))
    ));
}

/// Whether the NATS server has any subscriber on `subject`, asked from a connection of its
/// own: a request to a subject nobody subscribes to is answered "no responders" at once,
/// while one a subscriber gets (the bus ignores it as malformed) is never answered.
async fn has_subscriber(raw: &async_nats::Client, subject: &str) -> bool {
    let request = async_nats::Request::new()
        .payload(Bytes::from_static(b"probe"))
        .timeout(Some(std::time::Duration::from_millis(300)));
    match raw.send_request(subject.to_string(), request).await {
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => false,
        Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => true,
        other => panic!("unexpected answer to the probe: {other:?}"),
    }
}

#[tokio::test]
async fn a_dropped_gateway_receiver_stops_its_subscription() {
    let (prefix, c, g) = pair().await;
    let gw = GatewayId("gw-d".into());
    let subject = format!("{prefix}.gw.gw-d");
    let raw = async_nats::connect(nats_url()).await.expect("raw client");
    assert!(!has_subscriber(&raw, &subject).await, "nobody yet");
    let rx = g.subscribe_gateway(&gw).await.expect("subscribe");
    assert!(
        has_subscriber(&raw, &subject).await,
        "the probe sees a subscription"
    );
    drop(rx);
    // Deliveries to it are harmless (at most once, nobody listening) and end the
    // subscription: the server no longer routes the subject to this process ...
    for _ in 0..3 {
        c.deliver(
            &gw,
            GatewayMessage::Close {
                uid: InstanceUid::new_v7(),
                epoch: 1,
                reason: String::new(),
            },
        )
        .await
        .expect("deliver");
    }
    // Probe after probe (each one a round trip to the server), no pause between.
    let (raw_ref, subject_ref) = (&raw, &subject);
    let gone = crate::testing::poll(WAIT, std::time::Duration::ZERO, || async move {
        (!has_subscriber(raw_ref, subject_ref).await).then_some(())
    })
    .await;
    assert!(gone.is_some(), "the subscription outlived its receiver");
    // ... and subscribing again works.
    let mut rx = g.subscribe_gateway(&gw).await.expect("subscribe again");
    c.deliver(
        &gw,
        GatewayMessage::Close {
            uid: InstanceUid::new_v7(),
            epoch: 2,
            reason: String::new(),
        },
    )
    .await
    .expect("deliver");
    // The earlier deliveries were sent from another connection, so some may still reach the
    // new subscription; they come before the last one, which must arrive.
    loop {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(GatewayMessage::Close { epoch: 2, .. })) => break,
            Ok(Some(GatewayMessage::Close { epoch: 1, .. })) => continue,
            other => panic!("{other:?}"),
        }
    }
}

// ---- pure bookkeeping ----------------------------------------------------------------------

fn key(id: &str) -> ChunkKey {
    ("subj".into(), id.into())
}

fn hdr(id: &str, index: usize, count: usize, total: usize) -> ChunkHeader<'_> {
    ChunkHeader {
        msg_id: id,
        index,
        count,
        total,
    }
}

#[test]
fn chunk_headers_parse_strictly() {
    assert_eq!(ChunkHeader::parse("m-1 0 3 10"), Some(hdr("m-1", 0, 3, 10)));
    for bad in [
        "",
        "m-1 0 3",
        "m-1 3 3 10",
        "m-1 0 3 10 x",
        "m-1 a 3 10",
        " 0 1 1",
    ] {
        assert_eq!(ChunkHeader::parse(bad), None, "{bad:?}");
    }
    let pull = Pull::parse("p.inbox.n.fetch m-2 99").expect("pull");
    assert_eq!(
        (pull.fetch, pull.msg_id, pull.len),
        ("p.inbox.n.fetch", "m-2", 99)
    );
    assert!(Pull::parse("p.inbox.n.fetch m-2").is_none());
}

#[test]
fn chunks_reassemble_in_order() {
    let mut r = Reassembler::new(100, 50);
    let now = Instant::now();
    assert_eq!(
        r.add(key("a"), &hdr("a", 0, 3, 7), b"abc", now),
        Chunk::Pending
    );
    assert_eq!(r.reserved, 7);
    assert_eq!(
        r.add(key("a"), &hdr("a", 1, 3, 7), b"de", now),
        Chunk::Pending
    );
    assert_eq!(
        r.add(key("a"), &hdr("a", 2, 3, 7), b"fg", now),
        Chunk::Complete(Bytes::from_static(b"abcdefg"))
    );
    assert_eq!(r.reserved, 0);
    assert!(r.partial.is_empty() && r.dropped.is_empty());
}

#[test]
fn a_gap_drops_the_message_once() {
    let mut r = Reassembler::new(100, 50);
    let now = Instant::now();
    assert_eq!(
        r.add(key("a"), &hdr("a", 0, 4, 8), b"ab", now),
        Chunk::Pending
    );
    assert_eq!(
        r.add(key("a"), &hdr("a", 2, 4, 8), b"ef", now),
        Chunk::Dropped("incomplete_chunks")
    );
    assert_eq!(r.reserved, 0);
    assert_eq!(
        r.add(key("a"), &hdr("a", 3, 4, 8), b"gh", now),
        Chunk::Ignored
    );
    assert!(r.dropped.is_empty(), "forgotten after its last chunk");
    // A lost first chunk: counted once, at the first chunk that does arrive.
    assert_eq!(
        r.add(key("b"), &hdr("b", 1, 3, 6), b"cd", now),
        Chunk::Dropped("incomplete_chunks")
    );
    assert_eq!(
        r.add(key("b"), &hdr("b", 2, 3, 6), b"ef", now),
        Chunk::Ignored
    );
}

#[test]
fn reassembly_is_bounded() {
    let mut r = Reassembler::new(10, 8);
    let now = Instant::now();
    assert_eq!(
        r.add(key("big"), &hdr("big", 0, 3, 9), b"abc", now),
        Chunk::Dropped("too_large")
    );
    assert_eq!(
        r.add(key("big"), &hdr("big", 1, 3, 9), b"def", now),
        Chunk::Ignored
    );
    assert_eq!(
        r.add(key("a"), &hdr("a", 0, 2, 6), b"abc", now),
        Chunk::Pending
    );
    assert_eq!(
        r.add(key("b"), &hdr("b", 0, 2, 6), b"abc", now),
        Chunk::Dropped("buffer_full")
    );
    // Chunks that do not add up to their declared total are malformed.
    assert_eq!(
        r.add(key("a"), &hdr("a", 1, 2, 6), b"defg", now),
        Chunk::Dropped("malformed")
    );
    assert_eq!(r.reserved, 0);
}

#[test]
fn stale_partial_messages_expire() {
    let mut r = Reassembler::new(100, 50);
    let t0 = Instant::now();
    let timeout = Duration::from_secs(5);
    assert_eq!(
        r.add(key("a"), &hdr("a", 0, 2, 4), b"ab", t0),
        Chunk::Pending
    );
    assert_eq!(r.expire(t0 + Duration::from_secs(1), timeout), 0);
    assert_eq!(r.expire(t0 + timeout, timeout), 1);
    assert_eq!(r.reserved, 0);
    // Its last chunk, arriving late, is counted as incomplete rather than completing garbage.
    assert_eq!(
        r.add(key("a"), &hdr("a", 1, 2, 4), b"cd", t0 + timeout),
        Chunk::Dropped("incomplete_chunks")
    );
}

#[test]
fn the_outbox_is_bounded_and_expires() {
    let mut o = Outbox::new(10);
    let t0 = Instant::now();
    assert!(o.put("a".into(), Bytes::from_static(b"123456"), t0));
    assert!(
        !o.put("b".into(), Bytes::from_static(b"123456"), t0),
        "over the limit"
    );
    assert_eq!(o.take("a"), Some(Bytes::from_static(b"123456")));
    assert_eq!(o.take("a"), None, "fetched once");
    assert!(o.put("c".into(), Bytes::from_static(b"1234"), t0));
    assert_eq!(
        o.expire(t0 + Duration::from_secs(1), Duration::from_secs(2)),
        0
    );
    assert_eq!(
        o.expire(t0 + Duration::from_secs(2), Duration::from_secs(2)),
        1
    );
    assert_eq!(o.held, 0);
}

#[test]
fn ids_become_single_subject_tokens() {
    assert_eq!(token("host.example.com"), "host_example_com");
    assert_eq!(token("a*b>c d"), "a_b_c_d");
    assert_eq!(token(""), "_");
    let s = Subjects::new("ampora", "gateway-h.x-1");
    assert_eq!(s.reply(3), "ampora.inbox.gateway-h_x-1.r.3");
    assert_eq!(s.fetch, "ampora.inbox.gateway-h_x-1.fetch");
    assert_eq!(s.partition(17), "ampora.a2s.17");
    assert_eq!(s.route(Route::Any), "ampora.any");
    assert_eq!(s.gateway(&GatewayId("g.1".into())), "ampora.gw.g_1");
    assert!(s.is_inbox("ampora.inbox.other.fetch"));
    assert!(!s.is_inbox("amporax.inbox.other.fetch"));
    assert!(!s.is_inbox("elsewhere.fetch"));
}

// ---- coalescing --------------------------------------------------------------------------

/// What a plain subscription beside the bus saw on one subject: NATS messages, coalesced
/// ones among them, and the envelopes they carried.
#[derive(Default)]
struct Seen {
    messages: AtomicUsize,
    batches: AtomicUsize,
    envelopes: AtomicUsize,
}

/// Watches `subject` from a connection of its own (a plain subscriber gets a copy of every
/// message, queue groups notwithstanding); returns once the server has the subscription.
async fn watch(subject: String) -> Arc<Seen> {
    let raw = async_nats::connect(nats_url()).await.expect("raw client");
    let mut sub = raw.subscribe(subject).await.expect("subscribe");
    // A request nobody answers: the server's "no responders" comes after it processed the
    // subscription (one connection's operations are handled in order).
    let probe = format!("ampora-test-probe.{}", uuid::Uuid::new_v4().simple());
    let answer = raw.request(probe, Bytes::new()).await;
    assert!(
        matches!(&answer, Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders),
        "{answer:?}"
    );
    let seen = Arc::new(Seen::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        let _raw = raw;
        while let Some(msg) = sub.next().await {
            let n = header(&msg, H_BATCH).map_or(1, |v| v.parse::<usize>().expect("count"));
            counts.messages.fetch_add(1, Ordering::Relaxed);
            counts
                .batches
                .fetch_add(usize::from(n > 1), Ordering::Relaxed);
            counts.envelopes.fetch_add(n, Ordering::Relaxed);
        }
    });
    seen
}

/// Polls until `seen` counted `envelopes`.
async fn wait_for_envelopes(seen: &Seen, envelopes: usize) {
    let got = crate::testing::poll(WAIT, Duration::from_millis(5), || async {
        (seen.envelopes.load(Ordering::Relaxed) >= envelopes).then_some(())
    })
    .await;
    assert!(
        got.is_some(),
        "the watcher saw {} envelopes, expected {envelopes}",
        seen.envelopes.load(Ordering::Relaxed)
    );
}

async fn hasher_request(g: &NatsBus, partition: u16, body: Vec<u8>) -> (Vec<u8>, u64) {
    match tokio::time::timeout(
        WAIT,
        g.request(Route::Partition(partition), frame_with_config(body)),
    )
    .await
    .expect("request timed out")
    {
        Ok(CoordinatorReply::Frame(f)) => (f.msg.instance_uid, f.msg.capabilities),
        other => panic!("unexpected {other:?}"),
    }
}

/// Many requests from concurrent callers to one partition travel coalesced, and so do their
/// replies; each is handled once and answered with its own reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_are_coalesced_and_each_answered() {
    const N: usize = 600;
    let (prefix, c, g) = pair().await;
    let h = Arc::new(Hasher::default());
    c.serve_coordinator(h.clone()).await.expect("serve");
    c.serve_partitions(&[9]).await.expect("serve partition");
    let requests = watch(format!("{prefix}.a2s.9")).await;
    let replies = watch(format!("{prefix}.inbox.gw-1.batch")).await;
    let calls = (0..N).map(|i| {
        let body = body_of(i as u8, 16 + i);
        let want = (Sha256::digest(&body).to_vec(), body.len() as u64);
        let g = &g;
        async move { (want, hasher_request(g, 9, body).await) }
    });
    for (want, got) in futures::future::join_all(calls).await {
        assert_eq!(got, want, "a reply of another request");
    }
    assert_eq!(h.handled.load(Ordering::Relaxed), N, "each handled once");
    wait_for_envelopes(&requests, N).await;
    let (messages, batches) = (
        requests.messages.load(Ordering::Relaxed),
        requests.batches.load(Ordering::Relaxed),
    );
    assert!(
        batches > 0 && messages < N,
        "{messages} messages, {batches} batches"
    );
    assert_eq!(requests.envelopes.load(Ordering::Relaxed), N);
    assert!(
        replies.batches.load(Ordering::Relaxed) > 0,
        "replies to concurrent requests travel coalesced"
    );
}

/// A lone request does not wait for the linger: with a linger of minutes, one request after
/// another is still answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_request_does_not_wait_for_the_linger() {
    let prefix = random_prefix();
    let mut copts = options(&prefix, "coord-1");
    copts.batch_linger = Duration::from_secs(600);
    let mut gopts = options(&prefix, "gw-1");
    gopts.batch_linger = Duration::from_secs(600);
    let c = connect(copts).await;
    let g = connect(gopts).await;
    c.serve_coordinator(Arc::new(Hasher::default()))
        .await
        .expect("serve");
    c.serve_partitions(&[6]).await.expect("serve partition");
    let gw = GatewayId("gw-lone".into());
    let mut deliveries = g.subscribe_gateway(&gw).await.expect("subscribe");
    for i in 0..20u8 {
        let body = body_of(i, 100);
        let want = (Sha256::digest(&body).to_vec(), 100);
        assert_eq!(hasher_request(&g, 6, body).await, want);
        c.deliver(
            &gw,
            GatewayMessage::Close {
                uid: InstanceUid::new_v7(),
                epoch: u64::from(i),
                reason: String::new(),
            },
        )
        .await
        .expect("deliver");
        match tokio::time::timeout(WAIT, deliveries.recv()).await {
            Ok(Some(GatewayMessage::Close { epoch, .. })) => assert_eq!(epoch, u64::from(i)),
            other => panic!("{other:?}"),
        }
    }
}

/// Holds every request until released, counting arrivals.
struct Gate {
    arrived: AtomicUsize,
    open: tokio::sync::Semaphore,
    inner: Hasher,
}

#[async_trait]
impl CoordinatorHandler for Gate {
    async fn handle(&self, req: CoordinatorRequest) -> CoordinatorReply {
        self.arrived.fetch_add(1, Ordering::Relaxed);
        let _permit = self.open.acquire().await.expect("gate semaphore");
        self.inner.handle(req).await
    }

    async fn event(&self, _ev: CoordinatorEvent) {}
}

/// Unserving a partition while coalesced requests are in flight. Each request the coordinator
/// handled is answered, with its own reply, exactly once; batches are handled whole. The rest
/// find nobody, or are lost in flight and time out (their agents retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_around_an_unserve_are_answered_refused_or_lost_never_half_handled() {
    const N: usize = 400;
    let (_, c, g) = pair().await;
    let gate = Arc::new(Gate {
        arrived: AtomicUsize::new(0),
        open: tokio::sync::Semaphore::new(0),
        inner: Hasher::default(),
    });
    c.serve_coordinator(gate.clone()).await.expect("serve");
    c.serve_partitions(&[8]).await.expect("serve partition");
    let calls = (0..N).map(|i| {
        let g = &g;
        async move {
            let body = body_of(i as u8, 32 + i);
            let want = (Sha256::digest(&body).to_vec(), body.len() as u64);
            let res = g
                .request(Route::Partition(8), frame_with_config(body))
                .await;
            (want, res)
        }
    });
    let unserve = async {
        let gate_ref = &gate;
        let started = crate::testing::poll(WAIT, Duration::from_millis(1), || async move {
            (gate_ref.arrived.load(Ordering::Relaxed) > 0).then_some(())
        })
        .await;
        assert!(started.is_some(), "no request arrived");
        c.unserve_partitions(&[8]).await.expect("unserve");
        gate.open.add_permits(N);
    };
    let (results, ()) = futures::future::join(futures::future::join_all(calls), unserve).await;
    let (mut answered, mut lost) = (0, 0);
    for (want, res) in results {
        match res {
            Ok(CoordinatorReply::Frame(f)) => {
                assert_eq!((f.msg.instance_uid, f.msg.capabilities), want);
                answered += 1;
            }
            Err(BusError::NoResponder) => {}
            // A message the server sent just before it processed the unsubscribe reaches a
            // client that no longer has the subscription, which drops it (NATS semantics):
            // its requests time out and their agents retry. Only those few may be lost.
            Err(BusError::Timeout) => lost += 1,
            other => panic!("a request neither handled nor refused: {other:?}"),
        }
    }
    // Most are answered. The ones lost are those in flight when the subscription ended. That
    // window is wider than one message (up to 53 of 400 in one run here). Turning the drain off
    // does not move this figure measurably, so this test does not prove the drain; the
    // handled / arrived / answered equalities below still catch a half-handled batch.
    assert!(
        answered > lost,
        "{answered} answered, {lost} lost: received requests must be handled after unserve"
    );
    assert_eq!(gate.inner.handled.load(Ordering::Relaxed), answered);
    assert_eq!(gate.arrived.load(Ordering::Relaxed), answered);
}

/// Rolling upgrade: a sender that does not coalesce (linger zero, like versions before it)
/// is served by one that does and gets single replies; single envelopes from a plain client
/// are accepted, on coordinator and gateway subjects alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_envelopes_are_still_accepted_and_answered_alone() {
    const N: usize = 200;
    let prefix = random_prefix();
    let c = connect(options(&prefix, "coord-1")).await;
    let mut gopts = options(&prefix, "gw-1");
    gopts.batch_linger = Duration::ZERO;
    let g = connect(gopts).await;
    let h = Arc::new(Hasher::default());
    c.serve_coordinator(h.clone()).await.expect("serve");
    c.serve_partitions(&[7]).await.expect("serve partition");
    let requests = watch(format!("{prefix}.a2s.7")).await;
    let replies = watch(format!("{prefix}.inbox.gw-1.batch")).await;
    let calls = (0..N).map(|i| {
        let body = body_of(i as u8, 8 + i);
        let want = (Sha256::digest(&body).to_vec(), body.len() as u64);
        let g = &g;
        async move { (want, hasher_request(g, 7, body).await) }
    });
    for (want, got) in futures::future::join_all(calls).await {
        assert_eq!(got, want);
    }
    wait_for_envelopes(&requests, N).await;
    assert_eq!(
        requests.batches.load(Ordering::Relaxed),
        0,
        "linger zero coalesces nothing"
    );
    assert_eq!(requests.messages.load(Ordering::Relaxed), N);
    assert_eq!(
        replies.messages.load(Ordering::Relaxed),
        0,
        "no batched reply to a single request"
    );

    // A plain client's single envelopes: a request, answered on its own reply subject, and
    // a delivery.
    let raw = async_nats::connect(nats_url()).await.expect("raw client");
    let reply = raw
        .request(
            format!("{prefix}.a2s.7"),
            Bytes::from(crate::bus::wire::encode_request(frame_with_config(
                b"raw".to_vec(),
            ))),
        )
        .await
        .expect("raw request answered");
    match crate::bus::wire::decode_reply(&reply.payload) {
        Ok(CoordinatorReply::Frame(f)) => assert_eq!(f.msg.capabilities, 3),
        other => panic!("{other:?}"),
    }
    let gw = GatewayId("gw-raw".into());
    let mut deliveries = g.subscribe_gateway(&gw).await.expect("subscribe");
    let close = GatewayMessage::Close {
        uid: InstanceUid::new_v7(),
        epoch: 4,
        reason: "raw".into(),
    };
    raw.publish(
        format!("{prefix}.gw.gw-raw"),
        Bytes::from(crate::bus::wire::encode_gateway(close)),
    )
    .await
    .expect("publish");
    match tokio::time::timeout(WAIT, deliveries.recv()).await {
        Ok(Some(GatewayMessage::Close { epoch: 4, .. })) => {}
        other => panic!("{other:?}"),
    }
}
