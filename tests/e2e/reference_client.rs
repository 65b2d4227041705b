//! Agents that behave like the reference OpAMP client library (opamp-go), on which the
//! OpenTelemetry Collector's opamp extension and opampsupervisor are built (issue 18): they
//! reconnect at once after the server closes an established WebSocket, restart their client on
//! every connection-settings offer, keep an offered certificate only in memory and pick the
//! transport from the offered endpoint's scheme. Bounds on what such agents cost and see: an
//! agent that restarts on every offer ends on one connection with its certificate; one that
//! comes back with its token after its identity was confirmed is refused only a handful of
//! times (and audited a handful of times) per window; a plain-HTTP agent stays on HTTP; a
//! generated private key is sent in one offer only.

use std::time::Duration;

use agent::{wait_for, Agent, AgentOptions, AgentStatus, ClientTls, Scheme};
use serde_json::Value;
use shared::ids::InstanceUid;
use tests::cluster::Cluster;
use tests::identity::{connected_on_certificate, TlsFiles};
use tests::{eventually, Api, Fleet, TestServer, DEADLINE};
use tokio::sync::watch;

/// "A handful" of connections for an agent that should settle on one (bootstrap, then its
/// certificate, with room for one reconnect).
const SETTLED_CONNECTIONS: u64 = 5;
/// How long a settled agent is watched for a loop.
const SETTLE_WINDOW: Duration = Duration::from_secs(20);
/// How long a refused agent is watched.
const REFUSAL_WINDOW: Duration = Duration::from_secs(30);
/// "A handful" of refusals (and audit rows) in [`REFUSAL_WINDOW`]: opamp-go's own back-off
/// from refusals at the upgrade (0.5 s doubling, ±50 %) makes 6–8 attempts in 30 s, so a
/// server that makes each attempt cost a back-off step meets it; one that lets the agent
/// reconnect at once after a refusal does not.
const REFUSAL_BOUND: u64 = 8;
/// A window in which something that must not happen again (an offer, a transport change)
/// would have happened: several heartbeats.
const QUIET_WINDOW: Duration = Duration::from_secs(5);

/// Where the agents connect: the same listener over TLS for both transports, what to trust,
/// and the API to look at.
struct Target {
    wss: String,
    https: String,
    tls: ClientTls,
    api: Api,
}

impl Target {
    fn embedded(server: &TestServer) -> anyhow::Result<Self> {
        Ok(Self {
            wss: server.wss_url(),
            https: server.https_url(),
            tls: server.client_tls()?,
            api: server.api.clone(),
        })
    }

    fn cluster(c: &Cluster, files: &TlsFiles) -> anyhow::Result<Self> {
        Ok(Self {
            wss: c.wss_url_of(0)?,
            https: format!("https://{}/v1/opamp", c.gateway_addr(0)?),
            tls: files.client_tls()?,
            api: c.api().clone(),
        })
    }

    /// An agent of a fresh UID on the bootstrap token `token`, over `endpoint`, taking up
    /// offered certificates; `opamp_go` adds opamp-go's behaviours.
    fn agent(&self, endpoint: &str, token: &str, uid: InstanceUid) -> AgentOptions {
        AgentOptions {
            endpoint: endpoint.to_string(),
            tls: Some(self.tls.clone()),
            token: Some(token.to_string()),
            instance_uid: Some(uid.0),
            description: vec![("service.name".into(), "otelcol-contrib".into())],
            accept_identity: true,
            ..AgentOptions::default()
        }
    }
}

/// Everything opamp-go does that Ampora's own agents do differently.
fn opamp_go(opts: AgentOptions) -> AgentOptions {
    AgentOptions {
        reconnect_at_once_after_close: true,
        restart_on_settings_offer: true,
        forget_identity_on_restart: true,
        transport_from_offer_scheme: true,
        ..opts
    }
}

/// Short heartbeats (offered with the certificate), so repeats have chances to show.
fn quick_heartbeats(cfg: &mut coordinator::config::Config) {
    cfg.opamp.heartbeat_interval_secs = 1;
}

