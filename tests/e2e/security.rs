//! What a credential cannot be used for (the security review's agent-side findings): a spare
//! bootstrap token cannot take over an agent that exists, a refusal flood writes a bounded
//! number of audit rows, a revoked or expired token ends the sessions it opened (in a cluster
//! even when the revocation broadcast is lost), an agent cannot mint certificates at will, a
//! generated key is sent once, and a token's scope holds after it is bound.

use std::time::Instant;

use agent::{ClientError, HttpTransport, WsConnection};
use coordinator::config::Config;
use serde_json::{json, Value};
use shared::ids::InstanceUid;
use tests::identity::CsrIdentity;
use tests::{bearer, eventually, hello, Fleet, TestServer, DEADLINE};

/// AcceptsRemoteConfig | ReportsStatus.
const REMOTE_CONFIG_CAPS: u64 = 0x1 | 0x2;

fn described(uid: InstanceUid, caps: u64, labels: &[(&str, &str)]) -> proto::AgentToServer {
    let mut msg = tests::described(uid, labels);
    msg.capabilities = caps;
    msg
}

async fn audited(f: &impl Fleet, query: &str) -> anyhow::Result<Vec<Value>> {
    let v = f.api().get(&format!("/api/v1/audit?{query}")).await?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

async fn a_spare_token_cannot_take_over_an_existing_agent(f: &impl Fleet) -> anyhow::Result<()> {
    let victim = InstanceUid::new_v7();
    let victim_token = f.api().token("victim").await?;
    let mut real = HttpTransport::new(&f.http_url(), bearer(&victim_token), false);
    let first = real
        .exchange(&described(
            victim,
            REMOTE_CONFIG_CAPS,
            &[("service.name", "victim")],
        ))
        .await?;
    assert!(first.error_response.is_none(), "{:?}", first.error_response);
    let (config_id, _) = f.api().config("victim-only", "secret: 1\n").await?;
    f.api()
        .assign(json!({ "config_id": config_id, "agent": victim.to_string() }))
        .await?;

    // Someone who read the victim's UID somewhere presents it with a token of their own.
    let spare = f.api().token("spare").await?;
    let mut attacker = HttpTransport::new(&f.http_url(), bearer(&spare), false);
    let reply = attacker
        .exchange(&described(
            victim,
            REMOTE_CONFIG_CAPS,
            &[("service.name", "attacker")],
        ))
        .await?;
    assert!(
        reply.remote_config.is_none(),
        "the victim's config went to the spare token"
    );
    let moved = reply
        .agent_identification
        .as_ref()
        .and_then(|a| InstanceUid::from_slice(&a.new_instance_uid))
        .ok_or_else(|| anyhow::anyhow!("the spare token kept the victim's uid: {reply:?}"))?;
    assert_ne!(moved, victim);

    // The victim is untouched and keeps talking with its own token.
    let shown = f
        .api()
        .wait_agent(&victim.to_string(), "listed", |_| true)
        .await?;
    assert_eq!(
        shown["description"]["identifying"]["service.name"], "victim",
        "{shown}"
    );
    let mut again = described(victim, REMOTE_CONFIG_CAPS, &[("service.name", "victim")]);
    again.sequence_num = 1;
    let reply = real.exchange(&again).await?;
    assert!(reply.error_response.is_none(), "{:?}", reply.error_response);

    // The attempt is on record, with the claimed uid as a hint only.
    let rows = eventually("the attempt audited", DEADLINE, || async {
        let rows = audited(f, "reason=uid_taken").await?;
        Ok((!rows.is_empty()).then_some(rows))
    })
    .await?;
    assert!(
        rows.iter()
            .any(|r| r["detail"]["uid_hint"] == victim.to_string().as_str()
                && r["instance_uid"].is_null()),
        "{rows:?}"
    );
    Ok(())
}
both_modes!(
    a_spare_token_cannot_take_over_an_existing_agent,
    |_: &mut Config| {}
);

#[tokio::test]
async fn a_refusal_flood_writes_a_bounded_number_of_audit_rows() -> anyhow::Result<()> {
    const WINDOW_SECS: u64 = 2;
    let server = TestServer::start_with(|c| c.audit.refusal_window_secs = WINDOW_SECS).await?;
    let token = shared::token::new_bootstrap_token();
    let started = Instant::now();
    let mut refused = 0u64;
    for _ in 0..100 {
        let mut http = HttpTransport::new(&server.http_url(), bearer(&token), false);
        match http.exchange(&hello(InstanceUid::new_v7())).await {
            Err(ClientError::Status { status: 401, .. }) => refused += 1,
            Err(ClientError::Status { status: 429, .. }) => {}
            other => anyhow::bail!("an unknown token must be refused: {other:?}"),
        }
    }
    let windows = started.elapsed().as_secs() / WINDOW_SECS + 1;
    assert!(refused > 0, "nothing reached authentication");

    // Every refusal is counted in the rows (the first of a window, then the repeats)...
    let rows = eventually("the repeats summarised", DEADLINE, || async {
        let rows = audited(&server, "reason=unknown_token").await?;
        let counted: u64 = rows
            .iter()
            .filter(|r| r["source_ip"] == "127.0.0.1")
            .map(|r| r["detail"]["count"].as_u64().unwrap_or(0))
            .sum();
        Ok((counted == refused).then_some(rows))
    })
    .await?;
    // ...in a handful of rows, not one per attempt.
    assert!(
        rows.len() as u64 <= 2 * windows,
        "{} rows for {refused} refusals in {windows} windows",
        rows.len()
    );
    server.stop().await
}

async fn revoking_a_token_closes_its_sessions(f: &impl Fleet) -> anyhow::Result<()> {
    let created = f
        .api()
        .post("/api/v1/tokens", json!({ "name": "to-revoke" }))
        .await?;
    let token = created["token"].as_str().unwrap_or_default().to_string();
    let id = created["record"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut conn = WsConnection::connect(&f.ws_url(), &bearer(&token)).await?;
    conn.send(&hello(InstanceUid::new_v7())).await?;
    let reply = conn.recv().await?;
    assert!(reply.is_some_and(|r| r.error_response.is_none()));

    let (status, _) = f
        .api()
        .raw(
            reqwest::Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            None,
        )
        .await?;
    assert_eq!(status, 204);
    wait_closed(&mut conn, "revoked").await
}
both_modes!(revoking_a_token_closes_its_sessions, |_: &mut Config| {});

/// Waits for the server to close `conn`, with a reason that mentions `why`.
async fn wait_closed(conn: &mut WsConnection, why: &str) -> anyhow::Result<()> {
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            match conn.recv().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    anyhow::ensure!(closed.is_ok(), "the session is still open");
    let (_, reason) = conn.close_info().unwrap_or_default();
    anyhow::ensure!(reason.contains(why), "closed for {reason:?}, not {why}");
    Ok(())
}

#[tokio::test]
async fn an_expired_token_ends_its_session() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let created = server
        .api
        .post("/api/v1/tokens", json!({ "name": "short", "ttl_secs": 2 }))
        .await?;
    let token = created["token"].as_str().unwrap_or_default().to_string();
    let mut conn = WsConnection::connect(&server.ws_url(), &bearer(&token)).await?;
    conn.send(&hello(InstanceUid::new_v7())).await?;
    assert!(conn.recv().await?.is_some());
    wait_closed(&mut conn, "expired").await?;
    server.stop().await
}

#[tokio::test]
async fn a_lost_revocation_broadcast_is_caught_up_cluster() -> anyhow::Result<()> {
    let c = tests::cluster::Cluster::start(1, 2, |_| {}).await?;
    // A token created an hour ago, straight in the store: coordinators learn of it on first
    // use, and their re-reads of recently created tokens no longer cover it.
    let token = shared::token::new_bootstrap_token();
    let now = shared::now_ms();
    let record = shared::domain::TokenRecord {
        id: format!("old{}", InstanceUid::new_v7().to_string().replace('-', "")),
        name: "quiet-revoke".into(),
        prefix: shared::token::display_prefix(&token),
        hash: shared::token::hash_token(&token),
        created_ms: now - 3_600_000,
        expires_ms: now + 3_600_000,
        revoked_ms: None,
        redeemed_ms: None,
        bound_uid: None,
        scope: None,
    };
    let store = c.coordinator_of(0)?.store().clone();
    store.create_token(&record).await?;
    let mut conn = WsConnection::connect(&c.ws_url(), &bearer(&token)).await?;
    conn.send(&hello(InstanceUid::new_v7())).await?;
    assert!(conn
        .recv()
        .await?
        .is_some_and(|r| r.error_response.is_none()));
    // Revoked in the store behind every coordinator's back: no broadcast at all.
    assert!(store.revoke_token(&record.id, shared::now_ms()).await?);
    wait_closed(&mut conn, "revoked").await?;
    c.stop().await
}

#[tokio::test]
async fn an_agent_cannot_mint_certificates_at_will() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let token = server.api.token("minter").await?;
    let uid = InstanceUid::new_v7();
    let mut http = HttpTransport::new(&server.http_url(), bearer(&token), false);
    let csr_for = |key: &rcgen::KeyPair| -> anyhow::Result<String> {
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, uid.to_string());
        Ok(params.serialize_request(key)?.pem()?)
    };
    // The same key again and again: one certificate.
    let key = rcgen::KeyPair::generate()?;
    let csr = csr_for(&key)?;
    for seq in 0..5u64 {
        let mut msg = tests::identity::with_csr(tests::identity::hello(uid), csr.as_bytes());
        msg.sequence_num = seq;
        let reply = http.exchange(&msg).await?;
        assert!(reply.error_response.is_none(), "{:?}", reply.error_response);
    }
    let ids = server.api.identities_of(&uid.to_string()).await?;
    assert_eq!(ids.len(), 1, "one key, one certificate: {ids:?}");

    // A new key in every message: at most the per-agent limit.
    for seq in 5..15u64 {
        let csr = csr_for(&rcgen::KeyPair::generate()?)?;
        let mut msg = tests::identity::with_csr(tests::identity::hello(uid), csr.as_bytes());
        msg.sequence_num = seq;
        http.exchange(&msg).await?;
    }
    let ids = server.api.identities_of(&uid.to_string()).await?;
    assert_eq!(ids.len(), 3, "issuance is limited per agent: {ids:?}");
    server.stop().await
}

