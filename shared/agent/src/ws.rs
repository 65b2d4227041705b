//! WebSocket OpAMP transport (fastwebsockets over TCP, or TLS over TCP for `wss://`).

use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{
    FragmentCollectorRead, Frame, OpCode, Payload, Role, WebSocket, WebSocketError, WebSocketWrite,
};
use futures::{Stream, StreamExt};
use http::header::{
    CONNECTION, HOST, RETRY_AFTER, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use shared::codec;
use tokio::io::WriteHalf;

use crate::error::{ClientError, ConnectError};
use crate::http::{drive, error_text};
use crate::tls::ClientTls;
use crate::url::{missing_tls, Endpoint, Scheme, CONNECT_TIMEOUT};
use crate::wire::{parse_retry_after, MAX_ERROR_BODY, MAX_MESSAGE};

type Io = TokioIo<Upgraded>;
type FrameStream = Pin<Box<dyn Stream<Item = Result<Frame<'static>, WebSocketError>> + Send>>;

/// How long `close` waits for the server's Close frame before dropping the socket.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// One OpAMP WebSocket connection.
///
/// The read side is a stream owned by the connection, so [`recv`](Self::recv) is
/// cancel-safe: the agent loop can race it against timers and still [`send`](Self::send)
/// between receives without losing a partially read frame.
pub struct WsConnection {
    frames: FrameStream,
    writer: WebSocketWrite<WriteHalf<Io>>,
    close_info: Option<(u16, String)>,
    /// The peer closed (or the stream failed): no more frames will come.
    ended: bool,
}

impl std::fmt::Debug for WsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsConnection")
            .field("close_info", &self.close_info)
            .field("ended", &self.ended)
            .finish()
    }
}

impl WsConnection {
    /// Connects and upgrades. `headers` are extra request headers (e.g. Authorization).
    pub async fn connect(url: &str, headers: &[(String, String)]) -> Result<Self, ConnectError> {
        Self::connect_with(url, headers, None, None).await
    }

    /// Like [`connect`](Self::connect), binding the local address to `source` if given.
    pub async fn connect_from(
        url: &str,
        headers: &[(String, String)],
        source: Option<IpAddr>,
    ) -> Result<Self, ConnectError> {
        Self::connect_with(url, headers, source, None).await
    }

    /// Like [`connect`](Self::connect) for a `wss://` URL, trusting what `tls` trusts.
    pub async fn connect_tls(
        url: &str,
        headers: &[(String, String)],
        tls: &ClientTls,
    ) -> Result<Self, ConnectError> {
        Self::connect_with(url, headers, None, Some(tls)).await
    }

    /// The general form: `ws://` or `wss://` (which needs `tls`), from `source` if given.
    pub async fn connect_with(
        url: &str,
        headers: &[(String, String)],
        source: Option<IpAddr>,
        tls: Option<&ClientTls>,
    ) -> Result<Self, ConnectError> {
        let ep = Endpoint::parse(url).map_err(ConnectError::Url)?;
        if ep.scheme != Scheme::Ws {
            return Err(ConnectError::Url(format!(
                "{url}: not a ws:// or wss:// URL"
            )));
        }
        if ep.tls && tls.is_none() {
            return Err(ConnectError::Url(missing_tls(&ep)));
        }
        Self::connect_endpoint(&ep, headers, source, tls).await
    }

