//! Rollouts, groups and drift in the console, in a real browser against a real server with
//! real agents: a group made in the browser, a rollout of a version the canary refuses
//! created from the form, its page showing the failed gate (the agent's error, the agent
//! linked) live, rolled back with its button; hostile group names and labels shown as text;
//! a viewer without write controls; a drifted agent re-applied and adopted from its page.
//! Screenshots go to `target/console-screenshots/`.

use agent::{wait_for, Agent};
use anyhow::Context as _;
use serde_json::{json, Value};
use tests::browser::{console_session, Browser};
use tests::{Api, TestServer, DEADLINE};

use crate::console::{base, click_confirmed, sign_in, until_text};
use crate::opamp::{opts, uid_of};
use crate::rollouts::Handmade;

/// Marker the test agents refuse (FAILED) in a config.
const BAD: &str = "kafka/broken";
const XSS_LABEL: &str = "<script>window.__xss=1</script>";
const XSS_NAME: &str = "\"><img src=x onerror=\"window.__xss=2\">";

/// `n` agents labelled `ring=<ring>` that refuse configs containing [`BAD`], connected.
async fn ring(
    server: &TestServer,
    n: usize,
    ring: &str,
) -> anyhow::Result<(Vec<Agent>, Vec<String>)> {
    let (mut agents, mut uids) = (Vec::new(), Vec::new());
    for i in 0..n {
        let token = server.api.token(&format!("{ring}-{i}")).await?;
        let mut o = opts(server.ws_url(), token, &format!("{ring}-{i}"));
        o.non_identifying.push(("ring".into(), ring.into()));
        o.fail_configs_containing = Some(BAD.into());
        let a = Agent::start(o);
        let s = wait_for(&mut a.status(), DEADLINE, |s| s.connected && s.replies > 0).await?;
        uids.push(uid_of(&s));
        agents.push(a);
    }
    Ok((agents, uids))
}

async fn applied(api: &Api, uid: &str, hash: &str) -> anyhow::Result<Value> {
    api.wait_agent(uid, &format!("APPLIED {hash}"), |a| {
        a["remote_config"]["hash"] == hash && a["remote_config"]["status"] == "APPLIED"
    })
    .await
}

/// Replaces what the field matching `css` holds with `text`.
async fn set(b: &Browser, css: &str, text: &str) -> anyhow::Result<()> {
    b.wait(css).await?.clear().await?;
    b.fill(css, text).await
}

