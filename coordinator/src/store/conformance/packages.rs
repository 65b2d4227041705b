//! Package artifacts and package assignments.

use std::collections::BTreeMap;

use shared::domain::Target;
use shared::packages::{Artifact, NewPackageAssignment, PackageKind};
use shared::store::Store;

use super::unique;

/// An artifact reads back whole; a second one with the same name, version and platform is
/// refused (false) and changes nothing, another platform of the same version is accepted.
pub async fn artifacts(store: &dyn Store) {
    let name = unique("otelcol");
    let amd = Artifact {
        name: name.clone(),
        version: "v0.1.0".into(),
        platform: "linux/amd64".into(),
        kind: PackageKind::TopLevel,
        sha256: "ab".repeat(32),
        size: 20 << 20,
        signature: Some("untrusted comment: x\nRW...\n".into()),
        signer: Some("0123456789ABCDEF".into()),
        url: None,
        author: unique("author"),
        created_ms: 1_700_000_000_000,
    };
    assert!(store.create_artifact(&amd).await.expect("create_artifact"));
    let again = Artifact {
        sha256: "cd".repeat(32),
        ..amd.clone()
    };
    assert!(
        !store
            .create_artifact(&again)
            .await
            .expect("create_artifact"),
        "a second artifact for one name, version and platform must be refused"
    );
    let arm = Artifact {
        platform: "linux/arm64".into(),
        sha256: "ef".repeat(32),
        signature: None,
        signer: None,
        url: Some("https://builds.example.com/otelcol-arm64.tar.gz".into()),
        ..amd.clone()
    };
    assert!(store.create_artifact(&arm).await.expect("create_artifact"));
    let mine: Vec<Artifact> = store
        .list_artifacts()
        .await
        .expect("list_artifacts")
        .into_iter()
        .filter(|a| a.name == name)
        .collect();
    assert_eq!(mine, vec![amd, arm]);
}

/// Package assignments get growing ids and read back whole, in id order.
pub async fn package_assignments(store: &dyn Store) {
    let name = unique("pkg");
    let new = |version: &str, target: Target| NewPackageAssignment {
        name: name.clone(),
        version: version.into(),
        target,
        author: "op".into(),
        created_ms: 1_700_000_000_000,
    };
    let a = store
        .create_package_assignment(new("1.0", Target::All))
        .await
        .expect("create_package_assignment");
    let labels = Target::Labels(BTreeMap::from([("env".into(), "prod".into())]));
    let b = store
        .create_package_assignment(new("1.1", labels.clone()))
        .await
        .expect("create_package_assignment");
    assert!(b.id > a.id, "ids must grow: {} then {}", a.id, b.id);
    assert_eq!((b.version.as_str(), &b.target), ("1.1", &labels));
    let mine: Vec<_> = store
        .list_package_assignments()
        .await
        .expect("list_package_assignments")
        .into_iter()
        .filter(|x| x.name == name)
        .collect();
    assert_eq!(mine, vec![a, b]);
}

/// A blob's pieces read back as written, by index; a missing piece or blob reads as none; a
/// piece written again keeps its bytes (content-addressed, so it is the same piece).
pub async fn blob_chunks(store: &dyn Store) {
    let sha = hex::encode(unique("blob").as_bytes())[..64].to_owned();
    let pieces: [&[u8]; 3] = [&[0, 1, 2, 255], &[7; 1000], &[]];
    for (i, p) in pieces.iter().enumerate() {
        let i = u32::try_from(i).expect("index");
        store
            .put_blob_chunk(&sha, i, p)
            .await
            .expect("put_blob_chunk");
    }
    store
        .put_blob_chunk(&sha, 1, &[9; 3])
        .await
        .expect("put_blob_chunk again");
    for (i, p) in pieces.iter().enumerate() {
        let i = u32::try_from(i).expect("index");
        let back = store.blob_chunk(&sha, i).await.expect("blob_chunk");
        assert_eq!(back.as_deref(), Some(*p), "piece {i}");
    }
    assert_eq!(store.blob_chunk(&sha, 3).await.expect("blob_chunk"), None);
    let other = "0f".repeat(32);
    assert_eq!(store.blob_chunk(&other, 0).await.expect("blob_chunk"), None);
}

/// A component set reads back under its hash; a second write of the same hash keeps the
/// first body (every agent of a build reports the same set).
pub async fn component_sets(store: &dyn Store) {
    let hash = unique("components");
    let body = r#"{"exporters":["debug","otlp"],"receivers":["otlp"]}"#;
    store
        .put_component_set(&hash, body, 1)
        .await
        .expect("put_component_set");
    store
        .put_component_set(&hash, "{}", 2)
        .await
        .expect("put_component_set again");
    let all = store
        .list_component_sets()
        .await
        .expect("list_component_sets");
    let found: Vec<&(String, String)> = all.iter().filter(|(h, _)| *h == hash).collect();
    assert_eq!(found, [&(hash.clone(), body.to_owned())]);
}

/// A group's telemetry settings read back; a second put replaces them; a delete removes them
/// once.
pub async fn group_telemetry(store: &dyn Store) {
    let group = unique("telemetry");
    for body in [
        r#"{"metrics":{"ampora":true}}"#,
        r#"{"logs":{"endpoint":"https://x/v1/logs"}}"#,
    ] {
        store
            .put_group_telemetry(&group, body, 1)
            .await
            .expect("put_group_telemetry");
        let all = store
            .list_group_telemetry()
            .await
            .expect("list_group_telemetry");
        let found: Vec<&(String, String)> = all.iter().filter(|(g, _)| *g == group).collect();
        assert_eq!(found, [&(group.clone(), body.to_owned())]);
    }
    assert!(store.delete_group_telemetry(&group).await.expect("delete"));
    assert!(!store
        .delete_group_telemetry(&group)
        .await
        .expect("delete again"));
    let all = store.list_group_telemetry().await.expect("list");
    assert!(all.iter().all(|(g, _)| *g != group));
}
