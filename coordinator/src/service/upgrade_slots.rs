//! How many agents download and install a package set at once: `packages.max_concurrent_upgrades`
//! for the whole fleet, each coordinator taking the share of its partitions (all of it on
//! the embedded default; a half each with two coordinators, re-shared at every lease round,
//! rounded up). An agent that still needs its set holds a slot from
//! the offer until it has the set, gives up, disconnects, or the slot times out; an agent that
//! finds no free slot is not offered the set yet (its upgrade is `pending`) and is offered it
//! when one frees up ([`Coordinator::fill_upgrade_slots`], at most every
//! [`FILL_EVERY`]). So a fleet-wide assignment never makes every agent download at once, and
//! the downloads in flight stay bounded whatever the fleet's size.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use shared::domain::AgentRecord;
use shared::ids::InstanceUid;
use shared::now_ms;
use shared::packages::InstallStatus;

use super::Coordinator;
use crate::session::PackageOffer;

/// Waiting agents are offered freed slots at most this often.
pub const FILL_EVERY: Duration = Duration::from_millis(200);

/// A slot nobody finished with is freed after this long (a download that stalls, an agent
/// that never answers): it goes back to the end of the queue.
pub const SLOT_TIMEOUT_MS: i64 = 15 * 60_000;

const SLOTS_HELD: &str = "ampora_package_upgrades_in_progress";

pub fn describe_metrics() {
    metrics::describe_gauge!(
        SLOTS_HELD,
        "Agents offered a package set and not yet done with it (per coordinator; together at most packages.max_concurrent_upgrades, give or take the rounding of each coordinator's share)"
    );
    metrics::gauge!(SLOTS_HELD).set(0.0);
}

/// The slots: which agents hold one, since when.
#[derive(Debug)]
pub(super) struct UpgradeSlots {
    /// The fleet-wide cap.
    total: usize,
    /// This coordinator's share of `total`.
    cap: AtomicUsize,
    /// Whether the maintenance windows were open at the last lease round.
    window_was_open: std::sync::atomic::AtomicBool,
    held: Mutex<HashMap<InstanceUid, i64>>,
}

/// Whether `record` still needs `offer`'s set: it does not echo it, or its install failed and
/// the attempts allowed are not used up.
pub(super) fn needs(record: &AgentRecord, offer: &PackageOffer) -> bool {
    let Some(pk) = record.packages.as_deref() else {
        return true;
    };
    if pk.echoed_hash != offer.hash_hex {
        return true;
    }
    let failed = pk
        .reported
        .values()
        .any(|r| r.status == InstallStatus::InstallFailed);
    let working = pk.reported.values().any(|r| {
        matches!(
            r.status,
            InstallStatus::Downloading | InstallStatus::Installing | InstallStatus::InstallPending
        )
    });
    working || (failed && pk.failed_attempts < offer.max_attempts)
}

impl UpgradeSlots {
    pub(super) fn new(total: usize) -> Self {
        let total = total.max(1);
        Self {
            total,
            cap: AtomicUsize::new(total),
            window_was_open: std::sync::atomic::AtomicBool::new(false),
            held: Mutex::new(HashMap::new()),
        }
    }

    /// Takes the share of `held` partitions out of all; true if it grew (waiting agents may
    /// be offered the new slots).
    pub(super) fn share(&self, held: usize) -> bool {
        let all = usize::from(shared::ids::PARTITIONS);
        let cap = (self.total.saturating_mul(held.min(all)))
            .div_ceil(all)
            .max(1);
        self.cap.swap(cap, Ordering::Relaxed) < cap
    }

    fn cap(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }

    /// True when `uid` may be offered its set now: it holds a slot, or took a free one.
    fn take(&self, uid: InstanceUid, now: i64) -> bool {
        let Ok(mut held) = self.held.lock() else {
            return false;
        };
        if let Some(since) = held.get(&uid).copied() {
            if now.saturating_sub(since) < SLOT_TIMEOUT_MS {
                return true;
            }
            held.remove(&uid);
        }
        held.retain(|_, since| now.saturating_sub(*since) < SLOT_TIMEOUT_MS);
        let ok = held.len() < self.cap();
        if ok {
            held.insert(uid, now);
        }
        metrics::gauge!(SLOTS_HELD).set(held.len() as f64);
        ok
    }

    /// Whether `uid` holds a slot that has not timed out.
    fn holds(&self, uid: &InstanceUid, now: i64) -> bool {
        self.held.lock().is_ok_and(|h| {
            h.get(uid)
                .is_some_and(|since| now.saturating_sub(*since) < SLOT_TIMEOUT_MS)
        })
    }

