//! Agent identity after the first connect (bootstrap token → mTLS): the Rust agent takes up an
//! offered certificate and drops its token, the token is then refused for it, revocation
//! closes and refuses it and shows in the CRL, CSRs are signed for their own key only, and a
//! trusted TLS-terminating proxy may pass the certificate on in a header.

use gateway::client::{
    wait_for, Agent, AgentOptions, ClientError, ClientTls, ConnectError, HttpTransport,
    WsConnection,
};
use proto::v1::{
    CertificateRequest, ConnectionSettingsRequest, OpAmpConnectionSettingsRequest,
    ServerErrorResponseType,
};
use serde_json::Value;
use shared::ids::InstanceUid;
use tests::{eventually, TestServer, DEADLINE};

const UNTRUSTED_HEADER: &str = "ampora_gateway_untrusted_cert_header_total";

fn bearer(t: &str) -> Vec<(String, String)> {
    vec![("Authorization".into(), format!("Bearer {t}"))]
}

/// A first message of an agent that accepts OpAMP connection settings.
fn hello(uid: InstanceUid) -> proto::AgentToServer {
    proto::AgentToServer {
        instance_uid: uid.0.to_vec(),
        capabilities: 0x1 | 0x100,
        agent_description: Some(Default::default()),
        ..Default::default()
    }
}

fn with_csr(mut msg: proto::AgentToServer, csr: &[u8]) -> proto::AgentToServer {
    msg.connection_settings_request = Some(ConnectionSettingsRequest {
        opamp: Some(OpAmpConnectionSettingsRequest {
            certificate_request: Some(CertificateRequest { csr: csr.to_vec() }),
        }),
    });
    msg
}

/// The local CA's certificate (PEM): what agents are given to trust the server.
fn ca_pem(server: &TestServer) -> anyhow::Result<String> {
    let path = server.dir.path().join("tls").join("ca.pem");
    Ok(std::fs::read_to_string(path)?)
}

