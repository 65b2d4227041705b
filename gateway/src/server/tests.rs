//! The gateway over real sockets, with a fake coordinator on the in-process bus.

use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, WebSocket};
use http::header::{CONNECTION, CONTENT_ENCODING, CONTENT_TYPE, UPGRADE, WWW_AUTHENTICATE};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::upgrade::Upgraded;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proto::{AgentToServer, Message, ServerToAgent};
use shared::bus::{
    AuthDecision, AuthFailure, AuthRequest, Bus, CoordinatorEvent, CoordinatorHandler,
    CoordinatorReply, CoordinatorRequest, Credential, FrameReply, GatewayMessage, InProcessBus,
    PresentedToken,
};
use shared::codec;
use shared::ids::{GatewayId, InstanceUid};
use shared::ownership::{MemoryOwnership, Ownership};
use shared::testing::{eventually, first_message as hello};
use tokio::net::{TcpListener, TcpStream};

use super::{Gateway, GatewayConfig, OPAMP_PATH};

const MAX: usize = 1024;
const WAIT: Duration = Duration::from_secs(5);

/// Well-formed bootstrap tokens (prefix, secret, CRC) the fake coordinator tells apart.
const GOOD_TOKEN: &str = "amp-bs.goodgood.0baee47d";
const BAD_TOKEN: &str = "amp-bs.badtoken.c1d177a2";
const UNDECIDED_TOKEN: &str = "amp-bs.undecide.dbfc0254";

fn presented(token: &str) -> Option<PresentedToken> {
    Some(PresentedToken::from_bootstrap_token(token).expect("well-formed test token"))
}

/// Accepts [`GOOD_TOKEN`]; answers every frame with an ack echoing the UID and binding it.
/// Keeps what it was asked and told.
#[derive(Default)]
struct FakeCoordinator {
    events: Mutex<Vec<CoordinatorEvent>>,
    auths: Mutex<Vec<AuthRequest>>,
    /// `secure` of every frame, in order.
    secure: Mutex<Vec<bool>>,
}

#[async_trait]
impl CoordinatorHandler for FakeCoordinator {
    async fn handle(&self, req: CoordinatorRequest) -> CoordinatorReply {
        match &req {
            CoordinatorRequest::Authenticate(a) => {
                self.auths.lock().expect("auths").push(a.clone())
            }
            CoordinatorRequest::Frame(f) => self.secure.lock().expect("secure").push(f.secure),
            CoordinatorRequest::RevokedSerials | CoordinatorRequest::BlobChunk { .. } => {}
        }
        match req {
            CoordinatorRequest::Authenticate(a) if a.token == presented(GOOD_TOKEN) => {
                CoordinatorReply::Auth(AuthDecision::Accept(Credential::BootstrapToken {
                    token_id: "t1".into(),
                    bound_uid: None,
                }))
            }
            // As a coordinator whose store failed answers.
            CoordinatorRequest::Authenticate(a) if a.token == presented(UNDECIDED_TOKEN) => {
                CoordinatorReply::Auth(AuthDecision::Unavailable)
            }
            CoordinatorRequest::Authenticate(_) => {
                CoordinatorReply::Auth(AuthDecision::Reject(AuthFailure::UnknownToken))
            }
            CoordinatorRequest::RevokedSerials => CoordinatorReply::RevokedSerials(Vec::new()),
            CoordinatorRequest::BlobChunk { .. } => {
                CoordinatorReply::BlobChunk(shared::bus::BlobChunk::Missing)
            }
            CoordinatorRequest::Frame(f) => {
                // A frame asking for this capability value gets refused, to test closes.
                let close = (f.msg.capabilities == 0xDEAD).then(|| "auth: token revoked".into());
                CoordinatorReply::Frame(Box::new(FrameReply {
                    msg: ServerToAgent {
                        instance_uid: f.msg.instance_uid.clone(),
                        capabilities: 0x1,
                        ..Default::default()
                    },
                    bind: InstanceUid::from_slice(&f.msg.instance_uid),
                    close,
                }))
            }
        }
    }

    async fn event(&self, ev: CoordinatorEvent) {
        self.events.lock().expect("events").push(ev);
    }
}

struct Harness {
    addr: SocketAddr,
    gateway: Arc<Gateway>,
    bus: Arc<InProcessBus>,
    ownership: Arc<MemoryOwnership>,
    coordinator: Arc<FakeCoordinator>,
}

