//! Staged rollouts with real sockets, on the embedded default and in the cluster sandbox:
//! a canary that FAILs stops the rollout before the second stage with its error shown;
//! rollback (by hand and automatic) returns the changed agents to the old version, applied;
//! an unhealthy canary stops it; a healthy rollout reaches 100 % stage after gate; stragglers
//! hit the deadline; a joiner gets the stable version, then the new one; pause, resume,
//! promote, abort; overlaps refused; the driving coordinator killed mid-stage; drift re-apply
//! and adopt; the PyPI client as a member.

use agent::{wait_for, Agent, AgentOptions};
use anyhow::Context as _;
use serde_json::{json, Value};
use tests::{eventually, Api, Fleet, TestServer, DEADLINE};

use crate::opamp::{opts, uid_of};

/// Marker the test agents refuse (FAILED) in a config.
const BAD: &str = "kafka/broken";
/// Marker that makes a test agent apply a config, then report unhealthy.
const SICK: &str = "endpoint: unreachable";

/// Agents labelled `ring=<ring>`, each started with `tweak` applied, connected and answered.
async fn ring(
    f: &impl Fleet,
    n: usize,
    ring: &str,
    tweak: impl Fn(usize, &mut AgentOptions),
) -> anyhow::Result<(Vec<Agent>, Vec<String>)> {
    let (mut agents, mut uids) = (Vec::new(), Vec::new());
    for i in 0..n {
        let token = f.api().token(&format!("{ring}-{i}")).await?;
        let mut o = opts(f.ws_url(), token, &format!("{ring}-{i}"));
        o.non_identifying.push(("ring".into(), ring.into()));
        o.fail_configs_containing = Some(BAD.into());
        o.unhealthy_configs_containing = Some(SICK.into());
        tweak(i, &mut o);
        let a = Agent::start(o);
        let s = wait_for(&mut a.status(), DEADLINE, |s| s.connected && s.replies > 0).await?;
        uids.push(uid_of(&s));
        agents.push(a);
    }
    Ok((agents, uids))
}

/// A config version `v1`/`v2`… for this ring; returns (id, hash).
async fn version(api: &Api, ring: &str, body: &str) -> anyhow::Result<(i64, String)> {
    api.config(&format!("{ring}-{}", uuid::Uuid::new_v4().simple()), body)
        .await
}

/// Assigns `config` to the ring and waits until every member applied it.
async fn baseline(
    api: &Api,
    ring: &str,
    uids: &[String],
    config: (i64, &str),
) -> anyhow::Result<()> {
    api.assign(json!({ "config_id": config.0, "labels": { "ring": ring } }))
        .await?;
    for uid in uids {
        runs(api, uid, config.1).await?;
    }
    Ok(())
}

/// Waits until agent `uid` reports config `hash` APPLIED.
async fn runs(api: &Api, uid: &str, hash: &str) -> anyhow::Result<Value> {
    api.wait_agent(uid, &format!("APPLIED {hash}"), |a| {
        a["remote_config"]["hash"] == hash && a["remote_config"]["status"] == "APPLIED"
    })
    .await
}

async fn create(api: &Api, body: Value) -> anyhow::Result<i64> {
    let r = api.post("/api/v1/rollouts", body).await?;
    r["id"].as_i64().context("rollout id")
}

/// Waits until the rollout's status view satisfies `pred`; returns it.
async fn wait_rollout(
    api: &Api,
    id: i64,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let path = format!("/api/v1/rollouts/{id}");
    eventually(&format!("rollout {id}: {what}"), DEADLINE, || async {
        let v = api.get(&path).await?;
        Ok(pred(&v).then_some(v))
    })
    .await
}

fn state_is(state: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["rollout"]["state"] == state
}

async fn act(api: &Api, id: i64, action: &str) -> anyhow::Result<(u16, Value)> {
    api.raw(
        reqwest::Method::POST,
        &format!("/api/v1/rollouts/{id}/{action}"),
        None,
    )
    .await
}

async fn events(api: &Api, id: i64) -> anyhow::Result<Vec<String>> {
    let v = api.get(&format!("/api/v1/rollouts/{id}/events")).await?;
    Ok(v.as_array()
        .context("events")?
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
        .collect())
}

async fn stop_all(agents: Vec<Agent>) {
    for a in agents {
        a.stop().await;
    }
}

