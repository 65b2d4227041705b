//! Agents' own telemetry on the embedded default: a group's settings are offered to its
//! agents for the signals they report (with each agent's own credential when Ampora is the
//! destination); the agent sends its Collector counters to Ampora's endpoint, and its rates
//! and minutes show in the API, on its page and on the Fleet page; anyone holding another
//! credential, or none, is refused and changes nothing.

use std::time::Duration;

use agent::own_metrics::CollectorCounters;
use agent::{Agent, AgentOptions, DEFAULT_CAPABILITIES};
use proto::agent_caps;
use reqwest::Method;
use serde_json::{json, Value};
use tests::{eventually, TestServer};

const WAIT: Duration = Duration::from_secs(20);

/// Markup in what an agent reports: the console must show it as text, never run it.
const HOSTILE: &str = "<img src=x onerror=\"window.__xss=1\">";

async fn collector(server: &TestServer, name: &str) -> anyhow::Result<(Agent, String)> {
    let token = server.api.token(name).await?;
    tests::connected_agent(AgentOptions {
        endpoint: server.ws_url(),
        token: Some(token),
        description: vec![("service.name".into(), "otelcol-contrib".into())],
        non_identifying: vec![
            ("env".into(), "prod".into()),
            ("host.name".into(), name.into()),
        ],
        capabilities: DEFAULT_CAPABILITIES
            | agent_caps::REPORTS_OWN_METRICS
            | agent_caps::REPORTS_CONNECTION_SETTINGS_STATUS,
        heartbeat: Duration::from_millis(200),
        ..AgentOptions::default()
    })
    .await
}

/// Exports until one is taken (one per second per agent is; earlier ones get 429).
async fn export(agent: &Agent, counters: CollectorCounters) -> anyhow::Result<()> {
    eventually("the export taken", WAIT, || async {
        let status = agent.export_own_metrics(&counters).await?;
        anyhow::ensure!(status == 200 || status == 429, "export answered {status}");
        Ok((status == 200).then_some(()))
    })
    .await
}

fn counters(accepted: u64, sent: u64, failed: u64) -> CollectorCounters {
    CollectorCounters {
        accepted: [accepted, 0, 0],
        sent: [sent, 0, 0],
        failed: [failed, 0, 0],
        queue_size: 7,
        ..Default::default()
    }
}

async fn telemetry(server: &TestServer, uid: &str) -> anyhow::Result<Value> {
    server
        .api
        .get(&format!("/api/v1/agents/{uid}/telemetry"))
        .await
}

/// A POST to the metrics endpoint with `authorization` (if any) and a valid body.
async fn post_as(server: &TestServer, authorization: Option<&str>) -> anyhow::Result<u16> {
    let body = proto::Message::encode_to_vec(&agent::own_metrics::export_request(&counters(
        1_000_000, 0, 1_000_000,
    )));
    let mut req = reqwest::Client::new()
        .post(format!("http://{}/v1/metrics", server.addr))
        .header("Content-Type", "application/x-protobuf")
        .body(body);
    if let Some(a) = authorization {
        req = req.header("Authorization", a);
    }
    Ok(req.send().await?.status().as_u16())
}

