//! Packages offered by the server (facts §3.6), handled as opamp-go's client does: the
//! agent's package set, what an offer changes in it, the downloads it asks for and the
//! `PackageStatuses` it reports. The downloads themselves are the I/O layer's
//! (`crate::download`), which reports each one's end with [`AgentCore::package_downloaded`].
//!
//! Like opamp-go, an offer is the complete set (what it leaves out is removed), a package
//! whose hash the agent already has is not fetched again, a failed download is never retried
//! by the agent (the server re-offers), and an offer's `all_packages_hash` is remembered only
//! once everything in it was installed: a repeat of it is then skipped, a repeat of one that
//! failed is worked on again.

use std::collections::BTreeMap;

use proto::agent_caps;
use proto::v1::{
    PackageStatus, PackageStatusEnum, PackageStatuses, PackageType, PackagesAvailable,
};

use super::{AgentCore, Outcome};
use crate::options::PackageView;

/// The identifying attribute a top-level package's version becomes once it is installed.
const SERVICE_VERSION: &str = "service.version";

/// A file to fetch for a package: [`Outcome::downloads`]. The result goes back to
/// [`AgentCore::package_downloaded`] with the job's `name` and `hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageDownload {
    pub name: String,
    pub version: String,
    /// The package's hash (`PackageAvailable.hash`): what the agent has once it installed it.
    pub hash: Vec<u8>,
    pub url: String,
    /// SHA-256 of the file's content (`DownloadableFile.content_hash`).
    pub content_hash: Vec<u8>,
    /// `DownloadableFile.headers`, sent with the request.
    pub headers: Vec<(String, String)>,
    /// `DownloadableFile.signature`: carried along, not checked (the agent installs nothing).
    pub signature: Vec<u8>,
}

/// The agent's packages and the offers it worked on.
#[derive(Debug, Default)]
pub(super) struct Packages {
    set: BTreeMap<String, Package>,
    /// `all_packages_hash` of the last offer worked on, echoed in every report.
    offered_all: Vec<u8>,
    /// `all_packages_hash` of the last offer fully installed: a repeat of it is skipped.
    synced_all: Option<Vec<u8>>,
}

#[derive(Debug)]
struct Package {
    top_level: bool,
    /// `None` until the agent installed some version of it.
    has: Option<(String, Vec<u8>)>,
    offered_version: String,
    offered_hash: Vec<u8>,
    status: PackageStatusEnum,
    error: String,
}

impl Packages {
    /// Once nothing of the current offer is downloading or failed, it is fully installed.
    fn settle(&mut self) {
        let done = self
            .set
            .values()
            .all(|p| p.status == PackageStatusEnum::Installed);
        if done {
            self.synced_all = Some(self.offered_all.clone());
        }
    }

    fn statuses(&self) -> PackageStatuses {
        PackageStatuses {
            packages: self
                .set
                .iter()
                .map(|(name, p)| {
                    let (has_version, has_hash) = p.has.clone().unwrap_or_default();
                    let status = PackageStatus {
                        name: name.clone(),
                        agent_has_version: has_version,
                        agent_has_hash: has_hash,
                        server_offered_version: p.offered_version.clone(),
                        server_offered_hash: p.offered_hash.clone(),
                        status: p.status as i32,
                        error_message: p.error.clone(),
                        download_details: None,
                    };
                    (name.clone(), status)
                })
                .collect(),
            server_provided_all_packages_hash: self.offered_all.clone(),
            error_message: String::new(),
        }
    }

    fn views(&self) -> BTreeMap<String, PackageView> {
        self.set
            .iter()
            .map(|(name, p)| {
                let view = PackageView {
                    version: p.has.as_ref().map(|h| h.0.clone()).unwrap_or_default(),
                    offered_version: p.offered_version.clone(),
                    status: status_name(p.status),
                    error: (!p.error.is_empty()).then(|| p.error.clone()),
                };
                (name.clone(), view)
            })
            .collect()
    }
}

impl Package {
    /// Installs what was offered, or fails with `error`. True when a top-level package was
    /// installed (the agent now runs another version).
    fn finish(&mut self, result: Result<(), String>) -> bool {
        match result {
            Ok(()) => {
                self.has = Some((self.offered_version.clone(), self.offered_hash.clone()));
                self.status = PackageStatusEnum::Installed;
                self.error.clear();
                self.top_level
            }
            Err(e) => {
                self.status = PackageStatusEnum::InstallFailed;
                self.error = e;
                false
            }
        }
    }
}