/// A canary that FAILs stops the rollout before the second stage, with its error in the
/// status; the operator rolls back and the canary applies the old version again; the whole
/// story is in the history and the audit log.
async fn canary_failure_stops_and_rolls_back(f: &impl Fleet) -> anyhow::Result<()> {
    let api = f.api();
    let (agents, uids) = ring(f, 4, "canary-fail", |_, _| {}).await?;
    let v1 = version(api, "canary-fail", "receivers: {otlp: {}}\n").await?;
    baseline(api, "canary-fail", &uids, (v1.0, &v1.1)).await?;
    api.put_json(
        "/api/v1/groups/canary-fail",
        json!({ "labels": { "ring": "canary-fail" } }),
    )
    .await?;
    let bad = version(api, "canary-fail", &format!("exporters: {{{BAD}: {{}}}}\n")).await?;
    let id = create(
        api,
        json!({ "config_id": bad.0, "group": "canary-fail", "stages": "1,50%,100%", "soak": "0s" }),
    )
    .await?;
    let failed = wait_rollout(api, id, "failed", state_is("failed")).await?;
    assert_eq!(failed["rollout"]["stage"], 0, "stopped at the canary");
    let reason = failed["rollout"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("reported FAILED") && reason.contains(agent::DISLIKED),
        "the agent's error is shown: {reason}"
    );
    let stages = failed["stages"].as_array().context("stages")?;
    assert_eq!(stages[0]["gate"]["failed"], 1);
    assert!(
        stages[1]["started_ms"].is_null(),
        "the second stage never started"
    );
    // Only the canary got the bad version; the rest still run v1. (In a cluster the API may
    // read the canary from the store, where its record lands with the next batch write.)
    let canary_failed: Vec<String> =
        eventually("the canary's FAILED report listed", DEADLINE, || async {
            let mut bad_ones = Vec::new();
            for uid in &uids {
                let a = api.agent(uid).await?.context("agent")?;
                if a["remote_config"]["hash"] == bad.1.as_str() {
                    bad_ones.push(uid.clone());
                } else {
                    anyhow::ensure!(
                        a["remote_config"]["hash"] == v1.1.as_str(),
                        "{uid} untouched: {a}"
                    );
                }
            }
            Ok((!bad_ones.is_empty()).then_some(bad_ones))
        })
        .await?;
    assert_eq!(canary_failed.len(), 1, "exactly one canary");
    let (status, body) = act(api, id, "rollback").await?;
    assert_eq!(status, 200, "{body}");
    wait_rollout(api, id, "rolled back", state_is("rolled_back")).await?;
    runs(api, &canary_failed[0], &v1.1).await?;
    let kinds = events(api, id).await?;
    for k in [
        "created",
        "stage_started",
        "gate_failed",
        "rollback_started",
        "rolled_back",
    ] {
        assert!(kinds.iter().any(|e| e == k), "history has {k}: {kinds:?}");
    }
    assert!(!kinds.iter().any(|e| e == "gate_passed"), "{kinds:?}");
    let audit = api.get("/api/v1/audit?limit=200").await?;
    let actions: Vec<&str> = audit
        .as_array()
        .context("audit")?
        .iter()
        .filter(|e| e["detail"]["rollout_id"] == id)
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"rollout.create") && actions.contains(&"rollout.rollback"),
        "{actions:?}"
    );
    // The version's history names the rollout.
    let used = api
        .get(&format!("/api/v1/configs/{}/rollouts", bad.0))
        .await?;
    assert_eq!(used[0]["id"], id);
    stop_all(agents).await;
    Ok(())
}
both_modes!(
    canary_failure_stops_and_rolls_back,
    tests::per_ip_limits_off
);

