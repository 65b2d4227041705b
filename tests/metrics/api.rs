//! API requests refused before their handler ran (`ampora_api_requests_refused_total`), each
//! under its own reason: `unauthenticated`, `forbidden`, `body_too_large`, `body_timeout`,
//! `busy`, `plaintext_token`. The statuses, and that bodies stay unread, are e2e's
//! (`e2e/api_security.rs`).

use std::time::Duration;

use serde_json::json;
use tests::{partial_post, Api, TestServer, DEADLINE};

/// Between two polls of a bounded wait.
const POLL_PAUSE: Duration = Duration::from_millis(20);
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

use crate::{alone, expect_changes, series, snapshot};

const REFUSED: &str = "ampora_api_requests_refused_total";
const FAM: &[&str] = &[REFUSED];

fn refused(reason: &str) -> String {
    series(REFUSED, "reason", reason)
}

/// The status of the answer on `s`.
async fn status(s: &mut TcpStream) -> anyhow::Result<u16> {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "closed before a response");
            buf.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&buf).to_string();
        text.split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no status line in {text:?}"))
    };
    tokio::time::timeout(DEADLINE, read).await?
}

async fn api_token(server: &TestServer, name: &str, role: &str) -> anyhow::Result<Api> {
    let v = server
        .api
        .post("/api/v1/api-tokens", json!({ "name": name, "role": role }))
        .await?;
    Ok(Api::new(
        server.addr,
        v["token"].as_str().unwrap_or_default().to_string(),
    ))
}

#[tokio::test]
async fn refusals_by_credential_and_size_are_counted_each_under_its_reason() -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start().await?;
    let api = &server.api;
    let viewer = api_token(&server, "looker", "viewer").await?;
    let operator = api_token(&server, "deployer", "operator").await?;
    const BIG: usize = 60_000_000;
    let s = snapshot(api, FAM).await?;

    // No token and a made-up one: unauthenticated.
    for token in [None, Some("amp-api.not-a-real-token")] {
        let mut c = partial_post(server.addr, "/api/v1/configs", token, BIG, 1024).await?;
        assert_eq!(status(&mut c).await?, 401, "{token:?}");
    }
    let s = expect_changes(api, FAM, &s, &[(&refused("unauthenticated"), 2.0)]).await?;

    // A role short of the route's: forbidden.
    for (path, token) in [
        ("/api/v1/tokens", &viewer.token),
        ("/api/v1/tokens/batch", &operator.token),
        ("/api/v1/assignments", &viewer.token),
    ] {
        let mut c = partial_post(server.addr, path, Some(token), BIG, 1024).await?;
        assert_eq!(status(&mut c).await?, 403, "{path}");
    }
    let s = expect_changes(api, FAM, &s, &[(&refused("forbidden"), 3.0)]).await?;

    // Declared bodies above the route's limit: body_too_large.
    for (path, declared) in [("/api/v1/assignments", BIG), ("/api/v1/configs", 65 << 20)] {
        let mut c = partial_post(server.addr, path, Some(&api.token), declared, 1024).await?;
        assert_eq!(status(&mut c).await?, 413, "{path}");
    }
    let s = expect_changes(api, FAM, &s, &[(&refused("body_too_large"), 2.0)]).await?;

    // Accepted requests are no refusal.
    api.config("fine", "a: 1\n").await?;
    viewer.get("/api/v1/agents").await?;
    expect_changes(api, FAM, &s, &[]).await?;
    server.stop().await
}

#[tokio::test]
async fn a_slow_body_is_counted_as_body_timeout() -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start_with(|c| c.api.body_timeout_secs = 1).await?;
    let api = &server.api;
    let s = snapshot(api, FAM).await?;
    let mut c = partial_post(server.addr, "/api/v1/configs", Some(&api.token), 1000, 20).await?;
    assert_eq!(status(&mut c).await?, 408);
    expect_changes(api, FAM, &s, &[(&refused("body_timeout"), 1.0)]).await?;
    server.stop().await
}

#[tokio::test]
async fn a_request_beyond_the_concurrency_limit_is_counted_as_busy() -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start_with(|c| c.api.max_concurrent_requests = 2).await?;
    let api = &server.api;
    let s = snapshot(api, FAM).await?;
    // Two requests whose bodies never finish hold both slots.
    let mut slow = Vec::new();
    for _ in 0..2 {
        slow.push(partial_post(server.addr, "/api/v1/configs", Some(&api.token), 1000, 10).await?);
    }
    // Until the slots are taken a request is served; from then on it is refused. One 503.
    let http = reqwest::Client::new();
    let start = std::time::Instant::now();
    loop {
        let resp = http
            .get(format!("http://{}/api/v1/agents", server.addr))
            .bearer_auth(&api.token)
            .send()
            .await?;
        match resp.status().as_u16() {
            503 => break,
            200 => {}
            other => anyhow::bail!("unexpected status {other}"),
        }
        anyhow::ensure!(start.elapsed() < DEADLINE, "never refused as busy");
        tokio::time::sleep(POLL_PAUSE).await;
    }
    // /metrics is not the API: it answers while the slots are held.
    expect_changes(api, FAM, &s, &[(&refused("busy"), 1.0)]).await?;
    drop(slow);
    server.stop().await
}

#[tokio::test]
async fn an_api_token_over_plaintext_from_afar_is_counted_as_plaintext_token() -> anyhow::Result<()>
{
    let _alone = alone().await;
    // 127.0.0.1 plays a proxy in front of the server.
    let server =
        TestServer::start_with(|c| c.tls.trusted_proxies = vec!["127.0.0.1".into()]).await?;
    let api = &server.api;
    let url = format!("http://{}/api/v1/agents", server.addr);
    let http = reqwest::Client::new();
    let s = snapshot(api, FAM).await?;

    // A real token and a made-up one, from afar over plaintext: refused before the lookup.
    for token in [api.token.as_str(), "amp-api.made-up"] {
        let resp = http
            .get(&url)
            .bearer_auth(token)
            .header("x-real-ip", "203.0.113.9")
            .header("x-forwarded-proto", "http")
            .send()
            .await?;
        assert_eq!(resp.status(), 403, "{token}");
    }
    let s = expect_changes(api, FAM, &s, &[(&refused("plaintext_token"), 2.0)]).await?;

    // From afar over TLS terminated by the proxy: served, not counted.
    let resp = http
        .get(&url)
        .bearer_auth(&api.token)
        .header("x-real-ip", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    expect_changes(api, FAM, &s, &[]).await?;
    server.stop().await
}
