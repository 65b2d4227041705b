//! Which coordinator serves which partition of agents.
//!
//! Every coordinator runs the same loop every third of the lease TTL (and at once when a
//! coordinator joins or leaves), on a thread of its own: mark itself alive in the store,
//! compute from the live membership which partitions it *should* hold, mark the ones it should
//! no longer hold as leaving, then renew and acquire leases. The partition worker carries the
//! decisions out (loads what was gained, hands over what is leaving and then releases it), so
//! a round is two store queries and never waits for that work. Targets come from rendezvous hashing, so every coordinator
//! computes the same map from the same membership, and a join or leave moves only about 1/n of
//! the partitions. A partition changes hands only through the store: the giver releases (or its
//! lease expires) before the taker's `acquire_leases` can succeed, so two coordinators never
//! both believe they hold it at the same fence.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use shared::ids::PARTITIONS;
use shared::now_ms;
use shared::store::{Store, StoreError};
use tokio::sync::{mpsc, oneshot, Notify};

use super::partitions::Moves;
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

/// One round of the lease protocol (see the module docs). Rounds never overlap. Only the
/// store's lease rows are touched here; what the round decided is returned for the partition
/// worker ([`super::partitions::run_moves`]) to carry out.
pub(crate) async fn round(c: &Coordinator, store: &dyn Store) -> Result<Moves, StoreError> {
    let _round = c.rebalancing.lock().await;
    if c.is_stopping() {
        return Ok(Moves::default());
    }
    let ttl = i64::try_from(c.cfg.lease_ttl.as_millis()).unwrap_or(i64::MAX);
    let stalled_ms = now_ms() - c.runtime_beat.load(std::sync::atomic::Ordering::Relaxed);
    if stalled_ms > ttl {
        // The coordinator's own runtime has not run for a whole TTL (wedged, or frozen while
        // this thread is not): renewing would keep its partitions from everyone while nobody
        // serves them. A shorter stall is load (the 100,000-agent soak starved it for 9 s on
        // 2 cores), which a take-over by an equally loaded coordinator would only add to.
        tracing::warn!(stalled_ms, "coordinator runtime stalled; lease not renewed");
        return Ok(Moves::default());
    }
    let members = store
        .coordinator_heartbeat(&c.cfg.node, now_ms(), ttl)
        .await?;
    let want = targets(&c.cfg.node, &members);
    let before = c.held();
    let leaving = c.leaving();
    let give: Vec<u16> = before
        .keys()
        .copied()
        .filter(|p| !want.contains(p) && !leaving.contains(p))
        .collect();
    // Partitions being handed over stay leased until the worker has flushed and released
    // them, even when wanted again meanwhile: they are taken afresh after the release.
    let mut renew = want.clone();
    renew.extend(leaving.iter().chain(&give).filter(|p| !want.contains(p)));

    let asked_at = now_ms();
    let leases = store
        .acquire_leases(&c.cfg.node, &renew, asked_at, ttl)
        .await?;
    let after: HashMap<u16, i64> = leases.iter().map(|l| (l.partition, l.fence)).collect();
    // A lease we got back after it expired keeps our memory only if nobody held it in between
    // (the fence moved by exactly our own re-acquisition).
    let kept = |p: &u16| matches!((before.get(p), after.get(p)), (Some(old), Some(new)) if new == old || *new == old + 1);
    let still_leaving: HashSet<u16> = leaving.iter().chain(&give).copied().filter(kept).collect();
    let lost: Vec<u16> = before.keys().copied().filter(|p| !kept(p)).collect();
    let gained: Vec<u16> = after
        .keys()
        .copied()
        .filter(|p| !kept(p) && !still_leaving.contains(p))
        .collect();
    let give: Vec<u16> = give
        .into_iter()
        .filter(|p| still_leaving.contains(p))
        .collect();
    c.record_round(after, still_leaving, &lost);
    c.share_upgrade_slots(c.held_count());
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
    if !give.is_empty() || !gained.is_empty() || !lost.is_empty() {
        tracing::info!(
            members = members.len(),
            held = c.held_count(),
            give = give.len(),
            gained = gained.len(),
            lost = lost.len(),
            "partition leases changed"
        );
    }
    Ok(Moves { lost, give, gained })
}

/// Runs lease rounds every third of the TTL, and at once when `wake` is notified (a
/// coordinator joined or left), on a thread and runtime of their own with `store` (in a
/// cluster a connection pool of its own): however busy the coordinator's runtime and main
/// pool are, its leases are renewed on time. Stops when the coordinator is dropped or stops.
/// `runtime_gone` resolves when the coordinator's runtime is dropped (its sender lives in a
/// task there): the thread ends with it, as it would with the process.
pub(crate) fn spawn_rounds(
    weak: Weak<Coordinator>,
    store: Arc<dyn Store>,
    moves: mpsc::UnboundedSender<Moves>,
    wake: Arc<Notify>,
    period: Duration,
    mut runtime_gone: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("ampora-leases".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut rounds =
                    tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = rounds.tick() => {}
                        () = wake.notified() => {}
                        _ = &mut runtime_gone => return,
                    }
                    let Some(c) = weak.upgrade() else { return };
                    if c.is_stopping() {
                        return;
                    }
                    match round(&c, &*store).await {
                        Ok(m) if !m.is_empty() => {
                            if moves.send(m).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, "partition lease round failed"),
                    }
                }
            });
        })?;
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
