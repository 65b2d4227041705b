//! Agent identities: create, read back, confirm, revoke, serials never reused.

use shared::domain::IdentityRecord;
use shared::ids::InstanceUid;
use shared::store::{Store, StoreError};

use super::unique;

/// Identities: create, read back by serial and by agent, confirm and revoke keep their first
/// time, revoked ones are listed; a serial is never reused.
pub async fn identities(store: &dyn Store) {
    let uid = InstanceUid::new_v7();
    let a = IdentityRecord {
        serial: unique("a"),
        instance_uid: uid,
        created_ms: 1_700_000_000_000,
        not_after_ms: 1_702_592_000_000,
        confirmed_ms: None,
        revoked_ms: None,
        fingerprint: "ab".repeat(32),
        cert_pem: "-----BEGIN CERTIFICATE-----\n…\n-----END CERTIFICATE-----\n".into(),
    };
    let b = IdentityRecord {
        serial: unique("b"),
        created_ms: 1_700_000_100_000,
        ..a.clone()
    };
    store.create_identity(&a).await.expect("create_identity");
    store.create_identity(&b).await.expect("create_identity");
    let dup = store.create_identity(&a).await;
    assert!(
        matches!(dup, Err(StoreError::NotApplied(_))),
        "a serial is unique: {dup:?}"
    );
    assert_eq!(
        store.get_identity(&a.serial).await.expect("get_identity"),
        Some(a.clone())
    );
    assert_eq!(
        store.get_identity(&unique("missing")).await.expect("get"),
        None
    );
    assert_eq!(
        store.identities_of(uid).await.expect("identities_of"),
        vec![a.clone(), b.clone()],
        "oldest first"
    );
    assert!(store
        .identities_of(InstanceUid::new_v7())
        .await
        .expect("identities_of")
        .is_empty());
    let all = store.list_identities().await.expect("list_identities");
    assert!(all.contains(&a) && all.contains(&b));

    assert!(!store
        .confirm_identity(&unique("missing"), 1)
        .await
        .expect("confirm"));
    assert!(store
        .confirm_identity(&a.serial, 1_700_000_001_000)
        .await
        .expect("confirm"));
    assert!(store
        .confirm_identity(&a.serial, 1_700_000_002_000)
        .await
        .expect("confirm again"));
    assert!(!store
        .revoke_identity(&unique("missing"), 1)
        .await
        .expect("revoke"));
    assert!(store
        .revoke_identity(&a.serial, 1_700_000_003_000)
        .await
        .expect("revoke"));
    assert!(store
        .revoke_identity(&a.serial, 1_700_000_004_000)
        .await
        .expect("revoke again"));
    let back = store
        .get_identity(&a.serial)
        .await
        .expect("get")
        .expect("there");
    assert_eq!(
        back.confirmed_ms,
        Some(1_700_000_001_000),
        "first confirmation kept"
    );
    assert_eq!(
        back.revoked_ms,
        Some(1_700_000_003_000),
        "first revocation kept"
    );
    let revoked = store
        .revoked_identities()
        .await
        .expect("revoked_identities");
    assert!(revoked.iter().any(|i| i.serial == a.serial));
    assert!(!revoked.iter().any(|i| i.serial == b.serial));

    // Changed since: by creation, confirmation or revocation, inclusive, in current state.
    let changed = |since: i64| async move {
        let got = store
            .identities_changed_since(since)
            .await
            .expect("identities_changed_since");
        assert!(
            got.windows(2)
                .all(|w| (w[0].created_ms, &w[0].serial) <= (w[1].created_ms, &w[1].serial)),
            "oldest first"
        );
        got.into_iter()
            .filter(|i| i.instance_uid == uid)
            .map(|i| i.serial)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        changed(1_700_000_000_000).await,
        vec![a.serial.clone(), b.serial.clone()]
    );
    // a was created before but revoked at 1_700_000_003_000 (inclusive); b created later.
    assert_eq!(
        changed(1_700_000_003_000).await,
        vec![a.serial.clone(), b.serial.clone()]
    );
    assert_eq!(changed(1_700_000_003_001).await, vec![b.serial.clone()]);
    assert!(changed(1_700_000_100_001).await.is_empty());
    let current = store
        .identities_changed_since(1_700_000_003_000)
        .await
        .expect("identities_changed_since")
        .into_iter()
        .find(|i| i.serial == a.serial)
        .expect("a");
    assert_eq!(current, back, "in its current state");
}
