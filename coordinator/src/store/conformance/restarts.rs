//! Group restarts: created at revision 1, listed newest first, selected by state, and written
//! only by compare-and-set on the revision and, when fenced, by the live lease holder.

use shared::store::{Store, StoredRestart};

use super::unique;

pub async fn restarts(store: &dyn Store) {
    let marker = unique("restart");
    let body = |n: u32| format!("{{\"marker\":\"{marker}\",\"n\":{n}}}");
    let first = store
        .create_restart("running", &body(1), 10)
        .await
        .expect("create_restart");
    let second = store
        .create_restart("running", &body(2), 11)
        .await
        .expect("create_restart");
    assert!(second > first, "ids grow");
    let stored = |id: i64, rev: i64, state: &str, n: u32| StoredRestart {
        id,
        rev,
        state: state.into(),
        body: body(n),
    };
    assert_eq!(
        store.get_restart(first).await.expect("get_restart"),
        Some(stored(first, 1, "running", 1))
    );
    assert_eq!(store.get_restart(-1).await.expect("get_restart"), None);

    let newest = store.list_restarts(2).await.expect("list_restarts");
    assert_eq!(
        newest,
        vec![
            stored(second, 1, "running", 2),
            stored(first, 1, "running", 1)
        ],
        "newest first, at most the limit"
    );
    assert!(store.list_restarts(0).await.expect("list").is_empty());

    // Compare-and-set on the revision.
    assert!(!store
        .update_restart(first, 3, "running", &body(3), None)
        .await
        .expect("update_restart"));
    assert!(store
        .update_restart(first, 2, "stopped", &body(3), None)
        .await
        .expect("update_restart"));
    assert!(
        !store
            .update_restart(first, 2, "stopped", &body(4), None)
            .await
            .expect("update_restart"),
        "a revision is written once"
    );
    assert_eq!(
        store.get_restart(first).await.expect("get_restart"),
        Some(stored(first, 2, "stopped", 3))
    );
    let running: Vec<i64> = store
        .list_restarts_in("running")
        .await
        .expect("list_restarts_in")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert!(running.contains(&second) && !running.contains(&first));
    assert!(running.windows(2).all(|w| w[0] < w[1]), "oldest first");

    // Fenced: only the live holder of the partition's lease at that fence may write.
    let (held, refused) = super::leases::driver_fences(store, second).await;
    for (what, f) in refused {
        assert!(
            !store
                .update_restart(second, 2, "running", &body(5), Some(&f))
                .await
                .expect("fenced update_restart"),
            "{what} must not write"
        );
    }
    assert!(store
        .update_restart(second, 2, "succeeded", &body(5), Some(&held))
        .await
        .expect("fenced update_restart"));
    assert_eq!(
        store.get_restart(second).await.expect("get_restart"),
        Some(stored(second, 2, "succeeded", 5))
    );
}
