//! The Ownership seam: which gateway holds an agent's connection, fenced by epochs.
//!
//! Every claim bumps the epoch. Deliveries carry the epoch they were addressed to, and a
//! gateway drops any delivery whose epoch is not the one it holds, so a stale gateway never
//! delivers. Embedded mode uses [`MemoryOwnership`]; cluster mode Redis with TTLs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;

use crate::ids::{GatewayId, InstanceUid};

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
    /// Releases only if `owner` still holds exactly that epoch; returns whether it did.
    async fn release(&self, uid: InstanceUid, owner: &Owner) -> Result<bool, OwnershipError>;
}

/// In-memory ownership for the single-process default.
#[derive(Debug, Default)]
pub struct MemoryOwnership {
    /// Global and monotonic, so epochs never repeat even across release and re-claim.
    next_epoch: AtomicU64,
    owners: Mutex<HashMap<InstanceUid, Owner>>,
}

impl MemoryOwnership {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Ownership for MemoryOwnership {
    async fn claim(&self, uid: InstanceUid, gateway: &GatewayId) -> Result<Claim, OwnershipError> {
        let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed) + 1;
        let owner = Owner {
            gateway: gateway.clone(),
            epoch,
        };
        let previous = self
            .owners
            .lock()
            .map_err(|_| OwnershipError("poisoned".into()))?
            .insert(uid, owner);
        Ok(Claim { epoch, previous })
    }

    async fn lookup(&self, uid: InstanceUid) -> Result<Option<Owner>, OwnershipError> {
        Ok(self
            .owners
            .lock()
            .map_err(|_| OwnershipError("poisoned".into()))?
            .get(&uid)
            .cloned())
    }

    async fn release(&self, uid: InstanceUid, owner: &Owner) -> Result<bool, OwnershipError> {
        let mut owners = self
            .owners
            .lock()
            .map_err(|_| OwnershipError("poisoned".into()))?;
        if owners.get(&uid) == Some(owner) {
            owners.remove(&uid);
            return Ok(true);
        }
        Ok(false)
    }
}

/// The behaviour every [`Ownership`] implementation must show; run by each implementation's tests.
pub async fn conformance(own: &dyn Ownership) {
    let uid = InstanceUid::new_v7();
    let a = GatewayId("gw-a".into());
    let b = GatewayId("gw-b".into());
    assert_eq!(own.lookup(uid).await.expect("lookup"), None);
    let first = own.claim(uid, &a).await.expect("claim");
    assert_eq!(first.previous, None);
    let second = own.claim(uid, &b).await.expect("claim");
    assert!(second.epoch > first.epoch, "epochs must grow");
    let stale = Owner {
        gateway: a.clone(),
        epoch: first.epoch,
    };
    assert_eq!(second.previous, Some(stale.clone()));
    assert!(
        !own.release(uid, &stale).await.expect("release"),
        "stale release must fail"
    );
    let current = Owner {
        gateway: b,
        epoch: second.epoch,
    };
    assert_eq!(
        own.lookup(uid).await.expect("lookup"),
        Some(current.clone())
    );
    assert!(own.release(uid, &current).await.expect("release"));
    assert_eq!(own.lookup(uid).await.expect("lookup"), None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_ownership_conforms() {
        conformance(&MemoryOwnership::new()).await;
    }
}