    pub(crate) async fn connect_endpoint(
        ep: &Endpoint,
        headers: &[(String, String)],
        source: Option<IpAddr>,
        tls: Option<&ClientTls>,
    ) -> Result<Self, ConnectError> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::handshake(ep, headers, source, tls))
            .await
            .map_err(|_| ConnectError::Timeout)?
    }

    async fn handshake(
        ep: &Endpoint,
        headers: &[(String, String)],
        source: Option<IpAddr>,
        tls: Option<&ClientTls>,
    ) -> Result<Self, ConnectError> {
        let hs = |e: hyper::Error| ConnectError::Handshake(e.to_string());
        let stream = ep.open(source, tls).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(hs)?;
        let mut conn = conn.with_upgrades();
        let mut done = None;

        let mut req = Request::builder()
            .method(Method::GET)
            .uri(ep.path_and_query.as_str())
            .header(HOST, ep.authority.as_str())
            .header(UPGRADE, "websocket")
            .header(CONNECTION, "Upgrade")
            .header(SEC_WEBSOCKET_KEY, fastwebsockets::handshake::generate_key())
            .header(SEC_WEBSOCKET_VERSION, "13");
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| ConnectError::Handshake(format!("request: {e}")))?;

        let resp = drive(&mut conn, &mut done, sender.send_request(req))
            .await
            .map_err(hs)?;
        let status = resp.status();
        if status != StatusCode::SWITCHING_PROTOCOLS {
            let retry_after = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            // The body only explains the refusal; a broken one must not hide the status.
            let body = drive(
                &mut conn,
                &mut done,
                Limited::new(resp.into_body(), MAX_ERROR_BODY).collect(),
            )
            .await
            .map(|b| error_text(&b.to_bytes()))
            .unwrap_or_default();
            return Err(ConnectError::Status {
                status: status.as_u16(),
                retry_after,
                body,
            });
        }
        let upgrade_ok = resp
            .headers()
            .get(UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        if !upgrade_ok {
            return Err(ConnectError::Handshake(
                "101 without Upgrade: websocket".into(),
            ));
        }
        let on_upgrade = hyper::upgrade::on(resp);
        // The connection future hands the socket over to `on_upgrade` when it completes.
        match done {
            Some(end) => end.map_err(hs)?,
            None => conn.await.map_err(hs)?,
        }
        let upgraded = on_upgrade.await.map_err(hs)?;
        Ok(Self::from_upgraded(upgraded))
    }

    fn from_upgraded(upgraded: Upgraded) -> Self {
        let ws = WebSocket::after_handshake(TokioIo::new(upgraded), Role::Client);
        let (mut read, writer) = ws.split(tokio::io::split);
        // Control frames are answered here (recv), where the write half is at hand.
        read.set_auto_close(false);
        read.set_auto_pong(false);
        read.set_max_message_size(MAX_MESSAGE);
        let reader = FragmentCollectorRead::new(read);
        let frames = futures::stream::unfold(reader, |mut reader| async move {
            // With auto close/pong off the reader never has anything to send.
            let mut no_send = |_: Frame<'static>| async { Ok::<(), std::io::Error>(()) };
            let res = reader.read_frame(&mut no_send).await;
            Some((res, reader))
        });
        Self {
            frames: Box::pin(frames),
            writer,
            close_info: None,
            ended: false,
        }
    }

    /// Sends one `AgentToServer` (0x00 header + protobuf) as a binary message.
    pub async fn send(&mut self, msg: &proto::AgentToServer) -> Result<(), ClientError> {
        let data = codec::encode_ws_message(msg);
        self.write(Frame::binary(Payload::Owned(data))).await
    }

    /// Sends arbitrary bytes as a binary or text message (for bad-input tests).
    pub async fn send_raw(&mut self, payload: &[u8], binary: bool) -> Result<(), ClientError> {
        let payload = Payload::Owned(payload.to_vec());
        let frame = if binary {
            Frame::binary(payload)
        } else {
            Frame::text(payload)
        };
        self.write(frame).await
    }

    async fn write(&mut self, frame: Frame<'_>) -> Result<(), ClientError> {
        self.writer.write_frame(frame).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Next `ServerToAgent`; `Ok(None)` once the connection is closed (see
    /// [`close_info`](Self::close_info)). Pings are answered here.
    ///
    /// Cancel-safe while waiting for a frame (a partly read frame stays in the stream). The
    /// only non-cancel-safe moment is the write of a pong or close echo, a few bytes that a
    /// socket with room in its send buffer takes in one poll.
    pub async fn recv(&mut self) -> Result<Option<proto::ServerToAgent>, ClientError> {
        loop {
            if self.ended {
                return Ok(None);
            }
            let frame = match self.frames.next().await {
                Some(Ok(frame)) => frame,
                Some(Err(WebSocketError::UnexpectedEOF)) | None => {
                    self.ended = true;
                    // 1006: closed without a Close frame (reported locally, never sent).
                    self.close_info
                        .get_or_insert((1006, "connection closed without a close frame".into()));
                    return Ok(None);
                }
                Some(Err(e)) => {
                    self.ended = true;
                    return Err(e.into());
                }
            };
            match frame.opcode {
                OpCode::Binary => {
                    return codec::decode_ws(&frame.payload, MAX_MESSAGE)
                        .map(Some)
                        .map_err(|e| ClientError::Protocol(e.to_string()))
                }
                OpCode::Text => {
                    return Err(ClientError::Protocol(
                        "text message (OpAMP uses binary messages)".into(),
                    ))
                }
                // Boxed: rare, and inline it would enlarge every pending recv().
                OpCode::Ping => Box::pin(self.write(Frame::pong(frame.payload))).await?,
                OpCode::Pong | OpCode::Continuation => {}
                OpCode::Close => {
                    self.ended = true;
                    let (code, reason) = parse_close(&frame.payload);
                    self.close_info = Some((code, reason));
                    if !self.writer.is_closed() {
                        // Complete the closing handshake; the peer may already be gone.
                        let echo = if code == 1005 { 1000 } else { code };
                        let _ = Box::pin(self.write(Frame::close(echo, b""))).await;
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// Close code and reason received from the server, or 1006 if the connection dropped
    /// without a Close frame.
    pub fn close_info(&self) -> Option<(u16, String)> {
        self.close_info.clone()
    }

    /// Sends a Close frame and waits briefly for the server's, as RFC 6455 asks. OpAMP wants
    /// an `agent_disconnect` message before this; that is the caller's job.
    pub async fn close(mut self, code: u16, reason: &str) {
        if !self.writer.is_closed() {
            let _ = self.write(Frame::close(code, reason.as_bytes())).await;
        }
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while !self.ended {
                match self.frames.next().await {
                    Some(Ok(f)) if f.opcode == OpCode::Close => break,
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
        })
        .await;
    }
}

fn parse_close(payload: &[u8]) -> (u16, String) {
    match payload {
        [a, b, reason @ ..] => (
            u16::from_be_bytes([*a, *b]),
            String::from_utf8_lossy(reason).into_owned(),
        ),
        // 1005: no status code present.
        _ => (1005, String::new()),
    }
}
