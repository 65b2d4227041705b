//! The cluster's services failing under a connected fleet with a push in flight: NATS
//! restarted, Redis restarted empty, Postgres unreachable mid-rollout, one gateway cut off
//! from NATS, a coordinator frozen past its lease. Each test breaks a private service or a link of its own (`tests::faults`), then
//! checks that nothing was lost: every agent on exactly one live connection, every pushed
//! config APPLIED, store and API agreeing, acknowledged changes and audit rows kept, the
//! nodes recovered by themselves. Each prints how long convergence took.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{json, Value};

use agent::{wait_for, Agent, WsConnection};
use coordinator::store::SqliteStore;
use proto::v1::ServerErrorResponseType;
use shared::bus::{
    AgentFrame, CoordinatorHandler, CoordinatorReply, CoordinatorRequest, Credential,
};
use shared::domain::Transport;
use shared::ids::{GatewayId, InstanceUid};
use shared::store::Store;
use tests::cluster::{Balancer, Cluster};
use tests::faults::{Link, Service};
use tests::{bearer, eventually, hello, Api, Fleet, TestServer, DEADLINE};

use crate::opamp::{opts, uid_of};

/// Agents in each fault test: enough that deliveries are batched and spread over every
/// partition holder, few enough for a 2-core CI machine running the suite.
const AGENTS: usize = 200;

/// Bound on converging after a fault is repaired: the agents' retries (at most a few
/// seconds apart), a lease TTL (3 s in the sandbox) and an ownership TTL (6 s) fit in it.
const CONVERGE_WITHIN: Duration = Duration::from_secs(30);

/// Reconnection attempts every agent makes while the Postgres link is cut: with its backoff
/// doubling from 250 ms, the fleet is away about as long as the 15 s a rollout gate gives
/// members to come back, and longer once the next backoff after the repair counts.
const RETRIES_HELD: u64 = 6;

/// Starts `n` agents labelled `fleet=<label>`, spread round-robin over `endpoints`, all at
/// once; returns them with their uids once each has had a reply.
async fn fleet(
    api: &Api,
    endpoints: &[String],
    n: usize,
    label: &str,
) -> anyhow::Result<Vec<(Agent, String)>> {
    fleet_like(api, endpoints, n, label, |_| {}).await
}

/// [`fleet`] with `tweak` applied to each agent's options.
async fn fleet_like(
    api: &Api,
    endpoints: &[String],
    n: usize,
    label: &str,
    tweak: impl Fn(&mut agent::AgentOptions),
) -> anyhow::Result<Vec<(Agent, String)>> {
    let mut started = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("{label}-{i}");
        let mut o = opts(
            endpoints[i % endpoints.len()].clone(),
            api.token(&name).await?,
            &name,
        );
        o.non_identifying = vec![("fleet".into(), label.into())];
        // A slower heartbeat than the other tests' 200 ms: 200 agents at 5 Hz would be the
        // whole machine's work.
        o.heartbeat = Duration::from_secs(1);
        tweak(&mut o);
        started.push(Agent::start(o));
    }
    let mut out = Vec::with_capacity(n);
    for agent in started {
        let s = wait_for(&mut agent.status(), DEADLINE, |s| {
            s.connected && s.replies > 0
        })
        .await?;
        out.push((agent, uid_of(&s)));
    }
    Ok(out)
}

/// Waits until every agent labelled `fleet=<label>` (there are `n`) is connected and reports
/// config `hash` APPLIED through the API, within `bound` from `since`; returns how long that
/// took from `since`.
async fn all_applied(
    api: &Api,
    label: &str,
    n: usize,
    hash: &str,
    since: Instant,
    bound: Duration,
) -> anyhow::Result<Duration> {
    let left = bound.saturating_sub(since.elapsed());
    let path = format!("/api/v1/agents?label=fleet={label}");
    let last = std::cell::Cell::new(0);
    eventually(&format!("{n} agents APPLIED {hash}"), left, || async {
        // The store may still be answering 503 for a moment after a fault.
        let Ok(list) = api.get(&path).await else {
            return Ok(None);
        };
        let applied = list.as_array().map_or(0, |agents| {
            agents
                .iter()
                .filter(|a| {
                    a["remote_config"]["hash"] == hash
                        && a["remote_config"]["status"] == "APPLIED"
                        && a["connected"] == true
                })
                .count()
        });
        last.set(applied);
        Ok((applied == n).then_some(()))
    })
    .await
    .with_context(|| format!("{} of {n} applied", last.get()))?;
    Ok(since.elapsed())
}

