//! Unit tests of package offers in the core: download jobs, statuses, repeats, removals,
//! download results, the top-level package's version and the capability gate.

use std::collections::BTreeMap;

use proto::v1::{
    DownloadableFile, Header, Headers, PackageAvailable, PackageStatusEnum, PackageType,
    PackagesAvailable,
};

use super::*;

const UID: [u8; 16] = [9; 16];

fn opts() -> AgentOptions {
    AgentOptions {
        instance_uid: Some(UID),
        description: vec![
            ("service.name".into(), "otelcol".into()),
            ("service.version".into(), "1.0".into()),
        ],
        accept_packages: true,
        ..AgentOptions::default()
    }
}

/// (name, type, version, package hash); files at `http://files/<name>`.
type Offered<'a> = (&'a str, PackageType, &'a str, &'a [u8]);

fn offer(all: &[u8], pkgs: &[Offered]) -> ServerToAgent {
    let packages = pkgs
        .iter()
        .map(|(name, kind, version, hash)| {
            let pkg = PackageAvailable {
                r#type: *kind as i32,
                version: version.to_string(),
                file: Some(DownloadableFile {
                    download_url: format!("http://files/{name}"),
                    content_hash: vec![0xC0, hash[0]],
                    signature: b"sig".to_vec(),
                    headers: Some(Headers {
                        headers: vec![Header {
                            key: "Authorization".into(),
                            value: "Bearer t".into(),
                        }],
                    }),
                }),
                hash: hash.to_vec(),
            };
            (name.to_string(), pkg)
        })
        .collect();
    ServerToAgent {
        instance_uid: UID.to_vec(),
        packages_available: Some(PackagesAvailable {
            packages,
            all_packages_hash: all.to_vec(),
        }),
        ..ServerToAgent::default()
    }
}

/// Per package name: (status, has version, error).
type Reported = BTreeMap<String, (i32, String, String)>;

/// The statuses of the only message in `out`, with the all-packages hash they echo.
fn statuses(out: &Outcome) -> (Vec<u8>, Reported) {
    assert_eq!(out.send.len(), 1, "{out:?}");
    let ps = out.send[0].package_statuses.as_ref().expect("statuses");
    let map = ps
        .packages
        .iter()
        .map(|(n, s)| {
            assert_eq!(&s.name, n);
            let v = (
                s.status,
                s.agent_has_version.clone(),
                s.error_message.clone(),
            );
            (n.clone(), v)
        })
        .collect();
    (ps.server_provided_all_packages_hash.clone(), map)
}

fn service_version(msg: &AgentToServer) -> Option<String> {
    let d = msg.agent_description.as_ref()?;
    d.identifying_attributes
        .iter()
        .find(|kv| kv.key == "service.version")
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
}

const DOWNLOADING: i32 = PackageStatusEnum::Downloading as i32;
const INSTALLED: i32 = PackageStatusEnum::Installed as i32;
const FAILED: i32 = PackageStatusEnum::InstallFailed as i32;

#[test]
fn an_offer_declares_downloads_and_reports_downloading() {
    let (mut core, rx) = AgentCore::new(opts());
    let caps = core.full_state().capabilities;
    assert_eq!(
        caps & (agent_caps::ACCEPTS_PACKAGES | agent_caps::REPORTS_PACKAGE_STATUSES),
        0x18
    );
    let out = core.on_message(offer(b"A1", &[("", PackageType::TopLevel, "2.0", b"h")]));
    assert_eq!(
        out.downloads,
        vec![PackageDownload {
            name: String::new(),
            version: "2.0".into(),
            hash: b"h".to_vec(),
            url: "http://files/".into(),
            content_hash: vec![0xC0, b'h'],
            headers: vec![("Authorization".into(), "Bearer t".into())],
            signature: b"sig".to_vec(),
        }]
    );
    let (all, st) = statuses(&out);
    assert_eq!(all, b"A1");
    assert_eq!(st[""], (DOWNLOADING, String::new(), String::new()));
    let ps = out.send[0].package_statuses.as_ref().expect("statuses");
    assert_eq!(ps.packages[""].server_offered_version, "2.0");
    assert_eq!(ps.packages[""].server_offered_hash, b"h");
    assert!(!out.upgraded);
    let s = rx.borrow().clone();
    assert_eq!((s.package_offers, s.package_downloads), (1, 1));
    assert_eq!(s.packages[""].status, "Downloading");
    assert_eq!(s.packages[""].offered_version, "2.0");
    // The full state carries them too.
    let full = core.full_state();
    let ps = full.package_statuses.expect("in the full state");
    assert_eq!(ps.packages[""].status, DOWNLOADING);
}

