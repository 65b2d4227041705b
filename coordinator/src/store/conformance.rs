//! The behaviour every [`Store`] implementation must show.
//!
//! [`run_all`] exercises every trait method with strict assertions. It uses fresh random ids,
//! uids, names and time ranges, so it can run against a database that already holds data
//! (including data from earlier runs), but it assumes nothing else writes to the store while
//! it runs (it counts API tokens). It spawns tasks, so it needs a Tokio runtime; use a
//! multi-threaded one to make the redemption and lease races meaningful.
//!
//! Semantics pinned here beyond the trait docs:
//! - `upsert_agents` with the same uid twice in one batch keeps the last record;
//! - `create_assignment` with an unknown config id fails with [`StoreError::NotFound`];
//! - creating a token or API token with a duplicate id or hash, or an API token with a name
//!   any other API token has (revoked or not), fails with [`StoreError::NotApplied`];
//! - `revoke_token` and `revoke_api_token` on an already revoked token return true and keep
//!   the first time; `find_api_token` does not find a revoked API token, `list_api_tokens`
//!   and `count_api_tokens` still count it;
//! - `tokens_created_since`: `since_ms` inclusive, oldest first by `created_ms` then id, each
//!   token in its current state (revoked, bound);
//! - `identities_changed_since`: identities created, confirmed or revoked at or after
//!   `since_ms` (inclusive), oldest first by `created_ms` then serial, in their current state;
//! - `redeem_token` checks revoked, then expired (`now_ms >= expires_ms`), then binding;
//! - `query_audit`: `since_ms` inclusive, `until_ms` exclusive, newest first by `at_ms` then
//!   id, at most `limit` entries (0 yields none); `append_audit` ignores `entry.id`;
//! - `scan_audit`: the same filters, oldest first by `at_ms` then id, strictly after the
//!   cursor; paging with the last entry's cursor visits every match exactly once;
//! - strings an agent reports may contain NUL characters and still round-trip;
//! - a coordinator is alive, and a lease live, while `now_ms < expires_ms`;
//! - a partition's first lease has fence 1; renewing a live lease keeps its fence;
//! - `release_leases` keeps the lease's row (so the fence keeps counting) but expires it, at
//!   or before the Unix epoch; releasing a lease another node holds does nothing;
//! - `list_leases` lists every partition ever leased once, by partition, expired and released
//!   leases included (callers compare `expires_ms` with their clock).
//!
//! The lease checks need every partition free at some instant: they run at a `now_ms` later
//! than every lease already in the store, so earlier runs do not interfere either.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use serde_json::json;
use shared::domain::{
    AgentRecord, ApiTokenListing, ApiTokenRecord, Assignment, AuditEntry, ConfigFile, ConfigMap,
    Health, IdentityRecord, Redemption, RemoteConfigReport, RemoteStatus, Role, Target,
    TokenRecord, TokenScope, Transport,
};
use shared::ids::{InstanceUid, PARTITIONS};
use shared::store::{
    AuditCursor, AuditQuery, Lease, NewAssignment, NewConfigVersion, Store, StoreError,
};

