//! The Ownership seam: which gateway holds an agent's connection, fenced by epochs.
//!
//! Every claim bumps the epoch. Deliveries carry the epoch they were addressed to, and a
//! gateway drops any delivery whose epoch is not the one it holds, so a stale gateway never
//! delivers. A gateway keeps its claims alive with [`Ownership::refresh`] and learns from it
//! which agents it lost (taken over by another connection, or expired), so it can close those
//! sockets.
//!
//! Implementations:
//! - [`MemoryOwnership`]: the single-process default; claims never expire.
//! - [`RedisOwnership`]: cluster mode; claims expire after a TTL unless refreshed, epochs come
//!   from one counter shared by the whole cluster (see [`redis`] for keys and scripts).
//!
//! [`conformance`] is the behaviour every implementation must show.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::ids::{GatewayId, InstanceUid};

pub mod redis;

pub use self::redis::RedisOwnership;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub gateway: GatewayId,
    pub epoch: u64,
}

/// Result of a claim: the new epoch and whoever held the agent before, if anyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub epoch: u64,
    pub previous: Option<Owner>,
}

#[derive(Debug, thiserror::Error)]
#[error("ownership backend unavailable: {0}")]
pub struct OwnershipError(pub String);

#[async_trait]
pub trait Ownership: Send + Sync + 'static {
    /// Makes `gateway` the owner of `uid` with a fresh, strictly larger epoch.
    async fn claim(&self, uid: InstanceUid, gateway: &GatewayId) -> Result<Claim, OwnershipError>;
    async fn lookup(&self, uid: InstanceUid) -> Result<Option<Owner>, OwnershipError>;
    /// The owner of each of `uids`, in the same order (one round trip per batch, not per
    /// uid, where the backend allows). Fails as a whole if any part fails.
    async fn lookup_many(
        &self,
        uids: &[InstanceUid],
    ) -> Result<Vec<Option<Owner>>, OwnershipError> {
        let mut owners = Vec::with_capacity(uids.len());
        for uid in uids {
            owners.push(self.lookup(*uid).await?);
        }
        Ok(owners)
    }
    /// Releases only if `owner` still holds exactly that epoch; returns whether it did.
    async fn release(&self, uid: InstanceUid, owner: &Owner) -> Result<bool, OwnershipError>;
    /// Extends the TTL of every claim in `held` that its owner still holds at exactly that
    /// epoch (one batch per call); returns the uids whose claim was lost (expired or taken).
    async fn refresh(
        &self,
        held: &[(InstanceUid, Owner)],
    ) -> Result<Vec<InstanceUid>, OwnershipError>;
}

/// In-memory ownership for the single-process default.
#[derive(Debug, Default)]
pub struct MemoryOwnership {
    /// One lock for the counter and the table: an epoch is drawn and installed in the same
    /// critical section, so concurrent claims of one uid are installed in epoch order and the
    /// largest epoch handed out is always the one that ends up owning.
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    /// Global and monotonic, so epochs never repeat even across release and re-claim.
    last_epoch: u64,
    owners: HashMap<InstanceUid, Owner>,
}

impl MemoryOwnership {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, MemoryState>, OwnershipError> {
        self.state
            .lock()
            .map_err(|_| OwnershipError("memory ownership lock poisoned".into()))
    }
}

#[async_trait]
impl Ownership for MemoryOwnership {
    async fn claim(&self, uid: InstanceUid, gateway: &GatewayId) -> Result<Claim, OwnershipError> {
        let mut state = self.state()?;
        state.last_epoch += 1;
        let epoch = state.last_epoch;
        let owner = Owner {
            gateway: gateway.clone(),
            epoch,
        };
        let previous = state.owners.insert(uid, owner);
        Ok(Claim { epoch, previous })
    }

    async fn lookup(&self, uid: InstanceUid) -> Result<Option<Owner>, OwnershipError> {
        Ok(self.state()?.owners.get(&uid).cloned())
    }

