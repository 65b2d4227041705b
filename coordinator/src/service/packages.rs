//! Agent packages on the coordinator: the catalog (imported artifacts and package
//! assignments, read from the store at start and every lease round), the package set each
//! agent should have ([`Coordinator::package_offer`]), the download credentials stamped into
//! an offer as it leaves, pushes to connected agents when an assignment changes their set,
//! and each agent's upgrade state as operators read it. Importing an artifact (streaming,
//! hashing, the signature check) is [`super::package_import`].
//!
//! Hosting is on where the gateways can reach the bytes: the embedded default keeps blobs in
//! its data directory, served by its gateway; a cluster coordinator configured for hosting
//! keeps them in the store in pieces ([`Coordinator::blob_chunk`] answers gateways filling
//! their disk caches over the bus). Without [`PackageHosting`] imports are refused and
//! nothing is offered.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use proto::v1::{DownloadableFile, Header, Headers, PackageAvailable, PackagesAvailable};
use proto::{agent_caps, ServerToAgent};
use serde::Serialize;
use shared::bus::ControlEvent;
use shared::domain::{AgentRecord, Target, Transport};
use shared::download_token::DownloadKey;
use shared::ids::InstanceUid;
use shared::now_ms;
use shared::package_profile::{report_of, same_version, Profile};
use shared::packages::{
    all_packages_hash, package_hash, platform_of, runs_version, Artifact, InstallStatus,
    NewPackageAssignment, PackageAssignment, PackageKind,
};

use super::rollouts::Holding;
use super::{Coordinator, ServiceError};
use crate::session::{self, AgentState, PackageOffer};

/// Why imports and package assignments are refused where nothing is hosted.
pub const HOSTING_OFF: &str = "package hosting is off: a cluster coordinator hosts packages once packages.download_key_file is set";

/// Where hosted artifacts live and how they are handed out.
#[derive(Debug, Clone)]
pub struct PackageHosting {
    /// Content-addressed blobs: `<dir>/<sha256>`; with `blobs_in_store`, only imports in
    /// progress.
    pub dir: PathBuf,
    /// Blobs are written to the store in [`shared::packages::BLOB_CHUNK_BYTES`] pieces
    /// (cluster mode) rather than kept in `dir`.
    pub blobs_in_store: bool,
    /// Signs download tokens; the gateway serving `dir` checks them with the same key.
    pub key: DownloadKey,
    /// `http(s)://host:port/v1/packages`: a blob's URL is this plus `/<sha256>`.
    pub download_base: String,
    pub token_ttl_secs: u64,
    /// Failed installs of one package set before an agent is given up on.
    pub max_attempts: u32,
    /// Agents downloading and installing at once, per coordinator (`upgrade_slots`).
    pub max_concurrent_upgrades: usize,
    /// The trust policy imports are checked against.
    pub trust: super::package_trust::TrustPolicy,
    pub max_artifact_bytes: u64,
    /// When agents may start an upgrade (`packages.maintenance_windows`); empty: always.
    pub windows: Vec<super::maintenance::Window>,
}

/// Artifacts and assignments as last read, with the offers built from them.
#[derive(Default)]
pub(super) struct Catalog {
    artifacts: Vec<Artifact>,
    assignments: Vec<PackageAssignment>,
    /// Offers by (winners, platform, profile): a fleet has few distinct ones.
    offers: HashMap<OfferKey, Arc<PackageOffer>>,
}

/// Per winner its assignment or rollout key and version; the platform; the profile.
type OfferKey = (Vec<(i64, String)>, String, Profile);

/// The package set an agent should have, or why it cannot have it.
pub(super) type Wanted = Result<Arc<PackageOffer>, String>;

/// An agent's upgrade, as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UpgradeView {
    /// none, cannot_upgrade, pending, offered, downloading, installing, installed, verified,
    /// retrying, failed.
    pub state: String,
    /// Why the agent cannot upgrade, or its last error.
    pub reason: Option<String>,
    /// Package name → the version it should have.
    pub desired: BTreeMap<String, String>,
    /// Package name → (version it reports, status).
    pub reported: BTreeMap<String, (String, String)>,
    pub failed_attempts: u32,
    /// How offers are shaped for this agent, chosen from its description: `generic` or
    /// `collector_supervisor` ([`shared::package_profile`]).
    pub profile: &'static str,
}

const INSTALLS: &str = "ampora_package_installs_total";

/// Seconds from a set's first offer to the agent verified on it.
pub const TIME_TO_VERIFIED: &str = "ampora_package_time_to_verified_seconds";