/// Runs every check against `store`.
pub async fn run_all(store: Arc<dyn Store>) {
    ping(store.as_ref()).await;
    agents_round_trip(store.as_ref()).await;
    agents_upsert_updates(store.as_ref()).await;
    agents_bulk(store.as_ref()).await;
    agents_by_partition(store.as_ref()).await;
    membership(store.as_ref()).await;
    leases(store.as_ref()).await;
    lease_race(store.clone()).await;
    configs(store.as_ref()).await;
    assignments(store.as_ref()).await;
    tokens(store.as_ref()).await;
    tokens_created_since(store.as_ref()).await;
    tokens_revoked_since(store.as_ref()).await;
    redemption(store.as_ref()).await;
    redemption_race(store.clone()).await;
    batch_redemption(store.as_ref()).await;
    api_tokens(store.as_ref()).await;
    api_token_revocation(store.as_ref()).await;
    identities(store.as_ref()).await;
    audit(store.as_ref()).await;
    audit_scan(store.as_ref()).await;
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn random_hash() -> [u8; 32] {
    rand::random()
}

fn file(body: &str, content_type: &str) -> ConfigFile {
    ConfigFile {
        body: body.into(),
        content_type: content_type.into(),
    }
}

/// An agent with every field set to a non-default value.
fn full_agent(uid: InstanceUid) -> AgentRecord {
    let mut a = AgentRecord::new(uid, 1_700_000_000_123);
    a.description
        .identifying
        .insert("service.name".into(), json!("otelcol-contrib"));
    a.description
        .identifying
        .insert("service.instance.id".into(), json!(uid.to_string()));
    a.description
        .non_identifying
        .insert("host.name".into(), json!("node-1.example"));
    a.description
        .non_identifying
        .insert("cpu.count".into(), json!(64));
    a.description
        .non_identifying
        .insert("load".into(), json!(1.5));
    a.description
        .non_identifying
        .insert("canary".into(), json!(true));
    a.description.non_identifying.insert(
        "nested".into(),
        json!({"list": [1, "two", null, {"x": -3}], "unicode": "ünï ✓"}),
    );
    // Agents report arbitrary strings; a NUL must neither fail the write nor get lost.
    a.description
        .non_identifying
        .insert("nul".into(), json!("before\u{0}after"));
    a.capabilities = u64::MAX;
    a.health = Some(Health {
        healthy: false,
        status: "StatusRecoverableError".into(),
        last_error: "exporter failing".into(),
        start_time_unix_nano: 1_700_000_000_000_000_001,
        status_time_unix_nano: u64::MAX,
        components: BTreeMap::from([
            (
                "pipeline:traces".into(),
                Health {
                    healthy: false,
                    status: "StatusRecoverableError".into(),
                    last_error: "otlp exporter: connection refused".into(),
                    start_time_unix_nano: 5,
                    status_time_unix_nano: 6,
                    components: BTreeMap::from([(
                        "exporter:otlp".into(),
                        Health {
                            healthy: false,
                            status: "StatusRecoverableError".into(),
                            last_error: "connection refused".into(),
                            start_time_unix_nano: 7,
                            status_time_unix_nano: 8,
                            components: BTreeMap::new(),
                        },
                    )]),
                },
            ),
            (
                "pipeline:metrics".into(),
                Health {
                    healthy: true,
                    status: "StatusOK".into(),
                    ..Health::default()
                },
            ),
        ]),
    });
    a.effective_config = Some(BTreeMap::from([
        (String::new(), file("receivers:\n  otlp: {}\n", "text/yaml")),
        (
            "extra.json".into(),
            file("{\"a\": \"b\\n\"}", "application/json"),
        ),
    ]));
    a.effective_config_hash = Some("e1".repeat(32));
    a.remote_config = Some(RemoteConfigReport {
        hash: "c0ffee".into(),
        status: RemoteStatus::Failed,
        error_message: "invalid key 'foo'".into(),
    });
    a.assigned_config = Some(42);
    a.assigned_config_hash = Some("c0ffee".into());
    a.applied_effective_hash = Some("e0".repeat(32));
    a.connected = true;
    a.transport = Some(Transport::WebSocket);
    a.gateway = Some("gw-7f3a".into());
    a.sequence_num = u64::MAX - 1;
    a.last_seen_ms = 1_700_000_999_999;
    a
}

/// `ping` answers.
pub async fn ping(store: &dyn Store) {
    store.ping().await.expect("ping");
}

/// Every field of an agent record survives `upsert_agents` → `get_agent` / `load_agents`.
pub async fn agents_round_trip(store: &dyn Store) {
    let full = full_agent(InstanceUid::new_v7());
    let minimal = AgentRecord::new(InstanceUid::new_v7(), -5);
    assert_eq!(
        store.get_agent(full.instance_uid).await.expect("get_agent"),
        None,
        "unknown agent"
    );
    store.upsert_agents(&[]).await.expect("empty upsert");
    store
        .upsert_agents(&[full.clone(), minimal.clone()])
        .await
        .expect("upsert_agents");
    assert_eq!(
        store.get_agent(full.instance_uid).await.expect("get_agent"),
        Some(full.clone())
    );
    assert_eq!(
        store
            .get_agent(minimal.instance_uid)
            .await
            .expect("get_agent"),
        Some(minimal.clone())
    );
    let all = store.load_agents().await.expect("load_agents");
    for want in [&full, &minimal] {
        let found: Vec<_> = all
            .iter()
            .filter(|a| a.instance_uid == want.instance_uid)
            .collect();
        assert_eq!(
            found,
            vec![want],
            "load_agents returns each agent once, intact"
        );
    }
}

/// Upserting an existing agent replaces its record instead of adding one.
pub async fn agents_upsert_updates(store: &dyn Store) {
    let uid = InstanceUid::new_v7();
    let first = full_agent(uid);
    store
        .upsert_agents(std::slice::from_ref(&first))
        .await
        .expect("upsert");

    let mut second = first.clone();
    second.connected = false;
    second.transport = Some(Transport::Http);
    second.gateway = None;
    second.health = None;
    second.remote_config = None;
    second.effective_config = Some(BTreeMap::new());
    second
        .description
        .non_identifying
        .insert("host.name".into(), json!("node-2.example"));
    second.description.identifying.remove("service.instance.id");
    second.sequence_num = 3;
    second.last_seen_ms = first.last_seen_ms + 1_000;
    store
        .upsert_agents(std::slice::from_ref(&second))
        .await
        .expect("upsert again");
    assert_eq!(
        store.get_agent(uid).await.expect("get_agent"),
        Some(second.clone())
    );

    // The same uid twice in one batch: the later record wins.
    let mut third = second.clone();
    third.sequence_num = 4;
    let mut fourth = second.clone();
    fourth.sequence_num = 5;
    fourth.connected = true;
    store
        .upsert_agents(&[third, fourth.clone()])
        .await
        .expect("upsert duplicate batch");
    assert_eq!(
        store.get_agent(uid).await.expect("get_agent"),
        Some(fourth.clone())
    );

    let all = store.load_agents().await.expect("load_agents");
    let found: Vec<_> = all.iter().filter(|a| a.instance_uid == uid).collect();
    assert_eq!(found, vec![&fourth], "upserts must not duplicate agents");
}

/// A batch larger than any plausible statement chunk round-trips completely.
pub async fn agents_bulk(store: &dyn Store) {
    let batch: Vec<AgentRecord> = (0..1_234)
        .map(|i| {
            let mut a = AgentRecord::new(InstanceUid::new_v7(), 1_000 + i);
            a.connected = i % 2 == 0;
            a.sequence_num = i as u64;
            a.description.identifying.insert("i".into(), json!(i));
            a
        })
        .collect();
    store.upsert_agents(&batch).await.expect("bulk upsert");
    let all = store.load_agents().await.expect("load_agents");
    let by_uid: BTreeMap<InstanceUid, &AgentRecord> =
        all.iter().map(|a| (a.instance_uid, a)).collect();
    for a in &batch {
        assert_eq!(
            by_uid.get(&a.instance_uid),
            Some(&a),
            "bulk agent round trip"
        );
    }
    let probe = &batch[batch.len() / 2];
    assert_eq!(
        store
            .get_agent(probe.instance_uid)
            .await
            .expect("get_agent"),
        Some(probe.clone())
    );
}

/// `load_agents_in` returns exactly the agents of the named partitions, each once.
pub async fn agents_by_partition(store: &dyn Store) {
    let batch: Vec<AgentRecord> = (0..600)
        .map(|i| {
            let mut a = AgentRecord::new(InstanceUid::new_v7(), 2_000 + i);
            a.description.identifying.insert("i".into(), json!(i));
            a
        })
        .collect();
    store.upsert_agents(&batch).await.expect("upsert_agents");
    // A few partitions that certainly hold some of ours, named twice and out of order.
    let chosen: BTreeSet<u16> = batch
        .iter()
        .take(5)
        .map(|a| a.instance_uid.partition())
        .collect();
    let mut asked: Vec<u16> = chosen.iter().rev().copied().collect();
    asked.extend(chosen.iter().copied());

    let got = store.load_agents_in(&asked).await.expect("load_agents_in");
    let got_by_uid: BTreeMap<InstanceUid, AgentRecord> =
        got.iter().map(|a| (a.instance_uid, a.clone())).collect();
    assert_eq!(got_by_uid.len(), got.len(), "each agent is returned once");
    let expected: BTreeMap<InstanceUid, AgentRecord> = store
        .load_agents()
        .await
        .expect("load_agents")
        .into_iter()
        .filter(|a| chosen.contains(&a.instance_uid.partition()))
        .map(|a| (a.instance_uid, a))
        .collect();
    assert_eq!(
        got_by_uid, expected,
        "exactly the agents of those partitions"
    );
    for a in &batch {
        let inside = chosen.contains(&a.instance_uid.partition());
        assert_eq!(
            got_by_uid.get(&a.instance_uid),
            inside.then_some(a),
            "agent in partition {}",
            a.instance_uid.partition()
        );
    }

    // An update keeps the agent in its partition.
    let mut moved = batch[0].clone();
    moved.connected = true;
    moved.last_seen_ms += 1;
    store
        .upsert_agents(std::slice::from_ref(&moved))
        .await
        .expect("upsert again");
    let again = store
        .load_agents_in(&[moved.instance_uid.partition()])
        .await
        .expect("load_agents_in");
    let found: Vec<_> = again
        .iter()
        .filter(|a| a.instance_uid == moved.instance_uid)
        .collect();
    assert_eq!(found, vec![&moved]);

    assert_eq!(
        store.load_agents_in(&[]).await.expect("load_agents_in"),
        Vec::<AgentRecord>::new(),
        "no partitions, no agents"
    );
}

/// Heartbeats make a coordinator a member until its TTL runs out; leaving is immediate.
pub async fn membership(store: &dyn Store) {
    // A random time far from real ones. Other runs may have left members behind; the checks
    // look only at this run's nodes (but at the order of the whole list).
    let t0: i64 = 5_000_000_000_000 + rand::random_range(0..1_000_000_000i64) * 1_000;
    let ttl = 1_000;
    let (a, b, c) = (unique("node-a"), unique("node-b"), unique("node-c"));
    let ours = [a.clone(), b.clone(), c.clone()];
    let heartbeat = |node: &str, now: i64| {
        let ours = ours.clone();
        let node = node.to_owned();
        async move {
            let all = store
                .coordinator_heartbeat(&node, now, ttl)
                .await
                .expect("coordinator_heartbeat");
            assert!(
                all.windows(2).all(|w| w[0] < w[1]),
                "members sorted, each once: {all:?}"
            );
            assert!(all.contains(&node), "the caller is a member");
            all.into_iter()
                .filter(|n| ours.contains(n))
                .collect::<Vec<_>>()
        }
    };

    assert_eq!(heartbeat(&a, t0).await, std::slice::from_ref(&a));
    assert_eq!(heartbeat(&b, t0 + 10).await, [a.clone(), b.clone()]);
    // b renews: now alive until t0 + 1500.
    assert_eq!(heartbeat(&b, t0 + 500).await, [a.clone(), b.clone()]);
    // a is alive until t0 + 1000, exclusive.
    assert_eq!(
        heartbeat(&c, t0 + 999).await,
        [a.clone(), b.clone(), c.clone()]
    );
    assert_eq!(heartbeat(&c, t0 + 1_000).await, [b.clone(), c.clone()]);
    // A member that expired comes back with its next heartbeat.
    assert_eq!(
        heartbeat(&a, t0 + 1_001).await,
        [a.clone(), b.clone(), c.clone()]
    );
    // Leaving takes effect at once, long before b's TTL would have run out.
    store
        .coordinator_leave(&b)
        .await
        .expect("coordinator_leave");
    assert_eq!(heartbeat(&c, t0 + 1_002).await, [a.clone(), c.clone()]);
    store
        .coordinator_leave(&unique("never-joined"))
        .await
        .expect("leaving without having joined");
    // b's TTL has run out as well by now; a heartbeat rejoins it.
    assert_eq!(
        heartbeat(&b, t0 + 1_600).await,
        [a.clone(), b.clone(), c.clone()]
    );
}

/// A `now_ms` at which every lease in the store has expired, so every partition is free.
async fn lease_clock(store: &dyn Store) -> i64 {
    let latest = store
        .list_leases()
        .await
        .expect("list_leases")
        .iter()
        .map(|l| l.expires_ms)
        .max()
        .unwrap_or(0);
    latest.max(1_700_000_000_000) + 1
}

fn lease(partition: u16, holder: &str, fence: i64, expires_ms: i64) -> Lease {
    Lease {
        partition,
        holder: holder.to_owned(),
        fence,
        expires_ms,
    }
}

/// Leases: acquire, renew, expire, take over with a fence bump, release.
pub async fn leases(store: &dyn Store) {
    let t = lease_clock(store).await;
    let before = store.list_leases().await.expect("list_leases");
    // The fence each partition had before this test (0: never leased).
    let fence = |p: u16| {
        before
            .iter()
            .find(|l| l.partition == p)
            .map_or(0, |l| l.fence)
    };
    let ttl = 100;
    let (a, b, c) = (unique("lease-a"), unique("lease-b"), unique("lease-c"));
    // The last one checks that the whole u16 range round-trips.
    let (p1, p2, p3, p4) = (11, 12, 13, u16::MAX);
    let acquire = |node: &str, want: &[u16], now: i64| {
        let (node, want) = (node.to_owned(), want.to_vec());
        async move {
            store
                .acquire_leases(&node, &want, now, ttl)
                .await
                .expect("acquire_leases")
        }
    };

    // Free partitions are taken, in partition order, each once however often it is named.
    assert_eq!(
        acquire(&a, &[p3, p1, p2, p1], t).await,
        [
            lease(p1, &a, fence(p1) + 1, t + ttl),
            lease(p2, &a, fence(p2) + 1, t + ttl),
            lease(p3, &a, fence(p3) + 1, t + ttl),
        ]
    );
    // Live leases are not taken from their holder.
    assert_eq!(
        acquire(&b, &[p2, p3, p4], t + 10).await,
        [lease(p4, &b, fence(p4) + 1, t + 10 + ttl)]
    );
    // Renewal needs no `want`, extends every live lease and keeps its fence.
    assert_eq!(
        acquire(&a, &[], t + 50).await,
        [
            lease(p1, &a, fence(p1) + 1, t + 50 + ttl),
            lease(p2, &a, fence(p2) + 1, t + 50 + ttl),
            lease(p3, &a, fence(p3) + 1, t + 50 + ttl),
        ]
    );
    // b's lease on p4 expired at t + 110 and b does not ask for it: b holds nothing. a's
    // leases are live until t + 150, exclusive.
    assert_eq!(acquire(&b, &[p2], t + 149).await, []);
    // At t + 150 a's leases have expired: b takes two of them and re-takes its own expired
    // one; every one of these changes bumps the fence.
    assert_eq!(
        acquire(&b, &[p2, p3, p4], t + 150).await,
        [
            lease(p2, &b, fence(p2) + 2, t + 150 + ttl),
            lease(p3, &b, fence(p3) + 2, t + 150 + ttl),
            lease(p4, &b, fence(p4) + 2, t + 150 + ttl),
        ]
    );
    // a gets back only the one nobody took, at a new fence.
    assert_eq!(
        acquire(&a, &[p1, p2, p3], t + 151).await,
        [lease(p1, &a, fence(p1) + 2, t + 151 + ttl)]
    );

    // A released lease can be taken at once, long before it would have expired.
    store
        .release_leases(&b, &[p2])
        .await
        .expect("release_leases");
    assert_eq!(
        acquire(&a, &[p2], t + 152).await,
        [
            lease(p1, &a, fence(p1) + 2, t + 152 + ttl),
            lease(p2, &a, fence(p2) + 3, t + 152 + ttl),
        ]
    );
    // Releasing someone else's lease, or nothing, changes nothing.
    store
        .release_leases(&a, &[p3, p4])
        .await
        .expect("release_leases");
    store.release_leases(&c, &[]).await.expect("release_leases");
    assert_eq!(acquire(&c, &[p3, p4], t + 153).await, []);

    let listed: BTreeMap<u16, Lease> = {
        let all = store.list_leases().await.expect("list_leases");
        assert!(
            all.windows(2).all(|w| w[0].partition < w[1].partition),
            "list_leases: by partition, each once"
        );
        all.into_iter().map(|l| (l.partition, l)).collect()
    };
    assert_eq!(listed[&p1], lease(p1, &a, fence(p1) + 2, t + 152 + ttl));
    assert_eq!(listed[&p2], lease(p2, &a, fence(p2) + 3, t + 152 + ttl));
    assert_eq!(listed[&p3], lease(p3, &b, fence(p3) + 2, t + 150 + ttl));
    assert_eq!(listed[&p4], lease(p4, &b, fence(p4) + 2, t + 150 + ttl));

    // A graceful leave: b releases everything; its leases stay listed, expired.
    store
        .release_leases(&b, &[p3, p4])
        .await
        .expect("release_leases");
    for l in store.list_leases().await.expect("list_leases") {
        if l.partition == p3 || l.partition == p4 {
            assert_eq!(l.holder, b);
            assert!(l.expires_ms <= 0, "a released lease is expired: {l:?}");
        }
    }
    assert_eq!(acquire(&b, &[], t + 154).await, [], "b holds nothing");
}

/// Several coordinators racing for every partition at once: each partition ends up with
/// exactly one holder, and nobody's call fails.
pub async fn lease_race(store: Arc<dyn Store>) {
    lease_race_between(&[store.clone(), store]).await;
}

/// [`lease_race`] with the racers spread over `stores` (several handles on one database stand
/// in for several processes).
pub async fn lease_race_between(stores: &[Arc<dyn Store>]) {
    const NODES: usize = 4;
    let ttl = 60_000;
    let t = lease_clock(stores[0].as_ref()).await;
    let nodes: Vec<String> = (0..NODES).map(|i| unique(&format!("racer-{i}"))).collect();
    let race = |now: i64| {
        let barrier = Arc::new(tokio::sync::Barrier::new(NODES));
        let tasks: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let store = stores[i % stores.len()].clone();
                let (barrier, node) = (barrier.clone(), node.clone());
                // Half of them name the partitions backwards: the order must not matter.
                let want: Vec<u16> = if i % 2 == 0 {
                    (0..PARTITIONS).collect()
                } else {
                    (0..PARTITIONS).rev().collect()
                };
                tokio::spawn(async move {
                    barrier.wait().await;
                    let leases = store.acquire_leases(&node, &want, now, ttl).await;
                    (node, leases)
                })
            })
            .collect();
        async move {
            let mut holders: BTreeMap<u16, Lease> = BTreeMap::new();
            for task in tasks {
                let (node, leases) = task.await.expect("racer panicked");
                for l in leases.expect("acquire_leases in a race") {
                    assert_eq!(l.holder, node);
                    assert_eq!(l.expires_ms, now + ttl);
                    let p = l.partition;
                    if let Some(other) = holders.insert(p, l) {
                        panic!("partition {p} held twice, also by {}", other.holder);
                    }
                }
            }
            holders
        }
    };

    let first = race(t).await;
    assert_eq!(
        first.keys().copied().collect::<Vec<_>>(),
        (0..PARTITIONS).collect::<Vec<_>>(),
        "every partition has a holder"
    );
    let listed = stores[0].list_leases().await.expect("list_leases");
    for l in listed.iter().filter(|l| l.partition < PARTITIONS) {
        assert_eq!(Some(l), first.get(&l.partition), "list_leases agrees");
    }

    // Racing again while the leases are live renews them: nothing moves, no fence changes.
    let second = race(t + 1).await;
    let moved: Vec<u16> = (0..PARTITIONS)
        .filter(|p| {
            let before = first.get(p).map(|l| (&l.holder, l.fence));
            before != second.get(p).map(|l| (&l.holder, l.fence))
        })
        .collect();
    assert_eq!(moved, Vec::<u16>::new(), "live leases changed hands");
}

