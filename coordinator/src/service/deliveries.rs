//! Config pushes to many agents at once (an assignment, a rollout's stage, a partition taken
//! over): queued to one delivery task, paced by the agents' answers, and dropped when stale.
//!
//! A push to 100,000 agents makes 300,000 frames (the offer, APPLYING, APPLIED) within seconds
//! if sent at once; the answers queue at the gateways and coordinators until requests time out
//! and agents reconnect. So at most `window` offers sent here may be unanswered at a time: an
//! agent's next frame (or its disconnect) frees its place, and a place nobody answers is freed
//! after [`ANSWER_DEADLINE`]. When the cluster keeps up the window never fills and pushes go
//! out at once; when it does not, offers go out as fast as answers come back.
//!
//! The queue keeps order (a later push to an agent is sent after an earlier one), and an offer
//! that is no longer the agent's latest when its turn comes (the agent was offered another
//! config meanwhile, say in a reply) is not sent.

use super::Coordinator;
use shared::bus::GatewayMessage;
use shared::ids::{GatewayId, InstanceUid};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Pushes whose owners are looked up together (one Redis `MGET`) and then sent per gateway:
/// enough to fill coalesced NATS messages, few enough to start sending early in a big rollout.
const DELIVERY_CHUNK: usize = 1_000;

/// An offer not answered within this long frees its place in the window (the agent went away
/// without a disconnect notice, or the offer was lost).
pub(super) const ANSWER_DEADLINE: Duration = Duration::from_secs(5);

/// One agent's offer.
pub(super) type Push = (InstanceUid, proto::ServerToAgent);

/// Offers sent in bulk and not answered yet, at most the window's size.
pub(super) struct OfferWindow {
    places: Arc<Semaphore>,
    unanswered: StdMutex<HashMap<InstanceUid, (OwnedSemaphorePermit, Instant)>>,
    /// `unanswered.len()`, read without the lock on every frame.
    count: AtomicUsize,
}

impl OfferWindow {
    pub(super) fn new(size: usize) -> Self {
        Self {
            places: Arc::new(Semaphore::new(size.max(1))),
            unanswered: StdMutex::new(HashMap::new()),
            count: AtomicUsize::new(0),
        }
    }