#[tokio::test]
async fn a_generated_key_is_sent_once() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let token = server.api.token("keyed").await?;
    let uid = InstanceUid::new_v7();
    let tls = server.client_tls()?;
    let offered = |reply: &proto::ServerToAgent| {
        reply
            .connection_settings
            .as_ref()
            .and_then(|c| c.opamp.as_ref())
            .and_then(|o| o.certificate.clone())
    };
    let mut seen_keys = Vec::new();
    for round in 0..2u64 {
        let mut conn = WsConnection::connect_tls(&server.wss_url(), &bearer(&token), &tls).await?;
        let mut msg = tests::identity::hello(uid);
        msg.sequence_num = round * 10;
        conn.send(&msg).await?;
        let reply = conn.recv().await?.unwrap_or_default();
        let cert = offered(&reply).ok_or_else(|| anyhow::anyhow!("no offer in round {round}"))?;
        assert!(
            !cert.private_key.is_empty(),
            "round {round}: a key is offered"
        );
        assert!(
            !seen_keys.contains(&cert.private_key),
            "a generated key was sent a second time"
        );
        seen_keys.push(cert.private_key);
        // Later messages on the connection carry no key (nor a repeat of the offer).
        msg.sequence_num += 1;
        msg.agent_description = None;
        conn.send(&msg).await?;
        let reply = conn.recv().await?.unwrap_or_default();
        assert!(offered(&reply).is_none_or(|c| c.private_key.is_empty()));
        conn.close(1000, "restart").await;
    }
    // Nowhere in the store either: no line of either key's body is in the database files.
    let mut stored = Vec::new();
    for file in ["ampora.db", "ampora.db-wal"] {
        if let Ok(bytes) = std::fs::read(server.dir.path().join(file)) {
            stored.extend(bytes);
        }
    }
    let stored = String::from_utf8_lossy(&stored);
    for key in &seen_keys {
        let body = String::from_utf8_lossy(key);
        let line = body
            .lines()
            .find(|l| !l.starts_with("-----") && l.len() > 40)
            .unwrap_or_default();
        assert!(
            !line.is_empty() && !stored.contains(line),
            "a key is stored"
        );
    }
    server.stop().await
}

