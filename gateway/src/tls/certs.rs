//! The server's certificate: loaded from PEM files, swapped in place when they change.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use shared::tls::{parse_certs_pem, provider, TlsError};

use super::local_ca::LocalCa;

/// How often a server on the local CA checks whether its certificate needs renewing (it is
/// renewed a month before it expires, so this only needs to be well under a month).
const RENEW_CHECK: Duration = Duration::from_secs(3600);

/// The TLS side of the agent listener: a rustls server configuration whose certificate comes
/// from PEM files and is replaced, without a restart, when the files change.
///
/// A background task polls the files' modification times every `reload_every`; a changed pair
/// that loads and matches is swapped in for new handshakes (open connections keep theirs), a
/// broken one is logged and the current certificate kept. The task ends when the last clone of
/// this value (and of the listener holding it) is gone.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    store: Arc<CertStore>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_file", &self.store.files.cert)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Serves the chain in `cert` (PEM, leaf first) with the key in `key` (PEM: PKCS#8, PKCS#1
    /// or SEC1), reloaded when either file changes. Must be called inside a tokio runtime for
    /// the reloading to run.
    pub fn from_files(cert: &Path, key: &Path, reload_every: Duration) -> Result<Self, TlsError> {
        let files = Files {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        };
        Self::start(files, None, reload_every)
    }

    /// Serves the local CA's server certificate; besides reloading its files, the background
    /// task renews it (through [`LocalCa::ensure`]) before it expires.
    pub fn from_local_ca(ca: &LocalCa, reload_every: Duration) -> Result<Self, TlsError> {
        let files = Files {
            cert: ca.cert_path.clone(),
            key: ca.key_path.clone(),
        };
        Self::start(files, Some(ca.clone()), reload_every)
    }

    fn start(
        files: Files,
        local_ca: Option<LocalCa>,
        reload_every: Duration,
    ) -> Result<Self, TlsError> {
        let provider = provider();
        let stamp = files.stamp();
        let key = files.load(&provider)?;
        let store = Arc::new(CertStore {
            files,
            current: RwLock::new(Arc::new(key)),
            generation: AtomicU64::new(0),
        });
        let verifier = Arc::new(OptionalClientCerts {
            provider: provider.clone(),
        });
        let config = server_config(provider, verifier, store.clone())?;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(watch(
                    Arc::downgrade(&store),
                    stamp,
                    local_ca,
                    reload_every.max(Duration::from_millis(10)),
                ));
            }
            Err(_) => tracing::warn!(
                cert_file = %store.files.cert.display(),
                "no tokio runtime: certificate files will not be reloaded"
            ),
        }
        Ok(Self {
            config: Arc::new(config),
            store,
        })
    }

    /// Verifies client certificates against the agent CA (optional: clients without one
    /// still connect, for bootstrap tokens) and refuses revoked ones at the handshake, instead
    /// of passing any presented chain on unverified.
    pub fn with_agent_trust(mut self, trust: &super::AgentTrust) -> Result<Self, TlsError> {
        let config = server_config(provider(), trust.verifier(), self.store.clone())?;
        self.config = Arc::new(config);
        Ok(self)
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }

    /// The leaf certificate new handshakes get now.
    pub fn certificate(&self) -> Option<CertificateDer<'static>> {
        self.store.current().cert.first().cloned()
    }

    /// A rustls client configuration that trusts exactly the certificate this server presents
    /// at the moment of each handshake, whatever its issuer and names. For an agent in this
    /// process (the Self-Agent, which wraps it in `agent::ClientTls::from_config`): it
    /// connects to a loopback address an operator's certificate rarely names, and it knows the
    /// certificate without trusting any CA. Other agents verify the server the ordinary way,
    /// through `agent::ClientTls::from_ca_pem`.
    pub fn pinned_client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let provider = provider();
        let verifier = Arc::new(PinnedServerCert {
            store: Arc::downgrade(&self.store),
            provider: provider.clone(),
        });
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

/// The certificate and key files.
#[derive(Debug, Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
}

/// What identifies a version of a file: modification time, size and inode (a file replaced by
/// a rename, as Kubernetes secret volumes do, gets a new inode even within one mtime tick).
/// `None` when the file cannot be stat'ed.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some((m.modified().ok()?, m.len(), ino))
}

impl Files {
    fn stamp(&self) -> (Stamp, Stamp) {
        (stamp(&self.cert), stamp(&self.key))
    }

