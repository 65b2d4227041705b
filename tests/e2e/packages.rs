//! Agent packages on the embedded default: only builds signed by a trusted key are imported;
//! an offer is the agent's whole set with content-derived hashes and a credential that opens
//! its own blob and nothing else; downloads are streamed with ranges; an agent that echoes the
//! set is not offered it again; an agent that cannot take the build is told why; the Rust
//! agent upgrades to verified, and a build that keeps failing is retried and then given up.

use std::time::Duration;

use agent::{Agent, AgentOptions, WsConnection};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shared::ids::InstanceUid;
use shared::packages::{all_packages_hash, package_hash, PackageKind};
use tests::packages::{
    build, download_of, import, import_kind, packaged_hello, probe_reply, top_level_file,
    top_level_report, CosignSigner, FileHost, Signer, PKG_CAPS,
};
use tests::{bearer, eventually, TestServer};

const WAIT: Duration = Duration::from_secs(20);

pub(crate) async fn serve_trusting(signer: &Signer) -> anyhow::Result<TestServer> {
    let key = signer.public();
    TestServer::start_with(move |c| {
        c.packages.trusted_keys = vec![key];
        c.packages.max_install_attempts = 2;
    })
    .await
}

#[tokio::test]
async fn only_builds_signed_by_a_trusted_key_are_imported() -> anyhow::Result<()> {
    let signer = Signer::new();
    let server = serve_trusting(&signer).await?;
    let data = build("0.2.0");
    let sig = signer.sign(&data);
    // Asked before the upload, without the build: unsigned is refused with the reason, the
    // signed one would be accepted.
    let check = |version: &'static str, sig: Option<String>| {
        let server = &server;
        async move {
            use base64::Engine as _;
            let mut req = reqwest::Client::new()
                .post(format!("{}/api/v1/packages/check", server.api.base))
                .query(&[
                    ("name", ""),
                    ("version", version),
                    ("platform", "linux/amd64"),
                ])
                .bearer_auth(&server.api.token);
            if let Some(s) = sig {
                req = req.header(
                    "x-ampora-signature",
                    base64::engine::general_purpose::STANDARD.encode(s),
                );
            }
            let resp = req.send().await?;
            let status = resp.status().as_u16();
            anyhow::Ok((status, resp.text().await?))
        }
    };
    let (status, text) = check("0.2.0", None).await?;
    assert!(
        status == 400 && text.contains("unsigned"),
        "{status} {text}"
    );
    assert_eq!(check("0.2.0", Some(sig.clone())).await?.0, 204);

    let (status, body) = import(
        &server,
        "",
        "0.2.0",
        "linux/amd64",
        data.clone(),
        Some(&sig),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sha256"], hex::encode(Sha256::digest(&data)));
    assert_eq!(body["size"], data.len());
    assert_eq!(body["signer"], signer.public());
    assert_eq!(
        check("0.2.0", Some(sig.clone())).await?.0,
        409,
        "imported before"
    );

    // Refused: the same build again, an unsigned one, one whose signature is of other bytes,
    // and one signed by a key nobody trusts. None of them leaves a file behind.
    let (status, body) = import(
        &server,
        "",
        "0.2.0",
        "linux/amd64",
        data.clone(),
        Some(&sig),
    )
    .await?;
    assert_eq!(status, 409, "{body}");
    let (status, body) = import(&server, "", "0.3.0", "linux/amd64", build("0.3.0"), None).await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("unsigned")),
        "{body}"
    );
    let (status, body) = import(
        &server,
        "",
        "0.3.0",
        "linux/amd64",
        build("0.3.0"),
        Some(&sig),
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("does not verify")),
        "{body}"
    );
    let stranger = Signer::new();
    let other = build("0.4.0");
    let (status, body) = import(
        &server,
        "",
        "0.4.0",
        "linux/amd64",
        other.clone(),
        Some(&stranger.sign(&other)),
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("trusts")),
        "{body}"
    );

    let listed = server.api.get("/api/v1/packages").await?;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let blobs: Vec<_> = std::fs::read_dir(server.dir.path().join("packages"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert_eq!(blobs, vec![hex::encode(Sha256::digest(&data))]);
    let audit = server.api.get("/api/v1/audit?limit=50").await?;
    assert!(
        audit
            .as_array()
            .is_some_and(|rows| rows.iter().any(|r| r["action"] == "package.import")),
        "{audit}"
    );
    server.stop().await
}

/// cosign with a key: a build signed with `cosign sign-blob --key` (a bare signature) or
/// with a Sigstore bundle is imported when the key is trusted, and the bundle is what its
/// agents are given; a signature by another key, or a bundle of other bytes, is refused.
#[tokio::test]
async fn cosign_signatures_and_sigstore_bundles_by_a_trusted_key_are_imported() -> anyhow::Result<()>
{
    let cosign = CosignSigner::new(5);
    let pem = cosign.public_pem();
    let server =
        TestServer::start_with(move |c| c.packages.trusted_cosign_keys = vec![pem]).await?;
    let bare = build("0.2.0");
    let (status, body) = import(
        &server,
        "",
        "0.2.0",
        "linux/amd64",
        bare.clone(),
        Some(&cosign.sign(&bare)),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["signer"]
            .as_str()
            .is_some_and(|s| s.starts_with("cosign:")),
        "{body}"
    );
    let bundled = build("0.3.0");
    let bundle = cosign.bundle(&bundled);
    let (status, body) = import(
        &server,
        "",
        "0.3.0",
        "linux/amd64",
        bundled.clone(),
        Some(&bundle),
    )
    .await?;
    assert_eq!(status, 200, "{body}");

    let stranger = CosignSigner::new(6);
    let other = build("0.4.0");
    for (what, sig) in [
        ("another key", stranger.sign(&other)),
        ("a bundle of other bytes", cosign.bundle(&bundled)),
        ("a bare signature of other bytes", cosign.sign(&bundled)),
    ] {
        let (status, body) = import(
            &server,
            "",
            "0.4.0",
            "linux/amd64",
            other.clone(),
            Some(&sig),
        )
        .await?;
        assert_eq!(status, 400, "{what}: {body}");
    }
    // A minisign signature is refused: no minisign key is trusted here.
    let (status, _) = import(
        &server,
        "",
        "0.4.0",
        "linux/amd64",
        other.clone(),
        Some(&Signer::new().sign(&other)),
    )
    .await?;
    assert_eq!(status, 400);

    assign_to_all(&server, "0.3.0").await?;
    let token = server.api.token("cosign").await?;
    let file = top_level_file(probe_reply(&server.ws_url(), &token).await?)?;
    assert_eq!(
        String::from_utf8_lossy(&file.signature),
        bundle,
        "the agent is given the bundle as imported"
    );
    server.stop().await
}

/// A build the operator hosts: imported by URL (fetched once and checked, nothing kept),
/// offered at that URL without an Ampora credential, and installed to verified by the Rust
/// agent from there. A URL whose file is not what was signed, or that answers 404, is refused.
#[tokio::test]
async fn a_build_hosted_elsewhere_is_imported_by_url_and_downloaded_from_there(
) -> anyhow::Result<()> {
    let signer = Signer::new();
    let server = serve_trusting(&signer).await?;
    let data = build("0.2.0");
    let host = FileHost::start("otelcol-0.2.0.tar.gz", data.clone()).await?;
    let import_url = |url: String, sig: String| {
        let server = &server;
        async move {
            use base64::Engine as _;
            let resp = reqwest::Client::new()
                .post(format!("{}/api/v1/packages", server.api.base))
                .query(&[
                    ("name", ""),
                    ("version", "0.2.0"),
                    ("platform", "linux/amd64"),
                    ("url", url.as_str()),
                ])
                .bearer_auth(&server.api.token)
                .header(
                    "x-ampora-signature",
                    base64::engine::general_purpose::STANDARD.encode(sig),
                )
                .send()
                .await?;
            let status = resp.status().as_u16();
            anyhow::Ok((status, resp.json::<Value>().await.unwrap_or(Value::Null)))
        }
    };
    let (status, body) = import_url(host.url.clone(), signer.sign(&build("0.2.1"))).await?;
    assert_eq!(status, 400, "a signature of other bytes: {body}");
    let (status, body) = import_url(format!("{}.missing", host.url), signer.sign(&data)).await?;
    assert!(
        status == 400 && body.to_string().contains("404"),
        "{status} {body}"
    );
    let (status, body) = import_url("file:///etc/passwd".into(), signer.sign(&data)).await?;
    assert_eq!(status, 400, "{body}");
    let (status, body) = import_url(host.url.clone(), signer.sign(&data)).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["url"], host.url);
    assert_eq!(body["sha256"], hex::encode(Sha256::digest(&data)));
    let fetched = host.served.load(std::sync::atomic::Ordering::Relaxed);
    let blobs = std::fs::read_dir(server.dir.path().join("packages"))?.count();
    assert_eq!(blobs, 0, "nothing kept");
    let base = format!("http://{}", server.addr);
    let (http, cookie) = tests::browser::console_session(&base, &server.api.token).await?;
    let page = http
        .get(format!("{base}/ui/packages"))
        .header("cookie", cookie);
    let page = page.send().await?.text().await?;
    assert!(page.contains(&format!("hosted at {}", host.url)), "{page}");

    let (agent, uid) = start_upgrading(&server, "external", false).await?;
    assign_all(&server).await?;
    eventually("the agent verified on the external build", WAIT, || async {
        let v = upgrade_state(&server, uid).await?;
        Ok((v["state"] == "verified").then_some(()))
    })
    .await?;
    assert!(
        host.served.load(std::sync::atomic::Ordering::Relaxed) > fetched,
        "the agent downloaded from the operator's host"
    );
    // What it was offered: the URL itself and no credential (it would open nothing there).
    let token = server.api.token("external-probe").await?;
    let file = top_level_file(probe_reply(&server.ws_url(), &token).await?)?;
    assert_eq!(file.download_url, host.url);
    assert!(file.headers.is_none(), "{:?}", file.headers);
    agent.stop().await;
    server.stop().await
}

