//! Refused authentications: each reason counted on its own (`ampora_auth_failures_total`), each
//! refusal once as `ampora_opamp_frames_rejected_total{reason="auth_failed"}`.

use agent::{ClientError, ClientTls, ConnectError, HttpTransport, WsConnection};
use serde_json::json;
use shared::domain::TokenRecord;
use shared::ids::InstanceUid;
use tests::identity::{CsrIdentity, UNTRUSTED_HEADER};
use tests::{bearer, hello, TestServer};

use crate::{alone, auth_failure, expect_changes, rejected, snapshot, AUTH_FAILURES, REJECTED};

const FAMILIES: &[&str] = &[AUTH_FAILURES, REJECTED, UNTRUSTED_HEADER];

/// The status of a refused `wss://` upgrade.
async fn upgrade_refused(
    server: &TestServer,
    headers: &[(String, String)],
    tls: &ClientTls,
) -> anyhow::Result<u16> {
    match WsConnection::connect_tls(&server.wss_url(), headers, tls).await {
        Err(ConnectError::Status { status, .. }) => Ok(status),
        Err(e) => anyhow::bail!("unexpected connect error: {e}"),
        Ok(_) => anyhow::bail!("the upgrade with {headers:?} must be refused"),
    }
}

/// The status of a refused plain-HTTP exchange.
async fn exchange_refused(http: &mut HttpTransport, uid: InstanceUid) -> anyhow::Result<u16> {
    match http.exchange(&hello(uid)).await {
        Err(ClientError::Status { status, .. }) => Ok(status),
        other => anyhow::bail!("the exchange must be refused, got {other:?}"),
    }
}

/// A first frame that the server answers with an error and a close.
async fn first_frame_refused(
    url: &str,
    token: &str,
    tls: &ClientTls,
    msg: &proto::AgentToServer,
) -> anyhow::Result<()> {
    let mut ws = WsConnection::connect_tls(url, &bearer(token), tls).await?;
    ws.send(msg).await?;
    let reply = ws.recv().await?;
    anyhow::ensure!(
        reply.is_some_and(|r| r.error_response.is_some()),
        "the refusal is answered"
    );
    anyhow::ensure!(ws.recv().await?.is_none(), "then the connection closes");
    Ok(())
}

/// A token that expired a minute ago, written to the store directly (the API refuses to make
/// one): not in the coordinator's cache, so it is looked up.
async fn expired_token(server: &TestServer) -> anyhow::Result<String> {
    let text = shared::token::new_bootstrap_token();
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    let rec = TokenRecord {
        id: uuid::Uuid::now_v7().simple().to_string(),
        name: "expired".into(),
        prefix: shared::token::display_prefix(&text),
        hash: shared::token::hash_token(&text),
        created_ms: now - 120_000,
        expires_ms: now - 60_000,
        revoked_ms: None,
        redeemed_ms: None,
        bound_uid: None,
        scope: None,
    };
    let running = server.running.as_ref().expect("running");
    running.coordinator.store().create_token(&rec).await?;
    Ok(text)
}

/// One `auth_failed` rejection and one failure of `reason`, nothing else in the families.
fn refused(reason: &str) -> [(String, f64); 2] {
    [(auth_failure(reason), 1.0), (rejected("auth_failed"), 1.0)]
}

fn pairs(v: &[(String, f64)]) -> Vec<(&str, f64)> {
    v.iter().map(|(s, d)| (s.as_str(), *d)).collect()
}

