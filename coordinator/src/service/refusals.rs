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
    /// What the repeats presented (token prefixes, certificate serials), a few distinct
    /// ones, so the summary says which credentials were tried.
    presented: Vec<serde_json::Value>,
}

/// Distinct presented credentials kept per window.
const MAX_SAMPLES: usize = 5;

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
        // What was presented, as the row (or the window's samples) shows it.
        let mut presented = match r.detail {
            serde_json::Value::Object(m) => m,
            serde_json::Value::Null => serde_json::Map::new(),
            other => serde_json::Map::from_iter([("presented".to_string(), other)]),
        };
        if let Some(uid) = r.uid_hint {
            presented.insert("uid_hint".into(), uid.to_string().into());
        }
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
                let sample = serde_json::Value::Object(presented);
                if w.presented.len() < MAX_SAMPLES && !w.presented.contains(&sample) {
                    w.presented.push(sample);
                }
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
                presented: Vec::new(),
            },
        );
        drop(open);
        if let Some(w) = closed.filter(|w| w.repeats > 0) {
            self.pending_summary(key, w);
        }
        let mut detail = presented;
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
        "presented": w.presented,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn refused(ip: &str, reason: &'static str) -> Refused {
        Refused {
            ip: ip.parse().expect("ip"),
            reason,
            uid_hint: None,
            detail: serde_json::json!({ "token": "amp-bs.ab" }),
        }
    }

    fn count(rows: &[AuditEntry]) -> u64 {
        rows.iter()
            .map(|r| r.detail["count"].as_u64().unwrap_or(0))
            .sum()
    }

    #[test]
    fn repeats_in_a_window_become_one_summary_row() {
        let r = Refusals::new(Duration::from_secs(60));
        let first = r.note(refused("10.0.0.1", "unknown_token"), 1_000);
        assert!(first.is_some(), "the first refusal is written at once");
        for t in 0..99 {
            assert!(r
                .note(refused("10.0.0.1", "unknown_token"), 1_001 + t)
                .is_none());
        }
        // Another reason or source opens its own window.
        assert!(r.note(refused("10.0.0.1", "expired"), 1_200).is_some());
        assert!(r
            .note(refused("10.0.0.2", "unknown_token"), 1_200)
            .is_some());
        assert!(r.due(50_000).is_empty(), "nothing before the window ends");
        let summary = r.due(61_000);
        assert_eq!(summary.len(), 1, "only windows with repeats: {summary:?}");
        assert_eq!(count(&summary), 99);
        assert_eq!(count(&[first.expect("row")]) + count(&summary), 100);
        assert!(r.due(i64::MAX).is_empty(), "each window is summarised once");
    }

    #[test]
    fn a_window_replaced_before_due_keeps_its_count() {
        let r = Refusals::new(Duration::from_secs(1));
        r.note(refused("10.0.0.1", "revoked"), 0);
        r.note(refused("10.0.0.1", "revoked"), 10);
        // The next window opens before `due` ran.
        assert!(r.note(refused("10.0.0.1", "revoked"), 5_000).is_some());
        assert_eq!(count(&r.due(5_001)), 1);
    }

    #[test]
    fn sources_beyond_the_cap_are_folded_per_reason() {
        let r = Refusals::new(Duration::from_secs(60));
        for i in 0..MAX_KEYS {
            let ip = std::net::IpAddr::from(std::net::Ipv6Addr::from(i as u128 + 1));
            let mut x = refused("::1", "unknown_token");
            x.ip = ip;
            r.note(x, 0);
        }
        let folded = r.note(refused("10.9.9.9", "unknown_token"), 1);
        let row = folded.expect("the first folded refusal is written");
        assert_eq!(row.source_ip, None);
        assert_eq!(row.detail["folded"], true);
        assert!(r.note(refused("10.9.9.8", "unknown_token"), 2).is_none());
    }

    #[test]
    fn unknown_reasons_are_one_label() {
        assert_eq!(reason_label("revoked"), "revoked");
        assert_eq!(reason_label("anything\nelse"), "other");
    }
}
