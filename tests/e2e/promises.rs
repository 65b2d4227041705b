//! README promises that no other test holds the server to (issue 19, "README promises with no
//! test"): behaviour, statuses, bodies and audit rows only (metric counts are the `metrics`
//! binary's). An unknown token's 401 and its audit row; 503 + `Retry-After`, never a 401, while
//! the store does not answer (cluster); a scoped token and a first message without a
//! description; `identity_mismatch`; foreign and unknown client certificates; the audit rows of
//! assignments, token revocations and identity confirmations with their actors; a gateway
//! started after a revocation refusing the certificate at once (cluster); 429 from a cluster
//! gateway; no CRL without an agent CA (cluster).

use std::time::{Duration, Instant};

use agent::{ClientError, ClientTls, ConnectError, HttpTransport, WsConnection};
use proto::v1::ServerErrorResponseType;
use proto::Message as _;
use rustls::AlertDescription;
use serde_json::{json, Value};
use shared::ids::InstanceUid;
use tests::cluster::Cluster;
use tests::identity::{handshake_alert, CsrIdentity, TlsFiles};
use tests::{bearer, described, eventually, hello, Api, Fleet, TestServer, DEADLINE};

/// A refusal that needs the agent's first message is answered at once and the socket closed
/// after a hold: 1 s for a first refusal of a source and credential (README), plus room.
const HOLD_CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// A gateway reloads the revoked serials at start, then every 30 s: a gateway that refuses a
/// revoked certificate within this bound did not wait for its periodic reload (nor for a
/// broadcast, which it never heard: the revocation came before it started).
const REVOKED_AT_START_WITHIN: Duration = Duration::from_secs(3);

/// Every audit row matching `query` (`reason=…`, `actor=…`), oldest first, from the export.
async fn audit_rows(api: &Api, query: &str) -> anyhow::Result<Vec<Value>> {
    let (status, _, text) = api
        .get_text(&format!("/api/v1/audit/export?{query}"))
        .await?;
    anyhow::ensure!(status == 200, "audit export: {status} {text}");
    Ok(text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

/// Waits until the audit rows of `query` record `n` refusals (summing `detail.count`).
async fn refusals_audited(api: &Api, query: &str, n: u64) -> anyhow::Result<Vec<Value>> {
    eventually(
        &format!("{n} refusals audited ({query})"),
        DEADLINE,
        || async {
            let rows = audit_rows(api, query).await?;
            let counted = tests::refusals(&rows);
            anyhow::ensure!(
                counted <= n,
                "{counted} refusals audited, not {n}: {rows:?}"
            );
            Ok((counted == n).then_some(rows))
        },
    )
    .await
}

/// A plain-HTTP OpAMP request: its status, `Retry-After` and body (as text).
async fn post_opamp(
    url: &str,
    token: &str,
    msg: &proto::AgentToServer,
) -> anyhow::Result<(u16, Option<String>, String)> {
    let resp = reqwest::Client::new()
        .post(url)
        .header("Content-Type", "application/x-protobuf")
        .header("Authorization", format!("Bearer {token}"))
        .body(msg.encode_to_vec())
        .send()
        .await?;
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((resp.status().as_u16(), retry_after, resp.text().await?))
}

/// A `Retry-After` a client can honour: whole seconds, at least 1.
fn positive_secs(value: Option<&str>) -> bool {
    value
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|s| s >= 1)
}

/// Waits for the server to close `conn` (it may send nothing more first).
async fn closed_within(conn: &mut WsConnection, bound: Duration) -> anyhow::Result<()> {
    let closed = tokio::time::timeout(bound, async {
        while let Ok(Some(_)) = conn.recv().await {}
    })
    .await;
    anyhow::ensure!(closed.is_ok(), "still open after {bound:?}");
    Ok(())
}

fn ca_pem(server: &TestServer) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(
        server.dir.path().join("tls").join("ca.pem"),
    )?)
}

// ---- Bootstrap tokens -----------------------------------------------------------------------