    /// Frees `uid`'s slot; true if it held one.
    pub(super) fn give_back(&self, uid: &InstanceUid) -> bool {
        let Ok(mut held) = self.held.lock() else {
            return false;
        };
        let had = held.remove(uid).is_some();
        metrics::gauge!(SLOTS_HELD).set(held.len() as f64);
        had
    }

    fn free(&self) -> usize {
        self.held
            .lock()
            .map(|h| self.cap().saturating_sub(h.len()))
            .unwrap_or(0)
    }
}

impl Coordinator {
    /// After a lease round: this coordinator's share of the fleet-wide cap follows the
    /// partitions it holds.
    pub(super) fn share_upgrade_slots(&self, held_partitions: usize) {
        let grew = self.upgrade_slots.share(held_partitions);
        // A window that opened since the last round: the waiting agents are offered their
        // sets now (nothing else wakes them; a slot freed inside a window does). Only at the
        // opening: a fill looks at every agent, too much for every round of a large fleet.
        let windowed = self
            .cfg
            .packages
            .as_ref()
            .is_some_and(|h| !h.windows.is_empty());
        let open = windowed && self.upgrade_window_open(now_ms());
        let opened = open
            && !self
                .upgrade_slots
                .window_was_open
                .swap(open, Ordering::Relaxed);
        if !open {
            self.upgrade_slots
                .window_was_open
                .store(false, Ordering::Relaxed);
        }
        if grew || opened {
            self.upgrade_fill.notify_one();
        }
    }

    /// Whether agents may start an upgrade now (`maintenance`).
    fn upgrade_window_open(&self, now: i64) -> bool {
        self.cfg
            .packages
            .as_ref()
            .is_none_or(|h| super::maintenance::open(&h.windows, now))
    }

    /// `offer` if `record` may have it now (see the module docs); frees the agent's slot once
    /// it no longer needs the set.
    pub(super) fn admit_upgrade(
        &self,
        record: &AgentRecord,
        offer: std::sync::Arc<PackageOffer>,
    ) -> Option<std::sync::Arc<PackageOffer>> {
        let uid = record.instance_uid;
        if !needs(record, &offer) {
            if self.upgrade_slots.give_back(&uid) {
                self.upgrade_fill.notify_one();
            }
            return Some(offer);
        }
        let now = now_ms();
        // Outside the maintenance windows only agents already upgrading go on.
        if !self.upgrade_window_open(now) && !self.upgrade_slots.holds(&uid, now) {
            return None;
        }
        self.upgrade_slots.take(uid, now).then_some(offer)
    }

    /// After a message was handled: an agent that now has its set (or gave up) frees its slot
    /// at once, not at its next message.
    pub(super) fn upgrade_progressed(&self, record: &AgentRecord, offer: &PackageOffer) {
        if !needs(record, offer) {
            self.upgrade_gone(&record.instance_uid);
        }
    }

    /// An agent went away: its slot goes to a waiting one.
    pub(super) fn upgrade_gone(&self, uid: &InstanceUid) {
        if self.upgrade_slots.give_back(uid) {
            self.upgrade_fill.notify_one();
        }
    }

    /// Offers freed slots to waiting agents: those connected that need their set and hold no
    /// slot, in no particular order.
    pub(super) async fn fill_upgrade_slots(&self) {
        if self.upgrade_slots.free() == 0 {
            return;
        }
        self.push_packages().await;
    }
}

/// Runs [`Coordinator::fill_upgrade_slots`] when a slot frees up, at most every
/// [`FILL_EVERY`].
pub(super) async fn run_fill(weak: std::sync::Weak<Coordinator>) {
    let wake = match weak.upgrade() {
        Some(c) => c.upgrade_fill.clone(),
        None => return,
    };
    let mut pace = tokio::time::interval(FILL_EVERY);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        wake.notified().await;
        pace.tick().await;
        let Some(c) = weak.upgrade() else { return };
        c.fill_upgrade_slots().await;
    }
}

#[cfg(test)]
mod tests {
    use super::UpgradeSlots;

    #[test]
    fn each_coordinator_takes_the_share_of_its_partitions() {
        let slots = UpgradeSlots::new(500);
        assert_eq!(slots.cap(), 500, "before any round: the whole cap");
        assert!(!slots.share(256), "all partitions: unchanged");
        slots.share(128);
        assert_eq!(slots.cap(), 250);
        // Two coordinators with 85 and 171 partitions: 167 + 334 = 501, never under the cap.
        slots.share(85);
        assert_eq!(slots.cap(), 167);
        assert!(slots.share(171), "a larger share frees slots");
        assert_eq!(slots.cap(), 334);
        slots.share(0);
        assert_eq!(slots.cap(), 1, "never zero");
    }
}
