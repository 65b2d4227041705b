//! The REST API's guard against hostile or careless callers: authentication and role before a
//! byte of the body is read, body size and time limits, the concurrency limit, API tokens
//! refused over plaintext from afar, names that Postgres cannot store, and the README's role
//! table as the server enforces it.
//!
//! The tests that must observe the server before the body is complete speak HTTP/1.1 over a raw
//! socket: an HTTP client library would not let a request stop half-way through its body.
//! How each refusal is counted is asserted in the serial metrics binary
//! (`tests/metrics/api.rs`).

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use shared::ids::InstanceUid;
use tests::{eventually, partial_post, Api, Fleet, TestServer, DEADLINE};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// How long a refusal may take to arrive. Before the guard, none arrived at all: the server
/// waited for the rest of the body.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// A response's status and head (lower-cased header lines), read within `within`.
async fn read_head(s: &mut TcpStream, within: Duration) -> anyhow::Result<(u16, String)> {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "connection closed before a response");
            buf.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no status line in {text:?}"))?;
        Ok((status, text.to_ascii_lowercase()))
    };
    tokio::time::timeout(within, read).await.map_err(|_| {
        anyhow::anyhow!("no response within {within:?}: the server waits for the body")
    })?
}

/// Creates an API token with `role`; returns a client holding it.
async fn api_token(server: &TestServer, name: &str, role: &str) -> anyhow::Result<Api> {
    let v = server
        .api
        .post("/api/v1/api-tokens", json!({ "name": name, "role": role }))
        .await?;
    let text = v["token"].as_str().unwrap_or_default().to_string();
    Ok(Api::new(server.addr, text))
}

#[tokio::test]
async fn a_tokenless_60_mb_post_is_refused_before_its_body_is_read() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let viewer = api_token(&server, "looker", "viewer").await?;
    let operator = api_token(&server, "deployer", "operator").await?;
    const BIG: usize = 60_000_000;

    // Headers plus 1 KiB of a declared 60 MB: the answer comes without the rest.
    for (path, token, want) in [
        ("/api/v1/configs", None, 401),
        ("/api/v1/configs", Some("amp-api.not-a-real-token"), 401),
        ("/api/v1/tokens", Some(viewer.token.as_str()), 403),
        ("/api/v1/tokens/batch", Some(operator.token.as_str()), 403),
        ("/api/v1/assignments", Some(viewer.token.as_str()), 403),
    ] {
        let mut s = partial_post(server.addr, path, token, BIG, 1024).await?;
        let (status, head) = read_head(&mut s, ANSWER_WITHIN).await?;
        assert_eq!(status, want, "{path} with {token:?}: {head}");
        assert!(
            head.contains("connection: close"),
            "the unread body is not drained: {head}"
        );
    }

    // Authenticated, but only config creation takes large bodies: 413 from the declared
    // length, still unread.
    let mut s = partial_post(
        server.addr,
        "/api/v1/assignments",
        Some(&server.api.token),
        BIG,
        1024,
    )
    .await?;
    let (status, head) = read_head(&mut s, ANSWER_WITHIN).await?;
    assert_eq!(status, 413, "{head}");
    let mut s = partial_post(
        server.addr,
        "/api/v1/configs",
        Some(&server.api.token),
        65 << 20,
        1024,
    )
    .await?;
    let (status, head) = read_head(&mut s, ANSWER_WITHIN).await?;
    assert_eq!(status, 413, "above api.max_config_body_bytes: {head}");

    // A large config within the config limit is still taken.
    let body = "k: ".to_string() + &"v".repeat(3 << 20) + "\n";
    server.api.config("large", &body).await?;
    server.stop().await
}

#[tokio::test]
async fn a_slow_body_is_cut_off_with_408() -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| c.api.body_timeout_secs = 1).await?;
    let mut s = partial_post(
        server.addr,
        "/api/v1/configs",
        Some(&server.api.token),
        1000,
        20,
    )
    .await?;
    let (status, head) = read_head(&mut s, ANSWER_WITHIN).await?;
    assert_eq!(status, 408, "{head}");
    assert!(head.contains("connection: close"), "{head}");
    // A body that arrives in time is fine.
    server.api.config("prompt", "a: 1\n").await?;
    server.stop().await
}