    async fn lookup_many(
        &self,
        uids: &[InstanceUid],
    ) -> Result<Vec<Option<Owner>>, OwnershipError> {
        let state = self.state()?;
        Ok(uids
            .iter()
            .map(|uid| state.owners.get(uid).cloned())
            .collect())
    }

    async fn release(&self, uid: InstanceUid, owner: &Owner) -> Result<bool, OwnershipError> {
        let mut state = self.state()?;
        if state.owners.get(&uid) == Some(owner) {
            state.owners.remove(&uid);
            return Ok(true);
        }
        Ok(false)
    }

    /// Claims never expire in one process (the gateway holding them is this process), so a
    /// refresh only reports the ones taken over or released since.
    async fn refresh(
        &self,
        held: &[(InstanceUid, Owner)],
    ) -> Result<Vec<InstanceUid>, OwnershipError> {
        let state = self.state()?;
        Ok(held
            .iter()
            .filter(|(uid, owner)| state.owners.get(uid) != Some(owner))
            .map(|(uid, _)| *uid)
            .collect())
    }
}

/// The behaviour every [`Ownership`] implementation must show; run by each implementation's
/// tests.
///
/// It uses fresh random uids only, so it can run against a backend that already holds claims
/// (from earlier runs or other users), provided nothing else claims those uids meanwhile. Claims
/// must not expire during the run: give TTL-based implementations a TTL of several seconds or
/// more. It spawns tasks, so it needs a Tokio runtime; use a multi-threaded one to make the
/// concurrent claims truly concurrent.
///
/// Semantics pinned here beyond the trait docs:
/// - epochs are strictly increasing across all uids, not just per uid;
/// - claims of one uid are linearizable: ordered by epoch, each claim's `previous` is the claim
///   just before it, and the last one is what `lookup` returns;
/// - `refresh` of an empty slice returns nothing; the order of the lost uids is unspecified.
pub async fn conformance(own: Arc<dyn Ownership>) {
    claim_lookup_release(own.as_ref()).await;
    lookup_many_matches_lookup(own.as_ref()).await;
    refresh_reports_losses(own.as_ref()).await;
    refresh_large_batch(own.as_ref()).await;
    epochs_strictly_increase(own.as_ref()).await;
    concurrent_claims_are_linearizable(own.clone()).await;
    uids_are_independent(own.as_ref()).await;
}

fn gateway(name: &str) -> GatewayId {
    GatewayId(name.into())
}

fn owner_of(gateway: &GatewayId, claim: &Claim) -> Owner {
    Owner {
        gateway: gateway.clone(),
        epoch: claim.epoch,
    }
}

async fn claim_lookup_release(own: &dyn Ownership) {
    let uid = InstanceUid::new_v7();
    let a = gateway("gw-a");
    let b = gateway("gw-b");
    assert_eq!(own.lookup(uid).await.expect("lookup"), None);
    let first = own.claim(uid, &a).await.expect("claim");
    assert_eq!(first.previous, None);
    assert_eq!(
        own.lookup(uid).await.expect("lookup"),
        Some(owner_of(&a, &first))
    );
    let second = own.claim(uid, &b).await.expect("claim");
    assert!(second.epoch > first.epoch, "epochs must grow");
    let stale = owner_of(&a, &first);
    assert_eq!(second.previous, Some(stale.clone()));
    assert!(
        !own.release(uid, &stale).await.expect("release"),
        "stale release must fail"
    );
    // Right gateway, wrong epoch, and right epoch, wrong gateway: both must be refused.
    let wrong_epoch = Owner {
        gateway: b.clone(),
        epoch: second.epoch + 1,
    };
    assert!(!own.release(uid, &wrong_epoch).await.expect("release"));
    let wrong_gateway = owner_of(&a, &second);
    assert!(!own.release(uid, &wrong_gateway).await.expect("release"));
    let current = owner_of(&b, &second);
    assert_eq!(
        own.lookup(uid).await.expect("lookup"),
        Some(current.clone())
    );
    assert!(own.release(uid, &current).await.expect("release"));
    assert_eq!(own.lookup(uid).await.expect("lookup"), None);
    assert!(
        !own.release(uid, &current).await.expect("release"),
        "a second release must report nothing released"
    );
    // A claim after a release starts afresh, still with a larger epoch.
    let third = own.claim(uid, &a).await.expect("claim");
    assert_eq!(third.previous, None);
    assert!(
        third.epoch > second.epoch,
        "epochs must grow across release"
    );
    assert!(own
        .release(uid, &owner_of(&a, &third))
        .await
        .expect("release"));
}