/// The identities the API lists for `uid`.
async fn identities_of(server: &TestServer, uid: &str) -> anyhow::Result<Vec<Value>> {
    let v = server
        .api
        .get(&format!("/api/v1/identities?instance_uid={uid}"))
        .await?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// An identity obtained over a raw connection with a CSR made here: (uid, cert PEM, key PEM,
/// serial). The key never leaves the test.
struct CsrIdentity {
    uid: InstanceUid,
    cert_pem: String,
    key_pem: String,
    serial: String,
}

async fn enroll_with_csr(server: &TestServer) -> anyhow::Result<CsrIdentity> {
    let token = server.api.token("csr").await?;
    let uid = InstanceUid::new_v7();
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, uid.to_string());
    let csr = params.serialize_request(&key)?.pem()?;
    let tls = server.client_tls()?;
    let mut conn = WsConnection::connect_tls(&server.wss_url(), &bearer(&token), &tls).await?;
    conn.send(&with_csr(hello(uid), csr.as_bytes())).await?;
    let reply = conn
        .recv()
        .await?
        .ok_or_else(|| anyhow::anyhow!("closed"))?;
    anyhow::ensure!(reply.error_response.is_none(), "{:?}", reply.error_response);
    let cert = reply
        .connection_settings
        .and_then(|c| c.opamp)
        .and_then(|o| o.certificate)
        .ok_or_else(|| anyhow::anyhow!("no certificate offered for the CSR"))?;
    anyhow::ensure!(
        cert.private_key.is_empty(),
        "the key stays with the agent: no private_key for a CSR"
    );
    anyhow::ensure!(!cert.ca_cert.is_empty(), "ca_cert is offered");
    let cert_pem = String::from_utf8(cert.cert)?;
    // The certificate is for the CSR's key.
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())?;
    let parsed = pem.parse_x509()?;
    assert_eq!(
        parsed.public_key().raw,
        key.public_key_der().as_slice(),
        "certificate for the CSR's public key"
    );
    let serial = gateway::tls::serial_hex(parsed.raw_serial());
    // A CSR that does not parse: BadRequest (facts §5.3).
    let mut garbage = with_csr(hello(uid), b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n");
    garbage.sequence_num = 1;
    garbage.agent_description = None;
    conn.send(&garbage).await?;
    let reply = conn
        .recv()
        .await?
        .ok_or_else(|| anyhow::anyhow!("closed"))?;
    let err = reply
        .error_response
        .ok_or_else(|| anyhow::anyhow!("a garbage CSR must get an error_response"))?;
    assert_eq!(err.r#type, ServerErrorResponseType::BadRequest as i32);
    conn.close(1000, "done").await;
    Ok(CsrIdentity {
        uid,
        cert_pem,
        key_pem: key.serialize_pem(),
        serial,
    })
}

/// mTLS with the identity, no token: the connection and one exchange.
async fn connect_mtls(
    server: &TestServer,
    id: &CsrIdentity,
) -> Result<WsConnection, anyhow::Error> {
    let tls = ClientTls::from_ca_pem_with_identity(&ca_pem(server)?, &id.cert_pem, &id.key_pem)?;
    let mut conn = WsConnection::connect_tls(&server.wss_url(), &[], &tls).await?;
    conn.send(&hello(id.uid)).await?;
    let reply = conn
        .recv()
        .await?
        .ok_or_else(|| anyhow::anyhow!("closed"))?;
    anyhow::ensure!(reply.error_response.is_none(), "{:?}", reply.error_response);
    Ok(conn)
}

/// URL-encodes everything but unreserved characters, as nginx's `$ssl_client_escaped_cert`.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn bootstrap_agent_moves_to_mtls_and_its_token_is_refused_after() -> anyhow::Result<()> {
    // The certificate offer carries the heartbeat interval, which the agent adopts: short, so
    // "it keeps talking" is quick to see.
    let server = TestServer::start_with(|c| c.opamp.heartbeat_interval_secs = 1).await?;
    let token = server.api.token("identity").await?;
    let uid = InstanceUid::new_v7();
    let agent = Agent::start(AgentOptions {
        endpoint: server.wss_url(),
        tls: Some(server.client_tls()?),
        token: Some(token.clone()),
        instance_uid: Some(uid.0),
        description: vec![("service.name".into(), "identity-collector".into())],
        heartbeat: std::time::Duration::from_millis(200),
        accept_identity: true,
        ..AgentOptions::default()
    });
    let mut rx = agent.status();
    let st = wait_for(&mut rx, DEADLINE, |s| {
        s.connected && s.client_cert_serial.is_some()
    })
    .await?;
    let serial = st.client_cert_serial.clone().unwrap_or_default();
    let uid_text = uid.to_string();

    // Confirmed by its first mTLS frame.
    let confirmed = eventually("identity confirmed", DEADLINE, || async {
        Ok(identities_of(&server, &uid_text)
            .await?
            .into_iter()
            .find(|i| i["serial"] == serial.as_str() && i["state"] == "confirmed"))
    })
    .await?;
    assert!(confirmed["confirmed_ms"].is_i64());
    assert!(confirmed["cert_pem"]
        .as_str()
        .is_some_and(|c| c.contains("BEGIN CERTIFICATE")));
    let one = server
        .api
        .get(&format!("/api/v1/identities/{serial}"))
        .await?;
    assert_eq!(one["instance_uid"], uid_text.as_str());
    // It keeps talking on the certificate.
    let replies = rx.borrow().replies;
    wait_for(&mut rx, DEADLINE, |s| {
        s.replies > replies + 2 && s.connected
    })
    .await?;
    assert_eq!(
        rx.borrow().client_cert_serial.as_deref(),
        Some(serial.as_str())
    );

    // The bootstrap token no longer admits this agent.
    let tls = server.client_tls()?;
    match WsConnection::connect_tls(&server.wss_url(), &bearer(&token), &tls).await {
        Err(ConnectError::Status { status, body, .. }) => {
            assert_eq!(status, 401, "{body}");
        }
        Err(e) => anyhow::bail!("expected 401, got {e}"),
        Ok(mut conn) => {
            // Refused on the first frame instead: an error and a close.
            conn.send(&hello(uid)).await?;
            let reply = conn.recv().await?;
            assert!(
                reply.is_none_or(|r| r.error_response.is_some()),
                "the token must be refused"
            );
        }
    }
    eventually("identity_required audited", DEADLINE, || async {
        let v = server
            .api
            .get("/api/v1/audit?reason=identity_required")
            .await?;
        Ok(v.as_array().is_some_and(|a| !a.is_empty()).then_some(()))
    })
    .await?;

    // Revoked: the agent is closed and stays out (its certificate is refused on reconnect).
    let (s, v) = server
        .api
        .raw(
            reqwest::Method::DELETE,
            &format!("/api/v1/identities/{serial}"),
            None,
        )
        .await?;
    assert_eq!(s, 204, "{v}");
    wait_for(&mut rx, DEADLINE, |s| {
        !s.connected && s.last_error.is_some()
    })
    .await?;
    server
        .api
        .wait_agent(&uid_text, "disconnected", |a| a["connected"] == false)
        .await?;
    agent.stop().await;
    server.stop().await
}

