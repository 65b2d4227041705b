//! Operator access and its record: API tokens with roles (and their revocation), the audit log
//! exported as JSON lines with every filter, and bootstrap tokens scoped to agent labels (in
//! the embedded default and in the cluster sandbox, where the coordinator that checks a scope
//! is often not the one that authenticated the agent).

use std::collections::BTreeSet;
use std::time::Duration;

use agent::{wait_for, Agent, AgentOptions};
use reqwest::Method;
use serde_json::{json, Value};
use shared::ids::InstanceUid;
use tests::{eventually, Api, Fleet, TestServer, DEADLINE};

/// One page of `GET {path_and_query}` (an export URL): its lines, parsed, and its `next` link.
async fn export_page(
    api: &Api,
    path_and_query: &str,
) -> anyhow::Result<(Vec<Value>, Option<String>)> {
    let (status, headers, text) = api.get_text(path_and_query).await?;
    anyhow::ensure!(status == 200, "{path_and_query}: {status} {text}");
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    anyhow::ensure!(
        content_type == "application/x-ndjson",
        "content type {content_type}"
    );
    let next = headers
        .get("link")
        .and_then(|v| v.to_str().ok())
        .map(|l| {
            l.strip_prefix('<')
                .and_then(|l| l.split_once(">; rel=\"next\""))
                .map(|(url, _)| url.to_string())
                .ok_or_else(|| anyhow::anyhow!("bad link header {l}"))
        })
        .transpose()?;
    anyhow::ensure!(
        text.is_empty() || text.ends_with('\n'),
        "every line ends with a newline"
    );
    let lines = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<Vec<Value>, _>>()?;
    Ok((lines, next))
}

/// The whole export for `query`, following `next` links.
async fn export_all(api: &Api, query: &str) -> anyhow::Result<Vec<Value>> {
    let mut all = Vec::new();
    let mut next = Some(format!("/api/v1/audit/export?{query}"));
    while let Some(path) = next {
        let (lines, link) = export_page(api, &path).await?;
        all.extend(lines);
        next = link;
    }
    Ok(all)
}

fn key(e: &Value) -> (i64, i64) {
    (
        e["at_ms"].as_i64().unwrap_or(i64::MIN),
        e["id"].as_i64().unwrap_or(i64::MIN),
    )
}

