//! Upgrades as staged rollouts on the embedded default: `ampora rollout create --package
//! --version` offers the build to one stage at a time (agents of later stages are offered
//! nothing), each stage judged on its members being verified on the build; success leaves a
//! package assignment behind; an install that keeps failing fails the gate, and the rollback
//! returns every agent the upgrade reached to the build its package assignment gives it, or
//! else to the build it ran before, tracked to verified.

use std::time::Duration;

use agent::Agent;
use serde_json::{json, Value};
use shared::ids::InstanceUid;
use tests::packages::{build, event_kinds, Signer, TWO_STAGES_PROMOTED};
use tests::{eventually, TestServer};

use crate::cli_rollouts::{ampora_bin, ampora_json};
use crate::console::sign_in;
use crate::packages::{
    assign_to_all, import_version, serve_trusting, start_upgrading, upgrade_state, upgrading_agent,
};

const WAIT: Duration = Duration::from_secs(30);

/// A failing install is offered again after a 5 s backoff (with jitter) before the server
/// gives up: the rollback test waits for that, then for a reinstall.
const WAIT_FOR_GIVING_UP: Duration = Duration::from_secs(60);

async fn rollout(server: &TestServer, id: i64) -> anyhow::Result<Value> {
    server.api.get(&format!("/api/v1/rollouts/{id}")).await
}

/// Upgrades every agent to 0.2.0 in one stage soaking for an hour, waits for `uid` verified
/// on it, rolls the upgrade back and waits for `rolled_back`: the rollout's id and status.
async fn upgrade_then_roll_back(
    server: &TestServer,
    uid: [u8; 16],
) -> anyhow::Result<(i64, Value)> {
    let created = server
        .api
        .post(
            "/api/v1/rollouts",
            json!({ "package": "", "version": "0.2.0", "all": true, "stages": "100%", "soak": "1h" }),
        )
        .await?;
    let id = created["id"].as_i64().expect("rollout id");
    eventually("the agent upgraded", WAIT, || async {
        let v = upgrade_state(server, uid).await?;
        Ok((v["state"] == "verified" && v["desired"][""] == "0.2.0").then_some(()))
    })
    .await?;
    server
        .api
        .post(&format!("/api/v1/rollouts/{id}/rollback"), json!({}))
        .await?;
    let done = eventually("rolled back", WAIT, || async {
        let v = rollout(server, id).await?;
        Ok((v["rollout"]["state"] == "rolled_back").then_some(v))
    })
    .await?;
    Ok((id, done))
}

/// Each agent's upgrade state, sorted.
async fn states(server: &TestServer, uids: &[[u8; 16]]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for uid in uids {
        let v = upgrade_state(server, *uid).await?;
        out.push(v["state"].as_str().unwrap_or_default().to_owned());
    }
    out.sort();
    Ok(out)
}

