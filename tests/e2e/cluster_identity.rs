//! Agent identities in cluster mode: 2 gateways serving TLS and verifying agent certificates
//! against the agent CA, 2 coordinators signing them. An agent bootstraps through one gateway
//! and moves to mTLS on the other, after which its token is refused everywhere; a revocation
//! made on one coordinator reaches every gateway's handshake; plaintext bootstrap can be
//! refused without using the token up; the proxy header counts only from trusted addresses.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use agent::{Agent, AgentOptions, ClientError, ConnectError, HttpTransport, WsConnection};
use coordinator::config::Config;
use rustls::AlertDescription;
use shared::bus::AuthFailure;
use shared::ids::InstanceUid;
use tests::cluster::Cluster;
use tests::identity::{
    bearer, connected_on_certificate, crl_serials, handshake_alert, hello, proxy_secret_header,
    retired_for, trust_proxy, CsrIdentity, TlsFiles,
};
use tests::{eventually, http_until_served, ws_until_served, Fleet, DEADLINE};

/// How soon a revocation must be refused by every gateway: well under the gateways' periodic
/// reload of the revoked set (30 s), so only the broadcast can meet it.
const REVOCATION_SPREAD: Duration = Duration::from_secs(10);

/// The TLS-terminating proxy of the header test: a loopback address of its own, so the test
/// itself (on 127.0.0.1) is an untrusted sender.
const PROXY_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A sandbox of `gateways` gateways and 2 coordinators on `files`, with `tweak` applied.
async fn start(
    files: &TlsFiles,
    gateways: usize,
    tweak: impl FnOnce(&mut Config),
) -> anyhow::Result<Cluster> {
    Cluster::start(gateways, 2, |cfg| {
        files.configure(cfg);
        tweak(cfg);
    })
    .await
}

#[tokio::test]
async fn agent_bootstraps_on_one_gateway_moves_to_mtls_on_the_other_and_its_token_is_refused(
) -> anyhow::Result<()> {
    let files = TlsFiles::create()?;
    // Gateway 1 is bound before the coordinators start so that it is the endpoint they offer
    // with the certificate (as a balancer's would be): the agent moves there on mTLS.
    let gw1 = std::net::TcpListener::bind("127.0.0.1:0")?;
    let offered = format!("wss://{}/v1/opamp", gw1.local_addr()?);
    let mut c = start(&files, 1, |cfg| cfg.server.public_endpoint = offered).await?;
    c.add_gateway_on(gw1).await?;

    let token = c.api().token("identity").await?;
    let uid = InstanceUid::new_v7();
    let uid_text = uid.to_string();
    let agent = Agent::start(AgentOptions {
        endpoint: c.wss_url_of(0)?,
        tls: Some(files.client_tls()?),
        token: Some(token.clone()),
        instance_uid: Some(uid.0),
        description: vec![("service.name".into(), "cluster-identity".into())],
        accept_identity: true,
        ..AgentOptions::default()
    });
    let mut rx = agent.status();
    let serial = connected_on_certificate(&mut rx).await?;

    // On gateway 1 now, and nowhere else.
    c.api()
        .wait_agent(&uid_text, "connected through gw-1", |a| {
            a["connected"] == true && a["gateway"] == "gw-1"
        })
        .await?;
    eventually("the agent's one socket on gateway 1", DEADLINE, || async {
        Ok((c.gateway_connections(0) == 0 && c.gateway_connections(1) == 1).then_some(()))
    })
    .await?;
    // Confirmed by its first mTLS frame, as either coordinator tells.
    for i in 0..2 {
        let id = c
            .api_of(i)?
            .wait_identity(&uid_text, &serial, "confirmed")
            .await?;
        assert_eq!(id["instance_uid"], uid_text.as_str());
    }
    assert!(
        rx.borrow().connected,
        "still connected on its certificate: {:?}",
        rx.borrow().last_error
    );

    // The bootstrap token no longer admits it, through either gateway: a 401 at the upgrade
    // from whichever coordinator answers, once the confirmation's broadcast reached it; an
    // upgrade let through before that is refused on its first frame by the agent's owner.
    let tls = files.client_tls()?;
    for i in 0..2 {
        let url = c.wss_url_of(i)?;
        let refused = eventually(&format!("gw-{i}: 401 for the token"), DEADLINE, || async {
            match WsConnection::connect_tls(&url, &bearer(&token), &tls).await {
                Err(ConnectError::Status { status, body, .. }) => Ok(Some(Ok((status, body)))),
                Err(e) => Ok(Some(Err(format!("expected 401, got {e}")))),
                Ok(mut conn) => {
                    conn.send(&hello(uid)).await?;
                    let reply = conn.recv().await?;
                    Ok(reply
                        .is_some_and(|r| r.error_response.is_none())
                        .then(|| Err("admitted by its bootstrap token after mTLS".to_string())))
                }
            }
        })
        .await?;
        let (status, body) = refused.map_err(|e| anyhow::anyhow!("gw-{i}: {e}"))?;
        assert_eq!(status, 401, "gw-{i}: {body}");
        assert!(
            body.contains(AuthFailure::IdentityRequired.message()),
            "gw-{i}: {body}"
        );
    }
    // Both refusals are audited: the first at once, the repeat in its window's summary.
    let prefix = shared::token::display_prefix(&token);
    eventually("both refusals audited", DEADLINE, || async {
        let (status, _, lines) = c
            .api_of(1)?
            .get_text("/api/v1/audit/export?reason=identity_required")
            .await?;
        anyhow::ensure!(status == 200, "{lines}");
        let rows: Vec<serde_json::Value> = lines
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        // (More than two when a first try reached a coordinator that had not heard of the
        // confirmation yet and was refused at its first frame instead.)
        let named = rows.iter().any(|e| tests::presented(e, "token", &prefix));
        Ok((tests::refusals(&rows) >= 2 && named).then_some(()))
    })
    .await?;

    assert!(rx.borrow().connected, "the refusals leave the agent alone");
    agent.stop().await;
    c.stop().await
}

