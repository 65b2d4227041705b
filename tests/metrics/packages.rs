//! Package downloads and installs, counted: each download refused by its reason, each one
//! served by whether it was whole or a range with its bytes, and each install outcome an
//! agent reports.

use agent::WsConnection;
use serde_json::json;
use shared::ids::InstanceUid;
use tests::packages::{build, download_of, import, packaged_hello, top_level_report, PKG_CAPS};
use tests::{bearer, TestServer};

use crate::{alone, expect_changes, expect_values, series, snapshot, Scrape as _};

const DOWNLOADS: &str = "ampora_package_downloads_total";
const BYTES: &str = "ampora_package_download_bytes_total";
const INSTALLS: &str = "ampora_package_installs_total";
const IN_FLIGHT: &str = "ampora_package_downloads_in_flight";
const VERIFIED: &str = "ampora_package_time_to_verified_seconds_count";

#[tokio::test]
async fn downloads_and_installs_are_counted_with_their_outcome() -> anyhow::Result<()> {
    let _alone = alone().await;
    // Unsigned builds allowed: the trust policy has its own tests.
    let server = TestServer::start_with(|c| c.packages.allow_unsigned = true).await?;
    let api = &server.api;
    // Larger than loopback's socket buffers: a download is still being sent while its
    // client has read only the head.
    let mut data = build("0.5.0");
    data.resize(16 << 20, 7);
    let (status, body) = import(&server, "", "0.5.0", "linux/amd64", data.clone(), None).await?;
    anyhow::ensure!(status == 200, "import: {status} {body}");
    api.post(
        "/api/v1/packages/assignments",
        json!({ "name": "", "version": "0.5.0", "all": true }),
    )
    .await?;
    let uid = InstanceUid::new_v7();
    let mut conn = WsConnection::connect(&server.ws_url(), &bearer(&api.token("m").await?)).await?;
    conn.send(&packaged_hello(uid, PKG_CAPS, "linux/amd64"))
        .await?;
    let reply = conn.recv().await?.unwrap_or_default();
    let (url, auth) = download_of(&reply, "").ok_or_else(|| anyhow::anyhow!("no offer"))?;
    let offer = reply.packages_available.unwrap_or_default();

    let families = [DOWNLOADS, BYTES, INSTALLS];
    let before = snapshot(api, &families).await?;
    let http = reqwest::Client::new();
    // The credential with the last digit of its MAC changed.
    let mut forged = auth.clone();
    let last = forged.pop();
    forged.push(if last == Some('0') { '1' } else { '0' });
    for (header, want) in [(None, 401), (Some(forged.as_str()), 401)] {
        let mut req = http.get(&url);
        if let Some(h) = header {
            req = req.header("authorization", h);
        }
        anyhow::ensure!(req.send().await?.status() == want);
    }
    let before = expect_changes(
        api,
        &families,
        &before,
        &[
            (&series(DOWNLOADS, "outcome", "malformed"), 1.0),
            (&series(DOWNLOADS, "outcome", "bad_mac"), 1.0),
        ],
    )
    .await?;
    let whole = http.get(&url).header("authorization", &auth).send().await?;
    // Counted while its body is being sent.
    expect_values(api, &[IN_FLIGHT], &[(IN_FLIGHT, 1.0)]).await?;
    anyhow::ensure!(whole.bytes().await?.len() == data.len());
    let part = http
        .get(&url)
        .header("authorization", &auth)
        .header("range", "bytes=0-99")
        .send()
        .await?;
    anyhow::ensure!(part.bytes().await?.len() == 100);
    expect_values(api, &[IN_FLIGHT], &[]).await?;
    let before = expect_changes(
        api,
        &families,
        &before,
        &[
            (&series(DOWNLOADS, "outcome", "full"), 1.0),
            (&series(DOWNLOADS, "outcome", "partial"), 1.0),
            (BYTES, (data.len() + 100) as f64),
        ],
    )
    .await?;

    // The agent reports its install failed, then (offered again) installed.
    for (seq, status) in [(1, 3), (2, 0)] {
        conn.send(&top_level_report(
            uid,
            seq,
            &offer,
            status,
            offer.all_packages_hash.clone(),
        ))
        .await?;
        conn.recv().await?;
    }
    let verified_before = snapshot(api, &[VERIFIED]).await?;
    expect_changes(
        api,
        &families,
        &before,
        &[
            (&series(INSTALLS, "outcome", "failed"), 1.0),
            (&series(INSTALLS, "outcome", "installed"), 1.0),
        ],
    )
    .await?;
    // Installed is not verified: the agent still runs its old build.
    expect_changes(api, &[VERIFIED], &verified_before, &[]).await?;
    // Back on the new build: verified, timed once (a repeat of the report counts nothing).
    let mut restarted = packaged_hello(uid, PKG_CAPS, "linux/amd64");
    for kv in &mut restarted
        .agent_description
        .as_mut()
        .expect("description")
        .identifying_attributes
    {
        if kv.key == "service.version" {
            kv.value = Some(proto::v1::AnyValue {
                value: Some(proto::v1::any_value::Value::StringValue("0.5.0".into())),
            });
        }
    }
    for seq in [3, 4] {
        restarted.sequence_num = seq;
        conn.send(&restarted).await?;
        conn.recv().await?;
    }
    expect_changes(api, &[VERIFIED], &verified_before, &[(VERIFIED, 1.0)]).await?;
    let text = api.text().await?;
    anyhow::ensure!(
        text.contains("ampora_package_time_to_verified_seconds_bucket{le=\"3600\"} 1"),
        "rendered as a histogram with its buckets"
    );
    server.stop().await
}
