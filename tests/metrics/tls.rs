//! Failed TLS handshakes on the agent port, each under its own reason
//! (`ampora_tls_handshake_failures_total`).

use std::net::SocketAddr;
use std::time::Duration;

use agent::ClientTls;
use tests::identity::handshake_alert;
use tests::{TestServer, DEADLINE};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::{alone, expect_changes, series, snapshot};

const FAILURES: &str = "ampora_tls_handshake_failures_total";

/// How long the server gives a handshake here: short, so the timeout is quick to see.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(1_000);

fn failure(reason: &str) -> String {
    series(FAILURES, "reason", reason)
}

/// A certificate for localhost / 127.0.0.1 from a CA of its own: (CA PEM, chain PEM, key PEM).
fn stranger() -> anyhow::Result<(String, String, String)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?
        .signed_by(&key, &ca, &ca_key)?;
    Ok((
        ca.pem(),
        format!("{}{}", cert.pem(), ca.pem()),
        key.serialize_pem(),
    ))
}

/// Reads until the server closes the connection (bounded by [`DEADLINE`]).
async fn until_closed(mut stream: TcpStream) -> anyhow::Result<()> {
    tokio::time::timeout(DEADLINE, async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("the server did not close the connection"))
}

#[tokio::test]
async fn failed_handshakes_are_counted_each_under_its_reason() -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start_with(|c| {
        c.connections.handshake_timeout_ms =
            u64::try_from(HANDSHAKE_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
    })
    .await?;
    let api = &server.api;
    let addr: SocketAddr = server.addr;
    let fam = &[FAILURES];
    let s = snapshot(api, fam).await?;

    // Garbage after the TLS record byte.
    let mut garbage = TcpStream::connect(addr).await?;
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00])
        .await?;
    until_closed(garbage).await?;
    let s = expect_changes(api, fam, &s, &[(&failure("protocol"), 1.0)]).await?;

    // A client that gives up half-way through its hello.
    let mut aborted = TcpStream::connect(addr).await?;
    aborted.write_all(&[0x16, 0x03, 0x01]).await?;
    drop(aborted);
    let s = expect_changes(api, fam, &s, &[(&failure("aborted"), 1.0)]).await?;

    // A client that sends part of its hello and then nothing: the server's handshake
    // deadline ends it.
    let mut stalled = TcpStream::connect(addr).await?;
    stalled
        .write_all(&[
            0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00, 0x00, 0x3c, 0x03, 0x03,
        ])
        .await?;
    until_closed(stalled).await?;
    let s = expect_changes(api, fam, &s, &[(&failure("timeout"), 1.0)]).await?;

    // A client that does not trust the server's certificate.
    let (ca_pem, chain_pem, key_pem) = stranger()?;
    let distrust = ClientTls::from_ca_pem(&ca_pem)?;
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let refused = tokio_rustls::TlsConnector::from(distrust.config().clone())
        .connect(name, tcp)
        .await;
    assert!(
        refused.is_err(),
        "a client that does not trust the server fails its own handshake"
    );
    let s = expect_changes(
        api,
        fam,
        &s,
        &[(&failure("server_certificate_refused"), 1.0)],
    )
    .await?;

    // A client that trusts the server but presents a certificate from another CA than the
    // agent CA.
    let server_ca = std::fs::read_to_string(server.dir.path().join("tls").join("ca.pem"))?;
    let foreign = ClientTls::from_ca_pem_with_identity(&server_ca, &chain_pem, &key_pem)?;
    assert!(handshake_alert(addr, &foreign).await?.is_some());
    expect_changes(
        api,
        fam,
        &s,
        &[(&failure("client_certificate_refused"), 1.0)],
    )
    .await?;

    // The reason that could not tell the two apart is gone.
    let text = api.metrics_text().await?;
    assert!(!text.contains("reason=\"bad_certificate\""), "{text}");
    server.stop().await
}
