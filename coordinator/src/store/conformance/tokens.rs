//! Bootstrap tokens: create (one and a batch), list, revoke, the since-queries, redemption, batch redemption and races.

use std::collections::BTreeMap;
use std::sync::Arc;

use shared::domain::{Redemption, TokenRecord, TokenScope};
use shared::ids::InstanceUid;
use shared::store::{Store, StoreError};

use super::{new_token, random_hash, unique};

async fn find(store: &dyn Store, t: &TokenRecord) -> TokenRecord {
    store
        .find_token(&t.hash)
        .await
        .expect("find_token")
        .expect("token exists")
}

/// Tokens: create, list, find by hash, revoke.
pub async fn tokens(store: &dyn Store) {
    let t = new_token(i64::MAX);
    let mut pre_bound = new_token(1_800_000_000_000);
    pre_bound.bound_uid = Some(InstanceUid::new_v7());
    pre_bound.redeemed_ms = Some(1_700_000_000_500);
    pre_bound.revoked_ms = Some(1_700_000_000_600);
    let mut scoped = new_token(i64::MAX);
    scoped.scope = Some(TokenScope {
        labels: BTreeMap::from([
            ("env".to_string(), "prod".to_string()),
            ("service.name".to_string(), "ünï ✓ \"quoted\"".to_string()),
        ]),
    });
    store.create_token(&t).await.expect("create_token");
    store.create_token(&pre_bound).await.expect("create_token");
    store.create_token(&scoped).await.expect("create_token");

    assert_eq!(find(store, &t).await, t);
    assert_eq!(find(store, &pre_bound).await, pre_bound);
    assert_eq!(find(store, &scoped).await, scoped, "a scope round-trips");
    assert_eq!(
        store.find_token(&random_hash()).await.expect("find_token"),
        None
    );
    for want in [&t, &pre_bound, &scoped] {
        assert_eq!(
            store.get_token(&want.id).await.expect("get_token"),
            Some(want.clone()),
            "get_token by id"
        );
    }
    assert_eq!(
        store
            .get_token(&unique("missing"))
            .await
            .expect("get_token"),
        None
    );
    let list = store.list_tokens().await.expect("list_tokens");
    for want in [&t, &pre_bound, &scoped] {
        let found: Vec<_> = list.iter().filter(|x| x.id == want.id).collect();
        assert_eq!(
            found,
            vec![want],
            "list_tokens shows each token once, intact"
        );
    }

    let mut same_id = new_token(i64::MAX);
    same_id.id = t.id.clone();
    let dup = store.create_token(&same_id).await;
    assert!(
        matches!(dup, Err(StoreError::NotApplied(_))),
        "duplicate id: {dup:?}"
    );
    let mut same_hash = new_token(i64::MAX);
    same_hash.hash = t.hash;
    let dup = store.create_token(&same_hash).await;
    assert!(
        matches!(dup, Err(StoreError::NotApplied(_))),
        "duplicate hash: {dup:?}"
    );
    assert_eq!(find(store, &t).await, t, "failed creates change nothing");

    assert!(!store
        .revoke_token(&uuid::Uuid::new_v4().to_string(), 1)
        .await
        .expect("revoke_token"));
    assert!(store
        .revoke_token(&t.id, 1_700_000_001_000)
        .await
        .expect("revoke"));
    let revoked = find(store, &t).await;
    assert_eq!(revoked.revoked_ms, Some(1_700_000_001_000));
    assert_eq!(
        TokenRecord {
            revoked_ms: None,
            ..revoked.clone()
        },
        t,
        "revoking changes only revoked_ms"
    );
    assert!(store
        .revoke_token(&t.id, 1_700_000_002_000)
        .await
        .expect("revoke again"));
    assert_eq!(
        find(store, &t).await.revoked_ms,
        Some(1_700_000_001_000),
        "a second revocation keeps the first time"
    );
}

/// `create_tokens`: every token of the batch, or (on a duplicate) none of them.
pub async fn tokens_batch(store: &dyn Store) {
    let batch: Vec<TokenRecord> = (0..3).map(|_| new_token(i64::MAX)).collect();
    store.create_tokens(&batch).await.expect("create_tokens");
    for t in &batch {
        assert_eq!(&find(store, t).await, t);
    }
    let fresh = new_token(i64::MAX);
    let res = store
        .create_tokens(&[fresh.clone(), batch[0].clone()])
        .await;
    assert!(matches!(res, Err(StoreError::NotApplied(_))), "{res:?}");
    let found = store.find_token(&fresh.hash).await.expect("find_token");
    assert!(found.is_none(), "a failed batch left a token behind");
}

