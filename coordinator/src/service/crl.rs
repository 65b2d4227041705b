//! The agent CA's revocation list, as served to anyone who asks.
//!
//! `GET /api/v1/identities/crl` needs no credentials (agents and proxies fetch it), so a
//! signed CRL is kept for a few seconds instead of being read and signed per request, and it
//! names only revoked certificates that have not expired yet: an expired certificate fails
//! validation anyway, and leaving it out keeps the list (and every gateway's revoked set) from
//! growing with every identity ever retired.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shared::domain::IdentityRecord;
use shared::now_ms;

use super::{Coordinator, ServiceError};

/// How long one signed CRL is served; a revocation made here drops it at once.
const CRL_CACHE: Duration = Duration::from_secs(10);

/// A signed CRL in both encodings.
#[derive(Debug)]
pub struct SignedCrl {
    pub der: Vec<u8>,
    pub pem: String,
    made: Instant,
}

/// Revoked identities that still matter: not expired yet.
pub(super) fn still_revoked(records: Vec<IdentityRecord>, now: i64) -> Vec<IdentityRecord> {
    records
        .into_iter()
        .filter(|i| i.revoked_ms.is_some() && i.not_after_ms > now)
        .collect()
}

impl Coordinator {
    /// The current CRL (`None` without an agent CA), signed at most every [`CRL_CACHE`].
    pub async fn crl(&self) -> Result<Option<Arc<SignedCrl>>, ServiceError> {
        let Some(ca) = self.cfg.agent_ca.clone() else {
            return Ok(None);
        };
        let mut cached = self.crl_cache.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| c.made.elapsed() < CRL_CACHE) {
            return Ok(Some(c.clone()));
        }
        let revoked = self.revoked_identities().await?;
        // CRL numbers must grow: the signing time in ms does, across coordinators too.
        let number = u64::try_from(now_ms()).unwrap_or_default();
        let signed = tokio::task::spawn_blocking(move || {
            let der = ca.crl(&revoked, number)?;
            let pem = ca.crl_pem(&revoked, number)?;
            Ok::<_, shared::tls::TlsError>((der, pem))
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("signing the CRL: {e}")))?
        .map_err(|e| ServiceError::Internal(format!("signing the CRL: {e}")))?;
        let crl = Arc::new(SignedCrl {
            der: signed.0,
            pem: signed.1,
            made: Instant::now(),
        });
        *cached = Some(crl.clone());
        Ok(Some(crl))
    }

    /// Drops the cached CRL (a revocation was made here).
    pub(super) async fn crl_changed(&self) {
        *self.crl_cache.lock().await = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::ids::InstanceUid;

    fn identity(serial: &str, not_after_ms: i64, revoked_ms: Option<i64>) -> IdentityRecord {
        IdentityRecord {
            serial: serial.into(),
            instance_uid: InstanceUid::new_v7(),
            created_ms: 0,
            not_after_ms,
            confirmed_ms: None,
            revoked_ms,
            fingerprint: String::new(),
            cert_pem: String::new(),
        }
    }

    #[test]
    fn expired_certificates_leave_the_revoked_set() {
        let kept = still_revoked(
            vec![
                identity("01", 2_000, Some(500)),
                identity("02", 999, Some(500)),
                identity("03", 2_000, None),
            ],
            1_000,
        );
        let serials: Vec<&str> = kept.iter().map(|i| i.serial.as_str()).collect();
        assert_eq!(serials, vec!["01"]);
    }
}