async fn start(plaintext_allowed: bool) -> anyhow::Result<Harness> {
    start_with(plaintext_allowed, |_| {}).await
}

async fn start_with(
    plaintext_allowed: bool,
    configure: impl FnOnce(&mut GatewayConfig),
) -> anyhow::Result<Harness> {
    let mut config = GatewayConfig {
        max_frame_bytes: MAX,
        request_timeout: Duration::from_secs(2),
        write_queue: 4,
        bootstrap_plaintext_allowed: plaintext_allowed,
        ..GatewayConfig::default()
    };
    configure(&mut config);
    let bus = Arc::new(InProcessBus::new());
    let coordinator = Arc::new(FakeCoordinator::default());
    bus.serve_coordinator(coordinator.clone()).await?;
    let all: Vec<u16> = (0..shared::ids::PARTITIONS).collect();
    bus.serve_partitions(&all).await?;
    let ownership = Arc::new(MemoryOwnership::new());
    let gateway = Gateway::start(
        GatewayId("gw-test".into()),
        bus.clone(),
        ownership.clone(),
        config,
    )
    .await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = gateway.router();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    Ok(Harness {
        addr,
        gateway,
        bus,
        ownership,
        coordinator,
    })
}

async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.expect("timed out")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

struct HttpResponse {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl HttpResponse {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn post(
    addr: SocketAddr,
    method: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> anyhow::Result<HttpResponse> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{OPAMP_PATH}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = within(client.request(req.body(Full::new(Bytes::from(body)))?)).await?;
    let (parts, body) = resp.into_parts();
    let body = within(body.collect()).await?.to_bytes();
    Ok(HttpResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

const PB: (&str, &str) = ("Content-Type", "application/x-protobuf");
const GOOD: (&str, &str) = ("Authorization", "Bearer amp-bs.goodgood.0baee47d");

#[tokio::test]
async fn plain_http_transport() -> anyhow::Result<()> {
    let h = start(true).await?;
    let uid = InstanceUid::new_v7();
    let body = hello(uid).encode_to_vec();

    let r = post(h.addr, "POST", &[PB, GOOD], body.clone()).await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.headers[CONTENT_TYPE], "application/x-protobuf");
    assert!(r.headers.get(CONTENT_ENCODING).is_none());
    let reply = ServerToAgent::decode(r.body)?;
    assert_eq!(reply.instance_uid, uid.0.to_vec());
    assert_eq!(reply.capabilities, 0x1);
    // HTTP agents are never claimed.
    assert_eq!(h.ownership.lookup(uid).await?, None);

    // gzip both ways, with the optional UID header matching the body.
    let uid_text = uid.to_string();
    let r = post(
        h.addr,
        "POST",
        &[
            ("content-type", "Application/X-Protobuf; charset=binary"),
            GOOD,
            ("Content-Encoding", "gzip"),
            ("Accept-Encoding", "gzip, deflate"),
            ("OpAMP-Instance-UID", &uid_text),
        ],
        gzip(&body),
    )
    .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.headers[CONTENT_ENCODING], "gzip");
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&r.body[..]).read_to_end(&mut plain)?;
    assert_eq!(
        ServerToAgent::decode(&plain[..])?.instance_uid,
        uid.0.to_vec()
    );

