//! WebSocket transport: one task per connection.
//!
//! The task owns both halves of the socket and selects between the next inbound frame, queued
//! coordinator pushes and close requests. Inbound messages are handled one at a time, in order:
//! decode, one bus request, exactly one reply. Pushes are only ever queued for a connection
//! after its first `AgentToServer` bound it to an agent, so nothing is sent before that.
//!
//! A connection that sends no `AgentToServer` within `admission.first_message_timeout` is
//! closed (1008), so an authenticated but silent socket cannot be held for free; after the
//! first message OpAMP heartbeats govern it.
//!
//! Memory per idle connection stays small: no read buffer while no frame is arriving (see
//! `lazy_read`), a bounded push queue that allocates on use, and a few words of bookkeeping.
//! The task's own future is kept small too: the work of answering a message lives in a box
//! that exists only meanwhile.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use fastwebsockets::{Frame, OpCode, Role, WebSocket, WebSocketError, WebSocketWrite};
use http::StatusCode;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use proto::ServerToAgent;
use shared::bus::{
    AgentFrame, CertificateId, CoordinatorEvent, CoordinatorReply, CoordinatorRequest, Credential,
    GatewayMessage, Route,
};
use shared::codec;
use shared::domain::Transport;
use shared::ids::InstanceUid;
use shared::ownership::Owner;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::auth::{auth_close_reason, authenticate};
use super::decode::{self, DecodeError, Framing};
use super::latency;
use super::lazy_read::{LazyReader, ReadFrame};
use super::limits::{CredentialKey, CredentialSlot};
use super::metrics::{count_received, count_rejected, count_sent};
use super::replies::{
    admission_refused, bad_request_msg, service_unavailable, text, unavailable_msg,
};
use super::{Binding, ConnControl, Inner};
use crate::serve::{count_closed, CloseReason, IpSlot};

/// A connection may hold a few agents (a multiplexing proxy, or an agent the coordinator gave
/// a new UID). Beyond this many, the oldest binding is released.
const MAX_UIDS_PER_CONN: usize = 16;

/// A write that doesn't finish in this time means the peer stopped reading; we give up on it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// After our Close frame, how long we wait for the peer's Close (or EOF) before dropping the
/// socket. Closing a socket with unread input makes the kernel send RST, which can destroy our
/// Close frame (and its code) before the peer reads it.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// WebSocket close codes (RFC 6455 §7.4.1).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_UNSUPPORTED_DATA: u16 = 1003;
const CLOSE_POLICY_VIOLATION: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;

/// Close reasons must fit a control frame: 125 bytes minus the 2-byte code.
const MAX_CLOSE_REASON: usize = 123;

const SUPERSEDED: &str = "superseded by a newer connection";
const TOO_BIG: &str = "message too big";

type Io = TokioIo<Upgraded>;
type Reader = LazyReader<DetachableRead<tokio::io::ReadHalf<Io>>>;
type Writer = WebSocketWrite<tokio::io::WriteHalf<Io>>;

