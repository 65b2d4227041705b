//! The audit log: append, query, scan with cursors, and the append-only probe.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::json;
use shared::domain::AuditEntry;
use shared::ids::InstanceUid;
use shared::store::{AuditCursor, AuditQuery, Store};

use super::unique;

/// Audit: append returns growing ids; queries filter and order strictly.
pub async fn audit(store: &dyn Store) {
    // A random window far from real timestamps, so earlier runs do not interfere.
    let base: i64 = 3_000_000_000_000 + rand::random_range(0..1_000_000_000_000i64) * 16;
    let (actor_a, actor_b) = (unique("actor-a"), unique("actor-b"));
    let reason = unique("reason");
    let (uid, other_uid) = (InstanceUid::new_v7(), InstanceUid::new_v7());
    let entry = |at: i64,
                 actor: &str,
                 uid: Option<InstanceUid>,
                 reason: Option<&str>,
                 ip: Option<IpAddr>,
                 detail: serde_json::Value| AuditEntry {
        id: 0,
        at_ms: base + at,
        actor: actor.to_string(),
        action: unique("action"),
        instance_uid: uid,
        source_ip: ip,
        reason: reason.map(str::to_string),
        detail,
    };
    let v4 = Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)));
    let v6 = Some(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)));
    let mut entries = vec![
        entry(0, &actor_a, Some(uid), None, v4, json!({"k": 1})),
        entry(1, &actor_a, None, Some(&reason), v6, json!(null)),
        entry(
            2,
            &actor_b,
            Some(uid),
            Some(&reason),
            None,
            json!({"a": [1, {"b": "c"}]}),
        ),
        entry(3, &actor_a, Some(uid), Some(&reason), v4, json!("text")),
        entry(4, &actor_b, None, None, None, json!({})),
        entry(
            5,
            &actor_a,
            Some(other_uid),
            Some(&reason),
            v6,
            json!([1, 2]),
        ),
        // Same time as the previous one: the later append is the newer.
        entry(5, &actor_a, None, None, None, json!({"tie": true})),
    ];
    let mut last = None;
    for e in &mut entries {
        e.id = 12_345; // ignored by append_audit
        let id = store.append_audit(e).await.expect("append_audit");
        if let Some(prev) = last {
            assert!(id > prev, "audit ids must grow: {prev} then {id}");
        }
        last = Some(id);
        e.id = id;
    }
    let pick = |idx: &[usize]| idx.iter().map(|&i| entries[i].clone()).collect::<Vec<_>>();
    let run = |q: AuditQuery| async move { store.query_audit(&q).await.expect("query_audit") };
    let q = AuditQuery {
        limit: 100,
        ..AuditQuery::default()
    };

    assert_eq!(
        run(AuditQuery {
            since_ms: Some(base + 1),
            until_ms: Some(base + 4),
            ..q.clone()
        })
        .await,
        pick(&[3, 2, 1]),
        "time window alone; since inclusive, until exclusive"
    );
    assert_eq!(
        run(AuditQuery {
            since_ms: Some(base),
            until_ms: Some(base + 6),
            ..q.clone()
        })
        .await,
        pick(&[6, 5, 4, 3, 2, 1, 0]),
        "the whole window, newest first, ties by append order"
    );
    assert_eq!(
        run(AuditQuery {
            actor: Some(actor_a.clone()),
            ..q.clone()
        })
        .await,
        pick(&[6, 5, 3, 1, 0]),
        "by actor"
    );
    assert_eq!(
        run(AuditQuery {
            instance_uid: Some(uid),
            ..q.clone()
        })
        .await,
        pick(&[3, 2, 0]),
        "by instance uid"
    );
    assert_eq!(
        run(AuditQuery {
            reason: Some(reason.clone()),
            ..q.clone()
        })
        .await,
        pick(&[5, 3, 2, 1]),
        "by reason"
    );
    assert_eq!(
        run(AuditQuery {
            actor: Some(actor_a.clone()),
            reason: Some(reason.clone()),
            instance_uid: Some(uid),
            ..q.clone()
        })
        .await,
        pick(&[3]),
        "all filters combined"
    );
    assert_eq!(
        run(AuditQuery {
            since_ms: Some(base + 1),
            until_ms: Some(base + 6),
            actor: Some(actor_b.clone()),
            ..q.clone()
        })
        .await,
        pick(&[4, 2]),
        "window and actor"
    );
    assert_eq!(
        run(AuditQuery {
            since_ms: Some(base + 5),
            actor: Some(actor_a.clone()),
            ..q.clone()
        })
        .await,
        pick(&[6, 5]),
        "since only"
    );
    assert_eq!(
        run(AuditQuery {
            until_ms: Some(base + 1),
            actor: Some(actor_a.clone()),
            ..q.clone()
        })
        .await,
        pick(&[0]),
        "until only"
    );
    assert_eq!(
        run(AuditQuery {
            actor: Some(actor_a.clone()),
            limit: 2,
            ..q.clone()
        })
        .await,
        pick(&[6, 5]),
        "limit keeps the newest"
    );
    assert_eq!(
        run(AuditQuery {
            actor: Some(actor_a.clone()),
            limit: 0,
            ..q.clone()
        })
        .await,
        Vec::<AuditEntry>::new(),
        "limit 0 yields nothing"
    );
    assert_eq!(
        run(AuditQuery {
            actor: Some(unique("nobody")),
            ..q.clone()
        })
        .await,
        Vec::<AuditEntry>::new(),
        "unknown actor"
    );
    // Unfiltered queries are newest first too.
    let newest = run(q.clone()).await;
    assert!(newest
        .windows(2)
        .all(|w| (w[0].at_ms, w[0].id) > (w[1].at_ms, w[1].id)));
}

