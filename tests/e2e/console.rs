//! The operator console in a real browser (Debian's chromium, headless, over chromedriver),
//! against a real server with real agents: the Rust test agent and the PyPI client. Every
//! page visited is saved under `target/console-screenshots/` for a person to look at.

use agent::{wait_for, Agent, AgentOptions};
use fantoccini::Locator;
use serde_json::{json, Value};
use shared::ids::InstanceUid;
use tests::browser::{console_session, Browser};
use tests::{eventually, Api, Fleet, TestServer, DEADLINE};

use crate::python::{python, PyAgent};

/// What a hostile agent calls itself: must show up as text, never run.
const XSS_NAME: &str = "<script>window.__xss=1</script>";
const XSS_ATTR: &str = "\"><img src=x onerror=\"window.__xss=2\">";

pub(crate) fn base(server: &TestServer) -> String {
    format!("http://{}", server.addr)
}

pub(crate) async fn sign_in(b: &Browser, server: &TestServer, token: &str) -> anyhow::Result<()> {
    b.goto(&format!("{}/ui/", base(server))).await?;
    // Not signed in: the console sends the browser to its sign-in page.
    b.fill("input#token", token).await?;
    b.click("section.signin button[type=submit]").await?;
    b.wait("#fleet-live").await?;
    Ok(())
}

/// Clicks a button guarded by a confirmation, and confirms.
pub(crate) async fn click_confirmed(b: &Browser, css: &str) -> anyhow::Result<()> {
    b.click(css).await?;
    b.client.accept_alert().await?;
    Ok(())
}

/// Waits until the text of `css` satisfies `pred`, reading the page as it is (no reload).
pub(crate) async fn until_text(
    b: &Browser,
    css: &str,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    eventually(what, DEADLINE, || async {
        let els = b.client.find_all(Locator::Css(css)).await?;
        for el in els {
            let t = el.text().await?;
            if pred(&t) {
                return Ok(Some(t));
            }
        }
        Ok(None)
    })
    .await
}

fn agent_opts(server: &TestServer, token: &str, uid: InstanceUid, name: &str) -> AgentOptions {
    AgentOptions {
        endpoint: server.ws_url(),
        token: Some(token.to_string()),
        instance_uid: Some(uid.0),
        description: vec![
            ("service.name".into(), name.into()),
            ("service.version".into(), "0.9.1".into()),
        ],
        non_identifying: vec![("host.name".into(), XSS_ATTR.into())],
        heartbeat: std::time::Duration::from_millis(300),
        ..AgentOptions::default()
    }
}