/// The agent's own certificate is a download credential too: over TLS an agent with an
/// identity downloads a hosted build with no token; a TLS client without a certificate and
/// without a token is refused, and so is the identity once revoked.
#[tokio::test]
async fn an_agents_certificate_opens_hosted_builds_without_a_token() -> anyhow::Result<()> {
    let signer = Signer::new();
    let server = serve_trusting(&signer).await?;
    let data = build("0.2.0");
    let (status, body) = import(
        &server,
        "",
        "0.2.0",
        "linux/amd64",
        data.clone(),
        Some(&signer.sign(&data)),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    let sha = Sha256::digest(&data).to_vec();
    let url = format!("https://{}/v1/packages/{}", server.addr, hex::encode(&sha));
    let job = |url: &str| agent::PackageDownload {
        name: String::new(),
        version: "0.2.0".into(),
        hash: Vec::new(),
        url: url.to_owned(),
        content_hash: sha.clone(),
        headers: Vec::new(),
        signature: Vec::new(),
    };
    let ca = std::fs::read_to_string(server.dir.path().join("tls").join("ca.pem"))?;
    let token = server.api.token("cert-download").await?;
    let id = tests::identity::CsrIdentity::enroll(&server.wss_url(), &ca, &token).await?;

    let (bytes, got) = agent::download_package(&job(&url), Some(&id.client_tls(&ca)?), None).await;
    assert_eq!(got, Ok(()), "with its certificate");
    assert_eq!(bytes, data.len() as u64);
    let (_, got) =
        agent::download_package(&job(&url), Some(&agent::ClientTls::from_ca_pem(&ca)?), None).await;
    assert!(
        got.as_ref().is_err_and(|e| e.contains("401")),
        "no certificate, no token: {got:?}"
    );

    assert_eq!(server.api.revoke_identity(&id.serial).await?, 204);
    let (_, got) = agent::download_package(&job(&url), Some(&id.client_tls(&ca)?), None).await;
    assert!(got.is_err(), "a revoked identity opens nothing: {got:?}");
    server.stop().await
}

/// Outside the maintenance window an assigned upgrade waits: the agent is `pending` with the
/// window as the reason and is offered nothing.
#[tokio::test]
async fn outside_the_maintenance_window_an_upgrade_waits() -> anyhow::Result<()> {
    let signer = Signer::new();
    let key = signer.public();
    // An hour-long window half a day from now.
    let hour = (shared::now_ms() / 3_600_000 + 12) % 24;
    let window = format!("{hour:02}:00-{:02}:00", hour + 1);
    let shown = window.clone();
    let server = TestServer::start_with(move |c| {
        c.packages.trusted_keys = vec![key];
        c.packages.maintenance_windows = vec![window];
    })
    .await?;
    import_build(&server, &signer).await?;
    let (agent, uid) = start_upgrading(&server, "windowed", false).await?;
    assign_all(&server).await?;
    let view = eventually("the upgrade pending on the window", WAIT, || async {
        let v = upgrade_state(&server, uid).await?;
        Ok((v["state"] == "pending").then_some(v))
    })
    .await?;
    assert_eq!(
        view["reason"],
        format!("outside the maintenance window ({shown} UTC)"),
        "{view}"
    );
    assert_eq!(view["desired"][""], "0.2.0", "{view}");
    // The agent has sent messages since the assignment (heartbeats) and was offered nothing.
    let replies = agent.status().borrow().replies;
    agent::wait_for(&mut agent.status(), WAIT, |s| s.replies >= replies + 2).await?;
    assert_eq!(agent.status().borrow().package_offers, 0);
    assert_eq!(upgrade_state(&server, uid).await?["state"], "pending");
    agent.stop().await;
    server.stop().await
}

#[tokio::test]
async fn an_offer_opens_its_own_blob_and_nothing_else() -> anyhow::Result<()> {
    let signer = Signer::new();
    let server = serve_trusting(&signer).await?;
    let core = build("1.0.0");
    let addon = b"an addon".to_vec();
    for (name, data, kind) in [("", &core, "top_level"), ("ext", &addon, "addon")] {
        let sig = signer.sign(data);
        let (status, body) = import_kind(
            &server,
            name,
            "1.0.0",
            "linux/amd64",
            kind,
            data.clone(),
            Some(&sig),
        )
        .await?;
        assert_eq!(status, 200, "{kind}: {body}");
    }
    let (status, body) = import(
        &server,
        "ext",
        "1.0.0",
        "linux/amd64",
        addon.clone(),
        Some(&signer.sign(&addon)),
    )
    .await?;
    assert_eq!(status, 409, "{body}");
    for name in ["", "ext"] {
        server
            .api
            .post(
                "/api/v1/packages/assignments",
                json!({ "name": name, "version": "1.0.0", "all": true }),
            )
            .await?;
    }

    let token = server.api.token("pkg").await?;
    let uid = InstanceUid::new_v7();
    let mut conn = WsConnection::connect(&server.ws_url(), &bearer(&token)).await?;
    conn.send(&packaged_hello(uid, PKG_CAPS, "linux/x86_64"))
        .await?;
    let reply = conn.recv().await?.unwrap_or_default();
    assert_eq!(
        reply.capabilities & 0x18,
        0x18,
        "OffersPackages | AcceptsPackagesStatus"
    );
    let offer = reply
        .packages_available
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no offer: {reply:?}"))?;
    // The whole set, with hashes anyone can recompute from the bytes.
    let core_sha = Sha256::digest(&core).to_vec();
    let addon_sha = Sha256::digest(&addon).to_vec();
    let expect_core = package_hash("", PackageKind::TopLevel, "1.0.0", &core_sha);
    let expect_addon = package_hash("ext", PackageKind::Addon, "1.0.0", &addon_sha);
    assert_eq!(offer.packages.len(), 2);
    assert_eq!(offer.packages[""].hash, expect_core.to_vec());
    assert_eq!(offer.packages["ext"].r#type, 1);
    assert_eq!(
        offer.packages[""]
            .file
            .as_ref()
            .map(|f| f.content_hash.clone()),
        Some(core_sha.clone())
    );
    assert!(offer.packages[""]
        .file
        .as_ref()
        .is_some_and(|f| String::from_utf8_lossy(&f.signature).contains("test build")));
    assert_eq!(
        offer.all_packages_hash,
        all_packages_hash(&[expect_addon, expect_core]).to_vec()
    );

    // The download: whole, then a range; the credential is in the offer's headers.
    let (url, auth) = download_of(&reply, "").ok_or_else(|| anyhow::anyhow!("no credential"))?;
    let http = reqwest::Client::new();
    let full = http.get(&url).header("authorization", &auth).send().await?;
    assert_eq!(full.status().as_u16(), 200);
    assert_eq!(
        full.headers().get("etag").and_then(|v| v.to_str().ok()),
        Some(format!("\"{}\"", hex::encode(&core_sha)).as_str())
    );
    assert_eq!(full.content_length(), Some(core.len() as u64));
    assert_eq!(full.bytes().await?.as_ref(), core.as_slice());
    let part = http
        .get(&url)
        .header("authorization", &auth)
        .header("range", "bytes=100-199")
        .send()
        .await?;
    assert_eq!(part.status().as_u16(), 206);
    assert_eq!(part.bytes().await?.as_ref(), &core[100..200]);

    // What the credential does not open: the blob without it, another blob with it, and a
    // credential whose agent was changed.
    let (addon_url, _) = download_of(&reply, "ext").ok_or_else(|| anyhow::anyhow!("no ext"))?;
    let refused = [
        http.get(&url).send().await?,
        http.get(&addon_url)
            .header("authorization", &auth)
            .send()
            .await?,
        http.get(&url)
            .header(
                "authorization",
                auth.replacen(&hex::encode(uid.0), &hex::encode([7u8; 16]), 1),
            )
            .send()
            .await?,
    ];
    for r in refused {
        assert_eq!(r.status().as_u16(), 401, "{}", r.url());
    }

    // Echoing the set stops the offers; echoing another one brings it back.
    conn.send(&top_level_report(
        uid,
        1,
        &offer,
        0,
        offer.all_packages_hash.clone(),
    ))
    .await?;
    let reply = conn.recv().await?.unwrap_or_default();
    assert!(
        reply.packages_available.is_none(),
        "offered again: {reply:?}"
    );
    conn.send(&top_level_report(uid, 2, &offer, 0, vec![1; 32]))
        .await?;
    let reply = conn.recv().await?.unwrap_or_default();
    assert!(
        reply.packages_available.is_some(),
        "an agent echoing another set must get the offer again"
    );

    // An agent that does not accept packages, and one for which no build exists, get none,
    // and the API says why.
    for (caps, platform, why) in [
        (0x1, "linux/amd64", "does not accept packages"),
        (PKG_CAPS, "linux/arm64", "no artifact"),
    ] {
        let uid = InstanceUid::new_v7();
        let token = server.api.token(platform).await?;
        let mut conn = WsConnection::connect(&server.ws_url(), &bearer(&token)).await?;
        conn.send(&packaged_hello(uid, caps, platform)).await?;
        let reply = conn.recv().await?.unwrap_or_default();
        assert!(reply.packages_available.is_none(), "{platform}: {reply:?}");
        let view = eventually("the upgrade view", WAIT, || async {
            let v = server
                .api
                .get(&format!("/api/v1/agents/{uid}/upgrade"))
                .await?;
            Ok((v["state"] == "cannot_upgrade").then_some(v))
        })
        .await?;
        assert!(
            view["reason"].as_str().is_some_and(|r| r.contains(why)),
            "{view}"
        );
    }
    server.stop().await
}

pub(crate) fn upgrading_agent(server: &TestServer, token: String, fail: bool) -> AgentOptions {
    AgentOptions {
        endpoint: server.ws_url(),
        token: Some(token),
        description: vec![
            ("service.name".into(), tests::packages::GENERIC_AGENT.into()),
            ("service.version".into(), "0.1.0".into()),
        ],
        non_identifying: vec![
            ("os.type".into(), "linux".into()),
            ("host.arch".into(), "amd64".into()),
        ],
        capabilities: agent::DEFAULT_CAPABILITIES,
        heartbeat: Duration::from_secs(1),
        accept_packages: true,
        package_install_fails: fail.then(|| "installer exited with status 1".into()),
        ..AgentOptions::default()
    }
}

/// Imports build 0.2.0 for linux/amd64, signed by `signer`.
async fn import_build(server: &TestServer, signer: &Signer) -> anyhow::Result<()> {
    import_version(server, signer, "0.2.0").await
}

/// Imports build `version` of the top-level package for linux/amd64, signed by `signer`.
pub(crate) async fn import_version(
    server: &TestServer,
    signer: &Signer,
    version: &str,
) -> anyhow::Result<()> {
    let data = build(version);
    let sig = signer.sign(&data);
    let (status, body) = import(server, "", version, "linux/amd64", data, Some(&sig)).await?;
    anyhow::ensure!(status == 200, "import: {status} {body}");
    Ok(())
}

/// Assigns version 0.2.0 of the top-level package to every agent.
async fn assign_all(server: &TestServer) -> anyhow::Result<()> {
    assign_to_all(server, "0.2.0").await
}

/// Assigns `version` of the top-level package to every agent.
pub(crate) async fn assign_to_all(server: &TestServer, version: &str) -> anyhow::Result<()> {
    server
        .api
        .post(
            "/api/v1/packages/assignments",
            json!({ "name": "", "version": version, "all": true }),
        )
        .await?;
    Ok(())
}

/// A Rust agent on 0.1.0 that takes packages (`fail`: its installer always fails), once it
/// has its uid and is connected.
pub(crate) async fn start_upgrading(
    server: &TestServer,
    token_name: &str,
    fail: bool,
) -> anyhow::Result<(Agent, [u8; 16])> {
    let token = server.api.token(token_name).await?;
    started(upgrading_agent(server, token, fail)).await
}

/// [`start_upgrading`] of an agent whose `service.name` is `service_name`.
pub(crate) async fn start_upgrading_as(
    server: &TestServer,
    token_name: &str,
    service_name: &str,
) -> anyhow::Result<(Agent, [u8; 16])> {
    let token = server.api.token(token_name).await?;
    let mut opts = upgrading_agent(server, token, false);
    opts.description[0].1 = service_name.into();
    started(opts).await
}

/// Starts an agent and waits until it is connected with a uid.
async fn started(opts: AgentOptions) -> anyhow::Result<(Agent, [u8; 16])> {
    let agent = Agent::start(opts);
    let s = agent::wait_for(&mut agent.status(), WAIT, |s| {
        s.instance_uid.is_some() && s.connected
    })
    .await?;
    let uid = s.instance_uid.ok_or_else(|| anyhow::anyhow!("no uid"))?;
    Ok((agent, uid))
}

pub(crate) async fn upgrade_state(server: &TestServer, uid: [u8; 16]) -> anyhow::Result<Value> {
    let uid = InstanceUid(uid);
    server
        .api
        .get(&format!("/api/v1/agents/{uid}/upgrade"))
        .await
}

#[tokio::test]
async fn the_rust_agent_upgrades_to_verified() -> anyhow::Result<()> {
    let signer = Signer::new();
    let server = serve_trusting(&signer).await?;
    import_build(&server, &signer).await?;
    let (agent, uid) = start_upgrading(&server, "upgrade", false).await?;
    assert_eq!(upgrade_state(&server, uid).await?["state"], "none");

    assign_all(&server).await?;
    let view = eventually("the agent verified on 0.2.0", WAIT, || async {
        let v = upgrade_state(&server, uid).await?;
        Ok((v["state"] == "verified").then_some(v))
    })
    .await?;
    assert_eq!(view["desired"][""], "0.2.0");
    let record = server
        .api
        .agent(&InstanceUid(uid).to_string())
        .await?
        .ok_or_else(|| anyhow::anyhow!("agent gone"))?;
    assert_eq!(
        record["description"]["identifying"]["service.version"], "0.2.0",
        "the agent came back on the new build: {record}"
    );
    agent.stop().await;
    server.stop().await
}

#[tokio::test]
async fn a_failing_install_is_retried_then_given_up() -> anyhow::Result<()> {
    let signer = Signer::new();
    let server = serve_trusting(&signer).await?;
    import_build(&server, &signer).await?;
    let (agent, uid) = start_upgrading(&server, "failing", true).await?;
    assign_all(&server).await?;
    // max_install_attempts = 2: the server offers the build again once, then gives up.
    let view = eventually("the agent failed for good", WAIT, || async {
        let v = upgrade_state(&server, uid).await?;
        Ok((v["state"] == "failed").then_some(v))
    })
    .await?;
    assert_eq!(view["failed_attempts"], 2, "{view}");
    assert!(
        view["reason"]
            .as_str()
            .is_some_and(|r| r.contains("status 1")),
        "{view}"
    );
    let s = agent.status().borrow().clone();
    assert_eq!(s.package_downloads, 2, "one download per offer: {s:?}");
    let audit = server.api.get("/api/v1/audit?limit=50").await?;
    assert!(
        audit
            .as_array()
            .is_some_and(|rows| rows.iter().any(|r| r["action"] == "package.failed")),
        "{audit}"
    );
    agent.stop().await;
    server.stop().await
}

/// What a broken installer says: must show up as text on the agent page, never run.
const XSS_ERROR: &str = "<img src=x onerror=\"window.__xss=3\">";

#[tokio::test]
async fn the_console_shows_builds_assignments_and_each_agents_upgrade() -> anyhow::Result<()> {
    use crate::console::{sign_in, until_text};
    let signer = Signer::new();
    let server = serve_trusting(&signer).await?;
    import_build(&server, &signer).await?;
    assign_all(&server).await?;
    let good = Agent::start(upgrading_agent(
        &server,
        server.api.token("good").await?,
        false,
    ));
    let mut broken_opts = upgrading_agent(&server, server.api.token("broken").await?, true);
    broken_opts.package_install_fails = Some(XSS_ERROR.into());
    let broken = Agent::start(broken_opts);
    let mut uids = Vec::new();
    for a in [&good, &broken] {
        let mut rx = a.status();
        let s = agent::wait_for(&mut rx, WAIT, |s| s.instance_uid.is_some()).await?;
        uids.push(InstanceUid(
            s.instance_uid.ok_or_else(|| anyhow::anyhow!("no uid"))?,
        ));
    }
    for (uid, state) in [(uids[0], "verified"), (uids[1], "failed")] {
        eventually(state, WAIT, || async {
            let v = upgrade_state(&server, uid.0).await?;
            Ok((v["state"] == state).then_some(()))
        })
        .await?;
    }

    let b = tests::browser::Browser::start().await?;
    sign_in(&b, &server, &server.api.token).await?;
    b.goto(&format!("http://{}/ui/packages", server.addr))
        .await?;
    let row = b.text("#artifacts tbody tr").await?;
    assert!(
        row.contains("0.2.0") && row.contains("linux/amd64"),
        "{row}"
    );
    assert!(b
        .text("#package-assignments")
        .await?
        .contains("every agent"));
    b.screenshot("40-packages").await?;
    b.goto(&format!("http://{}/ui/agents/{}", server.addr, uids[0]))
        .await?;
    until_text(&b, "#upgrade", "the upgrade verified", |t| {
        t.contains("verified")
    })
    .await?;
    b.client
        .execute(
            "document.getElementById('upgrade').scrollIntoView();",
            vec![],
        )
        .await?;
    b.screenshot("41-agent-upgraded").await?;
    b.goto(&format!("http://{}/ui/agents/{}", server.addr, uids[1]))
        .await?;
    until_text(&b, "#upgrade", "the installer's error, as text", |t| {
        t.contains("failed") && t.contains(XSS_ERROR)
    })
    .await?;
    b.no_markup_ran().await?;
    b.client
        .execute(
            "document.getElementById('upgrade').scrollIntoView();",
            vec![],
        )
        .await?;
    b.screenshot("42-agent-upgrade-failed").await?;
    // The Fleet's filter: the failed upgrade is unfinished, the verified one is not.
    b.goto(&format!("http://{}/ui/?upgrade=unfinished", server.addr))
        .await?;
    let rows = b.text("table.fleet tbody").await?;
    assert!(
        rows.contains(&uids[1].to_string()) && !rows.contains(&uids[0].to_string()),
        "{rows}"
    );
    b.screenshot("45-fleet-upgrade-unfinished").await?;
    // And "upgrade available": the one still on 0.1.0 while 0.2.0 was imported.
    b.goto(&format!("http://{}/ui/?upgrade=available", server.addr))
        .await?;
    let rows = b.text("table.fleet tbody").await?;
    assert!(
        rows.contains(&uids[1].to_string()) && !rows.contains(&uids[0].to_string()),
        "{rows}"
    );
    b.screenshot("46-fleet-upgrade-available").await?;
    b.close().await?;
    good.stop().await;
    broken.stop().await;
    server.stop().await
}

#[tokio::test]
async fn agents_beyond_the_upgrade_cap_wait_for_a_slot() -> anyhow::Result<()> {
    let signer = Signer::new();
    let key = signer.public();
    let server = TestServer::start_with(move |c| {
        c.packages.trusted_keys = vec![key];
        c.packages.max_concurrent_upgrades = 1;
    })
    .await?;
    import_build(&server, &signer).await?;
    assign_all(&server).await?;
    let mut agents = Vec::new();
    for name in ["first", "second"] {
        let uid = InstanceUid::new_v7();
        let token = server.api.token(name).await?;
        let mut conn = WsConnection::connect(&server.ws_url(), &bearer(&token)).await?;
        conn.send(&packaged_hello(uid, PKG_CAPS, "linux/amd64"))
            .await?;
        let reply = conn.recv().await?.unwrap_or_default();
        agents.push((uid, conn, reply));
    }
    let offer =
        agents[0].2.packages_available.clone().ok_or_else(|| {
            anyhow::anyhow!("the first agent took the one slot: {:?}", agents[0].2)
        })?;
    assert!(
        agents[1].2.packages_available.is_none(),
        "the cap is 1: the second agent waits"
    );
    assert_eq!(
        upgrade_state(&server, agents[1].0 .0).await?["state"],
        "pending"
    );
    // The first reports its set installed: the slot goes to the second, pushed at once.
    let (uid, conn, _) = &mut agents[0];
    conn.send(&top_level_report(
        *uid,
        1,
        &offer,
        0,
        offer.all_packages_hash.clone(),
    ))
    .await?;
    conn.recv().await?;
    let pushed = tokio::time::timeout(WAIT, agents[1].1.recv())
        .await??
        .unwrap_or_default();
    assert_eq!(
        pushed.packages_available.map(|p| p.all_packages_hash),
        Some(offer.all_packages_hash)
    );
    server.stop().await
}