#[tokio::test]
async fn excess_concurrent_requests_get_503_with_retry_after() -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| c.api.max_concurrent_requests = 2).await?;
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();

    // Two authenticated requests whose bodies never finish hold both slots.
    let slow = [
        partial_post(
            server.addr,
            "/api/v1/configs",
            Some(&server.api.token),
            1000,
            10,
        )
        .await?,
        partial_post(
            server.addr,
            "/api/v1/configs",
            Some(&server.api.token),
            1000,
            10,
        )
        .await?,
    ];
    let resp = eventually("a request refused as busy", DEADLINE, || async {
        let resp = http
            .get(format!("{base}/api/v1/agents"))
            .bearer_auth(&server.api.token)
            .send()
            .await?;
        Ok((resp.status() == 503).then_some(resp))
    })
    .await?;
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    // Health and metrics are not the API: they keep answering.
    let live = http.get(format!("{base}/health/live")).send().await?;
    assert_eq!(live.status(), 200);

    // Closing the slow requests frees their slots.
    drop(slow);
    eventually("the API answering again", DEADLINE, || async {
        let (status, _) = server.api.raw(Method::GET, "/api/v1/agents", None).await?;
        Ok((status == 200).then_some(()))
    })
    .await?;
    server.stop().await
}

/// `GET /api/v1/agents` from 127.0.0.1 with `headers` added, as a proxy would send it.
async fn via_proxy(server: &TestServer, headers: &[(&str, &str)]) -> anyhow::Result<(u16, Value)> {
    let mut req = reqwest::Client::new()
        .get(format!("http://{}/api/v1/agents", server.addr))
        .bearer_auth(&server.api.token);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

#[tokio::test]
async fn api_tokens_over_plaintext_from_afar_are_refused() -> anyhow::Result<()> {
    // 127.0.0.1 plays a proxy in front of the server, so the client can be somewhere else.
    let server =
        TestServer::start_with(|c| c.tls.trusted_proxies = vec!["127.0.0.1".into()]).await?;
    let remote_plain = [("x-real-ip", "203.0.113.9"), ("x-forwarded-proto", "http")];
    let remote_tls = [("x-real-ip", "203.0.113.9"), ("x-forwarded-proto", "https")];

    let (status, v) = via_proxy(&server, &remote_plain).await?;
    assert_eq!(status, 403, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("https")),
        "{v}"
    );
    // Refused before the lookup: a made-up token gets the same answer.
    let resp = reqwest::Client::new()
        .get(format!("http://{}/api/v1/agents", server.addr))
        .bearer_auth("amp-api.made-up")
        .header("x-real-ip", "203.0.113.9")
        .send()
        .await?;
    assert_eq!(resp.status(), 403);

    // The proxy terminated TLS: fine. A local client, and this process's own calls: fine.
    assert_eq!(via_proxy(&server, &remote_tls).await?.0, 200);
    assert_eq!(
        via_proxy(&server, &[("x-real-ip", "127.0.0.1")]).await?.0,
        200
    );
    assert_eq!(via_proxy(&server, &[]).await?.0, 200);
    server.stop().await?;

    // Forwarding headers from an address that is not a trusted proxy claim nothing.
    let server = TestServer::start().await?;
    assert_eq!(
        via_proxy(&server, &remote_plain).await?.0,
        200,
        "peer is loopback"
    );
    server.stop().await?;

    // The setting allows it.
    let server = TestServer::start_with(|c| {
        c.tls.trusted_proxies = vec!["127.0.0.1".into()];
        c.api.token_plaintext_allowed = true;
    })
    .await?;
    assert_eq!(via_proxy(&server, &remote_plain).await?.0, 200);
    server.stop().await
}

