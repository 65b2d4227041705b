//! Package offers end to end over both transports: the fake server offers a top-level package
//! it serves itself; the agent downloads it on the side, reports its statuses and comes back
//! under the new version.

use proto::v1::PackageStatusEnum;

use super::*;

fn opts(endpoint: String) -> AgentOptions {
    AgentOptions {
        endpoint,
        instance_uid: Some([5; 16]),
        description: vec![
            ("service.name".into(), "otelcol".into()),
            ("service.version".into(), "1.0".into()),
        ],
        // No heartbeats or polls in the way: every message is one the test expects.
        heartbeat: Duration::from_secs(3600),
        accept_packages: true,
        ..AgentOptions::default()
    }
}

fn package_status(m: &AgentToServer) -> Option<(i32, String)> {
    let ps = m.package_statuses.as_ref()?;
    let p = ps.packages.get("")?;
    Some((p.status, p.agent_has_version.clone()))
}

fn service_version(m: &AgentToServer) -> Option<String> {
    let d = m.agent_description.as_ref()?;
    let kv = d
        .identifying_attributes
        .iter()
        .find(|kv| kv.key == "service.version")?;
    match kv.value.as_ref()?.value.as_ref()? {
        proto::v1::any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// Downloading, Installed, then the first message of a new connection: the full state under
/// the new version.
async fn installs_and_comes_back_as_the_new_version(ws: bool) {
    let srv = FakeServer::start(Script {
        package_at: Some((0, PKG_BODY)),
        ..Script::default()
    })
    .await;
    let url = if ws {
        srv.ws_url("/v1/opamp")
    } else {
        srv.http_url("/v1/opamp")
    };
    let agent = Agent::start(opts(url));
    let mut st = agent.status();
    let s = wait_for(&mut st, DEADLINE, |s| {
        s.packages.get("").is_some_and(|p| p.version == PKG_VERSION)
    })
    .await
    .expect("installed");
    assert_eq!(s.packages[""].status, "Installed");
    assert_eq!((s.package_offers, s.package_downloads), (1, 1));
    assert_eq!(s.package_bytes_downloaded, PKG_BODY.len() as u64);
    srv.until("the full state under 2.0", |l| {
        l.msgs
            .iter()
            .any(|(_, m)| service_version(m).as_deref() == Some(PKG_VERSION))
    })
    .await;
    agent.stop().await;

    let msgs = srv.msgs();
    let downloading = PackageStatusEnum::Downloading as i32;
    let installed = PackageStatusEnum::Installed as i32;
    assert_eq!(
        package_status(&msgs[1].1),
        Some((downloading, String::new()))
    );
    assert_eq!(
        package_status(&msgs[2].1),
        Some((installed, PKG_VERSION.to_string()))
    );
    let (after, first) = msgs[3..]
        .iter()
        .find(|(_, m)| m.agent_description.is_some())
        .expect("a full state after the install");
    assert_eq!(service_version(first).as_deref(), Some(PKG_VERSION));
    assert_eq!(
        package_status(first),
        Some((installed, PKG_VERSION.to_string()))
    );
    if ws {
        assert!(msgs[3].1.agent_disconnect.is_some(), "a goodbye first");
        // (The server counts the download's connection too.)
        assert_ne!(*after, msgs[0].0, "on a new connection");
        assert_eq!(srv.log.lock().expect("lock").close_codes[0], 1000);
    }
}

#[tokio::test]
async fn ws_agent_installs_a_top_level_package_and_reconnects_as_the_new_version() {
    installs_and_comes_back_as_the_new_version(true).await;
}

#[tokio::test]
async fn http_agent_installs_a_top_level_package_and_reports_the_new_version() {
    installs_and_comes_back_as_the_new_version(false).await;
}

#[tokio::test]
async fn a_file_with_the_wrong_content_fails_and_changes_nothing() {
    let srv = FakeServer::start(Script {
        package_at: Some((0, b"what the server meant to serve")),
        ..Script::default()
    })
    .await;
    let agent = Agent::start(opts(srv.http_url("/v1/opamp")));
    let mut st = agent.status();
    let s = wait_for(&mut st, DEADLINE, |s| {
        s.packages
            .get("")
            .is_some_and(|p| p.status == "InstallFailed")
    })
    .await
    .expect("failed");
    let error = s.packages[""].error.clone().unwrap_or_default();
    assert!(error.contains("content hash mismatch"), "{error}");
    assert_eq!(s.package_bytes_downloaded, PKG_BODY.len() as u64);
    srv.until("InstallFailed", |l| {
        l.msgs.iter().any(|(_, m)| {
            package_status(m).is_some_and(|p| p.0 == PackageStatusEnum::InstallFailed as i32)
        })
    })
    .await;
    agent.stop().await;
    assert!(srv
        .msgs()
        .iter()
        .all(|(_, m)| service_version(m).as_deref() != Some(PKG_VERSION)));
    assert_eq!(s.connections_established, 1);
}
