//! The agent listener: TLS and plaintext on one port, told apart by the first byte.
//!
//! Connections wait here, off the accept path, until they are ready to serve (first byte in,
//! TLS handshake done). The wait is bounded in time (`first_byte_timeout`,
//! `handshake_timeout`) and in number: per peer address (`max_pending_per_ip`, beyond it the
//! newest is closed) and in total (`max_pending`, beyond it the oldest is closed), so silent
//! connections, from one address or many, never stop accepting for everyone.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use rustls::pki_types::CertificateDer;
use shared::tls::MaybeTls;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{count_failure, FailureReason, ServerTls};
use crate::serve::{count_closed, CloseReason, ConnectionLimits};

/// Default of how long a new connection may take to send its first byte and, if it starts
/// TLS, to finish the handshake (`ConnectionLimits::handshake_timeout`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first byte of a TLS connection: a handshake record (content type 22). No HTTP request
/// starts with it (methods are letters), so it alone tells the two apart.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Connections handed from the handshake tasks to axum's accept loop, which takes them at once.
const READY_QUEUE: usize = 1024;

/// Who is on the other end of an agent connection: axum's connect info for [`AgentListener`]
/// (serve the router with `into_make_service_with_connect_info::<Peer>()`).
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// True when the connection is TLS (to this listener; a TLS-terminating proxy in front
    /// makes every connection plaintext here).
    pub tls: bool,
    /// The certificate chain the client presented in the TLS handshake, leaf first. rustls
    /// checked the client holds the leaf's private key; the chain is **not** verified against
    /// any CA, so it is not yet an identity. mTLS authentication must verify it (or replace
    /// the listener's client verifier, see `OptionalClientCerts`) before trusting it.
    pub client_certs: Option<Arc<[CertificateDer<'static>]>>,
}

impl Peer {
    pub fn plain(addr: SocketAddr) -> Self {
        Self {
            addr,
            tls: false,
            client_certs: None,
        }
    }
}

impl Connected<IncomingStream<'_, AgentListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, AgentListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// An accepted agent connection: plain TCP or TLS over TCP.
pub type AgentStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

/// The listener for agent connections, an [`axum::serve::Listener`].
///
/// Without TLS it is the TCP listener as is: every connection plaintext, nothing in between.
/// With TLS, a background task accepts, and each new connection gets a task of its own that
/// waits for the first byte and, on 0x16, runs the TLS handshake; axum receives connections
/// only once they are ready, so a slow or hostile client never holds up accepting. Handshake
/// failures are counted and end only their connection.
pub struct AgentListener {
    local: SocketAddr,
    mode: Mode,
}

enum Mode {
    Plain(TcpListener),
    Sniffing {
        /// Ready connections from the handshake tasks.
        ready: mpsc::Receiver<(AgentStream, Peer)>,
        /// The accepting task; it owns the TCP listener, so aborting it (on drop) closes the
        /// port.
        acceptor: tokio::task::AbortHandle,
    },
}

impl std::fmt::Debug for AgentListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentListener")
            .field("local", &self.local)
            .field("tls", &matches!(self.mode, Mode::Sniffing { .. }))
            .finish()
    }
}

impl Drop for AgentListener {
    fn drop(&mut self) {
        if let Mode::Sniffing { acceptor, .. } = &self.mode {
            acceptor.abort();
        }
    }
}

impl AgentListener {
    /// Plaintext only: the TCP listener as is (e.g. behind a TLS-terminating proxy).
    pub fn plain(tcp: TcpListener) -> io::Result<Self> {
        Ok(Self {
            local: tcp.local_addr()?,
            mode: Mode::Plain(tcp),
        })
    }

    /// TLS and plaintext on `tcp` when `tls` is given, else plaintext only, with the default
    /// [`ConnectionLimits`]. Starts the accepting task on the current tokio runtime.
    pub fn new(tcp: TcpListener, tls: Option<ServerTls>) -> io::Result<Self> {
        Self::with_limits(tcp, tls, &ConnectionLimits::default())
    }

    /// As [`AgentListener::new`], with the pending limits of `limits` (TLS only: without it,
    /// hyper's header timeout bounds a silent connection).
    pub fn with_limits(
        tcp: TcpListener,
        tls: Option<ServerTls>,
        limits: &ConnectionLimits,
    ) -> io::Result<Self> {
        match tls {
            None => Self::plain(tcp),
            Some(tls) => Self::sniffing(tcp, tls, limits.clone()),
        }
    }

