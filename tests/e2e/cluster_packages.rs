//! Agent packages in cluster mode, in the in-process sandbox (real NATS, Redis, Postgres): a
//! build imported through one coordinator lives in Postgres, every gateway serves it from
//! its own disk cache after one read of the store however many download it at once, and an
//! upgrade rollout finishes when the coordinator driving it is killed mid-stage.

use std::time::Duration;

use agent::{Agent, AgentOptions, WsConnection};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shared::download_token::DownloadKey;
use shared::ids::InstanceUid;
use tests::cluster::Cluster;
use tests::packages::{
    download_of, event_kinds, import_via, packaged_hello, Signer, PKG_CAPS, TWO_STAGES_PROMOTED,
};
use tests::{bearer, eventually, Fleet, DEADLINE};

/// A download key for the whole sandbox, as operators would share one file; the key itself
/// too, so the test can mint credentials the nodes must accept or refuse.
fn shared_key(dir: &std::path::Path) -> anyhow::Result<(std::path::PathBuf, DownloadKey)> {
    let bytes: [u8; 32] = std::array::from_fn(|i| u8::try_from(i * 7 % 256).unwrap_or(0));
    let path = dir.join("download.key");
    std::fs::write(&path, format!("{}\n", hex::encode(bytes)))?;
    Ok((path, DownloadKey::new(bytes)))
}