#[tokio::test]
async fn revocation_on_one_coordinator_closes_the_agent_and_every_gateway_refuses_its_handshake(
) -> anyhow::Result<()> {
    let files = TlsFiles::create()?;
    let c = start(&files, 2, |_| {}).await?;
    let ca = files.ca_pem()?;
    let token = c.api().token("revoke").await?;
    let id = CsrIdentity::enroll(&c.wss_url_of(0)?, &ca, &token).await?;
    let uid_text = id.uid.to_string();
    let mut conn = id.connect(&c.wss_url_of(1)?, &ca).await?;
    c.api()
        .wait_identity(&uid_text, &id.serial, "confirmed")
        .await?;
    // Until the revocation, every gateway completes the handshake with it.
    let tls = id.client_tls(&ca)?;
    for i in 0..2 {
        let alert = handshake_alert(c.gateway_addr(i)?, &tls).await?;
        assert_eq!(alert, None, "gw-{i} before the revocation");
    }

    // Revoked through the coordinator that does not hold the agent: the owner and the
    // gateways learn it from the bus.
    let other = 1 - c.owner_of(id.uid).await?;
    assert_eq!(c.api_of(other)?.revoke_identity(&id.serial).await?, 204);

    // The live connection (on gateway 1) is closed.
    let closed = tokio::time::timeout(REVOCATION_SPREAD, async {
        while let Ok(Some(_)) = conn.recv().await {}
    })
    .await;
    assert!(closed.is_ok(), "the revoked agent's connection must close");

    // Every gateway refuses the certificate at the TLS handshake (not with a 401 from a
    // coordinator after letting it through), and the OpAMP connection fails with it.
    for i in 0..2 {
        let addr = c.gateway_addr(i)?;
        eventually(
            &format!("gw-{i} refuses the handshake"),
            REVOCATION_SPREAD,
            || async {
                let alert = handshake_alert(addr, &tls).await?;
                Ok((alert == Some(AlertDescription::CertificateRevoked)).then_some(()))
            },
        )
        .await?;
        match id.connect(&c.wss_url_of(i)?, &ca).await {
            Err(e) => assert!(
                !matches!(
                    e.downcast_ref::<ConnectError>(),
                    Some(ConnectError::Status { .. })
                ),
                "gw-{i}: refused over HTTP, not at the handshake: {e}"
            ),
            Ok(_) => anyhow::bail!("gw-{i}: the revoked identity was let in"),
        }
    }
    let shown = c
        .api_of(1 - other)?
        .get(&format!("/api/v1/identities/{}", id.serial))
        .await?;
    assert_eq!(shown["state"], "revoked");
    // In the CRL of either coordinator.
    for i in 0..2 {
        let serials = crl_serials(c.coordinator_addr(i)?).await?;
        assert!(serials.contains(&id.serial), "coord-{i}: {serials:?}");
    }

    // Re-bootstrap: a new token minted for the same agent gets it a new certificate, which
    // works through every gateway while the old one stays refused.
    let created = c
        .api_of(1 - other)?
        .post(
            "/api/v1/tokens",
            serde_json::json!({ "name": "re-bootstrap", "instance_uid": uid_text }),
        )
        .await?;
    let token = created["token"].as_str().unwrap_or_default().to_string();
    let again = CsrIdentity::enroll_as(id.uid, &c.wss_url_of(1)?, &ca, &token).await?;
    assert_ne!(again.serial, id.serial);
    for i in 0..2 {
        let conn = again.connect(&c.wss_url_of(i)?, &ca).await?;
        conn.close(1000, "done").await;
    }
    c.api()
        .wait_identity(&uid_text, &again.serial, "confirmed")
        .await?;
    let alert = handshake_alert(c.gateway_addr(0)?, &tls).await?;
    assert_eq!(alert, Some(AlertDescription::CertificateRevoked));
    c.stop().await
}