/// A healthy rollout of several stages reaches 100 %, each stage started only after the
/// previous gate passed, and leaves an assignment behind.
async fn healthy_rollout_completes_stage_by_stage(f: &impl Fleet) -> anyhow::Result<()> {
    let api = f.api();
    let (agents, uids) = ring(f, 6, "healthy", |_, _| {}).await?;
    let v1 = version(api, "healthy", "a: 1\n").await?;
    baseline(api, "healthy", &uids, (v1.0, &v1.1)).await?;
    let v2 = version(api, "healthy", "a: 2\n").await?;
    let id = create(
        api,
        json!({ "config_id": v2.0, "labels": { "ring": "healthy" }, "stages": "1,50%,100%", "soak": "0s" }),
    )
    .await?;
    let done = wait_rollout(api, id, "succeeded", state_is("succeeded")).await?;
    for uid in &uids {
        runs(api, uid, &v2.1).await?;
    }
    let stages = done["stages"].as_array().context("stages")?;
    let planned: Vec<u64> = stages
        .iter()
        .map(|s| s["planned"].as_u64().unwrap_or(9))
        .collect();
    assert_eq!(planned, [1, 2, 3]);
    for w in stages.windows(2) {
        let gate_at = w[0]["gate"]["at_ms"].as_i64().context("gate time")?;
        let next = w[1]["started_ms"].as_i64().context("next start")?;
        assert!(w[0]["gate"]["passed"] == true && next >= gate_at, "{w:?}");
    }
    let kinds = events(api, id).await?;
    assert_eq!(
        kinds.iter().filter(|k| *k == "gate_passed").count(),
        3,
        "{kinds:?}"
    );
    assert_eq!(kinds.last().map(String::as_str), Some("succeeded"));
    let assignments = api.get("/api/v1/assignments").await?;
    let last = assignments
        .as_array()
        .and_then(|a| a.last())
        .context("assignment")?;
    assert_eq!(
        last["config_id"], v2.0,
        "the rollout leaves its assignment behind"
    );
    stop_all(agents).await;
    Ok(())
}
both_modes!(
    healthy_rollout_completes_stage_by_stage,
    tests::per_ip_limits_off
);

/// With `on_failure: rollback`, an unhealthy canary (ReportsHealth, healthy = false) rolls
/// the rollout back by itself; the canary returns to the old version and is healthy again.
#[tokio::test]
async fn unhealthy_canary_rolls_back_automatically() -> anyhow::Result<()> {
    let f = TestServer::start_with(tests::per_ip_limits_off).await?;
    let api = f.api();
    let health = proto::agent_caps::REPORTS_HEALTH;
    let (agents, uids) = ring(&f, 3, "sick", |_, o| o.capabilities |= health).await?;
    let v1 = version(api, "sick", "endpoint: fine\n").await?;
    baseline(api, "sick", &uids, (v1.0, &v1.1)).await?;
    let v2 = version(api, "sick", &format!("{SICK}\n")).await?;
    let id = create(
        api,
        json!({ "config_id": v2.0, "labels": { "ring": "sick" }, "stages": "1,100%",
                "soak": "0s", "on_failure": "rollback" }),
    )
    .await?;
    let back = wait_rollout(api, id, "rolled back", state_is("rolled_back")).await?;
    let gate = &back["stages"][0]["gate"];
    assert_eq!(gate["unhealthy"], 1, "{gate}");
    assert!(back["stages"][1]["started_ms"].is_null());
    for uid in &uids {
        let a = runs(api, uid, &v1.1).await?;
        let _ = a;
        api.wait_agent(uid, "healthy", |a| a["health"]["healthy"] == true)
            .await?;
    }
    let kinds = events(api, id).await?;
    assert!(
        kinds.contains(&"gate_failed".to_string()) && kinds.contains(&"rolled_back".to_string())
    );
    stop_all(agents).await;
    f.stop().await
}