#[tokio::test]
async fn an_upgrade_reaches_one_stage_at_a_time_and_leaves_an_assignment() -> anyhow::Result<()> {
    let bin = ampora_bin().await?;
    let signer = Signer::new();
    let server = serve_trusting(&signer).await?;
    import_version(&server, &signer, "0.2.0").await?;
    let mut agents = Vec::new();
    let mut uids = Vec::new();
    for i in 0..3 {
        let (a, uid) = start_upgrading(&server, &format!("staged-{i}"), false).await?;
        agents.push(a);
        uids.push(uid);
    }
    let created = ampora_json(
        &bin,
        &server,
        &[
            "rollout",
            "create",
            "--package",
            "",
            "--version",
            "0.2.0",
            "--all",
            "--stages",
            "1,100%",
            "--soak",
            "1h",
        ],
    )
    .await?;
    let id = created["id"].as_i64().expect("rollout id");
    assert_eq!(created["package"]["version"], "0.2.0", "{created}");
    assert_eq!(created["stages"][0]["planned"], 1, "{created}");

    // The canary is verified on the build and the stage soaks (for an hour): nobody else has
    // been offered anything.
    eventually("the canary verified, its stage settled", WAIT, || async {
        let v = rollout(&server, id).await?;
        let stage = &v["stages"][0];
        let settled = stage["progress"]["applied"] == 1 && !stage["settled_ms"].is_null();
        Ok(settled.then_some(()))
    })
    .await?;
    assert_eq!(states(&server, &uids).await?, ["none", "none", "verified"]);
    let offered: Vec<u64> = agents
        .iter()
        .map(|a| a.status().borrow().package_offers)
        .collect();
    assert_eq!(
        offered.iter().filter(|&&n| n == 0).count(),
        2,
        "agents of the next stage were offered nothing: {offered:?}"
    );

    // Promoted past the soak: the rest are offered it and verified; promoted again: done.
    server
        .api
        .post(&format!("/api/v1/rollouts/{id}/promote"), json!({}))
        .await?;
    eventually("the last stage verified and settled", WAIT, || async {
        let v = rollout(&server, id).await?;
        let stage = &v["stages"][1];
        let settled = stage["progress"]["applied"] == 2 && !stage["settled_ms"].is_null();
        Ok(settled.then_some(()))
    })
    .await?;
    let done = server
        .api
        .post(&format!("/api/v1/rollouts/{id}/promote"), json!({}))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");

    // What it leaves behind: an assignment of the build to its target, so every agent keeps
    // it (verified, not offered another set).
    let assignments = server.api.get("/api/v1/packages/assignments").await?;
    assert!(
        assignments
            .as_array()
            .is_some_and(|all| all.iter().any(|a| {
                a["author"] == format!("rollout:{id}") && a["version"] == "0.2.0" && a["name"] == ""
            })),
        "{assignments}"
    );
    assert_eq!(
        states(&server, &uids).await?,
        ["verified", "verified", "verified"]
    );
    let (kinds, history) = event_kinds(&server.api, id).await?;
    assert_eq!(kinds, TWO_STAGES_PROMOTED, "{history}");
    for a in agents {
        a.stop().await;
    }
    server.stop().await
}

