//! Groups and rollouts: groups by name, a rollout with its members and history, writes
//! compared by revision and fenced by a partition lease, and the assignment a finished
//! rollout leaves behind.

use std::collections::BTreeMap;

use shared::domain::Target;
use shared::ids::InstanceUid;
use shared::packages::{NewPackageAssignment, PackageKind};
use shared::rollout::{
    Amount, Group, Member, NewRollout, OnFailure, PackageChange, RolloutEvent, RolloutState, Stage,
};
use shared::store::{Finish, NewAssignment, NewConfigVersion, Store, StoreError};

use super::{file, unique};

/// `put_group` creates, then replaces only the labels; `delete_group` says whether it found one.
pub async fn groups(store: &dyn Store) {
    let name = unique("group");
    let first = Group {
        name: name.clone(),
        labels: BTreeMap::from([("env".into(), "prod".into())]),
        author: "api:first".into(),
        created_ms: 1_700_000_000_000,
    };
    assert_eq!(store.put_group(&first).await.expect("put_group"), first);
    let replaced = Group {
        labels: BTreeMap::from([("env".into(), "staging".into())]),
        author: "api:second".into(),
        created_ms: 1_700_000_000_999,
        ..first.clone()
    };
    let stored = store.put_group(&replaced).await.expect("put_group again");
    assert_eq!(stored.labels, replaced.labels, "labels replaced");
    assert_eq!(
        (stored.author.as_str(), stored.created_ms),
        (first.author.as_str(), first.created_ms),
        "author and creation stay the first"
    );
    let listed = store.list_groups().await.expect("list_groups");
    assert!(listed.windows(2).all(|w| w[0].name < w[1].name), "by name");
    assert_eq!(listed.iter().filter(|g| g.name == name).count(), 1);
    assert!(store.delete_group(&name).await.expect("delete_group"));
    assert!(!store.delete_group(&name).await.expect("delete_group twice"));
    assert!(!store
        .list_groups()
        .await
        .expect("list_groups")
        .iter()
        .any(|g| g.name == name));
}

fn event(kind: &str, at_ms: i64, stage: Option<usize>) -> RolloutEvent {
    RolloutEvent {
        rollout_id: 0,
        at_ms,
        kind: kind.into(),
        actor: "api:conformance".into(),
        stage,
        detail: serde_json::json!({ "note": "caf\u{e9} \u{0}" }),
    }
}

