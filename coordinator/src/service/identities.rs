//! Agent identities (mTLS certificates from the agent CA): the cache and its syncs,
//! authentication by certificate, issuance (offered once per change, a generated key only
//! over TLS and never kept), confirmation, renewal, revocation and retirement.

use super::{crl, issuance, Coordinator, Entry, ServiceError};
use crate::session::IdentityOffer;
use shared::bus::{
    AgentFrame, AuthDecision, AuthFailure, ControlEvent, Credential, GatewayMessage,
};
use shared::domain::IdentityRecord;
use shared::ids::InstanceUid;
use shared::now_ms;
use shared::store::StoreError;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// How often a coordinator reads the identities changed in the store since its last look, the
/// safety net for lost confirmation and revocation broadcasts (each of which reads its one
/// identity at once); gateways refresh their revoked set this often too.
pub(super) const IDENTITY_SYNC_INTERVAL: Duration = Duration::from_secs(30);

/// How far back from its last look an identity sync reads again: changes are stamped with
/// the clock of the coordinator that made them, which may be behind, and may commit late.
pub(super) const IDENTITY_SYNC_OVERLAP: Duration = Duration::from_secs(30);

impl Coordinator {
    /// Merges the identities issued, confirmed or revoked since the last sync (less
    /// [`IDENTITY_SYNC_OVERLAP`]) into the cache: only what changed, not the whole table with
    /// a certificate per agent. A failed read is retried from the same point next time.
    pub(crate) async fn sync_identities(&self) {
        let mut watermark = self.identity_watermark.lock().await;
        let started = now_ms();
        let overlap = i64::try_from(IDENTITY_SYNC_OVERLAP.as_millis()).unwrap_or(i64::MAX);
        match self
            .store
            .identities_changed_since(watermark.saturating_sub(overlap))
            .await
        {
            Ok(changed) => {
                self.merge_identities(changed);
                *watermark = started;
            }
            Err(e) => tracing::warn!(error = %e, "loading changed identities failed"),
        }
    }

    /// Puts identities read from the store into the cache. Confirmation and revocation only
    /// ever get set: a read that raced with a local change must not undo it.
    pub(super) fn merge_identities(&self, records: impl IntoIterator<Item = IdentityRecord>) {
        let Ok(mut c) = self.identities.write() else {
            return;
        };
        for record in records {
            let ids = c.entry(record.instance_uid).or_default();
            match ids.iter_mut().find(|i| i.serial == record.serial) {
                Some(i) => {
                    i.confirmed_ms = i.confirmed_ms.or(record.confirmed_ms);
                    i.revoked_ms = i.revoked_ms.or(record.revoked_ms);
                }
                // In creation order, as the newest-last lookups expect.
                None => {
                    let at = ids.partition_point(|i| i.created_ms <= record.created_ms);
                    ids.insert(at, record);
                }
            }
        }
    }

    pub(super) fn identity(&self, serial: &str, uid: InstanceUid) -> Option<IdentityRecord> {
        let cache = self.identities.read().ok()?;
        cache
            .get(&uid)?
            .iter()
            .find(|i| i.serial == serial)
            .cloned()
    }

    /// Identity `serial` as the store has it, merged into the cache (another coordinator
    /// issued or confirmed it); `None` when the store does not have it.
    pub(super) async fn load_identity(
        &self,
        serial: &str,
    ) -> Result<Option<IdentityRecord>, StoreError> {
        let Some(record) = self.store.get_identity(serial).await.inspect_err(|e| {
            tracing::warn!(error = %e, "identity lookup failed");
        })?
        else {
            return Ok(None);
        };
        self.merge_identities([record.clone()]);
        Ok(Some(record))
    }

    /// True when `uid` has a live identity it has connected with: bootstrap tokens are then
    /// refused for it.
    pub(super) fn identity_confirmed(&self, uid: InstanceUid) -> bool {
        self.identities.read().is_ok_and(|c| {
            c.get(&uid).is_some_and(|ids| {
                ids.iter()
                    .any(|i| i.confirmed_ms.is_some() && i.revoked_ms.is_none())
            })
        })
    }

    /// The newest live identity of `uid` that is not due for renewal (two thirds of its
    /// validity left behind).
    pub(super) fn current_identity(&self, uid: InstanceUid, now: i64) -> Option<IdentityRecord> {
        let cache = self.identities.read().ok()?;
        let newest = cache
            .get(&uid)?
            .iter()
            .rev()
            .find(|i| i.revoked_ms.is_none())?;
        let renew_at = newest.created_ms + (newest.not_after_ms - newest.created_ms) * 2 / 3;
        (now < renew_at).then(|| newest.clone())
    }

