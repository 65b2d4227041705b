//! Package profiles: the same imported build goes to a Collector supervisor as its unnamed
//! top-level package with only a Sigstore bundle, and to a generic agent as imported; a set
//! with an addon is never offered to the supervisor; and a supervised Collector's statuses,
//! reported under the empty name, still count for an upgrade of the build's own name.

use std::time::Duration;

use agent::Agent;
use serde_json::json;
use sha2::Digest as _;
use shared::ids::InstanceUid;
use shared::packages::{package_hash, PackageKind};
use tests::packages::{
    build, import, import_kind, packaged_hello_as, CosignSigner, Signer, GENERIC_AGENT, PKG_CAPS,
};
use tests::{bearer, eventually, TestServer};

use crate::packages::{start_upgrading_as, upgrade_state};

const WAIT: Duration = Duration::from_secs(20);
const COLLECTOR: &str = "otelcol-contrib";

/// The offer an agent named `service_name` gets on its first message, and its uid.
async fn first_offer(
    server: &TestServer,
    service_name: &str,
) -> anyhow::Result<(InstanceUid, Option<proto::v1::PackagesAvailable>)> {
    let token = server.api.token(&format!("probe-{service_name}")).await?;
    let uid = InstanceUid::new_v7();
    let mut conn = agent::WsConnection::connect(&server.ws_url(), &bearer(&token)).await?;
    conn.send(&packaged_hello_as(
        uid,
        PKG_CAPS,
        "linux/amd64",
        service_name,
    ))
    .await?;
    let reply = conn.recv().await?.unwrap_or_default();
    conn.close(1000, "done").await;
    Ok((uid, reply.packages_available))
}

async fn assign(server: &TestServer, name: &str, version: &str) -> anyhow::Result<()> {
    server
        .api
        .post(
            "/api/v1/packages/assignments",
            json!({ "name": name, "version": version, "all": true }),
        )
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_collector_supervisor_gets_its_build_unnamed_with_only_a_bundle() -> anyhow::Result<()> {
    let cosign = CosignSigner::new(7);
    let minisign = Signer::new();
    let (pem, key) = (cosign.public_pem(), minisign.public());
    let server = TestServer::start_with(move |c| {
        c.packages.trusted_cosign_keys = vec![pem];
        c.packages.trusted_keys = vec![key];
    })
    .await?;
    let bundled = build("0.3.0");
    let bundle = cosign.bundle(&bundled);
    let sha = sha2::Sha256::digest(&bundled).to_vec();
    let (status, body) = import(
        &server,
        COLLECTOR,
        "0.3.0",
        "linux/amd64",
        bundled,
        Some(&bundle),
    )
    .await?;
    anyhow::ensure!(status == 200, "import: {status} {body}");
    assign(&server, COLLECTOR, "0.3.0").await?;

    let (_, offer) = first_offer(&server, COLLECTOR).await?;
    let offer = offer.ok_or_else(|| anyhow::anyhow!("the supervisor was offered nothing"))?;
    let names: Vec<&String> = offer.packages.keys().collect();
    assert_eq!(names, [""], "the supervisor's one package is unnamed");
    let p = &offer.packages[""];
    assert_eq!(p.version, "0.3.0");
    assert_eq!(
        p.hash,
        package_hash("", PackageKind::TopLevel, "0.3.0", &sha).to_vec(),
        "the package hash covers the name it is offered under"
    );
    let file = p.file.clone().unwrap_or_default();
    assert_eq!(String::from_utf8_lossy(&file.signature), bundle);

    let (_, offer) = first_offer(&server, GENERIC_AGENT).await?;
    let offer = offer.ok_or_else(|| anyhow::anyhow!("the generic agent was offered nothing"))?;
    let file = offer.packages[COLLECTOR].file.clone().unwrap_or_default();
    assert_eq!(String::from_utf8_lossy(&file.signature), bundle);

    // A minisign signature is one the supervisor cannot parse: it is left out for it, and
    // carried as imported for the generic agent.
    let signed = build("0.4.0");
    let sig = minisign.sign(&signed);
    let (status, body) = import(
        &server,
        COLLECTOR,
        "0.4.0",
        "linux/amd64",
        signed,
        Some(&sig),
    )
    .await?;
    anyhow::ensure!(status == 200, "import: {status} {body}");
    assign(&server, COLLECTOR, "0.4.0").await?;
    let (_, offer) = first_offer(&server, COLLECTOR).await?;
    let p = offer.map(|o| o.packages[""].clone()).unwrap_or_default();
    assert_eq!(p.version, "0.4.0");
    assert!(p.file.unwrap_or_default().signature.is_empty());
    let (_, offer) = first_offer(&server, GENERIC_AGENT).await?;
    let file = offer
        .and_then(|o| o.packages[COLLECTOR].file.clone())
        .unwrap_or_default();
    assert_eq!(String::from_utf8_lossy(&file.signature), sig);

    // With an addon assigned too, the supervisor (which installs nothing else) is offered
    // nothing and told why; the generic agent gets both.
    let addon = build("ext-1.0");
    let sig = minisign.sign(&addon);
    let (status, body) = import_kind(
        &server,
        "ext",
        "1.0",
        "linux/amd64",
        "addon",
        addon,
        Some(&sig),
    )
    .await?;
    anyhow::ensure!(status == 200, "import: {status} {body}");
    assign(&server, "ext", "1.0").await?;
    let (uid, offer) = first_offer(&server, COLLECTOR).await?;
    assert!(
        offer.is_none(),
        "a set with an addon went to the supervisor"
    );
    let view = upgrade_state(&server, uid.0).await?;
    assert_eq!(view["state"], "cannot_upgrade", "{view}");
    assert_eq!(view["profile"], "collector_supervisor", "{view}");
    assert!(
        view["reason"]
            .as_str()
            .is_some_and(|r| r.contains("\"ext\" is an addon")),
        "{view}"
    );
    let (uid, offer) = first_offer(&server, GENERIC_AGENT).await?;
    assert_eq!(offer.map(|o| o.packages.len()), Some(2));
    assert_eq!(upgrade_state(&server, uid.0).await?["profile"], "generic");
    server.stop().await
}

/// The supervised Collector reports its build under the empty name; an upgrade rollout of the
/// build's own name still sees it installed and verified, and succeeds.
#[tokio::test]
async fn an_upgrade_of_a_named_build_succeeds_on_supervised_collectors() -> anyhow::Result<()> {
    let signer = Signer::new();
    let server = crate::packages::serve_trusting(&signer).await?;
    let data = build("0.2.0");
    let sig = signer.sign(&data);
    let (status, body) =
        import(&server, COLLECTOR, "0.2.0", "linux/amd64", data, Some(&sig)).await?;
    anyhow::ensure!(status == 200, "import: {status} {body}");
    let (agent, uid): (Agent, _) = start_upgrading_as(&server, "supervised", COLLECTOR).await?;
    let created = server
        .api
        .post(
            "/api/v1/rollouts",
            json!({ "package": COLLECTOR, "version": "0.2.0", "all": true, "stages": "100%", "soak": "0s" }),
        )
        .await?;
    let id = created["id"].as_i64().expect("rollout id");
    eventually("the rollout succeeded", WAIT, || async {
        let v = server.api.get(&format!("/api/v1/rollouts/{id}")).await?;
        Ok((v["rollout"]["state"] == "succeeded").then_some(()))
    })
    .await?;
    let view = upgrade_state(&server, uid).await?;
    assert_eq!(view["state"], "verified", "{view}");
    assert_eq!(view["reported"][""][0], "0.2.0", "{view}");
    agent.stop().await;
    server.stop().await
}