#[tokio::test]
async fn an_operator_rolls_out_sees_the_canary_fail_and_rolls_back() -> anyhow::Result<()> {
    let server = TestServer::start_with(tests::per_ip_limits_off).await?;
    let api = &server.api;
    let url = |path: &str| format!("{}{path}", base(&server));
    let (agents, uids) = ring(&server, 3, "console").await?;
    let (v1, v1_hash) = api.config("console-v1", "receivers: {otlp: {}}\n").await?;
    api.assign(json!({ "config_id": v1, "labels": { "ring": "console" } }))
        .await?;
    for uid in &uids {
        applied(api, uid, &v1_hash).await?;
    }
    let (bad, _) = api
        .config("console-bad", &format!("exporters: {{{BAD}: {{}}}}\n"))
        .await?;

    let b = Browser::start().await?;
    sign_in(&b, &server, &api.token).await?;

    // Groups: the ring, and one named and labelled with markup (shown as text).
    b.goto(&url("/ui/groups")).await?;
    for (name, labels) in [
        ("console-ring", "ring=console"),
        (XSS_NAME, &*format!("x={XSS_LABEL}")),
    ] {
        b.fill("#new-group input#name", name).await?;
        b.fill("#new-group input#labels", labels).await?;
        b.click("#new-group button[type=submit]").await?;
        b.wait("#groups").await?;
    }
    let row = until_text(&b, "#groups tbody tr", "the ring's group", |t| {
        t.starts_with("console-ring")
    })
    .await?;
    assert!(row.contains("ring=console") && row.contains(" 3 "), "{row}");
    let hostile = until_text(&b, "#groups tbody tr", "the hostile group", |t| {
        t.contains(XSS_LABEL)
    })
    .await?;
    assert!(hostile.contains(XSS_NAME), "{hostile}");
    let link = b
        .wait("tr[data-group='console-ring'] a.group-link")
        .await?
        .attr("href")
        .await?
        .unwrap_or_default();
    assert_eq!(
        link, "/ui/?label=ring%3Dconsole",
        "the group links to its fleet"
    );
    b.no_markup_ran().await?;
    b.screenshot("30-groups").await?;

    // A rollout of the refused version to the group, from the form, without a soak.
    b.goto(&url("/ui/rollouts")).await?;
    b.wait("select#config_id")
        .await?
        .select_by_value(&bad.to_string())
        .await?;
    b.wait("select#target")
        .await?
        .select_by_value("group")
        .await?;
    b.wait("select#group")
        .await?
        .select_by_value("console-ring")
        .await?;
    set(&b, "input#stages", "1,100%").await?;
    set(&b, "input#soak", "0s").await?;
    b.no_markup_ran().await?;
    click_confirmed(&b, "#new-rollout button[type=submit]").await?;
    b.wait("#rollout-live").await?;
    let id: i64 = b
        .client
        .current_url()
        .await?
        .path()
        .rsplit('/')
        .next()
        .context("rollout id")?
        .parse()?;

    // The page follows the rollout by itself until the canary's gate fails.
    b.mark_page().await?;
    until_text(&b, "#rollout-state", "the rollout failed", |t| {
        t == "failed"
    })
    .await?;
    b.still_same_page().await?;
    let reason = b.text("#rollout-reason").await?;
    assert!(
        reason.contains("stage 1 gate failed")
            && reason.contains("reported FAILED")
            && reason.contains(agent::DISLIKED),
        "{reason}"
    );
    let failing = b
        .wait("#gate-1 a.failing-agent")
        .await?
        .attr("href")
        .await?
        .unwrap_or_default();
    let canary = failing.trim_start_matches("/ui/agents/").to_string();
    assert!(uids.contains(&canary), "the canary is linked: {failing}");
    assert!(b.text("#gate-1").await?.contains(agent::DISLIKED));
    assert!(b.text("#rollout-stage").await? == "1/2");
    assert!(b.has("button.act-rollback").await? && b.has("button.act-resume").await?);
    assert!(
        !b.has("button.act-pause").await?,
        "a failed rollout cannot be paused"
    );
    assert!(b.text("#history").await?.contains("gate_failed"));
    b.screenshot("31-rollout-failed").await?;

    click_confirmed(&b, "button.act-rollback").await?;
    until_text(&b, "#rollout-state", "rolled back", |t| t == "rolled_back").await?;
    applied(api, &canary, &v1_hash).await?;
    assert!(
        !b.has("#rollout-actions button").await?,
        "nothing left to do"
    );
    assert!(b.text("#history").await?.contains("rollback_started"));
    b.screenshot("32-rollout-rolled-back").await?;

    b.goto(&url("/ui/rollouts")).await?;
    let listed = b.text(&format!("tr[data-rollout='{id}']")).await?;
    assert!(
        listed.contains("rolled_back") && listed.contains("console-ring") && listed.contains("1/2"),
        "{listed}"
    );
    b.screenshot("33-rollouts").await?;
    b.goto(&url(&format!("/ui/configs/{bad}"))).await?;
    b.wait(&format!("#rollouts tr[data-rollout='{id}']"))
        .await?;

    // A viewer sees the pages without any write control, and cannot post one by hand.
    let viewer = api
        .post(
            "/api/v1/api-tokens",
            json!({ "name": "rollout-watcher", "role": "viewer" }),
        )
        .await?;
    let (http, cookie) =
        console_session(&base(&server), viewer["token"].as_str().context("token")?).await?;
    let get = |path: String| {
        let req = http.get(url(&path)).header("cookie", &cookie);
        async move { anyhow::Ok(req.send().await?.text().await?) }
    };
    let list = get("/ui/rollouts".into()).await?;
    assert!(list.contains(&format!("data-rollout=\"{id}\"")) && !list.contains("new-rollout"));
    let detail = get(format!("/ui/rollouts/{id}")).await?;
    assert!(detail.contains("rolled_back") && !detail.contains("rollout-actions"));
    let groups = get("/ui/groups".into()).await?;
    assert!(groups.contains("console-ring") && !groups.contains("/ui/groups/delete"));
    let csrf = detail
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .context("the viewer's csrf")?
        .to_string();
    let forged = http
        .post(url(&format!("/ui/rollouts/{id}/resume")))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf)])
        .send()
        .await?;
    assert_eq!(forged.status(), 403, "a viewer acts on no rollout");

    for a in agents {
        a.stop().await;
    }
    b.close().await?;
    server.stop().await
}