fn new_config(name: &str, files: ConfigMap) -> NewConfigVersion {
    NewConfigVersion {
        name: name.into(),
        files,
        hash: format!("{:0>64}", name.len()),
        author: unique("author"),
        created_ms: 1_700_000_000_000,
    }
}

/// Config versions get growing ids and read back whole.
pub async fn configs(store: &dyn Store) {
    let a = new_config(
        &unique("cfg-a"),
        BTreeMap::from([(String::new(), file("receivers: {}\n", "text/yaml"))]),
    );
    let b = new_config(
        &unique("cfg-b"),
        BTreeMap::from([
            ("base.yaml".into(), file("exporters: {}\n", "text/yaml")),
            ("over.yaml".into(), file("", "")),
        ]),
    );
    let ca = store.create_config(a.clone()).await.expect("create_config");
    let cb = store.create_config(b.clone()).await.expect("create_config");
    assert!(
        cb.id > ca.id,
        "config ids must grow: {} then {}",
        ca.id,
        cb.id
    );
    for (created, new) in [(&ca, &a), (&cb, &b)] {
        assert_eq!(created.name, new.name);
        assert_eq!(created.files, new.files);
        assert_eq!(created.hash, new.hash);
        assert_eq!(created.author, new.author);
        assert_eq!(created.created_ms, new.created_ms);
        assert_eq!(
            store.get_config(created.id).await.expect("get_config"),
            Some(created.clone())
        );
    }
    assert_eq!(store.get_config(-1).await.expect("get_config"), None);
    assert_eq!(store.get_config(i64::MAX).await.expect("get_config"), None);

    let list = store.list_configs().await.expect("list_configs");
    let pos = |id: i64| list.iter().position(|c| c.id == id);
    let (pa, pb) = (pos(ca.id).expect("a listed"), pos(cb.id).expect("b listed"));
    assert!(pa < pb, "list_configs is ordered by id");
    assert_eq!(list[pa], ca);
    assert_eq!(list[pb], cb);
    assert!(
        list.windows(2).all(|w| w[0].id < w[1].id),
        "list_configs is ordered by id"
    );
}