/// Its buckets: from a download on a LAN to an hour of retries and backoff.
pub const TIME_TO_VERIFIED_BUCKETS: [f64; 10] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Describes the package metrics and creates their series at zero.
pub fn describe_metrics() {
    super::upgrade_slots::describe_metrics();
    metrics::describe_counter!(
        INSTALLS,
        "Package sets agents reported, by outcome: installed (every package of the set offered), failed (an install failed; each failure of a set counts once)"
    );
    for outcome in ["installed", "failed"] {
        metrics::counter!(INSTALLS, "outcome" => outcome).absolute(0);
    }
    metrics::describe_histogram!(
        TIME_TO_VERIFIED,
        metrics::Unit::Seconds,
        "From a package set's first offer to the agent verified on it (installed, running the new build, healthy), once per agent and set"
    );
}

impl Coordinator {
    /// Re-reads artifacts and package assignments; pushes changed sets to connected agents.
    /// Piece `index` of a hosted blob, for a gateway filling its cache (cluster mode). The
    /// gateway has checked a download credential for this blob first.
    pub(super) async fn blob_chunk(&self, sha256: &str, index: u32) -> shared::bus::BlobChunk {
        use shared::bus::BlobChunk;
        if !shared::packages::valid_sha256(sha256) {
            return BlobChunk::Missing;
        }
        match self.store.blob_chunk(sha256, index).await {
            Ok(Some(bytes)) => BlobChunk::Bytes(bytes),
            Ok(None) => BlobChunk::Missing,
            Err(e) => {
                tracing::warn!(error = %e, sha256, index, "reading a blob piece failed");
                BlobChunk::Error(e.to_string())
            }
        }
    }

    /// After an import or an assignment: this coordinator's catalog is current before the
    /// answer, and every other one re-reads its own now.
    pub(super) async fn packages_changed(&self) {
        self.sync_packages().await;
        if let Err(e) = self.bus.broadcast(ControlEvent::PackagesChanged).await {
            // The others catch up at their next lease round.
            tracing::warn!(error = %e, "announcing a package change failed");
        }
    }

    pub(super) async fn sync_packages(&self) {
        if self.cfg.packages.is_none() {
            return;
        }
        let (artifacts, assignments) = match tokio::try_join!(
            self.store.list_artifacts(),
            self.store.list_package_assignments()
        ) {
            Ok(both) => both,
            Err(e) => {
                tracing::warn!(error = %e, "loading packages failed");
                return;
            }
        };
        let changed = {
            let Ok(mut c) = self.package_catalog.write() else {
                return;
            };
            let changed = c.artifacts != artifacts || c.assignments != assignments;
            if changed {
                *c = Catalog {
                    artifacts,
                    assignments,
                    offers: HashMap::new(),
                };
            }
            changed
        };
        if changed {
            self.push_packages().await;
        }
    }