/// More uids than one Redis batch, mixing owned, released, taken over and never claimed ones
/// (and a repeated uid), so the mapping of every batch's answers back to positions is checked.
async fn lookup_many_matches_lookup(own: &dyn Ownership) {
    const AGENTS: usize = 2_345;
    let gateways = [gateway("gw-a"), gateway("gw:b"), gateway("gw-c")];
    assert_eq!(own.lookup_many(&[]).await.expect("lookup_many"), Vec::new());
    let uids: Vec<InstanceUid> = (0..AGENTS).map(|_| InstanceUid::new_v7()).collect();
    let claimed = uids.iter().enumerate().filter(|(i, _)| i % 5 != 4);
    let claims = futures::future::try_join_all(
        claimed.map(|(i, uid)| own.claim(*uid, &gateways[i % gateways.len()])),
    )
    .await
    .expect("claims");
    let mut expected: Vec<Option<Owner>> = Vec::with_capacity(AGENTS);
    let mut claims = claims.into_iter();
    for (i, uid) in uids.iter().enumerate() {
        if i % 5 == 4 {
            expected.push(None);
            continue;
        }
        let gw = &gateways[i % gateways.len()];
        let mut owner = owner_of(gw, &claims.next().expect("a claim per claimed uid"));
        if i % 11 == 0 {
            assert!(own.release(*uid, &owner).await.expect("release"));
            expected.push(None);
            continue;
        }
        if i % 13 == 0 {
            let other = &gateways[(i + 1) % gateways.len()];
            owner = owner_of(other, &own.claim(*uid, other).await.expect("takeover"));
        }
        expected.push(Some(owner));
    }
    let mut asked = uids.clone();
    asked.push(uids[1]);
    expected.push(expected[1].clone());
    let found = own.lookup_many(&asked).await.expect("lookup_many");
    assert_eq!(found.len(), asked.len(), "one answer per uid asked");
    for (i, (uid, (got, want))) in asked.iter().zip(found.iter().zip(&expected)).enumerate() {
        assert_eq!(got, want, "position {i}");
        if i % 97 == 0 {
            assert_eq!(
                &own.lookup(*uid).await.expect("lookup"),
                want,
                "as lookup says"
            );
        }
    }
    for (uid, owner) in uids.iter().zip(&expected) {
        if let Some(owner) = owner {
            assert!(own.release(*uid, owner).await.expect("release"));
        }
    }
}