    /// Reads and checks the pair: a chain with at least one certificate and the key that
    /// belongs to its leaf.
    fn load(&self, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
        let pem = std::fs::read(&self.cert).map_err(|e| TlsError::io(&self.cert, e))?;
        let chain = parse_certs_pem(&pem).map_err(|e| TlsError::pem(&self.cert, e))?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: self.cert.clone(),
            });
        }
        let key =
            PrivateKeyDer::from_pem_file(&self.key).map_err(|e| TlsError::pem(&self.key, e))?;
        CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Pem {
            path: self.key.clone(),
            message: format!("does not fit {}: {e}", self.cert.display()),
        })
    }
}

/// The certificate resolver: whatever was loaded last, for every handshake (no SNI choice).
#[derive(Debug)]
struct CertStore {
    files: Files,
    /// Replaced whole by the watch task; handshakes clone the `Arc` under a read lock.
    current: RwLock<Arc<CertifiedKey>>,
    /// Changes of the files the watch task has dealt with (the pair loaded, or refused and the
    /// current one kept); bumped after `current` is settled. What a test waits on before it
    /// asserts that a change was refused.
    generation: AtomicU64,
}

impl CertStore {
    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
    }

    /// See [`CertStore::generation`].
    #[cfg(test)]
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn dealt_with_change(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Polls the files every `every` and reloads the pair when either changed; on the local CA,
/// renews its certificate when due (which changes the files, so the next poll loads them).
async fn watch(
    store: Weak<CertStore>,
    mut seen: (Stamp, Stamp),
    local_ca: Option<LocalCa>,
    every: Duration,
) {
    let mut last_renew_check = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let Some(store) = store.upgrade() else {
            return;
        };
        let renew = local_ca
            .clone()
            .filter(|_| last_renew_check.elapsed() >= RENEW_CHECK);
        if renew.is_some() {
            last_renew_check = Instant::now();
        }
        let files = store.files.clone();
        // File system calls (and, rarely, key generation) off the runtime's worker threads.
        let checked = tokio::task::spawn_blocking(move || {
            if let Some(ca) = renew {
                if let Err(e) = ca.ensure() {
                    tracing::warn!(error = %e, "renewing the local TLS certificate failed");
                }
            }
            check(&files, seen)
        })
        .await;
        match checked {
            Ok(Some((stamp, Ok(key)))) => {
                seen = stamp;
                store.replace(key);
                store.dealt_with_change();
                tracing::info!(cert_file = %store.files.cert.display(), "tls certificate reloaded");
            }
            Ok(Some((stamp, Err(e)))) => {
                // Remembered, so a broken pair is reported once, not every poll; fixing either
                // file changes its stamp and is picked up.
                seen = stamp;
                store.dealt_with_change();
                tracing::warn!(error = %e, "tls certificate files changed but cannot be used; keeping the current certificate");
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "tls certificate check failed"),
        }
    }
}

/// `None` when neither file changed since `seen`; else the new stamps and the load result.
/// The stamps are taken before reading: a change racing the read is seen again next time.
fn check(
    files: &Files,
    seen: (Stamp, Stamp),
) -> Option<((Stamp, Stamp), Result<CertifiedKey, TlsError>)> {
    let now = files.stamp();
    if now == seen {
        return None;
    }
    Some((now, files.load(&provider())))
}

/// Client certificates: asked for, never required. A presented chain is accepted as is (rustls
/// still checks the handshake signature, i.e. that the client holds the leaf's key) and handed
/// to the request handler in [`super::Peer::client_certs`].
///
/// Used without agent identities; with them, [`ServerTls::with_agent_trust`] replaces it by
/// the WebPKI verifier over the agent CA.
#[derive(Debug)]
struct OptionalClientCerts {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for OptionalClientCerts {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        let algs = &self.provider.signature_verification_algorithms;
        algs.supported_schemes()
    }
}

/// Trusts exactly the leaf the server's [`CertStore`] holds at the time of the handshake.
#[derive(Debug)]
struct PinnedServerCert {
    /// Weak: a client outliving the server must not keep its certificates (and their reload
    /// task) alive; it then trusts nothing.
    store: Weak<CertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServerCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned = self
            .store
            .upgrade()
            .and_then(|s| s.current().cert.first().cloned());
        if pinned.is_some_and(|p| p.as_ref() == end_entity.as_ref()) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        let algs = &self.provider.signature_verification_algorithms;
        algs.supported_schemes()
    }
}