async fn a_token_scope_holds_after_binding(f: &impl Fleet) -> anyhow::Result<()> {
    let scoped = f
        .api()
        .post(
            "/api/v1/tokens",
            json!({ "name": "dev-only", "scope": { "labels": { "env": "dev" } } }),
        )
        .await?;
    let scoped = scoped["token"].as_str().unwrap_or_default().to_string();
    let uid = InstanceUid::new_v7();
    let mut http = HttpTransport::new(&f.http_url(), bearer(&scoped), false);
    let reply = http
        .exchange(&described(uid, REMOTE_CONFIG_CAPS, &[("env", "dev")]))
        .await?;
    assert!(reply.error_response.is_none(), "{:?}", reply.error_response);

    let (config_id, _) = f.api().config("prod-secrets", "prod: true\n").await?;
    f.api()
        .assign(json!({ "config_id": config_id, "labels": { "env": "prod" } }))
        .await?;
    // Now it says it is prod.
    let mut msg = described(uid, REMOTE_CONFIG_CAPS, &[("env", "prod")]);
    msg.sequence_num = 1;
    let reply = http.exchange(&msg).await?;
    assert!(
        reply.remote_config.is_none(),
        "prod's config reached a dev-scoped agent"
    );
    let shown = f
        .api()
        .wait_agent(&uid.to_string(), "reports env=prod", |a| {
            a["description"]["identifying"]["env"] == "prod"
        })
        .await?;
    assert!(shown["assigned_config"].is_null(), "{shown}");

    // An unscoped agent saying the same is prod's.
    let token = f.api().token("unscoped").await?;
    let mut other = HttpTransport::new(&f.http_url(), bearer(&token), false);
    let reply = other
        .exchange(&described(
            InstanceUid::new_v7(),
            REMOTE_CONFIG_CAPS,
            &[("env", "prod")],
        ))
        .await?;
    assert!(
        reply.remote_config.is_some(),
        "the control agent got no config"
    );
    Ok(())
}
both_modes!(a_token_scope_holds_after_binding, |_: &mut Config| {});

