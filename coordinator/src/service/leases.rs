//! Which coordinator serves which partition of agents.
//!
//! Every coordinator runs the same loop every third of the lease TTL (and at once when a
//! coordinator joins or leaves): mark itself alive in the store, compute from the live
//! membership which partitions it *should* hold, hand over the ones it should no longer hold,
//! then renew and acquire leases. Targets come from rendezvous hashing, so every coordinator
//! computes the same map from the same membership, and a join or leave moves only about 1/n of
//! the partitions. A partition changes hands only through the store: the giver releases (or its
//! lease expires) before the taker's `acquire_leases` can succeed, so two coordinators never
//! both believe they hold it at the same fence.

use std::collections::HashMap;

use shared::bus::ControlEvent;
use shared::ids::PARTITIONS;
use shared::now_ms;
use shared::store::StoreError;

use super::rollouts::gates::Outage;
use super::Coordinator;

/// The partitions `node` should hold when `members` are alive (`members` includes `node`).
pub(crate) fn targets(node: &str, members: &[String]) -> Vec<u16> {
    (0..PARTITIONS)
        .filter(|&p| {
            members
                .iter()
                .max_by_key(|m| (weight(m, p), m.as_str()))
                .is_some_and(|winner| winner == node)
        })
        .collect()
}

/// FNV-1a over the member name and the partition: cheap, stable across versions and
/// processes (unlike `std`'s randomly keyed hasher).
fn weight(member: &str, partition: u16) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in member.bytes().chain(partition.to_be_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // One more mixing round so neighbouring partitions don't get correlated winners.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// One round of the lease protocol (see the module docs). Rounds never overlap.
pub(crate) async fn rebalance(c: &Coordinator) -> Result<(), StoreError> {
    let _round = c.rebalancing.lock().await;
    if c.is_stopping() {
        return Ok(());
    }
    let ttl = i64::try_from(c.cfg.lease_ttl.as_millis()).unwrap_or(i64::MAX);
    let members = c
        .store
        .coordinator_heartbeat(&c.cfg.node, now_ms(), ttl)
        .await?;
    let want = targets(&c.cfg.node, &members);
    let before = c.held();

    let give: Vec<u16> = before
        .keys()
        .copied()
        .filter(|p| !want.contains(p))
        .collect();
    if !give.is_empty() {
        c.hand_over(&give).await;
        c.store.release_leases(&c.cfg.node, &give).await?;
        // The takers act at once instead of at their next round. Converges: a round that
        // gives nothing away broadcasts nothing.
        let _ = c.bus.broadcast(ControlEvent::MembershipChanged).await;
    }

    let asked_at = now_ms();
    let leases = c
        .store
        .acquire_leases(&c.cfg.node, &want, asked_at, ttl)
        .await?;
    let after: HashMap<u16, i64> = leases.iter().map(|l| (l.partition, l.fence)).collect();
    // A lease we got back after it expired keeps our memory only if nobody held it in between
    // (the fence moved by exactly our own re-acquisition).
    let kept = |p: &u16| matches!((before.get(p), after.get(p)), (Some(old), Some(new)) if new == old || *new == old + 1);
    let lost: Vec<u16> = before
        .keys()
        .copied()
        .filter(|p| !give.contains(p) && !kept(p))
        .collect();
    let gained: Vec<u16> = after.keys().copied().filter(|p| !kept(p)).collect();
    if !lost.is_empty() {
        tracing::warn!(partitions = lost.len(), "partition leases lost");
        c.drop_partitions(&lost).await;
    }
    c.set_held(after);
    let previous = c
        .leased_at
        .swap(asked_at, std::sync::atomic::Ordering::Relaxed);
    if previous > 0 && asked_at - previous > ttl {
        // The leases lapsed in between (the store away, or this process stalled): agents
        // were told to retry meanwhile. Rollout gates give them longer to come back.
        let outage = Outage {
            from_ms: previous,
            to_ms: asked_at,
        };
        tracing::warn!(
            lapsed_ms = asked_at - previous,
            "partition leases renewed after lapsing"
        );
        *c.lease_outage.lock().unwrap_or_else(|p| p.into_inner()) = Some(outage);
    }
    if !gained.is_empty() {
        // Identities confirmed through the previous owner refuse their agents' tokens here too.
        c.sync_identities().await;
        c.take_partitions(&gained).await?;
    }
    c.serving
        .store(c.held_count(), std::sync::atomic::Ordering::Relaxed);
    if !give.is_empty() || !gained.is_empty() || !lost.is_empty() {
        tracing::info!(
            members = members.len(),
            held = c.held_count(),
            gave = give.len(),
            gained = gained.len(),
            lost = lost.len(),
            "partitions rebalanced"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("coord-{i}")).collect()
    }

    #[test]
    fn every_partition_has_exactly_one_target() {
        for n in 1..6 {
            let members = names(n);
            let mut seen = vec![0u32; usize::from(PARTITIONS)];
            for m in &members {
                for p in targets(m, &members) {
                    seen[usize::from(p)] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{n} members: {seen:?}");
        }
    }

    #[test]
    fn load_is_spread_and_a_join_moves_few_partitions() {
        let three = names(3);
        let four = names(4);
        for m in &three {
            let n = targets(m, &three).len();
            assert!((50..=120).contains(&n), "{m} holds {n} of 256");
        }
        let moved: usize = three
            .iter()
            .map(|m| {
                let a = targets(m, &three);
                a.iter().filter(|p| !targets(m, &four).contains(p)).count()
            })
            .sum();
        // Ideal is 64 (a quarter); rendezvous hashing moves only what the newcomer takes.
        assert_eq!(moved, targets("coord-3", &four).len());
        assert!(moved < 100, "{moved} partitions moved");
    }
}