/// Every agent is on exactly one live connection: the gateways together hold one socket per
/// agent (besides `others` of the test's own), and the API shows each connected on a gateway
/// that is running.
async fn one_connection_each(c: &Cluster, uids: &[String], others: usize) -> anyhow::Result<()> {
    // An agent that has just reconnected may still have its old socket closing: the count
    // must settle to one each (a lasting duplicate still fails).
    let want = uids.len() + others;
    let held = std::cell::Cell::new(0);
    eventually("one socket per agent", CONVERGE_WITHIN, || async {
        held.set(
            (0..c.gateways.len())
                .map(|i| c.gateway_connections(i))
                .sum::<usize>(),
        );
        Ok((held.get() == want).then_some(()))
    })
    .await
    .with_context(|| {
        format!(
            "the gateways hold {} sockets for {} agents and {others} others",
            held.get(),
            uids.len()
        )
    })?;
    let live: Vec<String> = c.gateways.iter().flatten().map(|n| n.id.clone()).collect();
    for uid in uids {
        let a = c.api().agent(uid).await?.context("agent listed")?;
        anyhow::ensure!(
            a["connected"] == true && live.iter().any(|g| a["gateway"] == g.as_str()),
            "{uid} is not shown on a live gateway: {a}"
        );
    }
    Ok(())
}

/// The status of a GET and its `Retry-After`, whatever the status.
async fn status_of(api: &Api, path: &str) -> anyhow::Result<(u16, Option<String>)> {
    let (status, headers, _) = api.get_text(path).await?;
    let retry = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((status, retry))
}

/// The audit rows of `action` among the newest 10,000.
async fn audited(api: &Api, action: &str) -> anyhow::Result<usize> {
    let rows = api.get("/api/v1/audit?limit=10000").await?;
    Ok(rows
        .as_array()
        .map_or(0, |r| r.iter().filter(|e| e["action"] == action).count()))
}

async fn stop_all(agents: Vec<(Agent, String)>) {
    for (a, _) in agents {
        a.stop().await;
    }
}