/// Watches `rx` for `window`: the first status for which `bad` holds, or `None` when it never
/// did. A measurement over a fixed window, not a synchronisation.
async fn watch_for(
    rx: &mut watch::Receiver<AgentStatus>,
    window: Duration,
    bad: impl Fn(&AgentStatus) -> bool,
) -> Option<AgentStatus> {
    tokio::time::timeout(window, rx.wait_for(|s| bad(s)))
        .await
        .ok()
        .and_then(|r| r.ok().map(|s| s.clone()))
}

/// (a) An agent that restarts its client on every offer takes its certificate and stays on
/// it: not offered it again on the connection it makes with it.
async fn restarting_agent_settles_on_its_certificate(t: &Target) -> anyhow::Result<()> {
    let token = t.api.token("restarts-on-offers").await?;
    let agent = Agent::start(opamp_go(t.agent(&t.wss, &token, InstanceUid::new_v7())));
    let mut rx = agent.status();
    let serial = connected_on_certificate(&mut rx).await?;
    let looped = watch_for(&mut rx, SETTLE_WINDOW, |s| {
        s.connections_attempted > SETTLED_CONNECTIONS
    })
    .await;
    assert!(
        looped.is_none(),
        "more than {SETTLED_CONNECTIONS} connections within {SETTLE_WINDOW:?}: {looped:?}"
    );
    let s = rx.borrow().clone();
    assert!(s.connected, "{s:?}");
    assert_eq!(
        s.client_cert_serial.as_deref(),
        Some(serial.as_str()),
        "{s:?}"
    );
    assert!(
        s.client_restarts <= 2,
        "restarted on repeated offers: {s:?}"
    );
    agent.stop().await;
    Ok(())
}

/// (b) An agent whose identity is confirmed comes back after a process restart with its
/// bootstrap token (`identity_required`), reconnecting like opamp-go: it is refused, and
/// audited, at most a handful of times in the window.
async fn restarted_agent_without_its_certificate_is_refused_a_handful_of_times(
    t: &Target,
) -> anyhow::Result<()> {
    let token = t.api.token("forgets-its-certificate").await?;
    let uid = InstanceUid::new_v7();
    let uid_text = uid.to_string();
    let mut agent = Agent::start(AgentOptions {
        reconnect_at_once_after_close: true,
        forget_identity_on_restart: true,
        ..t.agent(&t.wss, &token, uid)
    });
    let mut rx = agent.status();
    let serial = connected_on_certificate(&mut rx).await?;
    t.api.wait_identity(&uid_text, &serial, "confirmed").await?;
    // Nothing refused for this reason before the restart.
    let before = refusal_rows(&t.api, "identity_required").await?;
    assert!(before.is_empty(), "{before:?}");

    agent.restart_process().await;
    let attempts_before = rx.borrow().connections_attempted;
    wait_for(&mut rx, DEADLINE, |s| {
        s.process_restarts == 1 && s.client_cert_serial.is_none() && s.last_error.is_some()
    })
    .await?;
    let looped = watch_for(&mut rx, REFUSAL_WINDOW, |s| {
        s.connections_attempted - attempts_before > REFUSAL_BOUND
    })
    .await;
    let s = rx.borrow().clone();
    agent.stop().await;
    assert!(
        looped.is_none(),
        "more than {REFUSAL_BOUND} connections within {REFUSAL_WINDOW:?} after the restart: \
         {looped:?}"
    );
    assert!(s.client_cert_serial.is_none(), "back on its token: {s:?}");
    // Every attempt since the restart was refused (at the upgrade, or on its first frame).
    let attempts = s.connections_attempted - attempts_before;

    // Audited as `identity_required` (whatever the agent was told), in aggregate: every
    // attempt counted once its window is summarised, in at most a handful of rows.
    let all_counted = eventually("every refused attempt audited", DEADLINE, || async {
        let rows = refusal_rows(&t.api, "identity_required").await?;
        Ok((tests::refusals(&rows) >= attempts).then_some(()))
    })
    .await;
    let rows = refusal_rows(&t.api, "identity_required").await?;
    assert!(
        all_counted.is_ok(),
        "{} refusals audited for {attempts} attempts: {rows:?}",
        tests::refusals(&rows)
    );
    assert!(
        rows.len() as u64 <= REFUSAL_BOUND,
        "{} audit rows for {attempts} attempts: {rows:?}",
        rows.len()
    );
    Ok(())
}

