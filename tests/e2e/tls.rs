//! TLS on the agent port: one port for TLS and plaintext, the `OpAmp:BootstrapPlaintextAllowed`
//! rule, the local CA, certificate files reloaded without a restart, and handshake failures
//! that disturb no one else. (How the refusals and the failed handshakes are counted, by
//! reason: the `metrics` test binary.)

use std::net::SocketAddr;
use std::path::Path;

use agent::{
    wait_for, Agent, AgentOptions, ClientError, ClientTls, ConnectError, HttpTransport,
    WsConnection,
};
use coordinator::config::Config;
use rustls::pki_types::CertificateDer;
use serde_json::json;
use shared::ids::InstanceUid;
use tests::identity::{handshake_alert, Issued, TestCa};
use tests::{bearer, eventually, hello, Fleet, TestServer, DEADLINE};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const REFUSED: &str = "bootstrap over plaintext is not allowed";

fn agent(endpoint: String, token: String, tls: Option<ClientTls>) -> Agent {
    Agent::start(AgentOptions {
        endpoint,
        tls,
        token: Some(token),
        instance_uid: Some(InstanceUid::new_v7().0),
        description: vec![("service.name".into(), "tls-collector".into())],
        heartbeat: std::time::Duration::from_millis(200),
        ..AgentOptions::default()
    })
}

fn write_pair(dir: &Path, issued: &Issued) -> anyhow::Result<()> {
    // Key first, then the certificate, as a renewal script might: the server must not mind
    // the mismatched pair in between.
    std::fs::write(dir.join("key.pem"), &issued.key_pem)?;
    std::fs::write(dir.join("cert.pem"), &issued.chain_pem)?;
    Ok(())
}

/// The leaf certificate a fresh TLS connection to `addr` is shown.
async fn served_leaf(addr: SocketAddr, tls: &ClientTls) -> anyhow::Result<CertificateDer<'static>> {
    let stream = tls
        .handshake("localhost", TcpStream::connect(addr).await?)
        .await?;
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned();
    leaf.ok_or_else(|| anyhow::anyhow!("no server certificate"))
}

/// Pushes a config to `uid` and waits until the API shows it applied.
async fn push_and_wait_applied(f: &impl Fleet, uid: &str) -> anyhow::Result<()> {
    let (id, hash) = f.api().config("tls", "receivers: {}\n").await?;
    let res = f
        .api()
        .assign(json!({ "config_id": id, "agent": uid }))
        .await?;
    assert_eq!(res["matched_agents"], 1);
    let a = f
        .api()
        .wait_agent(uid, "config applied", |a| a["config_state"] == "applied")
        .await?;
    assert_eq!(a["remote_config"]["status"], "APPLIED");
    assert_eq!(a["remote_config"]["hash"], hash);
    Ok(())
}

#[tokio::test]
async fn bootstrap_tokens_are_refused_over_plaintext_and_accepted_over_tls() -> anyhow::Result<()> {
    // The shipped default, which the harness overrides for its plaintext agents.
    let server = TestServer::start_with(|c| {
        c.opamp.bootstrap_plaintext_allowed = Config::default().opamp.bootstrap_plaintext_allowed;
    })
    .await?;
    let token = server.api.token("tls-only").await?;

    match WsConnection::connect(&server.ws_url(), &bearer(&token)).await {
        Err(ConnectError::Status { status, body, .. }) => {
            assert_eq!((status, body.as_str()), (401, REFUSED));
        }
        other => anyhow::bail!("plaintext WebSocket bootstrap must get 401, got {other:?}"),
    }
    let mut http = HttpTransport::new(&server.http_url(), bearer(&token), false);
    match http.exchange(&hello(InstanceUid::new_v7())).await {
        Err(ClientError::Status { status, body, .. }) => {
            assert_eq!((status, body.as_str()), (401, REFUSED));
        }
        other => anyhow::bail!("plaintext HTTP bootstrap must get 401, got {other:?}"),
    }
    // Both refusals are audited: the first at once, the repeat in its window's summary.
    eventually("both refusals audited", DEADLINE, || async {
        let audit = server
            .api
            .get("/api/v1/audit?reason=plaintext_bootstrap")
            .await?;
        let from_here: Vec<serde_json::Value> = audit
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["source_ip"] == "127.0.0.1")
            .cloned()
            .collect();
        Ok((tests::refusals(&from_here) == 2).then_some(()))
    })
    .await?;

    // The same token over TLS, trusting the CA the server created in its data directory: the
    // refusals above did not burn it.
    let ca = server.dir.path().join("tls").join("ca.pem");
    assert!(ca.exists(), "the local CA is in <data_dir>/tls/ca.pem");
    let tls = ClientTls::from_ca_file(&ca)?;
    let a = agent(server.wss_url(), token, Some(tls.clone()));
    let s = wait_for(&mut a.status(), DEADLINE, |s| s.connected && s.replies > 0).await?;
    let uid = InstanceUid(s.instance_uid.expect("uid")).to_string();
    push_and_wait_applied(&server, &uid).await?;
    let s = wait_for(&mut a.status(), DEADLINE, |s| s.applied_configs >= 1).await?;
    assert!(s.last_error.is_none(), "{s:?}");

    // And the plain-HTTP transport over TLS.
    let token = server.api.token("tls-http").await?;
    let mut https = HttpTransport::new_tls(&server.https_url(), bearer(&token), false, tls);
    let uid = InstanceUid::new_v7();
    let reply = https.exchange(&hello(uid)).await?;
    assert_eq!(reply.instance_uid, uid.0.to_vec());
    assert!(reply.error_response.is_none(), "{reply:?}");

    a.stop().await;
    server.stop().await
}