#[tokio::test]
async fn only_a_token_minted_for_an_agent_re_bootstraps_it() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let ca = std::fs::read_to_string(server.dir.path().join("tls").join("ca.pem"))?;
    let first = server.api.token("first").await?;
    let id = CsrIdentity::enroll(&server.wss_url(), &ca, &first).await?;
    let uid = id.uid.to_string();
    id.connect(&server.wss_url(), &ca)
        .await?
        .close(1000, "done")
        .await;
    server
        .api
        .wait_identity(&uid, &id.serial, "confirmed")
        .await?;
    assert_eq!(server.api.revoke_identity(&id.serial).await?, 204);

    // A spare token is no way back in for that agent: its CSR names the agent, which the
    // spare token cannot speak for.
    let spare = server.api.token("spare").await?;
    let refused = CsrIdentity::enroll_as(id.uid, &server.wss_url(), &ca, &spare).await;
    assert!(
        refused.is_err(),
        "a spare token re-bootstrapped an existing agent"
    );

    // A token minted for it is.
    let created = server
        .api
        .post(
            "/api/v1/tokens",
            json!({ "name": "re-bootstrap", "instance_uid": uid }),
        )
        .await?;
    let minted = created["token"].as_str().unwrap_or_default().to_string();
    assert_eq!(created["record"]["bound_uid"], uid.as_str());
    let again = CsrIdentity::enroll_as(id.uid, &server.wss_url(), &ca, &minted).await?;
    assert_ne!(again.serial, id.serial);
    server.stop().await
}

async fn crl_der(server: &TestServer) -> anyhow::Result<Vec<u8>> {
    let url = format!("http://{}/api/v1/identities/crl", server.addr);
    Ok(reqwest::get(url).await?.bytes().await?.to_vec())
}

#[tokio::test]
async fn the_crl_is_signed_per_change_and_forgets_expired_certificates() -> anyhow::Result<()> {
    // Certificates that expire within the test.
    let server = TestServer::start_with(|c| c.tls.identity_validity_secs = 3).await?;
    let ca = std::fs::read_to_string(server.dir.path().join("tls").join("ca.pem"))?;
    // Unauthenticated callers get the same signed bytes, not a signature each.
    let (a, b) = (crl_der(&server).await?, crl_der(&server).await?);
    assert_eq!(a, b, "the CRL was signed again for a second request");

    let token = server.api.token("crl").await?;
    let id = CsrIdentity::enroll(&server.wss_url(), &ca, &token).await?;
    assert_eq!(server.api.revoke_identity(&id.serial).await?, 204);
    let listed = tests::identity::crl_serials(server.addr).await?;
    assert!(listed.contains(&id.serial), "a revocation shows at once");

    // Once the certificate has expired it fails validation anyway: it leaves the list.
    eventually(
        "the expired certificate leaves the CRL",
        DEADLINE,
        || async {
            let listed = tests::identity::crl_serials(server.addr).await?;
            Ok((!listed.contains(&id.serial)).then_some(()))
        },
    )
    .await?;
    server.stop().await
}

#[cfg(unix)]
#[tokio::test]
async fn the_data_directory_is_the_owners_only() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir()?;
    let data = root.path().join("data");
    let data_for_cfg = data.clone();
    let server = TestServer::start_with(move |c| c.server.data_dir = data_for_cfg).await?;
    let mode = |p: &std::path::Path| -> anyhow::Result<u32> {
        Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
    };
    assert_eq!(mode(&data)?, 0o700, "data directory");
    assert_eq!(mode(&data.join("ampora.db"))?, 0o600, "database");
    server.stop().await
}