    // Authentication.
    let r = post(h.addr, "POST", &[PB], body.clone()).await?;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers[WWW_AUTHENTICATE], "Bearer");
    let r = post(
        h.addr,
        "POST",
        &[PB, ("Authorization", "amp-bs.abc.123")],
        body.clone(),
    )
    .await?;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.text().contains("Bearer"), "{}", r.text());
    let r = post(
        h.addr,
        "POST",
        &[PB, ("Authorization", "Bearer amp-bs.badtoken.c1d177a2")],
        body.clone(),
    )
    .await?;
    assert_eq!(
        (r.status, r.text().as_str()),
        (StatusCode::UNAUTHORIZED, "unknown token")
    );

    // Bad input.
    let big = AgentToServer {
        instance_uid: uid.0.to_vec(),
        custom_message: Some(proto::v1::CustomMessage {
            data: vec![7; 2 * MAX],
            ..Default::default()
        }),
        ..Default::default()
    };
    let r = post(h.addr, "POST", &[PB, GOOD], big.encode_to_vec()).await?;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let gz = [PB, GOOD, ("Content-Encoding", "gzip")];
    let r = post(h.addr, "POST", &gz, gzip(&big.encode_to_vec())).await?;
    assert_eq!(
        r.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "limit applies after gunzip"
    );
    let r = post(h.addr, "POST", &[PB, GOOD], vec![0xFF, 0xFF, 0xFF]).await?;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.text().starts_with("malformed AgentToServer"),
        "{}",
        r.text()
    );
    let r = post(h.addr, "POST", &gz, b"not gzip".to_vec()).await?;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let other = InstanceUid::new_v7().to_string();
    let r = post(
        h.addr,
        "POST",
        &[PB, GOOD, ("OpAMP-Instance-UID", &other)],
        body.clone(),
    )
    .await?;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "header/body uid mismatch"
    );
    let r = post(
        h.addr,
        "POST",
        &[PB, GOOD, ("OpAMP-Instance-UID", "nope")],
        body.clone(),
    )
    .await?;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.text(), "invalid OpAMP-Instance-UID header");

    // Routing.
    let r = post(h.addr, "GET", &[PB, GOOD], Vec::new()).await?;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    let r = post(h.addr, "POST", &[GOOD], body.clone()).await?;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.text(),
        "expected websocket upgrade or application/x-protobuf POST"
    );

    // A coordinator close becomes 401 without the "auth:" prefix.
    let refused = AgentToServer {
        capabilities: 0xDEAD,
        ..hello(uid)
    };
    let r = post(h.addr, "POST", &[PB, GOOD], refused.encode_to_vec()).await?;
    assert_eq!(
        (r.status, r.text().as_str()),
        (StatusCode::UNAUTHORIZED, "token revoked")
    );
    Ok(())
}

#[tokio::test]
async fn bootstrap_over_plaintext_can_be_refused() -> anyhow::Result<()> {
    let h = start(false).await?;
    let r = post(
        h.addr,
        "POST",
        &[PB, GOOD],
        hello(InstanceUid::new_v7()).encode_to_vec(),
    )
    .await?;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.text(), "bootstrap over plaintext is not allowed");
    Ok(())
}

#[tokio::test]
async fn undecided_authentication_is_retry_later_not_401() -> anyhow::Result<()> {
    let h = start(true).await?;
    let r = post(
        h.addr,
        "POST",
        &[PB, ("Authorization", "Bearer amp-bs.undecide.dbfc0254")],
        hello(InstanceUid::new_v7()).encode_to_vec(),
    )
    .await?;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert!(r.headers.contains_key(http::header::RETRY_AFTER));
    let refused = within(connect(h.addr, Some("Bearer amp-bs.undecide.dbfc0254"))).await;
    assert!(refused.is_err(), "no upgrade without a decision");
    Ok(())
}

/// Issue 17: a malformed token is refused by the gateway itself (401, reported for the audit),
/// and of a well-formed one only its hash and display prefix reach a coordinator.
#[tokio::test]
async fn tokens_cross_the_bus_only_hashed_and_well_formed() -> anyhow::Result<()> {
    let h = start(true).await?;
    let body = hello(InstanceUid::new_v7()).encode_to_vec();
    // Right prefix, wrong CRC; and no CRC at all.
    for malformed in ["amp-bs.goodgood.0baee47e", "amp-bs.goodgood"] {
        let auth = format!("Bearer {malformed}");
        let r = post(
            h.addr,
            "POST",
            &[PB, ("Authorization", &auth)],
            body.clone(),
        )
        .await?;
        assert_eq!(
            (r.status, r.text().as_str()),
            (StatusCode::UNAUTHORIZED, "malformed token")
        );
        let refused = connect(h.addr, Some(&auth)).await.err();
        assert!(matches!(
            refused,
            Some(fastwebsockets::WebSocketError::InvalidStatusCode(401))
        ));
    }
    assert!(
        h.coordinator.auths.lock().expect("auths").is_empty(),
        "a malformed token must not be sent to a coordinator"
    );
    let reported = h
        .coordinator
        .events
        .lock()
        .expect("events")
        .iter()
        .filter(|e| {
            matches!(e, CoordinatorEvent::AuthFailed { reason, .. } if reason == "malformed_token")
        })
        .count();
    assert_eq!(
        reported, 4,
        "every malformed token is reported for the audit"
    );

    let bad = format!("Bearer {BAD_TOKEN}");
    let r = post(h.addr, "POST", &[PB, ("Authorization", &bad)], body.clone()).await?;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = post(h.addr, "POST", &[PB, GOOD], body).await?;
    assert_eq!(r.status, StatusCode::OK);
    let auths = h.coordinator.auths.lock().expect("auths").clone();
    assert_eq!(auths.len(), 2);
    let sent = auths[0].token.clone().expect("a token");
    assert_eq!(sent.hash, shared::token::hash_token(BAD_TOKEN));
    assert_eq!(sent.prefix, "amp-bs.badt…");
    assert!(auths[0].certificate.is_none());
    assert!(!format!("{auths:?}").contains("badtoken"), "{auths:?}");
    Ok(())
}

