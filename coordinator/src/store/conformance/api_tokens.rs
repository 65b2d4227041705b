//! Operator API tokens: create, find, count, revoke.

use shared::domain::{ApiTokenListing, ApiTokenRecord, Role};
use shared::store::{Store, StoreError};

use super::{new_token, random_hash, unique};

/// Operator API tokens: create, find, count.
pub async fn api_tokens(store: &dyn Store) {
    let before = store.count_api_tokens().await.expect("count_api_tokens");
    let tokens: Vec<ApiTokenRecord> = [Role::Viewer, Role::Operator, Role::Admin]
        .into_iter()
        .map(|role| ApiTokenRecord {
            id: uuid::Uuid::new_v4().to_string(),
            name: unique("api"),
            role,
            hash: random_hash(),
            created_ms: 1_700_000_000_000,
        })
        .collect();
    for t in &tokens {
        store.create_api_token(t).await.expect("create_api_token");
    }
    for t in &tokens {
        assert_eq!(
            store.find_api_token(&t.hash).await.expect("find_api_token"),
            Some(t.clone())
        );
    }
    assert_eq!(
        store
            .find_api_token(&random_hash())
            .await
            .expect("find_api_token"),
        None
    );
    // Bootstrap and API tokens are separate: a bootstrap hash is no API token.
    let bootstrap = new_token(i64::MAX);
    store.create_token(&bootstrap).await.expect("create_token");
    assert_eq!(
        store
            .find_api_token(&bootstrap.hash)
            .await
            .expect("find_api_token"),
        None
    );
    assert_eq!(
        store.count_api_tokens().await.expect("count_api_tokens"),
        before + 3
    );

    let mut dup = tokens[0].clone();
    dup.hash = random_hash();
    let res = store.create_api_token(&dup).await;
    assert!(
        matches!(res, Err(StoreError::NotApplied(_))),
        "duplicate api token id: {res:?}"
    );
    let mut dup = tokens[1].clone();
    dup.id = uuid::Uuid::new_v4().to_string();
    let res = store.create_api_token(&dup).await;
    assert!(
        matches!(res, Err(StoreError::NotApplied(_))),
        "duplicate api token hash: {res:?}"
    );
    let mut dup = tokens[2].clone();
    dup.id = uuid::Uuid::new_v4().to_string();
    dup.hash = random_hash();
    let res = store.create_api_token(&dup).await;
    assert!(
        matches!(res, Err(StoreError::NotApplied(_))),
        "duplicate api token name: {res:?}"
    );
    assert_eq!(
        store.count_api_tokens().await.expect("count_api_tokens"),
        before + 3
    );
    let listed = store.list_api_tokens().await.expect("list_api_tokens");
    assert!(
        listed
            .windows(2)
            .all(|w| (w[0].token.created_ms, &w[0].token.id)
                <= (w[1].token.created_ms, &w[1].token.id)),
        "list_api_tokens is oldest first"
    );
    for t in &tokens {
        let found: Vec<_> = listed.iter().filter(|l| l.token.id == t.id).collect();
        assert_eq!(
            found,
            vec![&ApiTokenListing {
                token: t.clone(),
                revoked_ms: None
            }],
            "list_api_tokens shows each token once, intact"
        );
    }
}

/// Revoked API tokens are no longer found for authentication, but stay listed and counted,
/// and keep their name.
pub async fn api_token_revocation(store: &dyn Store) {
    let t = ApiTokenRecord {
        id: uuid::Uuid::new_v4().to_string(),
        name: unique("revoked"),
        role: Role::Operator,
        hash: random_hash(),
        created_ms: 1_700_000_000_000,
    };
    store.create_api_token(&t).await.expect("create_api_token");
    let before = store.count_api_tokens().await.expect("count_api_tokens");
    assert!(!store
        .revoke_api_token(&unique("missing"), 1)
        .await
        .expect("revoke_api_token"));
    assert!(store
        .revoke_api_token(&t.id, 1_700_000_001_000)
        .await
        .expect("revoke_api_token"));
    assert_eq!(
        store.find_api_token(&t.hash).await.expect("find_api_token"),
        None,
        "a revoked token does not authenticate"
    );
    assert!(store
        .revoke_api_token(&t.id, 1_700_000_002_000)
        .await
        .expect("revoke again"));
    let listed = store.list_api_tokens().await.expect("list_api_tokens");
    let found: Vec<_> = listed.iter().filter(|l| l.token.id == t.id).collect();
    assert_eq!(
        found,
        vec![&ApiTokenListing {
            token: t.clone(),
            revoked_ms: Some(1_700_000_001_000),
        }],
        "listed with the first revocation time"
    );
    assert_eq!(
        store.count_api_tokens().await.expect("count_api_tokens"),
        before,
        "revoked tokens still count"
    );
    let reuse = ApiTokenRecord {
        id: uuid::Uuid::new_v4().to_string(),
        hash: random_hash(),
        ..t.clone()
    };
    let res = store.create_api_token(&reuse).await;
    assert!(
        matches!(res, Err(StoreError::NotApplied(_))),
        "a revoked token's name is not reused: {res:?}"
    );
}