/// Assignments of all target kinds round-trip and list oldest first.
pub async fn assignments(store: &dyn Store) {
    let config = store
        .create_config(new_config(
            &unique("cfg"),
            BTreeMap::from([(String::new(), file("x: 1\n", "text/yaml"))]),
        ))
        .await
        .expect("create_config");
    let targets = [
        Target::Agent(InstanceUid::new_v7()),
        Target::Labels(BTreeMap::from([
            ("env".to_string(), "prod".to_string()),
            ("service.name".to_string(), unique("svc")),
        ])),
        Target::All,
        Target::Labels(BTreeMap::new()),
    ];
    let mut created: Vec<Assignment> = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let new = NewAssignment {
            config_id: config.id,
            target: target.clone(),
            author: unique("author"),
            created_ms: 1_700_000_000_000 + i as i64,
        };
        let a = store
            .create_assignment(new.clone())
            .await
            .expect("create_assignment");
        assert_eq!(a.config_id, new.config_id);
        assert_eq!(a.target, new.target);
        assert_eq!(a.author, new.author);
        assert_eq!(a.created_ms, new.created_ms);
        if let Some(prev) = created.last() {
            assert!(a.id > prev.id, "assignment ids must grow");
        }
        created.push(a);
    }
    let list = store.list_assignments().await.expect("list_assignments");
    assert!(
        list.windows(2).all(|w| w[0].id < w[1].id),
        "list_assignments is oldest first"
    );
    let ours: Vec<Assignment> = list
        .into_iter()
        .filter(|a| a.config_id == config.id)
        .collect();
    assert_eq!(ours, created);

    let missing = store
        .create_assignment(NewAssignment {
            config_id: i64::MAX,
            target: Target::All,
            author: "nobody".into(),
            created_ms: 0,
        })
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "assignment to an unknown config: {missing:?}"
    );
    let list = store.list_assignments().await.expect("list_assignments");
    assert!(list.iter().all(|a| a.config_id != i64::MAX));
}

fn new_token(expires_ms: i64) -> TokenRecord {
    TokenRecord {
        id: uuid::Uuid::new_v4().to_string(),
        name: unique("token"),
        prefix: "amp-bs.abcd…".into(),
        hash: random_hash(),
        created_ms: 1_700_000_000_000,
        expires_ms,
        revoked_ms: None,
        redeemed_ms: None,
        bound_uid: None,
        scope: None,
    }
}

async fn find(store: &dyn Store, t: &TokenRecord) -> TokenRecord {
    store
        .find_token(&t.hash)
        .await
        .expect("find_token")
        .expect("token exists")
}

/// Tokens: create, list, find by hash, revoke.
pub async fn tokens(store: &dyn Store) {
    let t = new_token(i64::MAX);
    let mut pre_bound = new_token(1_800_000_000_000);
    pre_bound.bound_uid = Some(InstanceUid::new_v7());
    pre_bound.redeemed_ms = Some(1_700_000_000_500);
    pre_bound.revoked_ms = Some(1_700_000_000_600);
    let mut scoped = new_token(i64::MAX);
    scoped.scope = Some(TokenScope {
        labels: BTreeMap::from([
            ("env".to_string(), "prod".to_string()),
            ("service.name".to_string(), "ünï ✓ \"quoted\"".to_string()),
        ]),
    });
    store.create_token(&t).await.expect("create_token");
    store.create_token(&pre_bound).await.expect("create_token");
    store.create_token(&scoped).await.expect("create_token");

    assert_eq!(find(store, &t).await, t);
    assert_eq!(find(store, &pre_bound).await, pre_bound);
    assert_eq!(find(store, &scoped).await, scoped, "a scope round-trips");
    assert_eq!(
        store.find_token(&random_hash()).await.expect("find_token"),
        None
    );
    for want in [&t, &pre_bound, &scoped] {
        assert_eq!(
            store.get_token(&want.id).await.expect("get_token"),
            Some(want.clone()),
            "get_token by id"
        );
    }
    assert_eq!(
        store
            .get_token(&unique("missing"))
            .await
            .expect("get_token"),
        None
    );
    let list = store.list_tokens().await.expect("list_tokens");
    for want in [&t, &pre_bound, &scoped] {
        let found: Vec<_> = list.iter().filter(|x| x.id == want.id).collect();
        assert_eq!(
            found,
            vec![want],
            "list_tokens shows each token once, intact"
        );
    }

    let mut same_id = new_token(i64::MAX);
    same_id.id = t.id.clone();
    let dup = store.create_token(&same_id).await;
    assert!(
        matches!(dup, Err(StoreError::NotApplied(_))),
        "duplicate id: {dup:?}"
    );
    let mut same_hash = new_token(i64::MAX);
    same_hash.hash = t.hash;
    let dup = store.create_token(&same_hash).await;
    assert!(
        matches!(dup, Err(StoreError::NotApplied(_))),
        "duplicate hash: {dup:?}"
    );
    assert_eq!(find(store, &t).await, t, "failed creates change nothing");

    assert!(!store
        .revoke_token(&uuid::Uuid::new_v4().to_string(), 1)
        .await
        .expect("revoke_token"));
    assert!(store
        .revoke_token(&t.id, 1_700_000_001_000)
        .await
        .expect("revoke"));
    let revoked = find(store, &t).await;
    assert_eq!(revoked.revoked_ms, Some(1_700_000_001_000));
    assert_eq!(
        TokenRecord {
            revoked_ms: None,
            ..revoked.clone()
        },
        t,
        "revoking changes only revoked_ms"
    );
    assert!(store
        .revoke_token(&t.id, 1_700_000_002_000)
        .await
        .expect("revoke again"));
    assert_eq!(
        find(store, &t).await.revoked_ms,
        Some(1_700_000_001_000),
        "a second revocation keeps the first time"
    );
}

