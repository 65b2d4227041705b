//! Cluster mode under failure, in the in-process sandbox (real NATS, Redis and Postgres):
//! routing across coordinators, a crashed gateway, a crashed or stopping coordinator, duplicate
//! connections and payloads larger than NATS's own limit.

use std::time::{Duration, Instant};

use anyhow::Context as _;

use agent::{wait_for, Agent, AgentStatus, WsConnection};
use serde_json::json;
use shared::ids::InstanceUid;
use tests::cluster::{Balancer, Cluster};
use tests::{
    eventually, Fleet, DEADLINE, DRAIN_GRACE, HANDOVER_WITHIN, RECONNECT_AFTER_CRASH,
    REVOCATION_SEEN_WITHIN, SUPERSEDED_CLOSE_WITHIN,
};

use crate::opamp::{opts, uid_of};

/// Starts `n` WebSocket agents labelled `fleet=<label>` on `endpoint`; returns them with
/// their uids once each has had a reply.
async fn fleet_of(
    c: &Cluster,
    endpoint: &str,
    n: usize,
    label: &str,
    compact_reconnect: bool,
) -> anyhow::Result<Vec<(Agent, String)>> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut o = opts(
            endpoint.to_string(),
            c.api().token(&format!("{label}-{i}")).await?,
            &format!("{label}-{i}"),
        );
        o.non_identifying = vec![("fleet".into(), label.into())];
        o.compact_reconnect = compact_reconnect;
        let agent = Agent::start(o);
        let s = wait_for(&mut agent.status(), DEADLINE, |s| {
            s.connected && s.replies > 0
        })
        .await?;
        out.push((agent, uid_of(&s)));
    }
    Ok(out)
}

async fn wait_all(
    c: &Cluster,
    uids: &[String],
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool + Copy,
) -> anyhow::Result<()> {
    for uid in uids {
        c.api().wait_agent(uid, what, pred).await?;
    }
    Ok(())
}