/// Issue 18: every frame says whether the agent's connection is TLS: plaintext here, unless a
/// trusted proxy that presents the secret says it terminated TLS.
#[tokio::test]
async fn frames_say_whether_the_agent_connection_is_tls() -> anyhow::Result<()> {
    const SECRET: &str = "0123456789abcdef-gateway-test";
    let h = start_with(true, |c| {
        c.trusted_proxies = vec!["127.0.0.1".parse().expect("net")];
        c.proxy_secret = Some(super::ProxySecret::parse(SECRET).expect("secret"));
    })
    .await?;
    let secret = super::PROXY_SECRET_HEADER;
    let secret = secret.as_str();
    let body = hello(InstanceUid::new_v7()).encode_to_vec();
    let https = ("X-Forwarded-Proto", "https");
    let cases: [(&[(&str, &str)], bool); 4] = [
        (&[PB, GOOD], false),
        (&[PB, GOOD, https], false),
        (
            &[PB, GOOD, https, (secret, "0123456789abcdef-wrong")],
            false,
        ),
        (&[PB, GOOD, https, (secret, SECRET)], true),
    ];
    for (i, (headers, _)) in cases.iter().enumerate() {
        let r = post(h.addr, "POST", headers, body.clone()).await?;
        assert_eq!(r.status, StatusCode::OK, "case {i}: {}", r.text());
    }
    let want: Vec<bool> = cases.iter().map(|(_, secure)| *secure).collect();
    assert_eq!(*h.coordinator.secure.lock().expect("secure"), want);

    // A WebSocket's frames too.
    for (headers, secure) in [
        (&[GOOD, https][..], false),
        (&[GOOD, https, (secret, SECRET)][..], true),
    ] {
        let mut ws = connect_with(h.addr, headers).await?;
        send(&mut ws, &hello(InstanceUid::new_v7())).await?;
        recv_msg(&mut ws).await?;
        assert_eq!(
            h.coordinator.secure.lock().expect("secure").last(),
            Some(&secure)
        );
    }
    Ok(())
}

/// What [`LogRecorder`] saw: level and message of every event.
type Logged = Arc<Mutex<Vec<(tracing::Level, String)>>>;

/// A subscriber keeping every event's level and message (tests run on one thread, so one
/// set as this thread's default sees the server's tasks too).
struct LogRecorder(Logged);

