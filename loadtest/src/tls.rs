//! TLS for the simulated agents (`wss://`, `https://`) and for spawned cluster gateways.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ::agent::ClientTls;
use anyhow::Context as _;
use gateway::tls::LocalCa;

/// Client settings trusting the CA(s) in `ca_pem`, built once per worker and shared by all of
/// its agents (a `ClientTls` is an `Arc` of one rustls `ClientConfig`).
///
/// Session resumption is off: every simulated agent stands for a separate machine, whose
/// first connect is a full handshake (opamp-go's default `tls.Config` has no session cache
/// either). With one shared cache, later agents would resume the sessions of earlier ones and
/// the connect storm would measure abbreviated handshakes that no real fleet performs.
pub fn client_tls(ca_pem: &str) -> anyhow::Result<ClientTls> {
    let tls = ClientTls::from_ca_pem(ca_pem).context("the CA to trust")?;
    let mut config = (**tls.config()).clone();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(ClientTls::from_config(Arc::new(config)))
}

/// Reads a PEM CA file and checks it can be trusted, so a bad file fails before any agent
/// starts.
pub fn read_ca_pem(path: &Path) -> anyhow::Result<String> {
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    client_tls(&pem).with_context(|| path.display().to_string())?;
    Ok(pem)
}

/// `ws://` → `wss://` and `http://` → `https://`; other URLs unchanged.
pub fn secure_url(url: &str) -> String {
    if let Some(rest) = url.strip_prefix("ws://") {
        format!("wss://{rest}")
    } else if let Some(rest) = url.strip_prefix("http://") {
        format!("https://{rest}")
    } else {
        url.to_string()
    }
}

/// A local CA and a server certificate for 127.0.0.1 / localhost in `dir` (what `ampora
/// serve` creates for itself; cluster gateways only serve TLS from files).
#[derive(Debug, Clone)]
pub struct GatewayCerts {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl GatewayCerts {
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        let ca = LocalCa::new(dir, LocalCa::default_names("localhost"));
        ca.ensure()
            .with_context(|| format!("creating a CA in {}", dir.display()))?;
        Ok(Self {
            ca_file: ca.ca_cert_path,
            cert_file: ca.cert_path,
            key_file: ca.key_path,
        })
    }

    /// The `--set`s that make a gateway serve this certificate.
    pub fn sets(&self) -> Vec<String> {
        vec![
            format!("tls.cert_file={}", self.cert_file.display()),
            format!("tls.key_file={}", self.key_file.display()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_urls() {
        assert_eq!(
            secure_url("ws://127.0.0.1:1/v1/opamp"),
            "wss://127.0.0.1:1/v1/opamp"
        );
        assert_eq!(secure_url("http://h:2/x"), "https://h:2/x");
        assert_eq!(secure_url("wss://h/x"), "wss://h/x");
    }

    #[test]
    fn gateway_certs_are_trusted_without_resumption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = GatewayCerts::create(dir.path()).expect("certs");
        let pem = read_ca_pem(&certs.ca_file).expect("trusted");
        let tls = client_tls(&pem).expect("client");
        assert!(!tls.has_client_cert());
        assert!(certs.sets().iter().all(|s| s.starts_with("tls.")));
        assert!(read_ca_pem(&dir.path().join("missing.pem")).is_err());
    }
}
