//! Bootstrap tokens end to end, in the embedded default and in the cluster sandbox: many agents
//! racing to redeem one token (exactly one wins, in the cluster across coordinators, since
//! their instance UIDs fall into different partitions), an expired token refused with its
//! audited reason, and an audit entry for the token's issue, redemption and failed uses.

use agent::{ClientError, HttpTransport};
use coordinator::config::Config;
use serde_json::{json, Value};
use shared::ids::InstanceUid;
use tests::{bearer, eventually, hello, Fleet, TestServer, DEADLINE};

/// Agents presenting the same token at once.
const RACERS: usize = 24;

/// One agent's first exchange with `token`: `Ok(true)` admitted, `Ok(false)` refused with 401.
async fn first_exchange(url: String, token: String, uid: InstanceUid) -> anyhow::Result<bool> {
    let mut http = HttpTransport::new(&url, bearer(&token), false);
    match http.exchange(&hello(uid)).await {
        Ok(reply) => Ok(reply.error_response.is_none()),
        Err(ClientError::Status { status: 401, .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The audit entries `GET /api/v1/audit?{query}` lists.
async fn audited(f: &impl Fleet, query: &str) -> anyhow::Result<Vec<Value>> {
    let v = f.api().get(&format!("/api/v1/audit?{query}")).await?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

async fn one_of_many_concurrent_redemptions_wins(f: &impl Fleet) -> anyhow::Result<()> {
    let created = f
        .api()
        .post("/api/v1/tokens", json!({ "name": "raced" }))
        .await?;
    let token = created["token"].as_str().expect("token text").to_string();
    let token_id = created["record"]["id"].as_str().expect("id").to_string();
    let uids: Vec<InstanceUid> = (0..RACERS).map(|_| InstanceUid::new_v7()).collect();
    let racers = uids
        .iter()
        .map(|uid| tokio::spawn(first_exchange(f.http_url(), token.clone(), *uid)));
    let mut winners = Vec::new();
    for (uid, racer) in uids.iter().zip(racers.collect::<Vec<_>>()) {
        if racer.await?? {
            winners.push(*uid);
        }
    }
    assert_eq!(winners.len(), 1, "exactly one redemption wins: {winners:?}");
    let winner = winners[0].to_string();

    // The winner holds the token from now on; the losers were refused as already redeemed,
    // each audited with its source address.
    let tokens = f.api().get("/api/v1/tokens").await?;
    let record = tokens
        .as_array()
        .and_then(|t| t.iter().find(|t| t["id"] == token_id.as_str()))
        .cloned()
        .expect("the token is listed");
    assert_eq!(record["bound_uid"], winner.as_str(), "{record}");
    // Refusals from one source are audited in aggregate: rows with counts.
    let losers = eventually("every loser audited", DEADLINE, || async {
        let refused = audited(f, "reason=already_redeemed").await?;
        let from_here: Vec<Value> = refused
            .into_iter()
            .filter(|e| e["source_ip"] == "127.0.0.1")
            .collect();
        let n = tests::refusals(&from_here) as usize;
        Ok((n >= RACERS - 1).then_some(n))
    })
    .await?;
    assert_eq!(
        losers,
        RACERS - 1,
        "one refusal per loser, none for the winner"
    );
    let redeemed = audited(f, &format!("instance_uid={winner}")).await?;
    assert!(
        redeemed.iter().any(|e| e["action"] == "token.redeem"),
        "the redemption is audited: {redeemed:?}"
    );
    let created_entries = audited(f, "limit=10000").await?;
    assert!(
        created_entries
            .iter()
            .any(|e| e["action"] == "token.create" && e.to_string().contains(token_id.as_str())),
        "the issue is audited: {created_entries:?}"
    );

    // The winner keeps working with its token.
    assert!(first_exchange(f.http_url(), token, winners[0]).await?);
    Ok(())
}
both_modes!(one_of_many_concurrent_redemptions_wins, |_: &mut Config| {});

async fn an_expired_token_is_refused_and_audited(f: &impl Fleet) -> anyhow::Result<()> {
    // Already expired when it is written: the API mints only live tokens, so it goes straight
    // into the store of a coordinator (which learns of it by looking it up when presented).
    let token = shared::token::new_bootstrap_token();
    let now = shared::now_ms();
    let record = shared::domain::TokenRecord {
        id: uuid::Uuid::now_v7().simple().to_string(),
        name: "expired".into(),
        prefix: shared::token::display_prefix(&token),
        hash: shared::token::hash_token(&token),
        created_ms: now - 120_000,
        expires_ms: now - 60_000,
        revoked_ms: None,
        redeemed_ms: None,
        bound_uid: None,
        scope: None,
    };
    f.coordinator()?.store().create_token(&record).await?;

    let uid = InstanceUid::new_v7();
    let mut http = HttpTransport::new(&f.http_url(), bearer(&token), false);
    match http.exchange(&hello(uid)).await {
        Err(ClientError::Status { status, body, .. }) => {
            assert_eq!((status, body.as_str()), (401, "token expired"));
        }
        other => anyhow::bail!("an expired token must get 401, got {other:?}"),
    }
    let entries = eventually("the refusal audited", DEADLINE, || async {
        let e = audited(f, "reason=expired").await?;
        Ok((!e.is_empty()).then_some(e))
    })
    .await?;
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "auth.failed" && e["source_ip"] == "127.0.0.1"),
        "{entries:?}"
    );
    Ok(())
}
both_modes!(an_expired_token_is_refused_and_audited, |_: &mut Config| {});