    #[cfg(test)]
    pub(crate) fn with_timeout(
        tcp: TcpListener,
        tls: ServerTls,
        timeout: Duration,
    ) -> io::Result<Self> {
        let limits = ConnectionLimits {
            first_byte_timeout: timeout,
            handshake_timeout: timeout,
            ..ConnectionLimits::default()
        };
        Self::sniffing(tcp, tls, limits)
    }

    fn sniffing(tcp: TcpListener, tls: ServerTls, limits: ConnectionLimits) -> io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        let acceptor = tokio::spawn(accept_loop(tcp, tls, tx, limits)).abort_handle();
        Ok(Self {
            local,
            mode: Mode::Sniffing { ready, acceptor },
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Whether connections may be TLS.
    pub fn tls(&self) -> bool {
        matches!(self.mode, Mode::Sniffing { .. })
    }
}

impl From<TcpListener> for AgentListener {
    /// Plaintext only; see [`AgentListener::plain`]. A listener whose address cannot be read
    /// reports 0.0.0.0:0 as its own (only `local_addr` uses it).
    fn from(tcp: TcpListener) -> Self {
        let local = tcp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        Self {
            local,
            mode: Mode::Plain(tcp),
        }
    }
}

impl axum::serve::Listener for AgentListener {
    type Io = AgentStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (AgentStream, Peer) {
        match &mut self.mode {
            Mode::Plain(tcp) => loop {
                // Spelled out: `tcp.accept()` would pick this trait's method over tokio's.
                match TcpListener::accept(tcp).await {
                    Ok((stream, addr)) => return (AgentStream::Plain(stream), Peer::plain(addr)),
                    Err(e) => handle_accept_error(e).await,
                }
            },
            Mode::Sniffing { ready, .. } => match ready.recv().await {
                Some(conn) => conn,
                None => {
                    // The accepting task only ends when this listener is dropped, or by a
                    // panic; either way there is nothing more to accept.
                    tracing::error!("agent listener's accepting task ended");
                    std::future::pending().await
                }
            },
        }
    }

    /// The bound address, as a [`Peer`] (the trait wants the connection's address type).
    fn local_addr(&self) -> io::Result<Peer> {
        Ok(Peer {
            addr: self.local,
            tls: self.tls(),
            client_certs: None,
        })
    }
}

async fn accept_loop(
    tcp: TcpListener,
    tls: ServerTls,
    ready: mpsc::Sender<(AgentStream, Peer)>,
    limits: ConnectionLimits,
) {
    let acceptor = tls.acceptor();
    let pending = Arc::new(Pending::new(&limits));
    let limits = Arc::new(limits);
    loop {
        // Never waits for room: a full budget sheds the oldest pending connection instead.
        let accepted = tokio::select! {
            r = tcp.accept() => r,
            () = ready.closed() => return,
        };
        match accepted {
            Ok((stream, addr)) => match pending.enter(addr.ip()) {
                Ok((ticket, shed)) => {
                    let task = sniff(
                        stream,
                        addr,
                        acceptor.clone(),
                        ready.clone(),
                        limits.clone(),
                    );
                    tokio::spawn(async move {
                        tokio::select! {
                            // Shed: the stream drops with `task`, closing it.
                            _ = shed => {}
                            () = task => {}
                        }
                        drop(ticket);
                    });
                }
                Err(reason) => count_closed(reason),
            },
            Err(e) => handle_accept_error(e).await,
        }
    }
}

/// The connections waiting for their first byte or handshake, oldest first, and how many of
/// them each peer address has. Locked only for map operations.
struct Pending {
    max: usize,
    max_per_ip: usize,
    exempt: Vec<crate::net::IpNet>,
    state: Mutex<PendingState>,
}

#[derive(Default)]
struct PendingState {
    next: u64,
    /// By arrival: dropping an entry's sender tells its task to close the connection.
    order: BTreeMap<u64, (IpAddr, oneshot::Sender<()>)>,
    per_ip: HashMap<IpAddr, usize>,
}

impl PendingState {
    fn forget(&mut self, seq: u64) {
        let Some((ip, _shed)) = self.order.remove(&seq) else {
            return;
        };
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }
}

/// A pending connection's place in [`Pending`]; dropping it leaves.
struct PendingTicket {
    pending: Arc<Pending>,
    seq: u64,
}

impl Drop for PendingTicket {
    fn drop(&mut self) {
        self.pending.lock().forget(self.seq);
    }
}

impl Pending {
    fn new(limits: &ConnectionLimits) -> Self {
        Self {
            max: limits.max_pending,
            max_per_ip: limits.max_pending_per_ip,
            exempt: limits.exempt.clone(),
            state: Mutex::new(PendingState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PendingState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a new connection from `ip` in, or says why not. At the per-address limit the new
    /// one is refused (the heaviest address pays); at the total limit the oldest is shed, so a
    /// newcomer always gets in.
    fn enter(
        self: &Arc<Self>,
        ip: IpAddr,
    ) -> Result<(PendingTicket, oneshot::Receiver<()>), CloseReason> {
        let exempt = self.exempt.iter().any(|n| n.contains(ip));
        let mut state = self.lock();
        if !exempt
            && self.max_per_ip > 0
            && state.per_ip.get(&ip).copied().unwrap_or(0) >= self.max_per_ip
        {
            return Err(CloseReason::PendingPerIp);
        }
        let mut shed = 0;
        while self.max > 0 && state.order.len() >= self.max {
            let Some(oldest) = state.order.keys().next().copied() else {
                break;
            };
            state.forget(oldest);
            shed += 1;
        }
        let seq = state.next;
        state.next += 1;
        let (tx, rx) = oneshot::channel();
        state.order.insert(seq, (ip, tx));
        *state.per_ip.entry(ip).or_insert(0) += 1;
        drop(state);
        for _ in 0..shed {
            count_closed(CloseReason::PendingShed);
        }
        let ticket = PendingTicket {
            pending: self.clone(),
            seq,
        };
        Ok((ticket, rx))
    }
}

/// Waits for the first byte, runs the TLS handshake if it opens one, and hands the connection
/// to axum: the first byte within `first_byte_timeout`, everything within
/// `handshake_timeout`, of the accept.
async fn sniff(
    stream: TcpStream,
    addr: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    ready: mpsc::Sender<(AgentStream, Peer)>,
    limits: Arc<ConnectionLimits>,
) {
    let start = Instant::now();
    let deadline = start + limits.handshake_timeout;
    let first_deadline = deadline.min(start + limits.first_byte_timeout);
    let first = match tokio::time::timeout_at(first_deadline, first_byte(&stream)).await {
        Ok(Ok(Some(b))) => b,
        // Closed (or failed) before saying anything: nothing to serve, nothing to count.
        Ok(Ok(None) | Err(_)) => return,
        Err(_) => {
            count_closed(CloseReason::FirstByteTimeout);
            tracing::debug!(peer = %addr, "connection sent nothing; closed");
            return;
        }
    };
    let conn = if first == TLS_HANDSHAKE_RECORD {
        match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                let client_certs = tls.get_ref().1.peer_certificates().map(Arc::from);
                let peer = Peer {
                    addr,
                    tls: true,
                    client_certs,
                };
                (AgentStream::Tls(Box::new(tls)), peer)
            }
            Ok(Err(e)) => {
                let reason = classify(&e);
                count_failure(reason);
                tracing::debug!(peer = %addr, error = %e, reason = reason.as_str(), "tls handshake failed");
                return;
            }
            Err(_) => {
                count_failure(FailureReason::Timeout);
                tracing::debug!(peer = %addr, "tls handshake timed out");
                return;
            }
        }
    } else {
        (AgentStream::Plain(stream), Peer::plain(addr))
    };
    // Fails only when the listener is gone, and the connection with it.
    let _ = ready.send(conn).await;
}

/// The first byte the peer sent, left in the socket; `None` when it closed without sending.
async fn first_byte(stream: &TcpStream) -> io::Result<Option<u8>> {
    let mut b = [0u8; 1];
    let n = stream.peek(&mut b).await?;
    Ok((n == 1).then_some(b[0]))
}

/// Sorts a failed handshake into the metric's reasons.
fn classify(e: &io::Error) -> FailureReason {
    use rustls::AlertDescription as A;
    match e.kind() {
        io::ErrorKind::TimedOut => return FailureReason::Timeout,
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => return FailureReason::Aborted,
        _ => {}
    }
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return FailureReason::Other;
    };
    match tls {
        // Our client-certificate verifier said no (or a certificate was required and none
        // came): what the server decides about the client.
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            FailureReason::ClientCertificateRefused
        }
        // The client's alert about the certificate we presented.
        rustls::Error::AlertReceived(
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA,
        ) => FailureReason::ServerCertificateRefused,
        rustls::Error::AlertReceived(_)
        | rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. }
        | rustls::Error::PeerIncompatible(_)
        | rustls::Error::PeerMisbehaved(_)
        | rustls::Error::NoApplicationProtocol
        | rustls::Error::DecryptError => FailureReason::Protocol,
        _ => FailureReason::Other,
    }
}