/// Creates an API token with `role`; returns its id and a client holding it.
async fn api_token(server: &TestServer, name: &str, role: &str) -> anyhow::Result<(String, Api)> {
    let v = server
        .api
        .post("/api/v1/api-tokens", json!({ "name": name, "role": role }))
        .await?;
    let text = v["token"].as_str().unwrap_or_default().to_string();
    anyhow::ensure!(text.starts_with("amp-api."), "token text in {v}");
    anyhow::ensure!(v["api_token"]["role"] == role, "{v}");
    let id = v["api_token"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok((id, Api::new(server.addr, text)))
}

async fn status(api: &Api, method: Method, path: &str, body: Option<Value>) -> u16 {
    match api.raw(method, path, body).await {
        Ok((s, _)) => s,
        Err(_) => 0,
    }
}

/// An agent named `collector-a` (identifying) in environment `env` (non-identifying).
fn agent_opts(endpoint: String, token: &str, uid: InstanceUid, env: &str) -> AgentOptions {
    AgentOptions {
        endpoint,
        token: Some(token.to_string()),
        instance_uid: Some(uid.0),
        description: vec![("service.name".into(), "collector-a".into())],
        non_identifying: vec![("env".into(), env.into())],
        heartbeat: Duration::from_millis(200),
        ..AgentOptions::default()
    }
}

#[tokio::test]
async fn roles_allow_what_they_should_and_revoked_tokens_get_401() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let (viewer_id, viewer) = api_token(&server, "auditor", "viewer").await?;
    let (_, operator) = api_token(&server, "deployer", "operator").await?;
    let (admin_id, admin) = api_token(&server, "second-admin", "admin").await?;

    // One endpoint of each class: read (viewer), change configs (operator), tokens (admin).
    let config = json!({ "name": "roles", "body": "a: 1\n" });
    let token = json!({ "name": "by-role" });
    for (who, api, read, change, tokens) in [
        ("viewer", &viewer, 200, 403, 403),
        ("operator", &operator, 200, 200, 403),
        ("admin", &admin, 200, 200, 200),
    ] {
        assert_eq!(
            status(api, Method::GET, "/api/v1/agents", None).await,
            read,
            "{who} reads"
        );
        assert_eq!(
            status(api, Method::GET, "/api/v1/audit/export", None).await,
            read,
            "{who} exports the audit log"
        );
        assert_eq!(
            status(api, Method::POST, "/api/v1/configs", Some(config.clone())).await,
            change,
            "{who} creates a config"
        );
        assert_eq!(
            status(api, Method::POST, "/api/v1/tokens", Some(token.clone())).await,
            tokens,
            "{who} creates a bootstrap token"
        );
        assert_eq!(
            status(api, Method::GET, "/api/v1/api-tokens", None).await,
            tokens,
            "{who} lists API tokens"
        );
        assert_eq!(
            status(
                api,
                Method::DELETE,
                &format!("/api/v1/api-tokens/{viewer_id}"),
                None
            )
            .await,
            if tokens == 200 { 204 } else { 403 },
            "{who} revokes an API token"
        );
        if tokens == 200 {
            // The admin just revoked the viewer: from now on the viewer gets 401.
            assert_eq!(
                status(&viewer, Method::GET, "/api/v1/agents", None).await,
                401
            );
        }
    }

    // The list shows no secrets, and the revocation.
    let list = server.api.get("/api/v1/api-tokens").await?;
    let listed = list.as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 4, "{list}");
    assert!(listed
        .iter()
        .all(|t| t.get("hash").is_none() && t.get("token").is_none()));
    let revoked: Vec<&Value> = listed
        .iter()
        .filter(|t| !t["revoked_ms"].is_null())
        .collect();
    assert_eq!(revoked.len(), 1, "{list}");
    assert_eq!(revoked[0]["name"], "auditor");

    // Names are never reused; the last admin cannot be revoked away.
    let (s, _) = server
        .api
        .raw(
            Method::POST,
            "/api/v1/api-tokens",
            Some(json!({ "name": "auditor", "role": "viewer" })),
        )
        .await?;
    assert_eq!(s, 400, "a revoked token's name is not reused");
    assert_eq!(
        status(
            &server.api,
            Method::DELETE,
            &format!("/api/v1/api-tokens/{admin_id}"),
            None
        )
        .await,
        204
    );
    assert_eq!(
        status(&admin, Method::GET, "/api/v1/agents", None).await,
        401
    );
    let first_admin = listed
        .iter()
        .find(|t| t["name"] == "admin")
        .and_then(|t| t["id"].as_str())
        .unwrap_or_default()
        .to_string();
    let (s, v) = server
        .api
        .raw(
            Method::DELETE,
            &format!("/api/v1/api-tokens/{first_admin}"),
            None,
        )
        .await?;
    assert_eq!(s, 400, "the last admin token stays: {v}");
    assert_eq!(
        status(&server.api, Method::DELETE, "/api/v1/api-tokens/nope", None).await,
        404
    );

    // Every change above is in the audit log under its actor.
    let all = export_all(&server.api, "").await?;
    let actions = |actor: &str| -> BTreeSet<String> {
        all.iter()
            .filter(|e| e["actor"] == actor)
            .filter_map(|e| e["action"].as_str().map(str::to_string))
            .collect()
    };
    let set = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        actions("api:admin"),
        set(&["api_token.create", "api_token.revoke"])
    );
    assert_eq!(actions("api:deployer"), set(&["config.create"]));
    assert_eq!(
        actions("api:second-admin"),
        set(&["config.create", "token.create", "api_token.revoke"])
    );
    assert!(actions("api:auditor").is_empty(), "reads are not audited");
    server.stop().await
}

