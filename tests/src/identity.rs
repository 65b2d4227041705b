//! Agent identities (bootstrap token → mTLS) for the embedded and the cluster tests alike: TLS
//! files for nodes configured by file, enrolment with a CSR made here, mTLS connections with
//! the result, the trusted-proxy header, the identities API and the CRL.

use std::net::SocketAddr;
use std::time::Duration;

use agent::{ClientTls, WsConnection};
use anyhow::Context as _;
use coordinator::config::Config;
use gateway::tls::LocalCa;
use proto::v1::{
    CertificateRequest, ConnectionSettingsRequest, OpAmpConnectionSettingsRequest,
    ServerErrorResponseType,
};
use serde_json::Value;
use shared::ids::InstanceUid;

use crate::{eventually, Api, DEADLINE};

/// How long [`handshake_alert`] waits for an answer or an alert.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Header values a gateway ignored because they came from an untrusted address.
pub const UNTRUSTED_HEADER: &str = "ampora_gateway_untrusted_cert_header_total";

/// The header a trusted TLS-terminating proxy passes the client certificate in (the default
/// `tls.client_cert_header`).
pub const CLIENT_CERT_HEADER: &str = "X-SSL-Client-Cert";

/// The secret the tests' trusted proxies prove themselves with (`tls.trusted_proxy_secret_file`).
pub const PROXY_SECRET: &str = "test-proxy-secret-0123456789abcdef";

/// Trusts `proxy` (an address or CIDR) as a proxy that sends [`PROXY_SECRET`]: the secret file is
/// written into the node's data directory.
pub fn trust_proxy(cfg: &mut Config, proxy: &str) {
    let dir = &cfg.server.data_dir;
    std::fs::create_dir_all(dir).expect("data directory");
    let file = dir.join("proxy-secret");
    std::fs::write(&file, format!("{PROXY_SECRET}\n")).expect("writing the proxy secret");
    cfg.tls.trusted_proxies = vec![proxy.into()];
    cfg.tls.trusted_proxy_secret_file = file;
}

/// The header that proves a request comes from the trusted proxy.
pub fn proxy_secret_header() -> (String, String) {
    (
        gateway::server::PROXY_SECRET_HEADER.as_str().into(),
        PROXY_SECRET.into(),
    )
}

pub use crate::bearer;

/// A first message of an agent that accepts OpAMP connection settings.
pub fn hello(uid: InstanceUid) -> proto::AgentToServer {
    let mut msg = crate::hello(uid);
    msg.capabilities |= 0x100;
    msg
}

pub fn with_csr(mut msg: proto::AgentToServer, csr: &[u8]) -> proto::AgentToServer {
    msg.connection_settings_request = Some(ConnectionSettingsRequest {
        opamp: Some(OpAmpConnectionSettingsRequest {
            certificate_request: Some(CertificateRequest { csr: csr.to_vec() }),
        }),
    });
    msg
}

/// URL-encodes everything but unreserved characters, as nginx's `$ssl_client_escaped_cert`.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An identity obtained over a raw connection with a CSR made here. The key never leaves the
/// test.
pub struct CsrIdentity {
    pub uid: InstanceUid,
    pub cert_pem: String,
    pub key_pem: String,
    /// As the API names it (lowercase hex).
    pub serial: String,
}

impl CsrIdentity {
    /// Connects to `wss_url` (trusting `ca_pem`) with bootstrap `token` and a CSR for a fresh
    /// uid; checks that the certificate is for the CSR's key and comes without a private key,
    /// and that a garbage CSR on the same connection gets `BadRequest`.
    pub async fn enroll(wss_url: &str, ca_pem: &str, token: &str) -> anyhow::Result<Self> {
        Self::enroll_as(InstanceUid::new_v7(), wss_url, ca_pem, token).await
    }