/// A rollout reads back as created (with its members and first event); a write with a stale
/// revision or a lost fence changes nothing; a finishing write leaves its assignment behind.
pub async fn rollouts(store: &dyn Store) {
    let config = store
        .create_config(NewConfigVersion {
            name: unique("rollout-cfg"),
            files: BTreeMap::from([(String::new(), file("a: 1\n", "text/yaml"))]),
            hash: "ab".repeat(32),
            author: "api:conformance".into(),
            created_ms: 1_700_000_000_000,
        })
        .await
        .expect("create_config");
    let target = Target::Labels(BTreeMap::from([("app".into(), unique("app"))]));
    let new = NewRollout {
        config_id: config.id,
        config_hash: config.hash.clone(),
        package: None,
        group: Some(unique("g")),
        target: target.clone(),
        stages: [Amount::Count(1), Amount::Basis(2_500), Amount::ALL]
            .into_iter()
            .map(|size| Stage {
                size,
                soak_ms: 5_000,
                planned: 1,
                started_ms: None,
                settled_ms: None,
                gate: None,
            })
            .collect(),
        budget: Amount::Count(0),
        deadline_ms: 60_000,
        on_failure: OnFailure::Rollback,
        cannot_receive: 2,
        author: "api:conformance".into(),
        created_ms: 1_700_000_000_100,
    };
    let members: Vec<Member> = (0..3u16)
        .map(|stage| Member {
            instance_uid: InstanceUid::new_v7(),
            stage,
            from_config: (stage > 0).then_some(i64::from(stage)),
        })
        .collect();
    let created = store
        .create_rollout(new.clone(), &members, event("created", 1, None))
        .await
        .expect("create_rollout");
    assert_eq!(created.state, RolloutState::Pending);
    assert_eq!(created.rev, 1);
    assert_eq!((created.stage, created.cannot_receive), (0, 2));
    assert_eq!(created.stages, new.stages);
    assert_eq!(
        store.get_rollout(created.id).await.expect("get_rollout"),
        Some(created.clone())
    );
    assert_eq!(
        store.rollout_members(created.id).await.expect("members"),
        members
    );
    let listed = store.list_rollouts().await.expect("list_rollouts");
    assert!(listed.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
    assert!(listed.contains(&created));

    // By state: the pending rollout is listed with pending ones only, and counted.
    let pending = store
        .list_rollouts_in(&[RolloutState::Pending, RolloutState::Paused])
        .await
        .expect("list_rollouts_in");
    assert!(pending.contains(&created));
    assert!(pending
        .iter()
        .all(|r| matches!(r.state, RolloutState::Pending | RolloutState::Paused)));
    assert!(
        pending.windows(2).all(|w| w[0].id < w[1].id),
        "oldest first"
    );
    assert!(!store
        .list_rollouts_in(&[RolloutState::Running])
        .await
        .expect("list_rollouts_in")
        .iter()
        .any(|r| r.id == created.id));
    assert!(store.list_rollouts_in(&[]).await.expect("none").is_empty());
    let count = |counts: &[(RolloutState, u64)], state| {
        counts
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n)
    };
    let before = store.count_rollouts().await.expect("count_rollouts");
    assert!(count(&before, RolloutState::Pending) >= 1);
    assert_eq!(
        before.iter().map(|(_, n)| n).sum::<u64>(),
        store.list_rollouts().await.expect("list").len() as u64,
        "every rollout counted once"
    );

    // A write at the next revision lands, with its events in order.
    let mut running = created.clone();
    running.state = RolloutState::Running;
    running.stages[0].started_ms = Some(2);
    running.rev = 2;
    let events = [event("stage_started", 2, Some(0)), event("x", 2, Some(0))];
    assert!(store
        .update_rollout(&running, None, &events, None)
        .await
        .expect("update_rollout"));
    assert_eq!(
        store.get_rollout(created.id).await.expect("get"),
        Some(running.clone())
    );
    let after = store.count_rollouts().await.expect("count_rollouts");
    assert_eq!(
        count(&after, RolloutState::Pending) + 1,
        count(&before, RolloutState::Pending),
        "the state column follows the writes"
    );
    assert_eq!(
        count(&after, RolloutState::Running),
        count(&before, RolloutState::Running) + 1
    );
    // The same revision again is stale: nothing changes, no event is added.
    let mut stale = running.clone();
    stale.state = RolloutState::Aborted;
    assert!(!store
        .update_rollout(&stale, None, &[event("aborted", 3, None)], None)
        .await
        .expect("stale update_rollout"));
    assert_eq!(
        store.get_rollout(created.id).await.expect("get"),
        Some(running.clone())
    );
    let history = store.rollout_events(created.id).await.expect("events");
    let kinds: Vec<&str> = history.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["created", "stage_started", "x"]);
    assert!(history.iter().all(|e| e.rollout_id == created.id));
    assert_eq!(history[1].stage, Some(0));
    assert_eq!(
        history[1].detail,
        event("", 0, None).detail,
        "detail round-trips"
    );

    // Fenced: only the live holder of the partition's lease at that fence may write.
    let (held, refused) = super::leases::driver_fences(store, created.id).await;
    let mut next = running.clone();
    next.stage = 1;
    next.rev = 3;
    for (what, f) in refused {
        assert!(
            !store
                .update_rollout(&next, Some(&f), &[], None)
                .await
                .expect("fenced update_rollout"),
            "{what} must not write"
        );
    }
    assert!(store
        .update_rollout(&next, Some(&held), &[], None)
        .await
        .expect("fenced update_rollout"));

    // Finishing leaves the assignment behind in the same write.
    let before = store.list_assignments().await.expect("assignments").len();
    let mut done = next.clone();
    done.state = RolloutState::Succeeded;
    done.rev = 4;
    let finish = Finish::Config(NewAssignment {
        config_id: config.id,
        target: target.clone(),
        author: "rollout:conformance".into(),
        created_ms: 7,
    });
    assert!(store
        .update_rollout(&done, None, &[event("succeeded", 7, None)], Some(finish))
        .await
        .expect("finishing update_rollout"));
    let after = store.list_assignments().await.expect("assignments");
    assert_eq!(after.len(), before + 1);
    let last = after.last().expect("an assignment");
    assert_eq!((last.config_id, &last.target), (config.id, &target));

    // An upgrade refers to no config version; finishing leaves a package assignment.
    let change = PackageChange {
        name: unique("pkg"),
        version: "0.2.0".into(),
        kind: PackageKind::TopLevel,
    };
    let upgrade = NewRollout {
        config_id: 0,
        config_hash: String::new(),
        package: Some(change.clone()),
        ..new.clone()
    };
    let created = store
        .create_rollout(upgrade, &members, event("created", 1, None))
        .await
        .expect("an upgrade is created");
    let read = store
        .get_rollout(created.id)
        .await
        .expect("get_rollout")
        .expect("the upgrade");
    assert_eq!(read.package.as_ref(), Some(&change));
    let mut done = read.clone();
    done.state = RolloutState::Succeeded;
    done.rev += 1;
    let finish = Finish::Package(NewPackageAssignment {
        name: change.name.clone(),
        version: change.version.clone(),
        target: target.clone(),
        author: format!("rollout:{}", read.id),
        created_ms: 8,
    });
    assert!(store
        .update_rollout(&done, None, &[event("succeeded", 8, None)], Some(finish))
        .await
        .expect("finishing an upgrade"));
    let left = store
        .list_package_assignments()
        .await
        .expect("package assignments");
    let last = left.last().expect("a package assignment");
    assert_eq!(
        (&last.name, &last.version, &last.target),
        (&change.name, &change.version, &target)
    );

    // A rollout of a config that does not exist is refused.
    let missing = NewRollout {
        config_id: i64::MAX,
        ..new
    };
    assert!(matches!(
        store
            .create_rollout(missing, &[], event("created", 1, None))
            .await,
        Err(StoreError::NotFound(_))
    ));
}