    /// A certificate the gateway verified: its identity must be known here and not revoked
    /// (the gateway's revocation set may lag by a broadcast). In a cluster, one unknown here
    /// was usually issued a moment ago by another coordinator, before this one's next reload
    /// (the agent reconnects with it at once), so it is looked up in the store.
    pub(super) async fn check_certificate(&self, uid: InstanceUid, serial: &str) -> AuthDecision {
        let known = match self.identity(serial, uid) {
            Some(i) => Some(i),
            None => match self.load_identity(serial).await {
                Ok(found) => found.filter(|i| i.instance_uid == uid),
                // A certificate the gateway verified may well be good: "retry later".
                Err(_) => return AuthDecision::Unavailable,
            },
        };
        match known {
            Some(i) if i.revoked_ms.is_none() => AuthDecision::Accept(Credential::Certificate {
                uid,
                serial: serial.to_string(),
            }),
            _ => AuthDecision::Reject(AuthFailure::IdentityRevoked),
        }
    }

    /// Issues a new identity for `uid` (from `csr` when the agent sent one), stores and
    /// audits it. `Err(message)` for a bad CSR: the agent gets `BadRequest` (facts §5.3).
    pub(super) async fn issue_identity(
        &self,
        uid: InstanceUid,
        csr: Option<&str>,
        source_ip: IpAddr,
    ) -> Result<Option<IdentityOffer>, String> {
        let Some(ca) = self.cfg.agent_ca.clone() else {
            return Ok(None);
        };
        let validity = self.cfg.identity_validity;
        let csr_owned = csr.map(str::to_string);
        // Key generation and signing are CPU work; keep them off the async workers.
        let issued = tokio::task::spawn_blocking(move || {
            ca.issue(uid, csr_owned.as_deref(), validity)
                .map(|i| (i, ca.ca_pem().to_string()))
        })
        .await;
        let (issued, ca_pem) = match issued {
            Ok(Ok(pair)) => pair,
            Ok(Err(gateway::tls::IssueError::BadCsr(m))) => return Err(m),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "issuing an identity failed");
                return Ok(None);
            }
            Err(e) => {
                tracing::error!(error = %e, "issuing an identity failed");
                return Ok(None);
            }
        };
        let record = IdentityRecord {
            serial: issued.serial.clone(),
            instance_uid: uid,
            created_ms: now_ms(),
            not_after_ms: issued.not_after_ms,
            confirmed_ms: None,
            revoked_ms: None,
            fingerprint: issued.fingerprint.clone(),
            cert_pem: issued.cert_pem.clone(),
        };
        if let Err(e) = self.store.create_identity(&record).await {
            tracing::error!(error = %e, "storing an identity failed");
            return Ok(None);
        }
        let superseded = match self.identities.write() {
            Ok(mut c) => {
                let ids = c.entry(uid).or_default();
                let stale = ids
                    .iter()
                    .filter(|i| i.confirmed_ms.is_none() && i.revoked_ms.is_none())
                    .map(|i| i.serial.clone())
                    .collect::<Vec<_>>();
                ids.push(record);
                stale
            }
            Err(_) => Vec::new(),
        };
        self.audit(
            "agent",
            "identity.issue",
            Some(uid),
            Some(source_ip),
            None,
            serde_json::json!({ "serial": issued.serial, "csr": csr.is_some() }),
        )
        .await;
        for serial in superseded {
            self.retire_identity(uid, &serial, "superseded").await;
        }
        Ok(Some(IdentityOffer {
            serial: issued.serial,
            cert_pem: issued.cert_pem,
            ca_pem,
            private_key_pem: issued.private_key_pem,
        }))
    }

    /// The identity to offer this agent on this frame: the one it holds, or a new one when it
    /// came in with a bootstrap token and accepts OpAMP connection settings but has none
    /// (or it is due for renewal, or it sent a CSR).
    pub(super) async fn identity_offer(
        &self,
        entry: &mut Entry,
        frame: &AgentFrame,
        uid: InstanceUid,
        new_conn: bool,
    ) -> Result<(), String> {
        let msg = &frame.msg;
        let caps = if msg.capabilities != 0 {
            msg.capabilities
        } else {
            entry.state.record.capabilities
        };
        if caps & proto::agent_caps::ACCEPTS_OPAMP_CONNECTION_SETTINGS == 0
            || msg.agent_disconnect.is_some()
        {
            return Ok(());
        }
        let csr = msg
            .connection_settings_request
            .as_ref()
            .and_then(|r| r.opamp.as_ref())
            .and_then(|o| o.certificate_request.as_ref())
            .map(|c| String::from_utf8_lossy(&c.csr).into_owned());
        if self.cfg.agent_ca.is_none() {
            // Say so, rather than leave the agent waiting for a certificate that never comes.
            return match csr {
                Some(_) => Err("not supported here: no agent CA is configured".into()),
                None => Ok(()),
            };
        }
        let current = self.current_identity(uid, now_ms());
        let offers = |e: &Entry, c: &IdentityRecord| {
            e.identity.as_ref().is_some_and(|i| i.serial == c.serial)
        };
        match (&csr, &current) {
            (Some(csr), Some(c)) => {
                // The key of the current certificate again: nothing new to sign.
                if issuance::same_key(csr, &c.cert_pem)? {
                    if !offers(entry, c) {
                        entry.identity = self.repeat_offer(c);
                    }
                    return Ok(());
                }
            }
            (Some(csr), None) => issuance::check_csr(csr)?,
            (None, Some(c)) => {
                let using = matches!(&frame.credential,
                    Credential::Certificate { serial, .. } if *serial == c.serial);
                // Its generated key is here, not sent yet (or sent on this very connection:
                // the agent has yet to switch).
                let key_pending = offers(entry, c)
                    && entry
                        .identity
                        .as_ref()
                        .is_some_and(|i| i.private_key_pem.is_some());
                // Back on a new connection without it, after its key went out (or was never
                // known here: a restart, another coordinator): the agent lost it, and a key is
                // never kept to be sent again.
                let lost = !using && new_conn && !key_pending && c.confirmed_ms.is_none();
                if !lost {
                    if !offers(entry, c) {
                        entry.identity = self.repeat_offer(c);
                    }
                    return Ok(());
                }
            }
            (None, None) => {}
        }
        // A generated private key never travels over plaintext.
        if csr.is_none() && !frame.secure {
            return Ok(());
        }
        let now = now_ms();
        if !issuance::allowed(&mut entry.issued_ms, now) {
            metrics::counter!("ampora_identity_issue_throttled_total").increment(1);
            return Ok(());
        }
        if let Some(offer) = self
            .issue_identity(uid, csr.as_deref(), frame.source_ip)
            .await?
        {
            entry.identity = Some(offer);
            entry.issued_ms.push(now);
        }
        Ok(())
    }

    /// An offer repeating identity `c` (its certificate; the key is never kept).
    pub(super) fn repeat_offer(&self, c: &IdentityRecord) -> Option<IdentityOffer> {
        let ca = self.cfg.agent_ca.as_ref()?;
        Some(IdentityOffer {
            serial: c.serial.clone(),
            cert_pem: c.cert_pem.clone(),
            ca_pem: ca.ca_pem().to_string(),
            private_key_pem: None,
        })
    }

    /// Marks the identity confirmed on its first mTLS frame (facts §5.1 step 7): from then on
    /// bootstrap tokens are refused for the agent.
    pub(super) async fn confirm_identity(&self, uid: InstanceUid, serial: &str, source_ip: IpAddr) {
        let confirmed = self
            .identity(serial, uid)
            .is_some_and(|i| i.confirmed_ms.is_some());
        if confirmed {
            return;
        }
        let at = now_ms();
        match self.store.confirm_identity(serial, at).await {
            Ok(_) => {
                // The agent's other live identities are older (a newer one would have been
                // offered instead of this): they go now that this one works.
                let replaced = match self.identities.write() {
                    Ok(mut c) => c.get_mut(&uid).map_or_else(Vec::new, |ids| {
                        if let Some(i) = ids.iter_mut().find(|i| i.serial == serial) {
                            i.confirmed_ms.get_or_insert(at);
                        }
                        ids.iter()
                            .filter(|i| i.serial != serial && i.revoked_ms.is_none())
                            .map(|i| i.serial.clone())
                            .collect()
                    }),
                    Err(_) => Vec::new(),
                };
                for old in replaced {
                    self.retire_identity(uid, &old, "replaced").await;
                }
                // The other coordinators refuse the bootstrap token from now on too, not only
                // after their next full reload (this one hears it as well, in case it did not
                // hold the record).
                let event = ControlEvent::IdentityConfirmed {
                    serial: serial.to_string(),
                };
                if let Err(e) = self.bus.broadcast(event).await {
                    tracing::warn!(error = %e, "identity confirmation broadcast failed");
                }
                self.audit(
                    "agent",
                    "identity.confirm",
                    Some(uid),
                    Some(source_ip),
                    None,
                    serde_json::json!({ "serial": serial }),
                )
                .await;
            }
            Err(e) => tracing::error!(error = %e, "confirming an identity failed"),
        }
    }

    /// Every identity, oldest first.
    pub async fn identities(&self) -> Result<Vec<IdentityRecord>, ServiceError> {
        Ok(self.store.list_identities().await?)
    }

    pub async fn get_identity(&self, serial: &str) -> Result<IdentityRecord, ServiceError> {
        self.store
            .get_identity(serial)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("identity {serial}")))
    }

    /// Revokes an identity: stored, audited, broadcast (gateways refuse it at the handshake
    /// from then on) and the agent's live connection closed.
    pub async fn revoke_identity(&self, serial: &str, author: &str) -> Result<(), ServiceError> {
        let identity = self.get_identity(serial).await?;
        self.store.revoke_identity(serial, now_ms()).await?;
        self.crl_changed().await;
        self.load_identity(serial).await?;
        // The revocation stands whatever happens to its audit row; its error is returned
        // once the gateways have been told.
        let audited = self
            .audit_op(
                author,
                "identity.revoke",
                Some(identity.instance_uid),
                serde_json::json!({ "serial": serial }),
            )
            .await;
        if let Err(e) = self
            .bus
            .broadcast(ControlEvent::IdentityRevoked {
                serial: serial.to_string(),
            })
            .await
        {
            tracing::warn!(error = %e, "identity revocation broadcast failed");
        }
        match self.ownership.lookup(identity.instance_uid).await {
            Ok(Some(owner)) => {
                let close = GatewayMessage::Close {
                    uid: identity.instance_uid,
                    epoch: owner.epoch,
                    reason: "auth: identity revoked".into(),
                };
                if let Err(e) = self.bus.deliver(&owner.gateway, close).await {
                    tracing::warn!(error = %e, "closing a revoked agent failed");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "ownership lookup failed"),
        }
        audited
    }

    /// Revokes an identity that a newer one of the same agent makes redundant: `superseded`,
    /// issued but never used (an agent that came back with its token before switching to its
    /// certificate gets a new one, as a server-generated key cannot be sent twice), or
    /// `replaced`, once the agent has connected with its renewed certificate (facts §5.1
    /// step 7: the old credentials go). Unlike [`revoke_identity`](Self::revoke_identity) no
    /// connection is closed: the agent is on its current credentials.
    pub(super) async fn retire_identity(&self, uid: InstanceUid, serial: &str, reason: &str) {
        let at = now_ms();
        if let Err(e) = self.store.revoke_identity(serial, at).await {
            tracing::warn!(error = %e, "revoking a superseded identity failed");
            return;
        }
        self.crl_changed().await;
        if let Ok(mut c) = self.identities.write() {
            if let Some(i) = c
                .get_mut(&uid)
                .and_then(|ids| ids.iter_mut().find(|i| i.serial == serial))
            {
                i.revoked_ms.get_or_insert(at);
            }
        }
        self.audit(
            "agent",
            "identity.revoke",
            Some(uid),
            None,
            None,
            serde_json::json!({ "serial": serial, "reason": reason }),
        )
        .await;
        let event = ControlEvent::IdentityRevoked {
            serial: serial.to_string(),
        };
        if let Err(e) = self.bus.broadcast(event).await {
            tracing::warn!(error = %e, "identity revocation broadcast failed");
        }
    }

    /// Revoked identities not expired yet, for a CRL: (serial, revoked at ms).
    pub async fn revoked_identities(&self) -> Result<Vec<(String, i64)>, ServiceError> {
        let revoked = self.store.revoked_identities().await?;
        Ok(crl::still_revoked(revoked, now_ms())
            .into_iter()
            .filter_map(|i| i.revoked_ms.map(|at| (i.serial, at)))
            .collect())
    }

    pub fn agent_ca(&self) -> Option<&Arc<gateway::tls::AgentCa>> {
        self.cfg.agent_ca.as_ref()
    }
}