/// A connection with `token` and the reply to agent `uid`'s first message.
async fn bootstrap(
    wss_url: &str,
    token: &str,
    tls: &agent::ClientTls,
    uid: InstanceUid,
) -> anyhow::Result<(WsConnection, proto::ServerToAgent)> {
    let mut conn = WsConnection::connect_tls(wss_url, &bearer(token), tls).await?;
    let reply = ws_until_served(&mut conn, &hello(uid)).await?;
    Ok((conn, reply))
}

/// The certificate and key of an offer made to an agent without a CSR.
fn offered_identity(reply: &proto::ServerToAgent) -> anyhow::Result<(String, String, String)> {
    let cert = reply
        .connection_settings
        .as_ref()
        .and_then(|c| c.opamp.as_ref())
        .and_then(|o| o.certificate.as_ref())
        .ok_or_else(|| anyhow::anyhow!("no certificate offered: {reply:?}"))?;
    let cert_pem = String::from_utf8(cert.cert.clone())?;
    let key_pem = String::from_utf8(cert.private_key.clone())?;
    anyhow::ensure!(
        !key_pem.is_empty(),
        "no CSR: the key comes with the certificate"
    );
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())?;
    let serial = shared::tls::serial_hex(pem.parse_x509()?.raw_serial());
    Ok((serial, cert_pem, key_pem))
}

#[tokio::test]
async fn an_unused_identity_is_revoked_when_a_coordinator_issues_another() -> anyhow::Result<()> {
    let files = TlsFiles::create()?;
    let mut c = start(&files, 1, |_| {}).await?;
    let ca = files.ca_pem()?;
    let tls = files.client_tls()?;
    let token = c.api().token("csr-less").await?;
    let uid = InstanceUid::new_v7();
    let uid_text = uid.to_string();

    // An agent without a CSR is offered a certificate with a generated key, and goes away
    // before it uses it.
    let (conn, reply) = bootstrap(&c.wss_url_of(0)?, &token, &tls, uid).await?;
    let (first, cert_pem, key_pem) = offered_identity(&reply)?;
    conn.close(1000, "restarting").await;

    // Its coordinator stops; the other one, which never offered it anything, takes it over
    // and, having no key to repeat, issues a new certificate when it comes back.
    c.stop_coordinator(c.owner_of(uid).await?).await?;
    c.settled().await?;
    let (mut conn, reply) = bootstrap(&c.wss_url_of(0)?, &token, &tls, uid).await?;
    let (second, _, _) = offered_identity(&reply)?;
    assert_ne!(second, first, "a new certificate");

    // The first is revoked, as superseded, and refused at the handshake; the agent stays on.
    c.api().wait_identity(&uid_text, &first, "revoked").await?;
    let live = c.api().identities_of(&uid_text).await?;
    let unrevoked: Vec<_> = live.iter().filter(|i| i["state"] != "revoked").collect();
    assert_eq!(unrevoked.len(), 1, "one live identity: {live:?}");
    assert_eq!(unrevoked[0]["serial"], second.as_str());
    let audit = c
        .api()
        .get(&format!("/api/v1/audit?instance_uid={uid_text}"))
        .await?;
    assert!(retired_for(&audit, &first, "superseded"), "{audit}");
    let old = agent::ClientTls::from_ca_pem_with_identity(&ca, &cert_pem, &key_pem)?;
    let gw = c.gateway_addr(0)?;
    eventually(
        "the superseded certificate refused",
        REVOCATION_SPREAD,
        || async {
            Ok(
                (handshake_alert(gw, &old).await? == Some(AlertDescription::CertificateRevoked))
                    .then_some(()),
            )
        },
    )
    .await?;
    let mut beat = hello(uid);
    beat.sequence_num = 1;
    let reply = ws_until_served(&mut conn, &beat).await?;
    assert!(reply.error_response.is_none(), "{reply:?}");
    c.stop().await
}

