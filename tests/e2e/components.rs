//! Available components and pre-flight checks on the embedded default: an agent reporting a
//! components hash the server does not know is asked for the whole set (once per build),
//! which the API shows; a config using an exporter one build lacks is refused for that
//! build's agents with the answer grouped by build, allowed for the others, and a forced
//! push is audited; a config whose YAML does not parse is refused with its line.

use std::collections::BTreeMap;
use std::time::Duration;

use agent::{Agent, AgentOptions};
use reqwest::Method;
use serde_json::{json, Value};
use tests::{eventually, TestServer};

const WAIT: Duration = Duration::from_secs(20);

/// A Collector that uses the kafka exporter when the `full` build has it.
const KAFKA: &str = "\
receivers:
  otlp: {}
exporters:
  kafka: {}
service:
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [kafka]
";

fn build(full: bool) -> BTreeMap<String, Vec<String>> {
    let mut exporters = vec!["debug".to_owned(), "otlp".to_owned()];
    if full {
        exporters.push("kafka".into());
    }
    BTreeMap::from([
        ("receivers".to_owned(), vec!["otlp".to_owned()]),
        ("exporters".to_owned(), exporters),
    ])
}

/// Starts a Collector-like agent of the `full` or lean build; waits until it is connected.
async fn collector(server: &TestServer, name: &str, full: bool) -> anyhow::Result<(Agent, String)> {
    let token = server.api.token(name).await?;
    tests::connected_agent(AgentOptions {
        endpoint: server.ws_url(),
        token: Some(token),
        description: vec![("service.name".into(), "otelcol-contrib".into())],
        capabilities: agent::DEFAULT_CAPABILITIES | proto::agent_caps::REPORTS_AVAILABLE_COMPONENTS,
        available_components: build(full),
        heartbeat: Duration::from_millis(500),
        ..AgentOptions::default()
    })
    .await
}

async fn components(server: &TestServer, uid: &str) -> anyhow::Result<Value> {
    server
        .api
        .get(&format!("/api/v1/agents/{uid}/components"))
        .await
}

/// Waits until the server holds the agent's component set.
async fn known(server: &TestServer, uid: &str) -> anyhow::Result<Value> {
    eventually("the component set stored", WAIT, || async {
        let v = components(server, uid).await?;
        Ok((!v["components"].is_null()).then_some(v))
    })
    .await
}

#[tokio::test]
async fn an_unknown_components_hash_is_asked_for_once_per_build() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let (first, uid) = collector(&server, "first", true).await?;
    let v = known(&server, &uid).await?;
    assert_eq!(
        v["components"]["exporters"],
        json!(["debug", "kafka", "otlp"])
    );
    assert_eq!(v["components"]["receivers"], json!(["otlp"]));
    // Asked at least once (again if its next report, sent before the set, had the hash only).
    assert!(first.status().borrow().components_requests >= 1);

    // Another agent of the same build reports only the hash: it is known, never asked.
    let (second, uid2) = collector(&server, "second", true).await?;
    let v2 = components(&server, &uid2).await?;
    assert_eq!(v2["components_hash"], v["components_hash"]);
    assert_eq!(v2["components"], v["components"]);
    assert_eq!(second.status().borrow().components_requests, 0);

    // The agent's page lists them by kind.
    let b = tests::browser::Browser::start().await?;
    crate::console::sign_in(&b, &server, &server.api.token).await?;
    b.goto(&format!("http://{}/ui/agents/{uid}", server.addr))
        .await?;
    let text = b.text("#components").await?;
    assert!(
        text.contains("exporters") && text.contains("kafka"),
        "{text}"
    );
    b.client
        .execute(
            "document.getElementById('components').scrollIntoView();",
            vec![],
        )
        .await?;
    b.screenshot("50-agent-components").await?;
    first.stop().await;
    second.stop().await;
    server.stop().await
}

