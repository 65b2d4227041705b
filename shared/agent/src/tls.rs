//! TLS for `wss://` and `https://` endpoints.
//!
//! There is no built-in trust: the client runs where the web PKI's root store may not exist
//! (and Ampora's own servers use a local CA), so a TLS endpoint needs a [`ClientTls`] naming
//! the CA to trust.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use shared::tls::{parse_certs_pem, provider, MaybeTls, TlsError};
use tokio::net::TcpStream;

/// A client connection: plain TCP or TLS over TCP.
pub(crate) type ClientStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

/// Client TLS settings: which CA(s) to trust and, optionally, a client certificate. Cheap to
/// clone; share one between many agents (the load generator) rather than building one each.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field(
                "client_cert",
                &self.config.client_auth_cert_resolver.has_certs(),
            )
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the CA certificates in `ca_pem` (e.g. the `ca.pem` of `ampora serve`'s data
    /// directory) and nothing else.
    pub fn from_ca_pem(ca_pem: &str) -> Result<Self, TlsError> {
        let config = builder(ca_pem)?.with_no_client_auth();
        Ok(Self::from_config(Arc::new(with_alpn(config))))
    }

    /// [`from_ca_pem`](Self::from_ca_pem) with the PEM file at `path`.
    pub fn from_ca_file(path: &Path) -> Result<Self, TlsError> {
        let pem = std::fs::read_to_string(path).map_err(|e| TlsError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_ca_pem(&pem)
    }

    /// Trusts `ca_pem` and presents the client certificate chain `chain_pem` (leaf first)
    /// with its key `key_pem`, for servers that ask for one (mTLS).
    pub fn from_ca_pem_with_identity(
        ca_pem: &str,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<Self, TlsError> {
        Self::from_ca_pem(ca_pem)?.with_identity(chain_pem, key_pem)
    }

    /// The same trust as `self`, presenting the client certificate chain `chain_pem` (leaf
    /// first) with its key `key_pem`: how an agent takes up an identity offered by the server
    /// while keeping the CA it was configured to trust.
    pub fn with_identity(&self, chain_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let invalid = |what: &str, e: &dyn std::fmt::Display| {
            TlsError::Invalid(format!("client {what}: {e}"))
        };
        let chain: Vec<CertificateDer<'static>> =
            parse_certs_pem(chain_pem.as_bytes()).map_err(|e| invalid("certificate", &e))?;
        if chain.is_empty() {
            return Err(TlsError::Invalid(
                "client certificate: none in the PEM".into(),
            ));
        }
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| invalid("key", &e))?;
        let certified = rustls::sign::CertifiedKey::from_der(chain, key, &provider())?;
        let mut config = (*self.config).clone();
        config.client_auth_cert_resolver = Arc::new(OneClientCert(Arc::new(certified)));
        Ok(Self::from_config(Arc::new(config)))
    }

    /// Whether this configuration presents a client certificate.
    pub fn has_client_cert(&self) -> bool {
        self.config.client_auth_cert_resolver.has_certs()
    }

    /// Any rustls client configuration (custom verifiers, pinning).
    pub fn from_config(config: Arc<rustls::ClientConfig>) -> Self {
        Self { config }
    }

    pub fn config(&self) -> &Arc<rustls::ClientConfig> {
        &self.config
    }

    /// The TLS handshake over `tcp` for `host` (a DNS name or an IP address).
    pub(crate) async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> std::io::Result<ClientStream> {
        Ok(MaybeTls::Tls(Box::new(self.handshake(host, tcp).await?)))
    }

    /// The bare TLS stream of [`connect`](Self::connect): for probes that speak their own bytes
    /// over it or look at the handshake (the tests, the load generator's banner check). A
    /// refusal at the handshake is the `rustls::Error` inside the `io::Error`.
    pub async fn handshake(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host}: {e}"))
        })?;
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
    }
}

/// Always presents the one certificate (rustls' own equivalent is not public).
#[derive(Debug)]
struct OneClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for OneClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn builder(
    ca_pem: &str,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, TlsError>
{
    let certs = parse_certs_pem(ca_pem.as_bytes())
        .map_err(|e| TlsError::Invalid(format!("CA certificates: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Invalid("CA certificates: none in the PEM".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert)?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots))
}

/// OpAMP speaks HTTP/1.1 (WebSocket upgrades need it); saying so lets a server that also
/// speaks HTTP/2 pick the right one.
fn with_alpn(mut config: rustls::ClientConfig) -> rustls::ClientConfig {
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}