async fn refresh_reports_losses(own: &dyn Ownership) {
    let a = gateway("gw-a");
    let b = gateway("gw-b");
    assert_eq!(own.refresh(&[]).await.expect("refresh"), Vec::new());

    let kept = InstanceUid::new_v7();
    let taken = InstanceUid::new_v7();
    let released = InstanceUid::new_v7();
    let never_claimed = InstanceUid::new_v7();
    let mut held = Vec::new();
    for uid in [kept, taken, released] {
        let claim = own.claim(uid, &a).await.expect("claim");
        held.push((uid, owner_of(&a, &claim)));
    }
    assert_eq!(
        own.refresh(&held).await.expect("refresh"),
        Vec::new(),
        "claims still held must not be reported lost"
    );
    for (uid, owner) in &held {
        assert_eq!(
            own.lookup(*uid).await.expect("lookup").as_ref(),
            Some(owner),
            "refresh must not change the owner"
        );
    }

    let takeover = own.claim(taken, &b).await.expect("claim");
    assert!(own.release(released, &held[2].1).await.expect("release"));
    let lost: HashSet<_> = own
        .refresh(&held)
        .await
        .expect("refresh")
        .into_iter()
        .collect();
    assert_eq!(lost, HashSet::from([taken, released]));
    // A refresh by the loser must not have touched the new owner's claim.
    assert_eq!(
        own.lookup(taken).await.expect("lookup"),
        Some(owner_of(&b, &takeover))
    );
    assert_eq!(own.lookup(released).await.expect("lookup"), None);

    // Only the exact (gateway, epoch) counts as held.
    let kept_owner = held[0].1.clone();
    let mismatched = [
        (
            kept,
            Owner {
                gateway: kept_owner.gateway.clone(),
                epoch: kept_owner.epoch + 1,
            },
        ),
        (
            kept,
            Owner {
                gateway: b.clone(),
                epoch: kept_owner.epoch,
            },
        ),
        (never_claimed, kept_owner.clone()),
    ];
    for entry in mismatched {
        let uid = entry.0;
        assert_eq!(
            own.refresh(std::slice::from_ref(&entry))
                .await
                .expect("refresh"),
            vec![uid],
            "{entry:?} is not held"
        );
    }
    assert_eq!(
        own.lookup(kept).await.expect("lookup"),
        Some(kept_owner.clone())
    );
    assert_eq!(own.lookup(never_claimed).await.expect("lookup"), None);

    assert!(own.release(kept, &kept_owner).await.expect("release"));
    assert!(own
        .release(taken, &owner_of(&b, &takeover))
        .await
        .expect("release"));
}

/// More entries than one Redis batch, with losses spread over all batches, so the mapping of
/// a batch's results back to uids is checked at every offset.
async fn refresh_large_batch(own: &dyn Ownership) {
    const AGENTS: usize = 2_500;
    let a = gateway("gw-a");
    let b = gateway("gw-b");
    let uids: Vec<InstanceUid> = (0..AGENTS).map(|_| InstanceUid::new_v7()).collect();
    let claims = futures::future::try_join_all(uids.iter().map(|uid| own.claim(*uid, &a)))
        .await
        .expect("claims");
    let held: Vec<(InstanceUid, Owner)> = uids
        .iter()
        .zip(&claims)
        .map(|(uid, claim)| (*uid, owner_of(&a, claim)))
        .collect();
    assert_eq!(own.refresh(&held).await.expect("refresh"), Vec::new());

    let stolen: HashSet<InstanceUid> = uids.iter().step_by(7).copied().collect();
    futures::future::try_join_all(stolen.iter().map(|uid| own.claim(*uid, &b)))
        .await
        .expect("takeovers");
    let lost: Vec<InstanceUid> = own.refresh(&held).await.expect("refresh");
    assert_eq!(lost.len(), stolen.len(), "each lost uid reported once");
    assert_eq!(lost.into_iter().collect::<HashSet<_>>(), stolen);

    for (uid, owner) in &held {
        if !stolen.contains(uid) {
            assert!(own.release(*uid, owner).await.expect("release"));
        }
    }
}

async fn epochs_strictly_increase(own: &dyn Ownership) {
    let gateways = [gateway("gw-a"), gateway("gw-b"), gateway("gw-c")];
    let uids: Vec<InstanceUid> = (0..5).map(|_| InstanceUid::new_v7()).collect();
    let mut last = 0;
    for round in 0..200 {
        let uid = uids[round % uids.len()];
        let gw = &gateways[round % gateways.len()];
        let claim = own.claim(uid, gw).await.expect("claim");
        assert!(
            claim.epoch > last,
            "epoch {} after {last} (round {round})",
            claim.epoch
        );
        last = claim.epoch;
        // Releasing now and then must not let an epoch repeat.
        if round % 3 == 0 {
            assert!(own
                .release(uid, &owner_of(gw, &claim))
                .await
                .expect("release"));
        }
    }
    for uid in uids {
        if let Some(owner) = own.lookup(uid).await.expect("lookup") {
            assert!(own.release(uid, &owner).await.expect("release"));
        }
    }
}