/// `ampora_gateway_own_metrics_total{outcome}` now.
async fn counted(server: &TestServer, outcome: &str) -> anyhow::Result<f64> {
    let text = server.api.metrics_text().await?;
    let series = format!("ampora_gateway_own_metrics_total{{outcome=\"{outcome}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// Group `prod` (agents labelled `env=prod`) with these own-telemetry settings.
async fn prod_group_with(server: &TestServer, settings: Value) -> anyhow::Result<()> {
    server
        .api
        .put_json(
            "/api/v1/groups/prod",
            json!({ "labels": { "env": "prod" } }),
        )
        .await?;
    server
        .api
        .put_json("/api/v1/groups/prod/telemetry", settings)
        .await?;
    Ok(())
}

#[tokio::test]
async fn own_metrics_are_offered_sent_to_ampora_and_shown_on_the_agent() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    prod_group_with(
        &server,
        json!({
            "metrics": { "ampora": true },
            "logs": { "endpoint": "https://logs.example/v1/logs", "headers": { "X-Key": "secret" } },
        }),
    )
    .await?;
    let read = server.api.get("/api/v1/groups/prod/telemetry").await?;
    assert_eq!(read["metrics"]["ampora"], true, "{read}");

    let (a, uid_a) = collector(&server, "a").await?;
    let (b, uid_b) = collector(&server, "b").await?;
    let offer = agent::wait_for(&mut a.status(), WAIT, |s| s.own_metrics.is_some())
        .await?
        .own_metrics
        .unwrap_or_default();
    assert_eq!(
        offer.endpoint,
        format!("http://{}/v1/metrics", server.addr),
        "Ampora's own endpoint"
    );
    let credential_a = offer
        .headers
        .iter()
        .find(|(k, _)| k == "Authorization")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(credential_a.starts_with("Bearer amp-om."), "{offer:?}");
    assert_eq!(
        a.status().borrow().own_signals_offered,
        ["metrics"],
        "logs are not offered to an agent that does not report its own logs"
    );
    let credential_b = agent::wait_for(&mut b.status(), WAIT, |s| s.own_metrics.is_some())
        .await?
        .own_metrics
        .and_then(|o| o.headers.into_iter().find(|(k, _)| k == "Authorization"))
        .map(|(_, v)| v)
        .unwrap_or_default();
    assert_ne!(
        credential_a, credential_b,
        "each agent has its own credential"
    );

    // The agent confirms the settings (ConnectionSettingsStatus), tracked by hash.
    let view = eventually("the settings confirmed", WAIT, || async {
        let v = telemetry(&server, &uid_a).await?;
        Ok((v["settings_confirmed"] == true).then_some(v))
    })
    .await?;
    assert_eq!(view["group"], "prod");
    assert_eq!(
        view["offered"],
        json!([
            { "signal": "metrics", "endpoint": "ampora", "declared": true },
            { "signal": "logs", "endpoint": "https://logs.example/v1/logs", "declared": false },
        ])
    );

    // An agent that cannot take them says so: shown with its error, escaped, not confirmed.
    let token = server.api.token("c").await?;
    let (c, uid_c) = tests::connected_agent(AgentOptions {
        endpoint: server.ws_url(),
        token: Some(token),
        description: vec![("service.name".into(), "otelcol-contrib".into())],
        non_identifying: vec![("env".into(), "prod".into())],
        capabilities: DEFAULT_CAPABILITIES
            | agent_caps::REPORTS_OWN_METRICS
            | agent_caps::REPORTS_CONNECTION_SETTINGS_STATUS,
        own_telemetry_fails: Some(format!("{HOSTILE} cannot reach the endpoint")),
        heartbeat: Duration::from_millis(200),
        ..AgentOptions::default()
    })
    .await?;
    let failed = eventually("the failure reported", WAIT, || async {
        let v = telemetry(&server, &uid_c).await?;
        Ok((v["settings_status"] == "FAILED").then_some(v))
    })
    .await?;
    assert_eq!(
        failed["settings_error"],
        format!("{HOSTILE} cannot reach the endpoint")
    );
    assert_eq!(failed["settings_confirmed"], false);

    // Two exports: the first sets the baseline, the second gives rates and a minute.
    export(&a, counters(1_000, 990, 0)).await?;
    export(&a, counters(1_600, 1_500, 30)).await?;
    let view = eventually("rates from two exports", WAIT, || async {
        let v = telemetry(&server, &uid_a).await?;
        Ok(v["rates"]["dropped_per_s"]
            .as_f64()
            .is_some_and(|d| d > 0.0)
            .then_some(v))
    })
    .await?;
    let points = view["points"].as_array().cloned().unwrap_or_default();
    let sum = |key: &str| {
        points
            .iter()
            .map(|p| p[key].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(
        (sum("accepted"), sum("sent"), sum("dropped")),
        (600, 510, 30),
        "{view}"
    );
    assert_eq!(
        points.last().map(|p| p["queue_size"].clone()),
        Some(json!(7))
    );
    assert!(view["rates"]["in_per_s"].as_f64().unwrap_or(0.0) > 0.0);

    // Anyone else is refused and changes nothing: no credential, a bootstrap token, B's
    // credential with A's uid put in it.
    let forged = credential_b.replacen(
        &credential_b[14..46],
        &hex::encode(uid_a.parse::<shared::ids::InstanceUid>()?.as_bytes()),
        1,
    );
    assert_ne!(forged, credential_b);
    let bootstrap = format!("Bearer {}", server.api.token("not-metrics").await?);
    let before = counted(&server, "unauthenticated").await?;
    for auth in [None, Some(bootstrap.as_str()), Some(forged.as_str())] {
        assert_eq!(post_as(&server, auth).await?, 401, "{auth:?}");
    }
    let after = telemetry(&server, &uid_a).await?;
    assert_eq!(
        after["points"], view["points"],
        "refused exports count nothing"
    );
    assert!(
        counted(&server, "unauthenticated").await? >= before + 3.0,
        "each refusal counted"
    );

    // The Fleet page: in / out / dropped per second, and the agents that drop data.
    let (http, cookie) =
        tests::browser::console_session(&format!("http://{}", server.addr), &server.api.token)
            .await?;
    let fleet = |query: &'static str| {
        let http = http.clone();
        let cookie = cookie.clone();
        let url = format!("http://{}/ui/{query}", server.addr);
        async move {
            let resp = http.get(url).header("Cookie", cookie).send().await?;
            anyhow::Ok(resp.text().await?)
        }
    };
    let dropping = fleet("?drops=true").await?;
    assert!(dropping.contains(&uid_a), "A drops data");
    assert!(!dropping.contains(&uid_b), "B sent nothing");
    let all = fleet("").await?;
    assert!(
        all.contains("Dropped") && all.contains("/s"),
        "the rate columns"
    );

    // The agent's page draws the minutes.
    let b_ = tests::browser::Browser::start().await?;
    crate::console::sign_in(&b_, &server, &server.api.token).await?;
    b_.goto(&format!("http://{}/ui/agents/{uid_a}", server.addr))
        .await?;
    let text = b_.text("#own-telemetry").await?;
    assert!(text.contains("prod") && text.contains("dropped"), "{text}");
    assert!(b_.has("#chart-dropped svg rect").await?, "the minute drawn");
    b_.client
        .execute(
            "document.getElementById('own-telemetry').scrollIntoView();",
            vec![],
        )
        .await?;
    b_.screenshot("53-agent-throughput").await?;
    b_.goto(&format!("http://{}/ui/?drops=true", server.addr))
        .await?;
    b_.screenshot("54-fleet-drops").await?;
    b_.goto(&format!("http://{}/ui/agents/{uid_c}", server.addr))
        .await?;
    let text = b_.text("#own-telemetry").await?;
    assert!(
        text.contains(&format!("failed to apply them: {HOSTILE} cannot reach")),
        "the agent's words, as text: {text}"
    );
    b_.no_markup_ran().await?;
    b_.close().await?;

    // Settings removed: the API says so and nothing is offered to new agents.
    let (status, _) = server
        .api
        .raw(
            Method::PUT,
            "/api/v1/groups/prod/telemetry",
            Some(json!({})),
        )
        .await?;
    assert_eq!(status, 200);
    assert_eq!(telemetry(&server, &uid_a).await?["group"], Value::Null);
    a.stop().await;
    b.stop().await;
    c.stop().await;
    server.stop().await
}

/// A Collector heartbeats every 30 s or more: the offer must come with the reply to its
/// first message (which shows the description its groups follow), not a heartbeat later.
#[tokio::test]
async fn the_offer_comes_with_the_first_reply() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    prod_group_with(&server, json!({ "metrics": { "ampora": true } })).await?;
    let token = server.api.token("slow").await?;
    let agent = Agent::start(AgentOptions {
        endpoint: server.ws_url(),
        token: Some(token),
        description: vec![("service.name".into(), "otelcol-contrib".into())],
        non_identifying: vec![("env".into(), "prod".into())],
        capabilities: DEFAULT_CAPABILITIES | agent_caps::REPORTS_OWN_METRICS,
        heartbeat: Duration::from_secs(3600),
        ..AgentOptions::default()
    });
    let s = agent::wait_for(&mut agent.status(), WAIT, |s| s.own_metrics.is_some()).await?;
    assert_eq!(s.replies, 1, "in the first reply: {s:?}");
    agent.stop().await;
    server.stop().await
}

#[tokio::test]
async fn bad_settings_and_unknown_groups_are_refused() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let (status, body) = server
        .api
        .raw(
            Method::PUT,
            "/api/v1/groups/none/telemetry",
            Some(json!({ "metrics": { "ampora": true } })),
        )
        .await?;
    assert_eq!(status, 404, "{body}");
    server
        .api
        .put_json("/api/v1/groups/g", json!({ "labels": { "env": "prod" } }))
        .await?;
    for bad in [
        json!({ "traces": { "ampora": true } }),
        json!({ "logs": { "endpoint": "ftp://x/v1/logs" } }),
        json!({ "metrics": { "endpoint": "https://x/v1/metrics", "headers": { "a:b": "c" } } }),
    ] {
        let (status, body) = server
            .api
            .raw(Method::PUT, "/api/v1/groups/g/telemetry", Some(bad.clone()))
            .await?;
        assert_eq!(status, 400, "{bad} → {body}");
    }
    server.stop().await
}