#[tokio::test]
async fn an_operator_runs_the_guide_in_the_browser() -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| c.self_agent.enabled = true).await?;
    let b = Browser::start().await?;
    let admin = server.api.token.clone();

    // Sign in; the Self-Agent is on the Fleet page; the footer names the version.
    b.goto(&format!("{}/ui/", base(&server))).await?;
    b.wait("input#token").await?;
    b.screenshot("01-sign-in").await?;
    sign_in(&b, &server, &admin).await?;
    until_text(&b, "#fleet-live tbody", "the Self-Agent listed", |t| {
        t.contains("ampora-self-agent")
    })
    .await?;
    assert!(
        b.text("#version")
            .await?
            .starts_with(coordinator::serve::VERSION),
        "the footer names the version"
    );
    b.screenshot("02-fleet").await?;

    // A token, created in the browser and shown once.
    b.goto(&format!("{}/ui/tokens", base(&server))).await?;
    b.fill("#new-token input#name", "browser-made").await?;
    b.fill("#new-token input#ttl", "1h").await?;
    b.click("#new-token button[type=submit]").await?;
    let token = b.text("#new-token-text").await?;
    assert!(token.starts_with("amp-bs."), "{token}");
    b.screenshot("03-token-created").await?;
    b.goto(&format!("{}/ui/tokens", base(&server))).await?;
    assert!(
        !b.client.source().await?.contains(&token),
        "a token is shown once, never in the list"
    );

    // An agent connects with it, calling itself something hostile.
    let uid = InstanceUid::new_v7();
    let caps = agent::DEFAULT_CAPABILITIES;
    let hostile = Agent::start(agent_opts(&server, &token, uid, XSS_NAME));
    let mut st = hostile.status();
    wait_for(&mut st, DEADLINE, |s| s.connected && s.replies > 0).await?;

    // The token is redeemed by that agent.
    b.goto(&format!("{}/ui/tokens", base(&server))).await?;
    let by = until_text(&b, "a.redeemed-by", "the token redeemed", |t| {
        t == uid.to_string()
    })
    .await?;
    assert_eq!(by, uid.to_string());
    b.screenshot("04-token-redeemed").await?;

    // Filter the fleet to it; its detail page: the Capabilities chip with exactly its bits,
    // its description as JSON, the hostile values as text.
    b.goto(&format!("{}/ui/?q={}", base(&server), uid)).await?;
    let rows = b
        .client
        .find_all(Locator::Css("#fleet-live tbody tr[data-uid]"))
        .await?;
    assert_eq!(rows.len(), 1, "the filter leaves one agent");
    assert!(b.text("#fleet-live tbody").await?.contains(XSS_NAME));
    b.click(&format!("tr[data-uid='{uid}'] td a")).await?;
    b.wait("#capabilities").await?;
    let declared: Vec<String> = {
        let mut v = Vec::new();
        for el in b
            .client
            .find_all(Locator::Css("#capabilities .cap.declared"))
            .await?
        {
            v.push(el.text().await?);
        }
        v
    };
    assert_eq!(declared, proto::agent_caps::names(caps));
    let description = b.text("#description").await?;
    let parsed: Value = serde_json::from_str(&description)?;
    assert_eq!(parsed["identifying"]["service.name"], XSS_NAME);
    assert_eq!(parsed["non_identifying"]["host.name"], XSS_ATTR);
    assert!(b.text("h1").await?.contains(XSS_NAME));
    b.no_markup_ran().await?;
    b.screenshot("05-agent-detail").await?;

    // Push a config while the agent is away: pending; it comes back: applied, seen live.
    hostile.stop().await;
    server
        .api
        .wait_agent(&uid.to_string(), "disconnected", |a| {
            a["connected"] == false
        })
        .await?;
    b.goto(&format!("{}/ui/configs", base(&server))).await?;
    b.fill("form.stacked input#name", "browser-config").await?;
    b.fill("form.stacked textarea#body", "receivers:\n  otlp: {}\n")
        .await?;
    b.click("form.stacked button[type=submit]").await?;
    b.wait("#config-body").await?;
    b.fill("#push input#value", &uid.to_string()).await?;
    click_confirmed(&b, "#push button[type=submit]").await?;
    assert!(b.text("#pushed").await?.contains("1 agent"));
    b.goto(&format!("{}/ui/?q={}", base(&server), uid)).await?;
    until_text(&b, "#fleet-live tbody", "the push pending", |t| {
        t.contains("pending")
    })
    .await?;
    b.screenshot("06-fleet-pending").await?;
    b.mark_page().await?;
    let back = Agent::start(agent_opts(&server, &token, uid, XSS_NAME));
    until_text(&b, "#fleet-live tbody", "the push applied, live", |t| {
        t.contains("applied")
    })
    .await?;
    b.still_same_page().await?;
    b.screenshot("07-fleet-applied").await?;

    // An agent that fails its config shows its error.
    let failing_uid = InstanceUid::new_v7();
    let failing_token = server.api.token("failing").await?;
    let mut o = agent_opts(&server, &failing_token, failing_uid, "failing-collector");
    o.fail_configs = true;
    let failing = Agent::start(o);
    let mut fst = failing.status();
    wait_for(&mut fst, DEADLINE, |s| s.connected && s.replies > 0).await?;
    let (id, _) = server.api.config("bad", "exporters: {debug: {}}\n").await?;
    server
        .api
        .assign(json!({ "config_id": id, "agent": failing_uid.to_string() }))
        .await?;
    b.goto(&format!("{}/ui/agents/{}", base(&server), failing_uid))
        .await?;
    let error = eventually("the agent's error shown", DEADLINE, || async {
        b.client.refresh().await?;
        let found = b.client.find_all(Locator::Css("#remote-error")).await?;
        match found.first() {
            Some(el) => Ok(Some(el.text().await?)),
            None => Ok(None),
        }
    })
    .await?;
    assert!(!error.is_empty());
    assert!(b.text("#config-state").await?.contains("failed"));
    b.screenshot("08-agent-failed").await?;

    // The PyPI client shows up on the Fleet page.
    let py_token = server.api.token("python").await?;
    let mut py = PyAgent::spawn(
        &python()?,
        &server.http_url(),
        &py_token,
        "python-collector",
    )?;
    py.wait_event("connected", |v| {
        v["event"] == "connected" || v["event"] == "message"
    })
    .await?;
    b.goto(&format!("{}/ui/?q=python-collector", base(&server)))
        .await?;
    until_text(&b, "#fleet-live tbody", "the Python agent listed", |t| {
        t.contains("python-collector")
    })
    .await?;
    b.screenshot("09-fleet-python").await?;
    py.stop().await?;

    // Revoke the browser-made token: the agent using it is cut off.
    b.goto(&format!("{}/ui/tokens", base(&server))).await?;
    let row = format!("tr[data-token] a.redeemed-by[href='/ui/agents/{uid}']");
    b.wait(&row).await?;
    let revoke = b
        .client
        .execute(
            "const a = document.querySelector(arguments[0]); \
             return a.closest('tr').dataset.token;",
            vec![json!(row)],
        )
        .await?;
    let token_id = revoke.as_str().unwrap_or_default().to_string();
    click_confirmed(&b, &format!("tr[data-token='{token_id}'] form button")).await?;
    until_text(
        &b,
        &format!("tr[data-token='{token_id}']"),
        "the token revoked",
        |t| t.contains("revoked"),
    )
    .await?;
    b.screenshot("10-token-revoked").await?;

    // An identity, revoked in the browser.
    let ca = std::fs::read_to_string(server.dir.path().join("tls").join("ca.pem"))?;
    let csr_token = server.api.token("csr").await?;
    let id = tests::identity::CsrIdentity::enroll(&server.wss_url(), &ca, &csr_token).await?;
    b.goto(&format!("{}/ui/identities", base(&server))).await?;
    b.wait("#identities").await?;
    b.screenshot("11-identities").await?;
    let serial = id.serial.clone();
    let form = format!("form[action='/ui/identities/{serial}/revoke'] button");
    click_confirmed(&b, &form).await?;
    // The form posts and the page reloads; the revocation is what the API shows next, not
    // necessarily at the first read (the old page may still be the one found).
    eventually("the identity revoked", DEADLINE, || async {
        let state = server
            .api
            .get(&format!("/api/v1/identities/{serial}"))
            .await?;
        Ok((state["state"] == "revoked").then_some(()))
    })
    .await?;
    b.wait("#identities").await?;

    // The audit page shows the description the hostile agent reported, as text.
    b.goto(&format!("{}/ui/audit?agent={}", base(&server), uid))
        .await?;
    until_text(&b, "table.audit", "the description audited", |t| {
        t.contains("agent.described")
    })
    .await?;
    b.screenshot("12-audit").await?;
    // Its export link serves the API's JSON lines to the signed-in browser.
    let href = b
        .wait("a#export")
        .await?
        .attr("href")
        .await?
        .unwrap_or_default();
    let export = reqwest::Client::new()
        .get(format!("{}{href}", base(&server)))
        .header(
            "cookie",
            format!("ampora_session={}", b.session_cookie().await?),
        )
        .send()
        .await?;
    assert_eq!(export.headers()["content-type"], "application/x-ndjson");
    let lines = export.text().await?;
    assert!(
        lines.lines().any(|l| l.contains("agent.described")),
        "{lines}"
    );

    back.stop().await;
    failing.stop().await;
    b.close().await?;
    server.stop().await
}

