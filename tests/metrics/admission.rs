//! Admission refusals by reason (`ampora_gateway_admission_refused_total`: `connection_cap` for
//! a 503, `rate` for a 429) and the cap a gateway shows
//! (`ampora_gateway_admission_max_connections`), in both modes.

use std::time::Duration;

use agent::{ConnectError, WsConnection};
use coordinator::config::Config;
use tests::cluster::Cluster;
use tests::{bearer, Fleet, TestServer};

use crate::{alone, expect_changes, expect_values, series, snapshot};

const REFUSED: &str = "ampora_gateway_admission_refused_total";
const MAX_CONNECTIONS: &str = "ampora_gateway_admission_max_connections";

/// Upgrades and plain-HTTP requests sent at a full gateway.
const UPGRADES: usize = 10;
const REQUESTS: usize = 20;

fn refused(reason: &str) -> String {
    series(REFUSED, "reason", reason)
}

/// A cap of `cap` connections and one new connection or request a second, after a burst that
/// fills the cap and leaves two.
fn limits(cap: u64) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.admission.max_connections = cap;
        c.admission.accept_rate_per_sec = 1;
        c.admission.accept_burst = cap + 2;
        c.admission.warmup_secs = 0;
        c.admission.max_connections_per_credential = 0;
    }
}

/// Fills `fleet`'s gateway (cap `cap`), then sends [`UPGRADES`] upgrades (503: the cap) and
/// [`REQUESTS`] plain-HTTP requests (429 once the bucket is empty; the others are let through
/// and refused by authentication). Each refusal is counted once, under its reason.
async fn refusals_are_counted(fleet: &impl Fleet, cap: usize) -> anyhow::Result<()> {
    let api = fleet.api();
    // The cap is shown as configured.
    expect_values(api, &[MAX_CONNECTIONS], &[(MAX_CONNECTIONS, cap as f64)]).await?;

    let fam = &[REFUSED];
    let s = snapshot(api, fam).await?;
    let holder = bearer(&api.token("holder").await?);
    let mut held = Vec::new();
    for _ in 0..cap {
        held.push(WsConnection::connect(&fleet.ws_url(), &holder).await?);
    }
    let s = expect_changes(api, fam, &s, &[]).await?;

    let unknown = bearer(&shared::token::new_bootstrap_token());
    let mut at_cap = 0;
    for _ in 0..UPGRADES {
        match WsConnection::connect(&fleet.ws_url(), &unknown).await {
            Err(ConnectError::Status {
                status: 503,
                retry_after,
                ..
            }) => {
                assert!(retry_after.is_some_and(|d| d >= Duration::from_secs(1)));
                at_cap += 1;
            }
            other => anyhow::bail!("an upgrade at the cap must get 503, got {other:?}"),
        }
    }
    assert_eq!(at_cap, UPGRADES);
    let s = expect_changes(api, fam, &s, &[(&refused("connection_cap"), at_cap as f64)]).await?;

    let http = reqwest::Client::new();
    let (mut throttled, mut admitted) = (0, 0);
    for _ in 0..REQUESTS {
        let resp = http
            .post(fleet.http_url())
            .header("Content-Type", "application/x-protobuf")
            .header("Authorization", &unknown[0].1)
            .body(Vec::<u8>::new())
            .send()
            .await?;
        match resp.status().as_u16() {
            429 => throttled += 1,
            401 => admitted += 1,
            other => anyhow::bail!("unexpected status {other}"),
        }
    }
    // Two tokens left after the holders, and one a second: most of them are throttled.
    assert!(
        throttled >= REQUESTS / 2,
        "{throttled} throttled, {admitted} admitted"
    );
    expect_changes(api, fam, &s, &[(&refused("rate"), throttled as f64)]).await?;
    drop(held);
    Ok(())
}

#[tokio::test]
async fn admission_refusals_are_counted_embedded() -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start_with(limits(2)).await?;
    refusals_are_counted(&server, 2).await?;
    server.stop().await
}

#[tokio::test]
async fn admission_refusals_are_counted_cluster() -> anyhow::Result<()> {
    let _alone = alone().await;
    let c = Cluster::start(1, 1, limits(3)).await?;
    refusals_are_counted(&c, 3).await?;
    c.stop().await
}