/// The agent's identity certificate is a credential too, and a revoked one is refused.
#[tokio::test]
async fn an_identity_certificate_exports_until_it_is_revoked() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let ca_pem = std::fs::read_to_string(server.dir.path().join("tls").join("ca.pem"))?;
    let token = server.api.token("cert").await?;
    let id = tests::identity::CsrIdentity::enroll(&server.wss_url(), &ca_pem, &token).await?;
    // Connected on its certificate, so its coordinator holds it.
    let conn = id.connect(&server.wss_url(), &ca_pem).await?;
    let offer = agent::OwnTelemetryOffer {
        endpoint: format!("https://{}/v1/metrics", server.addr),
        ..Default::default()
    };
    let send = |pass: u64| {
        let tls = id.client_tls(&ca_pem);
        let offer = offer.clone();
        async move {
            agent::own_metrics::export(&offer, &counters(100 * pass, 100 * pass, 0), Some(tls?))
                .await
                .map_err(anyhow::Error::from)
        }
    };
    let uid = id.uid.to_string();
    eventually("an export on the certificate taken", WAIT, || async {
        let status = send(1).await?;
        anyhow::ensure!(status == 200 || status == 429, "answered {status}");
        Ok((status == 200).then_some(()))
    })
    .await?;
    let v = eventually("the export recorded", WAIT, || async {
        let v = telemetry(&server, &uid).await?;
        Ok(v["last_export_ms"].as_i64().map(|_| v))
    })
    .await?;
    assert_eq!(v["points"].as_array().map(Vec::len), Some(1), "{v}");

    assert_eq!(server.api.revoke_identity(&id.serial).await?, 204);
    // Refused at the handshake (the listener knows the revocation), or, through a proxy
    // that forwards the certificate, with 401.
    eventually("the revoked certificate refused", WAIT, || async {
        Ok(match send(2).await {
            Ok(status) => (status == 401).then_some(()),
            Err(e) => format!("{e:#}")
                .contains("CertificateRevoked")
                .then_some(()),
        })
    })
    .await?;
    let after = telemetry(&server, &uid).await?;
    assert_eq!(after["points"], v["points"], "nothing more recorded");
    conn.close(1000, "done").await;
    server.stop().await
}