/// `tokens_created_since`: inclusive lower bound, oldest first, current state. Runs in a time
/// range of its own (after every token already in the store), so earlier data only adds
/// tokens at or after it, which the checks allow for.
pub async fn tokens_created_since(store: &dyn Store) {
    let newest = store
        .list_tokens()
        .await
        .expect("list_tokens")
        .iter()
        .map(|t| t.created_ms)
        .max()
        .unwrap_or(0);
    let base = newest.max(1_700_000_000_000) + 1_000;
    let at = |offset: i64| {
        let mut t = new_token(i64::MAX);
        t.created_ms = base + offset;
        t
    };
    let (early, mid, late) = (at(0), at(10), at(20));
    // Created out of order: the order is by created_ms, not insertion.
    for t in [&late, &early, &mid] {
        store.create_token(t).await.expect("create_token");
    }
    let mut revoked_mid = mid.clone();
    revoked_mid.revoked_ms = Some(base + 15);
    assert!(store
        .revoke_token(&mid.id, base + 15)
        .await
        .expect("revoke"));

    let ids = [early.id.clone(), mid.id.clone(), late.id.clone()];
    let ids = &ids;
    let ours = |since: i64| async move {
        let got = store
            .tokens_created_since(since)
            .await
            .expect("tokens_created_since");
        assert!(
            got.windows(2)
                .all(|w| (w[0].created_ms, &w[0].id) <= (w[1].created_ms, &w[1].id)),
            "oldest first"
        );
        assert!(
            got.iter().all(|t| t.created_ms >= since),
            "nothing created before since_ms"
        );
        got.into_iter()
            .filter(|t| ids.contains(&t.id))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ours(base).await,
        vec![early.clone(), revoked_mid.clone(), late.clone()],
        "since is inclusive; each token in its current state"
    );
    assert_eq!(
        ours(base + 10).await,
        vec![revoked_mid, late.clone()],
        "an exact created_ms is included"
    );
    assert_eq!(ours(base + 11).await, vec![late]);
    assert_eq!(ours(base + 21).await, Vec::<TokenRecord>::new());
}

/// `tokens_revoked_since`: only revoked tokens, inclusive lower bound on `revoked_ms`.
pub async fn tokens_revoked_since(store: &dyn Store) {
    let base = 1_900_000_000_000 + i64::from(rand::random::<u16>()) * 1_000_000;
    let (kept, gone, older) = (
        new_token(i64::MAX),
        new_token(i64::MAX),
        new_token(i64::MAX),
    );
    for t in [&kept, &gone, &older] {
        store.create_token(t).await.expect("create_token");
    }
    assert!(store
        .revoke_token(&older.id, base - 1)
        .await
        .expect("revoke"));
    assert!(store.revoke_token(&gone.id, base).await.expect("revoke"));
    let got = store
        .tokens_revoked_since(base)
        .await
        .expect("tokens_revoked_since");
    let ids: Vec<&str> = got
        .iter()
        .filter(|t| [&kept.id, &gone.id, &older.id].contains(&&t.id))
        .map(|t| t.id.as_str())
        .collect();
    assert_eq!(
        ids,
        vec![gone.id.as_str()],
        "revoked at or after since_ms only"
    );
    assert!(got.iter().all(|t| t.revoked_ms.is_some_and(|r| r >= base)));
}