#[tokio::test]
async fn export_is_json_lines_oldest_first_with_every_filter() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let (_, ops) = api_token(&server, "ops", "operator").await?;

    // Entries by several actors, with and without an agent and a reason.
    let (config_id, _) = ops.config("exported", "x: 1\n").await?;
    let token = server.api.token("export").await?;
    let agent_uid = InstanceUid::new_v7();
    let agent = Agent::start(agent_opts(server.ws_url(), &token, agent_uid, "test"));
    let mut st = agent.status();
    wait_for(&mut st, DEADLINE, |s| s.connected && s.replies > 0).await?;
    let uid = agent_uid.to_string();
    ops.assign(json!({ "config_id": config_id, "agent": uid }))
        .await?;
    let bogus = reqwest::Client::new()
        .post(server.http_url())
        .header("content-type", "application/x-protobuf")
        .bearer_auth("amp-bs.aaaaaaaa.00000000")
        .send()
        .await?;
    assert_eq!(bogus.status(), 401);
    let all = eventually(
        "the agent's redemption and the refusal audited",
        DEADLINE,
        || async {
            let all = export_all(&server.api, "").await?;
            let redeemed = all.iter().any(|e| e["action"] == "token.redeem");
            let refused = all.iter().any(|e| e["reason"] == "malformed_token");
            Ok((redeemed && refused).then_some(all))
        },
    )
    .await?;
    assert!(all.len() >= 6, "{all:?}");
    assert!(
        all.windows(2).all(|w| key(&w[0]) < key(&w[1])),
        "oldest first, each entry once"
    );

    // Each filter returns exactly the matching entries of the whole log, still in order.
    let check = |query: String, pred: Box<dyn Fn(&Value) -> bool>| {
        let want: Vec<Value> = all.iter().filter(|e| pred(e)).cloned().collect();
        let server = &server;
        async move {
            let got = export_all(&server.api, &query).await?;
            // Entries appended since `all` was read (the agent keeps talking) may follow.
            anyhow::ensure!(
                got.len() >= want.len() && got[..want.len()] == want[..],
                "{query}: want {want:?}, got {got:?}"
            );
            anyhow::ensure!(!want.is_empty(), "{query} matches something");
            anyhow::ensure!(got.iter().all(&pred), "{query}: {got:?}");
            Ok::<_, anyhow::Error>(())
        }
    };
    check(
        "actor=api%3Aops".into(),
        Box::new(|e: &Value| e["actor"] == "api:ops"),
    )
    .await?;
    check(
        format!("instance_uid={uid}"),
        Box::new({
            let uid = uid.clone();
            move |e: &Value| e["instance_uid"] == uid.as_str()
        }),
    )
    .await?;
    check(
        "reason=malformed_token".into(),
        Box::new(|e: &Value| e["reason"] == "malformed_token" && e["source_ip"] == "127.0.0.1"),
    )
    .await?;
    // A window from the redemption up to (not including) the refusal.
    let from = all
        .iter()
        .find(|e| e["action"] == "token.redeem")
        .map(key)
        .unwrap_or_default()
        .0;
    let to = all
        .iter()
        .find(|e| e["reason"] == "malformed_token")
        .map(key)
        .unwrap_or_default()
        .0;
    let window = format!("since_ms={from}&until_ms={to}");
    let got = export_all(&server.api, &window).await?;
    let want: Vec<Value> = all
        .iter()
        .filter(|e| (from..to).contains(&key(e).0))
        .cloned()
        .collect();
    assert_eq!(got, want, "{window}");

    // Paging: two entries a page, following the links, yields the same log.
    let paged = export_all(&server.api, "limit=2&until_ms=9000000000000").await?;
    assert_eq!(paged[..all.len()], all[..]);
    let (first, next) =
        export_page(&server.api, "/api/v1/audit/export?limit=2&actor=api%3Aops").await?;
    assert_eq!(first.len(), 2);
    let next = next.unwrap_or_default();
    assert!(
        next.contains("actor=api%3Aops") && next.contains("limit=2") && next.contains("after="),
        "the next link keeps the filters: {next}"
    );
    for bad in ["limit=0", "limit=10001", "after=x", "instance_uid=nope"] {
        let (s, _) = server
            .api
            .raw(Method::GET, &format!("/api/v1/audit/export?{bad}"), None)
            .await?;
        assert_eq!(s, 400, "{bad}");
    }
    drop(agent);
    server.stop().await
}

#[tokio::test]
async fn scoped_tokens_admit_matching_agents_only_embedded() -> anyhow::Result<()> {
    // How scope refusals are counted: the `metrics` test binary.
    let server = TestServer::start().await?;
    scoped_tokens(&server).await?;
    server.stop().await
}