    /// The package set `record` should have: per package name the newest of the matching
    /// assignments and the upgrades (rollouts) that reached it, each with the artifact for
    /// the agent's platform. `None`: no package is assigned to it (or hosting is off).
    pub(super) fn package_offer(&self, record: &AgentRecord) -> Option<Wanted> {
        let hosting = self.cfg.packages.as_ref()?;
        let upgrades = self.upgrade_choices(record);
        let rolled_back = self.rolled_back_upgrades(record);
        let catalog = self.package_catalog.read().ok()?;
        if catalog.assignments.is_empty() && upgrades.is_empty() && rolled_back.is_empty() {
            return None;
        }
        // Name → (key, version, created): the key is an assignment's id, or minus an
        // upgrade's rollout id (the offers cache tells them apart).
        let mut winners: BTreeMap<&str, (i64, &str, i64)> = BTreeMap::new();
        for a in catalog.assignments.iter().rev() {
            if !winners.contains_key(a.name.as_str()) && self.target_admits(&a.target, record) {
                winners.insert(&a.name, (a.id, &a.version, a.created_ms));
            }
        }
        for (p, id, created) in &upgrades {
            if winners.get(p.name.as_str()).is_none_or(|w| w.2 < *created) {
                winners.insert(&p.name, (-id, &p.version, *created));
            }
        }
        // An upgrade rolled back returns the agents it reached to the version they ran
        // before, where nothing else decides the package for them.
        let before = record.packages.as_deref().map(|pk| &pk.before);
        for (p, created) in &rolled_back {
            if let Some(v) = before.and_then(|b| b.get(&p.name)) {
                if !winners.contains_key(p.name.as_str()) {
                    winners.insert(&p.name, (0, v, *created));
                }
            }
        }
        if winners.is_empty() {
            return None;
        }
        // A set is complete: one without a package the agent has would order it removed.
        // Ampora never means that (it has no removal), so the agent is offered nothing until
        // something decides that package for it too (an upgrade's rollback with no earlier
        // version to return to, an addon assigned where the agent reports its own build).
        let profile = Profile::of(record);
        if let Some(name) = kept_out(record, &winners).filter(|_| profile.deletes_left_out()) {
            return Some(Err(format!(
                "held: an offer without {name:?}, which the agent has installed, would remove \
                 it; assign a version of {name:?} to these agents too"
            )));
        }
        let Some(platform) = platform_of(record) else {
            return Some(Err(
                "cannot upgrade: the agent reports no os.type and host.arch".into(),
            ));
        };
        let key = (
            winners.values().map(|w| (w.0, w.1.to_owned())).collect(),
            platform.clone(),
            profile,
        );
        if let Some(o) = catalog.offers.get(&key) {
            return Some(Ok(o.clone()));
        }
        let mut chosen = Vec::with_capacity(winners.len());
        for (&name, &(_, version, _)) in &winners {
            let found = catalog
                .artifacts
                .iter()
                .find(|x| x.name == name && x.version == version && x.platform == platform);
            match found {
                Some(x) => chosen.push(x),
                None => {
                    return Some(Err(format!(
                        "cannot upgrade: no artifact of {name:?} {version} for {platform}"
                    )))
                }
            }
        }
        if let Some(why) = profile.refuses(chosen.iter().map(|a| (a.name.as_str(), a.kind))) {
            return Some(Err(why));
        }
        let offer = Arc::new(build_offer(&chosen, hosting, profile));
        drop(catalog);
        if let Ok(mut c) = self.package_catalog.write() {
            c.offers.insert(key, offer.clone());
        }
        Some(Ok(offer))
    }

    /// Whether a build of `name` `version` was imported for `record`'s platform.
    pub(super) fn has_build_for(&self, name: &str, version: &str, record: &AgentRecord) -> bool {
        let Some(platform) = platform_of(record) else {
            return false;
        };
        self.package_catalog.read().is_ok_and(|c| {
            c.artifacts
                .iter()
                .any(|x| x.name == name && x.version == version && x.platform == platform)
        })
    }

    /// Puts a fresh download token for `uid` into every package of `reply`'s offer that
    /// Ampora hosts.
    pub(super) fn stamp_downloads(&self, uid: InstanceUid, reply: &mut ServerToAgent) {
        let (Some(hosting), Some(offer)) = (&self.cfg.packages, reply.packages_available.as_mut())
        else {
            return;
        };
        let expires = u64::try_from(now_ms() / 1000).unwrap_or(0) + hosting.token_ttl_secs;
        for p in offer.packages.values_mut() {
            // Builds the operator hosts elsewhere get no Ampora credential.
            if let Some(f) = p.file.as_mut().filter(|f| {
                f.download_url
                    .strip_prefix(&hosting.download_base)
                    .is_some_and(|rest| rest.starts_with('/'))
            }) {
                let sha = hex::encode(&f.content_hash);
                let token = hosting.key.mint(uid, &sha, expires);
                f.headers = Some(Headers {
                    headers: vec![Header {
                        key: "Authorization".into(),
                        value: format!("Bearer {token}"),
                    }],
                });
            }
        }
    }

    /// The newest imported build per package and platform (the Fleet's "upgrade available").
    pub(super) fn newest_builds(&self) -> super::fleet::NewestBuilds {
        self.package_catalog
            .read()
            .map(|c| super::fleet::NewestBuilds::of(&c.artifacts))
            .unwrap_or_default()
    }

