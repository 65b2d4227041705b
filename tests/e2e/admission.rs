//! Admission control: a storm of new connections and requests is refused cheaply (503 at the
//! connection cap, 429 over the accept rate, both with `Retry-After`), while readiness and the
//! agents already connected carry on; and a fresh gateway warms up. How each refusal is counted
//! is asserted in the serial metrics binary (`tests/metrics/admission.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::{wait_for, Agent, ConnectError, WsConnection};
use tests::cluster::Cluster;
use tests::{bearer, eventually, Fleet, TestServer, DEADLINE};

use crate::opamp::opts;

/// `Authorization` with a real bootstrap token (well-formed, its checksum right) that no server
/// issued: an admitted request costs a lookup and gets 401, a refused one never gets that far.
fn unknown_token() -> String {
    format!("Bearer {}", shared::token::new_bootstrap_token())
}

const CAP: u64 = 8;
/// Accept rate of the storm test: slow, so the refill during the storm stays small.
const RATE: u64 = 2;
const AGENTS: usize = 3;
const STORM_WS: usize = 200;
const STORM_HTTP: usize = 100;

/// A refused upgrade's status and `Retry-After`, or `None` when it was admitted (and dropped).
async fn try_upgrade(
    url: &str,
    headers: &[(String, String)],
) -> anyhow::Result<Option<(u16, Option<Duration>)>> {
    match WsConnection::connect(url, headers).await {
        Ok(_) => Ok(None),
        Err(ConnectError::Status {
            status,
            retry_after,
            ..
        }) => Ok(Some((status, retry_after))),
        Err(e) => Err(e.into()),
    }
}

/// One plain-HTTP request with `authorization`; its status, raw `Retry-After` and body.
async fn post_with(
    http: &reqwest::Client,
    url: &str,
    authorization: &str,
) -> anyhow::Result<(u16, Option<String>, String)> {
    let resp = http
        .post(url)
        .header("Content-Type", "application/x-protobuf")
        .header("Authorization", authorization)
        .body(Vec::<u8>::new())
        .send()
        .await?;
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((resp.status().as_u16(), retry_after, resp.text().await?))
}

/// One plain-HTTP request with a token nobody issued; its status and raw `Retry-After`.
async fn post(http: &reqwest::Client, url: &str) -> anyhow::Result<(u16, Option<String>)> {
    let (status, retry_after, _) = post_with(http, url, &unknown_token()).await?;
    Ok((status, retry_after))
}

/// What an admitted request with an unknown token must get: authentication's refusal.
const UNKNOWN: (u16, &str) = (401, "unknown token");

/// A `Retry-After` that a client can honour: a whole number of seconds, at least 1.
fn positive_secs(value: Option<&str>) -> bool {
    value
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|s| s >= 1)
}