#[tokio::test]
async fn a_failing_upgrade_fails_its_gate_and_rolls_back_to_the_assigned_build(
) -> anyhow::Result<()> {
    let signer = Signer::new();
    let server = serve_trusting(&signer).await?;
    import_version(&server, &signer, "0.1.0").await?;
    import_version(&server, &signer, "0.2.0").await?;
    assign_to_all(&server, "0.1.0").await?;
    let (good, good_uid) = start_upgrading(&server, "good", false).await?;
    // Its installer fails on 0.2.0 only: the build before it installs.
    let mut o = upgrading_agent(&server, server.api.token("broken").await?, true);
    o.package_install_fails_version = Some("0.2.0".into());
    let broken = Agent::start(o);
    let broken_uid = agent::wait_for(&mut broken.status(), WAIT, |s| {
        s.instance_uid.is_some() && s.connected
    })
    .await?
    .instance_uid
    .expect("uid");
    let uids = [good_uid, broken_uid];
    eventually("both verified on 0.1.0", WAIT, || async {
        Ok((states(&server, &uids).await? == ["verified", "verified"]).then_some(()))
    })
    .await?;

    let created = server
        .api
        .post(
            "/api/v1/rollouts",
            json!({
                "package": "", "version": "0.2.0", "all": true, "stages": "100%",
                "soak": "0s", "budget": "0", "on_failure": "rollback",
            }),
        )
        .await?;
    let id = created["id"].as_i64().expect("rollout id");
    let done = eventually("the upgrade rolled back", WAIT_FOR_GIVING_UP, || async {
        let v = rollout(&server, id).await?;
        Ok((v["rollout"]["state"] == "rolled_back").then_some(v))
    })
    .await?;
    let gate = &done["stages"][0]["gate"];
    assert_eq!(gate["failed"], 1, "{done}");
    let reasons = gate["reasons"].to_string();
    assert!(
        reasons.contains("failed every install attempt")
            && reasons.contains("installer exited with status 1"),
        "{reasons}"
    );
    let history = server
        .api
        .get(&format!("/api/v1/rollouts/{id}/events"))
        .await?;
    let rolled_back = history
        .as_array()
        .and_then(|h| h.iter().find(|e| e["kind"] == "rolled_back"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        rolled_back["detail"]["returned"], 2,
        "both are back on 0.1.0: {history}"
    );

    // Back on the assigned build, running it.
    for uid in uids {
        let view = upgrade_state(&server, uid).await?;
        assert_eq!(
            (view["state"].as_str(), view["desired"][""].as_str()),
            (Some("verified"), Some("0.1.0")),
            "{view}"
        );
        let record = server
            .api
            .agent(&InstanceUid(uid).to_string())
            .await?
            .expect("agent");
        assert_eq!(
            record["description"]["identifying"]["service.version"],
            "0.1.0"
        );
    }
    let good_went = good.status().borrow().package_downloads;
    assert_eq!(good_went, 3, "0.1.0, 0.2.0, then 0.1.0 again");

    // The console's rollout page: what it upgraded to, and why its gate failed.
    let b = tests::browser::Browser::start().await?;
    sign_in(&b, &server, &server.api.token).await?;
    b.goto(&format!("http://{}/ui/rollouts/{id}", server.addr))
        .await?;
    let package = b.text("#rollout-package").await?;
    assert!(
        package.contains("(the agent)") && package.contains("0.2.0"),
        "{package}"
    );
    let reason = b.text("#rollout-reason").await?;
    assert!(reason.contains("failed every install attempt"), "{reason}");
    b.screenshot("43-upgrade-rolled-back").await?;
    b.goto(&format!("http://{}/ui/rollouts", server.addr))
        .await?;
    let row = b.text("#rollouts tbody tr").await?;
    assert!(row.contains("package") && row.contains("0.2.0"), "{row}");
    b.screenshot("44-rollouts-with-an-upgrade").await?;
    good.stop().await;
    broken.stop().await;
    server.stop().await
}

#[tokio::test]
async fn a_rollback_with_nothing_to_return_to_never_offers_a_set_without_the_build(
) -> anyhow::Result<()> {
    let signer = Signer::new();
    let server = serve_trusting(&signer).await?;
    import_version(&server, &signer, "0.2.0").await?;
    let addon = build("addon-1.0");
    let sig = signer.sign(&addon);
    let (status, body) = tests::packages::import_kind(
        &server,
        "exporter",
        "1.0",
        "linux/amd64",
        "addon",
        addon,
        Some(&sig),
    )
    .await?;
    anyhow::ensure!(status == 200, "import: {status} {body}");
    // The agent has an addon assigned, and no assignment of its own build.
    server
        .api
        .post(
            "/api/v1/packages/assignments",
            json!({ "name": "exporter", "version": "1.0", "all": true }),
        )
        .await?;
    let (agent, uid) = start_upgrading(&server, "keeps", false).await?;
    eventually("the addon verified", WAIT, || async {
        Ok((upgrade_state(&server, uid).await?["state"] == "verified").then_some(()))
    })
    .await?;

    // Upgraded by a rollout (soaking for an hour), then rolled back by the operator.
    let (id, done) = upgrade_then_roll_back(&server, uid).await?;
    let history = server
        .api
        .get(&format!("/api/v1/rollouts/{id}/events"))
        .await?;
    let rolled_back = history
        .as_array()
        .and_then(|h| h.iter().find(|e| e["kind"] == "rolled_back"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        rolled_back["detail"]["no_previous_version"], 1,
        "{done} {history}"
    );

    // The build it ran before (0.1.0) was never imported, so there is nothing to return
    // to: the agent is held (told why), not sent a set with the addon alone, which would
    // order it to remove its own build.
    let view = upgrade_state(&server, uid).await?;
    assert_eq!(view["state"], "cannot_upgrade", "{view}");
    assert!(
        view["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no artifact of \"\" 0.1.0")),
        "{view}"
    );
    // Its next report is answered without an offer, and it still has both packages.
    let (offers, replies) = {
        let s = agent.status().borrow().clone();
        (s.package_offers, s.replies)
    };
    agent::wait_for(&mut agent.status(), WAIT, |s| s.replies > replies + 1).await?;
    let s = agent.status().borrow().clone();
    assert_eq!(s.package_offers, offers, "no set was offered since");
    assert_eq!(
        s.packages.get("").map(|p| p.version.as_str()),
        Some("0.2.0"),
        "{s:?}"
    );
    assert!(s.packages.contains_key("exporter"), "{s:?}");
    agent.stop().await;
    server.stop().await
}

/// An agent no assignment decides (it came with 0.1.0 of its own) is upgraded by a rollout
/// and rolled back: it returns to the build it ran before, tracked to verified.
#[tokio::test]
async fn a_rollback_returns_an_agent_to_the_build_it_came_with() -> anyhow::Result<()> {
    let signer = Signer::new();
    let server = serve_trusting(&signer).await?;
    import_version(&server, &signer, "0.1.0").await?;
    import_version(&server, &signer, "0.2.0").await?;
    let (agent, uid) = start_upgrading(&server, "came-with", false).await?;
    let (id, done) = upgrade_then_roll_back(&server, uid).await?;
    let view = upgrade_state(&server, uid).await?;
    assert_eq!(
        (view["state"].as_str(), view["desired"][""].as_str()),
        (Some("verified"), Some("0.1.0")),
        "{view}"
    );
    let s = agent.status().borrow().clone();
    assert_eq!(
        s.packages.get("").map(|p| p.version.as_str()),
        Some("0.1.0")
    );
    let (kinds, history) = event_kinds(&server.api, id).await?;
    assert_eq!(kinds.last().map(String::as_str), Some("rolled_back"));
    let detail = history
        .as_array()
        .and_then(|h| h.iter().find(|e| e["kind"] == "rolled_back"))
        .map(|e| e["detail"].clone())
        .unwrap_or_default();
    assert_eq!(
        (&detail["returned"], &detail["no_previous_version"]),
        (&json!(1), &json!(0)),
        "{done} {detail}"
    );
    agent.stop().await;
    server.stop().await
}

/// A downgrade is made only when asked for: with agents verified on 0.2.0, assigning or
/// rolling out 0.1.5 is refused with the versions they run; with `allow_downgrade` the
/// rollout is created and the permission is in the audit log.
#[tokio::test]
async fn a_downgrade_is_refused_unless_asked_for() -> anyhow::Result<()> {
    let signer = Signer::new();
    let server = serve_trusting(&signer).await?;
    import_version(&server, &signer, "0.2.0").await?;
    import_version(&server, &signer, "0.1.5").await?;
    let (agent, uid) = start_upgrading(&server, "downgrade", false).await?;
    assign_to_all(&server, "0.2.0").await?;
    eventually("the agent verified on 0.2.0", WAIT, || async {
        let v = upgrade_state(&server, uid).await?;
        Ok((v["state"] == "verified").then_some(()))
    })
    .await?;

    let (status, body) = server
        .api
        .raw(
            reqwest::Method::POST,
            "/api/v1/packages/assignments",
            Some(json!({ "name": "", "version": "0.1.5", "all": true })),
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("(0.2.0) than 0.1.5"), "{body}");
    let upgrade = json!({ "package": "", "version": "0.1.5", "all": true, "stages": "100%" });
    let (status, body) = server
        .api
        .raw(
            reqwest::Method::POST,
            "/api/v1/rollouts",
            Some(upgrade.clone()),
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    let mut allowed = upgrade;
    allowed["allow_downgrade"] = json!(true);
    let created = server.api.post("/api/v1/rollouts", allowed).await?;
    let id = created["id"].as_i64().expect("rollout id");
    let audit = server.api.get("/api/v1/audit?limit=50").await?;
    assert!(
        audit.as_array().is_some_and(|rows| rows.iter().any(|r| {
            r["action"] == "rollout.create"
                && r["detail"]["rollout_id"] == id
                && r["detail"]["allow_downgrade"] == true
        })),
        "{audit}"
    );
    agent.stop().await;
    server.stop().await
}