#[tokio::test]
async fn a_config_using_a_component_a_build_lacks_is_refused_for_its_agents() -> anyhow::Result<()>
{
    let server = TestServer::start().await?;
    let (full, full_uid) = collector(&server, "full", true).await?;
    let (lean, lean_uid) = collector(&server, "lean", false).await?;
    known(&server, &full_uid).await?;
    known(&server, &lean_uid).await?;
    let (id, _) = server.api.config("kafka", KAFKA).await?;

    // Asked without pushing: one build passes, the lean one would fail.
    let check = server
        .api
        .post(
            &format!("/api/v1/configs/{id}/check"),
            json!({ "all": true }),
        )
        .await?;
    assert_eq!(
        (check["passing"].as_u64(), check["unchecked"].as_u64()),
        (Some(1), Some(0)),
        "{check}"
    );
    assert_eq!(check["failing"][0]["agents"], 1, "{check}");
    assert_eq!(
        check["failing"][0]["missing"],
        json!(["the `kafka` exporter"]),
        "{check}"
    );
    assert_eq!(check["failing"][0]["sample"], json!([lean_uid]), "{check}");

    // A push to every agent, and a rollout, are refused with that answer.
    let (status, body) = server
        .api
        .raw(
            Method::POST,
            "/api/v1/assignments",
            Some(json!({ "config_id": id, "all": true })),
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().is_some_and(
            |e| e.contains("would fail on 1 agent: their build lacks the `kafka` exporter")
        ),
        "{body}"
    );
    assert_eq!(body["preflight"]["failing"][0]["agents"], 1, "{body}");
    let (status, body) = server
        .api
        .raw(
            Method::POST,
            "/api/v1/rollouts",
            Some(json!({ "config_id": id, "all": true, "stages": "100%" })),
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        lean.status().borrow().applied_configs,
        0,
        "nothing reached the lean build"
    );

    // To the agent whose build has the exporter it goes.
    server
        .api
        .assign(json!({ "config_id": id, "agent": full_uid }))
        .await?;
    agent::wait_for(&mut full.status(), WAIT, |s| s.applied_configs == 1).await?;

    // Forced to everyone: allowed, and the audit log says so, with the answer.
    server
        .api
        .assign(json!({ "config_id": id, "all": true, "force": true }))
        .await?;
    let audit = server.api.get("/api/v1/audit?limit=200").await?;
    let row = audit
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["action"] == "config.preflight_forced")
        })
        .cloned()
        .unwrap_or_default();
    assert_eq!(row["detail"]["config_id"], id, "{audit}");
    assert_eq!(
        row["detail"]["preflight"]["failing"][0]["agents"], 1,
        "{audit}"
    );
    full.stop().await;
    lean.stop().await;
    server.stop().await
}

#[tokio::test]
async fn a_config_whose_yaml_does_not_parse_is_refused_with_its_line() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    // A tab where indentation is expected, on line 4.
    let body = "receivers:\n  otlp: {}\nexporters:\n\tdebug: {}\n";
    let new = |force: bool| json!({ "name": "broken", "body": body, "content_type": "text/yaml", "force": force });
    let (status, v) = server
        .api
        .raw(Method::POST, "/api/v1/configs", Some(new(false)))
        .await?;
    assert_eq!(status, 409, "{v}");
    let problem = &v["preflight"]["problems"][0];
    assert_eq!(problem["line"], 4, "{v}");
    assert!(
        problem["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("YAML does not parse")),
        "{v}"
    );
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("config:4:")),
        "{v}"
    );
    // Pipelines that name what the config does not define are refused the same way.
    let (status, v) = server
        .api
        .raw(
            Method::POST,
            "/api/v1/configs",
            Some(json!({ "name": "dangling", "body": KAFKA.replace("exporters: [kafka]", "exporters: [kafka/other]") })),
        )
        .await?;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("`kafka/other`")),
        "{v}"
    );

    // Forced, it is created, and the audit log records it as forced.
    let created = server.api.post("/api/v1/configs", new(true)).await?;
    let audit = server.api.get("/api/v1/audit?limit=200").await?;
    let row = audit
        .as_array()
        .and_then(|rows| {
            rows.iter().find(|r| {
                r["action"] == "config.create" && r["detail"]["config_id"] == created["id"]
            })
        })
        .cloned()
        .unwrap_or_default();
    assert_eq!(row["detail"]["forced"], true, "{audit}");
    server.stop().await
}

/// With `preflight.collector_binary`, a new version is also given to the Collector's own
/// `validate`: its error refuses the config, and so does a `validate` that does not finish in
/// time (it is killed).
#[tokio::test]
async fn a_collector_binarys_validate_error_refuses_the_config() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir()?;
    let binary = dir.path().join("otelcol");
    std::fs::write(
        &binary,
        "#!/bin/sh\n[ \"$1\" = validate ] || exit 2\nfor a in \"$@\"; do case \"$a\" in --config=*) f=\"${a#--config=}\";; esac; done\n\
         if grep -q nosuch \"$f\"; then echo 'Error: invalid configuration: receivers: unknown type: \"nosuch\"' >&2; exit 1; fi\n\
         if grep -q hang \"$f\"; then exec sleep 30; fi\nexit 0\n",
    )?;
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))?;
    let path = binary.clone();
    let server = TestServer::start_with(move |c| {
        c.preflight.collector_binary = path;
        c.preflight.validate_timeout_secs = 1;
    })
    .await?;
    let create = |name: &'static str, body: &'static str| {
        let server = &server;
        async move {
            server
                .api
                .raw(
                    Method::POST,
                    "/api/v1/configs",
                    Some(json!({ "name": name, "body": body })),
                )
                .await
        }
    };
    let (status, v) = create("unknown", "receivers: {nosuch: {}}\n").await?;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("collector validate failed")
                && e.contains("unknown type: \"nosuch\"")),
        "{v}"
    );
    let (status, v) = create("hangs", "hang: 1\n").await?;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("did not finish within 1 s")),
        "{v}"
    );
    let (status, v) = create("fine", "receivers: {otlp: {}}\n").await?;
    assert_eq!(status, 200, "{v}");
    server.stop().await
}