/// A member that never answers counts against the budget once the stage's deadline passes,
/// instead of stalling the rollout.
#[tokio::test]
async fn stragglers_hit_the_deadline() -> anyhow::Result<()> {
    let f = TestServer::start_with(tests::per_ip_limits_off).await?;
    let api = f.api();
    let (mut agents, uids) = ring(&f, 2, "late", |_, _| {}).await?;
    // One member goes away before the rollout: it is planned, but cannot answer.
    let gone = agents.pop().context("agent")?;
    gone.stop().await;
    api.wait_agent(&uids[1], "disconnected", |a| a["connected"] == false)
        .await?;
    let v2 = version(api, "late", "b: 2\n").await?;
    let id = create(
        api,
        json!({ "config_id": v2.0, "labels": { "ring": "late" }, "stages": "100%",
                "soak": "0s", "deadline": "1s" }),
    )
    .await?;
    let failed = wait_rollout(api, id, "failed", state_is("failed")).await?;
    let gate = &failed["stages"][0]["gate"];
    assert_eq!(
        (gate["stragglers"].as_u64(), gate["applied"].as_u64()),
        (Some(1), Some(1)),
        "{gate}"
    );
    assert!(failed["rollout"]["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("deadline"));
    stop_all(agents).await;
    f.stop().await
}

/// An agent joining the group mid-rollout gets the stable version while its stage (the last)
/// has not started, and the rollout's once it has; promote skips the soak; pause, resume and
/// abort do what they say; overlapping rollouts and assignments are refused.
#[tokio::test]
async fn joiners_actions_and_overlaps() -> anyhow::Result<()> {
    let f = TestServer::start_with(tests::per_ip_limits_off).await?;
    let api = f.api();
    let (mut agents, uids) = ring(&f, 3, "join", |_, _| {}).await?;
    let v1 = version(api, "join", "c: 1\n").await?;
    baseline(api, "join", &uids, (v1.0, &v1.1)).await?;
    let v2 = version(api, "join", "c: 2\n").await?;
    let id = create(
        api,
        json!({ "config_id": v2.0, "labels": { "ring": "join" }, "stages": "1,100%", "soak": "1h" }),
    )
    .await?;
    wait_rollout(api, id, "canary soaking", |v| {
        !v["stages"][0]["settled_ms"].is_null()
    })
    .await?;

    // Overlaps: another rollout or an assignment on these agents is refused.
    let (s, body) = api
        .raw(
            reqwest::Method::POST,
            "/api/v1/rollouts",
            Some(json!({ "config_id": v1.0, "all": true, "stages": "100%" })),
        )
        .await?;
    assert_eq!(s, 409, "{body}");
    let (s, _) = api
        .raw(
            reqwest::Method::POST,
            "/api/v1/assignments",
            Some(json!({ "config_id": v1.0, "labels": { "ring": "join" } })),
        )
        .await?;
    assert_eq!(s, 409);

    // A joiner belongs to the last stage: stable version for now.
    let (joined, joined_uids) = ring(&f, 1, "join", |_, _| {}).await?;
    runs(api, &joined_uids[0], &v1.1).await?;
    agents.extend(joined);

    assert_eq!(act(api, id, "pause").await?.0, 200);
    wait_rollout(api, id, "paused", state_is("paused")).await?;
    assert_eq!(act(api, id, "pause").await?.0, 409, "pausing twice");
    assert_eq!(act(api, id, "resume").await?.0, 200);
    assert_eq!(
        act(api, id, "promote").await?.0,
        200,
        "skip the canary's soak"
    );
    let last = wait_rollout(api, id, "last stage", |v| v["rollout"]["stage"] == 1).await?;
    assert!(!last["stages"][1]["started_ms"].is_null());
    // Its stage started: the joiner gets the new version, as do the others.
    for uid in uids.iter().chain(&joined_uids) {
        runs(api, uid, &v2.1).await?;
    }
    assert_eq!(act(api, id, "abort").await?.0, 200);
    wait_rollout(api, id, "aborted", state_is("aborted")).await?;
    assert_eq!(act(api, id, "resume").await?.0, 409, "aborted is final");
    assert_eq!(act(api, id, "bogus").await?.0, 404);
    // Aborted keeps what the agents got; nobody is pushed back.
    for uid in &uids {
        runs(api, uid, &v2.1).await?;
    }
    let kinds = events(api, id).await?;
    for k in ["paused", "resumed", "promoted", "aborted"] {
        assert!(kinds.iter().any(|e| e == k), "{k}: {kinds:?}");
    }
    stop_all(agents).await;
    f.stop().await
}

/// The coordinator driving a rollout is killed mid-stage; another takes it over within the
/// lease TTL and the rollout completes, no stage skipped.
#[tokio::test]
async fn driver_killed_mid_stage_rollout_completes() -> anyhow::Result<()> {
    let mut c = tests::cluster::Cluster::start(1, 2, tests::per_ip_limits_off).await?;
    let (agents, uids) = ring(&c, 4, "takeover", |_, _| {}).await?;
    let api = c.api().clone();
    let v1 = version(&api, "takeover", "d: 1\n").await?;
    baseline(&api, "takeover", &uids, (v1.0, &v1.1)).await?;
    let v2 = version(&api, "takeover", "d: 2\n").await?;
    let id = create(
        &api,
        json!({ "config_id": v2.0, "labels": { "ring": "takeover" }, "stages": "1,100%", "soak": "2s" }),
    )
    .await?;
    wait_rollout(&api, id, "canary soaking", |v| {
        !v["stages"][0]["settled_ms"].is_null()
    })
    .await?;
    let partition = u16::try_from(id.rem_euclid(i64::from(shared::ids::PARTITIONS)))?;
    let leases = c.coordinator_of(0)?.store().list_leases().await?;
    let driver = leases
        .iter()
        .find(|l| l.partition == partition)
        .map(|l| l.holder.clone())
        .context("no lease for the rollout's partition")?;
    let i = (0..2)
        .find(|&i| c.coordinator_of(i).is_ok_and(|co| co.node() == driver))
        .context("driver not found")?;
    c.kill_coordinator(i);
    let api = c.api().clone();
    let done = eventually(
        "rollout succeeded after the take-over",
        DEADLINE * 2,
        || async {
            let v = api.get(&format!("/api/v1/rollouts/{id}")).await?;
            Ok((v["rollout"]["state"] == "succeeded").then_some(v))
        },
    )
    .await?;
    let kinds = events(&api, id).await?;
    assert_eq!(
        kinds.iter().filter(|k| *k == "stage_started").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| *k == "gate_passed").count(),
        2,
        "{kinds:?}"
    );
    assert!(
        done["stages"][1]["started_ms"].as_i64() >= done["stages"][0]["gate"]["at_ms"].as_i64()
    );
    for uid in &uids {
        runs(&api, uid, &v2.1).await?;
    }
    stop_all(agents).await;
    c.stop().await
}

/// A hand-driven agent on a raw WebSocket: it reports exactly what the test says.
pub(crate) struct Handmade {
    conn: agent::WsConnection,
    pub(crate) uid: shared::ids::InstanceUid,
    seq: u64,
}

impl Handmade {
    const CAPS: u64 = proto::agent_caps::REPORTS_STATUS
        | proto::agent_caps::ACCEPTS_REMOTE_CONFIG
        | proto::agent_caps::REPORTS_REMOTE_CONFIG
        | proto::agent_caps::REPORTS_EFFECTIVE_CONFIG;

    pub(crate) async fn connect(f: &impl Fleet, ring: &str) -> anyhow::Result<Self> {
        let token = f.api().token(ring).await?;
        let conn = agent::WsConnection::connect(&f.ws_url(), &tests::bearer(&token)).await?;
        let uid = shared::ids::InstanceUid::new_v7();
        let mut first = tests::described(uid, &[("ring", ring)]);
        first.capabilities = Self::CAPS;
        let mut me = Self { conn, uid, seq: 0 };
        me.conn.send(&first).await?;
        Ok(me)
    }

    /// Reports `hash` APPLIED (when given) and `effective` as its effective config.
    pub(crate) async fn report(
        &mut self,
        hash: Option<&[u8]>,
        effective: &str,
    ) -> anyhow::Result<()> {
        self.seq += 1;
        let file = proto::v1::AgentConfigFile {
            body: effective.as_bytes().to_vec(),
            content_type: "text/yaml".into(),
        };
        let msg = proto::AgentToServer {
            instance_uid: self.uid.0.to_vec(),
            sequence_num: self.seq,
            capabilities: Self::CAPS,
            remote_config_status: hash.map(|h| proto::v1::RemoteConfigStatus {
                last_remote_config_hash: h.to_vec(),
                status: proto::v1::RemoteConfigStatuses::Applied as i32,
                error_message: String::new(),
            }),
            effective_config: Some(proto::v1::EffectiveConfig {
                config_map: Some(proto::v1::AgentConfigMap {
                    config_map: [(String::new(), file)].into(),
                }),
            }),
            ..Default::default()
        };
        Ok(self.conn.send(&msg).await?)
    }

    /// The hash of the next remote config the server sends.
    pub(crate) async fn offered(&mut self) -> anyhow::Result<Vec<u8>> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                match self.conn.recv().await? {
                    Some(m) => {
                        if let Some(rc) = m.remote_config {
                            return Ok(rc.config_hash);
                        }
                    }
                    None => anyhow::bail!("connection closed"),
                }
            }
        })
        .await
        .context("no remote config offered")?
    }
}