/// Authenticates and upgrades; the connection then lives in its own task, holding `ip_slot`
/// (its place under `max_connections_per_ip`) and its credential's.
///
/// `secure`: whether the agent's connection is TLS (its own, or at a trusted proxy), as
/// [`Origin::tls`](super::auth::Origin) says; passed on in every frame.
pub(super) async fn serve(
    inner: Arc<Inner>,
    mut req: Request,
    source_ip: IpAddr,
    secure: bool,
    cert: Option<CertificateId>,
    ip_slot: IpSlot,
) -> Response {
    // Validate the handshake before authenticating: a bad upgrade must not redeem a token.
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("invalid websocket upgrade: {e}"),
            )
        }
    };
    if inner.conns().shutting_down {
        return service_unavailable("server shutting down");
    }
    if inner.bus_lost() {
        return service_unavailable("bus unreachable, retry later");
    }
    let credential =
        match authenticate(&inner, req.headers(), source_ip, Transport::WebSocket, cert).await {
            Ok((credential, _hint)) => credential,
            Err(resp) => return resp,
        };
    let credential_slot = match inner.clients.connection_of(&credential) {
        Ok(slot) => slot,
        Err(refusal) => return admission_refused(refusal),
    };
    let Some((conn_id, control)) = inner.open_conn() else {
        return service_unavailable("server shutting down");
    };
    let span = tracing::info_span!("opamp_ws", conn_id, instance_uid = tracing::field::Empty,);
    let conn = ConnGuard {
        inner: inner.clone(),
        conn_id,
        held: Vec::new(),
    };
    let (push_tx, push_rx) = mpsc::channel(inner.cfg.write_queue.max(1));
    let session = Session {
        inner,
        conn,
        control,
        credential,
        source_ip,
        secure,
        push_tx,
        push_rx,
        pending_bind: None,
        partial: None,
        recorded_uid: None,
        awaiting_first: true,
        _slots: (ip_slot, credential_slot),
    };
    tokio::spawn(
        async move {
            match upgrade.await {
                Ok(ws) => session.run(ws).await,
                Err(e) => tracing::debug!(error = %e, "websocket upgrade did not complete"),
            }
        }
        .instrument(span),
    );
    response.map(Body::new)
}

/// Keeps the registry honest whatever way the task ends (a panic included): dropping it
/// removes the connection and its bindings.
struct ConnGuard {
    inner: Arc<Inner>,
    conn_id: u64,
    /// Agents this connection holds, with the ownership epoch of each.
    held: Vec<(InstanceUid, u64)>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.inner.close_conn(self.conn_id, &self.held);
    }
}

/// How a connection ends.
enum Exit {
    /// The peer sent a Close frame; we answer it.
    PeerClosed,
    /// We close with this code and reason.
    Close(u16, String),
    /// We close, but the read side stopped mid-frame (an oversize frame was refused unread),
    /// so the peer's answer can't be parsed, only drained.
    CloseDesynced(u16, String),
    /// The transport is gone (EOF, I/O error, stalled writes): nothing more can be said.
    Gone,
}

struct Session {
    inner: Arc<Inner>,
    conn: ConnGuard,
    control: Arc<ConnControl>,
    credential: Credential,
    source_ip: IpAddr,
    /// Whether the agent's connection is TLS (see [`AgentFrame::secure`]).
    secure: bool,
    /// Cloned into each [`Binding`] so the dispatcher can queue pushes for us.
    push_tx: mpsc::Sender<Box<ServerToAgent>>,
    push_rx: mpsc::Receiver<Box<ServerToAgent>>,
    /// A bind the ownership backend failed to record; retried on the agent's next frame.
    pending_bind: Option<InstanceUid>,
    /// A fragmented message being reassembled (never more than `max_frame_bytes`).
    partial: Option<Vec<u8>>,
    /// The instance UID last written into the session span.
    recorded_uid: Option<InstanceUid>,
    /// True until the first `AgentToServer` arrives (see `first_message_timeout`).
    awaiting_first: bool,
    /// This connection's places under the per-address and per-credential caps.
    _slots: (IpSlot, CredentialSlot),
}