/// The README's role table (`| `METHOD path`… | role |` rows under "### Roles") is what the
/// server enforces, and it lists every operation of the OpenAPI document.
#[tokio::test]
async fn the_readme_role_table_is_what_the_server_enforces() -> anyhow::Result<()> {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("### Roles")
        .nth(1)
        .and_then(|s| s.split("\n#").next())
        .ok_or_else(|| anyhow::anyhow!("README has no `### Roles` section"))?;
    let mut rows: Vec<(String, String, String)> = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (requests, role) = (cells[1], cells[2]);
        for req in requests.split('`').skip(1).step_by(2) {
            let (method, path) = req
                .split_once(' ')
                .ok_or_else(|| anyhow::anyhow!("`{req}` is not `METHOD path`"))?;
            rows.push((method.to_string(), path.to_string(), role.to_string()));
        }
    }
    anyhow::ensure!(
        rows.len() > 10,
        "README role table has only {} rows",
        rows.len()
    );

    let server = TestServer::start().await?;
    let doc = server.api.get("/api/v1/openapi.json").await?;
    for (path, ops) in doc["paths"].as_object().into_iter().flatten() {
        for method in ops.as_object().into_iter().flatten().map(|(m, _)| m) {
            let method = method.to_ascii_uppercase();
            assert!(
                rows.iter().any(|(m, p, _)| *m == method && p == path),
                "README role table lacks `{method} {path}`"
            );
        }
    }

    let roles = ["viewer", "operator", "admin"];
    let mut clients = Vec::new();
    for role in roles {
        clients.push((role, api_token(&server, &format!("as-{role}"), role).await?));
    }
    let rank = |r: &str| roles.iter().position(|x| *x == r);
    let uid = InstanceUid::new_v7().to_string();
    for (method, path, role) in &rows {
        let concrete = path
            .replace("{uid}", &uid)
            .replace("{id}", "nope")
            .replace("{serial}", "0abc")
            .replace("{name}", "nope")
            .replace("{action}", "pause");
        let method: Method = method.parse()?;
        let body = (method == Method::POST || method == Method::PUT).then(|| json!({}));
        for (who, api) in &clients {
            let (status, v) = api.raw(method.clone(), &concrete, body.clone()).await?;
            let allowed = match rank(role) {
                Some(need) => rank(who) >= Some(need),
                None => {
                    assert_eq!(role, "none", "unknown role `{role}` in the README");
                    true
                }
            };
            if allowed {
                assert!(
                    status != 401 && status != 403,
                    "{who} {method} {path}: README says allowed, got {status} {v}"
                );
            } else {
                assert_eq!(
                    status, 403,
                    "{who} {method} {path}: README says {role}: {v}"
                );
            }
        }
    }
    server.stop().await
}

/// Every name the API stores is checked: NUL (which Postgres text cannot hold) and other
/// control characters get 400 with the reason.
async fn nul_in_names_gives_400(api: &Api) -> anyhow::Result<()> {
    let config = |files: Value| json!({ "name": "ok", "files": files });
    let (config_id, _) = api.config("nul-check", "a: 1\n").await?;
    for (path, body, what) in [
        (
            "/api/v1/configs",
            json!({ "name": "a\u{0}b", "body": "a: 1\n" }),
            "name",
        ),
        (
            "/api/v1/configs",
            config(json!({ "x\u{0}.yaml": { "body": "a: 1\n", "content_type": "text/yaml" } })),
            "file name",
        ),
        (
            "/api/v1/configs",
            config(json!({ "x.yaml": { "body": "a: 1\n", "content_type": "text/\u{0}yaml" } })),
            "content type",
        ),
        (
            "/api/v1/configs",
            json!({ "name": "ok", "body": "a: 1\n", "content_type": "text/yaml\u{0}" }),
            "content type",
        ),
        (
            "/api/v1/assignments",
            json!({ "config_id": config_id, "labels": { "env\u{0}": "prod" } }),
            "label key",
        ),
        (
            "/api/v1/assignments",
            json!({ "config_id": config_id, "labels": { "env": "pr\u{0}od" } }),
            "label value",
        ),
        (
            "/api/v1/tokens",
            json!({ "name": "t", "scope": { "labels": { "k\u{0}": "v" } } }),
            "scope label key",
        ),
        ("/api/v1/tokens", json!({ "name": "t\u{0}" }), "name"),
    ] {
        let (status, v) = api.raw(Method::POST, path, Some(body.clone())).await?;
        assert_eq!(status, 400, "{path} {body}: {v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(what) && error.contains("control character"),
            "{path} {body}: the reason should name the {what}: {error}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn nul_in_names_gives_400_embedded() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    nul_in_names_gives_400(&server.api).await?;
    server.stop().await
}

#[tokio::test]
async fn nul_in_names_gives_400_on_postgres() -> anyhow::Result<()> {
    let cluster = tests::cluster::Cluster::start(0, 1, |_| {}).await?;
    nul_in_names_gives_400(cluster.api()).await?;
    cluster.stop().await
}