/// Drift: an agent whose effective config moved after it applied is shown drifted; re-apply
/// sends its config again (and takes what it then reports as the baseline); adopt makes
/// what it runs a new version, assigned and sent to it.
#[tokio::test]
async fn drift_is_shown_reapplied_and_adopted() -> anyhow::Result<()> {
    let f = TestServer::start_with(tests::per_ip_limits_off).await?;
    let api = f.api();
    let mut a = Handmade::connect(&f, "drift").await?;
    let uid = a.uid.to_string();
    api.wait_agent(&uid, "connected", |v| v["connected"] == true)
        .await?;
    let v1 = version(api, "drift", "e: 1\n").await?;
    api.assign(json!({ "config_id": v1.0, "agent": uid }))
        .await?;
    let h1 = a.offered().await?;
    a.report(Some(&h1), "e: 1\n").await?;
    api.wait_agent(&uid, "applied", |v| v["config_state"] == "applied")
        .await?;

    // A local edit: the effective config moves without an offer.
    a.report(None, "e: 1\nlocal: edit\n").await?;
    api.wait_agent(&uid, "drifted", |v| v["config_state"] == "drifted")
        .await?;
    let drifted = api.get("/api/v1/agents?config_state=drifted").await?;
    assert!(drifted
        .as_array()
        .is_some_and(|d| d.iter().any(|x| x["instance_uid"] == uid.as_str())));

    let (s, body) = api
        .raw(
            reqwest::Method::POST,
            &format!("/api/v1/agents/{uid}/reapply"),
            None,
        )
        .await?;
    assert_eq!(s, 204, "{body}");
    assert_eq!(a.offered().await?, h1, "the same config, sent again");
    a.report(Some(&h1), "e: 1\n").await?;
    api.wait_agent(&uid, "applied again", |v| v["config_state"] == "applied")
        .await?;

    a.report(None, "e: 1\nkept: locally\n").await?;
    api.wait_agent(&uid, "drifted", |v| v["config_state"] == "drifted")
        .await?;
    let adopted = api
        .post(
            &format!("/api/v1/agents/{uid}/adopt"),
            json!({ "name": "adopted" }),
        )
        .await?;
    let hash = adopted["hash"].as_str().context("hash")?.to_string();
    assert_ne!(hash, v1.1);
    assert_eq!(
        hex::encode(a.offered().await?),
        hash,
        "the adopted version is sent"
    );
    let audit = api.get("/api/v1/audit?limit=50").await?;
    let actions: Vec<&str> = audit
        .as_array()
        .context("audit")?
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"config.reapply") && actions.contains(&"config.adopt"),
        "{actions:?}"
    );
    f.stop().await
}

