//! The audit log as the coordinator writes it: operator changes (a failed write fails the
//! call), agent events, and refused authentications through [`super::refusals`]. Writes are
//! retried; rows are never updated or deleted.

use super::refusals::Refused;
use super::{Coordinator, ServiceError};
use shared::domain::AuditEntry;
use shared::ids::InstanceUid;
use shared::now_ms;
use shared::store::StoreError;
use std::net::IpAddr;
use std::time::Duration;

impl Coordinator {
    pub(super) async fn audit(
        &self,
        actor: &str,
        action: &str,
        uid: Option<InstanceUid>,
        ip: Option<IpAddr>,
        reason: Option<&str>,
        detail: serde_json::Value,
    ) {
        let entry = AuditEntry {
            id: 0,
            at_ms: now_ms(),
            actor: actor.to_string(),
            action: action.to_string(),
            instance_uid: uid,
            source_ip: ip,
            reason: reason.map(str::to_string),
            detail,
        };
        if let Err(e) = self.append_audit(&entry).await {
            tracing::error!(error = %e, action, "audit write failed");
        }
    }

    /// [`Coordinator::audit`] for an operator's change: the change is already made, so a
    /// failed audit write fails the call (the operator sees an error and can look) instead of
    /// passing unrecorded.
    pub(super) async fn audit_op(
        &self,
        actor: &str,
        action: &str,
        uid: Option<InstanceUid>,
        detail: serde_json::Value,
    ) -> Result<(), ServiceError> {
        let entry = AuditEntry {
            id: 0,
            at_ms: now_ms(),
            actor: actor.to_string(),
            action: action.to_string(),
            instance_uid: uid,
            source_ip: None,
            reason: None,
            detail,
        };
        self.append_audit(&entry).await.map_err(ServiceError::from)
    }

    /// Writes an audit entry, retrying a failed write twice (a database restart, a lost
    /// connection); counts writes that still failed.
    pub(super) async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let mut last = None;
        for backoff_ms in [0u64, 50, 250] {
            if backoff_ms > 0 {
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            }
            // A retry after `MaybeApplied` may write the row twice: better than losing it.
            match self.store.append_audit(entry).await {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        metrics::counter!("ampora_audit_write_failures_total").increment(1);
        Err(last.unwrap_or_else(|| StoreError::NotApplied("audit write".into())))
    }

    /// Counts a refused authentication and audits it (aggregated, see [`refusals`]).
    pub(super) async fn refused(&self, r: Refused) {
        tracing::debug!(source_ip = %r.ip, reason = r.reason, "authentication refused");
        if let Some(row) = self.refusals.note(r, now_ms()) {
            if let Err(e) = self.append_audit(&row).await {
                tracing::error!(error = %e, "audit write failed");
            }
        }
    }

    /// Writes the summary rows of refusal windows that have ended (all of them with
    /// `i64::MAX`, at shutdown).
    pub(super) async fn write_refusal_summaries(&self, now: i64) {
        for row in self.refusals.due(now) {
            if let Err(e) = self.append_audit(&row).await {
                tracing::error!(error = %e, "audit write failed");
            }
        }
    }
}