async fn concurrent_claims_are_linearizable(own: Arc<dyn Ownership>) {
    const TASKS: usize = 8;
    const CLAIMS_PER_TASK: usize = 25;
    let uid = InstanceUid::new_v7();
    let start = Arc::new(tokio::sync::Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let own = own.clone();
            let start = start.clone();
            tokio::spawn(async move {
                let gw = gateway(&format!("gw-{task}"));
                start.wait().await;
                let mut claims = Vec::with_capacity(CLAIMS_PER_TASK);
                for _ in 0..CLAIMS_PER_TASK {
                    let claim = own.claim(uid, &gw).await.expect("claim");
                    claims.push((gw.clone(), claim));
                }
                claims
            })
        })
        .collect();
    let mut claims = Vec::with_capacity(TASKS * CLAIMS_PER_TASK);
    for task in futures::future::join_all(tasks).await {
        claims.extend(task.expect("claim task"));
    }

    claims.sort_by_key(|(_, claim)| claim.epoch);
    let epochs: HashSet<u64> = claims.iter().map(|(_, claim)| claim.epoch).collect();
    assert_eq!(epochs.len(), claims.len(), "every claim gets its own epoch");
    // Ordered by epoch, the claims must form one chain: each took over from the one before.
    assert_eq!(claims[0].1.previous, None, "the first claim of a fresh uid");
    for pair in claims.windows(2) {
        let (before_gw, before) = &pair[0];
        let (_, after) = &pair[1];
        assert_eq!(
            after.previous.as_ref(),
            Some(&owner_of(before_gw, before)),
            "claim at epoch {} must take over from epoch {}",
            after.epoch,
            before.epoch
        );
    }
    let (last_gw, last) = claims.last().expect("claims were made");
    let winner = owner_of(last_gw, last);
    assert_eq!(
        own.lookup(uid).await.expect("lookup"),
        Some(winner.clone()),
        "the claim with the largest epoch owns the agent"
    );
    assert!(own.release(uid, &winner).await.expect("release"));
}

async fn uids_are_independent(own: &dyn Ownership) {
    let a = gateway("gw-a");
    let b = gateway("gw-b");
    let one = InstanceUid::new_v7();
    let two = InstanceUid::new_v7();
    let claim_one = own.claim(one, &a).await.expect("claim");
    let claim_two = own.claim(two, &b).await.expect("claim");
    assert_eq!(
        claim_two.previous, None,
        "another uid's owner is not a previous owner"
    );
    let owner_one = owner_of(&a, &claim_one);
    let owner_two = owner_of(&b, &claim_two);

    // Releasing or refreshing `one` with `two`'s owner must not touch `two`, and vice versa.
    assert!(!own.release(one, &owner_two).await.expect("release"));
    assert_eq!(
        own.refresh(&[(one, owner_two.clone())])
            .await
            .expect("refresh"),
        vec![one]
    );
    assert!(own.release(one, &owner_one).await.expect("release"));
    assert_eq!(own.lookup(one).await.expect("lookup"), None);
    assert_eq!(
        own.lookup(two).await.expect("lookup"),
        Some(owner_two.clone())
    );

    let again = own.claim(one, &b).await.expect("claim");
    assert_eq!(again.previous, None);
    assert_eq!(
        own.refresh(&[(one, owner_of(&b, &again)), (two, owner_two.clone())])
            .await
            .expect("refresh"),
        Vec::new()
    );
    assert!(own
        .release(one, &owner_of(&b, &again))
        .await
        .expect("release"));
    assert!(own.release(two, &owner_two).await.expect("release"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn memory_ownership_conforms() {
        conformance(Arc::new(MemoryOwnership::new())).await;
    }
}