/// A build of a bit over two and a half store pieces (512 KiB each), so the cache is filled
/// from several, the last one short.
fn big_build(version: &str) -> Vec<u8> {
    let mut b = format!("otelcol {version}\n").into_bytes();
    b.extend((0..1_400_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    b
}

async fn cluster_hosting(
    gateways: usize,
    coordinators: usize,
    signer: &Signer,
) -> anyhow::Result<(Cluster, DownloadKey, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let (key_file, key) = shared_key(dir.path())?;
    let public = signer.public();
    let c = Cluster::start(gateways, coordinators, move |cfg| {
        cfg.packages.trusted_keys = vec![public];
        cfg.packages.download_key_file = key_file;
        cfg.packages.max_install_attempts = 2;
    })
    .await?;
    Ok((c, key, dir))
}

async fn import(c: &Cluster, through: usize, signer: &Signer, data: &[u8]) -> anyhow::Result<()> {
    let sig = signer.sign(data);
    let (status, body) = import_via(
        &c.api_of(through)?,
        "",
        "0.2.0",
        "linux/amd64",
        "top_level",
        data.to_vec(),
        Some(&sig),
    )
    .await?;
    anyhow::ensure!(status == 200, "import: {status} {body}");
    Ok(())
}

/// `url` with its host and port replaced by gateway `i`'s.
fn via_gateway(c: &Cluster, i: usize, url: &str) -> anyhow::Result<String> {
    let path = url
        .splitn(4, '/')
        .nth(3)
        .ok_or_else(|| anyhow::anyhow!("no path in {url}"))?;
    Ok(format!("http://{}/{path}", c.gateway_addr(i)?))
}

#[tokio::test]
async fn every_gateway_serves_a_stored_build_after_one_read_of_the_store() -> anyhow::Result<()> {
    let signer = Signer::new();
    let (c, key, _dir) = cluster_hosting(2, 2, &signer).await?;
    let data = big_build("0.2.0");
    let sha = hex::encode(Sha256::digest(&data));
    // Imported through the second coordinator; offered by whichever owns the agent.
    import(&c, 1, &signer, &data).await?;
    c.api()
        .post(
            "/api/v1/packages/assignments",
            json!({ "name": "", "version": "0.2.0", "all": true }),
        )
        .await?;

    let token = c.api().token("cluster-pkg").await?;
    let uid = InstanceUid::new_v7();
    let mut conn = WsConnection::connect(&c.ws_url_of(1)?, &bearer(&token)).await?;
    conn.send(&packaged_hello(uid, PKG_CAPS, "linux/amd64"))
        .await?;
    // The owner of the agent may hear of the import a moment after the agent's hello: it
    // offers the set then, on the open connection.
    let reply = tokio::time::timeout(DEADLINE, async {
        loop {
            match conn.recv().await? {
                Some(r) if r.packages_available.is_some() => return Ok(r),
                Some(_) => {}
                None => anyhow::bail!("closed before an offer"),
            }
        }
    })
    .await??;
    let (url, auth) =
        download_of(&reply, "").ok_or_else(|| anyhow::anyhow!("no credential: {reply:?}"))?;
    assert!(
        url.starts_with(&format!("http://{}/v1/packages/", c.gateway_addr(0)?)),
        "offered at the public endpoint's host (the first gateway here): {url}"
    );
    assert!(url.ends_with(&sha), "{url}");

    let http = reqwest::Client::new();
    for g in 0..2 {
        assert_eq!(c.gateway_of(g)?.blobs_fetched(), 0, "gateway {g} before");
        let url = via_gateway(&c, g, &url)?;
        // Eight first downloads at once on a cold cache: one read of the store.
        let mut gets = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (http, url, auth) = (http.clone(), url.clone(), auth.clone());
            gets.spawn(async move {
                let r = http.get(&url).header("authorization", &auth).send().await?;
                let status = r.status().as_u16();
                let etag = r
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                Ok::<_, anyhow::Error>((status, etag, r.bytes().await?))
            });
        }
        while let Some(got) = gets.join_next().await {
            let (status, etag, body) = got??;
            assert_eq!(status, 200, "gateway {g}");
            assert_eq!(etag, format!("\"{sha}\""));
            assert!(
                body.as_ref() == data.as_slice(),
                "gateway {g}: the bytes differ"
            );
        }
        // A resumed download, served from the cache.
        let part = http
            .get(&url)
            .header("authorization", &auth)
            .header("range", "bytes=1000000-")
            .send()
            .await?;
        assert_eq!(part.status().as_u16(), 206);
        assert!(part.bytes().await?.as_ref() == &data[1_000_000..]);
        assert_eq!(
            c.gateway_of(g)?.blobs_fetched(),
            1,
            "gateway {g} read the blob from the store once"
        );
    }

    // The key is shared: a credential minted with it for a blob nobody stored opens nothing
    // (and costs no cache entry); one minted with another key is refused before any read.
    let unknown = "0f".repeat(32);
    let expires = u64::try_from(shared::now_ms() / 1000)? + 60;
    let minted = key.mint(uid, &unknown, expires);
    let missing = http
        .get(format!(
            "http://{}/v1/packages/{unknown}",
            c.gateway_addr(1)?
        ))
        .bearer_auth(&minted)
        .send()
        .await?;
    assert_eq!(missing.status().as_u16(), 404);
    // Bytes in the store that do not hash to their address are never served nor cached.
    let store = coordinator::store::PgStore::connect(&c.base.cluster.postgres_url, 1).await?;
    let bogus = hex::encode(Sha256::digest(b"what the address promises"));
    shared::store::PackageStore::put_blob_chunk(&store, &bogus, 0, b"something else").await?;
    let corrupt = http
        .get(format!("http://{}/v1/packages/{bogus}", c.gateway_addr(1)?))
        .bearer_auth(key.mint(uid, &bogus, expires))
        .send()
        .await?;
    assert_eq!(corrupt.status().as_u16(), 503);
    let again = http
        .get(format!("http://{}/v1/packages/{bogus}", c.gateway_addr(1)?))
        .bearer_auth(key.mint(uid, &bogus, expires))
        .send()
        .await?;
    assert_eq!(again.status().as_u16(), 503, "nothing was cached");
    let forged = DownloadKey::new([1; 32]).mint(uid, &sha, expires);
    let refused = http
        .get(via_gateway(&c, 1, &url)?)
        .bearer_auth(&forged)
        .send()
        .await?;
    assert_eq!(refused.status().as_u16(), 401);
    assert_eq!(c.gateway_of(1)?.blobs_fetched(), 1);
    c.stop().await
}

fn cluster_agent(endpoint: String, token: String) -> AgentOptions {
    AgentOptions {
        endpoint,
        token: Some(token),
        description: vec![
            ("service.name".into(), "otelcol".into()),
            ("service.version".into(), "0.1.0".into()),
        ],
        non_identifying: vec![
            ("os.type".into(), "linux".into()),
            ("host.arch".into(), "amd64".into()),
        ],
        capabilities: agent::DEFAULT_CAPABILITIES,
        heartbeat: Duration::from_secs(1),
        accept_packages: true,
        ..AgentOptions::default()
    }
}

async fn rollout(c: &Cluster, via: usize, id: i64) -> anyhow::Result<Value> {
    c.api_of(via)?.get(&format!("/api/v1/rollouts/{id}")).await
}

#[tokio::test]
async fn an_upgrade_finishes_when_its_driving_coordinator_is_killed_mid_stage() -> anyhow::Result<()>
{
    let signer = Signer::new();
    let (mut c, _key, _dir) = cluster_hosting(1, 2, &signer).await?;
    import(&c, 0, &signer, &big_build("0.2.0")).await?;
    let mut agents = Vec::new();
    for i in 0..6 {
        let token = c.api().token(&format!("killed-{i}")).await?;
        let a = Agent::start(cluster_agent(c.ws_url_of(0)?, token));
        agent::wait_for(&mut a.status(), DEADLINE, |s| {
            s.instance_uid.is_some() && s.connected
        })
        .await?;
        agents.push(a);
    }
    let created = c
        .api()
        .post(
            "/api/v1/rollouts",
            json!({ "package": "", "version": "0.2.0", "all": true, "stages": "1,100%", "soak": "1h" }),
        )
        .await?;
    let id = created["id"].as_i64().expect("rollout id");
    let partition = coordinator::service::rollouts::driver_partition(id);
    let holders = c.partition_holders().await?;
    let driver = holders
        .iter()
        .find(|(p, _)| *p == partition)
        .map(|(_, h)| h.clone())
        .ok_or_else(|| anyhow::anyhow!("nobody holds partition {partition}"))?;
    let (killed, survivor) = if driver == "coord-0" { (0, 1) } else { (1, 0) };

    eventually(
        "the canary verified, its stage settled",
        DEADLINE,
        || async {
            let v = rollout(&c, survivor, id).await?;
            let stage = &v["stages"][0];
            Ok((stage["progress"]["applied"] == 1 && !stage["settled_ms"].is_null()).then_some(()))
        },
    )
    .await?;
    // Promoted into the last stage, and its driver dies at once, while the rest download.
    c.api_of(survivor)?
        .post(&format!("/api/v1/rollouts/{id}/promote"), json!({}))
        .await?;
    c.kill_coordinator(killed);

    let done = eventually(
        "the last stage verified and settled",
        DEADLINE * 2,
        || async {
            let v = rollout(&c, survivor, id).await?;
            let stage = &v["stages"][1];
            Ok((stage["progress"]["applied"] == 5 && !stage["settled_ms"].is_null()).then_some(v))
        },
    )
    .await?;
    assert_eq!(done["rollout"]["state"], "running", "{done}");
    let finished = c
        .api_of(survivor)?
        .post(&format!("/api/v1/rollouts/{id}/promote"), json!({}))
        .await?;
    assert_eq!(finished["state"], "succeeded", "{finished}");
    for a in &agents {
        let s = a.status().borrow().clone();
        let top = s.packages.get("").cloned().unwrap_or_default();
        assert_eq!(
            (top.version.as_str(), top.status),
            ("0.2.0", "Installed"),
            "every agent has the new build"
        );
    }
    // Taken over without a step lost or written twice.
    let (kinds, history) = event_kinds(&c.api_of(survivor)?, id).await?;
    assert_eq!(kinds, TWO_STAGES_PROMOTED, "{history}");
    let holders = c.partition_holders().await?;
    assert!(
        holders
            .iter()
            .any(|(p, h)| *p == partition && *h == format!("coord-{survivor}")),
        "the survivor drives it now: {holders:?}"
    );
    for a in agents {
        a.stop().await;
    }
    c.stop().await
}