#[tokio::test]
async fn scoped_tokens_admit_matching_agents_only_cluster() -> anyhow::Result<()> {
    let cluster = tests::cluster::Cluster::start(2, 2, |_| {}).await?;
    scoped_tokens(&cluster).await?;

    // An API token revoked through one coordinator is refused by the other at once: API
    // tokens are looked up in the shared store on every request.
    let (one, two) = (cluster.api_of(0)?, cluster.api_of(1)?);
    let v = one
        .post(
            "/api/v1/api-tokens",
            json!({ "name": "cluster-viewer", "role": "viewer" }),
        )
        .await?;
    let id = v["api_token"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut viewer = two.clone();
    viewer.token = v["token"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        status(&viewer, Method::GET, "/api/v1/agents", None).await,
        200
    );
    assert_eq!(
        status(
            &one,
            Method::DELETE,
            &format!("/api/v1/api-tokens/{id}"),
            None
        )
        .await,
        204
    );
    assert_eq!(
        status(&viewer, Method::GET, "/api/v1/agents", None).await,
        401
    );
    let revoked = export_all(&two, "actor=api%3Aadmin").await?;
    assert!(
        revoked.iter().any(|e| e["action"] == "api_token.revoke"),
        "{revoked:?}"
    );
    cluster.stop().await
}

async fn scoped_tokens(fleet: &impl Fleet) -> anyhow::Result<()> {
    let api = fleet.api();
    let scope = json!({ "labels": { "env": "prod", "service.name": "collector-a" } });
    let create = |scope: Value| {
        let api = api.clone();
        async move {
            let v = api
                .post(
                    "/api/v1/tokens",
                    json!({ "name": "scoped", "scope": scope }),
                )
                .await?;
            let text = v["token"].as_str().unwrap_or_default().to_string();
            let id = v["record"]["id"].as_str().unwrap_or_default().to_string();
            Ok::<_, anyhow::Error>((text, id))
        }
    };
    let (good, good_id) = create(scope.clone()).await?;
    let (bad_ws, bad_ws_id) = create(scope.clone()).await?;
    let (bad_http, _) = create(scope.clone()).await?;
    let (s, _) = api
        .raw(
            Method::POST,
            "/api/v1/tokens",
            Some(json!({ "scope": { "labels": {} } })),
        )
        .await?;
    assert_eq!(s, 400, "an empty scope is refused");
    let batch = api
        .post(
            "/api/v1/tokens/batch",
            json!({ "name": "scoped-batch", "count": 2, "scope": scope }),
        )
        .await?;
    assert_eq!(batch["tokens"].as_array().map(Vec::len), Some(2));
    let listed = api.get("/api/v1/tokens").await?;
    let scoped: Vec<&Value> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["scope"] == scope)
        .collect();
    assert_eq!(scoped.len(), 5, "the list shows every scope: {listed}");

    // A matching agent (one label identifying, one not) is admitted and bound.
    let good_uid = InstanceUid::new_v7();
    let agent = Agent::start(agent_opts(fleet.ws_url(), &good, good_uid, "prod"));
    let mut st = agent.status();
    wait_for(&mut st, DEADLINE, |s| s.connected && s.replies > 0).await?;
    let uid = good_uid.to_string();
    api.wait_agent(&uid, "connected", |a| a["connected"] == true)
        .await?;

    // Agents whose env does not match are refused, over WebSocket and HTTP alike.
    let (ws_uid, http_uid) = (InstanceUid::new_v7(), InstanceUid::new_v7());
    let ws_agent = Agent::start(agent_opts(fleet.ws_url(), &bad_ws, ws_uid, "staging"));
    let http_agent = Agent::start(agent_opts(fleet.http_url(), &bad_http, http_uid, "dev"));
    let (ws_uid, http_uid) = (ws_uid.to_string(), http_uid.to_string());
    for refused in [&ws_uid, &http_uid] {
        // Refusals name the agent they claimed to be as a hint, not as the row's agent.
        let entry = eventually("scope_mismatch audited", DEADLINE, || async {
            let got = export_all(api, "reason=scope_mismatch").await?;
            Ok(got
                .into_iter()
                .find(|e| tests::presented(e, "uid_hint", refused)))
        })
        .await?;
        assert!(entry["instance_uid"].is_null(), "{entry}");
        assert_eq!(entry["action"], "auth.failed");
        assert_eq!(entry["actor"], "agent");
        assert_eq!(entry["source_ip"], "127.0.0.1");
    }
    let mut ws_st = ws_agent.status();
    wait_for(&mut ws_st, DEADLINE, |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("scope"))
    })
    .await?;
    for uid in [&ws_uid, &http_uid] {
        let shown = api.agent(uid).await?;
        assert!(
            shown.is_none_or(
                |a| a["connected"] == false && a["description"]["identifying"] == json!({})
            ),
            "a refused agent is neither connected nor described"
        );
    }

    // A refusal does not use the token up; the matching agent's token is bound.
    let tokens = api.get("/api/v1/tokens").await?;
    let bound = |id: &str| {
        tokens
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["id"] == id)
            .map(|t| t["bound_uid"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(bound(&good_id), json!(uid));
    assert_eq!(bound(&bad_ws_id), Value::Null);
    drop((ws_agent, http_agent));

    // The scope is checked once, at binding: the bound agent reconnects with its token
    // whatever it reports now.
    agent.stop().await;
    api.wait_agent(&uid, "disconnected", |a| a["connected"] == false)
        .await?;
    let again = Agent::start(agent_opts(fleet.ws_url(), &good, good_uid, "moved"));
    let mut st = again.status();
    wait_for(&mut st, DEADLINE, |s| s.connected && s.replies > 0).await?;
    api.wait_agent(&uid, "reconnected", |a| {
        a["connected"] == true && a["description"]["non_identifying"]["env"] == "moved"
    })
    .await?;
    again.stop().await;
    Ok(())
}

both_modes!(agent_descriptions_are_audited, |_| {});

/// What an agent says it is lands in the audit log: its first description and every change,
/// with its source address and gateway; a reconnect that reports the same description adds
/// nothing.
async fn agent_descriptions_are_audited(fleet: &impl Fleet) -> anyhow::Result<()> {
    let api = fleet.api();
    let token = api.token("described").await?;
    let uid = InstanceUid::new_v7();
    let run = |name: &str| {
        let opts = AgentOptions {
            endpoint: fleet.ws_url(),
            token: Some(token.clone()),
            instance_uid: Some(uid.0),
            description: vec![("service.name".into(), name.into())],
            non_identifying: vec![("host.name".into(), "<b>h</b>".into())],
            ..AgentOptions::default()
        };
        Agent::start(opts)
    };
    let rows = |want: usize| {
        let path = format!("/api/v1/audit?instance_uid={uid}&actor=agent");
        async move {
            let v = api.get(&path).await?;
            let described: Vec<Value> = v
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["action"] == "agent.described")
                .cloned()
                .collect();
            Ok((described.len() >= want).then_some(described))
        }
    };

    for (name, want) in [("first-name", 1), ("first-name", 1), ("second-name", 2)] {
        let agent = run(name);
        let mut st = agent.status();
        wait_for(&mut st, DEADLINE, |s| s.connected && s.replies > 0).await?;
        if name == "second-name" {
            let described =
                eventually("the changed description audited", DEADLINE, || rows(want)).await?;
            // Newest first: the change, then the first description; the reconnect that said
            // the same thing again wrote no row.
            assert_eq!(described.len(), 2, "{described:?}");
            let (changed, first) = (&described[0], &described[1]);
            assert_eq!(first["detail"]["first"], true, "{first}");
            assert_eq!(changed["detail"]["first"], false, "{changed}");
            assert_eq!(
                first["detail"]["description"]["identifying"]["service.name"],
                "first-name"
            );
            assert_eq!(
                changed["detail"]["description"]["identifying"]["service.name"],
                "second-name"
            );
            assert_eq!(
                changed["detail"]["description"]["non_identifying"]["host.name"],
                "<b>h</b>"
            );
            for row in [first, changed] {
                assert_eq!(row["source_ip"], "127.0.0.1", "{row}");
                assert!(
                    row["detail"]["gateway"]
                        .as_str()
                        .is_some_and(|g| !g.is_empty()),
                    "{row}"
                );
            }
        } else {
            eventually("the first description audited", DEADLINE, || rows(want)).await?;
        }
        agent.stop().await;
    }
    Ok(())
}