    /// [`enroll`](Self::enroll) for a given `uid`: an agent re-bootstrapping with a new token.
    pub async fn enroll_as(
        uid: InstanceUid,
        wss_url: &str,
        ca_pem: &str,
        token: &str,
    ) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, uid.to_string());
        let csr = params.serialize_request(&key)?.pem()?;
        let tls = ClientTls::from_ca_pem(ca_pem)?;
        let mut conn = WsConnection::connect_tls(wss_url, &bearer(token), &tls).await?;
        let reply =
            crate::ws_until_served(&mut conn, &with_csr(hello(uid), csr.as_bytes())).await?;
        anyhow::ensure!(reply.error_response.is_none(), "{:?}", reply.error_response);
        let cert = reply
            .connection_settings
            .and_then(|c| c.opamp)
            .and_then(|o| o.certificate)
            .context("no certificate offered for the CSR")?;
        anyhow::ensure!(
            cert.private_key.is_empty(),
            "the key stays with the agent: no private_key for a CSR"
        );
        anyhow::ensure!(!cert.ca_cert.is_empty(), "ca_cert is offered");
        let cert_pem = String::from_utf8(cert.cert)?;
        // The certificate is for the CSR's key.
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())?;
        let parsed = pem.parse_x509()?;
        anyhow::ensure!(
            parsed.public_key().raw == key.public_key_der().as_slice(),
            "certificate not for the CSR's public key"
        );
        let serial = shared::tls::serial_hex(parsed.raw_serial());
        // A CSR that does not parse: BadRequest (facts §5.3).
        let mut garbage = with_csr(hello(uid), b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n");
        garbage.sequence_num = 1;
        garbage.agent_description = None;
        let reply = crate::ws_until_served(&mut conn, &garbage).await?;
        let err = reply
            .error_response
            .context("a garbage CSR must get an error_response")?;
        anyhow::ensure!(
            err.r#type == ServerErrorResponseType::BadRequest as i32,
            "garbage CSR: {err:?}"
        );
        conn.close(1000, "done").await;
        Ok(Self {
            uid,
            cert_pem,
            key_pem: key.serialize_pem(),
            serial,
        })
    }

    /// Client TLS trusting `ca_pem` and presenting this identity.
    pub fn client_tls(&self, ca_pem: &str) -> anyhow::Result<ClientTls> {
        Ok(ClientTls::from_ca_pem_with_identity(
            ca_pem,
            &self.cert_pem,
            &self.key_pem,
        )?)
    }

    /// mTLS with this identity and no token: the connection after one exchange.
    pub async fn connect(&self, wss_url: &str, ca_pem: &str) -> anyhow::Result<WsConnection> {
        let mut conn = WsConnection::connect_tls(wss_url, &[], &self.client_tls(ca_pem)?).await?;
        let reply = crate::ws_until_served(&mut conn, &hello(self.uid)).await?;
        anyhow::ensure!(reply.error_response.is_none(), "{:?}", reply.error_response);
        Ok(conn)
    }

    /// The certificate as a TLS-terminating proxy passes it on.
    pub fn proxy_header(&self) -> (String, String) {
        (CLIENT_CERT_HEADER.into(), url_encode(&self.cert_pem))
    }
}

impl Api {
    /// `DELETE /api/v1/identities/{serial}`: the status, after checking a 204 has no body.
    pub async fn revoke_identity(&self, serial: &str) -> anyhow::Result<u16> {
        let path = format!("/api/v1/identities/{serial}");
        let (status, body) = self.raw(reqwest::Method::DELETE, &path, None).await?;
        anyhow::ensure!(status != 204 || body.is_null(), "204 with a body: {body}");
        Ok(status)
    }

    /// The identities the API lists for `uid`.
    pub async fn identities_of(&self, uid: &str) -> anyhow::Result<Vec<Value>> {
        let v = self
            .get(&format!("/api/v1/identities?instance_uid={uid}"))
            .await?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Waits until identity `serial` of `uid` is in `state` (`confirmed`, `revoked`, …);
    /// returns its view.
    pub async fn wait_identity(
        &self,
        uid: &str,
        serial: &str,
        state: &str,
    ) -> anyhow::Result<Value> {
        eventually(&format!("identity {serial} {state}"), DEADLINE, || async {
            Ok(self
                .identities_of(uid)
                .await?
                .into_iter()
                .find(|i| i["serial"] == serial && i["state"] == state))
        })
        .await
    }
}

/// Waits until an agent started with `accept_identity` is connected on the certificate it
/// was issued; returns that certificate's serial.
pub async fn connected_on_certificate(
    status: &mut tokio::sync::watch::Receiver<agent::AgentStatus>,
) -> anyhow::Result<String> {
    let s = agent::wait_for(status, DEADLINE, |s| {
        s.connected && s.client_cert_serial.is_some()
    })
    .await?;
    s.client_cert_serial.clone().context("serial")
}

/// Whether `audit` (entries as `GET /api/v1/audit` lists them) records identity `serial`
/// revoked by Ampora itself for `reason` (`superseded`, `replaced`).
pub fn retired_for(audit: &Value, serial: &str, reason: &str) -> bool {
    audit.as_array().is_some_and(|a| {
        a.iter().any(|e| {
            e["action"] == "identity.revoke"
                && e["detail"]["serial"] == serial
                && e["detail"]["reason"] == reason
        })
    })
}

/// The serials the CRL of the API at `addr` lists, fetched as agents and proxies do (PEM, no
/// API token).
pub async fn crl_serials(addr: SocketAddr) -> anyhow::Result<Vec<String>> {
    let url = format!("http://{addr}/api/v1/identities/crl?format=pem");
    let resp = reqwest::get(url).await?;
    anyhow::ensure!(resp.status().as_u16() == 200, "CRL: {}", resp.status());
    let text = resp.text().await?;
    anyhow::ensure!(text.starts_with("-----BEGIN X509 CRL-----"), "{text}");
    let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes())?;
    let (_, crl) = x509_parser::parse_x509_crl(&pem.contents)?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| shared::tls::serial_hex(r.raw_serial()))
        .collect())
}

