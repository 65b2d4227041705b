//! Bootstrap tokens: the write-through cache and its syncs, authentication by token, the
//! group-commit redemption (single use, atomic in the store), scopes checked at binding, and
//! creation and revocation. Who a token may speak for and the sessions resting on it are in
//! [`super::token_sessions`].

use super::frames::Refusal;
use super::refusals::Refused;
use super::{refusals, Coordinator, Entry, ServiceError};
use crate::session::{self};
use shared::bus::{AgentFrame, AuthDecision, AuthFailure, AuthRequest, ControlEvent, Credential};
use shared::domain::{AuditEntry, Redemption, TokenRecord, TokenScope};
use shared::ids::InstanceUid;
use shared::store::{RedeemRequest, Store, StoreError};
use shared::{now_ms, token};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Tokens written per store transaction by a batch.
const TOKEN_BATCH_CHUNK: usize = 1000;
use tokio::sync::{mpsc, oneshot};

#[derive(Default)]
pub(super) struct TokenCache {
    pub(super) by_hash: HashMap<[u8; 32], TokenRecord>,
    pub(super) hash_of: HashMap<String, [u8; 32]>,
    /// Scopes of bound tokens by agent (token id, scope): see [`scope`].
    pub(super) scopes: HashMap<InstanceUid, Vec<(String, TokenScope)>>,
}

impl TokenCache {
    pub(super) fn insert(&mut self, mut rec: TokenRecord) {
        // A token only moves forward (bound, revoked; never back), so a copy read before a
        // change this cache already has (a sync racing a redemption or revocation) must not
        // undo it.
        if let Some(old) = self.by_hash.get(&rec.hash) {
            rec.revoked_ms = rec.revoked_ms.or(old.revoked_ms);
            rec.redeemed_ms = rec.redeemed_ms.or(old.redeemed_ms);
            rec.bound_uid = rec.bound_uid.or(old.bound_uid);
        }
        self.index_scope(&rec);
        self.hash_of.insert(rec.id.clone(), rec.hash);
        self.by_hash.insert(rec.hash, rec);
    }

    pub(super) fn update(&mut self, id: &str, f: impl FnOnce(&mut TokenRecord)) {
        if let Some(rec) = self.hash_of.get(id).and_then(|h| self.by_hash.get_mut(h)) {
            f(rec);
            let rec = rec.clone();
            self.index_scope(&rec);
        }
    }
}

pub(super) type RedeemJob = (RedeemRequest, oneshot::Sender<Result<Redemption, String>>);

/// Most redemptions committed in one transaction.
pub(super) const REDEEM_BATCH: usize = 512;