/// The PyPI client as a member: it refuses a config it dislikes, and the canary gate stops
/// the rollout on it.
#[tokio::test]
async fn python_client_as_a_failing_canary() -> anyhow::Result<()> {
    let python = crate::python::python()?;
    let f = TestServer::start_with(|c| {
        tests::per_ip_limits_off(c);
        c.opamp.bootstrap_plaintext_allowed = true;
    })
    .await?;
    let api = f.api();
    let token = api.token("py-canary").await?;
    let mut py = crate::python::PyAgent::spawn_with(
        &python,
        &f.http_url(),
        "py-canary",
        &[
            "--token",
            &token,
            "--label",
            "ring=py",
            "--fail-containing",
            BAD,
        ],
    )?;
    let uid = py
        .wait_event("instance_uid", |v| v["event"] == "instance_uid")
        .await?["uid"]
        .as_str()
        .context("uid")?
        .to_string();
    api.wait_agent(&uid, "connected", |a| a["connected"] == true)
        .await?;
    let bad = version(api, "py", &format!("x: {BAD}\n")).await?;
    let id = create(
        api,
        json!({ "config_id": bad.0, "labels": { "ring": "py" }, "stages": "100%", "soak": "0s" }),
    )
    .await?;
    py.wait_event("failed", |v| v["event"] == "failed").await?;
    let failed = wait_rollout(api, id, "failed", state_is("failed")).await?;
    assert_eq!(failed["stages"][0]["gate"]["failed"], 1, "{failed}");
    py.stop().await?;
    f.stop().await
}