#[tokio::test]
async fn plaintext_bootstrap_works_when_allowed() -> anyhow::Result<()> {
    // The harness allows it explicitly; TLS works on the same port all the same.
    let server = TestServer::start().await?;
    let plain = agent(server.ws_url(), server.api.token("plain").await?, None);
    wait_for(&mut plain.status(), DEADLINE, |s| {
        s.connected && s.replies > 0
    })
    .await?;
    let mut http = HttpTransport::new(
        &server.http_url(),
        bearer(&server.api.token("h").await?),
        false,
    );
    http.exchange(&hello(InstanceUid::new_v7())).await?;
    let tls = agent(
        server.wss_url(),
        server.api.token("tls").await?,
        Some(server.client_tls()?),
    );
    wait_for(&mut tls.status(), DEADLINE, |s| {
        s.connected && s.replies > 0
    })
    .await?;

    // Without client TLS settings a TLS endpoint is refused up front, never sent in clear: no
    // connection is attempted (not even one over ws:// after the TLS error), the token is not
    // redeemed, and the server never heard of the agent.
    let x = server
        .api
        .post("/api/v1/tokens", json!({ "name": "never-in-clear" }))
        .await?;
    let (x_token, x_id, x_prefix) = (
        x["token"].as_str().unwrap_or_default().to_string(),
        x["record"]["id"].as_str().unwrap_or_default().to_string(),
        x["record"]["prefix"]
            .as_str()
            .unwrap_or_default()
            .trim_end_matches('…')
            .to_string(),
    );
    assert!(!x_prefix.is_empty(), "{x}");
    let no_trust_uid = InstanceUid::new_v7();
    let no_trust = Agent::start(AgentOptions {
        endpoint: server.wss_url(),
        token: Some(x_token),
        instance_uid: Some(no_trust_uid.0),
        ..AgentOptions::default()
    });
    let mut st = no_trust.status();
    let s = wait_for(&mut st, DEADLINE, |s| s.last_error.is_some()).await?;
    assert!(!s.connected);
    // Stopping waits for the agent's task: whatever it was going to try, it has tried.
    no_trust.stop().await;
    let s = st.borrow().clone();
    assert_eq!(
        (
            s.connections_attempted,
            s.connections_established,
            s.replies
        ),
        (0, 0, 0),
        "{s:?}"
    );
    // What the server saw is settled by then: a fallback's frame would have had its answer.
    let tokens = server.api.get("/api/v1/tokens").await?;
    let record = tokens
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["id"] == x_id.as_str())
        .cloned()
        .unwrap_or_default();
    assert_eq!(record["id"], x_id.as_str(), "{tokens}");
    assert!(
        record["bound_uid"].is_null() && record["redeemed_ms"].is_null(),
        "the token stays unredeemed: {record}"
    );
    let uid_text = no_trust_uid.to_string();
    assert!(server.api.agent(&uid_text).await?.is_none());
    let agents = server.api.get("/api/v1/agents").await?;
    assert_eq!(
        agents.as_array().map(Vec::len),
        Some(3),
        "only the three agents above: {agents}"
    );
    let audit = server.api.get("/api/v1/audit?limit=1000").await?;
    let mentions: Vec<&serde_json::Value> = audit
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            let text = e.to_string();
            text.contains(&uid_text)
                || (e["action"] != "token.create"
                    && (text.contains(&x_id) || text.contains(&x_prefix)))
        })
        .collect();
    assert!(mentions.is_empty(), "{mentions:?}");
    plain.stop().await;
    tls.stop().await;
    server.stop().await
}

