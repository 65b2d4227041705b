//! Socket-level tests of the client against a tiny scripted OpAMP server on loopback.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::http::{Request, Response, StatusCode};
use bytes::Bytes;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proto::v1::{
    server_error_response, AgentConfigFile, AgentConfigMap, AgentIdentification, AgentRemoteConfig,
    ConnectionSettingsOffers, OpAmpConnectionSettings, RemoteConfigStatuses, RetryInfo,
    ServerErrorResponse, ServerErrorResponseType,
};
use proto::{agent_flags, AgentToServer, Message, ServerToAgent};
use shared::testing::{eventually, poll};
use tokio::net::TcpListener;

use super::wire::{gunzip, gzip};
use super::*;
use crate::codec;

const DEADLINE: Duration = Duration::from_secs(10);
/// Pause between two checks of a condition.
const POLL: Duration = Duration::from_millis(10);
/// How long "nothing more arrives" is watched for.
const QUIET_WINDOW: Duration = Duration::from_millis(400);
const NEW_UID: [u8; 16] = [0xAB; 16];

/// What the fake server does beyond acknowledging every message.
#[derive(Clone, Default)]
struct Script {
    /// Answer RequestInstanceUid with NEW_UID.
    assign_uid: bool,
    /// Offer this config (hash, body) in the reply to message number `.0` (0-based, global).
    config_at: Option<(usize, &'static [u8], &'static str)>,
    /// Offer this heartbeat interval in the first reply.
    heartbeat_secs: Option<u64>,
    /// WS: close the first connection with this code after the first reply.
    close_first_with: Option<u16>,
    /// HTTP: answer with `Connection: close`.
    http_close: bool,
    /// WS: answer the first message of every connection with this error response type
    /// (retry 30 s for Unavailable), then close with this code and `identity_required`.
    error_then_close: Option<(ServerErrorResponseType, u16)>,
    /// Offer `connection_settings.opamp` (always the same hash) in the first reply of each
    /// of the first `.0` connections, with endpoint `.1` (`{addr}`: the server's address).
    offer_first_connections: Option<(usize, &'static str)>,
    /// Set by [`FakeServer::start`].
    addr: Option<std::net::SocketAddr>,
}

#[derive(Default)]
struct Log {
    /// (connection number, message).
    msgs: Vec<(usize, AgentToServer)>,
    connections: usize,
    /// Request headers of interest, per request: (authorization, content-type,
    /// content-encoding, accept-encoding, OpAMP-Instance-UID).
    headers: Vec<[Option<String>; 5]>,
    close_codes: Vec<u16>,
    /// When each TCP connection was accepted.
    accepted: Vec<tokio::time::Instant>,
}

#[derive(Clone)]
struct FakeServer {
    addr: std::net::SocketAddr,
    log: Arc<Mutex<Log>>,
}

impl FakeServer {
    async fn start(mut script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        script.addr = Some(addr);
        let log = Arc::new(Mutex::new(Log::default()));
        let srv = Self {
            addr,
            log: log.clone(),
        };
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let conn_no = {
                    let mut l = log.lock().expect("lock");
                    l.connections += 1;
                    l.accepted.push(tokio::time::Instant::now());
                    l.connections
                };
                let (log, script) = (log.clone(), script.clone());
                tokio::spawn(async move {
                    let svc =
                        service_fn(move |req| handle(req, conn_no, log.clone(), script.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        srv
    }

    fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn msgs(&self) -> Vec<(usize, AgentToServer)> {
        self.log.lock().expect("lock").msgs.clone()
    }

    /// Polls the log until `pred` holds (the server side has no watch channel).
    async fn until(&self, what: &str, pred: impl Fn(&Log) -> bool) {
        let what = format!("the server to see: {what}");
        eventually(&what, DEADLINE, POLL, || {
            pred(&self.log.lock().expect("lock"))
        })
        .await;
    }
}

fn header(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The server's answer to message number `n` (0-based over the whole test), the first
/// (`first`) or a later one on connection `conn`.
fn reply(
    msg: &AgentToServer,
    n: usize,
    conn: usize,
    first: bool,
    script: &Script,
) -> ServerToAgent {
    let mut out = ServerToAgent {
        instance_uid: msg.instance_uid.clone(),
        capabilities: 0x67,
        ..ServerToAgent::default()
    };
    if let (Some((kind, _)), true) = (script.error_then_close, first) {
        out.error_response = Some(ServerErrorResponse {
            r#type: kind as i32,
            error_message: "refused".into(),
            details: Some(server_error_response::Details::RetryInfo(RetryInfo {
                retry_after_nanoseconds: 30_000_000_000,
            })),
        });
        return out;
    }
    if let Some((upto, endpoint)) = script.offer_first_connections {
        if first && conn <= upto {
            let addr = script.addr.map(|a| a.to_string()).unwrap_or_default();
            out.connection_settings = Some(ConnectionSettingsOffers {
                hash: vec![7],
                opamp: Some(OpAmpConnectionSettings {
                    destination_endpoint: endpoint.replace("{addr}", &addr),
                    heartbeat_interval_seconds: 3600,
                    ..OpAmpConnectionSettings::default()
                }),
                ..ConnectionSettingsOffers::default()
            });
        }
    }
    if script.assign_uid && msg.flags & agent_flags::REQUEST_INSTANCE_UID != 0 {
        out.agent_identification = Some(AgentIdentification {
            new_instance_uid: NEW_UID.to_vec(),
        });
    }
    if let Some((at, hash, body)) = script.config_at {
        if n == at {
            out.remote_config = Some(AgentRemoteConfig {
                config: Some(AgentConfigMap {
                    config_map: BTreeMap::from([(
                        String::new(),
                        AgentConfigFile {
                            body: body.as_bytes().to_vec(),
                            content_type: "text/yaml".into(),
                        },
                    )]),
                }),
                config_hash: hash.to_vec(),
            });
        }
    }
    if let (Some(secs), 0) = (script.heartbeat_secs, n) {
        out.connection_settings = Some(ConnectionSettingsOffers {
            hash: vec![1],
            opamp: Some(OpAmpConnectionSettings {
                destination_endpoint: "ws://unused".into(),
                heartbeat_interval_seconds: secs,
                ..OpAmpConnectionSettings::default()
            }),
            ..ConnectionSettingsOffers::default()
        });
    }
    out
}

fn record(log: &Mutex<Log>, conn: usize, msg: AgentToServer) -> usize {
    let mut l = log.lock().expect("lock");
    l.msgs.push((conn, msg));
    l.msgs.len() - 1
}

async fn handle(
    mut req: Request<Incoming>,
    conn: usize,
    log: Arc<Mutex<Log>>,
    script: Script,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let status = |code: u16, retry: Option<&str>, body: &'static str| {
        let mut b = Response::builder().status(code);
        if let Some(r) = retry {
            b = b.header("Retry-After", r);
        }
        Ok(b.body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap_or_default())
    };
    match req.uri().path() {
        "/deny" => return status(401, None, "unknown token"),
        "/busy" => return status(503, Some("7"), "overloaded"),
        "/busy1" => return status(503, Some("1"), "overloaded"),
        _ => {}
    }
    log.lock().expect("lock").headers.push([
        header(&req, "authorization"),
        header(&req, "content-type"),
        header(&req, "content-encoding"),
        header(&req, "accept-encoding"),
        header(&req, "opamp-instance-uid"),
    ]);

    if fastwebsockets::upgrade::is_upgrade_request(&req) {
        let Ok((resp, fut)) = fastwebsockets::upgrade::upgrade(&mut req) else {
            return status(400, None, "bad upgrade");
        };
        tokio::spawn(async move {
            let Ok(ws) = fut.await else { return };
            let mut ws = FragmentCollector::new(ws);
            let mut first = true;
            while let Ok(frame) = ws.read_frame().await {
                match frame.opcode {
                    OpCode::Binary => {
                        let Ok(msg) = codec::decode_ws::<AgentToServer>(&frame.payload, 1 << 20)
                        else {
                            return;
                        };
                        let n = record(&log, conn, msg.clone());
                        let out = codec::encode_ws_message(&reply(&msg, n, conn, first, &script));
                        if ws
                            .write_frame(Frame::binary(Payload::Owned(out)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        if let (Some(code), true, 1) = (script.close_first_with, first, conn) {
                            let _ = ws.write_frame(Frame::close(code, b"go away")).await;
                        }
                        if let (Some((_, code)), true) = (script.error_then_close, first) {
                            let _ = ws
                                .write_frame(Frame::close(code, b"identity_required"))
                                .await;
                        }
                        first = false;
                    }
                    OpCode::Close => {
                        let code = match &frame.payload[..] {
                            [a, b, ..] => u16::from_be_bytes([*a, *b]),
                            _ => 1005,
                        };
                        log.lock().expect("lock").close_codes.push(code);
                        return;
                    }
                    _ => {}
                }
            }
        });
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, Full::new(Bytes::new())));
    }

    // Plain HTTP.
    let gz_in = header(&req, "content-encoding").as_deref() == Some("gzip");
    let gz_out = header(&req, "accept-encoding").is_some_and(|a| a.contains("gzip"));
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return status(400, None, "body");
    };
    let body = if gz_in {
        match gunzip(&body, 1 << 20) {
            Ok(b) => Bytes::from(b),
            Err(_) => return status(400, None, "gzip"),
        }
    } else {
        body
    };
    let Ok(msg) = AgentToServer::decode(body) else {
        return status(400, None, "decode");
    };
    // Every HTTP request is the first of its "connection" for the script: HTTP has none.
    let first = log
        .lock()
        .expect("lock")
        .msgs
        .iter()
        .all(|(c, _)| *c != conn);
    let n = record(&log, conn, msg.clone());
    let out = reply(&msg, n, conn, first, &script).encode_to_vec();
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header("Content-Type", "application/x-protobuf");
    if script.http_close {
        b = b.header("Connection", "close");
    }
    let out = if gz_out {
        b = b.header("Content-Encoding", "gzip");
        gzip(&out)
    } else {
        out
    };
    Ok(b.body(Full::new(Bytes::from(out))).unwrap_or_default())
}

fn status_of(m: &AgentToServer) -> Option<i32> {
    m.remote_config_status.as_ref().map(|s| s.status)
}

fn assert_consecutive(msgs: &[(usize, AgentToServer)]) {
    for w in msgs.windows(2) {
        assert_eq!(
            w[1].1.sequence_num,
            w[0].1.sequence_num + 1,
            "sequence numbers must increase by one: {:?}",
            msgs.iter().map(|(_, m)| m.sequence_num).collect::<Vec<_>>()
        );
    }
}

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

// ---- opamp-go client behaviours (issue 18) ----

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

/// Certificates without sockets: [`AgentCore`] under the opamp-go options.
mod identity {
    use super::*;
    use crate::tls::{AgentCa, LocalCa};
    use proto::v1::TlsCertificate;

    const UID: [u8; 16] = [0x31; 16];

    struct Fixture {
        _dir: tempfile::TempDir,
        ca: AgentCa,
        ca_pem: String,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("dir");
        let local = LocalCa::new(dir.path(), vec!["localhost".into()]);
        local.ensure().expect("ca");
        let ca = AgentCa::from_files(&local.ca_cert_path, &local.ca_key_path).expect("ca");
        let ca_pem = ca.ca_pem().to_string();
        Fixture {
            _dir: dir,
            ca,
            ca_pem,
        }
    }

    fn opts(f: &Fixture, endpoint: &str) -> AgentOptions {
        AgentOptions {
            endpoint: endpoint.into(),
            tls: Some(ClientTls::from_ca_pem(&f.ca_pem).expect("tls")),
            token: Some("amp-bs.x".into()),
            instance_uid: Some(UID),
            accept_identity: true,
            capabilities: DEFAULT_CAPABILITIES
                | proto::agent_caps::REPORTS_CONNECTION_SETTINGS_STATUS,
            ..AgentOptions::default()
        }
    }

    /// An offer of a freshly issued certificate with its key; (offer, serial).
    fn offer(f: &Fixture, hash: &[u8], endpoint: &str) -> (ServerToAgent, String) {
        let issued =
            f.ca.issue(
                shared::ids::InstanceUid(UID),
                None,
                Duration::from_secs(3600),
            )
            .expect("issue");
        let msg = ServerToAgent {
            connection_settings: Some(ConnectionSettingsOffers {
                hash: hash.to_vec(),
                opamp: Some(OpAmpConnectionSettings {
                    destination_endpoint: endpoint.into(),
                    heartbeat_interval_seconds: 30,
                    certificate: Some(TlsCertificate {
                        cert: issued.cert_pem.as_bytes().to_vec(),
                        private_key: issued.private_key_pem.clone().expect("key").into_bytes(),
                        ca_cert: f.ca_pem.as_bytes().to_vec(),
                    }),
                    ..OpAmpConnectionSettings::default()
                }),
                ..ConnectionSettingsOffers::default()
            }),
            ..ServerToAgent::default()
        };
        (msg, issued.serial)
    }

    fn on_certificate(core: &AgentCore) -> bool {
        let c = core.connection();
        c.headers.is_empty() && c.tls.as_ref().is_some_and(ClientTls::has_client_cert)
    }

    #[test]
    fn restart_on_offer_takes_every_certificate_offer_and_reports_nothing() {
        let f = fixture();
        let (mut core, rx) = AgentCore::new(AgentOptions {
            restart_on_settings_offer: true,
            ..opts(&f, "wss://127.0.0.1:1/v1/opamp")
        });
        let (o, serial) = offer(&f, b"h1", "wss://127.0.0.1:1/v1/opamp");
        let out = core.on_message(o.clone());
        assert!(out.restart && !out.switch);
        assert!(out.send.is_empty(), "no ConnectionSettingsStatus");
        assert!(on_certificate(&core));
        // A certificate that does not work is kept (the supervisor retries its new client).
        assert!(!core.connection_failed("handshake"));
        assert!(on_certificate(&core));
        core.connection_succeeded();
        core.client_restarted();
        assert_eq!(rx.borrow().client_cert_serial.as_deref(), Some(&*serial));
        let first = core.connect_message();
        assert_eq!(first.sequence_num, 0);
        assert!(first.connection_settings_status.is_none());
        // The very same offer again: no hash is remembered, so it restarts again.
        let out = core.on_message(o.clone());
        assert!(out.restart && out.send.is_empty());
        let s = rx.borrow().clone();
        assert_eq!((s.settings_offers, s.settings_offers_with_key), (2, 2));
        assert_eq!(s.client_restarts, 1);
        // The certificate in use repeated without its key cannot be started on its own: the
        // client restarts anyway, on the settings it had.
        core.connection_succeeded();
        let mut keyless = o;
        if let Some(c) = keyless
            .connection_settings
            .as_mut()
            .and_then(|c| c.opamp.as_mut())
            .and_then(|o| o.certificate.as_mut())
        {
            c.private_key.clear();
        }
        let out = core.on_message(keyless);
        assert!(out.restart && out.send.is_empty());
        assert!(on_certificate(&core), "still on its certificate");
        assert_eq!(rx.borrow().settings_offers_with_key, 2);
    }

    #[test]
    fn process_restart_forgets_the_certificate_only_when_asked() {
        let f = fixture();
        for forget in [false, true] {
            let (mut core, rx) = AgentCore::new(AgentOptions {
                forget_identity_on_restart: forget,
                ..opts(&f, "wss://127.0.0.1:1/v1/opamp")
            });
            let (o, serial) = offer(&f, b"h1", "wss://127.0.0.1:1/v1/opamp");
            assert!(core.on_message(o).switch);
            core.connection_succeeded();
            assert!(on_certificate(&core));
            core.heartbeat_message();
            let mut core = core.process_restarted(forget);
            let s = rx.borrow().clone();
            assert_eq!((s.process_restarts, s.client_restarts), (1, 0));
            assert_eq!(core.connect_message().sequence_num, 0);
            if forget {
                assert_eq!(
                    core.connection().headers,
                    vec![("Authorization".to_string(), "Bearer amp-bs.x".to_string())],
                    "back on the bootstrap token"
                );
                assert!(!core.connection().tls.is_some_and(|t| t.has_client_cert()));
                assert_eq!(s.client_cert_serial, None);
            } else {
                assert!(on_certificate(&core), "kept, as if persisted");
                assert_eq!(s.client_cert_serial.as_deref(), Some(&*serial));
            }
        }
    }

    #[test]
    fn offered_scheme_picks_the_transport_only_with_the_option() {
        let f = fixture();
        let https = "https://127.0.0.1:1/v1/opamp";
        for pick in [false, true] {
            let (mut core, rx) = AgentCore::new(AgentOptions {
                transport_from_offer_scheme: pick,
                ..opts(&f, "wss://127.0.0.1:1/v1/opamp")
            });
            let configured = Endpoint::parse(&core.options().endpoint).expect("endpoint");
            let (o, _) = offer(&f, b"h1", https);
            assert!(core.on_message(o).switch);
            let expect = if pick { Scheme::Http } else { Scheme::Ws };
            assert_eq!(core.next_scheme(&configured), expect, "option {pick}");
            assert_eq!(rx.borrow().offered_endpoints, vec![https.to_string()]);
        }
    }
}