#[test]
fn a_repeated_offer_starts_nothing_new() {
    let (mut core, rx) = AgentCore::new(opts());
    let pkgs: &[Offered] = &[("a", PackageType::Addon, "1", b"a1")];
    assert_eq!(core.on_message(offer(b"A1", pkgs)).downloads.len(), 1);
    // While downloading: the same package is not fetched twice.
    let out = core.on_message(offer(b"A1", pkgs));
    assert!(out.downloads.is_empty());
    core.package_downloaded("a", b"a1", Ok(()));
    // Fully installed: a repeat of the offer is skipped altogether.
    let out = core.on_message(offer(b"A1", pkgs));
    assert!(out.downloads.is_empty() && out.send.is_empty(), "{out:?}");
    let s = rx.borrow().clone();
    assert_eq!((s.package_offers, s.package_downloads), (3, 1));
    // Another offer with what the agent has: Installed at once, nothing to fetch.
    let out = core.on_message(offer(b"A2", pkgs));
    assert!(out.downloads.is_empty());
    let (all, st) = statuses(&out);
    assert_eq!(all, b"A2");
    assert_eq!(st["a"], (INSTALLED, "1".into(), String::new()));
}

#[test]
fn packages_left_out_of_an_offer_are_removed() {
    let (mut core, rx) = AgentCore::new(opts());
    let out = core.on_message(offer(
        b"A1",
        &[
            ("a", PackageType::Addon, "1", b"a1"),
            ("b", PackageType::Addon, "1", b"b1"),
        ],
    ));
    assert_eq!(out.downloads.len(), 2);
    core.package_downloaded("a", b"a1", Ok(()));
    core.package_downloaded("b", b"b1", Ok(()));
    let out = core.on_message(offer(b"A2", &[("b", PackageType::Addon, "1", b"b1")]));
    let (_, st) = statuses(&out);
    assert_eq!(st.keys().collect::<Vec<_>>(), ["b"]);
    assert_eq!(rx.borrow().packages.keys().collect::<Vec<_>>(), ["b"]);
    // A late result for a removed package changes nothing.
    let late = core.package_downloaded("a", b"a1", Ok(()));
    assert!(late.send.is_empty());
}

#[test]
fn a_finished_download_installs_with_the_package_hash() {
    let (mut core, rx) = AgentCore::new(opts());
    core.on_message(offer(b"A1", &[("a", PackageType::Addon, "1.5", b"a1")]));
    let out = core.package_downloaded("a", b"a1", Ok(()));
    let (all, st) = statuses(&out);
    assert_eq!(all, b"A1");
    assert_eq!(st["a"], (INSTALLED, "1.5".into(), String::new()));
    let ps = out.send[0].package_statuses.as_ref().expect("statuses");
    assert_eq!(ps.packages["a"].agent_has_hash, b"a1");
    assert!(!out.upgraded, "an addon changes no version");
    let view = rx.borrow().packages["a"].clone();
    assert_eq!((view.version.as_str(), view.status), ("1.5", "Installed"));
    // A result for another hash (an older offer) is not this download's.
    let stale = core.package_downloaded("a", b"old", Ok(()));
    assert!(stale.send.is_empty());
}

#[test]
fn a_failed_download_reports_install_failed_and_is_retried_only_when_offered_again() {
    let (mut core, rx) = AgentCore::new(opts());
    let pkgs: &[Offered] = &[("a", PackageType::Addon, "2", b"a2")];
    core.on_message(offer(b"A1", pkgs));
    let out = core.package_downloaded("a", b"a2", Err("download failed: HTTP 401".into()));
    assert!(out.downloads.is_empty(), "no retry of its own");
    let (_, st) = statuses(&out);
    assert_eq!(
        st["a"],
        (FAILED, String::new(), "download failed: HTTP 401".into())
    );
    let view = rx.borrow().packages["a"].clone();
    assert_eq!(view.error.as_deref(), Some("download failed: HTTP 401"));
    // Not installed, so the same offer again is worked on again.
    let out = core.on_message(offer(b"A1", pkgs));
    assert_eq!(out.downloads.len(), 1);
    assert_eq!(statuses(&out).1["a"].0, DOWNLOADING);
}

