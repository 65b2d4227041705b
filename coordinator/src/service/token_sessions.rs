//! Sessions that rest on a bootstrap token, and who a token may speak for.
//!
//! A token is checked when a connection is authenticated, but connections live for days: a
//! revoked or expired token must also end the sessions it opened. Every frame checks the
//! cached token; a revocation closes the token's live WebSockets at once (here, and on every
//! coordinator through the `TokenChanged` broadcast or, if that was lost, the re-read of
//! recent revocations every lease round); the periodic sweep closes sessions whose token has
//! expired.
//!
//! An instance UID is not a secret. Once it exists (an agent record or an identity), only a
//! token bound to it (by its redemption, or minted for it by an operator) may speak for it: a
//! spare token presenting it gets a new UID instead (`Coordinator::frame`).

use std::time::Duration;

use shared::bus::{AuthFailure, GatewayMessage};
use shared::domain::TokenRecord;
use shared::ids::InstanceUid;
use shared::now_ms;

use super::Coordinator;

/// How far back from its last look a revocation re-read starts (clock skew between
/// coordinators, commits that land late).
const REVOCATION_SYNC_OVERLAP: Duration = Duration::from_secs(30);

impl Coordinator {
    /// The cached copy of token `token_id`.
    pub(super) fn cached_token(&self, token_id: &str) -> Option<TokenRecord> {
        let c = self.tokens.read().ok()?;
        c.hash_of
            .get(token_id)
            .and_then(|h| c.by_hash.get(h))
            .cloned()
    }

    /// Why token `token_id` can no longer be used, if the cache knows it is revoked or expired.
    pub(super) fn token_unusable(&self, token_id: &str, now: i64) -> Option<AuthFailure> {
        let c = self.tokens.read().ok()?;
        let t = c.hash_of.get(token_id).and_then(|h| c.by_hash.get(h))?;
        if t.revoked_ms.is_some() {
            Some(AuthFailure::Revoked)
        } else if t.expires_ms <= now {
            Some(AuthFailure::Expired)
        } else {
            None
        }
    }

    /// Whether a frame authenticated with token `token_id` (bound to `bound_uid` as far as
    /// the authenticating coordinator knew) may speak for `uid`. `Err` when the store could
    /// not be asked: the agent is told to retry rather than given a new UID by mistake.
    pub(super) async fn token_may_claim(
        &self,
        token_id: &str,
        bound_uid: Option<InstanceUid>,
        uid: InstanceUid,
    ) -> Result<bool, ()> {
        if bound_uid == Some(uid) {
            return Ok(true);
        }
        let slot = self.slot(&uid);
        let has_identity = self
            .identities
            .read()
            .is_ok_and(|c| c.get(&uid).is_some_and(|ids| !ids.is_empty()));
        let Some(slot) = slot else {
            return Ok(!has_identity);
        };
        if slot.lock().await.token_id.as_deref() == Some(token_id) {
            return Ok(true);
        }
        match self.cached_token(token_id) {
            Some(t) if t.bound_uid == Some(uid) => return Ok(true),
            // Bound to another agent: no need to ask the store.
            Some(t) if t.bound_uid.is_some() => return Ok(false),
            _ => {}
        }
        // Not known here to be bound to `uid`; another coordinator may have bound it before
        // this one took the partition over. The store decides.
        match self.store.get_token(token_id).await {
            Ok(Some(t)) => {
                let bound_here = t.bound_uid == Some(uid);
                self.cache_token(t);
                Ok(bound_here)
            }
            Ok(None) => Ok(false),
            Err(e) => {
                tracing::warn!(error = %e, "token lookup failed");
                Err(())
            }
        }
    }

    /// Closes every live connection that authenticated with token `token_id`.
    pub(super) async fn close_token_sessions(&self, token_id: &str) {
        let mut uids = Vec::new();
        for slot in self.all_slots() {
            let e = slot.lock().await;
            let ws = e.state.record.transport == Some(shared::domain::Transport::WebSocket);
            if ws && e.conn.is_some() && e.conn_token.as_deref() == Some(token_id) {
                uids.push(e.state.record.instance_uid);
            }
        }
        self.close_sessions(uids, "auth: token revoked").await;
    }

    /// Asks the gateways holding these agents' sockets to close them. The socket is found
    /// through the ownership map, whose epoch the gateway checks (a frame's own epoch is 0
    /// on a connection's first message, before the gateway claimed the agent).
    pub(super) async fn close_sessions(&self, uids: Vec<InstanceUid>, reason: &str) {
        for uid in uids {
            let owner = match self.ownership.lookup(uid).await {
                Ok(Some(owner)) => owner,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, instance_uid = %uid, "ownership lookup failed");
                    continue;
                }
            };
            metrics::counter!("ampora_token_sessions_closed_total").increment(1);
            let close = GatewayMessage::Close {
                uid,
                epoch: owner.epoch,
                reason: reason.into(),
            };
            if let Err(e) = self.bus.deliver(&owner.gateway, close).await {
                tracing::warn!(error = %e, instance_uid = %uid, "closing a session failed");
            }
        }
    }

    /// Re-reads the tokens revoked since the last look, so that a lost `TokenChanged`
    /// broadcast costs at most a lease round; closes the sessions of those newly revoked here.
    pub(crate) async fn sync_token_revocations(&self) {
        let mut watermark = self.revocation_watermark.lock().await;
        let started = now_ms();
        let overlap = i64::try_from(REVOCATION_SYNC_OVERLAP.as_millis()).unwrap_or(i64::MAX);
        let revoked = match self
            .store
            .tokens_revoked_since(watermark.saturating_sub(overlap))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "loading revoked tokens failed");
                return;
            }
        };
        *watermark = started;
        drop(watermark);
        for t in revoked {
            let id = t.id.clone();
            let newly = self
                .cached_token(&id)
                .is_none_or(|cached| cached.revoked_ms.is_none());
            self.cache_token(t);
            if newly {
                self.close_token_sessions(&id).await;
            }
        }
    }
}