/// Group commit for token redemptions: each waits for a commit (they must never be lost), but
/// whatever queued up while one batch was committing goes into the next transaction together.
pub(super) async fn run_redeemer(store: Arc<dyn Store>, mut rx: mpsc::Receiver<RedeemJob>) {
    let mut jobs = Vec::with_capacity(REDEEM_BATCH);
    while rx.recv_many(&mut jobs, REDEEM_BATCH).await > 0 {
        let (reqs, replies): (Vec<_>, Vec<_>) = jobs.drain(..).unzip();
        let mut outcome = store.redeem_tokens(&reqs, now_ms()).await;
        if matches!(outcome, Err(StoreError::MaybeApplied(_))) {
            // The commit's fate is unknown: ask again. Redemption is idempotent per uid, so
            // a batch that did commit now reads back as `AlreadyBoundToSame` (and its audit
            // entries are not written twice).
            outcome = store.redeem_tokens(&reqs, now_ms()).await;
        }
        match outcome {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

/// How far back from its watermark a token sync reads again. A token created elsewhere can
/// commit after a newer one was read (a slow insert under load) or carry an older time (its
/// creator's clock is behind); this covers both. Whatever slips past is still found by a
/// lookup on a miss.
pub(super) const TOKEN_SYNC_OVERLAP: Duration = Duration::from_secs(30);

/// Least time between two syncs started by `TokensCreated` events, so that tokens created one
/// API call at a time cost a few syncs per second rather than one each.
pub(super) const TOKEN_SYNC_SPACING: Duration = Duration::from_millis(100);

/// Tokens merged into the cache per write-lock hold, so that authentications are not held
/// up while a large batch is loaded.
pub(super) const TOKEN_SYNC_CHUNK: usize = 1024;

/// Runs the token syncs `TokensCreated` events ask for, one at a time and spaced.
pub(super) async fn run_token_sync(
    weak: std::sync::Weak<Coordinator>,
    mut wanted: mpsc::Receiver<()>,
) {
    while wanted.recv().await.is_some() {
        let Some(c) = weak.upgrade() else { return };
        c.sync_tokens().await;
        drop(c);
        tokio::time::sleep(TOKEN_SYNC_SPACING).await;
    }
}

impl Coordinator {
    /// A coordinator changed a token: reload our copy (a sync racing this keeps the change,
    /// see [`TokenCache::insert`]) and end the sessions of a revoked one.
    pub(super) async fn reload_token(&self, token_id: &str) {
        match self.store.get_token(token_id).await {
            Ok(Some(rec)) => {
                let revoked = rec.revoked_ms.is_some();
                self.cache_token(rec);
                if revoked {
                    self.close_token_sessions(token_id).await;
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, token_id, "reloading token failed"),
        }
    }

    pub(super) async fn authenticate(&self, req: AuthRequest) -> AuthDecision {
        let decision = match &req.certificate {
            Some(cert) => self.check_certificate(cert.uid, &cert.serial).await,
            None => self.check_token(&req).await,
        };
        if let AuthDecision::Reject(f) = &decision {
            let detail = match &req.certificate {
                Some(cert) => serde_json::json!({ "certificate": cert.serial }),
                None => match &req.token {
                    Some(t) => serde_json::json!({ "token": t.prefix }),
                    None => serde_json::Value::Null,
                },
            };
            self.refused(Refused {
                ip: req.source_ip,
                reason: refusals::reason_label(f.as_str()),
                uid_hint: req.uid_hint,
                detail,
            })
            .await;
        }
        decision
    }

    /// A bootstrap token, known here only by its hash: the gateway checked its format (and
    /// refused a malformed one itself) and never sends its text.
    pub(super) async fn check_token(&self, req: &AuthRequest) -> AuthDecision {
        let Some(hash) = req.token.as_ref().map(|t| t.hash) else {
            return AuthDecision::Reject(AuthFailure::MissingCredentials);
        };
        let cached = self
            .tokens
            .read()
            .ok()
            .and_then(|c| c.by_hash.get(&hash).cloned());
        let rec = match cached {
            Some(r) => {
                self.token_hits.fetch_add(1, Ordering::Relaxed);
                r
            }
            None => {
                self.token_misses.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("ampora_coordinator_token_cache_misses_total").increment(1);
                match self.store.find_token(&hash).await {
                    Ok(Some(r)) => {
                        if let Ok(mut c) = self.tokens.write() {
                            c.insert(r.clone());
                        }
                        r
                    }
                    Ok(None) => return AuthDecision::Reject(AuthFailure::UnknownToken),
                    Err(e) => {
                        // The token may well be good: "retry later", not 401.
                        tracing::error!(error = %e, "token lookup failed");
                        return AuthDecision::Unavailable;
                    }
                }
            }
        };
        if rec.revoked_ms.is_some() {
            return AuthDecision::Reject(AuthFailure::Revoked);
        }
        if rec.expires_ms <= now_ms() {
            return AuthDecision::Reject(AuthFailure::Expired);
        }
        if let (Some(bound), Some(hint)) = (rec.bound_uid, req.uid_hint) {
            if bound != hint {
                return AuthDecision::Reject(AuthFailure::AlreadyRedeemed);
            }
        }
        // After its first mTLS connection an agent is on the certificate path for good.
        if rec
            .bound_uid
            .or(req.uid_hint)
            .is_some_and(|u| self.identity_confirmed(u))
        {
            return AuthDecision::Reject(AuthFailure::IdentityRequired);
        }
        AuthDecision::Accept(Credential::BootstrapToken {
            token_id: rec.id,
            bound_uid: rec.bound_uid,
        })
    }

    /// Binds the connection's token to `uid` on first use; `Err` carries the refusal.
    pub(super) async fn redeem(
        &self,
        entry: &mut Entry,
        frame: &AgentFrame,
        uid: InstanceUid,
    ) -> Result<(), Refusal> {
        let (token_id, bound_uid) = match &frame.credential {
            Credential::BootstrapToken {
                token_id,
                bound_uid,
            } => (token_id, bound_uid),
            Credential::Certificate { uid: cert_uid, .. } => {
                // The certificate names the agent; the message must be about that agent.
                return if *cert_uid == uid {
                    Ok(())
                } else {
                    Err(Refusal::IdentityMismatch)
                };
            }
        };
        if self.identity_confirmed(uid) {
            return Err(AuthFailure::IdentityRequired.into());
        }
        if entry.token_id.as_deref() == Some(token_id.as_str()) {
            return Ok(());
        }
        if let Some(b) = bound_uid {
            if *b != uid {
                return Err(AuthFailure::AlreadyRedeemed.into());
            }
        }
        self.check_scope(token_id, frame, uid).await?;
        let audit = AuditEntry {
            id: 0,
            at_ms: now_ms(),
            actor: "agent".into(),
            action: "token.redeem".into(),
            instance_uid: Some(uid),
            source_ip: Some(frame.source_ip),
            reason: None,
            detail: serde_json::json!({ "token_id": token_id }),
        };
        let (reply, outcome) = oneshot::channel();
        let req = RedeemRequest {
            token_id: token_id.clone(),
            uid,
            audit,
        };
        let outcome = match self.redeemer.send((req, reply)).await {
            Ok(()) => outcome.await.map_err(|e| e.to_string()).and_then(|r| r),
            Err(e) => Err(e.to_string()),
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                // The token may well be good: "retry later", never a false refusal.
                tracing::error!(error = %e, "token redemption failed");
                return Err(Refusal::Unavailable);
            }
        };
        match outcome {
            Redemption::Bound => {
                metrics::counter!("ampora_tokens_redeemed_total").increment(1);
                if let Ok(mut c) = self.tokens.write() {
                    c.update(token_id, |t| {
                        t.bound_uid = Some(uid);
                        t.redeemed_ms = Some(now_ms());
                    });
                }
            }
            Redemption::AlreadyBoundToSame => {}
            Redemption::BoundToOther => return Err(AuthFailure::AlreadyRedeemed.into()),
            Redemption::Revoked => return Err(AuthFailure::Revoked.into()),
            Redemption::Expired => return Err(AuthFailure::Expired.into()),
            Redemption::NotFound => return Err(AuthFailure::UnknownToken.into()),
        }
        entry.token_id = Some(token_id.clone());
        Ok(())
    }

    /// A scoped token binds only to an agent whose first frame describes it with every label
    /// of the scope, identifying or not. A first frame without a description is refused too:
    /// the agent has not shown it matches, and the binding, once made, is never checked again.
    ///
    /// Only a token not yet bound is checked (a bound one passed when it was bound). The scope
    /// never changes, so a cached copy tells whether there is one; whether the token is bound
    /// yet, only the store knows for sure (another coordinator may have bound it), so a scoped
    /// token not known here to be bound to `uid` is read from the store.
    pub(super) async fn check_scope(
        &self,
        token_id: &str,
        frame: &AgentFrame,
        uid: InstanceUid,
    ) -> Result<(), Refusal> {
        let cached = self.tokens.read().ok().and_then(|c| {
            c.hash_of
                .get(token_id)
                .and_then(|h| c.by_hash.get(h))
                .cloned()
        });
        match &cached {
            Some(t) if t.scope.is_none() || t.bound_uid == Some(uid) => return Ok(()),
            _ => {}
        }
        let rec = match self.store.get_token(token_id).await {
            Ok(Some(rec)) => rec,
            Ok(None) => return Err(AuthFailure::UnknownToken.into()),
            Err(e) => {
                tracing::error!(error = %e, "token lookup failed");
                return Err(Refusal::Unavailable);
            }
        };
        // Bound already: the redemption decides (same agent: fine; another: refused).
        let (None, Some(scope)) = (rec.bound_uid, &rec.scope) else {
            return Ok(());
        };
        let admitted = frame
            .msg
            .agent_description
            .as_ref()
            .is_some_and(|d| scope.admits(&session::description_from_proto(d)));
        if admitted {
            Ok(())
        } else {
            Err(Refusal::ScopeMismatch)
        }
    }

    pub async fn create_token(
        &self,
        name: String,
        ttl: Option<Duration>,
        author: &str,
    ) -> Result<(String, TokenRecord), ServiceError> {
        self.create_scoped_token(name, ttl, None, author).await
    }

    /// [`Coordinator::create_token`] for a token only agents matching `scope` may redeem.
    pub async fn create_scoped_token(
        &self,
        name: String,
        ttl: Option<Duration>,
        scope: Option<TokenScope>,
        author: &str,
    ) -> Result<(String, TokenRecord), ServiceError> {
        let (text, rec) = self.new_token(name, ttl, scope);
        self.store.create_token(&rec).await?;
        self.cache_token(rec.clone());
        self.announce_tokens().await;
        self.audit_token_created(author, std::slice::from_ref(&rec.id), &rec)
            .await?;
        Ok((text, rec))
    }

    /// A re-bootstrap token: minted for agent `uid` (bound from the start), so it may speak
    /// for that agent, which a spare token never may once the agent exists. The agent's old
    /// identity must be revoked first, else the token is refused (`identity_required`).
    pub async fn create_token_for(
        &self,
        uid: InstanceUid,
        name: String,
        ttl: Option<Duration>,
        author: &str,
    ) -> Result<(String, TokenRecord), ServiceError> {
        let (text, mut rec) = self.new_token(name, ttl, None);
        rec.bound_uid = Some(uid);
        self.store.create_token(&rec).await?;
        self.cache_token(rec.clone());
        self.announce_tokens().await;
        self.audit_token_created(author, std::slice::from_ref(&rec.id), &rec)
            .await?;
        Ok((text, rec))
    }

    /// Loads the tokens created since the watermark (less [`TOKEN_SYNC_OVERLAP`]) into the
    /// cache: how a coordinator learns the tokens others created before their agents
    /// connect. Cheap when few are being created: an index range scan that returns only the
    /// tokens created within the overlap.
    pub(crate) async fn sync_tokens(&self) {
        let mut watermark = self.token_watermark.lock().await;
        let overlap = i64::try_from(TOKEN_SYNC_OVERLAP.as_millis()).unwrap_or(i64::MAX);
        let started = now_ms();
        let fresh = match self
            .store
            .tokens_created_since(watermark.saturating_sub(overlap))
            .await
        {
            Ok(fresh) => fresh,
            Err(e) => {
                // The next lease round tries again; misses meanwhile are looked up.
                tracing::warn!(error = %e, "loading new tokens failed");
                return;
            }
        };
        // A token that commits after this read began carries a creation time no earlier than
        // `started` (or the newest one read) less the overlap, as long as clock skew and
        // commit delays stay within it; so the next read starts from the later of the two.
        // (Not from the newest token alone: the overlap's worth of tokens before it would
        // then be read again on every round until a newer one is created.)
        *watermark = fresh
            .iter()
            .map(|t| t.created_ms)
            .fold(watermark.max(started), i64::max);
        let mut fresh = fresh.into_iter();
        loop {
            let Ok(mut c) = self.tokens.write() else {
                return;
            };
            let mut merged = 0;
            for rec in fresh.by_ref().take(TOKEN_SYNC_CHUNK) {
                c.insert(rec);
                merged += 1;
            }
            if merged < TOKEN_SYNC_CHUNK {
                return;
            }
        }
    }

    /// Token cache (hits, misses) of this coordinator's authentications so far.
    pub fn token_cache_stats(&self) -> (u64, u64) {
        (
            self.token_hits.load(Ordering::Relaxed),
            self.token_misses.load(Ordering::Relaxed),
        )
    }

    /// Whether the token with this hash is in this coordinator's cache.
    pub fn token_cached(&self, hash: &[u8; 32]) -> bool {
        self.tokens
            .read()
            .is_ok_and(|c| c.by_hash.contains_key(hash))
    }

    /// Creates `count` tokens in one call (store first, then cache); one audit entry names
    /// them all.
    pub async fn create_tokens(
        &self,
        name: String,
        ttl: Option<Duration>,
        count: u32,
        scope: Option<TokenScope>,
        author: &str,
    ) -> Result<Vec<String>, ServiceError> {
        let (texts, recs): (Vec<String>, Vec<TokenRecord>) = (0..count)
            .map(|_| self.new_token(name.clone(), ttl, scope.clone()))
            .unzip();
        // A commit per chunk, not per token (100,000 commits took minutes and kept the store
        // busy); chunks keep each write short so other writers are not held up long.
        for chunk in recs.chunks(TOKEN_BATCH_CHUNK) {
            self.store.create_tokens(chunk).await?;
        }
        let ids: Vec<String> = recs.iter().map(|r| r.id.clone()).collect();
        let last = recs.last().cloned();
        for rec in recs {
            self.cache_token(rec);
        }
        if let Some(rec) = last {
            self.announce_tokens().await;
            self.audit_token_created(author, &ids, &rec).await?;
        }
        Ok(texts)
    }

    /// Tells the other coordinators that tokens were created (committed, so a sync finds
    /// them). Best effort: their next lease round syncs anyway.
    pub(super) async fn announce_tokens(&self) {
        let _ = self.bus.broadcast(ControlEvent::TokensCreated).await;
    }

    pub(super) fn cache_token(&self, rec: TokenRecord) {
        if let Ok(mut c) = self.tokens.write() {
            c.insert(rec);
        }
    }

    pub(super) fn new_token(
        &self,
        name: String,
        ttl: Option<Duration>,
        scope: Option<TokenScope>,
    ) -> (String, TokenRecord) {
        let text = token::new_bootstrap_token();
        let now = now_ms();
        let ttl = ttl.unwrap_or(self.cfg.default_token_ttl);
        let rec = TokenRecord {
            id: uuid::Uuid::now_v7().simple().to_string(),
            name,
            prefix: token::display_prefix(&text),
            hash: token::hash_token(&text),
            created_ms: now,
            expires_ms: now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
            revoked_ms: None,
            redeemed_ms: None,
            bound_uid: None,
            scope,
        };
        (text, rec)
    }

    pub(super) async fn audit_token_created(
        &self,
        author: &str,
        ids: &[String],
        rec: &TokenRecord,
    ) -> Result<(), ServiceError> {
        self.audit_op(
            author,
            "token.create",
            rec.bound_uid,
            serde_json::json!({
                "token_ids": ids,
                "name": rec.name,
                "expires_ms": rec.expires_ms,
                "scope": rec.scope,
            }),
        )
        .await
    }

    pub async fn revoke_token(&self, id: &str, author: &str) -> Result<(), ServiceError> {
        let now = now_ms();
        if !self.store.revoke_token(id, now).await? {
            return Err(ServiceError::NotFound(format!("token {id}")));
        }
        if let Ok(mut c) = self.tokens.write() {
            c.update(id, |t| {
                t.revoked_ms.get_or_insert(now);
            });
        }
        let _ = self
            .bus
            .broadcast(ControlEvent::TokenChanged {
                token_id: id.to_string(),
            })
            .await;
        let audited = self
            .audit_op(
                author,
                "token.revoke",
                None,
                serde_json::json!({ "token_id": id }),
            )
            .await;
        self.close_token_sessions(id).await;
        audited
    }
}
