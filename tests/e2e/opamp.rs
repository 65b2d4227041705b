//! The behaviour suite: agents over WebSocket and plain HTTP connect with a token, show up in
//! the API, receive pushed configs and report them applied. Every behaviour runs twice, against
//! the embedded default and against a cluster sandbox (2 gateways, 2 coordinators on the real
//! NATS, Redis and Postgres), which is what makes the two modes equivalent.

use agent::{wait_for, Agent, AgentOptions, AgentStatus};
use coordinator::config::Config;
use serde_json::{json, Value};
use shared::ids::InstanceUid;
use tests::{eventually, Fleet, TestServer, DEADLINE};

fn defaults(_: &mut Config) {}

fn seven_second_heartbeat(c: &mut Config) {
    c.opamp.heartbeat_interval_secs = 7;
}

/// A one-second heartbeat, offered to agents, is also the HTTP poll interval.
fn fast_heartbeat(c: &mut Config) {
    c.opamp.heartbeat_interval_secs = 1;
}

pub(crate) fn opts(endpoint: String, token: String, name: &str) -> AgentOptions {
    AgentOptions {
        endpoint,
        token: Some(token),
        instance_uid: Some(InstanceUid::new_v7().0),
        description: vec![
            ("service.name".into(), name.into()),
            ("service.version".into(), "1.2.3".into()),
        ],
        non_identifying: vec![("env".into(), "test".into())],
        // Frequent heartbeats so "the agent is still talking" can be waited on quickly.
        heartbeat: std::time::Duration::from_millis(200),
        ..AgentOptions::default()
    }
}

pub(crate) fn uid_of(s: &AgentStatus) -> String {
    s.instance_uid
        .map(|u| InstanceUid(u).to_string())
        .unwrap_or_default()
}

async fn wait_state(server: &impl Fleet, uid: &str, state: &str) -> anyhow::Result<Value> {
    let what = format!("config_state {state}");
    server
        .api()
        .wait_agent(uid, &what, |a| a["config_state"] == state)
        .await
}

