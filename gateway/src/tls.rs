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
//! The primitives the agent library needs as well ([`MaybeTls`](shared::tls::MaybeTls), the
//! crypto provider, PEM parsing, [`TlsError`](shared::tls::TlsError), serial spelling) live in
//! [`shared::tls`].
//!
//! Client certificates are requested but optional. One that is presented reaches the handler
//! in [`Peer::client_certs`] after rustls checked the client holds its key; its chain is not
//! verified against any CA yet, so it is not an identity (see [`Peer::client_certs`]).

mod agent_ca;
mod certs;
mod listener;
mod local_ca;

pub use self::agent_ca::{
    cert_public_key, csr_public_key, AgentCa, AgentTrust, CertIdentity, CertRejection, IssueError,
    IssuedIdentity, RevokedSerials,
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
