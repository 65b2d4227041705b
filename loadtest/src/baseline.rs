//! `ampora-loadtest baseline`: a bare fastwebsockets server that holds the same WebSocket
//! connections and answers every binary message with a small binary message (an empty-ish
//! `ServerToAgent`, so the same agents can talk to it). What it costs per connection and how
//! many messages it answers is this machine's limit, against which Ampora is compared.

use bytes::Bytes;
use fastwebsockets::{upgrade, Frame, OpCode, Payload, WebSocketError};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Answered to plain GETs, so the harness can check that `--no-auth` targets a baseline.
pub const BANNER: &str = "ampora-loadtest baseline";

/// The reply: header 0x00 + `ServerToAgent { capabilities: 1 }`.
fn reply() -> Vec<u8> {
    gateway::codec::encode_ws(&proto::ServerToAgent {
        capabilities: 1,
        ..Default::default()
    })
}

/// Accepts connections until the task is dropped.
pub async fn serve(listener: TcpListener) -> std::io::Result<()> {
    let reply = Bytes::from(reply());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let reply = reply.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, reply.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

async fn handle(
    mut req: Request<Incoming>,
    reply: Bytes,
) -> Result<Response<Full<Bytes>>, WebSocketError> {
    if !upgrade::is_upgrade_request(&req) {
        return Ok(Response::new(Full::new(Bytes::from_static(
            BANNER.as_bytes(),
        ))));
    }
    let (resp, fut) = upgrade::upgrade(&mut req)?;
    tokio::spawn(async move {
        if let Ok(mut ws) = fut.await {
            ws.set_auto_close(true);
            ws.set_auto_pong(true);
            loop {
                let frame = match ws.read_frame().await {
                    Ok(f) => f,
                    Err(_) => break,
                };
                match frame.opcode {
                    OpCode::Binary => {
                        let out = Frame::binary(Payload::Borrowed(&reply));
                        if ws.write_frame(out).await.is_err() {
                            break;
                        }
                    }
                    OpCode::Close => break,
                    _ => {}
                }
            }
        }
    });
    let (parts, _) = resp.into_parts();
    Ok(Response::from_parts(parts, Full::new(Bytes::new())))
}
