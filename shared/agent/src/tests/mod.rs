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
    ConnectionSettingsOffers, DownloadableFile, Header, Headers, OpAmpConnectionSettings,
    PackageAvailable, PackageType, PackagesAvailable, RemoteConfigStatuses, RetryInfo,
    ServerErrorResponse, ServerErrorResponseType,
};
use proto::{agent_flags, AgentToServer, Message, ServerToAgent};
use shared::codec;
use shared::testing::{eventually, poll};
use tokio::net::TcpListener;

use super::*;
use crate::wire::{gunzip, gzip};

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
    /// Offer the top-level package [`PKG_VERSION`], served at `/pkg` to requests with
    /// [`PKG_AUTH`], in the reply to message number `.0`; its content hash is that of `.1`.
    package_at: Option<(usize, &'static [u8])>,
    /// Set by [`FakeServer::start`].
    addr: Option<std::net::SocketAddr>,
}

/// What the fake server's `/pkg` serves.
const PKG_BODY: &[u8] = b"otelcol 2.0 binary";
const PKG_VERSION: &str = "2.0";
const PKG_AUTH: &str = "Bearer dl-token";

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
    if let Some((at, content)) = script.package_at {
        if n == at {
            let addr = script.addr.map(|a| a.to_string()).unwrap_or_default();
            out.packages_available = Some(package_offer(&addr, content));
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
        "/pkg" if header(&req, "authorization").as_deref() == Some(PKG_AUTH) => {
            return Ok(Response::new(Full::new(Bytes::from_static(PKG_BODY))));
        }
        "/pkg" => return status(401, None, "no token"),
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

/// The top-level package [`PKG_VERSION`] at `http://{addr}/pkg`, with the SHA-256 of
/// `content`.
fn package_offer(addr: &str, content: &[u8]) -> PackagesAvailable {
    use sha2::Digest;
    let file = DownloadableFile {
        download_url: format!("http://{addr}/pkg"),
        content_hash: sha2::Sha256::digest(content).to_vec(),
        signature: Vec::new(),
        headers: Some(Headers {
            headers: vec![Header {
                key: "Authorization".into(),
                value: PKG_AUTH.into(),
            }],
        }),
    };
    PackagesAvailable {
        packages: BTreeMap::from([(
            String::new(),
            PackageAvailable {
                r#type: PackageType::TopLevel as i32,
                version: PKG_VERSION.into(),
                file: Some(file),
                hash: b"pkg-2.0".to_vec(),
            },
        )]),
        all_packages_hash: b"all-1".to_vec(),
    }
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

mod identity;
mod opamp_go;
mod packages;
mod transports;
