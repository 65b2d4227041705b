//! Components, pre-flight checks, restarts and custom messages in the cluster sandbox, each
//! asked of the coordinator that does not serve the agent: the set the owner stored is known
//! to the other, which refuses a push the agent's build cannot run; the restart and the
//! custom message reach the agent through its owner (control events over NATS), and the
//! reply is read back through the other.

use std::collections::BTreeMap;
use std::time::Duration;

use agent::{Agent, AgentOptions};
use reqwest::Method;
use serde_json::json;
use shared::ids::InstanceUid;
use tests::cluster::Cluster;
use tests::eventually;

const WAIT: Duration = Duration::from_secs(30);
const ECHO: &str = "com.example.echo";

#[tokio::test]
async fn opamp_operations_reach_an_agent_through_the_coordinator_that_serves_it(
) -> anyhow::Result<()> {
    let c = Cluster::start(1, 2, |cfg| {
        cfg.opamp.custom_capabilities = vec![ECHO.into()];
    })
    .await?;
    let token = c.api_of(0)?.token("collector").await?;
    let agent = Agent::start(AgentOptions {
        endpoint: c.ws_url_of(0)?,
        token: Some(token),
        description: vec![("service.name".into(), "otelcol-contrib".into())],
        capabilities: agent::DEFAULT_CAPABILITIES
            | proto::agent_caps::REPORTS_AVAILABLE_COMPONENTS
            | proto::agent_caps::ACCEPTS_RESTART_COMMAND,
        available_components: BTreeMap::from([
            ("receivers".to_owned(), vec!["otlp".to_owned()]),
            ("exporters".to_owned(), vec!["debug".to_owned()]),
        ]),
        custom_capabilities: vec![ECHO.into()],
        echo_custom_messages: true,
        heartbeat: Duration::from_millis(300),
        ..AgentOptions::default()
    });
    let s = agent::wait_for(&mut agent.status(), WAIT, |s| {
        s.connected && s.instance_uid.is_some() && s.replies > 0
    })
    .await?;
    let uid = InstanceUid(s.instance_uid.unwrap_or_default());
    let owner = c.owner_of(uid).await?;
    let api = c.api_of(1 - owner)?;

    // The other coordinator knows the build (from the store) and refuses a push it lacks.
    eventually("the set known to the other coordinator", WAIT, || async {
        let v = api.get(&format!("/api/v1/agents/{uid}/components")).await?;
        Ok((v["components"]["exporters"] == json!(["debug"])).then_some(()))
    })
    .await?;
    let kafka = "receivers: {otlp: {}}\nexporters: {kafka: {}}\nservice:\n  pipelines:\n    logs: {receivers: [otlp], exporters: [kafka]}\n";
    let (id, _) = api.config("kafka", kafka).await?;
    let (status, body) = api
        .raw(
            Method::POST,
            "/api/v1/assignments",
            Some(json!({ "config_id": id, "agent": uid.to_string() })),
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        body["preflight"]["failing"][0]["missing"],
        json!(["the `kafka` exporter"])
    );

    // A restart asked of the other coordinator: the owner sends it, the agent comes back.
    let (status, body) = api
        .raw(Method::POST, &format!("/api/v1/agents/{uid}/restart"), None)
        .await?;
    assert_eq!(status, 204, "{body}");
    agent::wait_for(&mut agent.status(), WAIT, |s| {
        s.restart_commands == 1 && s.connected && s.connections_established >= 2
    })
    .await?;

    // A custom message the same way; the agent's reply is read back through the other.
    let path = format!("/api/v1/agents/{uid}/custom-messages");
    let (status, body) = api
        .raw(
            Method::POST,
            &path,
            Some(json!({ "capability": ECHO, "type": "ping", "data": "through the bus" })),
        )
        .await?;
    assert_eq!(status, 204, "{body}");
    let kept = eventually("the reply kept", WAIT, || async {
        let v = api.get(&path).await?;
        let m = v["messages"][0].clone();
        Ok((!m.is_null()).then_some(m))
    })
    .await?;
    assert_eq!(kept["text"], "through the bus");
    assert_eq!(kept["type"], "ping.reply");
    agent.stop().await;
    c.stop().await
}