#[tokio::test]
async fn nats_restarted_agents_keep_their_sockets_get_unavailable_and_the_push_arrives(
) -> anyhow::Result<()> {
    let mut nats = Service::nats().await?;
    let url = nats.url("nats");
    let c = Cluster::start(2, 2, |cfg| {
        cfg.cluster.nats_url = url;
        // An agent's message during the outage is answered at this bound.
        cfg.opamp.request_timeout_secs = 2;
    })
    .await?;
    let api = c.api().clone();
    let endpoints = [c.ws_url_of(0)?, c.ws_url_of(1)?];
    // Agents that only record an Unavailable answer and keep their socket, as opamp-go's
    // client (the Collector's) does; one that follows the spec's advice to reconnect later
    // would make "the gateway kept its socket" unobservable.
    let agents = fleet_like(&api, &endpoints, AGENTS, "nats", |o| {
        o.reconnect_at_once_after_close = true;
    })
    .await?;
    let uids: Vec<String> = agents.iter().map(|(_, u)| u.clone()).collect();
    // A bare connection, to read the answer to a message sent while the bus is down.
    let probe_uid = InstanceUid::new_v7();
    let mut probe =
        WsConnection::connect(&endpoints[0], &bearer(&api.token("probe").await?)).await?;
    probe.send(&hello(probe_uid)).await?;
    anyhow::ensure!(probe.recv().await?.is_some(), "the probe is answered");

    let (id, hash) = api.config("nats", "receivers: {}\n").await?;
    api.assign(json!({ "config_id": id, "labels": { "fleet": "nats" } }))
        .await?;
    nats.stop().await?;
    let down = Instant::now();

    let mut status = hello(probe_uid);
    status.sequence_num = 1;
    probe.send(&status).await?;
    let reply = probe
        .recv()
        .await?
        .context("answered while the bus is down")?;
    let err = reply.error_response.context("an error response")?;
    assert_eq!(
        err.r#type,
        ServerErrorResponseType::Unavailable as i32,
        "{err:?}"
    );
    assert!(err.details.is_some(), "with retry_info: {err:?}");
    // The outage lasts until every agent has been told "retry" on its open socket (a
    // heartbeat a second), well past the gateway's first looks at the bus and short of its
    // drain delay, so a gateway that closed its agents at once would show here.
    eventually("every agent answered Unavailable", DEADLINE, || async {
        let told = agents.iter().all(|(a, _)| {
            a.status()
                .borrow()
                .last_error
                .as_deref()
                .is_some_and(|e| e.to_ascii_lowercase().contains("unavailable"))
        });
        Ok(told.then_some(()))
    })
    .await?;

    nats.restart().await?;
    let took = all_applied(&api, "nats", AGENTS, &hash, down, CONVERGE_WITHIN).await?;
    println!(
        "NATS restarted: {} agents APPLIED {took:?} after the stop",
        uids.len()
    );
    for (a, uid) in &agents {
        let s = a.status().borrow().clone();
        assert_eq!(
            s.connections_established, 1,
            "{uid} kept its socket through the outage ({:?})",
            s.last_close_reason
        );
    }
    one_connection_each(&c, &uids, 1).await?;
    // The probe's connection survived too: it is answered normally again.
    status.sequence_num = 2;
    let probe = tokio::sync::Mutex::new(probe);
    eventually("the probe answered without error", DEADLINE, || async {
        let mut probe = probe.lock().await;
        probe.send(&status).await?;
        let r = probe.recv().await?.context("probe closed")?;
        Ok(r.error_response.is_none().then_some(()))
    })
    .await?;
    drop(probe);
    assert_eq!(
        audited(&api, "config.assign").await?,
        1,
        "the acknowledged assignment is audited once"
    );
    assert_eq!(
        audited(&api, "token.redeem").await?,
        AGENTS + 1,
        "every redemption is audited once"
    );
    stop_all(agents).await;
    c.stop().await
}

#[tokio::test]
async fn redis_restarted_empty_ownership_is_rebuilt_and_pushes_reach_the_right_socket(
) -> anyhow::Result<()> {
    let mut redis = Service::redis().await?;
    let url = redis.url("redis");
    let c = Cluster::start(2, 2, |cfg| cfg.cluster.redis_url = url).await?;
    let api = c.api().clone();
    let endpoints = [c.ws_url_of(0)?, c.ws_url_of(1)?];
    let agents = fleet(&api, &endpoints, AGENTS, "redis").await?;
    let uids: Vec<String> = agents.iter().map(|(_, u)| u.clone()).collect();
    let gateway_of: HashMap<String, usize> = agents
        .iter()
        .enumerate()
        .map(|(i, (_, u))| (u.clone(), i % 2))
        .collect();

    redis.stop().await?;
    let down = Instant::now();
    let (id, hash) = api.config("redis", "processors: {}\n").await?;
    api.assign(json!({ "config_id": id, "labels": { "fleet": "redis" } }))
        .await?;
    redis.restart().await?;

    let took = all_applied(&api, "redis", AGENTS, &hash, down, CONVERGE_WITHIN).await?;
    println!(
        "Redis restarted empty: {} agents APPLIED {took:?} after the stop",
        uids.len()
    );
    one_connection_each(&c, &uids, 0).await?;
    // Each agent is still on the gateway it dialled (they reconnect to the same endpoint),
    // and a push after the restart reaches that socket.
    for uid in &uids {
        let a = api.agent(uid).await?.context("listed")?;
        assert_eq!(
            a["gateway"],
            format!("gw-{}", gateway_of[uid]),
            "{uid}: {a}"
        );
    }
    let (id2, hash2) = api.config("redis-2", "processors: {batch: {}}\n").await?;
    api.assign(json!({ "config_id": id2, "labels": { "fleet": "redis" } }))
        .await?;
    let again = Instant::now();
    let took = all_applied(&api, "redis", AGENTS, &hash2, again, CONVERGE_WITHIN).await?;
    println!("after the restart, a push APPLIED everywhere in {took:?}");
    stop_all(agents).await;
    c.stop().await
}