    /// Refuses a move of `target` to `version` of package `name` that would take agents to
    /// an older version than they report installed, unless `allowed` (said explicitly, and
    /// audited by the caller).
    pub(super) fn check_downgrade(
        &self,
        name: &str,
        version: &str,
        target: &Target,
        agents: &[AgentRecord],
        allowed: bool,
    ) -> Result<(), ServiceError> {
        if allowed {
            return Ok(());
        }
        let kind = self
            .package_catalog
            .read()
            .ok()
            .and_then(|c| c.artifacts.iter().find(|a| a.name == name).map(|a| a.kind))
            .unwrap_or(PackageKind::TopLevel);
        let mut from: Vec<&str> = agents
            .iter()
            .filter(|r| self.target_admits(target, r))
            .filter_map(|r| report_of(r, name, kind))
            .filter(|p| p.status == InstallStatus::Installed)
            .map(|p| p.has_version.as_str())
            .filter(|v| shared::packages::is_downgrade(v, version))
            .collect();
        if from.is_empty() {
            return Ok(());
        }
        let n = from.len();
        from.sort_unstable();
        from.dedup();
        Err(ServiceError::Conflict(format!(
            "{n} of these agents run a newer version of {name:?} ({}) than {version}: a downgrade is made only when asked for (allow_downgrade)",
            from.join(", ")
        )))
    }

    /// Creates a package assignment after checking that the version was imported, then pushes
    /// the new set to the connected agents it reaches.
    pub async fn assign_package(
        &self,
        name: String,
        version: String,
        target: Target,
        allow_downgrade: bool,
        author: &str,
    ) -> Result<PackageAssignment, ServiceError> {
        if self.cfg.packages.is_none() {
            return Err(ServiceError::Conflict(HOSTING_OFF.into()));
        }
        let artifacts = self.store.list_artifacts().await?;
        if !artifacts
            .iter()
            .any(|a| a.name == name && a.version == version)
        {
            return Err(ServiceError::NotFound(format!(
                "no artifact of package {name:?} version {version} was imported"
            )));
        }
        // An upgrade holds its agents until it ends: an assignment may not take them from it.
        let agents = self.agents().await?;
        if let Some((id, state, n)) = self.overlap(&target, &agents, Holding::Upgrades) {
            return Err(ServiceError::Conflict(format!(
                "{n} of these agents are in upgrade rollout {id} ({state}): finish, abort or roll it back first"
            )));
        }
        self.check_downgrade(&name, &version, &target, &agents, allow_downgrade)?;
        let created = self
            .store
            .create_package_assignment(NewPackageAssignment {
                name,
                version,
                target,
                author: author.to_string(),
                created_ms: now_ms(),
            })
            .await?;
        self.audit_op(
            author,
            "package.assign",
            None,
            serde_json::json!({
                "allow_downgrade": allow_downgrade,
                "assignment_id": created.id,
                "name": created.name,
                "version": created.version,
                "target": created.target,
            }),
        )
        .await?;
        self.packages_changed().await;
        Ok(created)
    }

    pub async fn list_artifacts(&self) -> Result<Vec<Artifact>, ServiceError> {
        Ok(self.store.list_artifacts().await?)
    }

    pub async fn list_package_assignments(&self) -> Result<Vec<PackageAssignment>, ServiceError> {
        Ok(self.store.list_package_assignments().await?)
    }

    /// Offers every connected WebSocket agent its package set if it changed (HTTP agents get
    /// it with their next poll).
    pub(super) async fn push_packages(&self) {
        let now = now_ms();
        let mut pushes = Vec::new();
        for slot in self.all_slots() {
            let mut e = slot.lock().await;
            let rec = &e.state.record;
            if !rec.connected || rec.transport != Some(Transport::WebSocket) {
                continue;
            }
            let Some(offer) = self
                .package_offer(rec)
                .and_then(Result::ok)
                .and_then(|o| self.admit_upgrade(rec, o))
            else {
                continue;
            };
            let uid = rec.instance_uid;
            if let Some(mut msg) = push(&mut e.state, &offer, now) {
                self.mark_dirty(uid);
                self.stamp_downloads(uid, &mut msg);
                pushes.push((uid, msg));
            }
        }
        self.deliver_all(pushes);
    }

    /// Counts the agent verified on `offer` the first time it is; true when that changed the
    /// record (the mark is stored, so it is counted once per set).
    pub(super) fn note_verified(&self, record: &mut AgentRecord, offer: &PackageOffer) -> bool {
        let newly = record.packages.as_deref().is_some_and(|pk| {
            pk.offered_hash.as_ref() == Some(&offer.hash_hex)
                && pk.verified_hash.as_ref() != Some(&offer.hash_hex)
        }) && verified(record, offer);
        if !newly {
            return false;
        }
        if let Some(pk) = record.packages.as_deref_mut() {
            pk.verified_hash = Some(offer.hash_hex.clone());
            let took_ms = now_ms().saturating_sub(pk.first_offered_ms).max(0);
            metrics::histogram!(TIME_TO_VERIFIED).record(took_ms as f64 / 1000.0);
        }
        true
    }

