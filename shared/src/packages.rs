//! Agent packages as every role sees them (OpAMP's packages messages, `opamp-facts.md` §3.6):
//! an imported artifact ([`Artifact`]), an operator's "this version for these agents"
//! ([`PackageAssignment`]), what an agent reports of its packages ([`AgentPackages`]), and the
//! three content-derived hashes every coordinator must compute to the same bytes.
//!
//! The hashes: `content_hash` is SHA-256 of the file; a package's hash covers its name, type,
//! version and content hash ([`package_hash`]); the aggregate covers the sorted package hashes
//! ([`all_packages_hash`]). Each part is length-prefixed, so no two different inputs share an
//! encoding.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::{AgentRecord, Target};

/// OpAMP's `PackageType`: the agent itself, or something it loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PackageKind {
    #[default]
    TopLevel,
    Addon,
}

impl PackageKind {
    /// The protobuf enum value.
    pub fn wire(self) -> i32 {
        match self {
            Self::TopLevel => 0,
            Self::Addon => 1,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "top_level" | "toplevel" | "top-level" => Some(Self::TopLevel),
            "addon" => Some(Self::Addon),
            _ => None,
        }
    }
}

/// One imported build: a package version's file for one platform, stored by its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub name: String,
    pub version: String,
    /// `<os.type>/<host.arch>`, e.g. `linux/amd64`.
    pub platform: String,
    pub kind: PackageKind,
    /// Lowercase hex SHA-256 of the file: its address in the blob store.
    pub sha256: String,
    pub size: u64,
    /// The detached signature as imported (a minisign signature file), sent to agents in
    /// `DownloadableFile.signature`.
    pub signature: Option<String>,
    /// Key id of the trusted key that verified `signature`; `None` when unsigned (allowed
    /// only by an explicit policy).
    pub signer: Option<String>,
    /// Where an operator hosts the build themselves: agents download it from there, without
    /// an Ampora credential. `None`: hosted by Ampora.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub author: String,
    pub created_ms: i64,
}

impl Artifact {
    /// The package hash of this artifact ([`package_hash`]).
    pub fn package_hash(&self) -> [u8; 32] {
        let content = hex::decode(&self.sha256).unwrap_or_default();
        package_hash(&self.name, self.kind, &self.version, &content)
    }
}

/// "This package version for these agents". Per package name the newest assignment matching
/// an agent wins; the set an agent is offered is every name's winner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageAssignment {
    pub id: i64,
    pub name: String,
    pub version: String,
    pub target: Target,
    pub author: String,
    pub created_ms: i64,
}

/// A package assignment about to be created.
#[derive(Debug, Clone)]
pub struct NewPackageAssignment {
    pub name: String,
    pub version: String,
    pub target: Target,
    pub author: String,
    pub created_ms: i64,
}

/// OpAMP's `PackageStatusEnum`, as an agent reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstallStatus {
    Installed,
    InstallPending,
    Installing,
    InstallFailed,
    Downloading,
}

impl InstallStatus {
    pub fn from_wire(v: i32) -> Option<Self> {
        Some(match v {
            0 => Self::Installed,
            1 => Self::InstallPending,
            2 => Self::Installing,
            3 => Self::InstallFailed,
            4 => Self::Downloading,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Installed => "installed",
            Self::InstallPending => "install_pending",
            Self::Installing => "installing",
            Self::InstallFailed => "install_failed",
            Self::Downloading => "downloading",
        }
    }
}

/// One package as the agent last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackageReport {
    pub has_version: String,
    /// Hex of `agent_has_hash`.
    pub has_hash: String,
    pub offered_version: String,
    /// Hex of `server_offered_hash`.
    pub offered_hash: String,
    pub status: InstallStatus,
    pub error: String,
    #[serde(default)]
    pub download_percent: Option<f64>,
}

