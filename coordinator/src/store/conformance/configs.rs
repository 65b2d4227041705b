//! Config versions and assignments.

use std::collections::BTreeMap;

use shared::domain::{Assignment, ConfigMap, Target};
use shared::ids::InstanceUid;
use shared::store::{NewAssignment, NewConfigVersion, Store, StoreError};

use super::{file, unique};

fn new_config(name: &str, files: ConfigMap) -> NewConfigVersion {
    NewConfigVersion {
        name: name.into(),
        files,
        hash: format!("{:0>64}", name.len()),
        author: unique("author"),
        created_ms: 1_700_000_000_000,
    }
}

/// Config versions get growing ids and read back whole.
pub async fn configs(store: &dyn Store) {
    let a = new_config(
        &unique("cfg-a"),
        BTreeMap::from([(String::new(), file("receivers: {}\n", "text/yaml"))]),
    );
    let b = new_config(
        &unique("cfg-b"),
        BTreeMap::from([
            ("base.yaml".into(), file("exporters: {}\n", "text/yaml")),
            ("over.yaml".into(), file("", "")),
        ]),
    );
    let ca = store.create_config(a.clone()).await.expect("create_config");
    let cb = store.create_config(b.clone()).await.expect("create_config");
    assert!(
        cb.id > ca.id,
        "config ids must grow: {} then {}",
        ca.id,
        cb.id
    );
    for (created, new) in [(&ca, &a), (&cb, &b)] {
        assert_eq!(created.name, new.name);
        assert_eq!(created.files, new.files);
        assert_eq!(created.hash, new.hash);
        assert_eq!(created.author, new.author);
        assert_eq!(created.created_ms, new.created_ms);
        assert_eq!(
            store.get_config(created.id).await.expect("get_config"),
            Some(created.clone())
        );
    }
    assert_eq!(store.get_config(-1).await.expect("get_config"), None);
    assert_eq!(store.get_config(i64::MAX).await.expect("get_config"), None);

    let list = store.list_configs().await.expect("list_configs");
    let pos = |id: i64| list.iter().position(|c| c.id == id);
    let (pa, pb) = (pos(ca.id).expect("a listed"), pos(cb.id).expect("b listed"));
    assert!(pa < pb, "list_configs is ordered by id");
    assert_eq!(list[pa], ca);
    assert_eq!(list[pb], cb);
    assert!(
        list.windows(2).all(|w| w[0].id < w[1].id),
        "list_configs is ordered by id"
    );
}

/// Assignments of all target kinds round-trip and list oldest first.
pub async fn assignments(store: &dyn Store) {
    let config = store
        .create_config(new_config(
            &unique("cfg"),
            BTreeMap::from([(String::new(), file("x: 1\n", "text/yaml"))]),
        ))
        .await
        .expect("create_config");
    let targets = [
        Target::Agent(InstanceUid::new_v7()),
        Target::Labels(BTreeMap::from([
            ("env".to_string(), "prod".to_string()),
            ("service.name".to_string(), unique("svc")),
        ])),
        Target::All,
        Target::Labels(BTreeMap::new()),
    ];
    let mut created: Vec<Assignment> = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let new = NewAssignment {
            config_id: config.id,
            target: target.clone(),
            author: unique("author"),
            created_ms: 1_700_000_000_000 + i as i64,
        };
        let a = store
            .create_assignment(new.clone())
            .await
            .expect("create_assignment");
        assert_eq!(a.config_id, new.config_id);
        assert_eq!(a.target, new.target);
        assert_eq!(a.author, new.author);
        assert_eq!(a.created_ms, new.created_ms);
        if let Some(prev) = created.last() {
            assert!(a.id > prev.id, "assignment ids must grow");
        }
        created.push(a);
    }
    let list = store.list_assignments().await.expect("list_assignments");
    assert!(
        list.windows(2).all(|w| w[0].id < w[1].id),
        "list_assignments is oldest first"
    );
    let ours: Vec<Assignment> = list
        .into_iter()
        .filter(|a| a.config_id == config.id)
        .collect();
    assert_eq!(ours, created);

    let missing = store
        .create_assignment(NewAssignment {
            config_id: i64::MAX,
            target: Target::All,
            author: "nobody".into(),
            created_ms: 0,
        })
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "assignment to an unknown config: {missing:?}"
    );
    let list = store.list_assignments().await.expect("list_assignments");
    assert!(list.iter().all(|a| a.config_id != i64::MAX));
}