    /// Counts and audits what a frame's package events say.
    pub(super) async fn package_event(&self, uid: InstanceUid, ev: &session::Event) {
        let max = self.cfg.packages.as_ref().map_or(0, |h| h.max_attempts);
        match ev {
            session::Event::PackageFailed { attempts } => {
                metrics::counter!(INSTALLS, "outcome" => "failed").increment(1);
                if *attempts >= max {
                    self.audit(
                        "agent",
                        "package.failed",
                        Some(uid),
                        None,
                        Some("install_failed"),
                        serde_json::json!({ "attempts": attempts }),
                    )
                    .await;
                }
            }
            session::Event::PackagesInstalled => {
                metrics::counter!(INSTALLS, "outcome" => "installed").increment(1);
                self.audit(
                    "agent",
                    "package.installed",
                    Some(uid),
                    None,
                    None,
                    serde_json::json!({}),
                )
                .await;
            }
            _ => {}
        }
    }

    /// `record`'s upgrade as operators read it.
    pub fn upgrade_view(&self, record: &AgentRecord) -> UpgradeView {
        let pk = record.packages.as_deref().cloned().unwrap_or_default();
        let reported = pk
            .reported
            .iter()
            .map(|(n, r)| {
                (
                    n.clone(),
                    (r.has_version.clone(), r.status.as_str().to_owned()),
                )
            })
            .collect();
        let mut view = UpgradeView {
            state: "none".into(),
            reason: None,
            desired: BTreeMap::new(),
            reported,
            failed_attempts: pk.failed_attempts,
            profile: Profile::of(record).as_str(),
        };
        let offer = match self.package_offer(record) {
            None => return view,
            Some(Err(why)) => {
                view.state = "cannot_upgrade".into();
                view.reason = Some(why);
                return view;
            }
            Some(Ok(o)) => o,
        };
        view.desired = offer
            .msg
            .packages
            .iter()
            .map(|(n, p)| (n.clone(), p.version.clone()))
            .collect();
        let state = if record.capabilities & agent_caps::ACCEPTS_PACKAGES == 0 {
            view.reason = Some("cannot upgrade: the agent does not accept packages".into());
            "cannot_upgrade"
        } else if pk.offered_hash.as_deref() != Some(offer.hash_hex.as_str()) {
            // Not offered yet: waiting for an upgrade slot, a maintenance window, or its
            // next message.
            if let Some(h) = self.cfg.packages.as_ref() {
                if !super::maintenance::open(&h.windows, now_ms()) {
                    view.reason = Some(super::maintenance::closed_reason(&h.windows));
                }
            }
            "pending"
        } else if pk.echoed_hash != offer.hash_hex {
            "offered"
        } else if let Some(r) = pk
            .reported
            .values()
            .find(|r| r.status == InstallStatus::InstallFailed)
        {
            view.reason = Some(r.error.clone());
            if pk.failed_attempts >= offer.max_attempts {
                "failed"
            } else {
                "retrying"
            }
        } else if pk
            .reported
            .values()
            .any(|r| r.status == InstallStatus::Downloading)
        {
            "downloading"
        } else if pk.reported.values().any(|r| {
            matches!(
                r.status,
                InstallStatus::Installing | InstallStatus::InstallPending
            )
        }) {
            "installing"
        } else if verified(record, &offer) {
            "verified"
        } else {
            "installed"
        };
        view.state = state.into();
        view
    }
}

/// A package `record` reports installed that `winners` leaves out, if any.
fn kept_out<'a>(
    record: &'a AgentRecord,
    winners: &BTreeMap<&str, (i64, &str, i64)>,
) -> Option<&'a str> {
    let pk = record.packages.as_deref()?;
    pk.reported
        .iter()
        .find(|(name, r)| {
            r.status == InstallStatus::Installed && !winners.contains_key(name.as_str())
        })
        .map(|(name, _)| name.as_str())
}