impl AgentCore {
    /// A `packages_available` offer (agents with AcceptsPackages): Downloading, with a
    /// download job, for every package whose hash the agent does not have; Installed for the
    /// others; the ones left out removed. Reports the statuses (with ReportsPackageStatuses).
    pub(super) fn on_packages(&mut self, offer: PackagesAvailable, out: &mut Outcome) {
        self.status.send_modify(|s| s.package_offers += 1);
        let pk = self.packages.get_or_insert_with(Box::default);
        if pk.synced_all.as_ref() == Some(&offer.all_packages_hash) {
            return;
        }
        // Another set: the one synced before no longer describes the agent's statuses, so a
        // later offer of it (a rollback after this one failed) is worked on, not skipped.
        pk.synced_all = None;
        pk.offered_all = offer.all_packages_hash;
        pk.set.retain(|name, _| offer.packages.contains_key(name));
        let opts = &self.opts;
        let mut upgraded_to = None;
        for (name, avail) in offer.packages {
            let p = pk.set.entry(name.clone()).or_insert_with(|| Package {
                top_level: false,
                has: None,
                offered_version: String::new(),
                offered_hash: Vec::new(),
                status: PackageStatusEnum::InstallPending,
                error: String::new(),
            });
            let in_flight =
                p.status == PackageStatusEnum::Downloading && p.offered_hash == avail.hash;
            p.top_level = avail.r#type == PackageType::TopLevel as i32;
            p.offered_version = avail.version;
            p.offered_hash = avail.hash;
            if p.has.as_ref().is_some_and(|h| h.1 == p.offered_hash) {
                p.status = PackageStatusEnum::Installed;
                p.error.clear();
                continue;
            }
            if in_flight {
                // A repeat while it is being fetched: its result is still to come.
                continue;
            }
            match avail.file.filter(|f| !f.download_url.is_empty()) {
                Some(file) => {
                    p.status = PackageStatusEnum::Downloading;
                    p.error.clear();
                    out.downloads.push(PackageDownload {
                        name,
                        version: p.offered_version.clone(),
                        hash: p.offered_hash.clone(),
                        url: file.download_url,
                        content_hash: file.content_hash,
                        headers: file
                            .headers
                            .map(|h| h.headers.into_iter().map(|h| (h.key, h.value)).collect())
                            .unwrap_or_default(),
                        signature: file.signature,
                    });
                }
                // Nothing to fetch: installed as is (as opamp-go does without a file).
                None => {
                    if p.finish(opts.install_error(&p.offered_version).map_or(Ok(()), Err)) {
                        upgraded_to = Some(p.offered_version.clone());
                    }
                }
            }
        }
        let started = out.downloads.len() as u64;
        self.status.send_modify(|s| s.package_downloads += started);
        if let Some(version) = upgraded_to {
            self.upgrade(version, out);
        }
        self.packages_changed(out);
    }

    /// A download of [`Outcome::downloads`] ended: `Ok` once its content was fetched and its
    /// hash checked. The package is installed (or fails to install, with
    /// [`crate::AgentOptions::package_install_fails`]) or fails with the download's error;
    /// it is not retried. Returns the statuses to send, and [`Outcome::upgraded`] when the
    /// top-level package was installed. The result of a download the agent no longer waits
    /// for (the package was removed or offered again with another hash) is dropped.
    pub fn package_downloaded(
        &mut self,
        name: &str,
        hash: &[u8],
        result: Result<(), String>,
    ) -> Outcome {
        let mut out = Outcome::default();
        let opts = &self.opts;
        let Some(p) = self
            .packages
            .as_mut()
            .and_then(|pk| pk.set.get_mut(name))
            .filter(|p| p.status == PackageStatusEnum::Downloading && p.offered_hash == hash)
        else {
            return out;
        };
        let fails = opts.install_error(&p.offered_version);
        let result = result.and_then(|()| fails.map_or(Ok(()), Err));
        if p.finish(result) {
            let version = p.offered_version.clone();
            self.upgrade(version, &mut out);
        }
        self.packages_changed(&mut out);
        out
    }

    /// Counts the bytes of package files downloaded (whatever became of them).
    pub fn count_package_bytes(&self, bytes: u64) {
        if bytes > 0 {
            self.status
                .send_modify(|s| s.package_bytes_downloaded += bytes);
        }
    }

    /// The agent's packages for a report: `None` before any offer.
    pub(super) fn package_statuses(&self) -> Option<PackageStatuses> {
        self.packages.as_ref().map(|pk| pk.statuses())
    }

    /// The new process forgets the downloads under way: they fail, and the offer they were
    /// for is no longer echoed, so that the server offers it again.
    pub(super) fn packages_after_restart(&mut self) {
        let Some(pk) = self.packages.as_mut() else {
            return;
        };
        let mut changed = false;
        for p in pk.set.values_mut() {
            if p.status == PackageStatusEnum::Downloading {
                p.status = PackageStatusEnum::InstallFailed;
                p.error = "download interrupted by a restart".into();
                changed = true;
            }
        }
        if changed {
            pk.offered_all = pk.synced_all.clone().unwrap_or_default();
            let views = pk.views();
            self.status.send_modify(|s| s.packages = views);
        }
    }

    /// The top-level package was installed: the agent now runs `version`, says so in its
    /// description and reconnects, as a restarted Collector would, opening with its full
    /// state.
    fn upgrade(&mut self, version: String, out: &mut Outcome) {
        let desc = &mut self.opts.description;
        match desc.iter_mut().find(|(k, _)| k == SERVICE_VERSION) {
            Some(kv) => kv.1 = version,
            None => desc.push((SERVICE_VERSION.into(), version)),
        }
        self.reconnecting = false;
        out.upgraded = true;
    }

    /// Publishes the package set and, for agents that report them, sends the statuses.
    fn packages_changed(&mut self, out: &mut Outcome) {
        let Some(pk) = self.packages.as_mut() else {
            return;
        };
        pk.settle();
        let views = pk.views();
        self.status.send_modify(|s| s.packages = views);
        if self.opts.capabilities & agent_caps::REPORTS_PACKAGE_STATUSES != 0 {
            let mut msg = self.base();
            msg.package_statuses = self.package_statuses();
            out.send.push(msg);
        }
    }
}

/// The status as the UI and tests name it (the proto name without its enum prefix).
fn status_name(s: PackageStatusEnum) -> &'static str {
    match s {
        PackageStatusEnum::Installed => "Installed",
        PackageStatusEnum::InstallPending => "InstallPending",
        PackageStatusEnum::Installing => "Installing",
        PackageStatusEnum::InstallFailed => "InstallFailed",
        PackageStatusEnum::Downloading => "Downloading",
    }
}