/// The test database's URL with its host and port replaced by `link`'s.
fn through(url: &str, link: &Link) -> anyhow::Result<String> {
    let (scheme, rest) = url.split_once("://").context("a URL")?;
    let (creds, after) = rest.rsplit_once('@').map_or(("", rest), |(c, a)| (c, a));
    let path = after.find('/').map_or("", |i| &after[i..]);
    let at = if creds.is_empty() { "" } else { "@" };
    Ok(format!("{scheme}://{creds}{at}{}{path}", link.addr))
}

#[tokio::test]
async fn postgres_unreachable_mid_rollout_the_api_answers_503_and_the_rollout_completes_after(
) -> anyhow::Result<()> {
    let pg: std::net::SocketAddr = "127.0.0.1:5432".parse()?;
    let link = Link::to(pg).await?;
    let link_ref = &link;
    let mut failed = None;
    let c = Cluster::start(2, 2, |cfg| {
        match through(&cfg.cluster.postgres_url, link_ref) {
            Ok(u) => cfg.cluster.postgres_url = u,
            Err(e) => failed = Some(e),
        }
        // Requests while the store is away fail at this bound instead of queueing.
        cfg.cluster.postgres_max_connections = 4;
    })
    .await?;
    if let Some(e) = failed {
        return Err(e);
    }
    let api = c.api().clone();
    let endpoints = [c.ws_url_of(0)?, c.ws_url_of(1)?];
    let agents = fleet(&api, &endpoints, AGENTS, "pg").await?;
    let uids: Vec<String> = agents.iter().map(|(_, u)| u.clone()).collect();
    api.put_json("/api/v1/groups/pg", json!({ "labels": { "fleet": "pg" } }))
        .await?;
    let (config_id, hash) = api.config("pg", "extensions: {}\n").await?;
    let created = api
        .post(
            "/api/v1/rollouts",
            json!({ "config_id": config_id, "group": "pg", "stages": "1,10%,100%", "soak": "1s" }),
        )
        .await?;
    let rollout = created["id"].as_i64().context("rollout id")?;

    // Cut once the canary stage runs, so the outage lands mid-rollout.
    eventually("the rollout running", DEADLINE, || async {
        let v = api.get(&format!("/api/v1/rollouts/{rollout}")).await?;
        Ok((v["rollout"]["state"] == "running").then_some(()))
    })
    .await?;
    link.cut();
    let cut = Instant::now();
    // Meanwhile the API says "retry", never a wrong answer: 503 with Retry-After.
    let rollout_path = format!("/api/v1/rollouts/{rollout}");
    let seen = eventually("the API answers 503", DEADLINE, || async {
        let r = status_of(&api, &rollout_path).await?;
        Ok((r.0 != 200).then_some(r))
    })
    .await?;
    assert_eq!(seen.0, 503, "a rollout read while the store is away");
    assert!(seen.1.is_some(), "503 carries Retry-After");
    // Every agent's next message is answered meanwhile: with its status batched in memory
    // while the coordinator's leases last, with "retry" once they lapsed (a coordinator that
    // cannot renew may have been taken over). The outage is held until every agent was told
    // to retry and had tried again several times (its backoff growing), so the members were
    // away longer than a gate's reconnect grace: the rollout must survive an outage of a real
    // database restart, not only a blip shorter than a lease.
    let before: Vec<(u64, u64)> = agents
        .iter()
        .map(|(a, _)| {
            let s = a.status().borrow().clone();
            (s.replies, s.connections_attempted)
        })
        .collect();
    let held = Duration::from_secs(60);
    eventually("every agent answered, then retrying", held, || async {
        let all = agents
            .iter()
            .zip(&before)
            .all(|((a, _), (replies, tried))| {
                let s = a.status().borrow().clone();
                s.replies > *replies && s.connections_attempted > *tried + RETRIES_HELD
            });
        Ok(all.then_some(()))
    })
    .await?;
    assert_eq!(status_of(&api, &rollout_path).await?.0, 503, "still away");
    link.restore();
    let restored = Instant::now();
    let outage = cut.elapsed();
    // The agents come back at their next backoff, up to 16 s after six doublings from 250 ms.
    let converge = CONVERGE_WITHIN + Duration::from_secs(16);

    let last = std::cell::RefCell::new(Value::Null);
    let done: Value = eventually("rollout succeeded", converge, || async {
        let Ok(v) = api.get(&format!("/api/v1/rollouts/{rollout}")).await else {
            return Ok(None);
        };
        last.replace(v.clone());
        Ok((v["rollout"]["state"] == "succeeded").then_some(v))
    })
    .await
    .with_context(|| format!("last seen: {}", last.borrow()))?;
    let took = all_applied(&api, "pg", AGENTS, &hash, restored, converge).await?;
    println!(
        "Postgres cut mid-rollout for {outage:?}: all APPLIED and the rollout done {took:?} after the link came back"
    );
    let stages = done["stages"].as_array().context("stages")?;
    assert_eq!(stages.len(), 3, "{done}");
    assert!(
        stages.iter().all(|s| s["gate"]["passed"] == true),
        "every gate passed once: {done}"
    );
    one_connection_each(&c, &uids, 0).await?;
    assert_eq!(
        audited(&api, "rollout.create").await?,
        1,
        "the acknowledged rollout is audited once"
    );
    assert_eq!(
        audited(&api, "token.redeem").await?,
        AGENTS,
        "every redemption is audited once"
    );
    stop_all(agents).await;
    c.stop().await
}