#[tokio::test]
async fn a_storm_is_refused_cheaply_while_connected_agents_carry_on() -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| {
        c.admission.max_connections = CAP;
        // Slow enough that the refill during the storm stays small even on a loaded machine.
        c.admission.accept_rate_per_sec = RATE;
        c.admission.accept_burst = 10;
        c.admission.warmup_secs = 0;
    })
    .await?;
    let gateway = server
        .running
        .as_ref()
        .map(|r| r.gateway.clone())
        .expect("running");

    // The agents that must not notice the storm.
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let token = server.api.token(&format!("agent-{i}")).await?;
        let agent = Agent::start(opts(server.ws_url(), token, &format!("steady-{i}")));
        let mut st = agent.status();
        wait_for(&mut st, DEADLINE, |s| s.connected && s.replies > 0).await?;
        agents.push((agent, st));
    }

    // Fill the gateway to its cap with idle connections (retrying while the rate says 429).
    let holder = bearer(&server.api.token("holder").await?);
    let mut held = Vec::new();
    while gateway.connected() < usize::try_from(CAP)? {
        let conn = eventually("a connection slot", DEADLINE, || async {
            match WsConnection::connect(&server.ws_url(), &holder).await {
                Ok(conn) => Ok(Some(conn)),
                Err(ConnectError::Status { status: 429, .. }) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
        .await?;
        held.push(conn);
    }
    assert_eq!(gateway.connected(), usize::try_from(CAP)?);

    // Empty the accept bucket: from the first 429 on it holds less than one token, so during the
    // storm only what refills (accept_rate_per_sec) can be admitted. Upgrades at the cap never
    // reach the bucket; plain HTTP takes no connection slot, so it meets only the bucket.
    let http = reqwest::Client::new();
    let emptied = eventually("the accept bucket emptied", DEADLINE, || async {
        let (status, _) = post(&http, &server.http_url()).await?;
        Ok((status == 429).then(Instant::now))
    })
    .await?;

    // Readiness is watched throughout the storm.
    let storming = Arc::new(AtomicBool::new(true));
    let ready_url = format!("http://{}/health/ready", server.addr);
    let health = tokio::spawn({
        let storming = storming.clone();
        async move {
            let http = reqwest::Client::new();
            let mut statuses = Vec::new();
            loop {
                let last = !storming.load(Ordering::Acquire);
                statuses.push(http.get(&ready_url).send().await?.status().as_u16());
                if last {
                    return anyhow::Ok(statuses);
                }
            }
        }
    });

    // The storm: upgrades and plain-HTTP requests, all at once.
    let look_valid = vec![("Authorization".to_string(), unknown_token())];
    let upgrades: Vec<_> = (0..STORM_WS)
        .map(|_| {
            let url = server.ws_url();
            let headers = look_valid.clone();
            tokio::spawn(async move { try_upgrade(&url, &headers).await })
        })
        .collect();
    let requests: Vec<_> = (0..STORM_HTTP)
        .map(|_| {
            let http = http.clone();
            let url = server.http_url();
            tokio::spawn(async move { post(&http, &url).await })
        })
        .collect();
    let mut ws_outcomes = Vec::new();
    for u in upgrades {
        ws_outcomes.push(u.await??);
    }
    let mut http_outcomes = Vec::new();
    for r in requests {
        http_outcomes.push(r.await??);
    }
    // Tokens that can have refilled since the bucket was emptied (less than one was left),
    // counting from a little before the 429 reached us.
    let refill = RATE as f64 * (emptied.elapsed() + Duration::from_millis(50)).as_secs_f64();
    storming.store(false, Ordering::Release);
    let health = health.await??;

    // Every upgrade met the full gateway: 503, before authentication, with a Retry-After.
    for outcome in &ws_outcomes {
        let Some((status, retry_after)) = outcome else {
            anyhow::bail!("an upgrade was admitted past the connection cap");
        };
        assert_eq!(*status, 503, "upgrade at the cap");
        assert!(
            retry_after.is_some_and(|d| d >= Duration::from_secs(1)),
            "503 without a usable Retry-After: {retry_after:?}"
        );
    }
    // Plain HTTP has no slot to take, only tokens: each request was either throttled (429) or
    // admitted and refused by authentication (401), and no more were admitted than tokens
    // refilled since the bucket was emptied.
    let mut throttled = 0;
    for (status, retry_after) in &http_outcomes {
        match status {
            429 => {
                throttled += 1;
                assert!(
                    positive_secs(retry_after.as_deref()),
                    "429 with Retry-After {retry_after:?}"
                );
            }
            401 => {}
            other => anyhow::bail!("unexpected status {other} in the storm: {http_outcomes:?}"),
        }
    }
    let admitted = STORM_HTTP - throttled;
    assert!(
        admitted as f64 <= 1.0 + refill,
        "{admitted} of {STORM_HTTP} requests admitted with {refill:.1} tokens refilled: \
         {http_outcomes:?}"
    );
    assert!(
        health.iter().all(|s| *s == 200),
        "readiness flapped during the storm: {health:?}"
    );

    // Refused upgrades took no slot, and the agents kept talking through it all.
    assert_eq!(gateway.connected(), usize::try_from(CAP)?);
    for (_, st) in &mut agents {
        let before = st.borrow().replies;
        wait_for(st, DEADLINE, |s| s.connected && s.replies >= before + 2).await?;
    }

    // A freed slot is taken by the next upgrade that has a token.
    drop(held.pop());
    eventually("the freed slot", DEADLINE, || async {
        Ok((gateway.connected() < usize::try_from(CAP)?).then_some(()))
    })
    .await?;
    let again = eventually("an upgrade into the freed slot", DEADLINE, || async {
        match WsConnection::connect(&server.ws_url(), &holder).await {
            Ok(conn) => Ok(Some(conn)),
            Err(ConnectError::Status { status: 429, .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    assert_eq!(gateway.connected(), usize::try_from(CAP)?);

    drop(again);
    drop(held);
    for (agent, _) in agents {
        agent.stop().await;
    }
    server.stop().await
}

/// Plain-HTTP requests admitted in the first second after start, sending as fast as four
/// clients can (a refusal costs next to nothing).
async fn admitted_in_first_second(server: &TestServer) -> anyhow::Result<usize> {
    let http = reqwest::Client::new();
    let start = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let http = http.clone();
            let url = server.http_url();
            tokio::spawn(async move {
                let mut admitted = 0;
                while start.elapsed() < Duration::from_secs(1) {
                    let (status, retry_after, body) =
                        post_with(&http, &url, &unknown_token()).await?;
                    match (status, body.as_str()) {
                        (429, _) => anyhow::ensure!(positive_secs(retry_after.as_deref())),
                        // Admitted, and refused by authentication as it must be: anything else
                        // (a 500, a 503 of a busy coordinator) is no admission.
                        UNKNOWN => admitted += 1,
                        other => anyhow::bail!("unexpected answer while warming up: {other:?}"),
                    }
                }
                anyhow::Ok(admitted)
            })
        })
        .collect();
    let mut admitted = 0;
    for c in clients {
        admitted += c.await??;
    }
    Ok(admitted)
}

#[tokio::test]
async fn a_fresh_gateway_warms_up() -> anyhow::Result<()> {
    // 20/s with a burst of 5: at full rate the first second admits about 5 + 20 = 25. Warming
    // up over 10 s it starts at 2/s and reaches ~4/s after a second: about 5 + 3 = 8 (a few
    // more if the server took long to start, since the window starts later in the ramp).
    let limits = |warmup_secs| {
        move |c: &mut coordinator::config::Config| {
            c.admission.max_connections = 0;
            c.admission.accept_rate_per_sec = 20;
            c.admission.accept_burst = 5;
            c.admission.warmup_secs = warmup_secs;
        }
    };
    let warm = TestServer::start_with(limits(10)).await?;
    let warming = admitted_in_first_second(&warm).await?;
    warm.stop().await?;
    let full = TestServer::start_with(limits(0)).await?;
    let at_full_rate = admitted_in_first_second(&full).await?;
    full.stop().await?;

    assert!(
        (5..=15).contains(&warming),
        "warming up admitted {warming} in the first second"
    );
    assert!(
        at_full_rate >= warming + 5,
        "at full rate {at_full_rate} were admitted, warming up {warming}"
    );
    Ok(())
}

/// The connection cap of the cluster test's gateway: its agents fill it.
const CLUSTER_CAP: usize = 4;
const CLUSTER_STORM: usize = 60;

#[tokio::test]
async fn a_cluster_gateway_refuses_beyond_its_cap_while_its_agents_carry_on() -> anyhow::Result<()>
{
    let c = Cluster::start(1, 1, |cfg| {
        cfg.admission.max_connections = CLUSTER_CAP as u64;
        cfg.admission.warmup_secs = 0;
    })
    .await?;
    let gateway = c.gateway_of(0)?;
    let mut agents = Vec::new();
    for i in 0..CLUSTER_CAP {
        let token = c.api().token(&format!("cluster-agent-{i}")).await?;
        let agent = Agent::start(opts(c.ws_url_of(0)?, token, &format!("capped-{i}")));
        let mut st = agent.status();
        wait_for(&mut st, DEADLINE, |s| s.connected && s.replies > 0).await?;
        agents.push((agent, st));
    }
    assert_eq!(gateway.connected(), CLUSTER_CAP);

    let look_valid = vec![("Authorization".to_string(), unknown_token())];
    let storm: Vec<_> = (0..CLUSTER_STORM)
        .map(|_| {
            let url = c.ws_url_of(0);
            let headers = look_valid.clone();
            tokio::spawn(async move { try_upgrade(&url?, &headers).await })
        })
        .collect();
    for upgrade in storm {
        match upgrade.await?? {
            Some((503, Some(retry))) if retry >= Duration::from_secs(1) => {}
            other => {
                anyhow::bail!("beyond the cap an upgrade must get 503 + Retry-After: {other:?}")
            }
        }
    }
    let ready = reqwest::get(format!("http://{}/health/ready", c.gateway_addr(0)?)).await?;
    assert_eq!(ready.status().as_u16(), 200, "the gateway stays ready");
    assert_eq!(gateway.connected(), CLUSTER_CAP, "refusals took no slot");
    for (_, st) in &mut agents {
        let before = st.borrow().replies;
        wait_for(st, DEADLINE, |s| s.connected && s.replies >= before + 2).await?;
    }
    for (agent, _) in agents {
        agent.stop().await;
    }
    c.stop().await
}
