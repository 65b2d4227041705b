//! Cluster membership and partition leases: heartbeats, acquire, renew, take over, release, races.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use shared::domain::AgentRecord;
use shared::ids::{InstanceUid, PARTITIONS};
use shared::store::{HeldLeases, Lease, Store};

use super::unique;

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
pub(super) async fn lease_clock(store: &dyn Store) -> i64 {
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

/// A fenced agent write lands only in partitions whose lease is the writer's, live, at the
/// fence it names; the rest of the batch is written and the refused partitions returned.
pub async fn agents_fenced(store: &dyn Store) {
    let t = lease_clock(store).await;
    let ttl = 100;
    let (a, b) = (unique("fence-a"), unique("fence-b"));
    let x = InstanceUid::new_v7();
    let y = std::iter::repeat_with(InstanceUid::new_v7)
        .find(|y| y.partition() != x.partition())
        .expect("a uid in another partition");
    let (px, py) = (x.partition(), y.partition());
    let fences: HashMap<u16, i64> = store
        .acquire_leases(&a, &[px, py], t, ttl)
        .await
        .expect("acquire_leases")
        .into_iter()
        .map(|l| (l.partition, l.fence))
        .collect();
    let record = |uid, seen| {
        let mut r = AgentRecord::new(uid, 1);
        r.last_seen_ms = seen;
        r
    };
    let seen = |uid| async move {
        store
            .get_agent(uid)
            .await
            .expect("get_agent")
            .map(|r| r.last_seen_ms)
    };
    let held = |node: &str, fences: HashMap<u16, i64>, now_ms| HeldLeases {
        node: node.to_owned(),
        fences,
        now_ms,
    };

    let refused = store
        .upsert_agents_fenced(
            &held(&a, fences.clone(), t + 1),
            &[record(x, 1), record(y, 1)],
        )
        .await
        .expect("fenced upsert");
    assert_eq!(
        refused,
        Vec::<u16>::new(),
        "the holder writes at its fences"
    );
    assert_eq!((seen(x).await, seen(y).await), (Some(1), Some(1)));

    // A fence the lease no longer has refuses its partition only.
    let mut older = fences.clone();
    older.insert(px, fences[&px] - 1);
    let refused = store
        .upsert_agents_fenced(&held(&a, older, t + 2), &[record(x, 2), record(y, 2)])
        .await
        .expect("fenced upsert");
    assert_eq!(refused, vec![px]);
    assert_eq!((seen(x).await, seen(y).await), (Some(1), Some(2)));

    // Past the TTL another node takes px over; the first, stalled, writes with what it had.
    let taken = store
        .acquire_leases(&b, &[px], t + ttl, ttl)
        .await
        .expect("take over");
    assert_eq!(taken, [lease(px, &b, fences[&px] + 1, t + 2 * ttl)]);
    let mut expected = vec![px, py];
    expected.sort_unstable();
    let refused = store
        .upsert_agents_fenced(
            &held(&a, fences.clone(), t + ttl + 1),
            &[record(x, 3), record(y, 3)],
        )
        .await
        .expect("fenced upsert");
    assert_eq!(
        refused, expected,
        "an expired lease refuses even at its own fence"
    );
    assert_eq!((seen(x).await, seen(y).await), (Some(1), Some(2)));
    let refused = store
        .upsert_agents_fenced(
            &held(&b, HashMap::from([(px, fences[&px] + 1)]), t + ttl + 1),
            &[record(x, 4)],
        )
        .await
        .expect("fenced upsert");
    assert_eq!(refused, Vec::<u16>::new(), "the new holder writes");
    assert_eq!(seen(x).await, Some(4));
    store
        .release_leases(&b, &[px])
        .await
        .expect("release_leases");
}

/// A live lease, taken by a fresh node, on the partition that drives rollout or restart `id`:
/// the fence that may write, and three that may not (an old fence, an expired lease, another
/// node).
pub(super) async fn driver_fences(
    store: &dyn Store,
    id: i64,
) -> (
    shared::rollout::Fence,
    [(&'static str, shared::rollout::Fence); 3],
) {
    use shared::rollout::Fence;
    let node = unique("driver");
    let partition = u16::try_from(id.rem_euclid(i64::from(PARTITIONS))).expect("u16");
    let now = lease_clock(store).await + 1_000;
    let lease = store
        .acquire_leases(&node, &[partition], now, 10_000)
        .await
        .expect("acquire_leases")
        .into_iter()
        .find(|l| l.partition == partition)
        .expect("lease taken");
    let fence = |node: &str, fence: i64, now_ms: i64| Fence {
        node: node.into(),
        partition,
        fence,
        now_ms,
    };
    let refused = [
        ("an old fence", fence(&node, lease.fence - 1, now + 1)),
        ("an expired lease", fence(&node, lease.fence, now + 10_000)),
        (
            "another node",
            fence(&unique("other"), lease.fence, now + 1),
        ),
    ];
    (fence(&node, lease.fence, now + 1), refused)
}