/// The offer for `chosen` (one artifact per package name) as `profile` shapes it: content
/// hash, package hash, the aggregate, the signature and the URL; the credentials are added
/// per agent as it leaves.
fn build_offer(chosen: &[&Artifact], hosting: &PackageHosting, profile: Profile) -> PackageOffer {
    let mut packages = BTreeMap::new();
    let mut catalog_names = BTreeMap::new();
    let mut hashes = Vec::with_capacity(chosen.len());
    for a in chosen {
        let name = profile.wire_name(&a.name, a.kind);
        if name != a.name {
            catalog_names.insert(name.to_owned(), a.name.clone());
        }
        let content = hex::decode(&a.sha256).unwrap_or_default();
        let hash = package_hash(name, a.kind, &a.version, &content);
        hashes.push(hash);
        packages.insert(
            name.to_owned(),
            PackageAvailable {
                r#type: a.kind.wire(),
                version: a.version.clone(),
                file: Some(DownloadableFile {
                    download_url: a
                        .url
                        .clone()
                        .unwrap_or_else(|| format!("{}/{}", hosting.download_base, a.sha256)),
                    content_hash: content,
                    signature: profile.wire_signature(a.signature.as_deref()),
                    headers: None,
                }),
                hash: hash.to_vec(),
            },
        );
    }
    let all = all_packages_hash(&hashes);
    PackageOffer {
        hash_hex: hex::encode(all),
        msg: PackagesAvailable {
            packages,
            all_packages_hash: all.to_vec(),
        },
        max_attempts: hosting.max_attempts,
        catalog_names,
    }
}

/// A push of `offer` if the session rules send it now.
fn push(state: &mut AgentState, offer: &PackageOffer, now: i64) -> Option<ServerToAgent> {
    let mut msg = ServerToAgent {
        instance_uid: state.record.instance_uid.as_bytes().to_vec(),
        capabilities: session::SERVER_CAPABILITIES,
        ..Default::default()
    };
    let mut events = Vec::new();
    session::packages::offer(state, offer, false, now, &mut msg, &mut events);
    msg.packages_available.is_some().then_some(msg)
}

/// Every package installed at the offered version, the top-level one's version reported
/// as the agent's `service.version` (it restarted on it), and the agent healthy.
fn verified(record: &AgentRecord, offer: &PackageOffer) -> bool {
    let pk = record.packages.as_deref();
    let all_installed = offer.msg.packages.iter().all(|(name, p)| {
        pk.and_then(|pk| pk.reported.get(name)).is_some_and(|r| {
            r.status == InstallStatus::Installed && same_version(&r.has_version, &p.version)
        })
    });
    let top_level_running = offer
        .msg
        .packages
        .values()
        .filter(|p| p.r#type == 0)
        .all(|p| runs_version(record, &p.version));
    let healthy = record.health.as_ref().is_none_or(|h| h.healthy);
    all_installed && top_level_running && healthy
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::domain::Health;
    use shared::ids::InstanceUid;
    use shared::packages::{AgentPackages, PackageReport};

    fn offer_of(version: &str) -> PackageOffer {
        let mut packages = BTreeMap::new();
        packages.insert(
            String::new(),
            PackageAvailable {
                r#type: 0,
                version: version.into(),
                file: None,
                hash: vec![1; 32],
            },
        );
        PackageOffer {
            hash_hex: hex::encode([2u8; 32]),
            msg: PackagesAvailable {
                packages,
                all_packages_hash: vec![2; 32],
            },
            max_attempts: 3,
            ..Default::default()
        }
    }

    /// An agent that reports the top-level package `has` installed, runs `running`, healthy
    /// or not.
    fn agent(has: &str, running: &str, healthy: bool) -> AgentRecord {
        let mut r = AgentRecord::new(InstanceUid([4; 16]), 0);
        r.description
            .identifying
            .insert("service.version".into(), running.into());
        r.health = Some(Health {
            healthy,
            ..Health::default()
        });
        let report = PackageReport {
            has_version: has.into(),
            has_hash: String::new(),
            offered_version: has.into(),
            offered_hash: String::new(),
            status: InstallStatus::Installed,
            error: String::new(),
            download_percent: None,
        };
        r.packages = Some(Box::new(AgentPackages {
            reported: BTreeMap::from([(String::new(), report)]),
            ..AgentPackages::default()
        }));
        r
    }

    #[test]
    fn verified_needs_the_build_installed_running_and_healthy() {
        let o = offer_of("0.2.0");
        assert!(verified(&agent("0.2.0", "0.2.0", true), &o));
        // A `v`-prefixed package version against the bare service.version.
        assert!(verified(
            &agent("v0.2.0", "0.2.0", true),
            &offer_of("v0.2.0")
        ));
        assert!(
            !verified(&agent("0.2.0", "0.1.0", true), &o),
            "installed but still running the old build"
        );
        assert!(!verified(&agent("0.2.0", "0.2.0", false), &o), "unhealthy");
        assert!(
            !verified(&agent("0.1.0", "0.2.0", true), &o),
            "another build installed"
        );
    }
}