/// Opens TLS to `addr` with `tls` and asks for `/health/live`: the alert the server refused
/// the handshake with, `None` when it answered. (In TLS 1.3 the server checks the client
/// certificate after the client has finished its part, so a refusal arrives on the first
/// read.) Tells a refusal at the handshake from one over HTTP, which the OpAMP client's
/// errors do not.
pub async fn handshake_alert(
    addr: SocketAddr,
    tls: &ClientTls,
) -> anyhow::Result<Option<rustls::AlertDescription>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    // With the client's session cache, filled by its earlier handshakes: a resumed session
    // would skip the certificate check, so gateways must not offer one.
    let mut stream = match tls.handshake(&addr.ip().to_string(), tcp).await {
        Ok(s) => s,
        Err(e) => return Ok(alert_of(&e)),
    };
    let request = format!("GET /health/live HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut answer = Vec::new();
    let read = async {
        stream.write_all(request.as_bytes()).await?;
        stream.read_to_end(&mut answer).await
    };
    let read = tokio::time::timeout(PROBE_TIMEOUT, read)
        .await
        .context("no answer and no alert")?;
    match read {
        Err(e) if alert_of(&e).is_some() => Ok(alert_of(&e)),
        // Answered (a close without close_notify after the answer is fine).
        _ if answer.starts_with(b"HTTP/1.1 ") => Ok(None),
        Ok(_) => anyhow::bail!("closed without an answer"),
        Err(e) => Err(e.into()),
    }
}

fn alert_of(e: &std::io::Error) -> Option<rustls::AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// A CA and a server certificate for localhost / 127.0.0.1 signed by it, made with rcgen as an
/// operator's tooling would: (CA PEM, chain PEM, key PEM, leaf DER).
pub struct Issued {
    pub ca_pem: String,
    pub chain_pem: String,
    pub key_pem: String,
    pub leaf: rustls::pki_types::CertificateDer<'static>,
}

/// A CA of its own, made with rcgen as an operator's tooling would (not Ampora's local CA).
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new() -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ampora test CA");
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// A server certificate for localhost / 127.0.0.1.
    pub fn issue(&self) -> anyhow::Result<Issued> {
        let key = rcgen::KeyPair::generate()?;
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            ca_pem: self.cert.pem(),
            chain_pem: format!("{}{}", cert.pem(), self.cert.pem()),
            key_pem: key.serialize_pem(),
            leaf: cert.der().clone(),
        })
    }
}

/// TLS files for nodes that take them from the configuration (cluster gateways and
/// coordinators): one local CA in a temporary directory that signs the server certificate
/// (for the loopback names) and, as the agent CA, agent identities, as `ampora serve` does.
pub struct TlsFiles {
    ca: LocalCa,
    _dir: tempfile::TempDir,
}

impl TlsFiles {
    pub fn create() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = LocalCa::new(dir.path(), LocalCa::default_names(""));
        ca.ensure()?;
        Ok(Self { ca, _dir: dir })
    }

    /// Gateways serve the server certificate and verify agent certificates against the CA;
    /// coordinators sign with its key (each role ignores what is not its own).
    pub fn configure(&self, cfg: &mut Config) {
        cfg.tls.cert_file = self.ca.cert_path.clone();
        cfg.tls.key_file = self.ca.key_path.clone();
        cfg.tls.agent_ca_cert_file = self.ca.ca_cert_path.clone();
        cfg.tls.agent_ca_key_file = self.ca.ca_key_path.clone();
    }

    /// The CA certificate (PEM): what agents are given to trust the gateways.
    pub fn ca_pem(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(&self.ca.ca_cert_path)?)
    }

    pub fn client_tls(&self) -> anyhow::Result<ClientTls> {
        Ok(ClientTls::from_ca_file(&self.ca.ca_cert_path)?)
    }
}