/// What Ampora knows of an agent's packages: its last `PackageStatuses` and what was offered.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AgentPackages {
    pub reported: BTreeMap<String, PackageReport>,
    /// Hex of the `server_provided_all_packages_hash` the agent echoed.
    pub echoed_hash: String,
    pub error: String,
    /// Hex aggregate of the set last offered, and when.
    #[serde(default)]
    pub offered_hash: Option<String>,
    #[serde(default)]
    pub offered_ms: i64,
    /// Offers of `offered_hash` the agent answered with a failed install.
    #[serde(default)]
    pub failed_attempts: u32,
    /// When `offered_hash` was first offered (retries keep it): where the time to verified
    /// is counted from.
    #[serde(default)]
    pub first_offered_ms: i64,
    /// The last set the agent was verified on, so that it is counted once.
    #[serde(default)]
    pub verified_hash: Option<String>,
    /// Package name → the version the agent ran before Ampora first offered it another:
    /// where a rolled-back upgrade returns it when no assignment decides that package.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub before: BTreeMap<String, String>,
}

impl AgentPackages {
    /// Offered a set it is not (yet) verified on: downloading, installing, retrying, failed,
    /// or back on another build.
    pub fn upgrade_unfinished(&self) -> bool {
        self.offered_hash.is_some() && self.verified_hash != self.offered_hash
    }
}