#[test]
fn a_broken_installer_fails_after_the_download() {
    let (mut core, _rx) = AgentCore::new(AgentOptions {
        package_install_fails: Some("installer crashed".into()),
        ..opts()
    });
    core.on_message(offer(b"A1", &[("", PackageType::TopLevel, "2.0", b"h")]));
    let out = core.package_downloaded("", b"h", Ok(()));
    assert!(!out.upgraded);
    let (_, st) = statuses(&out);
    assert_eq!(st[""], (FAILED, String::new(), "installer crashed".into()));
    assert_eq!(service_version(&core.full_state()).as_deref(), Some("1.0"));
}

#[test]
fn installing_the_top_level_package_changes_the_version_and_reconnects() {
    let (mut core, rx) = AgentCore::new(AgentOptions {
        compact_reconnect: true,
        ..opts()
    });
    core.connect_message();
    core.on_message(offer(b"A1", &[("", PackageType::TopLevel, "2.0", b"h")]));
    let out = core.package_downloaded("", b"h", Ok(()));
    assert!(out.upgraded, "the I/O layer reconnects");
    assert_eq!(statuses(&out).1[""].0, INSTALLED);
    // The next connection opens with the full state (even for a compact reconnector), under
    // the new version.
    let first = core.connect_message();
    assert_eq!(service_version(&first).as_deref(), Some("2.0"));
    let ps = first.package_statuses.expect("statuses");
    assert_eq!(ps.packages[""].agent_has_version, "2.0");
    assert_eq!(rx.borrow().packages[""].version, "2.0");
}

#[test]
fn a_restarted_process_forgets_its_downloads() {
    let (mut core, rx) = AgentCore::new(opts());
    core.on_message(offer(b"A1", &[("a", PackageType::Addon, "1", b"a1")]));
    let mut core = core.process_restarted(false);
    let ps = core.full_state().package_statuses.expect("statuses");
    assert_eq!(ps.packages["a"].status, FAILED);
    assert!(
        ps.server_provided_all_packages_hash.is_empty(),
        "the server must offer again"
    );
    assert_eq!(rx.borrow().packages["a"].status, "InstallFailed");
    let out = core.on_message(offer(b"A1", &[("a", PackageType::Addon, "1", b"a1")]));
    assert_eq!(out.downloads.len(), 1);
}

#[test]
fn offers_are_ignored_without_accepts_packages() {
    let (mut core, rx) = AgentCore::new(AgentOptions {
        accept_packages: false,
        ..opts()
    });
    let out = core.on_message(offer(b"A1", &[("a", PackageType::Addon, "1", b"a1")]));
    assert!(out.downloads.is_empty() && out.send.is_empty());
    assert_eq!(rx.borrow().package_offers, 0);
    assert!(core.full_state().package_statuses.is_none());
}

#[test]
fn statuses_stay_unsent_without_reports_package_statuses() {
    let (mut core, _rx) = AgentCore::new(AgentOptions {
        accept_packages: false,
        capabilities: crate::options::DEFAULT_CAPABILITIES | agent_caps::ACCEPTS_PACKAGES,
        ..opts()
    });
    let out = core.on_message(offer(b"A1", &[("a", PackageType::Addon, "1", b"a1")]));
    assert_eq!(out.downloads.len(), 1);
    assert!(out.send.is_empty());
    assert!(core.package_downloaded("a", b"a1", Ok(())).send.is_empty());
    assert!(core.full_state().package_statuses.is_none());
}

#[test]
fn the_set_synced_before_a_failed_one_is_worked_on_again() {
    let (mut core, _rx) = AgentCore::new(AgentOptions {
        package_install_fails: Some("broken build".into()),
        package_install_fails_version: Some("2".into()),
        ..opts()
    });
    let old: &[Offered] = &[("a", PackageType::Addon, "1", b"a1")];
    core.on_message(offer(b"A1", old));
    core.package_downloaded("a", b"a1", Ok(()));
    // A newer set whose install fails: version 2 only.
    core.on_message(offer(b"A2", &[("a", PackageType::Addon, "2", b"a2")]));
    let out = core.package_downloaded("a", b"a2", Ok(()));
    let (_, st) = statuses(&out);
    assert_eq!(st["a"], (FAILED, "1".into(), "broken build".into()));
    // The server returns to the first set (a rollback): the agent has it, so it reports it
    // installed at once, echoing that set, instead of skipping it as already synced.
    let out = core.on_message(offer(b"A1", old));
    assert!(out.downloads.is_empty(), "{out:?}");
    let (all, st) = statuses(&out);
    assert_eq!(all, b"A1");
    assert_eq!(st["a"], (INSTALLED, "1".into(), String::new()));
}
