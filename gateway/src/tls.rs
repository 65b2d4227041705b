//! TLS on the agent listener.
//!
//! One port serves both TLS and plaintext: [`AgentListener`] looks at the first byte a client
//! sends (0x16 opens a TLS handshake record; an HTTP request starts with a letter) and hands
//! axum either the plain TCP stream or the TLS stream. Every existing plaintext client and tool
//! keeps working, and the request handler learns from [`Peer`] whether the connection is TLS,
//! which is what the `OpAmp:BootstrapPlaintextAllowed` rule is decided on.
//!
//! * [`ServerTls`] — the server's certificate, from PEM files that are reloaded without a
//!   restart when they change, or from a local CA ([`LocalCa`]) that `ampora serve` creates in
//!   its data directory when no certificate is configured.
//! * [`AgentListener`] — the listener: TCP accept, sniffing and handshakes off the accept path,
//!   handshake failures counted in `ampora_tls_handshake_failures_total{reason}`.
//!
//! Client certificates are requested but optional. One that is presented reaches the handler
//! in [`Peer::client_certs`] after rustls checked the client holds its key; its chain is not
//! verified against any CA yet, so it is not an identity (see [`Peer::client_certs`]).

mod agent_ca;
mod certs;
mod listener;
mod local_ca;

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub use self::agent_ca::{
    cert_public_key, csr_public_key, serial_hex, AgentCa, AgentTrust, CertIdentity, CertRejection,
    IssueError, IssuedIdentity, RevokedSerials,
};
pub use self::certs::ServerTls;
pub use self::listener::{AgentListener, AgentStream, Peer, HANDSHAKE_TIMEOUT};
pub use self::local_ca::LocalCa;

/// Counted per failed server-side handshake, by [`FailureReason`].
const HANDSHAKE_FAILURES: &str = "ampora_tls_handshake_failures_total";

/// Why a TLS handshake on the agent listener failed: the `reason` label of
/// `ampora_tls_handshake_failures_total`. A closed set so the label stays bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// No complete handshake within [`HANDSHAKE_TIMEOUT`].
    Timeout,
    /// The client closed or reset the connection in the middle of the handshake.
    Aborted,
    /// The client refused our certificate: it sent a certificate alert (`bad_certificate`,
    /// `unknown_ca`, `certificate_expired`, …) because it does not trust our CA, the name does
    /// not match or the certificate expired.
    ServerCertificateRefused,
    /// We refused the client's certificate: it does not chain to the agent CA, expired, is
    /// revoked, or its signature does not verify.
    ClientCertificateRefused,
    /// Not TLS after all, an unsupported version or cipher suite, or a malformed message.
    Protocol,
    /// Anything else (local I/O errors).
    Other,
}

impl FailureReason {
    pub const ALL: [FailureReason; 6] = [
        Self::Timeout,
        Self::Aborted,
        Self::ServerCertificateRefused,
        Self::ClientCertificateRefused,
        Self::Protocol,
        Self::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Aborted => "aborted",
            Self::ServerCertificateRefused => "server_certificate_refused",
            Self::ClientCertificateRefused => "client_certificate_refused",
            Self::Protocol => "protocol",
            Self::Other => "other",
        }
    }
}

fn count_failure(reason: FailureReason) {
    metrics::counter!(HANDSHAKE_FAILURES, "reason" => reason.as_str()).increment(1);
}

/// Registers the description of the TLS metrics and creates every `reason` series at zero.
pub fn describe_metrics() {
    metrics::describe_counter!(
        HANDSHAKE_FAILURES,
        "TLS handshakes on the agent listener that failed, by reason (timeout, aborted, server_certificate_refused: the client refused ours, client_certificate_refused: we refused the client's, protocol, other)"
    );
    for reason in FailureReason::ALL {
        metrics::counter!(HANDSHAKE_FAILURES, "reason" => reason.as_str()).increment(0);
    }
}

/// Why certificates or keys could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{path}: no certificate in the file")]
    NoCertificate { path: PathBuf },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

impl TlsError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn pem(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        Self::Pem {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

/// A TCP connection, plaintext or TLS: the agent listener's connections ([`AgentStream`]) and
/// the client's.
pub enum MaybeTls<T> {
    Plain(TcpStream),
    /// Boxed: the TLS state is large, and plaintext connections should not pay for it.
    Tls(Box<T>),
}

impl<T> std::fmt::Debug for MaybeTls<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Plain(_) => f.write_str("Plain"),
            Self::Tls(_) => f.write_str("Tls"),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The one crypto provider of every TLS config built here. Explicit rather than the
/// process-wide default, which would panic should another crate ever enable a second
/// provider.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate of a PEM text (other PEM sections are skipped).
pub fn parse_certs_pem(
    pem: &[u8],
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::pem::Error> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem).collect()
}