/// A batch binds in request order, audits each binding exactly once, and refuses the rest.
pub async fn batch_redemption(store: &dyn Store) {
    let now = 1_700_000_000_000;
    let (a, b) = (InstanceUid::new_v7(), InstanceUid::new_v7());
    let t = new_token(now + 3_600_000);
    store.create_token(&t).await.expect("create_token");
    let actor = unique("batch");
    let req = |uid: InstanceUid| shared::store::RedeemRequest {
        token_id: t.id.clone(),
        uid,
        audit: shared::domain::AuditEntry {
            id: 0,
            at_ms: now,
            actor: actor.clone(),
            action: "token.redeem".into(),
            instance_uid: Some(uid),
            source_ip: None,
            reason: None,
            detail: serde_json::json!({ "token_id": t.id }),
        },
    };
    let missing = shared::store::RedeemRequest {
        token_id: unique("missing"),
        ..req(b)
    };
    let outcomes = store
        .redeem_tokens(&[req(a), req(b), req(a), missing], now)
        .await
        .expect("redeem_tokens");
    assert_eq!(
        outcomes,
        vec![
            Redemption::Bound,
            Redemption::BoundToOther,
            Redemption::AlreadyBoundToSame,
            Redemption::NotFound
        ]
    );
    assert_eq!(find(store, &t).await.bound_uid, Some(a));
    let audited = store
        .query_audit(&shared::store::AuditQuery {
            actor: Some(actor.clone()),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("query_audit");
    assert_eq!(audited.len(), 1, "only the binding is audited");
    assert_eq!(audited[0].instance_uid, Some(a));
}

/// Redemption outcomes, one by one.
pub async fn redemption(store: &dyn Store) {
    let now = 1_700_000_000_000;
    let (a, b) = (InstanceUid::new_v7(), InstanceUid::new_v7());

    let t = new_token(now + 3_600_000);
    store.create_token(&t).await.expect("create_token");
    assert_eq!(
        store.redeem_token(&t.id, a, now).await.expect("redeem"),
        Redemption::Bound
    );
    let bound = find(store, &t).await;
    assert_eq!(bound.bound_uid, Some(a));
    assert_eq!(bound.redeemed_ms, Some(now));
    assert_eq!(bound.revoked_ms, None);

    assert_eq!(
        store.redeem_token(&t.id, a, now + 1).await.expect("redeem"),
        Redemption::AlreadyBoundToSame
    );
    assert_eq!(
        store.redeem_token(&t.id, b, now + 2).await.expect("redeem"),
        Redemption::BoundToOther
    );
    let after = find(store, &t).await;
    assert_eq!(after.bound_uid, Some(a), "binding is permanent");
    assert_eq!(
        after.redeemed_ms,
        Some(now),
        "redeemed_ms is the first binding"
    );

    // Bound, then expired: refused even to its own agent.
    assert_eq!(
        store
            .redeem_token(&t.id, a, t.expires_ms)
            .await
            .expect("redeem"),
        Redemption::Expired
    );
    // Bound, then revoked: refused even to its own agent.
    assert!(store.revoke_token(&t.id, now + 3).await.expect("revoke"));
    assert_eq!(
        store.redeem_token(&t.id, a, now + 4).await.expect("redeem"),
        Redemption::Revoked
    );
    assert_eq!(
        store.redeem_token(&t.id, b, now + 4).await.expect("redeem"),
        Redemption::Revoked
    );

    // Revoked before any redemption; revoked wins over expired.
    let r = new_token(now + 10);
    store.create_token(&r).await.expect("create_token");
    assert!(store.revoke_token(&r.id, now).await.expect("revoke"));
    assert_eq!(
        store.redeem_token(&r.id, a, now + 1).await.expect("redeem"),
        Redemption::Revoked
    );
    assert_eq!(
        store
            .redeem_token(&r.id, a, now + 10)
            .await
            .expect("redeem"),
        Redemption::Revoked
    );
    assert_eq!(find(store, &r).await.bound_uid, None);
    assert_eq!(find(store, &r).await.redeemed_ms, None);

    // Expiry: now >= expires_ms is expired, one millisecond earlier is not.
    let e = new_token(now + 100);
    store.create_token(&e).await.expect("create_token");
    assert_eq!(
        store
            .redeem_token(&e.id, a, now + 100)
            .await
            .expect("redeem"),
        Redemption::Expired
    );
    assert_eq!(
        store
            .redeem_token(&e.id, a, now + 5_000)
            .await
            .expect("redeem"),
        Redemption::Expired
    );
    assert_eq!(
        find(store, &e).await.bound_uid,
        None,
        "expired stays unbound"
    );
    assert_eq!(
        store
            .redeem_token(&e.id, b, now + 99)
            .await
            .expect("redeem"),
        Redemption::Bound
    );
    assert_eq!(find(store, &e).await.bound_uid, Some(b));

    assert_eq!(
        store
            .redeem_token(&uuid::Uuid::new_v4().to_string(), a, now)
            .await
            .expect("redeem"),
        Redemption::NotFound
    );
}

/// Of 32 concurrent redemptions of one token by different agents, exactly one binds.
pub async fn redemption_race(store: Arc<dyn Store>) {
    redemption_race_between(&[store]).await;
}

/// [`redemption_race`] with the racers spread over `stores` (several handles on one database
/// stand in for several processes): every other racer is told `BoundToOther`, and the token
/// ends bound to the winner.
pub async fn redemption_race_between(stores: &[Arc<dyn Store>]) {
    const RACERS: usize = 32;
    let now = 1_700_000_000_000;
    let t = new_token(now + 3_600_000);
    let store = &stores[0];
    store.create_token(&t).await.expect("create_token");
    let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
    let tasks: Vec<_> = (0..RACERS)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            let (barrier, id) = (barrier.clone(), t.id.clone());
            let uid = InstanceUid::new_v7();
            tokio::spawn(async move {
                barrier.wait().await;
                (uid, store.redeem_token(&id, uid, now).await)
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut losers = 0;
    for task in tasks {
        let (uid, outcome) = task.await.expect("racer panicked");
        match outcome.expect("redeem_token") {
            Redemption::Bound => winners.push(uid),
            Redemption::BoundToOther => losers += 1,
            other => panic!("unexpected outcome in race: {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one winner: {winners:?}");
    assert_eq!(losers, RACERS - 1);
    let stored = store
        .find_token(&t.hash)
        .await
        .expect("find_token")
        .expect("token exists");
    assert_eq!(stored.bound_uid, Some(winners[0]), "the winner is bound");
    assert_eq!(stored.redeemed_ms, Some(now));
}

/// Operator API tokens: create, find, count.
pub async fn api_tokens(store: &dyn Store) {
    let before = store.count_api_tokens().await.expect("count_api_tokens");
    let tokens: Vec<ApiTokenRecord> = [Role::Viewer, Role::Operator, Role::Admin]
        .into_iter()
        .map(|role| ApiTokenRecord {
            id: uuid::Uuid::new_v4().to_string(),
            name: unique("api"),
            role,
            hash: random_hash(),
            created_ms: 1_700_000_000_000,
        })
        .collect();
    for t in &tokens {
        store.create_api_token(t).await.expect("create_api_token");
    }
    for t in &tokens {
        assert_eq!(
            store.find_api_token(&t.hash).await.expect("find_api_token"),
            Some(t.clone())
        );
    }
    assert_eq!(
        store
            .find_api_token(&random_hash())
            .await
            .expect("find_api_token"),
        None
    );
    // Bootstrap and API tokens are separate: a bootstrap hash is no API token.
    let bootstrap = new_token(i64::MAX);
    store.create_token(&bootstrap).await.expect("create_token");
    assert_eq!(
        store
            .find_api_token(&bootstrap.hash)
            .await
            .expect("find_api_token"),
        None
    );
    assert_eq!(
        store.count_api_tokens().await.expect("count_api_tokens"),
        before + 3
    );

    let mut dup = tokens[0].clone();
    dup.hash = random_hash();
    let res = store.create_api_token(&dup).await;
    assert!(
        matches!(res, Err(StoreError::NotApplied(_))),
        "duplicate api token id: {res:?}"
    );
    let mut dup = tokens[1].clone();
    dup.id = uuid::Uuid::new_v4().to_string();
    let res = store.create_api_token(&dup).await;
    assert!(
        matches!(res, Err(StoreError::NotApplied(_))),
        "duplicate api token hash: {res:?}"
    );
    let mut dup = tokens[2].clone();
    dup.id = uuid::Uuid::new_v4().to_string();
    dup.hash = random_hash();
    let res = store.create_api_token(&dup).await;
    assert!(
        matches!(res, Err(StoreError::NotApplied(_))),
        "duplicate api token name: {res:?}"
    );
    assert_eq!(
        store.count_api_tokens().await.expect("count_api_tokens"),
        before + 3
    );
    let listed = store.list_api_tokens().await.expect("list_api_tokens");
    assert!(
        listed
            .windows(2)
            .all(|w| (w[0].token.created_ms, &w[0].token.id)
                <= (w[1].token.created_ms, &w[1].token.id)),
        "list_api_tokens is oldest first"
    );
    for t in &tokens {
        let found: Vec<_> = listed.iter().filter(|l| l.token.id == t.id).collect();
        assert_eq!(
            found,
            vec![&ApiTokenListing {
                token: t.clone(),
                revoked_ms: None
            }],
            "list_api_tokens shows each token once, intact"
        );
    }
}

/// Revoked API tokens are no longer found for authentication, but stay listed and counted,
/// and keep their name.
pub async fn api_token_revocation(store: &dyn Store) {
    let t = ApiTokenRecord {
        id: uuid::Uuid::new_v4().to_string(),
        name: unique("revoked"),
        role: Role::Operator,
        hash: random_hash(),
        created_ms: 1_700_000_000_000,
    };
    store.create_api_token(&t).await.expect("create_api_token");
    let before = store.count_api_tokens().await.expect("count_api_tokens");
    assert!(!store
        .revoke_api_token(&unique("missing"), 1)
        .await
        .expect("revoke_api_token"));
    assert!(store
        .revoke_api_token(&t.id, 1_700_000_001_000)
        .await
        .expect("revoke_api_token"));
    assert_eq!(
        store.find_api_token(&t.hash).await.expect("find_api_token"),
        None,
        "a revoked token does not authenticate"
    );
    assert!(store
        .revoke_api_token(&t.id, 1_700_000_002_000)
        .await
        .expect("revoke again"));
    let listed = store.list_api_tokens().await.expect("list_api_tokens");
    let found: Vec<_> = listed.iter().filter(|l| l.token.id == t.id).collect();
    assert_eq!(
        found,
        vec![&ApiTokenListing {
            token: t.clone(),
            revoked_ms: Some(1_700_000_001_000),
        }],
        "listed with the first revocation time"
    );
    assert_eq!(
        store.count_api_tokens().await.expect("count_api_tokens"),
        before,
        "revoked tokens still count"
    );
    let reuse = ApiTokenRecord {
        id: uuid::Uuid::new_v4().to_string(),
        hash: random_hash(),
        ..t.clone()
    };
    let res = store.create_api_token(&reuse).await;
    assert!(
        matches!(res, Err(StoreError::NotApplied(_))),
        "a revoked token's name is not reused: {res:?}"
    );
}

/// Identities: create, read back by serial and by agent, confirm and revoke keep their first
/// time, revoked ones are listed; a serial is never reused.
pub async fn identities(store: &dyn Store) {
    let uid = InstanceUid::new_v7();
    let a = IdentityRecord {
        serial: unique("a"),
        instance_uid: uid,
        created_ms: 1_700_000_000_000,
        not_after_ms: 1_702_592_000_000,
        confirmed_ms: None,
        revoked_ms: None,
        fingerprint: "ab".repeat(32),
        cert_pem: "-----BEGIN CERTIFICATE-----\n…\n-----END CERTIFICATE-----\n".into(),
    };
    let b = IdentityRecord {
        serial: unique("b"),
        created_ms: 1_700_000_100_000,
        ..a.clone()
    };
    store.create_identity(&a).await.expect("create_identity");
    store.create_identity(&b).await.expect("create_identity");
    let dup = store.create_identity(&a).await;
    assert!(
        matches!(dup, Err(StoreError::NotApplied(_))),
        "a serial is unique: {dup:?}"
    );
    assert_eq!(
        store.get_identity(&a.serial).await.expect("get_identity"),
        Some(a.clone())
    );
    assert_eq!(
        store.get_identity(&unique("missing")).await.expect("get"),
        None
    );
    assert_eq!(
        store.identities_of(uid).await.expect("identities_of"),
        vec![a.clone(), b.clone()],
        "oldest first"
    );
    assert!(store
        .identities_of(InstanceUid::new_v7())
        .await
        .expect("identities_of")
        .is_empty());
    let all = store.list_identities().await.expect("list_identities");
    assert!(all.contains(&a) && all.contains(&b));

    assert!(!store
        .confirm_identity(&unique("missing"), 1)
        .await
        .expect("confirm"));
    assert!(store
        .confirm_identity(&a.serial, 1_700_000_001_000)
        .await
        .expect("confirm"));
    assert!(store
        .confirm_identity(&a.serial, 1_700_000_002_000)
        .await
        .expect("confirm again"));
    assert!(!store
        .revoke_identity(&unique("missing"), 1)
        .await
        .expect("revoke"));
    assert!(store
        .revoke_identity(&a.serial, 1_700_000_003_000)
        .await
        .expect("revoke"));
    assert!(store
        .revoke_identity(&a.serial, 1_700_000_004_000)
        .await
        .expect("revoke again"));
    let back = store
        .get_identity(&a.serial)
        .await
        .expect("get")
        .expect("there");
    assert_eq!(
        back.confirmed_ms,
        Some(1_700_000_001_000),
        "first confirmation kept"
    );
    assert_eq!(
        back.revoked_ms,
        Some(1_700_000_003_000),
        "first revocation kept"
    );
    let revoked = store
        .revoked_identities()
        .await
        .expect("revoked_identities");
    assert!(revoked.iter().any(|i| i.serial == a.serial));
    assert!(!revoked.iter().any(|i| i.serial == b.serial));

    // Changed since: by creation, confirmation or revocation, inclusive, in current state.
    let changed = |since: i64| async move {
        let got = store
            .identities_changed_since(since)
            .await
            .expect("identities_changed_since");
        assert!(
            got.windows(2)
                .all(|w| (w[0].created_ms, &w[0].serial) <= (w[1].created_ms, &w[1].serial)),
            "oldest first"
        );
        got.into_iter()
            .filter(|i| i.instance_uid == uid)
            .map(|i| i.serial)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        changed(1_700_000_000_000).await,
        vec![a.serial.clone(), b.serial.clone()]
    );
    // a was created before but revoked at 1_700_000_003_000 (inclusive); b created later.
    assert_eq!(
        changed(1_700_000_003_000).await,
        vec![a.serial.clone(), b.serial.clone()]
    );
    assert_eq!(changed(1_700_000_003_001).await, vec![b.serial.clone()]);
    assert!(changed(1_700_000_100_001).await.is_empty());
    let current = store
        .identities_changed_since(1_700_000_003_000)
        .await
        .expect("identities_changed_since")
        .into_iter()
        .find(|i| i.serial == a.serial)
        .expect("a");
    assert_eq!(current, back, "in its current state");
}

/// Audit: append returns growing ids; queries filter and order strictly.
pub async fn audit(store: &dyn Store) {
    // A random window far from real timestamps, so earlier runs do not interfere.
    let base: i64 = 3_000_000_000_000 + rand::random_range(0..1_000_000_000_000i64) * 16;
    let (actor_a, actor_b) = (unique("actor-a"), unique("actor-b"));
    let reason = unique("reason");
    let (uid, other_uid) = (InstanceUid::new_v7(), InstanceUid::new_v7());
    let entry = |at: i64,
                 actor: &str,
                 uid: Option<InstanceUid>,
                 reason: Option<&str>,
                 ip: Option<IpAddr>,
                 detail: serde_json::Value| AuditEntry {
        id: 0,
        at_ms: base + at,
        actor: actor.to_string(),
        action: unique("action"),
        instance_uid: uid,
        source_ip: ip,
        reason: reason.map(str::to_string),
        detail,
    };
    let v4 = Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)));
    let v6 = Some(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)));
    let mut entries = vec![
        entry(0, &actor_a, Some(uid), None, v4, json!({"k": 1})),
        entry(1, &actor_a, None, Some(&reason), v6, json!(null)),
        entry(
            2,
            &actor_b,
            Some(uid),
            Some(&reason),
            None,
            json!({"a": [1, {"b": "c"}]}),
        ),
        entry(3, &actor_a, Some(uid), Some(&reason), v4, json!("text")),
        entry(4, &actor_b, None, None, None, json!({})),
        entry(
            5,
            &actor_a,
            Some(other_uid),
            Some(&reason),
            v6,
            json!([1, 2]),
        ),
        // Same time as the previous one: the later append is the newer.
        entry(5, &actor_a, None, None, None, json!({"tie": true})),
    ];
    let mut last = None;
    for e in &mut entries {
        e.id = 12_345; // ignored by append_audit
        let id = store.append_audit(e).await.expect("append_audit");
        if let Some(prev) = last {
            assert!(id > prev, "audit ids must grow: {prev} then {id}");
        }
        last = Some(id);
        e.id = id;
    }
    let pick = |idx: &[usize]| idx.iter().map(|&i| entries[i].clone()).collect::<Vec<_>>();
    let run = |q: AuditQuery| async move { store.query_audit(&q).await.expect("query_audit") };
    let q = AuditQuery {
        limit: 100,
        ..AuditQuery::default()
    };

    assert_eq!(
        run(AuditQuery {
            since_ms: Some(base + 1),
            until_ms: Some(base + 4),
            ..q.clone()
        })
        .await,
        pick(&[3, 2, 1]),
        "time window alone; since inclusive, until exclusive"
    );
    assert_eq!(
        run(AuditQuery {
            since_ms: Some(base),
            until_ms: Some(base + 6),
            ..q.clone()
        })
        .await,
        pick(&[6, 5, 4, 3, 2, 1, 0]),
        "the whole window, newest first, ties by append order"
    );
    assert_eq!(
        run(AuditQuery {
            actor: Some(actor_a.clone()),
            ..q.clone()
        })
        .await,
        pick(&[6, 5, 3, 1, 0]),
        "by actor"
    );
    assert_eq!(
        run(AuditQuery {
            instance_uid: Some(uid),
            ..q.clone()
        })
        .await,
        pick(&[3, 2, 0]),
        "by instance uid"
    );
    assert_eq!(
        run(AuditQuery {
            reason: Some(reason.clone()),
            ..q.clone()
        })
        .await,
        pick(&[5, 3, 2, 1]),
        "by reason"
    );
    assert_eq!(
        run(AuditQuery {
            actor: Some(actor_a.clone()),
            reason: Some(reason.clone()),
            instance_uid: Some(uid),
            ..q.clone()
        })
        .await,
        pick(&[3]),
        "all filters combined"
    );
    assert_eq!(
        run(AuditQuery {
            since_ms: Some(base + 1),
            until_ms: Some(base + 6),
            actor: Some(actor_b.clone()),
            ..q.clone()
        })
        .await,
        pick(&[4, 2]),
        "window and actor"
    );
    assert_eq!(
        run(AuditQuery {
            since_ms: Some(base + 5),
            actor: Some(actor_a.clone()),
            ..q.clone()
        })
        .await,
        pick(&[6, 5]),
        "since only"
    );
    assert_eq!(
        run(AuditQuery {
            until_ms: Some(base + 1),
            actor: Some(actor_a.clone()),
            ..q.clone()
        })
        .await,
        pick(&[0]),
        "until only"
    );
    assert_eq!(
        run(AuditQuery {
            actor: Some(actor_a.clone()),
            limit: 2,
            ..q.clone()
        })
        .await,
        pick(&[6, 5]),
        "limit keeps the newest"
    );
    assert_eq!(
        run(AuditQuery {
            actor: Some(actor_a.clone()),
            limit: 0,
            ..q.clone()
        })
        .await,
        Vec::<AuditEntry>::new(),
        "limit 0 yields nothing"
    );
    assert_eq!(
        run(AuditQuery {
            actor: Some(unique("nobody")),
            ..q.clone()
        })
        .await,
        Vec::<AuditEntry>::new(),
        "unknown actor"
    );
    // Unfiltered queries are newest first too.
    let newest = run(q.clone()).await;
    assert!(newest
        .windows(2)
        .all(|w| (w[0].at_ms, w[0].id) > (w[1].at_ms, w[1].id)));
}

/// `scan_audit`: oldest first, the same filters as `query_audit`, and cursor paging that
/// visits every match exactly once.
pub async fn audit_scan(store: &dyn Store) {
    let base: i64 = 3_000_000_000_000 + rand::random_range(0..1_000_000_000_000i64) * 16;
    let (actor_a, actor_b) = (unique("scan-a"), unique("scan-b"));
    let reason = unique("scan-reason");
    let uid = InstanceUid::new_v7();
    let mut entries = Vec::new();
    // Times out of append order, and ties, so order by (at_ms, id) is really exercised.
    for (i, at) in [3, 0, 2, 2, 5, 1, 2, 4].into_iter().enumerate() {
        let mut e = AuditEntry {
            id: 0,
            at_ms: base + at,
            actor: if i % 2 == 0 { &actor_a } else { &actor_b }.clone(),
            action: unique("action"),
            instance_uid: (i % 3 == 0).then_some(uid),
            source_ip: None,
            reason: (i % 4 != 1).then(|| reason.clone()),
            detail: json!({ "i": i }),
        };
        e.id = store.append_audit(&e).await.expect("append_audit");
        entries.push(e);
    }
    let oldest_first = |pred: &dyn Fn(&AuditEntry) -> bool| {
        let mut v: Vec<AuditEntry> = entries.iter().filter(|e| pred(e)).cloned().collect();
        v.sort_by_key(|e| (e.at_ms, e.id));
        v
    };
    let scan = |q: AuditQuery, after: Option<AuditCursor>| async move {
        store.scan_audit(&q, after).await.expect("scan_audit")
    };
    let ours = AuditQuery {
        since_ms: Some(base),
        until_ms: Some(base + 6),
        limit: 100,
        ..AuditQuery::default()
    };
    let all = oldest_first(&|_| true);
    assert_eq!(
        scan(ours.clone(), None).await,
        all,
        "the window, oldest first"
    );
    assert_eq!(
        scan(
            AuditQuery {
                actor: Some(actor_b.clone()),
                ..ours.clone()
            },
            None
        )
        .await,
        oldest_first(&|e| e.actor == actor_b),
        "by actor"
    );
    assert_eq!(
        scan(
            AuditQuery {
                instance_uid: Some(uid),
                reason: Some(reason.clone()),
                since_ms: None,
                until_ms: None,
                ..ours.clone()
            },
            None
        )
        .await,
        oldest_first(&|e| e.instance_uid == Some(uid) && e.reason.as_ref() == Some(&reason)),
        "by instance uid and reason"
    );
    assert_eq!(
        scan(
            AuditQuery {
                since_ms: Some(base + 2),
                until_ms: Some(base + 4),
                ..ours.clone()
            },
            None
        )
        .await,
        oldest_first(&|e| (base + 2..base + 4).contains(&e.at_ms)),
        "since inclusive, until exclusive"
    );
    assert_eq!(
        scan(
            AuditQuery {
                limit: 0,
                ..ours.clone()
            },
            None
        )
        .await,
        Vec::<AuditEntry>::new(),
        "limit 0 yields nothing"
    );

    // Pages of three, each after the last entry of the one before, through a tie at base + 2.
    let mut paged = Vec::new();
    let mut cursor = None;
    loop {
        let page = scan(
            AuditQuery {
                limit: 3,
                ..ours.clone()
            },
            cursor,
        )
        .await;
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        cursor = Some(AuditCursor::after(last));
        paged.extend(page);
    }
    assert_eq!(paged, all, "paging visits every entry once, in order");
    // A cursor in the middle of a tie resumes right after that entry.
    let tie: Vec<&AuditEntry> = all.iter().filter(|e| e.at_ms == base + 2).collect();
    assert_eq!(tie.len(), 3);
    let rest = scan(ours.clone(), Some(AuditCursor::after(tie[0]))).await;
    assert_eq!(rest.first(), Some(tie[1]));
    assert_eq!(
        rest.len(),
        all.len() - all.iter().position(|e| e == tie[0]).unwrap_or(0) - 1
    );
}

/// Appends one entry with a unique actor, for each store's own append-only test; check it
/// afterwards with [`assert_audit_intact`].
pub async fn audit_probe(store: &dyn Store) -> AuditEntry {
    let mut entry = AuditEntry {
        id: 0,
        at_ms: 1_700_000_000_000,
        actor: unique("probe"),
        action: "probe".into(),
        instance_uid: Some(InstanceUid::new_v7()),
        source_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        reason: Some("probe".into()),
        detail: json!({ "kept": true }),
    };
    entry.id = store.append_audit(&entry).await.expect("append_audit");
    entry
}

/// The entry [`audit_probe`] appended is still there, unchanged, and alone under its actor.
pub async fn assert_audit_intact(store: &dyn Store, entry: &AuditEntry) {
    let found = store
        .query_audit(&AuditQuery {
            actor: Some(entry.actor.clone()),
            limit: 10,
            ..AuditQuery::default()
        })
        .await
        .expect("query_audit");
    assert_eq!(found, vec![entry.clone()], "the audit entry is intact");
}