#[tokio::test]
async fn an_unknown_token_gets_401_with_its_reason_and_is_audited() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    // Well-formed (its checksum right), so the gateway lets it through to a lookup.
    let token = shared::token::new_bootstrap_token();
    let uid = InstanceUid::new_v7();

    let (status, _, body) = post_opamp(&server.http_url(), &token, &hello(uid)).await?;
    assert_eq!(
        (status, body.as_str()),
        (401, "unknown token"),
        "plain HTTP"
    );
    match WsConnection::connect(&server.ws_url(), &bearer(&token)).await {
        Err(ConnectError::Status { status, body, .. }) => {
            assert_eq!((status, body.as_str()), (401, "unknown token"), "upgrade");
        }
        Err(e) => anyhow::bail!("the upgrade must get 401, got {e}"),
        Ok(_) => anyhow::bail!("an unknown token was let in"),
    }
    assert!(server.api.agent(&uid.to_string()).await?.is_none());

    // Both refusals on record (the first in a row of its own, the repeat in its window's
    // summary), from this source, with the token's display prefix and never its agent.
    let rows = refusals_audited(&server.api, "reason=unknown_token", 2).await?;
    let prefix = shared::token::display_prefix(&token);
    assert!(
        rows.iter().any(|r| tests::presented(r, "token", &prefix)),
        "the presented token is not named: {rows:?}"
    );
    for r in &rows {
        assert_eq!(r["action"], "auth.failed", "{r}");
        assert_eq!(r["source_ip"], "127.0.0.1", "{r}");
        assert!(r["instance_uid"].is_null(), "{r}");
    }
    server.stop().await
}

#[tokio::test]
async fn a_scoped_token_refuses_a_first_message_without_a_description() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let created = server
        .api
        .post(
            "/api/v1/tokens",
            json!({ "name": "scoped", "scope": { "labels": { "env": "prod" } } }),
        )
        .await?;
    let token = created["token"].as_str().unwrap_or_default().to_string();
    const SCOPE_REFUSED: &str = "agent description does not match the token scope";

    // Plain HTTP: the refusal is the status, 401, with the reason.
    let mut bare = hello(InstanceUid::new_v7());
    bare.agent_description = None;
    let (status, _, body) = post_opamp(&server.http_url(), &token, &bare).await?;
    assert_eq!((status, body.as_str()), (401, SCOPE_REFUSED), "plain HTTP");

    // WebSocket: admitted at the upgrade (the token is good), then an error for the first
    // message and the socket closed.
    let mut conn = WsConnection::connect(&server.ws_url(), &bearer(&token)).await?;
    let mut bare = hello(InstanceUid::new_v7());
    bare.agent_description = None;
    conn.send(&bare).await?;
    let reply = conn
        .recv()
        .await?
        .ok_or_else(|| anyhow::anyhow!("closed"))?;
    let err = reply
        .error_response
        .ok_or_else(|| anyhow::anyhow!("no error for a message without a description"))?;
    assert_eq!(
        err.r#type,
        ServerErrorResponseType::BadRequest as i32,
        "{err:?}"
    );
    assert_eq!(err.error_message, SCOPE_REFUSED);
    closed_within(&mut conn, HOLD_CLOSE_WITHIN).await?;

    // Audited as scope mismatches, both of them.
    refusals_audited(&server.api, "reason=scope_mismatch", 2).await?;

    // Neither refusal used the token up: an agent that describes itself in scope gets in.
    let uid = InstanceUid::new_v7();
    let mut http = HttpTransport::new(&server.http_url(), bearer(&token), false);
    let reply = http
        .exchange(&described(
            uid,
            &[("service.name", "in-scope"), ("env", "prod")],
        ))
        .await?;
    assert!(reply.error_response.is_none(), "{:?}", reply.error_response);
    server
        .api
        .wait_agent(&uid.to_string(), "listed", |_| true)
        .await?;
    server.stop().await
}