async fn connect_and_apply<F: Fleet>(server: &F, endpoint: fn(&F) -> String) -> anyhow::Result<()> {
    let token = server.api().token("e2e").await?;
    let mut o = opts(endpoint(server), token, "collector-a");
    o.heartbeat = std::time::Duration::from_millis(200);
    let agent = Agent::start(o);
    let mut st = agent.status();
    let s = wait_for(&mut st, DEADLINE, |s| s.connected && s.replies > 0).await?;
    let uid = uid_of(&s);
    assert_ne!(
        s.server_capabilities & 0x1,
        0,
        "server must advertise AcceptsStatus"
    );

    let shown = server
        .api()
        .wait_agent(&uid, "in the API", |a| a["connected"] == true)
        .await?;
    assert_eq!(
        shown["description"]["identifying"]["service.name"],
        "collector-a"
    );
    assert_eq!(shown["config_state"], "none");
    assert!(shown["capability_names"]
        .as_array()
        .is_some_and(|c| c.contains(&json!("AcceptsRemoteConfig"))));

    let body = "receivers:\n  otlp: {}\n";
    let (id, hash) = server.api().config("base", body).await?;
    let res = server
        .api()
        .assign(json!({ "config_id": id, "agent": uid }))
        .await?;
    assert_eq!(res["matched_agents"], 1);

    let s = wait_for(&mut st, DEADLINE, |s| s.applied_configs >= 1).await?;
    assert_eq!(
        s.last_remote_config_hash.as_deref().map(hex_of),
        Some(hash.clone())
    );
    assert_eq!(s.effective_config, body);
    let a = wait_state(server, &uid, "applied").await?;
    assert_eq!(a["remote_config"]["status"], "APPLIED");
    assert_eq!(a["remote_config"]["hash"], hash);
    assert_eq!(a["effective_config"][""]["body"], body);
    // A list carries the effective config's hash; the files come with one agent.
    let listed = server.api().get("/api/v1/agents").await?;
    let mine = listed
        .as_array()
        .and_then(|l| l.iter().find(|x| x["instance_uid"] == uid.as_str()))
        .ok_or_else(|| anyhow::anyhow!("{uid} not listed: {listed}"))?;
    assert!(mine["effective_config"].is_null(), "{mine}");
    assert_eq!(mine["effective_config_hash"], a["effective_config_hash"]);

    agent.stop().await;
    server
        .api()
        .wait_agent(&uid, "offline after goodbye", |a| a["connected"] == false)
        .await?;
    Ok(())
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn websocket_agent_receives_config_and_reports_applied(f: &impl Fleet) -> anyhow::Result<()> {
    connect_and_apply(f, |f| f.ws_url()).await
}
both_modes!(
    websocket_agent_receives_config_and_reports_applied,
    fast_heartbeat
);

async fn http_agent_receives_config_at_next_poll_and_reports_applied(
    f: &impl Fleet,
) -> anyhow::Result<()> {
    connect_and_apply(f, |f| f.http_url()).await
}
both_modes!(
    http_agent_receives_config_at_next_poll_and_reports_applied,
    fast_heartbeat
);

async fn label_assignment_reaches_only_matching_agents_and_failures_are_visible(
    server: &impl Fleet,
) -> anyhow::Result<()> {
    let mut prod = opts(
        server.ws_url(),
        server.api().token("p").await?,
        "prod-collector",
    );
    prod.non_identifying = vec![("env".into(), "prod".into())];
    let mut dev = opts(
        server.ws_url(),
        server.api().token("d").await?,
        "dev-collector",
    );
    dev.non_identifying = vec![("env".into(), "dev".into())];
    let mut failing = opts(
        server.ws_url(),
        server.api().token("f").await?,
        "bad-collector",
    );
    failing.non_identifying = vec![("env".into(), "prod".into())];
    failing.fail_configs = true;
    let agents = [Agent::start(prod), Agent::start(dev), Agent::start(failing)];
    let mut uids = Vec::new();
    for a in &agents {
        let s = wait_for(&mut a.status(), DEADLINE, |s| s.connected && s.replies > 0).await?;
        uids.push(uid_of(&s));
    }
    for uid in &uids {
        server
            .api()
            .wait_agent(uid, "listed", |a| a["connected"] == true)
            .await?;
    }
    let (id, _) = server.api().config("prod", "exporters: {}\n").await?;
    let res = server
        .api()
        .assign(json!({ "config_id": id, "labels": { "env": "prod" } }))
        .await?;
    assert_eq!(res["matched_agents"], 2);

    wait_state(server, &uids[0], "applied").await?;
    let failed = wait_state(server, &uids[2], "failed").await?;
    assert_eq!(failed["remote_config"]["status"], "FAILED");
    assert!(failed["remote_config"]["error_message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    let dev_view = server.api().agent(&uids[1]).await?.expect("dev agent");
    assert_eq!(dev_view["config_state"], "none");
    // How FAILED is counted, and the config-state gauges: the `metrics` test binary.

    let filtered = server
        .api()
        .get("/api/v1/agents?config_state=applied")
        .await?;
    let listed: Vec<&str> = filtered
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["instance_uid"].as_str())
        .collect();
    assert_eq!(listed, vec![uids[0].as_str()]);
    // The counts of the same filters, without the list.
    let counts = |q: &'static str| async move {
        server
            .api()
            .get(&format!("/api/v1/agents/counts?{q}"))
            .await
    };
    let prod = counts("label=env=prod").await?;
    assert_eq!(
        (
            &prod["matched"],
            &prod["connected"],
            &prod["applied"],
            &prod["failed"],
            &prod["pending"]
        ),
        (&json!(2), &json!(2), &json!(1), &json!(1), &json!(0)),
        "{prod}"
    );
    let dev = counts("label=env=dev").await?;
    assert_eq!(
        (&dev["matched"], &dev["none"]),
        (&json!(1), &json!(1)),
        "{dev}"
    );
    let applied = counts("config_state=applied&label=env=prod").await?;
    assert_eq!(applied["matched"], 1, "{applied}");

    for a in agents {
        a.stop().await;
    }
    Ok(())
}
both_modes!(
    label_assignment_reaches_only_matching_agents_and_failures_are_visible,
    defaults
);

async fn agent_without_uid_gets_one_assigned(server: &impl Fleet) -> anyhow::Result<()> {
    let mut o = opts(server.ws_url(), server.api().token("n").await?, "nameless");
    o.instance_uid = None;
    let agent = Agent::start(o);
    let s = wait_for(&mut agent.status(), DEADLINE, |s| {
        s.connected && s.instance_uid.is_some() && s.replies > 1
    })
    .await?;
    let uid = uid_of(&s);
    server
        .api()
        .wait_agent(&uid, "assigned uid in API", |a| {
            a["connected"] == true && a["description"]["identifying"]["service.name"] == "nameless"
        })
        .await?;
    let all = server.api().get("/api/v1/agents").await?;
    assert_eq!(
        all.as_array().map(Vec::len),
        Some(1),
        "no ghost agent for the temporary uid: {all}"
    );
    agent.stop().await;
    Ok(())
}
both_modes!(agent_without_uid_gets_one_assigned, defaults);

async fn static_header_http_client_keeps_working_and_token_stays_bound(
    server: &impl Fleet,
) -> anyhow::Result<()> {
    let token = server.api().token("static").await?;
    let mut o = opts(server.http_url(), token.clone(), "poller");
    o.heartbeat = std::time::Duration::from_millis(100);
    let agent = Agent::start(o);
    let mut st = agent.status();
    let s = wait_for(&mut st, DEADLINE, |s| s.replies >= 5).await?;
    // The bound token must keep being accepted. (A loaded machine may answer one poll with
    // 503 + Retry-After, which the agent honours; that is not a refusal.)
    assert!(
        !s.last_error.as_deref().is_some_and(|e| e.contains("401")),
        "polls must keep working: {:?}",
        s.last_error
    );

    // A different agent presenting the same (now redeemed) token is refused.
    let other = Agent::start(opts(server.http_url(), token, "intruder"));
    let s2 = wait_for(&mut other.status(), DEADLINE, |s| s.last_error.is_some()).await?;
    assert!(
        s2.last_error.as_deref().is_some_and(|e| e.contains("401")),
        "expected a 401, got {:?}",
        s2.last_error
    );
    assert_eq!(s2.replies, 0);
    other.stop().await;
    let before = st.borrow().replies;
    wait_for(&mut st, DEADLINE, |s| s.replies > before + 2).await?;
    agent.stop().await;
    Ok(())
}
both_modes!(
    static_header_http_client_keeps_working_and_token_stays_bound,
    fast_heartbeat
);

#[tokio::test]
async fn self_agent_shows_up_in_the_fleet() -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| c.self_agent.enabled = true).await?;
    let found = eventually("self agent connected", DEADLINE, || async {
        let all = server.api.get("/api/v1/agents").await?;
        Ok(all.as_array().and_then(|list| {
            list.iter()
                .find(|a| {
                    a["description"]["identifying"]["service.name"] == "ampora-self-agent"
                        && a["connected"] == true
                        && a["health"]["healthy"] == true
                })
                .cloned()
        }))
    })
    .await?;
    assert_eq!(found["transport"], "websocket");
    server.stop().await
}