#[tokio::test]
async fn each_refused_authentication_is_counted_under_its_own_reason() -> anyhow::Result<()> {
    let _alone = alone().await;
    // The shipped default for plaintext bootstrap (refused): everything else goes over TLS.
    let server = TestServer::start_with(|c| c.opamp.bootstrap_plaintext_allowed = false).await?;
    let tls = server.client_tls()?;
    let api = &server.api;
    let ca_pem = std::fs::read_to_string(server.dir.path().join("tls").join("ca.pem"))?;

    // Prepared before the first snapshot: an agent with a confirmed certificate (its
    // enrolment's garbage CSR is refused on purpose), a redeemed token, a revoked one.
    let enrolled_with = api.token("enrolled").await?;
    let id = CsrIdentity::enroll(&server.wss_url(), &ca_pem, &enrolled_with).await?;
    id.connect(&server.wss_url(), &ca_pem)
        .await?
        .close(1000, "done")
        .await;
    api.wait_identity(&id.uid.to_string(), &id.serial, "confirmed")
        .await?;
    let redeemed = api.token("redeemed").await?;
    let mut first =
        HttpTransport::new_tls(&server.https_url(), bearer(&redeemed), false, tls.clone());
    first.exchange(&hello(InstanceUid::new_v7())).await?;
    let revoked = api.post("/api/v1/tokens", json!({ "name": "r" })).await?;
    let (s, _) = api
        .raw(
            reqwest::Method::DELETE,
            &format!(
                "/api/v1/tokens/{}",
                revoked["record"]["id"].as_str().unwrap_or_default()
            ),
            None,
        )
        .await?;
    assert_eq!(s, 204);
    let revoked = revoked["token"].as_str().unwrap_or_default().to_string();
    let scoped = api
        .post(
            "/api/v1/tokens",
            json!({ "name": "scoped", "scope": { "labels": { "env": "prod" } } }),
        )
        .await?["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let expired = expired_token(&server).await?;

    let mut s = snapshot(api, FAMILIES).await?;

    // At the upgrade, one reason each.
    let cases: Vec<(&str, Vec<(String, String)>)> = vec![
        ("missing_credentials", vec![]),
        (
            "wrong_scheme",
            vec![("Authorization".into(), redeemed.clone())],
        ),
        ("malformed_token", bearer("amp-bs.aaaaaaaa.00000000")),
        (
            "unknown_token",
            bearer(&shared::token::new_bootstrap_token()),
        ),
        ("expired", bearer(&expired)),
        ("revoked", bearer(&revoked)),
    ];
    for (reason, headers) in cases {
        assert_eq!(
            upgrade_refused(&server, &headers, &tls).await?,
            401,
            "{reason}"
        );
        s = expect_changes(api, FAMILIES, &s, &pairs(&refused(reason)))
            .await
            .map_err(|e| e.context(reason))?;
    }

    // Already redeemed, by another agent: over HTTP (the uid is known up front) and on the
    // first frame of a WebSocket.
    let mut second =
        HttpTransport::new_tls(&server.https_url(), bearer(&redeemed), false, tls.clone());
    assert_eq!(
        exchange_refused(&mut second, InstanceUid::new_v7()).await?,
        401
    );
    s = expect_changes(api, FAMILIES, &s, &pairs(&refused("already_redeemed"))).await?;
    first_frame_refused(
        &server.wss_url(),
        &redeemed,
        &tls,
        &hello(InstanceUid::new_v7()),
    )
    .await?;
    s = expect_changes(api, FAMILIES, &s, &pairs(&refused("already_redeemed"))).await?;

    // A scoped token and an agent that does not match it: on the first frame, and over HTTP.
    let mut staging = hello(InstanceUid::new_v7());
    staging.agent_description = Some(proto::v1::AgentDescription {
        non_identifying_attributes: vec![proto::v1::KeyValue {
            key: "env".into(),
            value: Some(proto::v1::AnyValue {
                value: Some(proto::v1::any_value::Value::StringValue("staging".into())),
            }),
        }],
        ..Default::default()
    });
    first_frame_refused(&server.wss_url(), &scoped, &tls, &staging).await?;
    s = expect_changes(api, FAMILIES, &s, &pairs(&refused("scope_mismatch"))).await?;
    let mut http = HttpTransport::new_tls(&server.https_url(), bearer(&scoped), false, tls.clone());
    staging.instance_uid = InstanceUid::new_v7().0.to_vec();
    match http.exchange(&staging).await {
        Err(ClientError::Status { .. }) => {}
        Ok(reply) => assert!(reply.error_response.is_some(), "{reply:?}"),
        Err(e) => return Err(e.into()),
    }
    s = expect_changes(api, FAMILIES, &s, &pairs(&refused("scope_mismatch"))).await?;

    // The agent with a certificate presents its token again.
    match WsConnection::connect_tls(&server.wss_url(), &bearer(&enrolled_with), &tls).await {
        Err(ConnectError::Status { status, .. }) => assert_eq!(status, 401),
        Err(e) => return Err(e.into()),
        Ok(mut conn) => {
            conn.send(&hello(id.uid)).await?;
            let reply = conn.recv().await?;
            assert!(reply.is_none_or(|r| r.error_response.is_some()));
        }
    }
    s = expect_changes(api, FAMILIES, &s, &pairs(&refused("identity_required"))).await?;

    // A bootstrap token over plaintext, WebSocket and HTTP.
    match WsConnection::connect(&server.ws_url(), &bearer(&api.token("plain").await?)).await {
        Err(ConnectError::Status { status, .. }) => assert_eq!(status, 401),
        other => anyhow::bail!("plaintext bootstrap must get 401, got {other:?}"),
    }
    s = expect_changes(api, FAMILIES, &s, &pairs(&refused("plaintext_bootstrap"))).await?;
    let mut http = HttpTransport::new(
        &server.http_url(),
        bearer(&api.token("plain-http").await?),
        false,
    );
    assert_eq!(
        exchange_refused(&mut http, InstanceUid::new_v7()).await?,
        401
    );
    s = expect_changes(api, FAMILIES, &s, &pairs(&refused("plaintext_bootstrap"))).await?;

    // A client-certificate header from an address that is not a trusted proxy: ignored and
    // counted; without a token that is a refusal for missing credentials.
    let mut http = HttpTransport::new(&server.http_url(), vec![id.proxy_header()], false);
    assert_eq!(exchange_refused(&mut http, id.uid).await?, 401);
    let mut want = refused("missing_credentials").to_vec();
    want.push((UNTRUSTED_HEADER.to_string(), 1.0));
    expect_changes(api, FAMILIES, &s, &pairs(&want)).await?;

    server.stop().await
}