#[tokio::test]
async fn token_revocations_and_assignments_are_audited_with_their_actor() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let created = server
        .api
        .post("/api/v1/tokens", json!({ "name": "to-revoke" }))
        .await?;
    let token_id = created["record"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (status, body) = server
        .api
        .raw(
            reqwest::Method::DELETE,
            &format!("/api/v1/tokens/{token_id}"),
            None,
        )
        .await?;
    assert_eq!(status, 204, "{body}");

    let uid = InstanceUid::new_v7();
    let (config_id, _) = server.api.config("audited", "audited: 1\n").await?;
    let one = server
        .api
        .assign(json!({ "config_id": config_id, "agent": uid.to_string() }))
        .await?;
    let all = server
        .api
        .assign(json!({ "config_id": config_id, "all": true }))
        .await?;

    // The admin token's name is the actor of every change it made.
    let rows = audit_rows(&server.api, "actor=api%3Aadmin").await?;
    let revoked: Vec<_> = rows
        .iter()
        .filter(|r| r["action"] == "token.revoke")
        .collect();
    assert_eq!(revoked.len(), 1, "{rows:?}");
    assert_eq!(revoked[0]["detail"]["token_id"], token_id.as_str());
    let assigned: Vec<_> = rows
        .iter()
        .filter(|r| r["action"] == "config.assign")
        .collect();
    assert_eq!(assigned.len(), 2, "{rows:?}");
    for (row, assignment) in assigned.iter().zip([&one, &all]) {
        assert_eq!(row["detail"]["config_id"], config_id, "{row}");
        let id = &assignment["id"];
        let id = if id.is_null() {
            &assignment["assignment"]["id"]
        } else {
            id
        };
        assert_eq!(
            &row["detail"]["assignment_id"], id,
            "{row} for {assignment}"
        );
    }
    // The assignment to one agent names it; the one to all does not.
    assert_eq!(assigned[0]["instance_uid"], uid.to_string().as_str());
    assert!(assigned[1]["instance_uid"].is_null(), "{}", assigned[1]);
    server.stop().await
}

// ---- Agent identities -----------------------------------------------------------------------

#[tokio::test]
async fn an_identity_is_confirmed_on_record_and_cannot_speak_for_another_uid() -> anyhow::Result<()>
{
    let server = TestServer::start().await?;
    let ca = ca_pem(&server)?;
    let token = server.api.token("mtls").await?;
    let id = CsrIdentity::enroll(&server.wss_url(), &ca, &token).await?;
    let uid_text = id.uid.to_string();

    // Its first mTLS message confirms it, audited as the agent's doing.
    let conn = id.connect(&server.wss_url(), &ca).await?;
    conn.close(1000, "done").await;
    let confirm = eventually("identity.confirm audited", DEADLINE, || async {
        let rows = audit_rows(&server.api, &format!("instance_uid={uid_text}")).await?;
        Ok(rows.into_iter().find(|r| r["action"] == "identity.confirm"))
    })
    .await?;
    assert_eq!(confirm["actor"], "agent", "{confirm}");
    assert_eq!(confirm["detail"]["serial"], id.serial.as_str(), "{confirm}");
    assert_eq!(confirm["source_ip"], "127.0.0.1", "{confirm}");

    // The same certificate, a message about another agent: BadRequest, then closed.
    let other = InstanceUid::new_v7();
    let mut conn = WsConnection::connect_tls(&server.wss_url(), &[], &id.client_tls(&ca)?).await?;
    conn.send(&tests::identity::hello(other)).await?;
    let reply = conn
        .recv()
        .await?
        .ok_or_else(|| anyhow::anyhow!("closed"))?;
    let err = reply
        .error_response
        .ok_or_else(|| anyhow::anyhow!("another uid was accepted on the certificate"))?;
    assert_eq!(
        err.r#type,
        ServerErrorResponseType::BadRequest as i32,
        "{err:?}"
    );
    assert_eq!(
        err.error_message, "instance uid does not match the client certificate",
        "{err:?}"
    );
    closed_within(&mut conn, HOLD_CLOSE_WITHIN).await?;
    assert!(server.api.agent(&other.to_string()).await?.is_none());

    // Audited as identity_mismatch, naming the certificate and (as a hint) the uid claimed.
    let rows = refusals_audited(&server.api, "reason=identity_mismatch", 1).await?;
    assert!(
        tests::presented(&rows[0], "certificate", &id.serial),
        "{rows:?}"
    );
    assert_eq!(rows[0]["detail"]["uid_hint"], other.to_string().as_str());
    assert!(rows[0]["instance_uid"].is_null(), "{rows:?}");
    server.stop().await
}

