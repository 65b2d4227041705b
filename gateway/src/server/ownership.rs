//! Keeping this gateway's ownership claims alive: the periodic refresh of every agent it holds,
//! and the close of a connection whose claim another gateway took.

use std::sync::Arc;

use shared::ids::InstanceUid;
use shared::ownership::Owner;

use super::Inner;

/// Most claims refreshed in one ownership call.
const REFRESH_BATCH: usize = 1000;

/// Keeps this gateway's ownership claims alive; a claim found lost means another gateway took
/// the agent (or the entry expired while we stalled), so the connection here is closed and the
/// agent's next connection claims it afresh.
pub(super) async fn refresh_ownership(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(inner.cfg.ownership_refresh).await;
        let held: Vec<(InstanceUid, Owner)> = inner
            .conns()
            .bound
            .iter()
            .map(|(uid, b)| {
                let owner = Owner {
                    gateway: inner.id.clone(),
                    epoch: b.epoch,
                };
                (*uid, owner)
            })
            .collect();
        for batch in held.chunks(REFRESH_BATCH) {
            match inner.ownership.refresh(batch).await {
                Ok(lost) => {
                    for uid in lost {
                        let epoch = batch.iter().find(|(u, _)| *u == uid).map(|(_, o)| o.epoch);
                        let conns = inner.conns();
                        if let Some(b) = conns.bound.get(&uid).filter(|b| Some(b.epoch) == epoch) {
                            b.control.request_close(1008, "ownership lost");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ownership refresh failed"),
            }
        }
    }
}
