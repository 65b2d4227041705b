//! TLS primitives both ends of the OpAMP connection use: the gateway's agent listener and
//! the agent library (`agent`).
//!
//! * [`MaybeTls`] — a TCP connection that is plaintext or TLS;
//! * [`provider`] — the one rustls crypto provider (ring);
//! * [`parse_certs_pem`] — the certificates of a PEM text;
//! * [`serial_hex`] — the one spelling of a certificate serial;
//! * [`TlsError`] — why certificates or keys could not be loaded or created.
//!
//! Server-side TLS (the listener, its certificate, the agent and local CAs) is the gateway's.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

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
    /// [`TlsError::Io`] for the file at `path`.
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// [`TlsError::Pem`]: the file at `path` is not the PEM expected.
    pub fn pem(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        Self::Pem {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

/// A TCP connection, plaintext or TLS: the gateway listener's connections (`T` a server TLS
/// stream) and the agent's (`T` a client one).
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

/// The one crypto provider of every TLS config Ampora builds (gateway listener, agent). Explicit rather than the
/// process-wide default, which would panic should another crate ever enable a second
/// provider.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate of a PEM text (other PEM sections are skipped).
pub fn parse_certs_pem(
    pem: &[u8],
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::pem::Error> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem).collect()
}

/// Lowercase hex of a DER serial without leading zero bytes: one spelling per serial whether
/// read from rcgen's input or x509-parser's output.
pub fn serial_hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    hex::encode(&bytes[start..])
}