/// [`wait_all`] with one bound for the whole wait, counted from `since`: for promises of
/// "at once".
async fn all_within(
    c: &Cluster,
    uids: &[String],
    what: &str,
    since: Instant,
    bound: Duration,
    pred: impl Fn(&serde_json::Value) -> bool + Copy,
) -> anyhow::Result<()> {
    let left = bound.saturating_sub(since.elapsed());
    eventually(what, left, || async {
        for uid in uids {
            if !c.api().agent(uid).await?.is_some_and(|a| pred(&a)) {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
    .with_context(|| format!("{what}: not within {bound:?}"))
}

#[tokio::test]
async fn config_pushed_through_a_coordinator_that_does_not_own_the_agent_arrives(
) -> anyhow::Result<()> {
    let c = Cluster::start(2, 2, |_| {}).await?;
    let agents = fleet_of(&c, &c.ws_url_of(0)?, 1, "remote", false).await?;
    let uid = agents[0].1.clone();
    let view = c
        .api()
        .wait_agent(&uid, "connected", |a| a["connected"] == true)
        .await?;
    assert_eq!(
        view["gateway"], "gw-0",
        "the API shows which gateway holds it"
    );

    let partition = uid.parse::<InstanceUid>()?.partition();
    let holders = c.partition_holders().await?;
    let owner = holders
        .iter()
        .find(|(p, _)| *p == partition)
        .map(|(_, h)| h.clone())
        .expect("every partition is leased");
    let other = if owner == "coord-0" { 1 } else { 0 };
    let api = c.api_of(other)?;
    let (id, hash) = api.config("remote", "processors: {}\n").await?;
    api.assign(json!({ "config_id": id, "agent": uid })).await?;

    let mut st = agents[0].0.status();
    let s = wait_for(&mut st, DEADLINE, |s| s.applied_configs >= 1).await?;
    assert_eq!(s.effective_config, "processors: {}\n");
    let a = api
        .wait_agent(&uid, "applied, seen from the other coordinator", |a| {
            a["config_state"] == "applied"
        })
        .await?;
    assert_eq!(a["remote_config"]["hash"], hash);
    for (a, _) in agents {
        a.stop().await;
    }
    c.stop().await
}

#[tokio::test]
async fn agents_of_a_killed_gateway_reconnect_through_another_with_state_intact(
) -> anyhow::Result<()> {
    let mut c = Cluster::start(2, 2, |_| {}).await?;
    let lb = Balancer::start(vec![c.gateway_addr(0)?, c.gateway_addr(1)?]).await?;
    let agents = fleet_of(&c, &lb.ws_url(), 6, "movers", true).await?;
    let uids: Vec<String> = agents.iter().map(|(_, u)| u.clone()).collect();
    wait_all(&c, &uids, "on gw-0", |a| {
        a["connected"] == true && a["gateway"] == "gw-0"
    })
    .await?;
    let (id, hash) = c.api().config("movers", "exporters: {}\n").await?;
    c.api()
        .assign(json!({ "config_id": id, "labels": { "fleet": "movers" } }))
        .await?;
    wait_all(&c, &uids, "applied", |a| a["config_state"] == "applied").await?;
    let asked_before: Vec<u64> = agents
        .iter()
        .map(|(a, _)| a.status().borrow().full_state_requests)
        .collect();

    c.kill_gateway(0);
    let killed = Instant::now();
    // At once: not after the dead gateway's claims expire (the ownership TTL, longer).
    assert!(RECONNECT_AFTER_CRASH < Duration::from_secs(c.base.cluster.ownership_ttl_secs));
    all_within(
        &c,
        &uids,
        "reconnected through gw-1",
        killed,
        RECONNECT_AFTER_CRASH,
        |a| a["connected"] == true && a["gateway"] == "gw-1",
    )
    .await?;
    assert_eq!(c.gateway_connections(1), agents.len());
    for ((agent, uid), before) in agents.iter().zip(asked_before) {
        let mut st = agent.status();
        // The agent reconnected with a compact message; the coordinator, seeing it arrive
        // through another gateway, asked for the full state.
        let s: AgentStatus =
            wait_for(&mut st, DEADLINE, |s| s.full_state_requests > before).await?;
        assert_eq!(
            s.applied_configs, 1,
            "no second push: the config is applied"
        );
        let a = c
            .api()
            .wait_agent(uid, "intact", |a| a["config_state"] == "applied")
            .await?;
        assert_eq!(a["remote_config"]["hash"], hash);
        assert!(a["description"]["identifying"]["service.name"]
            .as_str()
            .is_some_and(|n| n.starts_with("movers-")));
    }
    for (a, _) in agents {
        a.stop().await;
    }
    c.stop().await
}

#[tokio::test]
async fn a_crashed_coordinators_partitions_are_taken_over_and_pushes_still_arrive(
) -> anyhow::Result<()> {
    let mut c = Cluster::start(1, 2, |_| {}).await?;
    let lease_ttl = Duration::from_millis(c.base.cluster.lease_ttl_ms);
    let agents = fleet_of(&c, &c.ws_url_of(0)?, 12, "rollout", false).await?;
    let uids: Vec<String> = agents.iter().map(|(_, u)| u.clone()).collect();
    wait_all(&c, &uids, "connected", |a| a["connected"] == true).await?;
    let holders = c.partition_holders().await?;
    assert!(
        holders.iter().any(|(_, h)| h == "coord-1"),
        "both coordinators hold partitions: {holders:?}"
    );

    // Mid-rollout: the assignment goes in through coordinator 0 and coordinator 1 dies
    // right after, before (or while) pushing to its agents.
    let (id, hash) = c.api().config("rollout", "receivers: {}\n").await?;
    c.api()
        .assign(json!({ "config_id": id, "labels": { "fleet": "rollout" } }))
        .await?;
    c.kill_coordinator(1);
    let killed = Instant::now();

    eventually("coord-0 holds every partition", DEADLINE, || async {
        let holders = c.partition_holders().await?;
        Ok((holders.len() == 256 && holders.iter().all(|(_, h)| h == "coord-0")).then_some(()))
    })
    .await?;
    let took = killed.elapsed();
    // Its leases expire at most one TTL after the kill; the survivor's next round (every
    // third of the TTL) takes them.
    assert!(
        took <= lease_ttl + lease_ttl / 3 + Duration::from_secs(2),
        "take-over took {took:?} with a lease TTL of {lease_ttl:?}"
    );
    for (agent, _) in &agents {
        let s = wait_for(&mut agent.status(), DEADLINE, |s| s.applied_configs >= 1).await?;
        assert_eq!(s.effective_config, "receivers: {}\n");
    }
    for uid in &uids {
        let a = c
            .api()
            .wait_agent(uid, "applied", |a| a["config_state"] == "applied")
            .await?;
        assert_eq!(a["remote_config"]["hash"], hash);
    }
    for (a, _) in agents {
        a.stop().await;
    }
    c.stop().await
}

/// Lease renewal never waits for partition work: with the agents table locked, a join's
/// hand-over (the giver's flush) and take-over (the taker's load) cannot finish, yet every
/// lease stays live and is renewed past its TTL; once the table is free the moves complete
/// and every agent is still served. A round that loads or flushes inside itself lets its
/// leases lapse here within one TTL.
#[tokio::test]
async fn leases_are_renewed_while_taking_or_handing_over_partitions_is_stuck() -> anyhow::Result<()>
{
    use sqlx::{Connection as _, PgConnection};

    let mut c = Cluster::start(1, 1, |_| {}).await?;
    let ttl = i64::try_from(c.base.cluster.lease_ttl_ms)?;
    // Quiet agents: nothing is written after the flush below, so no write holds the leases
    // (a fenced write locks its leases' rows until it commits) while the table is locked.
    let mut agents = Vec::new();
    let mut uids = Vec::new();
    for i in 0..20 {
        let name = format!("stuck-{i}");
        let mut o = opts(c.ws_url_of(0)?, c.api().token(&name).await?, &name);
        o.heartbeat = Duration::from_secs(600);
        let a = Agent::start(o);
        let s = wait_for(&mut a.status(), DEADLINE, |s| s.connected && s.replies > 0).await?;
        uids.push(uid_of(&s));
        agents.push(a);
    }
    wait_all(&c, &uids, "connected", |a| a["connected"] == true).await?;
    c.coordinator_of(0)?.flush().await?;

    let mut db = PgConnection::connect(&c.base.cluster.postgres_url).await?;
    let mut lock = db.begin().await?;
    sqlx::query("LOCK TABLE agents IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await?;
    let locked_at = shared::now_ms();
    tokio::time::timeout(DEADLINE, c.add_coordinator())
        .await
        .context("a coordinator joining while the agents table is locked")??;
    let live = ["coord-0", "coord-1"];
    // A lapse ends the wait at once (`Some(Err)`): `eventually` would retry an error.
    let verdict: Result<(), String> = eventually(
        "every lease renewed a TTL after the lock while moves are stuck",
        DEADLINE,
        || async {
            let now = shared::now_ms();
            let v = c.api().get("/api/v1/cluster").await?;
            let leases = v["partitions"].as_array().context("partitions")?;
            // A released lease (expiry 0) is a hand-over in progress; one that ran out is not.
            if let Some(l) = leases.iter().find(|l| {
                let expires = l["expires_ms"].as_i64().unwrap_or_default();
                (expires != 0 && expires <= now)
                    || !live.contains(&l["holder"].as_str().unwrap_or_default())
            }) {
                return Ok(Some(Err(format!(
                    "a lease lapsed while moves were stuck: {l}"
                ))));
            }
            // The joiner cannot load what it takes; the giver has given some up.
            let taker = c.coordinator_of(1)?.partitions_served();
            if taker > 0 {
                return Ok(Some(Err(format!(
                    "coord-1 serves {taker} partitions with the agents table locked"
                ))));
            }
            let moving = c.coordinator_of(0)?.partitions_served() < 256;
            let oldest = leases
                .iter()
                .filter_map(|l| l["expires_ms"].as_i64())
                .min()
                .unwrap_or_default();
            let renewed = moving && leases.len() == 256 && oldest > locked_at + 2 * ttl;
            Ok(renewed.then_some(Ok(())))
        },
    )
    .await?;
    verdict.map_err(anyhow::Error::msg)?;
    lock.rollback().await?;

    c.settled().await?;
    wait_all(&c, &uids, "connected after the moves", |a| {
        a["connected"] == true
    })
    .await?;
    for a in agents {
        a.stop().await;
    }
    c.stop().await
}

#[tokio::test]
async fn a_stopping_coordinator_hands_its_partitions_over_at_once() -> anyhow::Result<()> {
    // A long TTL: the hand-over must not wait for it.
    let mut c = Cluster::start(1, 2, |cfg| cfg.cluster.lease_ttl_ms = 60_000).await?;
    let agents = fleet_of(&c, &c.ws_url_of(0)?, 6, "handover", false).await?;
    let uids: Vec<String> = agents.iter().map(|(_, u)| u.clone()).collect();
    wait_all(&c, &uids, "connected", |a| a["connected"] == true).await?;
    c.stop_coordinator(1).await?;
    eventually("coord-0 holds every partition", HANDOVER_WITHIN, || async {
        let holders = c.partition_holders().await?;
        Ok((holders.len() == 256 && holders.iter().all(|(_, h)| h == "coord-0")).then_some(()))
    })
    .await?;
    let (id, _) = c.api().config("after", "a: 1\n").await?;
    c.api()
        .assign(json!({ "config_id": id, "labels": { "fleet": "handover" } }))
        .await?;
    for (agent, _) in &agents {
        wait_for(&mut agent.status(), DEADLINE, |s| s.applied_configs >= 1).await?;
    }
    wait_all(&c, &uids, "still connected and applied", |a| {
        a["connected"] == true && a["config_state"] == "applied"
    })
    .await?;
    for (a, _) in agents {
        a.stop().await;
    }
    c.stop().await
}

/// The drain window of the drain test: long enough that closes spread over it are told apart
/// from closes all at once, even on a loaded machine.
const DRAIN_WINDOW: Duration = Duration::from_secs(2);

#[tokio::test]
async fn a_draining_gateway_moves_its_agents_to_the_others() -> anyhow::Result<()> {
    let mut c = Cluster::start(2, 1, |_| {}).await?;
    let lb = Balancer::start(vec![c.gateway_addr(0)?, c.gateway_addr(1)?]).await?;
    let agents = fleet_of(&c, &lb.ws_url(), 6, "drain", false).await?;
    let uids: Vec<String> = agents.iter().map(|(_, u)| u.clone()).collect();
    wait_all(&c, &uids, "on gw-0", |a| a["gateway"] == "gw-0").await?;
    let gw0 = c.gateway_of(0)?;
    let addr = c.gateway_addr(0)?;
    let ready = format!("http://{addr}/health/ready");
    assert_eq!(reqwest::get(&ready).await?.status(), 200);
    let newcomer_token = c.api().token("drain-newcomer").await?;

    // When each agent sees its connection end (watched from before the stop begins).
    let disconnects: Vec<_> = agents
        .iter()
        .map(|(agent, _)| {
            let mut st = agent.status();
            tokio::spawn(async move {
                wait_for(&mut st, DRAIN_WINDOW + DRAIN_GRACE, |s| !s.connected).await?;
                anyhow::Ok(Instant::now())
            })
        })
        .collect();
    let began = Instant::now();
    let stopping = c.begin_stop_gateway(0, DRAIN_WINDOW);

    // While the stop is in progress (agents still on gw-0): not ready, and a newcomer with a
    // good token is refused before the upgrade. A crash would answer neither.
    eventually("gw-0 not ready", DRAIN_WINDOW, || async {
        Ok((reqwest::get(&ready).await?.status() == 503).then_some(()))
    })
    .await?;
    let auth = tests::bearer(&newcomer_token);
    match WsConnection::connect(&format!("ws://{addr}/v1/opamp"), &auth).await {
        Err(agent::ConnectError::Status { status, body, .. }) => {
            assert_eq!((status, body.as_str()), (503, "server shutting down"));
        }
        Ok(_) => anyhow::bail!("a draining gateway admitted a new connection"),
        Err(e) => anyhow::bail!("a draining gateway must refuse with 503: {e}"),
    }
    assert!(
        gw0.connected() > 0 && !stopping.is_finished(),
        "the drain was over before its checks ({:?} after it began)",
        began.elapsed()
    );

    // The agents went one by one over the window, each told why (1001), not all at once.
    let mut at = Vec::new();
    for d in disconnects {
        at.push(d.await??.duration_since(began));
    }
    at.sort();
    let spread = at[at.len() - 1] - at[0];
    assert!(
        spread >= DRAIN_WINDOW / 2,
        "disconnects within {spread:?} of each other, not spread over {DRAIN_WINDOW:?}: {at:?}"
    );
    stopping.await??;
    for (agent, _) in &agents {
        assert_eq!(
            agent.status().borrow().last_close_reason.as_deref(),
            Some("1001 server shutting down"),
            "closed with a goodbye"
        );
    }

    wait_all(&c, &uids, "moved to gw-1", |a| {
        a["connected"] == true && a["gateway"] == "gw-1"
    })
    .await?;
    assert_eq!(c.gateway_connections(1), agents.len());
    for (a, _) in agents {
        a.stop().await;
    }
    c.stop().await
}

#[tokio::test]
async fn a_duplicate_connection_on_two_gateways_ends_with_one_live_session() -> anyhow::Result<()> {
    let c = Cluster::start(2, 1, |_| {}).await?;
    let token = c.api().token("dup").await?;
    let uid = InstanceUid::new_v7();
    let auth = vec![("Authorization".to_string(), format!("Bearer {token}"))];

    // A stale socket of the agent on gw-0 (it never reconnects by itself)...
    let mut stale = WsConnection::connect(&c.ws_url_of(0)?, &auth).await?;
    let hello = shared::testing::first_message(uid);
    stale.send(&hello).await?;
    assert!(stale.recv().await?.is_some(), "first reply");
    eventually("gw-0 holds the agent", DEADLINE, || async {
        Ok((c.gateway_connections(0) == 1).then_some(()))
    })
    .await?;
    c.api()
        .wait_agent(&uid.to_string(), "on gw-0", |a| a["gateway"] == "gw-0")
        .await?;

    // ...and the same agent connecting through gw-1.
    let mut o = opts(c.ws_url_of(1)?, token, "dup");
    o.instance_uid = Some(uid.0);
    let agent = Agent::start(o);
    wait_for(&mut agent.status(), DEADLINE, |s| {
        s.connected && s.replies > 0
    })
    .await?;

    // gw-1's claim bumped the epoch and told gw-0 to close the old socket.
    let closed = tokio::time::timeout(SUPERSEDED_CLOSE_WITHIN, async {
        loop {
            match stale.recv().await {
                Ok(Some(_)) => continue,
                _ => return stale.close_info(),
            }
        }
    })
    .await
    .context("the old socket was not closed at once")?;
    // A Close frame with the policy code, not a dropped socket (reported locally as 1006).
    let (code, reason) = closed.context("the old socket ended without any close")?;
    assert_eq!(code, 1008, "policy close: {reason}");
    eventually("exactly one live session", DEADLINE, || async {
        Ok((c.gateway_connections(0) == 0 && c.gateway_connections(1) == 1).then_some(()))
    })
    .await?;
    c.api()
        .wait_agent(&uid.to_string(), "held by gw-1", |a| {
            a["connected"] == true && a["gateway"] == "gw-1"
        })
        .await?;
    agent.stop().await;
    c.stop().await
}

#[tokio::test]
async fn configs_larger_than_the_nats_payload_limit_travel_both_ways() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1, |_| {}).await?;
    let agents = fleet_of(&c, &c.ws_url_of(0)?, 1, "big", false).await?;
    let uid = agents[0].1.clone();
    // 3 MiB: three times NATS's default max_payload; the agent reports it back as its
    // effective config, so it crosses the bus in both directions.
    let line = "# padding padding padding padding padding padding padding padding\n";
    let body: String = line.repeat((3 << 20) / line.len());
    let (id, hash) = c.api().config("big", &body).await?;
    c.api()
        .assign(json!({ "config_id": id, "agent": uid }))
        .await?;
    let s = wait_for(&mut agents[0].0.status(), DEADLINE, |s| {
        s.applied_configs >= 1
    })
    .await?;
    assert_eq!(s.effective_config.len(), body.len());
    let a = c
        .api()
        .wait_agent(&uid, "applied", |a| a["config_state"] == "applied")
        .await?;
    assert_eq!(a["remote_config"]["hash"], hash);
    assert_eq!(
        a["effective_config"][""]["body"].as_str().map(str::len),
        Some(body.len())
    );
    for (a, _) in agents {
        a.stop().await;
    }
    c.stop().await
}

#[tokio::test]
async fn a_token_revoked_through_one_coordinator_is_refused_by_all() -> anyhow::Result<()> {
    let c = Cluster::start(1, 2, |_| {}).await?;
    // Created through coord-0, so its cache holds the token as valid.
    let created = c
        .api_of(0)?
        .post("/api/v1/tokens", json!({ "name": "revoked" }))
        .await?;
    let token = created["token"].as_str().expect("token").to_string();
    let id = created["record"]["id"].as_str().expect("id").to_string();
    let (status, _) = c
        .api_of(1)?
        .raw(
            reqwest::Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            None,
        )
        .await?;
    assert_eq!(status, 204);
    // Authentication is answered by either coordinator (a queue group). Once the revocation
    // has been seen, every attempt must be refused: a coordinator answering from a stale
    // cache would let one through (each attempt has even odds of reaching either).
    let auth = vec![("Authorization".to_string(), format!("Bearer {token}"))];
    let attempt = || async {
        match WsConnection::connect(&c.ws_url_of(0)?, &auth).await {
            Err(agent::ConnectError::Status { status, body, .. }) => Ok(Some((status, body))),
            Ok(_) => Ok(None),
            Err(e) => Err(anyhow::Error::from(e)),
        }
    };
    eventually("the revocation is seen", REVOCATION_SEEN_WITHIN, attempt).await?;
    for _ in 0..12 {
        assert_eq!(attempt().await?, Some((401, "token revoked".to_string())));
    }
    c.stop().await
}

/// Agents per token-cache test: enough that both coordinators answer some authentications
/// (each goes to either, like a coin toss).
const WARM_AGENTS: usize = 24;

/// Lease TTL for the broadcast test: its lease rounds (every third) come too late to warm the
/// cache within [`BROADCAST_WARMS_WITHIN`], so only the `TokensCreated` broadcast can.
const SLOW_LEASE_TTL_MS: u64 = 60_000;

/// How soon a broadcast must have warmed the other coordinator's cache: a bus hop and one
/// query, with room for a loaded machine; well short of a slow lease round.
const BROADCAST_WARMS_WITHIN: Duration = Duration::from_secs(8);

/// Waits until coordinator `i` of `c` has every token in `tokens` cached.
async fn cached_by(
    c: &Cluster,
    i: usize,
    tokens: &[String],
    within: Duration,
) -> anyhow::Result<()> {
    let coord = c.coordinator_of(i)?;
    let what = format!("coord-{i} caches the new tokens");
    eventually(&what, within, || async {
        Ok(tokens
            .iter()
            .all(|t| coord.token_cached(&shared::token::hash_token(t)))
            .then_some(()))
    })
    .await
}

#[tokio::test]
async fn tokens_created_through_one_coordinator_are_cached_by_the_other_before_agents_connect(
) -> anyhow::Result<()> {
    let c = Cluster::start(1, 2, |cfg| cfg.cluster.lease_ttl_ms = SLOW_LEASE_TTL_MS).await?;
    let created = c
        .api_of(0)?
        .post(
            "/api/v1/tokens/batch",
            json!({ "name": "warm", "count": WARM_AGENTS }),
        )
        .await?;
    let tokens: Vec<String> = created["tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect();
    assert_eq!(tokens.len(), WARM_AGENTS);
    // coord-1 did not create them: without the broadcast it would learn them only by looking
    // each one up as its agent connects (or at a lease round, far later here).
    cached_by(&c, 1, &tokens, BROADCAST_WARMS_WITHIN).await?;

    let coord1 = c.coordinator_of(1)?;
    let (hits_before, misses_before) = coord1.token_cache_stats();
    let mut agents = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let agent = Agent::start(opts(c.ws_url_of(0)?, token.clone(), &format!("warm-{i}")));
        wait_for(&mut agent.status(), DEADLINE, |s| {
            s.connected && s.replies > 0
        })
        .await?;
        agents.push(agent);
    }
    let (hits, misses) = coord1.token_cache_stats();
    assert!(
        hits > hits_before,
        "coord-1 answered none of {WARM_AGENTS} authentications"
    );
    assert_eq!(
        misses, misses_before,
        "coord-1 looked tokens up in the store"
    );
    for a in agents {
        a.stop().await;
    }
    c.stop().await
}

#[tokio::test]
async fn a_token_created_without_a_broadcast_is_cached_by_every_coordinator_at_a_lease_round(
) -> anyhow::Result<()> {
    // The bus is at-most-once: a lost `TokensCreated` must cost a lease round, not a lookup
    // per agent. Writing the token straight into the store sends no broadcast at all.
    let c = Cluster::start(0, 2, |_| {}).await?;
    let store =
        coordinator::store::postgres::PgStore::connect(&c.base.cluster.postgres_url, 1).await?;
    let text = shared::token::new_bootstrap_token();
    let now = shared::now_ms();
    let rec = shared::domain::TokenRecord {
        id: uuid::Uuid::now_v7().simple().to_string(),
        name: "unannounced".into(),
        prefix: shared::token::display_prefix(&text),
        hash: shared::token::hash_token(&text),
        created_ms: now,
        expires_ms: now + 3_600_000,
        revoked_ms: None,
        redeemed_ms: None,
        bound_uid: None,
        scope: None,
    };
    shared::store::Store::create_token(&store, &rec).await?;
    // A lease round is a third of the sandbox's lease TTL; DEADLINE is many of them.
    let tokens = [text];
    for i in 0..2 {
        cached_by(&c, i, &tokens, DEADLINE).await?;
    }
    drop(store);
    c.stop().await
}
