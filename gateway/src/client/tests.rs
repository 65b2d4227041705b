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
    AgentConfigFile, AgentConfigMap, AgentIdentification, AgentRemoteConfig,
    ConnectionSettingsOffers, OpAmpConnectionSettings, RemoteConfigStatuses,
};
use proto::{agent_flags, AgentToServer, Message, ServerToAgent};
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
}

#[derive(Clone)]
struct FakeServer {
    addr: std::net::SocketAddr,
    log: Arc<Mutex<Log>>,
}

impl FakeServer {
    async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
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
        let ok = tokio::time::timeout(DEADLINE, async {
            loop {
                if pred(&self.log.lock().expect("lock")) {
                    return;
                }
                tokio::time::sleep(POLL).await;
            }
        })
        .await;
        assert!(ok.is_ok(), "server never saw: {what}");
    }
}

fn header(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The server's answer to message number `n` (0-based over the whole test).
fn reply(msg: &AgentToServer, n: usize, script: &Script) -> ServerToAgent {
    let mut out = ServerToAgent {
        instance_uid: msg.instance_uid.clone(),
        capabilities: 0x67,
        ..ServerToAgent::default()
    };
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
                        let out = codec::encode_ws_message(&reply(&msg, n, &script));
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
    let n = record(&log, conn, msg.clone());
    let out = reply(&msg, n, &script).encode_to_vec();
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
    let second = tokio::time::timeout(QUIET_WINDOW, async {
        while srv.msgs().len() < 2 {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    assert!(
        second.is_err(),
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