/// The audit rows of refusals for `reason`.
async fn refusal_rows(api: &Api, reason: &str) -> anyhow::Result<Vec<Value>> {
    let v = api.get(&format!("/api/v1/audit?reason={reason}")).await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["action"] == "auth.failed")
        .cloned()
        .collect())
}

/// (b') An agent on a token another agent redeemed (`already_redeemed`, decided only once its
/// first frame names it), reconnecting like opamp-go: refused, and audited, at most a handful
/// of times in the window.
async fn agent_on_a_token_bound_to_another_is_refused_a_handful_of_times(
    t: &Target,
) -> anyhow::Result<()> {
    let token = t.api.token("taken").await?;
    // The owner stays on its token (with a certificate the refusal would be
    // `identity_required`).
    let owner = Agent::start(AgentOptions {
        accept_identity: false,
        ..t.agent(&t.wss, &token, InstanceUid::new_v7())
    });
    wait_for(&mut owner.status(), DEADLINE, |s| {
        s.connected && s.replies >= 1
    })
    .await?;
    owner.stop().await;

    let agent = Agent::start(opamp_go(t.agent(&t.wss, &token, InstanceUid::new_v7())));
    let mut rx = agent.status();
    let looped = watch_for(&mut rx, REFUSAL_WINDOW, |s| {
        s.connections_attempted > REFUSAL_BOUND
    })
    .await;
    let s = rx.borrow().clone();
    agent.stop().await;
    assert!(
        looped.is_none(),
        "more than {REFUSAL_BOUND} connections within {REFUSAL_WINDOW:?}: {looped:?}"
    );
    assert!(s.replies == 0 || s.last_error.is_some(), "refused: {s:?}");
    let attempts = s.connections_attempted;
    let all_counted = eventually("every refused attempt audited", DEADLINE, || async {
        let rows = refusal_rows(&t.api, "already_redeemed").await?;
        Ok((tests::refusals(&rows) >= attempts).then_some(()))
    })
    .await;
    let rows = refusal_rows(&t.api, "already_redeemed").await?;
    assert!(
        all_counted.is_ok(),
        "{} refusals audited for {attempts} attempts: {rows:?}",
        tests::refusals(&rows)
    );
    assert!(
        rows.len() as u64 <= REFUSAL_BOUND,
        "{} audit rows for {attempts} attempts: {rows:?}",
        rows.len()
    );
    Ok(())
}

/// (c) A plain-HTTP agent that takes its transport from the offered endpoint is offered an
/// `https://` endpoint (never `wss://`) and stays on HTTP.
async fn http_agent_stays_on_http(t: &Target) -> anyhow::Result<()> {
    let token = t.api.token("http-agent").await?;
    let agent = Agent::start(AgentOptions {
        transport_from_offer_scheme: true,
        reconnect_at_once_after_close: true,
        heartbeat: Duration::from_millis(500),
        ..t.agent(&t.https, &token, InstanceUid::new_v7())
    });
    let mut rx = agent.status();
    let offered = wait_for(&mut rx, DEADLINE, |s| s.settings_offers_with_key >= 1).await?;
    // An endpoint is offered (the protocol says it must not be empty), and it is HTTP's.
    assert!(
        !offered.offered_endpoints.is_empty()
            && offered
                .offered_endpoints
                .iter()
                .all(|e| e.starts_with("https://")),
        "a plain-HTTP agent is offered its own transport: {:?}",
        offered.offered_endpoints
    );
    connected_on_certificate(&mut rx).await?;
    let moved = watch_for(&mut rx, QUIET_WINDOW, |s| {
        s.transport != Some(Scheme::Http)
            || s.offered_endpoints
                .iter()
                .any(|e| !e.starts_with("https://"))
    })
    .await;
    let s = rx.borrow().clone();
    agent.stop().await;
    assert!(moved.is_none(), "left HTTP: {moved:?}");
    assert_eq!(s.transport, Some(Scheme::Http), "{s:?}");
    Ok(())
}