impl Session {
    async fn run(mut self, ws: WebSocket<Io>) {
        // Split by hand rather than with `WebSocket::split` so the read side stays reachable
        // for draining after our Close (see `CLOSE_LINGER`). The WebSocket is fresh, so its
        // buffers are empty and `into_inner` loses nothing.
        let (read, write) = tokio::io::split(ws.into_inner());
        let (read, detach) = DetachableRead::new(read);
        // Pings and Closes are answered by this task (the reader never writes). A frame of
        // `>= max_message_size` bytes is refused before it is buffered.
        let mut rd = LazyReader::new(read, self.inner.cfg.max_frame_bytes.saturating_add(1));
        // Only the write half is wanted; the read half made with it is dropped at once.
        let (_, mut wr) =
            fastwebsockets::after_handshake_split(tokio::io::empty(), write, Role::Server);

        let exit = self.serve_frames(&mut rd, &mut wr).await;
        let linger = match exit {
            Exit::Gone => Linger::No,
            // The peer's Close was the last thing it sends: the handshake is complete.
            Exit::PeerClosed => {
                let _ = write_close(&mut wr, CLOSE_NORMAL, "").await;
                Linger::No
            }
            Exit::Close(code, reason) => {
                tracing::debug!(code, reason = %reason, "closing connection");
                match write_close(&mut wr, code, &reason).await {
                    Ok(()) => Linger::AwaitClose,
                    Err(_) => Linger::No,
                }
            }
            Exit::CloseDesynced(code, reason) => {
                tracing::debug!(code, reason = %reason, "closing connection");
                match write_close(&mut wr, code, &reason).await {
                    Ok(()) => Linger::Drain,
                    Err(_) => Linger::No,
                }
            }
        };
        // Stop routing to this connection and hand the agents back before lingering, so a
        // reconnect elsewhere isn't kept waiting.
        self.release_all().await;
        match linger {
            Linger::No => {}
            Linger::AwaitClose => await_peer_close(&mut rd).await,
            Linger::Drain => drain(detach).await,
        }
        // `self.conn` drops here: the connection leaves the registry last.
    }

    async fn serve_frames(&mut self, rd: &mut Reader, wr: &mut Writer) -> Exit {
        let max = self.inner.cfg.max_frame_bytes;
        let first_timeout = self.inner.cfg.admission.first_message_timeout;
        let first_deadline = tokio::time::Instant::now() + first_timeout;
        if first_timeout.is_zero() {
            self.awaiting_first = false;
        }
        loop {
            // The read future is kept across select iterations (not restarted): reading a frame
            // is not cancel-safe, pushes and close requests are served while it is pending.
            let read = {
                let read = rd.read_frame();
                tokio::pin!(read);
                loop {
                    tokio::select! {
                        biased;
                        () = self.control.wake.notified() => {
                            if let Some((code, reason)) = self.control.take_close() {
                                return Exit::Close(code, reason);
                            }
                        }
                        Some(push) = self.push_rx.recv() => {
                            if let Err(exit) = send(wr, &push).await {
                                return exit;
                            }
                        }
                        r = &mut read => break r,
                        () = tokio::time::sleep_until(first_deadline), if self.awaiting_first => {
                            count_closed(CloseReason::FirstMessageTimeout);
                            return Exit::Close(
                                CLOSE_POLICY_VIOLATION,
                                "no AgentToServer within the first-message deadline".into(),
                            );
                        }
                    }
                }
            };
            let ReadFrame {
                opcode,
                fin,
                payload,
            } = match read {
                Ok(frame) => frame,
                Err(WebSocketError::FrameTooLarge) => {
                    count_rejected("oversize");
                    return Exit::CloseDesynced(CLOSE_TOO_BIG, TOO_BIG.into());
                }
                Err(
                    WebSocketError::UnexpectedEOF
                    | WebSocketError::IoError(_)
                    | WebSocketError::ConnectionClosed,
                ) => return Exit::Gone,
                Err(e) => {
                    tracing::debug!(error = %e, "websocket protocol error");
                    return Exit::CloseDesynced(CLOSE_PROTOCOL_ERROR, "protocol error".into());
                }
            };
            // Our own reassembly rather than fastwebsockets' FragmentCollector: it bounds the
            // whole message, not just each fragment.
            let message = match opcode {
                OpCode::Binary if self.partial.is_some() => {
                    return Exit::Close(CLOSE_PROTOCOL_ERROR, "expected continuation".into());
                }
                OpCode::Binary if fin => payload,
                OpCode::Binary => {
                    self.partial = Some(payload);
                    continue;
                }
                OpCode::Continuation => {
                    let Some(mut buf) = self.partial.take() else {
                        return Exit::Close(CLOSE_PROTOCOL_ERROR, "unexpected continuation".into());
                    };
                    if buf.len().saturating_add(payload.len()) > max {
                        return too_big();
                    }
                    buf.extend_from_slice(&payload);
                    if !fin {
                        self.partial = Some(buf);
                        continue;
                    }
                    buf
                }
                OpCode::Text => {
                    count_rejected("malformed");
                    return Exit::Close(
                        CLOSE_UNSUPPORTED_DATA,
                        "opamp uses binary messages".into(),
                    );
                }
                OpCode::Close => return Exit::PeerClosed,
                OpCode::Ping => {
                    if let Err(exit) = write(wr, Frame::pong(payload.into())).await {
                        return exit;
                    }
                    continue;
                }
                OpCode::Pong => continue,
            };
            // Boxed: its state (decode, the bus request) exists only while a message is being
            // answered, instead of sitting in every idle connection's task.
            if let Err(exit) = Box::pin(self.handle_message(message, wr)).await {
                return exit;
            }
        }
    }