    fn unanswered(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<InstanceUid, (OwnedSemaphorePermit, Instant)>> {
        self.unanswered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an offer to `uid` as unanswered if a place is free.
    fn try_admit(&self, uid: InstanceUid) -> bool {
        match self.places.clone().try_acquire_owned() {
            Ok(place) => {
                self.hold(uid, place);
                true
            }
            Err(_) => false,
        }
    }

    /// Waits for a free place, then records an offer to `uid` as unanswered.
    async fn admit(&self, uid: InstanceUid) {
        loop {
            let wait = ANSWER_DEADLINE / 5;
            match tokio::time::timeout(wait, self.places.clone().acquire_owned()).await {
                Ok(Ok(place)) => return self.hold(uid, place),
                Ok(Err(_)) => return,
                Err(_) => self.expire(),
            }
        }
    }

    fn hold(&self, uid: InstanceUid, place: OwnedSemaphorePermit) {
        let mut u = self.unanswered();
        // A second offer to the same agent replaces the first one's place.
        u.insert(uid, (place, Instant::now()));
        self.count.store(u.len(), Ordering::Relaxed);
    }

    /// `uid` answered (or went away): its place is free.
    pub(super) fn answered(&self, uid: &InstanceUid) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut u = self.unanswered();
        u.remove(uid);
        self.count.store(u.len(), Ordering::Relaxed);
    }

    fn expire(&self) {
        let mut u = self.unanswered();
        let before = u.len();
        u.retain(|_, (_, at)| at.elapsed() < ANSWER_DEADLINE);
        let expired = before - u.len();
        if expired > 0 {
            metrics::counter!("ampora_push_answers_overdue_total").increment(expired as u64);
        }
        self.count.store(u.len(), Ordering::Relaxed);
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

/// Sends queued pushes in order, a chunk at a time.
pub(super) async fn run_deliveries(
    weak: Weak<Coordinator>,
    mut jobs: mpsc::UnboundedReceiver<Vec<Push>>,
) {
    while let Some(job) = jobs.recv().await {
        metrics::gauge!("ampora_push_queue_jobs").set(jobs.len() as f64);
        let mut job = job.into_iter().peekable();
        while job.peek().is_some() {
            let chunk: Vec<Push> = job.by_ref().take(DELIVERY_CHUNK).collect();
            let Some(c) = weak.upgrade() else { return };
            c.deliver_chunk(chunk).await;
        }
    }
}

impl Coordinator {
    /// Queues pushes to many agents (see the module docs); returns at once.
    pub(super) fn deliver_all(&self, pushes: Vec<Push>) {
        if !pushes.is_empty() {
            // Closed only when the coordinator is gone, and then nobody needs them.
            let _ = self.deliveries.send(pushes);
        }
    }

    async fn deliver_chunk(&self, pushes: Vec<Push>) {
        let mut current = Vec::with_capacity(pushes.len());
        for (uid, msg) in pushes {
            if self.still_offered(&uid, &msg).await {
                current.push((uid, msg));
            }
        }
        let uids: Vec<InstanceUid> = current.iter().map(|(uid, _)| *uid).collect();
        let owners = match self.ownership.lookup_many(&uids).await {
            Ok(owners) => owners,
            Err(e) => {
                // At-most-once: each agent's next report re-triggers its offer.
                tracing::warn!(agents = uids.len(), error = %e, "ownership lookup failed");
                return;
            }
        };
        let mut by_gateway: HashMap<GatewayId, Vec<GatewayMessage>> = HashMap::new();
        for ((uid, msg), owner) in current.into_iter().zip(owners) {
            // Not connected anywhere: nothing to push to.
            let Some(owner) = owner else { continue };
            if !self.offers.try_admit(uid) {
                // The window is full: what is admitted goes out first, so that its answers
                // can free the places this one waits for.
                self.send(std::mem::take(&mut by_gateway)).await;
                self.offers.admit(uid).await;
            }
            by_gateway
                .entry(owner.gateway)
                .or_default()
                .push(GatewayMessage::Deliver {
                    uid,
                    epoch: owner.epoch,
                    msg: Box::new(msg),
                });
        }
        self.send(by_gateway).await;
    }

    /// Sends each gateway its pushes, the gateways in parallel.
    async fn send(&self, by_gateway: HashMap<GatewayId, Vec<GatewayMessage>>) {
        let sends = by_gateway.into_iter().map(|(gateway, msgs)| async move {
            let count = msgs.len();
            if let Err(e) = self.bus.deliver_many(&gateway, msgs).await {
                tracing::debug!(%gateway, pushes = count, error = %e, "pushes not delivered");
            }
        });
        futures::future::join_all(sends).await;
    }

    /// Whether `msg` is still the config last offered to `uid` on its live connection.
    async fn still_offered(&self, uid: &InstanceUid, msg: &proto::ServerToAgent) -> bool {
        let Some(slot) = self.slot(uid) else {
            return false;
        };
        let e = slot.lock().await;
        let config = msg
            .remote_config
            .as_ref()
            .map(|r| hex::encode(&r.config_hash));
        let packages = msg
            .packages_available
            .as_ref()
            .map(|p| hex::encode(&p.all_packages_hash));
        e.state.record.connected
            && (config.is_some() || packages.is_some())
            && (config.is_none() || e.state.offered_config == config)
            && (packages.is_none() || e.state.offered_packages == packages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(n: u8) -> InstanceUid {
        let mut b = [0u8; 16];
        b[15] = n;
        InstanceUid(b)
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_window_waits_for_an_answer_and_frees_overdue_places() {
        let w = OfferWindow::new(2);
        w.admit(uid(1)).await;
        w.admit(uid(2)).await;
        assert_eq!(w.in_flight(), 2);

        // Full: the third offer waits until someone answers.
        let third = w.admit(uid(3));
        tokio::pin!(third);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut third)
                .await
                .is_err(),
            "admitted into a full window"
        );
        w.answered(&uid(1));
        tokio::time::timeout(Duration::from_millis(100), &mut third)
            .await
            .expect("an answer frees a place");
        assert_eq!(w.in_flight(), 2);

        // Nobody answers: the places free up after the deadline, not before.
        let fourth = w.admit(uid(4));
        tokio::pin!(fourth);
        assert!(tokio::time::timeout(ANSWER_DEADLINE / 2, &mut fourth)
            .await
            .is_err());
        tokio::time::timeout(ANSWER_DEADLINE, &mut fourth)
            .await
            .expect("overdue offers free their places");
    }

    #[tokio::test]
    async fn a_second_offer_to_an_agent_takes_one_place() {
        let w = OfferWindow::new(4);
        w.admit(uid(1)).await;
        w.admit(uid(1)).await;
        assert_eq!(w.in_flight(), 1);
        w.answered(&uid(1));
        assert_eq!(w.in_flight(), 0);
        assert_eq!(w.places.available_permits(), 4);
    }
}