/// (d) A private key Ampora generates is in exactly one offer: not repeated on the connection
/// made with its certificate, nor on a later one.
async fn generated_key_is_offered_once(t: &Target) -> anyhow::Result<()> {
    let token = t.api.token("one-key").await?;
    let mut agent = Agent::start(AgentOptions {
        heartbeat: Duration::from_millis(500),
        ..t.agent(&t.wss, &token, InstanceUid::new_v7())
    });
    let mut rx = agent.status();
    connected_on_certificate(&mut rx).await?;
    let again = watch_for(&mut rx, QUIET_WINDOW, |s| s.settings_offers_with_key > 1).await;
    assert!(again.is_none(), "the key was offered again: {again:?}");
    // A new process that kept its certificate: a new connection, still no key.
    agent.restart_process().await;
    wait_for(&mut rx, DEADLINE, |s| {
        s.process_restarts == 1 && s.connected && s.client_cert_serial.is_some()
    })
    .await?;
    let again = watch_for(&mut rx, QUIET_WINDOW, |s| s.settings_offers_with_key > 1).await;
    let s = rx.borrow().clone();
    agent.stop().await;
    assert!(again.is_none(), "the key was offered again: {again:?}");
    assert_eq!(s.settings_offers_with_key, 1, "{s:?}");
    Ok(())
}

/// The embedded default with short heartbeats.
async fn embedded() -> anyhow::Result<TestServer> {
    TestServer::start_with(quick_heartbeats).await
}

/// A sandbox of one gateway and one coordinator with TLS and an agent CA.
async fn cluster(files: &TlsFiles) -> anyhow::Result<Cluster> {
    Cluster::start(1, 1, |cfg| {
        files.configure(cfg);
        quick_heartbeats(cfg);
    })
    .await
}

#[tokio::test]
async fn embedded_restarting_agent_settles_on_its_certificate() -> anyhow::Result<()> {
    let server = embedded().await?;
    restarting_agent_settles_on_its_certificate(&Target::embedded(&server)?).await?;
    server.stop().await
}

#[tokio::test]
async fn cluster_restarting_agent_settles_on_its_certificate() -> anyhow::Result<()> {
    let files = TlsFiles::create()?;
    let c = cluster(&files).await?;
    restarting_agent_settles_on_its_certificate(&Target::cluster(&c, &files)?).await?;
    c.stop().await
}

#[tokio::test]
async fn embedded_restarted_agent_without_its_certificate_is_refused_a_handful_of_times(
) -> anyhow::Result<()> {
    let server = embedded().await?;
    restarted_agent_without_its_certificate_is_refused_a_handful_of_times(&Target::embedded(
        &server,
    )?)
    .await?;
    server.stop().await
}

#[tokio::test]
async fn cluster_restarted_agent_without_its_certificate_is_refused_a_handful_of_times(
) -> anyhow::Result<()> {
    let files = TlsFiles::create()?;
    let c = cluster(&files).await?;
    restarted_agent_without_its_certificate_is_refused_a_handful_of_times(&Target::cluster(
        &c, &files,
    )?)
    .await?;
    c.stop().await
}

#[tokio::test]
async fn embedded_agent_on_a_token_bound_to_another_is_refused_a_handful_of_times(
) -> anyhow::Result<()> {
    let server = embedded().await?;
    agent_on_a_token_bound_to_another_is_refused_a_handful_of_times(&Target::embedded(&server)?)
        .await?;
    server.stop().await
}