/// The agent port's TLS settings. No session resumption: a resumed session skips the
/// client-certificate check, so a certificate revoked since its first handshake would get
/// past the handshake. Agents reconnect rarely, and opamp-go keeps no session cache anyway, so
/// full handshakes cost little; the tickets no one uses are not sent either.
fn server_config(
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    // WebSocket upgrades need HTTP/1.1; the listener speaks nothing else.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use shared::testing::eventually;

    use super::*;

    /// A fresh certificate pair (each from its own throwaway CA): (chain PEM, key PEM, leaf).
    fn pair() -> (Vec<u8>, Vec<u8>, CertificateDer<'static>) {
        let dir = tempfile::tempdir().expect("dir");
        let ca = LocalCa::new(dir.path(), vec!["localhost".into()]);
        ca.ensure().expect("ca");
        let chain = std::fs::read(&ca.cert_path).expect("chain");
        let key = std::fs::read(&ca.key_path).expect("key");
        let leaf = parse_certs_pem(&chain).expect("pem").remove(0);
        (chain, key, leaf)
    }

    /// Pause between two checks in `eventually`, and the bound on the whole wait.
    const POLL: Duration = Duration::from_millis(10);
    const WAIT: Duration = Duration::from_secs(10);

    /// Replaces `path` whole (write aside, rename over), as a deployment tool does: the watch
    /// task sees one change, never a half-written file.
    fn replace_file(path: &Path, contents: impl AsRef<[u8]>) {
        let aside = path.with_extension("new");
        std::fs::write(&aside, contents).expect("write");
        std::fs::rename(&aside, path).expect("rename");
    }

    /// Waits until the watch task has dealt with one more change than `before`; returns the
    /// new generation.
    async fn next_generation(tls: &ServerTls, before: u64) -> u64 {
        eventually("the watch task to deal with the change", WAIT, POLL, || {
            tls.store.generation() > before
        })
        .await;
        tls.store.generation()
    }

    #[tokio::test]
    async fn changed_files_are_reloaded_and_broken_ones_ignored() {
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let (chain1, key1, leaf1) = pair();
        std::fs::write(&cert, &chain1).expect("write");
        std::fs::write(&key, &key1).expect("write");
        let tls = ServerTls::from_files(&cert, &key, Duration::from_millis(20)).expect("load");
        assert_eq!(tls.certificate(), Some(leaf1.clone()));

        assert_eq!(tls.store.generation(), 0, "nothing changed yet");

        // Key first, certificate second, as a careless operator would: the half-written pair
        // in between is refused, the complete one taken. Each change is asserted on once the
        // watch task has dealt with it, so a refusal is never mistaken for a slow poll.
        let (chain2, key2, leaf2) = pair();
        let first = tls.store.current();
        replace_file(&key, &key2);
        let g = next_generation(&tls, 0).await;
        // Not swapped at all: the leaf alone would not show a new key beside the old leaf.
        assert!(
            Arc::ptr_eq(&first, &tls.store.current()),
            "a mismatched pair is not used"
        );
        assert_eq!(tls.certificate(), Some(leaf1));
        replace_file(&cert, &chain2);
        let g = next_generation(&tls, g).await;
        assert_eq!(
            tls.certificate(),
            Some(leaf2.clone()),
            "the new pair is used"
        );

        let second = tls.store.current();
        replace_file(&cert, "garbage");
        next_generation(&tls, g).await;
        assert!(
            Arc::ptr_eq(&second, &tls.store.current()),
            "a broken file is not used"
        );
        assert_eq!(tls.certificate(), Some(leaf2));
    }

    #[test]
    fn unusable_files_are_refused_at_start() {
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let every = Duration::from_secs(1);
        let missing = ServerTls::from_files(&cert, &key, every).expect_err("missing");
        assert!(missing.to_string().contains("cert.pem"), "{missing}");
        let (chain, _, _) = pair();
        let (_, other_key, _) = pair();
        std::fs::write(&cert, &chain).expect("write");
        std::fs::write(&key, &other_key).expect("write");
        let mismatch = ServerTls::from_files(&cert, &key, every).expect_err("mismatch");
        assert!(mismatch.to_string().contains("does not fit"), "{mismatch}");
        std::fs::write(&cert, "").expect("write");
        let empty = ServerTls::from_files(&cert, &key, every).expect_err("empty");
        assert!(matches!(empty, TlsError::NoCertificate { .. }), "{empty}");
    }
}
