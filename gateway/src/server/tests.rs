//! The gateway over real sockets, with a fake coordinator on the in-process bus.

use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, WebSocket};
use http::header::{
    AUTHORIZATION, CONNECTION, CONTENT_ENCODING, CONTENT_TYPE, UPGRADE, WWW_AUTHENTICATE,
};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::upgrade::Upgraded;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proto::{AgentToServer, Message, ServerToAgent};
use shared::bus::{
    AuthDecision, AuthFailure, Bus, CoordinatorEvent, CoordinatorHandler, CoordinatorReply,
    CoordinatorRequest, Credential, FrameReply, GatewayMessage, InProcessBus,
};
use shared::ids::{GatewayId, InstanceUid};
use shared::ownership::{MemoryOwnership, Ownership};
use tokio::net::{TcpListener, TcpStream};

use super::{Gateway, GatewayConfig, OPAMP_PATH};
use crate::codec;

const MAX: usize = 1024;
const WAIT: Duration = Duration::from_secs(5);

/// Accepts the token "good"; answers every frame with an ack echoing the UID and binding it.
#[derive(Default)]
struct FakeCoordinator {
    events: Mutex<Vec<CoordinatorEvent>>,
}

#[async_trait]
impl CoordinatorHandler for FakeCoordinator {
    async fn handle(&self, req: CoordinatorRequest) -> CoordinatorReply {
        match req {
            CoordinatorRequest::Authenticate(a) if a.token == "good" => {
                CoordinatorReply::Auth(AuthDecision::Accept(Credential::BootstrapToken {
                    token_id: "t1".into(),
                    bound_uid: None,
                }))
            }
            // As a coordinator whose store failed answers.
            CoordinatorRequest::Authenticate(a) if a.token == "undecided" => {
                CoordinatorReply::Auth(AuthDecision::Unavailable)
            }
            CoordinatorRequest::Authenticate(_) => {
                CoordinatorReply::Auth(AuthDecision::Reject(AuthFailure::UnknownToken))
            }
            CoordinatorRequest::RevokedSerials => CoordinatorReply::RevokedSerials(Vec::new()),
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
        GatewayConfig {
            max_frame_bytes: MAX,
            request_timeout: Duration::from_secs(2),
            write_queue: 4,
            bootstrap_plaintext_allowed: plaintext_allowed,
            ..GatewayConfig::default()
        },
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

fn hello(uid: InstanceUid) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.0.to_vec(),
        capabilities: 0x1,
        ..Default::default()
    }
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
const GOOD: (&str, &str) = ("Authorization", "Bearer good");

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
        &[PB, ("Authorization", "Bearer bad")],
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
        &[PB, ("Authorization", "Bearer undecided")],
        hello(InstanceUid::new_v7()).encode_to_vec(),
    )
    .await?;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert!(r.headers.contains_key(http::header::RETRY_AFTER));
    let refused = within(connect(h.addr, Some("Bearer undecided"))).await;
    assert!(refused.is_err(), "no upgrade without a decision");
    Ok(())
}

type Ws = WebSocket<TokioIo<Upgraded>>;

async fn connect(
    addr: SocketAddr,
    auth: Option<&str>,
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
    if let Some(auth) = auth {
        req = req.header(AUTHORIZATION, auth);
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

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
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
    let refused = connect(h.addr, Some("Bearer bad")).await.err();
    assert!(matches!(
        refused,
        Some(fastwebsockets::WebSocketError::InvalidStatusCode(401))
    ));

    // First exchange binds the agent to this connection.
    let mut ws = connect(h.addr, Some("Bearer good")).await?;
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
    let mut ws2 = connect(h.addr, Some("Bearer good")).await?;
    send(&mut ws2, &hello(uid)).await?;
    assert_eq!(recv_msg(&mut ws2).await?.instance_uid, uid.0.to_vec());
    let (code, reason) = recv_close(&mut ws).await?;
    assert_eq!(
        (code, reason.as_str()),
        (1008, "superseded by a newer connection")
    );
    let owner2 = h.ownership.lookup(uid).await?.expect("claimed");
    assert!(owner2.epoch > owner.epoch);
    eventually("old connection gone", || h.gateway.connected() == 1).await;
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
    eventually("connection released", || h.gateway.connected() == 0).await;
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
    let mut ws3 = connect(h.addr, Some("Bearer good")).await?;
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
    let mut ws4 = connect(h.addr, Some("Bearer good")).await?;
    ws4.write_frame(Frame::text(b"hi".to_vec().into())).await?;
    assert_eq!(recv_close(&mut ws4).await?.0, 1003);

    // Shutdown says "going away" to everyone, even before their first message.
    let mut ws5 = connect(h.addr, Some("Bearer good")).await?;
    eventually("connection registered", || h.gateway.connected() == 1).await;
    within(h.gateway.shutdown()).await;
    assert_eq!(h.gateway.connected(), 0);
    assert_eq!(recv_close(&mut ws5).await?.0, 1001);
    let refused = connect(h.addr, Some("Bearer good")).await.err();
    assert!(matches!(
        refused,
        Some(fastwebsockets::WebSocketError::InvalidStatusCode(503))
    ));
    Ok(())
}
