//! Connection-settings offers an agent can use, once: the endpoint in the agent's own
//! transport, the same settings never offered twice (agents built on opamp-go restart on every
//! offer), a generated key only over TLS, and a CSR Ampora cannot sign answered with an error.

use agent::{HttpTransport, WsConnection};
use shared::ids::InstanceUid;
use tests::identity::{bearer, hello, with_csr, CsrIdentity};
use tests::{Fleet, TestServer};

/// ReportsStatus | AcceptsOpAMPConnectionSettings | ReportsHeartbeat.
const SETTINGS_CAPS: u64 = 0x1 | 0x100 | 0x2000;

fn offer(reply: &proto::ServerToAgent) -> Option<proto::v1::OpAmpConnectionSettings> {
    reply.connection_settings.as_ref()?.opamp.clone()
}

fn ca_pem(server: &TestServer) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(
        server.dir.path().join("tls").join("ca.pem"),
    )?)
}

#[tokio::test]
async fn plain_http_agents_are_offered_http_endpoints() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    // Over plaintext: the heartbeat offer, for the agent's own transport.
    let token = server.api.token("http-plain").await?;
    let mut http = HttpTransport::new(&server.http_url(), bearer(&token), false);
    let mut msg = hello(InstanceUid::new_v7());
    msg.capabilities = SETTINGS_CAPS;
    let reply = http.exchange(&msg).await?;
    let op = offer(&reply).ok_or_else(|| anyhow::anyhow!("no offer: {reply:?}"))?;
    assert!(
        op.destination_endpoint.starts_with("http://"),
        "a plain-HTTP agent was sent to {}",
        op.destination_endpoint
    );
    assert!(op.certificate.is_none(), "no key pair over plaintext");

    // Over TLS with a certificate: https://, never wss://.
    let token = server.api.token("http-tls").await?;
    let tls = server.client_tls()?;
    let mut https = HttpTransport::new_tls(&server.https_url(), bearer(&token), false, tls);
    let reply = https.exchange(&msg_for(InstanceUid::new_v7())).await?;
    let op = offer(&reply).ok_or_else(|| anyhow::anyhow!("no offer: {reply:?}"))?;
    assert!(
        op.destination_endpoint.starts_with("https://"),
        "{}",
        op.destination_endpoint
    );
    assert!(op.certificate.is_some_and(|c| !c.private_key.is_empty()));
    server.stop().await
}

fn msg_for(uid: InstanceUid) -> proto::AgentToServer {
    let mut msg = hello(uid);
    msg.capabilities = SETTINGS_CAPS;
    msg
}

#[tokio::test]
async fn a_generated_key_never_travels_over_plaintext() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let token = server.api.token("plain").await?;
    let uid = InstanceUid::new_v7();
    let mut conn = WsConnection::connect(&server.ws_url(), &bearer(&token)).await?;
    conn.send(&msg_for(uid)).await?;
    let reply = conn.recv().await?.unwrap_or_default();
    assert!(
        offer(&reply).and_then(|o| o.certificate).is_none(),
        "a certificate (and key) was offered over ws://"
    );
    assert!(server.api.identities_of(&uid.to_string()).await?.is_empty());

    // A CSR keeps the key on the agent: that works over plaintext.
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .pem()?;
    let mut msg = with_csr(msg_for(uid), csr.as_bytes());
    msg.sequence_num = 1;
    conn.send(&msg).await?;
    let reply = conn.recv().await?.unwrap_or_default();
    let cert = offer(&reply).and_then(|o| o.certificate);
    assert!(cert.is_some_and(|c| c.private_key.is_empty() && !c.cert.is_empty()));
    server.stop().await
}

#[tokio::test]
async fn settings_in_use_are_not_offered_again() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let ca = ca_pem(&server)?;
    let token = server.api.token("in-use").await?;
    let id = CsrIdentity::enroll(&server.wss_url(), &ca, &token).await?;
    // On its certificate, on one connection after another (an agent that restarts on every
    // offer would loop if each were offered the certificate it already uses).
    for round in 0..3u64 {
        let mut conn = id.connect(&server.wss_url(), &ca).await?;
        let mut msg = msg_for(id.uid);
        msg.sequence_num = 100 + round;
        conn.send(&msg).await?;
        let reply = conn.recv().await?.unwrap_or_default();
        assert!(
            reply.connection_settings.is_none(),
            "round {round}: offered again: {:?}",
            reply.connection_settings
        );
        conn.close(1000, "restart").await;
    }
    server.stop().await
}

async fn a_csr_nobody_can_sign_gets_an_error(f: &impl Fleet) -> anyhow::Result<()> {
    let token = f.api().token("no-ca").await?;
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .pem()?;
    let mut http = HttpTransport::new(&f.http_url(), bearer(&token), false);
    let reply = http
        .exchange(&with_csr(msg_for(InstanceUid::new_v7()), csr.as_bytes()))
        .await?;
    let err = reply
        .error_response
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no answer to the CSR: {reply:?}"))?;
    assert!(err.error_message.contains("no agent CA"), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn a_csr_nobody_can_sign_gets_an_error_cluster() -> anyhow::Result<()> {
    // The sandbox runs without an agent CA.
    let c = tests::cluster::Cluster::start(1, 1, |_| {}).await?;
    a_csr_nobody_can_sign_gets_an_error(&c).await?;
    c.stop().await
}