/// `scan_audit`: oldest first, the same filters as `query_audit`, and cursor paging that
/// visits every match exactly once.
pub async fn audit_scan(store: &dyn Store) {
    let base: i64 = 3_000_000_000_000 + rand::random_range(0..1_000_000_000_000i64) * 16;
    let (actor_a, actor_b) = (unique("scan-a"), unique("scan-b"));
    let reason = unique("scan-reason");
    let uid = InstanceUid::new_v7();
    let mut entries = Vec::new();
    // Times out of append order, and ties, so order by (at_ms, id) is really exercised.
    for (i, at) in [3, 0, 2, 2, 5, 1, 2, 4].into_iter().enumerate() {
        let mut e = AuditEntry {
            id: 0,
            at_ms: base + at,
            actor: if i % 2 == 0 { &actor_a } else { &actor_b }.clone(),
            action: unique("action"),
            instance_uid: (i % 3 == 0).then_some(uid),
            source_ip: None,
            reason: (i % 4 != 1).then(|| reason.clone()),
            detail: json!({ "i": i }),
        };
        e.id = store.append_audit(&e).await.expect("append_audit");
        entries.push(e);
    }
    let oldest_first = |pred: &dyn Fn(&AuditEntry) -> bool| {
        let mut v: Vec<AuditEntry> = entries.iter().filter(|e| pred(e)).cloned().collect();
        v.sort_by_key(|e| (e.at_ms, e.id));
        v
    };
    let scan = |q: AuditQuery, after: Option<AuditCursor>| async move {
        store.scan_audit(&q, after).await.expect("scan_audit")
    };
    let ours = AuditQuery {
        since_ms: Some(base),
        until_ms: Some(base + 6),
        limit: 100,
        ..AuditQuery::default()
    };
    let all = oldest_first(&|_| true);
    assert_eq!(
        scan(ours.clone(), None).await,
        all,
        "the window, oldest first"
    );
    assert_eq!(
        scan(
            AuditQuery {
                actor: Some(actor_b.clone()),
                ..ours.clone()
            },
            None
        )
        .await,
        oldest_first(&|e| e.actor == actor_b),
        "by actor"
    );
    assert_eq!(
        scan(
            AuditQuery {
                instance_uid: Some(uid),
                reason: Some(reason.clone()),
                since_ms: None,
                until_ms: None,
                ..ours.clone()
            },
            None
        )
        .await,
        oldest_first(&|e| e.instance_uid == Some(uid) && e.reason.as_ref() == Some(&reason)),
        "by instance uid and reason"
    );
    assert_eq!(
        scan(
            AuditQuery {
                since_ms: Some(base + 2),
                until_ms: Some(base + 4),
                ..ours.clone()
            },
            None
        )
        .await,
        oldest_first(&|e| (base + 2..base + 4).contains(&e.at_ms)),
        "since inclusive, until exclusive"
    );
    assert_eq!(
        scan(
            AuditQuery {
                limit: 0,
                ..ours.clone()
            },
            None
        )
        .await,
        Vec::<AuditEntry>::new(),
        "limit 0 yields nothing"
    );

    // Pages of three, each after the last entry of the one before, through a tie at base + 2.
    let mut paged = Vec::new();
    let mut cursor = None;
    loop {
        let page = scan(
            AuditQuery {
                limit: 3,
                ..ours.clone()
            },
            cursor,
        )
        .await;
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        cursor = Some(AuditCursor::after(last));
        paged.extend(page);
    }
    assert_eq!(paged, all, "paging visits every entry once, in order");
    // A cursor in the middle of a tie resumes right after that entry.
    let tie: Vec<&AuditEntry> = all.iter().filter(|e| e.at_ms == base + 2).collect();
    assert_eq!(tie.len(), 3);
    let rest = scan(ours.clone(), Some(AuditCursor::after(tie[0]))).await;
    assert_eq!(rest.first(), Some(tie[1]));
    assert_eq!(
        rest.len(),
        all.len() - all.iter().position(|e| e == tie[0]).unwrap_or(0) - 1
    );
}