/// Content type, content encoding, body, the status it must get, the outcome it is counted as.
type BadExport = (
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    u16,
    &'static str,
);

/// Bad exports with a valid credential: each gets a clear status and is counted under its
/// reason, and none reaches a coordinator.
#[tokio::test]
async fn bad_exports_are_refused_with_their_reason() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let key_hex = std::fs::read_to_string(server.dir.path().join("own-metrics.key"))?;
    let key: [u8; 32] = hex::decode(key_hex.trim())?
        .try_into()
        .map_err(|_| anyhow::anyhow!("a 32-byte key"))?;
    let key = shared::download_token::DownloadKey::new(key);
    let gzip = |bytes: &[u8]| -> anyhow::Result<Vec<u8>> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut gz, bytes)?;
        Ok(gz.finish()?)
    };
    let valid =
        proto::Message::encode_to_vec(&agent::own_metrics::export_request(&counters(1, 1, 0)));
    let cases: Vec<BadExport> = vec![
        (
            "application/json",
            None,
            b"{}".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "application/x-protobuf",
            Some("br"),
            valid.clone(),
            415,
            "unsupported_media_type",
        ),
        (
            "application/x-protobuf",
            None,
            vec![0xff; 64],
            400,
            "malformed",
        ),
        (
            "application/x-protobuf",
            Some("gzip"),
            b"not gzip".to_vec(),
            400,
            "malformed",
        ),
        (
            "application/x-protobuf",
            None,
            vec![0; (4 << 20) + 1024],
            413,
            "too_large",
        ),
        (
            "application/x-protobuf",
            Some("gzip"),
            gzip(&vec![0; 17 << 20])?,
            413,
            "too_large",
        ),
    ];
    let http = reqwest::Client::new();
    for (content_type, encoding, body, want, outcome) in cases {
        // A credential of its own for each: one export per agent per second is taken.
        let credential = shared::own_telemetry::MetricsCredential::mint(
            &key,
            shared::ids::InstanceUid::new_v7(),
        );
        let before = counted(&server, outcome).await?;
        let mut req = http
            .post(format!("http://{}/v1/metrics", server.addr))
            .header("Authorization", format!("Bearer {credential}"))
            .header("Content-Type", content_type)
            .body(body);
        if let Some(e) = encoding {
            req = req.header("Content-Encoding", e);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        assert_eq!(status, want, "{outcome}: {text}");
        assert!(!text.trim().is_empty(), "a reason is given");
        assert_eq!(
            counted(&server, outcome).await?,
            before + 1.0,
            "{outcome} counted"
        );
    }
    server.stop().await
}