#[tokio::test]
async fn foreign_and_unknown_client_certificates_are_refused() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let ca = ca_pem(&server)?;
    let validity = Duration::from_secs(3600);

    // From another CA: refused at the handshake, as an unknown issuer.
    let elsewhere = tempfile::tempdir()?;
    let other_ca = gateway::tls::LocalCa::new(elsewhere.path(), Vec::new());
    other_ca.ensure()?;
    let foreign = gateway::tls::AgentCa::from_files(&other_ca.ca_cert_path, &other_ca.ca_key_path)?
        .issue(InstanceUid::new_v7(), None, validity)?;
    let foreign_tls = ClientTls::from_ca_pem_with_identity(
        &ca,
        &foreign.cert_pem,
        foreign.private_key_pem.as_deref().unwrap_or_default(),
    )?;
    assert_eq!(
        handshake_alert(server.addr, &foreign_tls).await?,
        Some(AlertDescription::UnknownCA),
        "a certificate from another CA"
    );

    // From the agent CA itself, but never issued by Ampora: the handshake (which knows only the
    // CA and the revoked serials) completes, and the coordinator refuses it with a 401 at the
    // upgrade, audited with its serial.
    let dir = server.dir.path().join("tls");
    let uid = InstanceUid::new_v7();
    let unknown = gateway::tls::AgentCa::from_files(&dir.join("ca.pem"), &dir.join("ca-key.pem"))?
        .issue(uid, None, validity)?;
    let unknown_tls = ClientTls::from_ca_pem_with_identity(
        &ca,
        &unknown.cert_pem,
        unknown.private_key_pem.as_deref().unwrap_or_default(),
    )?;
    match WsConnection::connect_tls(&server.wss_url(), &[], &unknown_tls).await {
        Err(ConnectError::Status { status, body, .. }) => {
            assert_eq!((status, body.as_str()), (401, "client certificate revoked"));
        }
        Err(e) => anyhow::bail!("an unknown certificate must get 401 at the upgrade, got {e}"),
        Ok(_) => anyhow::bail!("a certificate Ampora never issued was let in"),
    }
    let mut http = HttpTransport::new_tls(&server.https_url(), Vec::new(), false, unknown_tls);
    match http.exchange(&tests::identity::hello(uid)).await {
        Err(ClientError::Status { status, .. }) => assert_eq!(status, 401),
        other => anyhow::bail!("plain HTTP with an unknown certificate: {other:?}"),
    }
    assert!(server.api.agent(&uid.to_string()).await?.is_none());
    let rows = refusals_audited(&server.api, "reason=identity_revoked", 2).await?;
    assert!(
        rows.iter()
            .any(|r| tests::presented(r, "certificate", &unknown.serial)),
        "{rows:?}"
    );
    server.stop().await
}

// ---- Cluster mode -----------------------------------------------------------------------------

/// Runs `sql` as the Postgres superuser of the tests (trust auth) on the admin database.
fn psql(sql: &str) -> anyhow::Result<()> {
    let admin = coordinator::store::postgres::test_admin_url();
    let out = std::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &admin, "-c", sql])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The sandbox's own database refuses connections while this lives (and every session it had
/// is ended): the store does not answer for its coordinators, and nobody else's database is
/// touched. Dropping it lets connections in again, also when the test fails half-way.
struct StoreOutage {
    database: String,
}

impl StoreOutage {
    fn begin(c: &Cluster) -> anyhow::Result<Self> {
        let url = &c.base.cluster.postgres_url;
        let database = url
            .split('?')
            .next()
            .and_then(|u| u.rsplit('/').next())
            .unwrap_or_default()
            .to_string();
        // Only a sandbox database (a name we splice into SQL: checked to be prefix and hex).
        anyhow::ensure!(
            database.starts_with("ampora_test_")
                && database["ampora_test_".len()..]
                    .chars()
                    .all(|ch| ch.is_ascii_hexdigit()),
            "not a sandbox database: {database:?}"
        );
        let this = Self { database };
        psql(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS false",
            this.database
        ))?;
        psql(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{}' AND pid <> pg_backend_pid()",
            this.database
        ))?;
        Ok(this)
    }

    fn end(self) -> anyhow::Result<()> {
        let sql = format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", self.database);
        std::mem::forget(self);
        psql(&sql)
    }
}

impl Drop for StoreOutage {
    fn drop(&mut self) {
        let _ = psql(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            self.database
        ));
    }
}