/// Appends one entry with a unique actor, for each store's own append-only test; check it
/// afterwards with [`assert_audit_intact`].
pub async fn audit_probe(store: &dyn Store) -> AuditEntry {
    let mut entry = AuditEntry {
        id: 0,
        at_ms: 1_700_000_000_000,
        actor: unique("probe"),
        action: "probe".into(),
        instance_uid: Some(InstanceUid::new_v7()),
        source_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        reason: Some("probe".into()),
        detail: json!({ "kept": true }),
    };
    entry.id = store.append_audit(&entry).await.expect("append_audit");
    entry
}

/// The entry [`audit_probe`] appended is still there, unchanged, and alone under its actor.
pub async fn assert_audit_intact(store: &dyn Store, entry: &AuditEntry) {
    let found = store
        .query_audit(&AuditQuery {
            actor: Some(entry.actor.clone()),
            limit: 10,
            ..AuditQuery::default()
        })
        .await
        .expect("query_audit");
    assert_eq!(found, vec![entry.clone()], "the audit entry is intact");
}

/// A batch append writes every entry, in order, as one append each would.
pub async fn audit_batch(store: &dyn Store) {
    let base: i64 = 3_000_000_000_000 + rand::random_range(0..1_000_000_000_000i64) * 16;
    let actor = unique("batch-actor");
    let uid = InstanceUid::new_v7();
    let entries: Vec<AuditEntry> = (0..700)
        .map(|i| AuditEntry {
            id: 0,
            at_ms: base,
            actor: actor.clone(),
            action: "agent.described".into(),
            instance_uid: Some(uid),
            source_ip: Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7))),
            reason: None,
            detail: json!({ "n": i, "text": "<b>\u{0}</b>" }),
        })
        .collect();
    store.append_audits(&[]).await.expect("empty batch");
    store.append_audits(&entries).await.expect("append batch");
    let query = AuditQuery {
        actor: Some(actor),
        limit: 1_000,
        ..AuditQuery::default()
    };
    let got = store.query_audit(&query).await.expect("query");
    assert_eq!(
        got.len(),
        entries.len(),
        "every entry of the batch is written"
    );
    // Newest first, ids growing in batch order: the last appended comes first.
    let ns: Vec<i64> = got
        .iter()
        .rev()
        .map(|e| e.detail["n"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(ns, (0..700).collect::<Vec<i64>>(), "in batch order");
    let first = &got[got.len() - 1];
    assert_eq!(first.instance_uid, Some(uid));
    assert_eq!(first.detail["text"], "<b>\u{0}</b>");
}