#[tokio::test]
async fn cluster_agent_on_a_token_bound_to_another_is_refused_a_handful_of_times(
) -> anyhow::Result<()> {
    let files = TlsFiles::create()?;
    let c = cluster(&files).await?;
    agent_on_a_token_bound_to_another_is_refused_a_handful_of_times(&Target::cluster(&c, &files)?)
        .await?;
    c.stop().await
}

#[tokio::test]
async fn embedded_http_agent_stays_on_http() -> anyhow::Result<()> {
    let server = embedded().await?;
    http_agent_stays_on_http(&Target::embedded(&server)?).await?;
    server.stop().await
}

#[tokio::test]
async fn embedded_generated_key_is_offered_once() -> anyhow::Result<()> {
    let server = embedded().await?;
    generated_key_is_offered_once(&Target::embedded(&server)?).await?;
    server.stop().await
}

#[tokio::test]
async fn cluster_http_agent_stays_on_http() -> anyhow::Result<()> {
    let files = TlsFiles::create()?;
    let c = cluster(&files).await?;
    http_agent_stays_on_http(&Target::cluster(&c, &files)?).await?;
    c.stop().await
}

#[tokio::test]
async fn cluster_generated_key_is_offered_once() -> anyhow::Result<()> {
    let files = TlsFiles::create()?;
    let c = cluster(&files).await?;
    generated_key_is_offered_once(&Target::cluster(&c, &files)?).await?;
    c.stop().await
}

/// Agents in the restarting fleet.
const FLEET: usize = 12;
/// How long the fleet gets to settle after restarting together.
const FLEET_SETTLE: Duration = Duration::from_secs(60);

/// A fleet of opamp-go style agents that restart together settles within a minute with no
/// loop: those that kept their certificates are back on them after a connection or two,
/// those that forgot them are refused (`identity_required`) a handful of times, spaced by
/// their back-off, and none is offered anything again.
async fn a_fleet_restarting_together_settles(t: &Target) -> anyhow::Result<()> {
    let mut fleet = Vec::new();
    for i in 0..FLEET {
        let token = t.api.token(&format!("fleet-{i}")).await?;
        let mut opts = opamp_go(t.agent(&t.wss, &token, InstanceUid::new_v7()));
        opts.forget_identity_on_restart = i % 2 == 0;
        let agent = Agent::start(opts);
        let mut rx = agent.status();
        let serial = connected_on_certificate(&mut rx).await?;
        fleet.push((agent, rx, serial));
    }
    let before: Vec<u64> = fleet
        .iter()
        .map(|(_, rx, _)| rx.borrow().connections_attempted)
        .collect();
    for (agent, _, _) in &mut fleet {
        agent.restart_process().await;
    }
    let started = tokio::time::Instant::now();
    // Those that kept their certificates reconnect on them.
    for (i, (_, rx, serial)) in fleet.iter_mut().enumerate().filter(|(i, _)| i % 2 == 1) {
        let back = tokio::time::timeout_at(
            started + FLEET_SETTLE,
            rx.wait_for(|s| s.connected && s.client_cert_serial.as_deref() == Some(serial)),
        )
        .await;
        assert!(back.is_ok(), "agent {i} is not back on its certificate");
    }
    // Watch the rest of the minute: no agent loops.
    tokio::time::sleep_until(started + FLEET_SETTLE).await;
    for (i, (agent, rx, _)) in fleet.into_iter().enumerate() {
        let s = rx.borrow().clone();
        let attempts = s.connections_attempted - before[i];
        let bound = if i % 2 == 0 { REFUSAL_BOUND + 4 } else { 3 };
        assert!(
            attempts <= bound,
            "agent {i} ({}) made {attempts} connections in {FLEET_SETTLE:?}: {s:?}",
            if i % 2 == 0 {
                "forgot its certificate"
            } else {
                "kept it"
            }
        );
        agent.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn embedded_a_fleet_restarting_together_settles() -> anyhow::Result<()> {
    let server = embedded().await?;
    a_fleet_restarting_together_settles(&Target::embedded(&server)?).await?;
    server.stop().await
}