/// SHA-256 over name, type, version and content hash, each length-prefixed.
pub fn package_hash(name: &str, kind: PackageKind, version: &str, content: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [
        name.as_bytes(),
        &kind.wire().to_be_bytes(),
        version.as_bytes(),
        content,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// SHA-256 over the package hashes in ascending order: the same set gives the same bytes,
/// whatever order it was built in.
pub fn all_packages_hash(hashes: &[[u8; 32]]) -> [u8; 32] {
    let mut sorted = hashes.to_vec();
    sorted.sort_unstable();
    let mut h = Sha256::new();
    h.update((sorted.len() as u64).to_be_bytes());
    for p in &sorted {
        h.update(p);
    }
    h.finalize().into()
}

/// The platform an agent reports (`os.type` / `host.arch` from its description, the
/// OpenTelemetry semantic conventions), if it reports both. `x86_64` and `aarch64` are
/// spelled `amd64` and `arm64`, as builds are named.
pub fn platform_of(agent: &AgentRecord) -> Option<String> {
    let attr = |k: &str| agent.description.get_str(k).map(|v| v.to_ascii_lowercase());
    let os = attr("os.type")?;
    let arch = match attr("host.arch")?.as_str() {
        "x86_64" => "amd64".to_owned(),
        "aarch64" => "arm64".to_owned(),
        other => other.to_owned(),
    };
    Some(format!("{os}/{arch}"))
}

/// Whether `agent` runs `version` of itself: its `service.version`, with or without the `v`
/// a package version may carry (the Collector's builds are `v0.112.0`, it reports `0.112.0`).
pub fn runs_version(agent: &AgentRecord, version: &str) -> bool {
    let running = agent.description.get_str("service.version");
    running.as_deref() == Some(version) || running.as_deref() == version.strip_prefix('v')
}

/// A package name or version as an operator may write it: printable, no path separators,
/// at most 128 bytes. The empty name is allowed (the Collector supervisor's top-level
/// package has none).
pub fn valid_label(s: &str) -> bool {
    s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+' | '~'))
}

/// A platform `os/arch`, both [`valid_label`] and non-empty.
pub fn valid_platform(s: &str) -> bool {
    matches!(s.split_once('/'), Some((os, arch))
        if !os.is_empty() && !arch.is_empty() && valid_label(os) && valid_label(arch))
}

/// The piece size of a hosted artifact kept in the store (cluster mode): what one bus
/// message between a gateway and a coordinator carries, well under NATS's default payload.
pub const BLOB_CHUNK_BYTES: usize = 512 * 1024;

/// Whether going from version `from` to `to` is a downgrade: both dotted numbers (a leading
/// `v` and any `-pre` / `+build` suffix aside) and `to` the lower. Versions that are not
/// dotted numbers are never called downgrades: their order is unknown.
pub fn is_downgrade(from: &str, to: &str) -> bool {
    fn parts(v: &str) -> Option<Vec<u64>> {
        let v = v.trim().trim_start_matches('v');
        let core = v.split(['-', '+']).next()?;
        core.split('.').map(|p| p.parse().ok()).collect()
    }
    match (parts(from), parts(to)) {
        (Some(mut a), Some(mut b)) => {
            let n = a.len().max(b.len());
            a.resize(n, 0);
            b.resize(n, 0);
            b < a
        }
        _ => false,
    }
}

/// A lowercase 64-digit hex SHA-256.
pub fn valid_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downgrades_are_lower_dotted_versions() {
        assert!(is_downgrade("0.110.0", "0.99.1"));
        assert!(is_downgrade("v1.2", "1.1.9"));
        assert!(is_downgrade("1.2.0", "1.1.0-rc1"));
        assert!(!is_downgrade("0.99.1", "0.110.0"));
        assert!(!is_downgrade("1.2", "1.2.0"), "equal");
        assert!(!is_downgrade("nightly", "0.1.0"), "unknown order");
    }

    #[test]
    fn the_aggregate_does_not_depend_on_order() {
        let a = package_hash("", PackageKind::TopLevel, "v0.1.0", &[1; 32]);
        let b = package_hash("ext", PackageKind::Addon, "1.0", &[2; 32]);
        assert_eq!(all_packages_hash(&[a, b]), all_packages_hash(&[b, a]));
        assert_ne!(all_packages_hash(&[a, b]), all_packages_hash(&[a]));
    }

    #[test]
    fn every_part_of_a_package_changes_its_hash() {
        let base = package_hash("otelcol", PackageKind::TopLevel, "1.0", &[1; 32]);
        assert_ne!(
            base,
            package_hash("otelcol2", PackageKind::TopLevel, "1.0", &[1; 32])
        );
        assert_ne!(
            base,
            package_hash("otelcol", PackageKind::Addon, "1.0", &[1; 32])
        );
        assert_ne!(
            base,
            package_hash("otelcol", PackageKind::TopLevel, "1.1", &[1; 32])
        );
        assert_ne!(
            base,
            package_hash("otelcol", PackageKind::TopLevel, "1.0", &[2; 32])
        );
        // Length prefixes: moving a byte from the name into the version is another package.
        assert_ne!(
            package_hash("ab", PackageKind::TopLevel, "c", &[]),
            package_hash("a", PackageKind::TopLevel, "bc", &[])
        );
    }

    #[test]
    fn the_hash_is_fixed_bytes() {
        // Coordinators of different builds must agree: pin the encoding.
        let h = package_hash("", PackageKind::TopLevel, "1", &[]);
        let mut expect = Sha256::new();
        for part in [&b""[..], &0i32.to_be_bytes(), b"1", &[]] {
            expect.update((part.len() as u64).to_be_bytes());
            expect.update(part);
        }
        assert_eq!(h, <[u8; 32]>::from(expect.finalize()));
    }

    #[test]
    fn labels_and_platforms() {
        assert!(valid_label("") && valid_label("v0.110.0") && valid_label("otelcol-contrib"));
        assert!(!valid_label("../x") && !valid_label("a b") && !valid_label(&"x".repeat(129)));
        assert!(valid_platform("linux/amd64"));
        assert!(!valid_platform("linux") && !valid_platform("/amd64") && !valid_platform("a/b/c"));
        assert!(valid_sha256(&"ab".repeat(32)) && !valid_sha256(&"AB".repeat(32)));
    }

    #[test]
    fn the_platform_comes_from_the_description() {
        let mut a = AgentRecord::new(
            crate::ids::InstanceUid::from_slice(&[1; 16]).expect("16 bytes"),
            0,
        );
        assert_eq!(platform_of(&a), None);
        a.description
            .non_identifying
            .insert("os.type".into(), "Linux".into());
        a.description
            .non_identifying
            .insert("host.arch".into(), "x86_64".into());
        assert_eq!(platform_of(&a).as_deref(), Some("linux/amd64"));
    }
}
