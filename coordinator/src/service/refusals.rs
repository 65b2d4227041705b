//! Refused agent authentications: every one counted, their audit aggregated.
//!
//! A refused client may retry as fast as it likes (opamp-go reconnects at once after a server
//! close), and anyone can send token-less requests. One audit row per attempt would let them
//! grow a table that is never deleted from, so rows are per window: the first refusal of a
//! (source address, reason) pair in a window is written at once, with what it presented; the
//! repeats are only counted, and one summary row with their count is written when the window
//! ends. The metric `ampora_auth_failures_total{reason}` still counts every attempt.
//!
//! The set of pairs is bounded: once full, refusals from new sources are folded into one pair
//! per reason without an address, so a spread-out flood costs rows per reason, not per source.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use shared::domain::AuditEntry;
use shared::ids::InstanceUid;

/// Most (source, reason) pairs tracked in one window before new sources are folded together.
const MAX_KEYS: usize = 10_000;

/// The bounded set of reason labels: anything else (a gateway of another version) is `other`.
const REASONS: &[&str] = &[
    "missing_credentials",
    "wrong_scheme",
    "malformed_token",
    "unknown_token",
    "revoked",
    "expired",
    "already_redeemed",
    "identity_required",
    "identity_revoked",
    "plaintext_bootstrap",
    "scope_mismatch",
    "identity_mismatch",
    "uid_taken",
    "bad_csr",
];

/// The reason as a `'static` label from [`REASONS`].
pub fn reason_label(reason: &str) -> &'static str {
    REASONS
        .iter()
        .find(|r| **r == reason)
        .copied()
        .unwrap_or("other")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    /// `None`: folded, the table was full when this source first showed up.
    ip: Option<IpAddr>,
    reason: &'static str,
}

#[derive(Debug)]
struct Window {
    started_ms: i64,
    last_ms: i64,
    /// Refusals after the first one (the first has its own row).
    repeats: u64,
}

/// One refusal to record.
#[derive(Debug, Clone)]
pub struct Refused {
    pub ip: IpAddr,
    pub reason: &'static str,
    /// The agent the refused client claimed to be, if it said: a hint, never proof.
    pub uid_hint: Option<InstanceUid>,
    /// What was presented (token prefix or id, certificate serial); never a secret.
    pub detail: serde_json::Value,
}

/// Per-window aggregation of refusals.
#[derive(Debug)]
pub struct Refusals {
    window_ms: i64,
    /// Open windows by pair. The lock is held only for map updates, never across I/O.
    open: Mutex<HashMap<Key, Window>>,
    /// Summaries of windows that ended between two [`Refusals::due`] calls and were replaced
    /// by a new window of the same pair before `due` saw them.
    carried: Mutex<Vec<AuditEntry>>,
}

impl Refusals {
    pub fn new(window: std::time::Duration) -> Self {
        Self {
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX).max(1),
            open: Mutex::new(HashMap::new()),
            carried: Mutex::new(Vec::new()),
        }
    }

    /// Counts `r`; the audit row to write now when it opens a window, else `None`.
    pub fn note(&self, r: Refused, now_ms: i64) -> Option<AuditEntry> {
        metrics::counter!("ampora_auth_failures_total", "reason" => r.reason).increment(1);
        let mut open = self.open.lock().ok()?;
        let mut key = Key {
            ip: Some(r.ip),
            reason: r.reason,
        };
        if !open.contains_key(&key) && open.len() >= MAX_KEYS {
            key.ip = None;
        }
        if let Some(w) = open.get_mut(&key) {
            if now_ms < w.started_ms + self.window_ms {
                w.repeats += 1;
                w.last_ms = now_ms;
                return None;
            }
        }
        // A new window. An ended one it replaces may still hold uncounted repeats: keep its
        // summary for the next `due`.
        let closed = open.insert(
            key,
            Window {
                started_ms: now_ms,
                last_ms: now_ms,
                repeats: 0,
            },
        );
        drop(open);
        if let Some(w) = closed.filter(|w| w.repeats > 0) {
            self.pending_summary(key, w);
        }
        let mut detail = match r.detail {
            serde_json::Value::Object(m) => m,
            serde_json::Value::Null => serde_json::Map::new(),
            other => {
                let mut m = serde_json::Map::new();
                m.insert("presented".into(), other);
                m
            }
        };
        if let Some(uid) = r.uid_hint {
            detail.insert("uid_hint".into(), uid.to_string().into());
        }
        detail.insert("count".into(), 1.into());
        if key.ip.is_none() {
            detail.insert("source_ip".into(), r.ip.to_string().into());
            detail.insert("folded".into(), true.into());
        }
        Some(entry(
            key,
            r.reason,
            now_ms,
            serde_json::Value::Object(detail),
        ))
    }

    /// Summary rows of the windows that have ended with repeats in them; those windows are
    /// closed. Call it periodically (more often than the window) and at shutdown with
    /// `now_ms = i64::MAX` to write everything.
    pub fn due(&self, now_ms: i64) -> Vec<AuditEntry> {
        let Ok(mut open) = self.open.lock() else {
            return Vec::new();
        };
        let mut rows = Vec::new();
        open.retain(|key, w| {
            let ended = now_ms >= w.started_ms.saturating_add(self.window_ms);
            if ended && w.repeats > 0 {
                rows.push(summary(*key, w, self.window_ms));
            }
            !ended
        });
        if let Ok(mut p) = self.carried.lock() {
            rows.append(&mut p);
        }
        rows
    }

    fn pending_summary(&self, key: Key, w: Window) {
        if let Ok(mut p) = self.carried.lock() {
            p.push(summary(key, &w, self.window_ms));
        }
    }
}

fn summary(key: Key, w: &Window, window_ms: i64) -> AuditEntry {
    let detail = serde_json::json!({
        "count": w.repeats,
        "repeats": true,
        "window_secs": window_ms / 1000,
        "first_ms": w.started_ms,
        "last_ms": w.last_ms,
        "folded": key.ip.is_none(),
    });
    entry(key, key.reason, w.last_ms, detail)
}

fn entry(key: Key, reason: &str, at_ms: i64, detail: serde_json::Value) -> AuditEntry {
    AuditEntry {
        id: 0,
        at_ms,
        actor: "agent".into(),
        action: "auth.failed".into(),
        instance_uid: None,
        source_ip: key.ip,
        reason: Some(reason.to_string()),
        detail,
    }
}