#[tokio::test]
async fn a_viewer_has_no_write_controls_and_forged_posts_are_refused() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let v = server
        .api
        .post(
            "/api/v1/api-tokens",
            json!({ "name": "watcher", "role": "viewer" }),
        )
        .await?;
    let viewer_token = v["token"].as_str().unwrap_or_default().to_string();
    let (config_id, _) = server.api.config("seen", "receivers: {}\n").await?;
    let b = Browser::start().await?;
    sign_in(&b, &server, &viewer_token).await?;

    b.goto(&format!("{}/ui/configs", base(&server))).await?;
    b.wait("#configs").await?;
    assert!(!b.has("form[method=post][action='/ui/configs']").await?);
    b.goto(&format!("{}/ui/configs/{config_id}", base(&server)))
        .await?;
    b.wait("#config-body").await?;
    assert!(!b.has("#push").await?, "a viewer gets no push form");
    b.goto(&format!("{}/ui/identities", base(&server))).await?;
    b.wait("#identities").await?;
    assert!(!b.has("form[action$='/revoke']").await?);
    b.goto(&format!("{}/ui/tokens", base(&server))).await?;
    assert!(b.text("h1").await?.contains("Forbidden"));
    b.screenshot("20-viewer-forbidden").await?;

    // The viewer's own session and CSRF secret, replayed by hand: the role still decides.
    let cookie = b.session_cookie().await?;
    b.goto(&format!("{}/ui/", base(&server))).await?;
    let csrf = b
        .wait("input[name=csrf]")
        .await?
        .attr("value")
        .await?
        .unwrap_or_default();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let post = |path: &str, cookie: &str, form: Vec<(&str, String)>| {
        http.post(format!("{}{path}", base(&server)))
            .header("cookie", format!("ampora_session={cookie}"))
            .form(&form)
            .send()
    };
    let push = vec![
        ("csrf", csrf.clone()),
        ("config_id", config_id.to_string()),
        ("target", "all".to_string()),
    ];
    assert_eq!(post("/ui/push", &cookie, push.clone()).await?.status(), 403);

    // An admin's session without its CSRF secret, or from another site: refused too.
    let admin = Browser::start().await?;
    sign_in(&admin, &server, &server.api.token.clone()).await?;
    let admin_cookie = admin.session_cookie().await?;
    let forged = vec![
        ("csrf", "not-the-secret".to_string()),
        ("config_id", config_id.to_string()),
        ("target", "all".to_string()),
    ];
    assert_eq!(post("/ui/push", &admin_cookie, forged).await?.status(), 403);
    let cross = http
        .post(format!("{}/ui/push", base(&server)))
        .header("cookie", format!("ampora_session={admin_cookie}"))
        .header("origin", "https://evil.example")
        .form(&push)
        .send()
        .await?;
    assert_eq!(cross.status(), 403);
    assert_eq!(
        server.api.get("/api/v1/assignments").await?,
        json!([]),
        "nothing was pushed"
    );

    // Signing out ends the session on the server: the same cookie no longer works.
    admin.goto(&format!("{}/ui/", base(&server))).await?;
    admin.click("header .who button").await?;
    admin.wait("input#token").await?;
    let after = http
        .get(format!("{}/ui/", base(&server)))
        .header("cookie", format!("ampora_session={admin_cookie}"))
        .send()
        .await?;
    assert_eq!(after.status(), 303, "redirected to sign in");

    admin.close().await?;
    b.close().await?;
    server.stop().await
}