/// Own metrics in the cluster sandbox: the settings set through one coordinator are offered by
/// the owner; the agent's exports, taken by either gateway, reach the owner over NATS, and the
/// other coordinator reads the rates back from the store.
#[tokio::test]
async fn own_metrics_reach_the_coordinator_that_serves_the_agent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("download.key");
    std::fs::write(&key_file, hex::encode([5u8; 32]))?;
    let c = Cluster::start(2, 2, |cfg| cfg.packages.download_key_file = key_file).await?;
    let setter = c.api_of(0)?;
    setter
        .put_json("/api/v1/groups/all", json!({ "labels": {} }))
        .await?;
    setter
        .put_json(
            "/api/v1/groups/all/telemetry",
            json!({ "metrics": { "ampora": true } }),
        )
        .await?;
    let token = setter.token("collector").await?;
    let agent = Agent::start(AgentOptions {
        endpoint: c.ws_url_of(0)?,
        token: Some(token),
        description: vec![("service.name".into(), "otelcol-contrib".into())],
        capabilities: agent::DEFAULT_CAPABILITIES | proto::agent_caps::REPORTS_OWN_METRICS,
        heartbeat: Duration::from_millis(300),
        ..AgentOptions::default()
    });
    let s = agent::wait_for(&mut agent.status(), WAIT, |s| {
        s.instance_uid.is_some() && s.own_metrics.is_some()
    })
    .await?;
    let uid = InstanceUid(s.instance_uid.unwrap_or_default());
    let offer = s.own_metrics.unwrap_or_default();
    assert_eq!(
        offer.endpoint,
        c.ws_url_of(0)?
            .replace("ws://", "http://")
            .replace("/v1/opamp", "/v1/metrics")
    );
    let owner = c.owner_of(uid).await?;
    let api = c.api_of(1 - owner)?;
    // The first export through gateway 0 (the offered endpoint), the second through gateway 1,
    // each read back through the other coordinator before the next: the first sets the
    // baseline, the second is counted.
    let mut through_other = offer.clone();
    through_other.endpoint = c.http_url_of(1)?.replace("/v1/opamp", "/v1/metrics");
    let telemetry = format!("/api/v1/agents/{uid}/telemetry");
    let mut seen = 0;
    let mut v = json!(null);
    for (offer, accepted) in [(&offer, 100u64), (&through_other, 400)] {
        let counters = agent::own_metrics::CollectorCounters {
            accepted: [accepted, 0, 0],
            sent: [accepted, 0, 0],
            ..Default::default()
        };
        eventually("the export taken", WAIT, || async {
            let status = agent::own_metrics::export(offer, &counters, None).await?;
            anyhow::ensure!(status == 200 || status == 429, "answered {status}");
            Ok((status == 200).then_some(()))
        })
        .await?;
        v = eventually(
            "the export read through the other coordinator",
            WAIT,
            || async {
                let v = api.get(&telemetry).await?;
                let last = v["last_export_ms"].as_i64().unwrap_or(0);
                Ok((last > seen).then_some(v))
            },
        )
        .await?;
        seen = v["last_export_ms"].as_i64().unwrap_or(0);
    }
    let accepted: u64 = v["points"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["accepted"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(accepted, 300, "{v}");
    assert!(v["rates"]["in_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
    agent.stop().await;
    c.stop().await
}

/// A group restart in the cluster sandbox: started through one coordinator, listed alike by
/// both, driven by the holder of its partition's lease; that coordinator is killed after the
/// first batch, and the other takes the restart over and finishes it. One agent never comes
/// back (within the budget); no agent is sent the command twice, and none is counted back
/// without having restarted.
#[tokio::test]
async fn a_group_restart_goes_on_when_its_driving_coordinator_is_killed() -> anyhow::Result<()> {
    let mut c = Cluster::start(1, 2, |_| {}).await?;
    let mut agents = Vec::new();
    for i in 0..5 {
        let (a, uid) = restartable(&c, i, i == 2).await?;
        agents.push((a, uid, i == 2));
    }
    known_to_coordinator_0(&c, agents.len()).await?;
    let job = c
        .api_of(0)?
        .post(
            "/api/v1/restarts",
            json!({ "labels": { "env": "fleet" }, "batch": 1, "deadline": "8s", "budget": 5 }),
        )
        .await?;
    let id = job["id"].as_i64().expect("restart id");
    let partition = coordinator::service::rollouts::driver_partition(id);
    let driver = c
        .partition_holders()
        .await?
        .into_iter()
        .find(|(p, _)| *p == partition)
        .map(|(_, h)| h)
        .ok_or_else(|| anyhow::anyhow!("nobody holds partition {partition}"))?;
    let (killed, survivor) = if driver == "coord-0" { (0, 1) } else { (1, 0) };

    // Both coordinators list it; the first batch is decided before the driver dies.
    let path = format!("/api/v1/restarts/{id}");
    eventually("the first batch decided, seen by both", WAIT, || async {
        let mine = c.api_of(survivor)?.get(&path).await?;
        let theirs = c.api_of(killed)?.get(&path).await?;
        let decided =
            mine["members"][0]["state"] != "restarting" && mine["members"][0]["state"] != "waiting";
        Ok((decided && mine["members"][0] == theirs["members"][0]).then_some(()))
    })
    .await?;
    c.kill_coordinator(killed);

    let done = eventually("the restart finished by the survivor", WAIT * 2, || async {
        let v = c.api_of(survivor)?.get(&path).await?;
        Ok((v["state"] != "running").then_some(v))
    })
    .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let members = done["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 5, "{done}");
    for (a, uid, never_returns) in &agents {
        let m = members
            .iter()
            .find(|m| m["uid"] == uid.as_str())
            .ok_or_else(|| anyhow::anyhow!("{uid} not a member: {done}"))?;
        // A crash loses what was in flight: an agent between connections while its batch
        // is sent fails, unsent; none is sent the command twice, and none that did not
        // restart is counted as restarted.
        let commands = a.status().borrow().restart_commands;
        let want = match (commands, *never_returns) {
            (0, _) => "failed",
            (1, false) => "restarted",
            (1, true) => "failed",
            _ => panic!("{uid} was sent the command {commands} times: {done}"),
        };
        assert_eq!(m["state"], want, "{uid}: {done}");
        if commands == 0 {
            assert_eq!(
                m["reason"], "not connected when its batch was sent",
                "{done}"
            );
        }
    }
    let holders = c.partition_holders().await?;
    assert!(
        holders
            .iter()
            .any(|(p, h)| *p == partition && *h == format!("coord-{survivor}")),
        "the survivor drives it now: {holders:?}"
    );
    for (a, _, _) in agents {
        a.stop().await;
    }
    c.stop().await
}

/// Agent `i` of a restart test: it accepts the Restart command, and never comes back from it
/// when told to.
async fn restartable(
    c: &Cluster,
    i: usize,
    never_returns: bool,
) -> anyhow::Result<(Agent, String)> {
    let token = c.api_of(0)?.token(&format!("batch-{i}")).await?;
    let a = Agent::start(AgentOptions {
        endpoint: c.ws_url_of(0)?,
        token: Some(token),
        description: vec![("service.name".into(), format!("collector-{i}"))],
        non_identifying: vec![("env".into(), "fleet".into())],
        capabilities: agent::DEFAULT_CAPABILITIES | proto::agent_caps::ACCEPTS_RESTART_COMMAND,
        restart_never_returns: never_returns,
        heartbeat: Duration::from_millis(300),
        ..AgentOptions::default()
    });
    let s = agent::wait_for(&mut a.status(), WAIT, |s| {
        s.connected && s.instance_uid.is_some() && s.replies > 0
    })
    .await?;
    Ok((
        a,
        InstanceUid(s.instance_uid.unwrap_or_default()).to_string(),
    ))
}

/// Agents the other coordinator serves reach coordinator 0 through the store, at its flush.
async fn known_to_coordinator_0(c: &Cluster, n: usize) -> anyhow::Result<()> {
    eventually("every agent known to coordinator 0", WAIT, || async {
        let v = c
            .api_of(0)?
            .get("/api/v1/agents?label=env%3Dfleet&connected=true")
            .await?;
        Ok((v.as_array().map_or(0, Vec::len) == n).then_some(()))
    })
    .await
}
