//! The audit log as the coordinator writes it: operator changes (a failed write fails the
//! call), agent events, and refused authentications through [`super::refusals`]. Writes are
//! retried; rows are never updated or deleted.
//!
//! What agents report (their description when first seen and whenever it changes) is queued
//! to [`run_agent_audit`] rather than written in the frame's path: a connect storm of
//! thousands of agents becomes a few batched transactions, and no reply waits on a write.

use super::refusals::Refused;
use super::{Coordinator, ServiceError};
use shared::domain::AuditEntry;
use shared::ids::InstanceUid;
use shared::now_ms;
use shared::store::StoreError;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use shared::store::Store;
use tokio::sync::{mpsc, oneshot};

/// Most agent events written in one batch.
pub(super) const AGENT_AUDIT_BATCH: usize = 512;

/// What the agent-audit task is asked to do: write a row, or report once every row queued
/// before has been written (at shutdown).
pub(super) enum AgentAudit {
    Row(AuditEntry),
    Flush(oneshot::Sender<()>),
}

/// Writes queued agent events in batches, retrying a failed batch like any audit write.
pub(super) async fn run_agent_audit(store: Arc<dyn Store>, mut rx: mpsc::Receiver<AgentAudit>) {
    let mut queued = Vec::with_capacity(AGENT_AUDIT_BATCH);
    let mut rows = Vec::with_capacity(AGENT_AUDIT_BATCH);
    while rx.recv_many(&mut queued, AGENT_AUDIT_BATCH).await > 0 {
        let mut flushed = Vec::new();
        for q in queued.drain(..) {
            match q {
                AgentAudit::Row(row) => rows.push(row),
                AgentAudit::Flush(done) => flushed.push(done),
            }
        }
        if !rows.is_empty() {
            if let Err(e) = append_with_retries(store.as_ref(), &rows).await {
                tracing::error!(error = %e, rows = rows.len(), "agent audit write failed");
            }
            rows.clear();
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

/// Writes `rows`, retrying a failed write twice (a database restart, a lost connection);
/// counts writes that still failed.
async fn append_with_retries(store: &dyn Store, rows: &[AuditEntry]) -> Result<(), StoreError> {
    let mut last = None;
    for backoff_ms in [0u64, 50, 250] {
        if backoff_ms > 0 {
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
        }
        // A retry after `MaybeApplied` may write a row twice: better than losing it.
        match store.append_audits(rows).await {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    metrics::counter!("ampora_audit_write_failures_total").increment(1);
    Err(last.unwrap_or_else(|| StoreError::NotApplied("audit write".into())))
}

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

    /// Audits an operator's action outside the API's writes (signing in to the console, out
    /// of it), with the address it came from.
    pub async fn audit_operator(
        &self,
        actor: &str,
        action: &str,
        ip: Option<IpAddr>,
        detail: serde_json::Value,
    ) {
        self.audit(actor, action, None, ip, None, detail).await;
    }

    /// Writes an audit entry, retrying a failed write twice (see [`append_with_retries`]).
    pub(super) async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        append_with_retries(self.store.as_ref(), std::slice::from_ref(entry)).await
    }

    /// Queues an agent event for [`run_agent_audit`]. Waits only when the queue is full, so a
    /// storm slows down rather than losing rows.
    pub(super) async fn audit_agent_event(&self, entry: AuditEntry) {
        if self.agent_audit.send(AgentAudit::Row(entry)).await.is_err() {
            tracing::error!("agent audit task is gone; event not written");
        }
    }

    /// Returns once every agent event queued so far is written (or its write failed).
    pub(super) async fn flush_agent_audit(&self) {
        let (done, written) = oneshot::channel();
        if self.agent_audit.send(AgentAudit::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
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