    /// One complete inbound message: decode, ask the coordinator, answer exactly once.
    async fn handle_message(&mut self, data: Vec<u8>, wr: &mut Writer) -> Result<(), Exit> {
        count_received(Transport::WebSocket);
        let received = Instant::now();
        if data.len() > self.inner.cfg.max_frame_bytes {
            return Err(too_big());
        }
        let limits = self.inner.cfg.frame_limits;
        // The permit is this message's share of the decode budget, held until it is answered.
        let (msg, _permit) =
            match decode::decode(data, Framing::WebSocket, limits, &self.inner.decode_budget).await
            {
                Ok(d) => (d.msg, d.permit),
                Err(DecodeError::Busy) => {
                    count_rejected("memory_budget");
                    let busy = unavailable_msg(Vec::new(), "server busy, retry later");
                    return answer(wr, &busy, received).await;
                }
                Err(e) => {
                    count_rejected(e.reason());
                    tracing::debug!(error = %e, "message refused");
                    // Only a message over a limit may say which agent sent it.
                    let uid = match &e {
                        DecodeError::TooMany { instance_uid, .. } => instance_uid.clone(),
                        _ => Vec::new(),
                    };
                    return answer(wr, &bad_request_msg(uid, e.to_string()), received).await;
                }
            };
        self.awaiting_first = false;
        let uid = InstanceUid::from_slice(&msg.instance_uid);
        if let Some(uid) = uid {
            self.record_uid(uid);
        }
        let instance_uid = msg.instance_uid.clone();
        let frame = AgentFrame {
            gateway: self.inner.id.clone(),
            conn_id: self.conn.conn_id,
            epoch: uid.map_or(0, |u| self.epoch_of(u)),
            transport: Transport::WebSocket,
            credential: self.credential.clone(),
            source_ip: self.source_ip,
            secure: self.secure,
            msg,
        };
        if self.inner.bus_lost() {
            // Said at once rather than after a request that cannot be answered timed out.
            let busy = unavailable_msg(instance_uid, "bus unreachable, retry later");
            return answer(wr, &busy, received).await;
        }
        let route = Route::Partition(uid.map_or(0, |u| u.partition()));
        let request = tokio::time::timeout(
            self.inner.cfg.request_timeout,
            latency::bus_request(
                &*self.inner.bus,
                route,
                CoordinatorRequest::Frame(Box::new(frame)),
            ),
        );
        // A bus lost meanwhile will not bring the reply: say so now, not at the timeout.
        let reply = tokio::select! {
            reply = request => reply,
            () = self.inner.bus_lost_now() => {
                let busy = unavailable_msg(instance_uid, "bus unreachable, retry later");
                return answer(wr, &busy, received).await;
            }
        };
        let reply = match reply {
            Ok(Ok(CoordinatorReply::Frame(reply))) => *reply,
            other => {
                match other {
                    Ok(Ok(CoordinatorReply::Auth(_))) => {
                        tracing::error!("coordinator answered a frame with an authentication reply")
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "frame request failed"),
                    _ => tracing::warn!("frame request timed out"),
                }
                let busy = unavailable_msg(instance_uid, "server unavailable, retry later");
                return answer(wr, &busy, received).await;
            }
        };

        let bind = reply.bind.or(self.pending_bind.filter(|p| Some(*p) == uid));
        if let Some(bind) = bind {
            self.bind(bind).await;
        }
        answer(wr, &reply.msg, received).await?;
        if let Some(reason) = reply.close {
            if let Some(why) = auth_close_reason(&reason) {
                count_rejected("auth_failed");
                // Debug, as in `unauthorized`: counted and audited, not a line per attempt.
                tracing::debug!(source_ip = %self.source_ip, reason = why, "authentication failed");
                // The refusal is sent; the close waits, so a client that reconnects the moment
                // it is closed is refused about once per hold, not twenty times a second.
                let hold = self
                    .inner
                    .refusal_holds
                    .next(self.source_ip, CredentialKey::from(&self.credential));
                tokio::select! {
                    () = tokio::time::sleep(hold) => {}
                    () = self.control.wake.notified() => {}
                }
            }
            return Err(Exit::Close(
                CLOSE_POLICY_VIOLATION,
                truncate_utf8(&reason, MAX_CLOSE_REASON).to_owned(),
            ));
        }
        Ok(())
    }