#[tokio::test]
async fn while_the_store_does_not_answer_agents_get_503_and_never_a_false_401_cluster(
) -> anyhow::Result<()> {
    let c = Cluster::start(1, 1, |_| {}).await?;
    // A good token the coordinator has not cached, so deciding on it needs the store: written
    // straight into the store, created an hour ago so that no re-read of recent tokens loads
    // it either.
    let token = shared::token::new_bootstrap_token();
    let now = shared::now_ms();
    let record = shared::domain::TokenRecord {
        id: format!("out{}", InstanceUid::new_v7().to_string().replace('-', "")),
        name: "outage".into(),
        prefix: shared::token::display_prefix(&token),
        hash: shared::token::hash_token(&token),
        created_ms: now - 3_600_000,
        expires_ms: now + 3_600_000,
        revoked_ms: None,
        redeemed_ms: None,
        bound_uid: None,
        scope: None,
    };
    let coordinator = c.coordinator_of(0)?;
    coordinator.store().create_token(&record).await?;
    assert!(
        !coordinator.token_cached(&record.hash),
        "the token must need a lookup"
    );

    let uid = InstanceUid::new_v7();
    // (psql runs for a moment on this test's thread; the nodes have runtimes of their own.)
    let outage = StoreOutage::begin(&c)?;
    // Plain HTTP: 503 with a Retry-After, not a 401 (the token may well be good).
    let (status, retry_after, body) = post_opamp(&c.http_url_of(0)?, &token, &hello(uid)).await?;
    assert_eq!(status, 503, "plain HTTP while the store is down: {body}");
    assert!(
        positive_secs(retry_after.as_deref()),
        "Retry-After {retry_after:?}"
    );
    // WebSocket: the same at the upgrade.
    match WsConnection::connect(&c.ws_url_of(0)?, &bearer(&token)).await {
        Err(ConnectError::Status {
            status,
            retry_after,
            body,
        }) => {
            assert_eq!(status, 503, "upgrade while the store is down: {body}");
            assert!(
                retry_after.is_some_and(|d| d >= Duration::from_secs(1)),
                "Retry-After {retry_after:?}"
            );
        }
        Err(e) => anyhow::bail!("the upgrade must get 503, got {e}"),
        Ok(_) => anyhow::bail!("admitted while the store cannot decide"),
    }
    outage.end()?;

    // The store answers again: the same token gets its agent in.
    eventually(
        "the token works once the store answers",
        DEADLINE,
        || async {
            let mut conn = match WsConnection::connect(&c.ws_url_of(0)?, &bearer(&token)).await {
                Ok(conn) => conn,
                Err(ConnectError::Status { status: 503, .. }) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            conn.send(&hello(uid)).await?;
            let reply = conn
                .recv()
                .await?
                .ok_or_else(|| anyhow::anyhow!("closed"))?;
            conn.close(1000, "done").await;
            match reply.error_response {
                None => Ok(Some(())),
                Some(e) if e.r#type == ServerErrorResponseType::Unavailable as i32 => Ok(None),
                Some(e) => anyhow::bail!("refused after the outage: {e:?}"),
            }
        },
    )
    .await?;
    c.api()
        .wait_agent(&uid.to_string(), "known", |_| true)
        .await?;
    c.stop().await
}

#[tokio::test]
async fn a_gateway_started_after_a_revocation_refuses_the_certificate_cluster() -> anyhow::Result<()>
{
    let files = TlsFiles::create()?;
    let mut c = Cluster::start(1, 1, |cfg| files.configure(cfg)).await?;
    let ca = files.ca_pem()?;
    let token = c.api().token("revoked-before-start").await?;
    let id = CsrIdentity::enroll(&c.wss_url_of(0)?, &ca, &token).await?;
    let tls = id.client_tls(&ca)?;
    assert_eq!(c.api().revoke_identity(&id.serial).await?, 204);

    // A gateway that was not running when the revocation was broadcast.
    let started = Instant::now();
    let fresh = c.add_gateway().await?;
    let addr = c.gateway_addr(fresh)?;
    let first = handshake_alert(addr, &tls).await?;
    let refused = eventually(
        "the new gateway refuses the revoked certificate",
        REVOKED_AT_START_WITHIN,
        || async {
            Ok(
                (handshake_alert(addr, &tls).await? == Some(AlertDescription::CertificateRevoked))
                    .then_some(()),
            )
        },
    )
    .await;
    assert!(
        refused.is_ok(),
        "not refused at the handshake within {REVOKED_AT_START_WITHIN:?} of its start \
         ({:?} elapsed; first handshake: {first:?})",
        started.elapsed()
    );
    assert_eq!(
        first,
        Some(AlertDescription::CertificateRevoked),
        "the very first handshake after the start"
    );
    c.stop().await
}

#[tokio::test]
async fn a_cluster_gateway_answers_429_with_retry_after_beyond_its_accept_rate(
) -> anyhow::Result<()> {
    const RATE: u64 = 1;
    const BURST: u64 = 3;
    const REQUESTS: usize = 30;
    let c = Cluster::start(1, 1, |cfg| {
        cfg.admission.max_connections = 0;
        cfg.admission.accept_rate_per_sec = RATE;
        cfg.admission.accept_burst = BURST;
        cfg.admission.warmup_secs = 0;
    })
    .await?;
    let started = Instant::now();
    let (http, ws) = (c.http_url_of(0)?, c.ws_url_of(0)?);
    let burst: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let (http, ws) = (http.clone(), ws.clone());
            tokio::spawn(async move {
                let token = shared::token::new_bootstrap_token();
                if i % 2 == 0 {
                    let (status, retry_after, body) =
                        post_opamp(&http, &token, &hello(InstanceUid::new_v7())).await?;
                    anyhow::Ok((status, positive_secs(retry_after.as_deref()), body))
                } else {
                    match WsConnection::connect(&ws, &bearer(&token)).await {
                        Err(ConnectError::Status {
                            status,
                            retry_after,
                            body,
                        }) => Ok((
                            status,
                            retry_after.is_some_and(|d| d >= Duration::from_secs(1)),
                            body,
                        )),
                        Err(e) => Err(e.into()),
                        Ok(_) => anyhow::bail!("an unknown token was let in"),
                    }
                }
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for b in burst {
        outcomes.push(b.await??);
    }
    let refill = RATE as f64 * started.elapsed().as_secs_f64();
    let mut throttled = 0;
    for (status, usable_retry_after, body) in &outcomes {
        match (status, body.as_str()) {
            (429, _) => {
                throttled += 1;
                assert!(usable_retry_after, "429 without a usable Retry-After");
            }
            // Admitted, and refused by authentication as it must be.
            (401, "unknown token") => {}
            other => anyhow::bail!("unexpected answer in the burst: {other:?}"),
        }
    }
    let admitted = REQUESTS - throttled;
    assert!(
        admitted as f64 <= BURST as f64 + refill + 1.0,
        "{admitted} of {REQUESTS} admitted with a burst of {BURST} and {refill:.1} refilled: \
         {outcomes:?}"
    );
    assert!(admitted >= 1, "nothing was admitted: {outcomes:?}");
    c.stop().await
}

#[tokio::test]
async fn without_an_agent_ca_there_is_no_crl_cluster() -> anyhow::Result<()> {
    let c = Cluster::start(0, 1, |_| {}).await?;
    let addr = c.coordinator_addr(0)?;
    for query in ["", "?format=pem"] {
        let resp = reqwest::get(format!("http://{addr}/api/v1/identities/crl{query}")).await?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await?;
        assert_eq!(status, 404, "CRL{query} without an agent CA: {body}");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("agent CA")),
            "{body}"
        );
    }
    c.stop().await
}

#[tokio::test]
async fn a_first_message_while_the_store_does_not_answer_is_told_to_retry_cluster(
) -> anyhow::Result<()> {
    let c = Cluster::start(1, 1, |_| {}).await?;
    // A token the coordinator has cached (created through its API): the upgrade needs no
    // store, but binding it to the agent does.
    let token = c.api().token("outage-redeem").await?;
    let uid = InstanceUid::new_v7();
    let mut conn = WsConnection::connect(&c.ws_url_of(0)?, &bearer(&token)).await?;
    let outage = StoreOutage::begin(&c)?;
    conn.send(&hello(uid)).await?;
    let reply = conn
        .recv()
        .await?
        .ok_or_else(|| anyhow::anyhow!("closed"))?;
    outage.end()?;
    let err = reply
        .error_response
        .ok_or_else(|| anyhow::anyhow!("answered as if bound while the store is down"))?;
    assert_eq!(
        err.r#type,
        ServerErrorResponseType::Unavailable as i32,
        "a false refusal while the store cannot decide: {err:?}"
    );
    // Not closed, not used up: a later message binds it once the store answers.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    for seq in 1.. {
        let mut msg = hello(uid);
        msg.sequence_num = seq;
        conn.send(&msg).await?;
        let reply = conn
            .recv()
            .await?
            .ok_or_else(|| anyhow::anyhow!("closed"))?;
        if reply.error_response.is_none() {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "still not bound after the outage: {:?}",
            reply.error_response
        );
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    c.stop().await
}

/// Between an agent's retries in [`a_first_message_while_the_store_does_not_answer_is_told_to_retry_cluster`].
const RETRY_PAUSE: Duration = Duration::from_millis(100);
