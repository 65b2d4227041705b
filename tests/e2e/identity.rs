//! Agent identity after the first connect (bootstrap token → mTLS): the Rust agent takes up an
//! offered certificate and drops its token, the token is then refused for it, revocation
//! closes and refuses it and shows in the CRL, CSRs are signed for their own key only, and a
//! trusted TLS-terminating proxy may pass the certificate on in a header.

use agent::{
    wait_for, Agent, AgentOptions, ClientError, ConnectError, HttpTransport, WsConnection,
};
use proto::v1::ServerErrorResponseType;
use rustls::AlertDescription;
use shared::ids::InstanceUid;
use tests::identity::{
    bearer, connected_on_certificate, crl_serials, handshake_alert, hello, proxy_secret_header,
    retired_for, trust_proxy, with_csr, CsrIdentity,
};
use tests::{eventually, TestServer, DEADLINE};

/// The local CA's certificate (PEM): what agents are given to trust the server.
fn ca_pem(server: &TestServer) -> anyhow::Result<String> {
    let path = server.dir.path().join("tls").join("ca.pem");
    Ok(std::fs::read_to_string(path)?)
}

/// An identity enrolled with a CSR over the server's `wss://` (see [`CsrIdentity::enroll`]).
async fn enroll_with_csr(server: &TestServer) -> anyhow::Result<CsrIdentity> {
    let token = server.api.token("csr").await?;
    CsrIdentity::enroll(&server.wss_url(), &ca_pem(server)?, &token).await
}

/// mTLS with the identity, no token: the connection and one exchange.
async fn connect_mtls(server: &TestServer, id: &CsrIdentity) -> anyhow::Result<WsConnection> {
    id.connect(&server.wss_url(), &ca_pem(server)?).await
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
    let serial = connected_on_certificate(&mut rx).await?;
    let uid_text = uid.to_string();

    // Confirmed by its first mTLS frame.
    let confirmed = server
        .api
        .wait_identity(&uid_text, &serial, "confirmed")
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
    server
        .api
        .wait_identity(&uid_text, &id.serial, "confirmed")
        .await?;

    // Unknown serials are 404.
    assert_eq!(server.api.revoke_identity("4fff").await?, 404);
    assert_eq!(server.api.revoke_identity(&id.serial).await?, 204);

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

    // Its next handshake is refused, with the alert that says why (not a 401 over HTTP, not
    // some other TLS failure).
    let tls = id.client_tls(&ca_pem(&server)?)?;
    eventually("revoked certificate refused", DEADLINE, || async {
        let alert = handshake_alert(server.addr, &tls).await?;
        Ok((alert == Some(AlertDescription::CertificateRevoked)).then_some(()))
    })
    .await?;
    assert!(
        connect_mtls(&server, &id).await.is_err(),
        "the agent cannot connect with it"
    );
    let shown = server
        .api
        .get(&format!("/api/v1/identities/{}", id.serial))
        .await?;
    assert_eq!(shown["state"], "revoked");

    // The CRL, without an API token: PEM on request, DER by default.
    let serials = crl_serials(server.addr).await?;
    assert!(
        serials.contains(&id.serial),
        "{serials:?} lacks {}",
        id.serial
    );
    let resp = reqwest::get(format!("http://{}/api/v1/identities/crl", server.addr)).await?;
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
        .any(|r| shared::tls::serial_hex(r.raw_serial()) == id.serial));
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
    // Trusted (address and proxy secret): the header alone authenticates a plain-HTTP request.
    let server = TestServer::start_with(|c| trust_proxy(c, "127.0.0.1")).await?;
    let id = enroll_with_csr(&server).await?;
    let headers = vec![id.proxy_header(), proxy_secret_header()];
    let mut http = HttpTransport::new(&server.http_url(), headers, false);
    let reply = http.exchange(&hello(id.uid)).await?;
    assert!(reply.error_response.is_none(), "{:?}", reply.error_response);
    let uid_text = id.uid.to_string();
    server
        .api
        .wait_identity(&uid_text, &id.serial, "confirmed")
        .await?;
    server.stop().await?;

    // Untrusted: the header is ignored (and counted: the `metrics` test binary); without a
    // token that is a 401.
    let server = TestServer::start().await?;
    let id = enroll_with_csr(&server).await?;
    let mut http = HttpTransport::new(&server.http_url(), vec![id.proxy_header()], false);
    match http.exchange(&hello(id.uid)).await {
        Err(ClientError::Status { status, .. }) => assert_eq!(status, 401),
        other => anyhow::bail!("expected 401, got {other:?}"),
    }
    server.stop().await
}

/// A certificate lifetime short enough to see a renewal (after two thirds of it) within a test.
const SHORT_VALIDITY_SECS: u64 = 6;

#[tokio::test]
async fn certificates_are_renewed_before_they_expire_and_the_old_one_is_revoked(
) -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| {
        c.opamp.heartbeat_interval_secs = 1;
        c.tls.identity_validity_secs = SHORT_VALIDITY_SECS;
    })
    .await?;
    let token = server.api.token("renewal").await?;
    let uid = InstanceUid::new_v7();
    let agent = Agent::start(AgentOptions {
        endpoint: server.wss_url(),
        tls: Some(server.client_tls()?),
        token: Some(token),
        instance_uid: Some(uid.0),
        accept_identity: true,
        ..AgentOptions::default()
    });
    let mut rx = agent.status();
    let first = connected_on_certificate(&mut rx).await?;

    // Before the first expires, the agent is offered a new one on its certificate connection
    // and moves to it.
    let second = wait_for(&mut rx, DEADLINE, |s| {
        s.connected && s.client_cert_serial.as_ref().is_some_and(|c| *c != first)
    })
    .await?
    .client_cert_serial
    .clone()
    .unwrap_or_default();
    let uid_text = uid.to_string();
    server
        .api
        .wait_identity(&uid_text, &second, "confirmed")
        .await?;
    // Once the renewed certificate works, the old one is revoked (facts §5.1 step 7).
    server
        .api
        .wait_identity(&uid_text, &first, "revoked")
        .await?;
    // Its audit row follows the revocation.
    let audit = eventually("the retirement audited", DEADLINE, || async {
        let audit = server
            .api
            .get(&format!("/api/v1/audit?instance_uid={uid_text}"))
            .await?;
        Ok(retired_for(&audit, &first, "replaced").then_some(audit))
    })
    .await?;
    let issued: Vec<&str> = audit
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["action"] == "identity.issue")
        .filter_map(|e| e["detail"]["serial"].as_str())
        .collect();
    assert!(
        issued.contains(&first.as_str()) && issued.contains(&second.as_str()),
        "both issues audited: {audit}"
    );
    // The renewed agent never needed its token again: it is still on certificates.
    let shown = server.api.agent(&uid_text).await?.expect("listed");
    assert_eq!(shown["connected"], true, "{shown}");
    agent.stop().await;
    server.stop().await
}
