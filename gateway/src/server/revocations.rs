//! The identity revocation set of a gateway with agent identities: loaded whole from a
//! coordinator at start and every `REVOCATION_REFRESH`, and added to by each
//! `IdentityRevoked` broadcast in between.

use std::sync::Arc;
use std::time::Duration;

use shared::bus::{Bus, ControlEvent, CoordinatorReply, CoordinatorRequest, Route};
use tokio::sync::mpsc;

use super::latency;
use crate::tls::AgentTrust;

/// How often a gateway with agent identities reloads the whole revocation set from a
/// coordinator, beside the `IdentityRevoked` broadcasts (which the bus may lose).
const REVOCATION_REFRESH: Duration = Duration::from_secs(30);

/// Subscribes to control events, loads the revoked serials once (within `within`) and spawns
/// the task that keeps `trust.revoked` current; the handle aborts it.
pub(super) async fn start(
    bus: &Arc<dyn Bus>,
    trust: &AgentTrust,
    within: Duration,
) -> anyhow::Result<tokio::task::AbortHandle> {
    let control = bus.subscribe_control().await?;
    // Before the first handshake: a revocation broadcast before this gateway
    // started never reaches it.
    load_revoked(bus, trust, within).await;
    let task = track_revocations(bus.clone(), trust.clone(), control);
    Ok(tokio::spawn(task).abort_handle())
}

/// Loads the full set of revoked serials once, within `within`; a failure is logged (no
/// coordinator yet is no reason not to start) and left to the periodic reload.
async fn load_revoked(bus: &Arc<dyn Bus>, trust: &AgentTrust, within: Duration) {
    let reply = tokio::time::timeout(
        within,
        latency::bus_request(&**bus, Route::Any, CoordinatorRequest::RevokedSerials),
    )
    .await;
    match reply {
        Ok(Ok(CoordinatorReply::RevokedSerials(serials))) => {
            trust.revoked.replace(serials.into_iter().collect());
        }
        Ok(Ok(_)) => tracing::error!("coordinator answered revoked serials with another reply"),
        Ok(Err(e)) => tracing::warn!(error = %e, "loading revoked identities at start failed"),
        Err(_) => tracing::warn!("loading revoked identities at start timed out"),
    }
}

/// Keeps `trust.revoked` current: each `IdentityRevoked` broadcast adds its serial at once, and
/// a full reload from a coordinator at start and every [`REVOCATION_REFRESH`] catches any
/// broadcast the bus lost. Holds no `Inner`, so it cannot keep the gateway alive.
async fn track_revocations(
    bus: Arc<dyn Bus>,
    trust: AgentTrust,
    mut control: mpsc::Receiver<ControlEvent>,
) {
    let mut tick = tokio::time::interval(REVOCATION_REFRESH);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                match latency::bus_request(&*bus, Route::Any, CoordinatorRequest::RevokedSerials).await {
                    Ok(CoordinatorReply::RevokedSerials(serials)) => {
                        trust.revoked.replace(serials.into_iter().collect());
                    }
                    Ok(_) => tracing::error!("coordinator answered revoked serials with another reply"),
                    Err(e) => tracing::warn!(error = %e, "loading revoked identities failed"),
                }
            }
            ev = control.recv() => match ev {
                Some(ControlEvent::IdentityRevoked { serial }) => trust.revoked.insert(serial),
                Some(_) => {}
                None => {
                    tracing::warn!("control subscription ended; revocations only by refresh");
                    loop {
                        tick.tick().await;
                        if let Ok(CoordinatorReply::RevokedSerials(s)) =
                            latency::bus_request(&*bus, Route::Any, CoordinatorRequest::RevokedSerials).await
                        {
                            trust.revoked.replace(s.into_iter().collect());
                        }
                    }
                }
            },
        }
    }
}