#[tokio::test]
async fn plaintext_bootstrap_is_refused_without_using_the_token_up() -> anyhow::Result<()> {
    let files = TlsFiles::create()?;
    let c = start(&files, 2, |cfg| {
        cfg.opamp.bootstrap_plaintext_allowed = false
    })
    .await?;
    let token = c.api().token("plain").await?;

    // ws:// through either gateway, and plain HTTP, carrying a uid: 401 before any
    // coordinator sees the token.
    for i in 0..2 {
        match WsConnection::connect(&c.ws_url_of(i)?, &bearer(&token)).await {
            Err(ConnectError::Status { status, body, .. }) => {
                assert_eq!(status, 401, "gw-{i}: {body}");
            }
            Err(e) => anyhow::bail!("gw-{i}: expected 401, got {e}"),
            Ok(conn) => {
                conn.close(1000, "done").await;
                anyhow::bail!("gw-{i}: a bootstrap token was accepted over plaintext");
            }
        }
    }
    let plain_uid = InstanceUid::new_v7();
    let mut http = HttpTransport::new(&c.http_url_of(1)?, bearer(&token), false);
    match http.exchange(&hello(plain_uid)).await {
        Err(ClientError::Status { status, .. }) => assert_eq!(status, 401),
        other => anyhow::bail!("plain HTTP: expected 401, got {other:?}"),
    }
    // Audited (the gateway tells a coordinator after answering, hence the wait).
    eventually("plaintext refusals audited", DEADLINE, || async {
        let v = c
            .api_of(1)?
            .get("/api/v1/audit?reason=plaintext_bootstrap")
            .await?;
        let rows = v.as_array().cloned().unwrap_or_default();
        Ok((tests::refusals(&rows) >= 3).then_some(()))
    })
    .await?;

    // The token still works over TLS, for an agent other than the one the HTTP attempt named
    // (so it was neither redeemed nor bound by it).
    let uid = InstanceUid::new_v7();
    let mut conn =
        WsConnection::connect_tls(&c.wss_url_of(0)?, &bearer(&token), &files.client_tls()?).await?;
    let reply = ws_until_served(&mut conn, &hello(uid)).await?;
    assert!(reply.error_response.is_none(), "{:?}", reply.error_response);
    c.api()
        .wait_agent(&uid.to_string(), "connected over wss", |a| {
            a["connected"] == true
        })
        .await?;
    assert!(c.api().agent(&plain_uid.to_string()).await?.is_none());
    conn.close(1000, "done").await;
    c.stop().await
}

#[tokio::test]
async fn proxy_header_authenticates_only_from_a_trusted_address() -> anyhow::Result<()> {
    let files = TlsFiles::create()?;
    let c = start(&files, 2, |cfg| trust_proxy(cfg, &PROXY_IP.to_string())).await?;
    let ca = files.ca_pem()?;
    let token = c.api().token("proxied").await?;
    let id = CsrIdentity::enroll(&c.wss_url_of(0)?, &ca, &token).await?;

    // From 127.0.0.1 (untrusted) the header is ignored (and counted: the `metrics` test
    // binary); without a token that is a 401.
    let mut http = HttpTransport::new(&c.http_url_of(1)?, vec![id.proxy_header()], false);
    match http.exchange(&hello(id.uid)).await {
        Err(ClientError::Status { status, .. }) => assert_eq!(status, 401),
        other => anyhow::bail!("expected 401, got {other:?}"),
    }

    // From the proxy's address, with its secret, the header alone authenticates (plain HTTP,
    // no token).
    let headers = vec![id.proxy_header(), proxy_secret_header()];
    let mut http =
        HttpTransport::new(&c.http_url_of(1)?, headers, false).with_source_ip(Some(PROXY_IP));
    let reply = http_until_served(&mut http, &hello(id.uid)).await??;
    assert!(reply.error_response.is_none(), "{:?}", reply.error_response);
    let uid_text = id.uid.to_string();
    c.api_of(1)?
        .wait_identity(&uid_text, &id.serial, "confirmed")
        .await?;
    c.api()
        .wait_agent(&uid_text, "known through gw-1", |a| a["gateway"] == "gw-1")
        .await?;
    c.stop().await
}