#[tokio::test]
async fn a_drifted_agent_is_reapplied_and_adopted_from_its_page() -> anyhow::Result<()> {
    let server = TestServer::start_with(tests::per_ip_limits_off).await?;
    let api = &server.api;
    let mut h = Handmade::connect(&server, "console-drift").await?;
    let uid = h.uid.to_string();
    api.wait_agent(&uid, "connected", |v| v["connected"] == true)
        .await?;
    let (v1, _) = api.config("drift-v1", "e: 1\n").await?;
    api.assign(json!({ "config_id": v1, "agent": uid })).await?;
    let h1 = h.offered().await?;
    h.report(Some(&h1), "e: 1\n").await?;
    api.wait_agent(&uid, "applied", |v| v["config_state"] == "applied")
        .await?;

    let b = Browser::start().await?;
    sign_in(&b, &server, &api.token).await?;
    let page = format!("{}/ui/agents/{uid}", base(&server));
    b.goto(&page).await?;
    b.wait("#config-state").await?;
    assert!(!b.has("#drift").await?, "an applied agent is not drifted");

    // A local edit: the page says so and offers both answers.
    h.report(None, "e: 1\nlocal: edit\n").await?;
    api.wait_agent(&uid, "drifted", |v| v["config_state"] == "drifted")
        .await?;
    b.goto(&page).await?;
    assert!(b.text("#drift").await?.contains("Drifted"));
    b.screenshot("34-agent-drifted").await?;
    click_confirmed(&b, "#reapply button").await?;
    assert_eq!(h.offered().await?, h1, "the assigned config, sent again");
    h.report(Some(&h1), "e: 1\n").await?;
    api.wait_agent(&uid, "applied again", |v| v["config_state"] == "applied")
        .await?;

    h.report(None, "e: 1\nkept: locally\n").await?;
    api.wait_agent(&uid, "drifted", |v| v["config_state"] == "drifted")
        .await?;
    b.goto(&page).await?;
    b.fill("#adopt input#adopt-name", "adopted-in-console")
        .await?;
    click_confirmed(&b, "#adopt button").await?;
    let offered = h.offered().await?;
    assert_ne!(offered, h1, "the adopted version is sent");
    let configs = api.get("/api/v1/configs").await?;
    let adopted = configs
        .as_array()
        .and_then(|c| c.iter().find(|v| v["name"] == "adopted-in-console"))
        .context("the adopted version")?;
    assert_eq!(adopted["hash"], hex::encode(&offered));
    let audit = api.get("/api/v1/audit?limit=50").await?;
    let console_actions: Vec<&str> = audit
        .as_array()
        .context("audit")?
        .iter()
        .filter(|e| e["actor"].as_str().is_some_and(|a| a.starts_with("api:")))
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        console_actions.contains(&"config.reapply") && console_actions.contains(&"config.adopt"),
        "{console_actions:?}"
    );
    b.close().await?;
    server.stop().await
}