impl tracing::Subscriber for LogRecorder {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        let level = *event.metadata().level();
        self.0.lock().expect("log").push((level, m.0));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A refused attempt is counted (`auth_failed`) and audited by the coordinator; a WARN line
/// per attempt would let a looping or hostile client flood the log, so it is a debug line.
#[tokio::test]
async fn refused_attempts_are_not_logged_at_warn() -> anyhow::Result<()> {
    let logged: Logged = Arc::default();
    let _log = tracing::subscriber::set_default(LogRecorder(logged.clone()));
    let h = start(true).await?;
    let body = hello(InstanceUid::new_v7()).encode_to_vec();
    let bad = format!("Bearer {BAD_TOKEN}");
    let refusals: [&[(&str, &str)]; 3] = [
        &[PB],
        &[PB, ("Authorization", "Bearer amp-bs.x.00000000")],
        &[PB, ("Authorization", &bad)],
    ];
    for headers in refusals {
        let r = post(h.addr, "POST", headers, body.clone()).await?;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    assert!(connect(h.addr, Some(&bad)).await.is_err());
    // Refused by the coordinator after the upgrade, at the first frame.
    let mut ws = connect(h.addr, Some(GOOD.1)).await?;
    let refused = AgentToServer {
        capabilities: 0xDEAD,
        ..hello(InstanceUid::new_v7())
    };
    send(&mut ws, &refused).await?;
    recv_msg(&mut ws).await?;
    assert_eq!(recv_close(&mut ws).await?.0, 1008);

    let failed: Vec<tracing::Level> = logged
        .lock()
        .expect("log")
        .iter()
        .filter(|(_, m)| m == "authentication failed")
        .map(|(level, _)| *level)
        .collect();
    assert_eq!(failed.len(), 5, "each refusal still logged: {failed:?}");
    assert!(
        failed.iter().all(|l| *l == tracing::Level::DEBUG),
        "at debug only: {failed:?}"
    );
    Ok(())
}

type Ws = WebSocket<TokioIo<Upgraded>>;

async fn connect(
    addr: SocketAddr,
    auth: Option<&str>,
) -> Result<Ws, fastwebsockets::WebSocketError> {
    let auth: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    connect_with(addr, &auth).await
}

async fn connect_with(
    addr: SocketAddr,
    headers: &[(&str, &str)],
) -> Result<Ws, fastwebsockets::WebSocketError> {
    let stream = TcpStream::connect(addr).await?;
    let mut req = Request::builder()
        .method("GET")
        .uri(format!("http://{addr}{OPAMP_PATH}"))
        .header("Host", addr.to_string())
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|_| fastwebsockets::WebSocketError::InvalidValue)?;
    let (ws, _) = within(fastwebsockets::handshake::client(
        &TokioExecutor::new(),
        req,
        stream,
    ))
    .await?;
    Ok(ws)
}

async fn send(ws: &mut Ws, msg: &AgentToServer) -> anyhow::Result<()> {
    ws.write_frame(Frame::binary(codec::encode_ws_message(msg).into()))
        .await?;
    Ok(())
}

enum Received {
    Msg(Box<ServerToAgent>),
    Closed(u16, String),
}

async fn recv(ws: &mut Ws) -> anyhow::Result<Received> {
    loop {
        let frame = within(ws.read_frame()).await?;
        match frame.opcode {
            OpCode::Binary => {
                let msg = codec::decode_ws::<ServerToAgent>(&frame.payload, usize::MAX)?;
                return Ok(Received::Msg(Box::new(msg)));
            }
            OpCode::Close => {
                let code = frame
                    .payload
                    .get(..2)
                    .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                let reason = String::from_utf8_lossy(frame.payload.get(2..).unwrap_or_default());
                return Ok(Received::Closed(code, reason.into_owned()));
            }
            _ => continue,
        }
    }
}

async fn recv_msg(ws: &mut Ws) -> anyhow::Result<ServerToAgent> {
    match recv(ws).await? {
        Received::Msg(m) => Ok(*m),
        Received::Closed(code, reason) => anyhow::bail!("closed {code} {reason}"),
    }
}

async fn recv_close(ws: &mut Ws) -> anyhow::Result<(u16, String)> {
    match recv(ws).await? {
        Received::Closed(code, reason) => Ok((code, reason)),
        Received::Msg(m) => anyhow::bail!("expected close, got {m:?}"),
    }
}

/// Pause between two checks in [`eventually`].
const POLL: Duration = Duration::from_millis(10);

#[tokio::test]
async fn websocket_transport() -> anyhow::Result<()> {
    let h = start(true).await?;
    let gw = GatewayId("gw-test".into());

    // Refused upgrades.
    let refused = connect(h.addr, None).await.err();
    assert!(matches!(
        refused,
        Some(fastwebsockets::WebSocketError::InvalidStatusCode(401))
    ));
    let refused = connect(h.addr, Some("Bearer amp-bs.badtoken.c1d177a2"))
        .await
        .err();
    assert!(matches!(
        refused,
        Some(fastwebsockets::WebSocketError::InvalidStatusCode(401))
    ));

    // First exchange binds the agent to this connection.
    let mut ws = connect(h.addr, Some(GOOD.1)).await?;
    let uid = InstanceUid::new_v7();
    send(&mut ws, &hello(uid)).await?;
    let ack = recv_msg(&mut ws).await?;
    assert_eq!(ack.instance_uid, uid.0.to_vec());
    assert_eq!(h.gateway.connected(), 1);
    let owner = h.ownership.lookup(uid).await?.expect("claimed");
    assert_eq!(owner.gateway, gw);

    // A push at the bound epoch arrives; one at a stale epoch doesn't.
    let push = |epoch, caps| GatewayMessage::Deliver {
        uid,
        epoch,
        msg: Box::new(ServerToAgent {
            instance_uid: uid.0.to_vec(),
            capabilities: caps,
            ..Default::default()
        }),
    };
    h.bus.deliver(&gw, push(owner.epoch + 100, 0x2)).await?;
    h.bus.deliver(&gw, push(owner.epoch, 0x4)).await?;
    assert_eq!(recv_msg(&mut ws).await?.capabilities, 0x4);

    // Malformed messages are answered with BadRequest and the connection survives.
    ws.write_frame(Frame::binary(vec![0x00, 0xFF, 0xFF, 0xFF].into()))
        .await?;
    let bad = recv_msg(&mut ws).await?;
    assert_eq!(
        bad.error_response.map(|e| e.r#type),
        Some(proto::v1::ServerErrorResponseType::BadRequest as i32)
    );
    assert!(bad.instance_uid.is_empty());
    // A fragmented message is reassembled.
    let whole = codec::encode_ws_message(&hello(uid));
    let (a, b) = whole.split_at(5);
    ws.write_frame(Frame::new(false, OpCode::Binary, None, a.to_vec().into()))
        .await?;
    ws.write_frame(Frame::new(
        true,
        OpCode::Continuation,
        None,
        b.to_vec().into(),
    ))
    .await?;
    assert_eq!(recv_msg(&mut ws).await?.instance_uid, uid.0.to_vec());

    // A second connection for the same agent supersedes the first.
    let mut ws2 = connect(h.addr, Some(GOOD.1)).await?;
    send(&mut ws2, &hello(uid)).await?;
    assert_eq!(recv_msg(&mut ws2).await?.instance_uid, uid.0.to_vec());
    let (code, reason) = recv_close(&mut ws).await?;
    assert_eq!(
        (code, reason.as_str()),
        (1008, "superseded by a newer connection")
    );
    let owner2 = h.ownership.lookup(uid).await?.expect("claimed");
    assert!(owner2.epoch > owner.epoch);
    eventually("old connection gone", WAIT, POLL, || {
        h.gateway.connected() == 1
    })
    .await;
    // The old connection's release was fenced out: the new one still owns the agent.
    assert_eq!(h.ownership.lookup(uid).await?, Some(owner2.clone()));

    // Oversize closes with 1009.
    let big = AgentToServer {
        custom_message: Some(proto::v1::CustomMessage {
            data: vec![7; 2 * MAX],
            ..Default::default()
        }),
        ..hello(uid)
    };
    send(&mut ws2, &big).await?;
    assert_eq!(recv_close(&mut ws2).await?.0, 1009);
    eventually("connection released", WAIT, POLL, || {
        h.gateway.connected() == 0
    })
    .await;
    assert_eq!(h.ownership.lookup(uid).await?, None);
    let disconnected = h
        .coordinator
        .events
        .lock()
        .expect("events")
        .iter()
        .filter(|e| matches!(e, CoordinatorEvent::Disconnected { uid: u, .. } if *u == uid))
        .count();
    assert_eq!(
        disconnected, 2,
        "both connections reported their disconnect"
    );

    // A coordinator close ends the connection with 1008 after the reply.
    let mut ws3 = connect(h.addr, Some(GOOD.1)).await?;
    send(
        &mut ws3,
        &AgentToServer {
            capabilities: 0xDEAD,
            ..hello(InstanceUid::new_v7())
        },
    )
    .await?;
    assert!(recv_msg(&mut ws3).await?.error_response.is_none());
    assert_eq!(
        recv_close(&mut ws3).await?,
        (1008, "auth: token revoked".into())
    );

    // Text frames are refused with 1003.
    let mut ws4 = connect(h.addr, Some(GOOD.1)).await?;
    ws4.write_frame(Frame::text(b"hi".to_vec().into())).await?;
    assert_eq!(recv_close(&mut ws4).await?.0, 1003);

    // Shutdown says "going away" to everyone, even before their first message.
    let mut ws5 = connect(h.addr, Some(GOOD.1)).await?;
    eventually("connection registered", WAIT, POLL, || {
        h.gateway.connected() == 1
    })
    .await;
    within(h.gateway.shutdown()).await;
    assert_eq!(h.gateway.connected(), 0);
    assert_eq!(recv_close(&mut ws5).await?.0, 1001);
    let refused = connect(h.addr, Some(GOOD.1)).await.err();
    assert!(matches!(
        refused,
        Some(fastwebsockets::WebSocketError::InvalidStatusCode(503))
    ));
    Ok(())
}