/// `tokens_created_since`: inclusive lower bound, oldest first, current state. Runs in a time
/// range of its own (after every token already in the store), so earlier data only adds
/// tokens at or after it, which the checks allow for.
pub async fn tokens_created_since(store: &dyn Store) {
    let newest = store
        .list_tokens()
        .await
        .expect("list_tokens")
        .iter()
        .map(|t| t.created_ms)
        .max()
        .unwrap_or(0);
    let base = newest.max(1_700_000_000_000) + 1_000;
    let at = |offset: i64| {
        let mut t = new_token(i64::MAX);
        t.created_ms = base + offset;
        t
    };
    let (early, mid, late) = (at(0), at(10), at(20));
    // Created out of order: the order is by created_ms, not insertion.
    for t in [&late, &early, &mid] {
        store.create_token(t).await.expect("create_token");
    }
    let mut revoked_mid = mid.clone();
    revoked_mid.revoked_ms = Some(base + 15);
    assert!(store
        .revoke_token(&mid.id, base + 15)
        .await
        .expect("revoke"));

    let ids = [early.id.clone(), mid.id.clone(), late.id.clone()];
    let ids = &ids;
    let ours = |since: i64| async move {
        let got = store
            .tokens_created_since(since)
            .await
            .expect("tokens_created_since");
        assert!(
            got.windows(2)
                .all(|w| (w[0].created_ms, &w[0].id) <= (w[1].created_ms, &w[1].id)),
            "oldest first"
        );
        assert!(
            got.iter().all(|t| t.created_ms >= since),
            "nothing created before since_ms"
        );
        got.into_iter()
            .filter(|t| ids.contains(&t.id))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ours(base).await,
        vec![early.clone(), revoked_mid.clone(), late.clone()],
        "since is inclusive; each token in its current state"
    );
    assert_eq!(
        ours(base + 10).await,
        vec![revoked_mid, late.clone()],
        "an exact created_ms is included"
    );
    assert_eq!(ours(base + 11).await, vec![late]);
    assert_eq!(ours(base + 21).await, Vec::<TokenRecord>::new());
}

/// `tokens_revoked_since`: only revoked tokens, inclusive lower bound on `revoked_ms`.
pub async fn tokens_revoked_since(store: &dyn Store) {
    let base = 1_900_000_000_000 + i64::from(rand::random::<u16>()) * 1_000_000;
    let (kept, gone, older) = (
        new_token(i64::MAX),
        new_token(i64::MAX),
        new_token(i64::MAX),
    );
    for t in [&kept, &gone, &older] {
        store.create_token(t).await.expect("create_token");
    }
    assert!(store
        .revoke_token(&older.id, base - 1)
        .await
        .expect("revoke"));
    assert!(store.revoke_token(&gone.id, base).await.expect("revoke"));
    let got = store
        .tokens_revoked_since(base)
        .await
        .expect("tokens_revoked_since");
    let ids: Vec<&str> = got
        .iter()
        .filter(|t| [&kept.id, &gone.id, &older.id].contains(&&t.id))
        .map(|t| t.id.as_str())
        .collect();
    assert_eq!(
        ids,
        vec![gone.id.as_str()],
        "revoked at or after since_ms only"
    );
    assert!(got.iter().all(|t| t.revoked_ms.is_some_and(|r| r >= base)));
}