#[tokio::test]
async fn a_gateway_cut_off_from_nats_turns_not_ready_and_its_agents_move_to_another(
) -> anyhow::Result<()> {
    let nats: std::net::SocketAddr = "127.0.0.1:4222".parse()?;
    let link = Link::to(nats).await?;
    let mut c = Cluster::start(1, 2, |cfg| cfg.cluster.bus_lost_drain_secs = 2).await?;
    let mut cut_cfg = c.base.clone();
    cut_cfg.cluster.nats_url = link.url("nats");
    let cut_gw = c.add_gateway_with(cut_cfg).await?;
    let lb =
        Balancer::start_checked(vec![c.gateway_addr(cut_gw)?, c.gateway_addr(0)?], true).await?;
    let api = c.api().clone();
    // Agents that keep their socket on an Unavailable answer (as opamp-go's do), so it is the
    // gateway's drain that moves them.
    let agents = fleet_like(&api, &[lb.ws_url()], AGENTS / 2, "cut", |o| {
        o.reconnect_at_once_after_close = true;
    })
    .await?;
    let uids: Vec<String> = agents.iter().map(|(_, u)| u.clone()).collect();
    for uid in &uids {
        api.wait_agent(uid, "on the gateway behind the link", |a| {
            a["gateway"] == format!("gw-{cut_gw}")
        })
        .await?;
    }
    let ready = format!("http://{}/health/ready", c.gateway_addr(cut_gw)?);
    assert_eq!(reqwest::get(&ready).await?.status(), 200);

    let (id, hash) = api.config("cut", "connectors: {}\n").await?;
    api.assign(json!({ "config_id": id, "labels": { "fleet": "cut" } }))
        .await?;
    link.cut();
    let cut = Instant::now();
    eventually("the cut-off gateway is not ready", DEADLINE, || async {
        Ok((reqwest::get(&ready).await?.status() == 503).then_some(()))
    })
    .await?;
    eventually("the cut-off gateway is empty", DEADLINE, || async {
        Ok((c.gateway_connections(cut_gw) == 0).then_some(()))
    })
    .await?;
    let emptied = cut.elapsed();
    assert!(
        emptied >= Duration::from_secs(2),
        "closed by the drain after bus_lost_drain_secs, not before: {emptied:?}"
    );
    // Its agents are closed and come back through the balancer's next choice.
    let took = all_applied(&api, "cut", AGENTS / 2, &hash, cut, CONVERGE_WITHIN).await?;
    println!(
        "gateway cut off from NATS: drained {emptied:?}, its agents moved and APPLIED {took:?} after the cut"
    );
    for uid in &uids {
        let a = api.agent(uid).await?.context("listed")?;
        assert_eq!(a["gateway"], "gw-0", "{uid} moved: {a}");
    }
    one_connection_each(&c, &uids, 0).await?;

    link.restore();
    eventually("ready again once the bus is back", DEADLINE, || async {
        Ok((reqwest::get(&ready).await?.status() == 200).then_some(()))
    })
    .await?;
    stop_all(agents).await;
    c.stop().await
}