/// Accept errors: per-connection ones (the client gave up in the backlog) are skipped; others
/// (out of file descriptors) get a pause so the loop does not spin, as axum's own listener
/// does.
/// Pause after an accept error that is not the peer's doing (e.g. out of descriptors), so the
/// loop does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_secs(1);

async fn handle_accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting an agent connection failed");
    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use axum::extract::ConnectInfo;
    use axum::routing::get;
    use axum::Router;
    use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

    use super::super::LocalCa;
    use agent::ClientTls;

    use super::*;

    /// A server on port 0 whose one route describes the connection it was asked over.
    async fn serve(dir: &Path, timeout: Duration) -> (SocketAddr, ServerTls, String) {
        let ca = LocalCa::new(dir, LocalCa::default_names("test.invalid"));
        ca.ensure().expect("local ca");
        let tls = ServerTls::from_local_ca(&ca, Duration::from_secs(60)).expect("tls");
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let listener = AgentListener::with_timeout(tcp, tls.clone(), timeout).expect("listener");
        let addr = listener.local_addr();
        let app = Router::new().route(
            "/",
            get(|ConnectInfo(p): ConnectInfo<Peer>| async move {
                let certs = p.client_certs.map_or(0, |c| c.len());
                format!("tls={} certs={certs}", p.tls)
            }),
        );
        tokio::spawn(async move {
            axum::serve(listener, app.into_make_service_with_connect_info::<Peer>()).await
        });
        let ca_pem = std::fs::read_to_string(&ca.ca_cert_path).expect("ca");
        (addr, tls, ca_pem)
    }

    async fn get_over<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> String {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out.rsplit("\r\n").next().unwrap_or_default().to_string()
    }

    async fn tls_connect(
        addr: SocketAddr,
        tls: &ClientTls,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        tls.handshake("localhost", TcpStream::connect(addr).await?)
            .await
    }

    #[tokio::test]
    async fn one_port_serves_plaintext_and_tls_and_passes_client_certs_on() {
        let dir = tempfile::tempdir().expect("dir");
        let (addr, server, ca_pem) = serve(dir.path(), HANDSHAKE_TIMEOUT).await;

        let plain = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(get_over(plain).await, "tls=false certs=0");

        let client = ClientTls::from_ca_pem(&ca_pem).expect("client tls");
        let tls = tls_connect(addr, &client).await.expect("handshake");
        assert_eq!(
            tls.get_ref().1.peer_certificates().and_then(|c| c.first()),
            server.certificate().as_ref(),
            "the server presents its certificate"
        );
        assert_eq!(get_over(tls).await, "tls=true certs=0");

        // A client certificate (any: none is verified yet) reaches the handler.
        let other = tempfile::tempdir().expect("dir");
        let id = LocalCa::new(other.path(), vec!["agent-1".into()]);
        id.ensure().expect("identity");
        let chain = std::fs::read_to_string(&id.cert_path).expect("chain");
        let key = std::fs::read_to_string(&id.key_path).expect("key");
        let with_cert = ClientTls::from_ca_pem_with_identity(&ca_pem, &chain, &key).expect("id");
        let tls = tls_connect(addr, &with_cert).await.expect("handshake");
        assert_eq!(get_over(tls).await, "tls=true certs=2");

        // The in-process client trusts exactly this server's certificate, and no other.
        let pinned = ClientTls::from_config(server.pinned_client_config().expect("pinned"));
        let tls = tls_connect(addr, &pinned).await.expect("pinned handshake");
        assert_eq!(get_over(tls).await, "tls=true certs=0");
        let elsewhere = tempfile::tempdir().expect("dir");
        let (other_addr, _other, _) = serve(elsewhere.path(), HANDSHAKE_TIMEOUT).await;
        assert!(tls_connect(other_addr, &pinned).await.is_err());
    }

    #[tokio::test]
    async fn bad_handshakes_end_their_connection_only() {
        let dir = tempfile::tempdir().expect("dir");
        let (addr, _server, ca_pem) = serve(dir.path(), Duration::from_millis(300)).await;

        // Garbage after the handshake record byte: the connection is closed.
        let mut garbage = TcpStream::connect(addr).await.expect("connect");
        garbage
            .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00])
            .await
            .expect("write");
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut rest))
            .await
            .expect("closed by the server");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?} {rest:?}");

        // A handshake that never completes is closed after the timeout.
        let mut stalled = TcpStream::connect(addr).await.expect("connect");
        stalled.write_all(&[0x16]).await.expect("write");
        let n = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut [0u8; 16]))
            .await
            .expect("closed by the server");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

        // A client that does not trust the server fails its handshake; the server carries on.
        let other = tempfile::tempdir().expect("dir");
        let stranger = LocalCa::new(other.path(), vec!["localhost".into()]);
        stranger.ensure().expect("ca");
        let wrong =
            ClientTls::from_ca_pem(&std::fs::read_to_string(&stranger.ca_cert_path).expect("ca"))
                .expect("client");
        assert!(tls_connect(addr, &wrong).await.is_err());

        let client = ClientTls::from_ca_pem(&ca_pem).expect("client tls");
        let tls = tls_connect(addr, &client).await.expect("still serving");
        assert_eq!(get_over(tls).await, "tls=true certs=0");
        let plain = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(get_over(plain).await, "tls=false certs=0");
    }

    /// The reason the server side of one real handshake from `client` fails with.
    async fn failure_of(server: &ServerTls, client: &ClientTls) -> FailureReason {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let acceptor = server.acceptor();
        let server_side = tokio::spawn(async move {
            let (stream, _) = tcp.accept().await.expect("accept");
            acceptor.accept(stream).await.map(drop)
        });
        // In TLS 1.3 the client finishes before the server checks its certificate: the
        // refusal reaches it on its first read.
        if let Ok(mut s) = tls_connect(addr, client).await {
            let _ = s.read(&mut [0u8; 1]).await;
        }
        let e = server_side
            .await
            .expect("join")
            .expect_err("handshake fails");
        classify(&e)
    }

    #[tokio::test]
    async fn refused_certificates_are_told_apart_by_whose_they_are() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = LocalCa::new(dir.path(), LocalCa::default_names("test.invalid"));
        ca.ensure().expect("ca");
        let ca_pem = std::fs::read_to_string(&ca.ca_cert_path).expect("ca");
        let agents = tempfile::tempdir().expect("dir");
        let agent_ca = LocalCa::new(agents.path(), vec!["agent-ca".into()]);
        agent_ca.ensure().expect("agent ca");
        let trust = super::super::AgentTrust::from_ca_file(&agent_ca.ca_cert_path).expect("trust");
        let server = ServerTls::from_local_ca(&ca, Duration::from_secs(60))
            .expect("tls")
            .with_agent_trust(&trust)
            .expect("agent trust");
        let elsewhere = tempfile::tempdir().expect("dir");
        let stranger = LocalCa::new(elsewhere.path(), vec!["localhost".into()]);
        stranger.ensure().expect("stranger");

        // The client does not trust our certificate: its alert says so.
        let distrusting =
            ClientTls::from_ca_pem(&std::fs::read_to_string(&stranger.ca_cert_path).expect("ca"))
                .expect("client");
        assert_eq!(
            failure_of(&server, &distrusting).await,
            FailureReason::ServerCertificateRefused
        );

        // The client trusts us, but its certificate is not from the agent CA: our verifier
        // refuses it.
        let chain = std::fs::read_to_string(&stranger.cert_path).expect("chain");
        let key = std::fs::read_to_string(&stranger.key_path).expect("key");
        let foreign = ClientTls::from_ca_pem_with_identity(&ca_pem, &chain, &key).expect("id");
        assert_eq!(
            failure_of(&server, &foreign).await,
            FailureReason::ClientCertificateRefused
        );
    }

    #[test]
    fn failures_are_sorted_into_bounded_reasons() {
        let tls = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        let cases = [
            (
                io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof"),
                FailureReason::Aborted,
            ),
            (
                io::Error::from(io::ErrorKind::ConnectionReset),
                FailureReason::Aborted,
            ),
            (
                tls(rustls::Error::AlertReceived(
                    rustls::AlertDescription::UnknownCA,
                )),
                FailureReason::ServerCertificateRefused,
            ),
            (
                tls(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired,
                )),
                FailureReason::ClientCertificateRefused,
            ),
            (
                tls(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                )),
                FailureReason::Protocol,
            ),
            (
                tls(rustls::Error::AlertReceived(
                    rustls::AlertDescription::ProtocolVersion,
                )),
                FailureReason::Protocol,
            ),
            (
                tls(rustls::Error::General("x".into())),
                FailureReason::Other,
            ),
            (io::Error::other("x"), FailureReason::Other),
        ];
        for (e, want) in cases {
            assert_eq!(classify(&e), want, "{e}");
        }
    }
}
