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