/// A frame as a gateway would relay it, for asking a coordinator directly.
fn frame_for(uid: InstanceUid) -> CoordinatorRequest {
    CoordinatorRequest::Frame(Box::new(AgentFrame {
        gateway: GatewayId("gw-0".into()),
        conn_id: 1,
        epoch: 0,
        transport: Transport::WebSocket,
        credential: Credential::BootstrapToken {
            token_id: "any".into(),
            bound_uid: Some(uid),
        },
        source_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        secure: false,
        msg: hello(uid),
    }))
}

/// Waits until every agent has applied config `hash` itself (its own status, not the
/// server's view), within `bound` from `since`.
async fn agents_run(
    agents: &[(Agent, String)],
    hash: &str,
    since: Instant,
    bound: Duration,
) -> anyhow::Result<Duration> {
    let runs = |a: &Agent| {
        a.status()
            .borrow()
            .last_remote_config_hash
            .as_deref()
            .is_some_and(|h| hex::encode(h) == hash)
    };
    eventually(
        &format!("agents running {hash}"),
        bound.saturating_sub(since.elapsed()),
        || async { Ok(agents.iter().all(|(a, _)| runs(a)).then_some(())) },
    )
    .await?;
    Ok(since.elapsed())
}

#[tokio::test]
async fn a_frozen_coordinator_is_taken_over_and_its_stale_writes_are_refused_when_it_wakes(
) -> anyhow::Result<()> {
    let c = Cluster::start(2, 2, |cfg| {
        // Agent status is written only when the test says (flush), so the frozen
        // coordinator surely has unwritten, soon stale, records.
        cfg.store.flush_interval_ms = 600_000;
        cfg.opamp.request_timeout_secs = 3;
    })
    .await?;
    let api = c.api_of(0)?;
    let endpoints = [c.ws_url_of(0)?, c.ws_url_of(1)?];
    let agents = fleet(&api, &endpoints, AGENTS, "frozen").await?;
    let uids: Vec<String> = agents.iter().map(|(_, u)| u.clone()).collect();
    let (v1, h1) = api.config("frozen", "receivers: {}\n").await?;
    api.assign(json!({ "config_id": v1, "labels": { "fleet": "frozen" } }))
        .await?;
    agents_run(&agents, &h1, Instant::now(), CONVERGE_WITHIN).await?;
    let mut on_1 = Vec::new();
    for uid in &uids {
        if c.owner_of(uid.parse()?).await? == 1 {
            on_1.push(uid.parse::<InstanceUid>()?);
        }
    }
    anyhow::ensure!(!on_1.is_empty(), "coord-1 serves some of the agents");

    let frozen = c.freeze_coordinator(1).await?;
    let froze = Instant::now();
    eventually("coord-0 holds every partition", CONVERGE_WITHIN, || async {
        let holders = c.partition_holders().await?;
        Ok(holders.iter().all(|(_, h)| h == "coord-0").then_some(()))
    })
    .await?;
    println!(
        "coordinator frozen: taken over {:?} after the freeze",
        froze.elapsed()
    );
    let (v2, h2) = api.config("frozen-2", "receivers: {otlp: {}}\n").await?;
    api.assign(json!({ "config_id": v2, "labels": { "fleet": "frozen" } }))
        .await?;
    c.coordinator_of(0)?.flush().await?;

    // Still frozen, coord-1 believes it holds its partitions, with records it never wrote.
    // Asked directly, as its first frames on waking would be, it says "retry" (its writes
    // are refused by the store: the next test).
    let stale = c.coordinator_of(1)?;
    for uid in on_1.iter().take(3) {
        // At once: a frozen node's tasks cannot help it, so anything beyond the lease check
        // would hang here.
        let reply = tokio::time::timeout(Duration::from_secs(5), stale.handle(frame_for(*uid)))
            .await
            .context("a coordinator past its lease answers at once, without its stale state")?;
        match reply {
            CoordinatorReply::Frame(reply) => assert!(
                tests::is_retry(&reply.msg),
                "a coordinator past its lease answers retry: {:?}",
                reply.msg
            ),
            _ => anyhow::bail!("a frame gets a frame reply"),
        }
    }
    drop(stale);

    drop(frozen);
    let woke = Instant::now();
    c.settled().await?;
    println!(
        "the woken coordinator rejoined {:?} after waking",
        woke.elapsed()
    );
    let took = agents_run(&agents, &h2, woke, CONVERGE_WITHIN).await?;
    println!("the push made while it was frozen runs everywhere {took:?} after waking");
    // Records are written when the test says: then the API agrees.
    eventually(
        "the API shows every agent APPLIED",
        CONVERGE_WITHIN,
        || async {
            for i in 0..2 {
                c.coordinator_of(i)?.flush().await?;
            }
            let list = api.get("/api/v1/agents?label=fleet=frozen").await?;
            let applied = list.as_array().map_or(0, |a| {
                a.iter()
                    .filter(|a| {
                        a["remote_config"]["hash"] == h2.as_str()
                            && a["remote_config"]["status"] == "APPLIED"
                    })
                    .count()
            });
            Ok((applied == AGENTS).then_some(()))
        },
    )
    .await?;
    one_connection_each(&c, &uids, 0).await?;
    stop_all(agents).await;
    c.stop().await
}