async fn colliding_uid_gets_a_new_one_and_the_original_keeps_its_connection(
    server: &impl Fleet,
) -> anyhow::Result<()> {
    let uid = InstanceUid::new_v7();
    let mut first = opts(server.ws_url(), server.api().token("a").await?, "original");
    first.instance_uid = Some(uid.0);
    let first = Agent::start(first);
    let mut first_st = first.status();
    wait_for(&mut first_st, DEADLINE, |s| s.connected && s.replies > 0).await?;

    // A clone: same uid, its own token, while the original is live.
    let mut clone = opts(server.ws_url(), server.api().token("b").await?, "clone");
    clone.instance_uid = Some(uid.0);
    let clone = Agent::start(clone);
    let s = wait_for(&mut clone.status(), DEADLINE, |s| {
        s.connected && s.instance_uid.is_some_and(|u| u != uid.0)
    })
    .await?;
    let new_uid = uid_of(&s);
    server
        .api()
        .wait_agent(&new_uid, "clone under its new uid", |a| {
            a["connected"] == true && a["description"]["identifying"]["service.name"] == "clone"
        })
        .await?;
    let replies = first_st.borrow().replies;
    wait_for(&mut first_st, DEADLINE, |s| {
        s.connected && s.replies > replies
    })
    .await?;
    let original = server
        .api()
        .agent(&uid.to_string())
        .await?
        .expect("original");
    assert_eq!(
        original["description"]["identifying"]["service.name"],
        "original"
    );
    assert_eq!(original["connected"], true);
    clone.stop().await;
    first.stop().await;
    Ok(())
}
both_modes!(
    colliding_uid_gets_a_new_one_and_the_original_keeps_its_connection,
    defaults
);

async fn capabilities_gate_what_is_sent(server: &impl Fleet) -> anyhow::Result<()> {
    // Accepts connection settings and reports heartbeats: gets the heartbeat interval.
    let mut hb = opts(server.ws_url(), server.api().token("hb").await?, "hb");
    hb.capabilities = 0x1 | 0x2 | 0x4 | 0x100 | 0x800 | 0x1000 | 0x2000;
    let hb = Agent::start(hb);
    wait_for(&mut hb.status(), DEADLINE, |s| s.heartbeat_secs == 7).await?;

    // Reports status (and heartbeats) only: never gets a remote config (the refusal's count:
    // the `metrics` test binary).
    let mut mute = opts(server.ws_url(), server.api().token("m").await?, "mute");
    mute.capabilities = 0x1 | 0x2000;
    let mute = Agent::start(mute);
    let mut mute_st = mute.status();
    let s = wait_for(&mut mute_st, DEADLINE, |s| s.connected && s.replies > 0).await?;
    let uid = uid_of(&s);
    server
        .api()
        .wait_agent(&uid, "listed", |a| a["connected"] == true)
        .await?;
    let (id, _) = server.api().config("gated", "g: 1\n").await?;
    server
        .api()
        .assign(json!({ "config_id": id, "agent": uid }))
        .await?;
    let replies = mute_st.borrow().replies;
    wait_for(&mut mute_st, DEADLINE, |s| s.replies > replies).await?;
    let s = mute_st.borrow().clone();
    assert_eq!(
        s.last_remote_config_hash, None,
        "no config for an agent that does not accept one"
    );
    assert_eq!(s.applied_configs, 0);
    // In a cluster the answering coordinator may read another's agent from the store, as of
    // its last batch write: wait for it rather than read once.
    server
        .api()
        .wait_agent(&uid, "pending", |a| a["config_state"] == "pending")
        .await?;
    mute.stop().await;
    hb.stop().await;
    Ok(())
}
both_modes!(capabilities_gate_what_is_sent, seven_second_heartbeat);