    fn epoch_of(&self, uid: InstanceUid) -> u64 {
        self.conn
            .held
            .iter()
            .find(|(u, _)| *u == uid)
            .map_or(0, |(_, epoch)| *epoch)
    }

    fn record_uid(&mut self, uid: InstanceUid) {
        if self.recorded_uid != Some(uid) {
            tracing::Span::current().record("instance_uid", tracing::field::display(uid));
            self.recorded_uid = Some(uid);
        }
    }

    /// Claims `uid` for this connection and makes pushes for it reach us.
    async fn bind(&mut self, uid: InstanceUid) {
        if self.conn.held.iter().any(|(u, _)| *u == uid) {
            self.pending_bind = None;
            return;
        }
        let claim = match self.inner.ownership.claim(uid, &self.inner.id).await {
            Ok(claim) => claim,
            Err(e) => {
                // The reply still goes out; only pushes can't reach the agent until a later
                // frame manages to claim it.
                tracing::warn!(error = %e, instance_uid = %uid, "ownership claim failed");
                self.pending_bind = Some(uid);
                return;
            }
        };
        self.pending_bind = None;
        if self.conn.held.len() >= MAX_UIDS_PER_CONN {
            let (old, epoch) = self.conn.held.remove(0);
            self.inner.unbind(old, self.conn.conn_id);
            self.release(old, epoch).await;
        }
        self.conn.held.push((uid, claim.epoch));
        // Replaces (and closes) an older connection of this agent on this gateway.
        self.inner.bind(
            uid,
            Binding {
                conn_id: self.conn.conn_id,
                epoch: claim.epoch,
                push: self.push_tx.clone(),
                control: self.control.clone(),
            },
        );
        self.record_uid(uid);
        if let Some(prev) = claim.previous.filter(|p| p.gateway != self.inner.id) {
            // The agent's old connection lives on another gateway: tell it to let go.
            let close = GatewayMessage::Close {
                uid,
                epoch: prev.epoch,
                reason: SUPERSEDED.into(),
            };
            if let Err(e) = self.inner.bus.deliver(&prev.gateway, close).await {
                tracing::debug!(error = %e, gateway = %prev.gateway, "could not close the superseded connection");
            }
        }
    }

    /// Gives one agent back: ownership (fenced by our epoch) and news to its coordinator.
    async fn release(&self, uid: InstanceUid, epoch: u64) {
        let owner = Owner {
            gateway: self.inner.id.clone(),
            epoch,
        };
        if let Err(e) = self.inner.ownership.release(uid, &owner).await {
            tracing::warn!(error = %e, instance_uid = %uid, "ownership release failed");
        }
        let event = CoordinatorEvent::Disconnected {
            uid,
            gateway: self.inner.id.clone(),
            conn_id: self.conn.conn_id,
            epoch,
        };
        if let Err(e) = self
            .inner
            .bus
            .notify(Route::Partition(uid.partition()), event)
            .await
        {
            tracing::debug!(error = %e, instance_uid = %uid, "disconnect notification failed");
        }
    }