/// A batch binds in request order, audits each binding exactly once, and refuses the rest.
pub async fn batch_redemption(store: &dyn Store) {
    let now = 1_700_000_000_000;
    let (a, b) = (InstanceUid::new_v7(), InstanceUid::new_v7());
    let t = new_token(now + 3_600_000);
    store.create_token(&t).await.expect("create_token");
    let actor = unique("batch");
    let req = |uid: InstanceUid| shared::store::RedeemRequest {
        token_id: t.id.clone(),
        uid,
        audit: shared::domain::AuditEntry {
            id: 0,
            at_ms: now,
            actor: actor.clone(),
            action: "token.redeem".into(),
            instance_uid: Some(uid),
            source_ip: None,
            reason: None,
            detail: serde_json::json!({ "token_id": t.id }),
        },
    };
    let missing = shared::store::RedeemRequest {
        token_id: unique("missing"),
        ..req(b)
    };
    let outcomes = store
        .redeem_tokens(&[req(a), req(b), req(a), missing], now)
        .await
        .expect("redeem_tokens");
    assert_eq!(
        outcomes,
        vec![
            Redemption::Bound,
            Redemption::BoundToOther,
            Redemption::AlreadyBoundToSame,
            Redemption::NotFound
        ]
    );
    assert_eq!(find(store, &t).await.bound_uid, Some(a));
    let audited = store
        .query_audit(&shared::store::AuditQuery {
            actor: Some(actor.clone()),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("query_audit");
    assert_eq!(audited.len(), 1, "only the binding is audited");
    assert_eq!(audited[0].instance_uid, Some(a));
}

/// Redemption outcomes, one by one.
pub async fn redemption(store: &dyn Store) {
    let now = 1_700_000_000_000;
    let (a, b) = (InstanceUid::new_v7(), InstanceUid::new_v7());

    let t = new_token(now + 3_600_000);
    store.create_token(&t).await.expect("create_token");
    assert_eq!(
        store.redeem_token(&t.id, a, now).await.expect("redeem"),
        Redemption::Bound
    );
    let bound = find(store, &t).await;
    assert_eq!(bound.bound_uid, Some(a));
    assert_eq!(bound.redeemed_ms, Some(now));
    assert_eq!(bound.revoked_ms, None);

    assert_eq!(
        store.redeem_token(&t.id, a, now + 1).await.expect("redeem"),
        Redemption::AlreadyBoundToSame
    );
    assert_eq!(
        store.redeem_token(&t.id, b, now + 2).await.expect("redeem"),
        Redemption::BoundToOther
    );
    let after = find(store, &t).await;
    assert_eq!(after.bound_uid, Some(a), "binding is permanent");
    assert_eq!(
        after.redeemed_ms,
        Some(now),
        "redeemed_ms is the first binding"
    );

    // Bound, then expired: refused even to its own agent.
    assert_eq!(
        store
            .redeem_token(&t.id, a, t.expires_ms)
            .await
            .expect("redeem"),
        Redemption::Expired
    );
    // Bound, then revoked: refused even to its own agent.
    assert!(store.revoke_token(&t.id, now + 3).await.expect("revoke"));
    assert_eq!(
        store.redeem_token(&t.id, a, now + 4).await.expect("redeem"),
        Redemption::Revoked
    );
    assert_eq!(
        store.redeem_token(&t.id, b, now + 4).await.expect("redeem"),
        Redemption::Revoked
    );

    // Revoked before any redemption; revoked wins over expired.
    let r = new_token(now + 10);
    store.create_token(&r).await.expect("create_token");
    assert!(store.revoke_token(&r.id, now).await.expect("revoke"));
    assert_eq!(
        store.redeem_token(&r.id, a, now + 1).await.expect("redeem"),
        Redemption::Revoked
    );
    assert_eq!(
        store
            .redeem_token(&r.id, a, now + 10)
            .await
            .expect("redeem"),
        Redemption::Revoked
    );
    assert_eq!(find(store, &r).await.bound_uid, None);
    assert_eq!(find(store, &r).await.redeemed_ms, None);

    // Expiry: now >= expires_ms is expired, one millisecond earlier is not.
    let e = new_token(now + 100);
    store.create_token(&e).await.expect("create_token");
    assert_eq!(
        store
            .redeem_token(&e.id, a, now + 100)
            .await
            .expect("redeem"),
        Redemption::Expired
    );
    assert_eq!(
        store
            .redeem_token(&e.id, a, now + 5_000)
            .await
            .expect("redeem"),
        Redemption::Expired
    );
    assert_eq!(
        find(store, &e).await.bound_uid,
        None,
        "expired stays unbound"
    );
    assert_eq!(
        store
            .redeem_token(&e.id, b, now + 99)
            .await
            .expect("redeem"),
        Redemption::Bound
    );
    assert_eq!(find(store, &e).await.bound_uid, Some(b));

    assert_eq!(
        store
            .redeem_token(&uuid::Uuid::new_v4().to_string(), a, now)
            .await
            .expect("redeem"),
        Redemption::NotFound
    );
}

/// Of 32 concurrent redemptions of one token by different agents, exactly one binds.
pub async fn redemption_race(store: Arc<dyn Store>) {
    redemption_race_between(&[store]).await;
}

/// [`redemption_race`] with the racers spread over `stores` (several handles on one database
/// stand in for several processes): every other racer is told `BoundToOther`, and the token
/// ends bound to the winner.
pub async fn redemption_race_between(stores: &[Arc<dyn Store>]) {
    const RACERS: usize = 32;
    let now = 1_700_000_000_000;
    let t = new_token(now + 3_600_000);
    let store = &stores[0];
    store.create_token(&t).await.expect("create_token");
    let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
    let tasks: Vec<_> = (0..RACERS)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            let (barrier, id) = (barrier.clone(), t.id.clone());
            let uid = InstanceUid::new_v7();
            tokio::spawn(async move {
                barrier.wait().await;
                (uid, store.redeem_token(&id, uid, now).await)
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut losers = 0;
    for task in tasks {
        let (uid, outcome) = task.await.expect("racer panicked");
        match outcome.expect("redeem_token") {
            Redemption::Bound => winners.push(uid),
            Redemption::BoundToOther => losers += 1,
            other => panic!("unexpected outcome in race: {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one winner: {winners:?}");
    assert_eq!(losers, RACERS - 1);
    let stored = store
        .find_token(&t.hash)
        .await
        .expect("find_token")
        .expect("token exists");
    assert_eq!(stored.bound_uid, Some(winners[0]), "the winner is bound");
    assert_eq!(stored.redeemed_ms, Some(now));
}
