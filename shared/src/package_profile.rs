//! Package profiles: how an offer is shaped for the kind of agent that receives it, chosen
//! from the agent's description. The catalog keeps builds as imported; a profile decides
//! the name a package goes by on the wire, which signature travels with it, and which sets
//! the agent can take at all.
//!
//! - **Collector supervisor** (`opampsupervisor`): a Collector distribution (`service.name`
//!   `otelcol…`, as the Collector names itself after its command) that accepts packages (only
//!   the supervisor does; the in-process extension does not). It keeps exactly one package,
//!   the top-level one under the empty name, creates no other and never deletes it, and
//!   verifies a signature only as a Sigstore bundle (`.sigstore.json`). So its top-level
//!   build goes out under `""` whatever it was imported as, a set with an addon is not
//!   offered (the supervisor would fail it), and a signature that is not a bundle is left
//!   out rather than sent in a form it cannot parse. The version is carried as imported: the
//!   supervisor reports back what it was offered, and comparisons ignore a leading `v`.
//! - **Generic** (every other opamp-go agent and addon): names, versions and the signature
//!   exactly as imported.

use crate::domain::AgentRecord;
use crate::packages::{PackageKind, PackageReport};

/// Collector distributions name themselves after their command.
const COLLECTOR_PREFIXES: [&str; 2] = ["otelcol", "otelcorecol"];
/// The Collector's own `service.name` in some builds.
const COLLECTOR_NAMES: [&str; 1] = ["io.opentelemetry.collector"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Profile {
    Generic,
    CollectorSupervisor,
}

impl Profile {
    pub fn of(agent: &AgentRecord) -> Self {
        let accepts = agent.capabilities & proto::agent_caps::ACCEPTS_PACKAGES != 0;
        let collector = agent
            .description
            .get_str("service.name")
            .is_some_and(|n| is_collector(&n));
        if accepts && collector {
            Self::CollectorSupervisor
        } else {
            Self::Generic
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Generic => "generic",
            Self::CollectorSupervisor => "collector_supervisor",
        }
    }

    /// The key a package goes by in the offer (and in the agent's statuses).
    pub fn wire_name(self, name: &str, kind: PackageKind) -> &str {
        match (self, kind) {
            (Self::CollectorSupervisor, PackageKind::TopLevel) => "",
            _ => name,
        }
    }

    /// `DownloadableFile.signature` for a build imported with `signature`.
    pub fn wire_signature(self, signature: Option<&str>) -> Vec<u8> {
        let Some(sig) = signature else {
            return Vec::new();
        };
        match self {
            Self::CollectorSupervisor if !is_sigstore_bundle(sig) => Vec::new(),
            _ => sig.as_bytes().to_vec(),
        }
    }

    /// Why a set with these packages cannot go to the agent, if it cannot.
    pub fn refuses<'a>(
        self,
        packages: impl IntoIterator<Item = (&'a str, PackageKind)>,
    ) -> Option<String> {
        if self != Self::CollectorSupervisor {
            return None;
        }
        let mut top = 0;
        for (name, kind) in packages {
            if kind == PackageKind::Addon {
                return Some(format!(
                    "cannot upgrade: the Collector supervisor installs only its top-level \
                     package, and {name:?} is an addon"
                ));
            }
            top += 1;
        }
        (top > 1).then(|| {
            "cannot upgrade: the Collector supervisor installs one top-level package, and \
             more than one is assigned"
                .into()
        })
    }

    /// Whether the agent keeps packages it was not offered to itself (the supervisor never
    /// deletes its top-level package, so leaving it out orders nothing).
    pub fn deletes_left_out(self) -> bool {
        self == Self::Generic
    }
}

/// Whether `service_name` is a Collector distribution.
pub fn is_collector(service_name: &str) -> bool {
    COLLECTOR_NAMES.contains(&service_name)
        || COLLECTOR_PREFIXES
            .iter()
            .any(|p| service_name.starts_with(p))
}

/// A Sigstore bundle (`cosign sign-blob --bundle`, `.sigstore.json`), by its media type.
pub fn is_sigstore_bundle(signature: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(signature).is_ok_and(|v| {
        v.get("mediaType")
            .and_then(|m| m.as_str())
            .is_some_and(|m| m.starts_with("application/vnd.dev.sigstore.bundle"))
    })
}

/// What `agent` last reported of package `name` (a top-level package reported under the
/// name its profile gives it).
pub fn report_of<'a>(
    agent: &'a AgentRecord,
    name: &str,
    kind: PackageKind,
) -> Option<&'a PackageReport> {
    let wire = Profile::of(agent).wire_name(name, kind);
    agent.packages.as_deref()?.reported.get(wire)
}

/// Two versions are the same with or without a leading `v` (`v0.112.0` and `0.112.0`).
pub fn same_version(a: &str, b: &str) -> bool {
    a.strip_prefix('v').unwrap_or(a) == b.strip_prefix('v').unwrap_or(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::AgentRecord;

    fn agent(name: &str, caps: u64) -> AgentRecord {
        let mut r = AgentRecord::new(crate::ids::InstanceUid([1; 16]), 0);
        r.description.identifying.insert(
            "service.name".into(),
            serde_json::Value::String(name.into()),
        );
        r.capabilities = caps;
        r
    }

    #[test]
    fn a_collector_that_accepts_packages_is_supervised() {
        let accepts = proto::agent_caps::ACCEPTS_PACKAGES;
        assert_eq!(
            Profile::of(&agent("otelcol-contrib", accepts)),
            Profile::CollectorSupervisor
        );
        assert_eq!(
            Profile::of(&agent("io.opentelemetry.collector", accepts)),
            Profile::CollectorSupervisor
        );
        // The in-process extension does not accept packages; other agents are generic.
        assert_eq!(Profile::of(&agent("otelcol-contrib", 0)), Profile::Generic);
        assert_eq!(Profile::of(&agent("fluent-bit", accepts)), Profile::Generic);
    }

    #[test]
    fn the_supervisor_gets_its_top_level_package_unnamed_and_only_a_bundle() {
        let p = Profile::CollectorSupervisor;
        assert_eq!(p.wire_name("otelcol-contrib", PackageKind::TopLevel), "");
        assert_eq!(p.wire_name("ext", PackageKind::Addon), "ext");
        let bundle = r#"{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json"}"#;
        assert_eq!(p.wire_signature(Some(bundle)), bundle.as_bytes());
        assert!(p
            .wire_signature(Some("untrusted comment: minisign"))
            .is_empty());
        assert!(p.refuses([("", PackageKind::TopLevel)]).is_none());
        assert!(p
            .refuses([("", PackageKind::TopLevel), ("ext", PackageKind::Addon)])
            .is_some_and(|why| why.contains("\"ext\" is an addon")));
        let g = Profile::Generic;
        assert_eq!(
            g.wire_name("otelcol-contrib", PackageKind::TopLevel),
            "otelcol-contrib"
        );
        assert_eq!(g.wire_signature(Some("minisign")), b"minisign");
        assert!(g.refuses([("ext", PackageKind::Addon)]).is_none());
    }

    #[test]
    fn versions_match_with_or_without_a_leading_v() {
        assert!(same_version("v0.112.0", "0.112.0"));
        assert!(same_version("0.112.0", "0.112.0"));
        assert!(!same_version("0.112.0", "0.113.0"));
    }
}