#[tokio::test]
async fn revoked_identity_is_closed_refused_and_listed_in_the_crl() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let id = enroll_with_csr(&server).await?;
    let mut conn = connect_mtls(&server, &id).await?;
    let uid_text = id.uid.to_string();
    eventually("identity confirmed", DEADLINE, || async {
        Ok(identities_of(&server, &uid_text)
            .await?
            .into_iter()
            .find(|i| i["serial"] == id.serial.as_str() && i["state"] == "confirmed"))
    })
    .await?;

    // Unknown serials are 404.
    let (s, _) = server
        .api
        .raw(reqwest::Method::DELETE, "/api/v1/identities/4fff", None)
        .await?;
    assert_eq!(s, 404);
    let (s, v) = server
        .api
        .raw(
            reqwest::Method::DELETE,
            &format!("/api/v1/identities/{}", id.serial),
            None,
        )
        .await?;
    assert_eq!(s, 204, "{v}");

    // The live connection is closed.
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            match conn.recv().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the revoked agent's connection must close");

    // Its next handshake (or request) is refused.
    let refused = eventually("revoked certificate refused", DEADLINE, || async {
        Ok(connect_mtls(&server, &id).await.err())
    })
    .await?;
    assert!(!refused.to_string().is_empty());
    let shown = server
        .api
        .get(&format!("/api/v1/identities/{}", id.serial))
        .await?;
    assert_eq!(shown["state"], "revoked");

    // The CRL, without an API token: PEM on request, DER by default.
    let http = reqwest::Client::new();
    let base = format!("http://{}/api/v1/identities/crl", server.addr);
    let resp = http.get(format!("{base}?format=pem")).send().await?;
    assert_eq!(resp.status().as_u16(), 200);
    let pem_text = resp.text().await?;
    assert!(
        pem_text.starts_with("-----BEGIN X509 CRL-----"),
        "{pem_text}"
    );
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes())?;
    let (_, crl) = x509_parser::parse_x509_crl(&pem.contents)?;
    let serials: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| gateway::tls::serial_hex(r.raw_serial()))
        .collect();
    assert!(
        serials.contains(&id.serial),
        "{serials:?} lacks {}",
        id.serial
    );
    let resp = http.get(&base).send().await?;
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/pkix-crl")
    );
    let der = resp.bytes().await?;
    let (_, crl) = x509_parser::parse_x509_crl(&der)?;
    assert!(crl
        .iter_revoked_certificates()
        .any(|r| gateway::tls::serial_hex(r.raw_serial()) == id.serial));
    server.stop().await
}

#[tokio::test]
async fn csr_is_signed_for_its_key_and_the_certificate_authenticates() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    // enroll_with_csr checks the public key and the BadRequest for a garbage CSR.
    let id = enroll_with_csr(&server).await?;
    let conn = connect_mtls(&server, &id).await?;
    conn.close(1000, "done").await;
    // A CSR naming another agent is refused as well.
    let token = server.api.token("csr-other").await?;
    let uid = InstanceUid::new_v7();
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, InstanceUid::new_v7().to_string());
    let csr = params.serialize_request(&key)?.pem()?;
    let mut conn =
        WsConnection::connect_tls(&server.wss_url(), &bearer(&token), &server.client_tls()?)
            .await?;
    conn.send(&with_csr(hello(uid), csr.as_bytes())).await?;
    let reply = conn
        .recv()
        .await?
        .ok_or_else(|| anyhow::anyhow!("closed"))?;
    assert_eq!(
        reply.error_response.map(|e| e.r#type),
        Some(ServerErrorResponseType::BadRequest as i32)
    );
    server.stop().await
}

#[tokio::test]
async fn trusted_proxy_header_authenticates_and_untrusted_is_ignored() -> anyhow::Result<()> {
    // Trusted: the header alone authenticates a plain-HTTP request.
    let server = TestServer::start_with(|c| {
        c.tls.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await?;
    let id = enroll_with_csr(&server).await?;
    let header = vec![("X-SSL-Client-Cert".to_string(), url_encode(&id.cert_pem))];
    let mut http = HttpTransport::new(&server.http_url(), header.clone(), false);
    let reply = http.exchange(&hello(id.uid)).await?;
    assert!(reply.error_response.is_none(), "{:?}", reply.error_response);
    let uid_text = id.uid.to_string();
    eventually("confirmed through the proxy header", DEADLINE, || async {
        Ok(identities_of(&server, &uid_text)
            .await?
            .into_iter()
            .find(|i| i["state"] == "confirmed"))
    })
    .await?;
    server.stop().await?;

    // Untrusted: the header is ignored and counted; without a token that is a 401.
    let server = TestServer::start().await?;
    let id = enroll_with_csr(&server).await?;
    let before = server.api.metric(UNTRUSTED_HEADER).await?;
    let header = vec![("X-SSL-Client-Cert".to_string(), url_encode(&id.cert_pem))];
    let mut http = HttpTransport::new(&server.http_url(), header, false);
    match http.exchange(&hello(id.uid)).await {
        Err(ClientError::Status { status, .. }) => assert_eq!(status, 401),
        other => anyhow::bail!("expected 401, got {other:?}"),
    }
    let after = server.api.metric(UNTRUSTED_HEADER).await?;
    assert!(after > before, "{UNTRUSTED_HEADER}: {before} -> {after}");
    server.stop().await
}