/// The console on a cluster coordinator: sign in, and the fleet it shows includes agents
/// served by the other coordinator.
#[tokio::test]
async fn the_console_runs_on_every_coordinator() -> anyhow::Result<()> {
    let cluster = tests::cluster::Cluster::start(1, 2, |_| {}).await?;
    let token = cluster.api_of(0)?.token("console").await?;
    let agent = Agent::start(AgentOptions {
        endpoint: cluster.ws_url(),
        token: Some(token),
        description: vec![("service.name".into(), "cluster-agent".into())],
        ..AgentOptions::default()
    });
    let mut st = agent.status();
    wait_for(&mut st, DEADLINE, |s| s.connected && s.replies > 0).await?;
    for i in 0..2 {
        let api: Api = cluster.api_of(i)?;
        let (http, cookie) = console_session(&api.base, &api.token).await?;
        eventually(
            "the agent on this coordinator's fleet page",
            DEADLINE,
            || async {
                let page = http
                    .get(format!("{}/ui/?q=cluster-agent", api.base))
                    .header("cookie", &cookie)
                    .send()
                    .await?
                    .text()
                    .await?;
                Ok(page.contains("cluster-agent").then_some(()))
            },
        )
        .await?;
    }
    agent.stop().await;
    cluster.stop().await
}