#[tokio::test]
async fn replaced_certificate_files_are_served_without_restart() -> anyhow::Result<()> {
    let files = tempfile::tempdir()?;
    let ca = TestCa::new()?;
    let first = ca.issue()?;
    write_pair(files.path(), &first)?;
    let (cert, key) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    let server = TestServer::start_with(|c| {
        c.tls.cert_file = cert.clone();
        c.tls.key_file = key.clone();
        c.tls.reload_interval_secs = 1;
        c.opamp.bootstrap_plaintext_allowed = false;
        // The Self-Agent must reach its own server over TLS with an operator's certificate.
        c.self_agent.enabled = true;
    })
    .await?;
    assert!(
        server
            .running
            .as_ref()
            .is_some_and(|r| r.tls_ca_cert.is_none()),
        "no local CA when files are configured"
    );
    assert!(!server.dir.path().join("tls").exists());
    let tls = ClientTls::from_ca_pem(&first.ca_pem)?;
    assert_eq!(served_leaf(server.addr, &tls).await?, first.leaf);

    let held = agent(
        server.wss_url(),
        server.api.token("held").await?,
        Some(tls.clone()),
    );
    let s = wait_for(&mut held.status(), DEADLINE, |s| {
        s.connected && s.replies > 0
    })
    .await?;
    let held_uid = InstanceUid(s.instance_uid.expect("uid")).to_string();

    let second = ca.issue()?;
    write_pair(files.path(), &second)?;
    eventually(
        "the replaced certificate on new connections",
        DEADLINE,
        || async { Ok((served_leaf(server.addr, &tls).await? == second.leaf).then_some(())) },
    )
    .await?;

    // The connection made before the swap carries on; new agents connect with the new one.
    push_and_wait_applied(&server, &held_uid).await?;
    let fresh = agent(
        server.wss_url(),
        server.api.token("fresh").await?,
        Some(tls),
    );
    wait_for(&mut fresh.status(), DEADLINE, |s| {
        s.connected && s.replies > 0
    })
    .await?;

    let listed = eventually("the Self-Agent connected over TLS", DEADLINE, || async {
        let agents = server.api.get("/api/v1/agents").await?;
        Ok(agents.as_array().and_then(|l| {
            l.iter()
                .find(|a| {
                    a["description"]["identifying"]["service.name"] == "ampora-self-agent"
                        && a["connected"] == true
                })
                .cloned()
        }))
    })
    .await?;
    assert!(listed["instance_uid"].is_string());
    held.stop().await;
    fresh.stop().await;
    server.stop().await
}

#[tokio::test]
async fn failed_handshakes_leave_the_server_serving() -> anyhow::Result<()> {
    let server = TestServer::start().await?;

    // Garbage after the TLS record byte.
    let mut garbage = TcpStream::connect(server.addr).await?;
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00])
        .await?;
    let _ = garbage.read_to_end(&mut Vec::new()).await;
    // A client that gives up half-way through its hello.
    let mut aborted = TcpStream::connect(server.addr).await?;
    aborted.write_all(&[0x16, 0x03, 0x01]).await?;
    drop(aborted);
    // A client that does not trust the server's certificate.
    let stranger = TestCa::new()?.issue()?;
    assert!(
        served_leaf(server.addr, &ClientTls::from_ca_pem(&stranger.ca_pem)?)
            .await
            .is_err()
    );

    // A client that trusts the server but presents a certificate from another CA than the
    // agent CA: the server refuses it at the handshake.
    let ca_pem = std::fs::read_to_string(server.dir.path().join("tls").join("ca.pem"))?;
    let foreign =
        ClientTls::from_ca_pem_with_identity(&ca_pem, &stranger.chain_pem, &stranger.key_pem)?;
    assert!(
        handshake_alert(server.addr, &foreign).await?.is_some(),
        "a foreign client certificate is refused at the handshake"
    );

    // Then TLS and plaintext agents connect as before.
    let a = agent(
        server.wss_url(),
        server.api.token("after").await?,
        Some(server.client_tls()?),
    );
    wait_for(&mut a.status(), DEADLINE, |s| s.connected && s.replies > 0).await?;
    let plain = agent(server.ws_url(), server.api.token("plain").await?, None);
    wait_for(&mut plain.status(), DEADLINE, |s| {
        s.connected && s.replies > 0
    })
    .await?;
    a.stop().await;
    plain.stop().await;
    server.stop().await
}

#[tokio::test]
async fn cluster_gateways_serve_tls_from_the_configured_files() -> anyhow::Result<()> {
    let files = tempfile::tempdir()?;
    let issued = TestCa::new()?.issue()?;
    write_pair(files.path(), &issued)?;
    let (cert, key) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    let c = tests::cluster::Cluster::start(1, 1, |c| {
        c.tls.cert_file = cert.clone();
        c.tls.key_file = key.clone();
        c.opamp.bootstrap_plaintext_allowed = false;
    })
    .await?;
    let tls = ClientTls::from_ca_pem(&issued.ca_pem)?;
    assert_eq!(served_leaf(c.gateway_addr(0)?, &tls).await?, issued.leaf);

    let token = c.api().token("gw-tls").await?;
    match WsConnection::connect(&c.ws_url_of(0)?, &bearer(&token)).await {
        Err(ConnectError::Status { status, .. }) => assert_eq!(status, 401),
        other => anyhow::bail!("plaintext bootstrap must get 401, got {other:?}"),
    }
    let wss = c.ws_url_of(0)?.replacen("ws://", "wss://", 1);
    let a = agent(wss, token, Some(tls));
    let s = wait_for(&mut a.status(), DEADLINE, |s| s.connected && s.replies > 0).await?;
    push_and_wait_applied(&c, &InstanceUid(s.instance_uid.expect("uid")).to_string()).await?;
    a.stop().await;
    c.stop().await
}
