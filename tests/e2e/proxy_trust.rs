//! Who may speak for an agent through forwarding headers (issue 17, finding 8): a forwarded
//! client certificate counts only from a `tls.trusted_proxies` address that also presents the
//! proxy secret; without a secret configured, forwarded certificates never count, while
//! forwarded addresses and TLS still do. (nginx sending the secret: `e2e/nginx.rs`.)

use std::net::{IpAddr, Ipv4Addr};

use agent::{ClientError, HttpTransport};
use gateway::server::PROXY_SECRET_HEADER;
use shared::ids::InstanceUid;
use tests::identity::{proxy_secret_header, trust_proxy, CsrIdentity, PROXY_SECRET};
use tests::{bearer, hello, TestServer};

/// The trusted proxy's address, and another loopback address that is not trusted.
const PROXY: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// An identity issued by `server`, whose certificate (public, as every certificate is) a forger
/// puts in the header.
async fn identity(server: &TestServer) -> anyhow::Result<CsrIdentity> {
    let ca = std::fs::read_to_string(server.dir.path().join("tls").join("ca.pem"))?;
    let token = server.api.token("proxied").await?;
    CsrIdentity::enroll(&server.wss_url(), &ca, &token).await
}

/// A plain-HTTP hello for `id` from `source` with `headers`: `Ok` when accepted, the body of a
/// 401 otherwise.
async fn hello_from(
    server: &TestServer,
    id: &CsrIdentity,
    source: IpAddr,
    headers: Vec<(String, String)>,
) -> anyhow::Result<Result<(), String>> {
    let mut http =
        HttpTransport::new(&server.http_url(), headers, false).with_source_ip(Some(source));
    match http.exchange(&hello(id.uid)).await {
        Ok(reply) => {
            anyhow::ensure!(reply.error_response.is_none(), "{:?}", reply.error_response);
            Ok(Ok(()))
        }
        Err(ClientError::Status {
            status: 401, body, ..
        }) => Ok(Err(body)),
        Err(e) => anyhow::bail!("expected 200 or 401, got {e}"),
    }
}

#[tokio::test]
async fn forwarded_certificate_needs_the_trusted_address_and_the_proxy_secret() -> anyhow::Result<()>
{
    let server = TestServer::start_with(|c| trust_proxy(c, &PROXY.to_string())).await?;
    let id = identity(&server).await?;
    let cert = id.proxy_header();
    let wrong = (PROXY_SECRET_HEADER.to_string(), format!("{PROXY_SECRET}x"));

    // Refused, each time for want of credentials: the header was not believed.
    for (what, source, headers) in [
        (
            "untrusted address with the secret",
            OTHER,
            vec![cert.clone(), proxy_secret_header()],
        ),
        (
            "trusted address without the secret",
            PROXY,
            vec![cert.clone()],
        ),
        (
            "trusted address with a wrong secret",
            PROXY,
            vec![cert.clone(), wrong],
        ),
    ] {
        match hello_from(&server, &id, source, headers).await? {
            Ok(()) => anyhow::bail!("{what}: a forged certificate header was accepted"),
            Err(body) => assert!(body.contains("Authorization"), "{what}: {body}"),
        }
    }
    // The trusted address with the secret: the header authenticates the agent.
    let accepted = hello_from(&server, &id, PROXY, vec![cert, proxy_secret_header()]).await?;
    assert_eq!(accepted, Ok(()), "the proxy's forwarded certificate");
    let uid = id.uid.to_string();
    server
        .api
        .wait_identity(&uid, &id.serial, "confirmed")
        .await?;
    server.stop().await
}

/// Trusted proxies without a secret (the safe default): forwarded certificates are refused,
/// forwarded TLS still lets a bootstrap token in.
#[tokio::test]
async fn without_a_proxy_secret_forwarded_certificates_are_refused() -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| {
        c.tls.trusted_proxies = vec![PROXY.to_string()];
        c.opamp.bootstrap_plaintext_allowed = false;
    })
    .await?;
    let id = identity(&server).await?;
    match hello_from(&server, &id, PROXY, vec![id.proxy_header()]).await? {
        Ok(()) => anyhow::bail!("a forwarded certificate was accepted without a proxy secret"),
        Err(body) => assert!(body.contains("Authorization"), "{body}"),
    }
    let token = server.api.token("forwarded-tls").await?;
    let mut headers = bearer(&token);
    headers.push(("X-Forwarded-Proto".into(), "https".into()));
    let mut http =
        HttpTransport::new(&server.http_url(), headers, false).with_source_ip(Some(PROXY));
    let reply = http.exchange(&hello(InstanceUid::new_v7())).await?;
    assert!(reply.error_response.is_none(), "{:?}", reply.error_response);
    server.stop().await
}