    async fn release_all(&mut self) {
        let held = std::mem::take(&mut self.conn.held);
        for (uid, _) in &held {
            self.inner.unbind(*uid, self.conn.conn_id);
        }
        for (uid, epoch) in held {
            self.release(uid, epoch).await;
        }
    }
}

/// What to do between our Close frame and dropping the socket.
enum Linger {
    No,
    /// Read (and discard) frames until the peer's Close.
    AwaitClose,
    /// Read (and discard) raw bytes until EOF.
    Drain,
}

/// A complete message over the limit: the read side is still in sync.
fn too_big() -> Exit {
    count_rejected("oversize");
    Exit::Close(CLOSE_TOO_BIG, TOO_BIG.into())
}

/// Waits, at most [`CLOSE_LINGER`], for the peer to answer our Close.
async fn await_peer_close(rd: &mut Reader) {
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        while let Ok(frame) = rd.read_frame().await {
            if frame.opcode == OpCode::Close {
                break;
            }
        }
    })
    .await;
}

async fn send(wr: &mut Writer, msg: &ServerToAgent) -> Result<(), Exit> {
    write(wr, Frame::binary(codec::encode_ws(msg).into())).await?;
    count_sent(Transport::WebSocket);
    Ok(())
}

/// Sends the reply to a message read at `received`, and records that round trip.
async fn answer(wr: &mut Writer, msg: &ServerToAgent, received: Instant) -> Result<(), Exit> {
    send(wr, msg).await?;
    latency::observe_message(Transport::WebSocket, received);
    Ok(())
}

async fn write_close(wr: &mut Writer, code: u16, reason: &str) -> Result<(), Exit> {
    write(wr, Frame::close(code, reason.as_bytes())).await
}

async fn write(wr: &mut Writer, frame: Frame<'_>) -> Result<(), Exit> {
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        wr.write_frame(frame).await?;
        wr.flush().await
    })
    .await;
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "write failed");
            Err(Exit::Gone)
        }
        Err(_) => {
            tracing::debug!("write timed out");
            Err(Exit::Gone)
        }
    }
}

/// Reads and discards until the peer closes, for at most [`CLOSE_LINGER`].
async fn drain(detach: Detach<tokio::io::ReadHalf<Io>>) {
    let Some(mut read) = detach.take() else {
        return;
    };
    let _ = tokio::time::timeout(CLOSE_LINGER, async move {
        let mut buf = [0u8; 512];
        while matches!(read.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A reader whose inner stream can be taken back (through [`Detach`]) while fastwebsockets
/// owns the wrapper; afterwards the wrapper reads as EOF.
struct DetachableRead<R>(Arc<Mutex<Option<R>>>);

struct Detach<R>(Arc<Mutex<Option<R>>>);

impl<R> DetachableRead<R> {
    fn new(inner: R) -> (Self, Detach<R>) {
        let shared = Arc::new(Mutex::new(Some(inner)));
        (Self(shared.clone()), Detach(shared))
    }
}

impl<R> Detach<R> {
    fn take(&self) -> Option<R> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for DetachableRead<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut inner = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match inner.as_mut() {
            Some(r) => Pin::new(r).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_are_truncated_on_char_boundaries() {
        assert_eq!(truncate_utf8("short", 123), "short");
        let long = "é".repeat(100); // 200 bytes
        let cut = truncate_utf8(&long, MAX_CLOSE_REASON);
        assert!(cut.len() <= MAX_CLOSE_REASON);
        assert_eq!(cut.len(), 122);
        assert!(long.starts_with(cut));
    }

    #[tokio::test]
    async fn detached_reader_reads_eof() {
        let (mut r, detach) = DetachableRead::new(&b"abc"[..]);
        let mut buf = [0u8; 2];
        assert_eq!(r.read(&mut buf).await.expect("read"), 2);
        let mut rest = detach.take().expect("still attached");
        assert_eq!(rest.read(&mut buf).await.expect("read"), 1);
        assert_eq!(
            r.read(&mut buf).await.expect("read"),
            0,
            "detached reads as EOF"
        );
        assert!(detach.take().is_none());
    }
}