/// The store refuses a stalled coordinator's writes once its lease is another's: here the
/// embedded coordinator's leases are taken by another node behind its back (as a take-over
/// during a stall would), and its next flush of an agent it still remembers writes nothing.
#[tokio::test]
async fn agent_writes_after_the_lease_was_taken_over_are_refused() -> anyhow::Result<()> {
    let server = TestServer::start_with(|cfg| {
        // Nothing runs on its own during the test: no lease round, no timed flush.
        cfg.cluster.lease_ttl_ms = 600_000;
        cfg.store.flush_interval_ms = 600_000;
    })
    .await?;
    let coordinator = server.coordinator()?;
    let mut o = opts(
        server.ws_url(),
        server.api.token("stalled").await?,
        "stalled",
    );
    o.heartbeat = Duration::from_millis(200);
    let agent = Agent::start(o);
    let mut status = agent.status();
    let s = wait_for(&mut status, DEADLINE, |s| s.replies > 0).await?;
    let uid: InstanceUid = uid_of(&s).parse()?;
    coordinator.flush().await?;
    let store = SqliteStore::open(&server.dir.path().join("ampora.db")).await?;
    let written = store.get_agent(uid).await?.context("written")?;

    // Another node takes every partition over, as after this one's lease ran out.
    let later = shared::now_ms() + 700_000;
    let all: Vec<u16> = (0..shared::ids::PARTITIONS).collect();
    let taken = store
        .acquire_leases("intruder", &all, later, 600_000)
        .await?;
    assert_eq!(taken.len(), all.len(), "every lease taken over");
    // The agent talks on; its record in memory changes...
    let seen = s.replies;
    wait_for(&mut status, DEADLINE, |s| s.replies > seen + 1).await?;
    // ...and writing it is refused: the row stays as it was.
    assert_eq!(coordinator.flush().await?, 0, "nothing written");
    let after = store.get_agent(uid).await?.context("still there")?;
    assert_eq!(
        after.last_seen_ms, written.last_seen_ms,
        "the stale write was refused"
    );
    agent.stop().await;
    server.stop().await
}
