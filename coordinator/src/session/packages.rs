//! Packages in the session core (facts §3.6): recording an agent's `PackageStatuses` and
//! deciding when its desired package set goes out in `packages_available`. Pure, like the rest
//! of the core: the caller builds the [`PackageOffer`] (which artifacts, which hashes) and
//! stamps the download credentials into the reply after the decision.
//!
//! The rules:
//! - statuses are recorded only from agents that declare ReportsPackageStatuses, offers made
//!   only to agents that declare AcceptsPackages (else one CapMismatch per connection);
//! - an agent whose echoed `server_provided_all_packages_hash` matches the offer gets no
//!   resend; one that reports another echo gets the offer with the reply to that report, and
//!   otherwise once per connection and again after [`super::REOFFER_AFTER_MS`] without an
//!   answer;
//! - an install the agent reports failed is offered again (clients built on opamp-go never
//!   retry by themselves) after a back-off that doubles from [`RETRY_BASE_MS`] with a jitter
//!   drawn from the agent's uid, until `max_attempts` failures; then the agent is failed.

use proto::agent_caps;
use proto::v1::{AgentToServer, PackagesAvailable, ServerToAgent};
use shared::package_profile::same_version;
use shared::packages::{AgentPackages, InstallStatus, PackageReport};

use super::{AgentState, Event, REOFFER_AFTER_MS};

/// First retry of a failed install after this long; each further one waits twice as long.
pub const RETRY_BASE_MS: i64 = 5_000;
/// The back-off stops doubling here.
pub const RETRY_CAP_MS: i64 = 10 * 60_000;

/// The package set an agent should have, ready to send (without download credentials).
#[derive(Debug, Clone, Default)]
pub struct PackageOffer {
    /// Hex of `msg.all_packages_hash`.
    pub hash_hex: String,
    pub msg: PackagesAvailable,
    /// Failed installs of this set after which the agent is given up on.
    pub max_attempts: u32,
    /// Name in `msg` → the catalog's name, where the agent's profile renamed a package.
    pub catalog_names: std::collections::BTreeMap<String, String>,
}

/// Notes, the first time a package is offered at another version than the agent runs, the
/// version it ran (installed as reported, or for its own build its `service.version`).
fn note_before(state: &mut AgentState, offer: &PackageOffer) {
    let running = state.record.description.get_str("service.version");
    let Some(pk) = state.record.packages.as_mut() else {
        return;
    };
    for (wire, p) in &offer.msg.packages {
        let name = offer.catalog_names.get(wire).unwrap_or(wire);
        if pk.before.contains_key(name) {
            continue;
        }
        let installed = pk
            .reported
            .get(wire)
            .filter(|r| r.status == InstallStatus::Installed)
            .map(|r| r.has_version.clone());
        let has = installed.or_else(|| (p.r#type == 0).then(|| running.clone()).flatten());
        if let Some(v) = has.filter(|v| !same_version(v, &p.version)) {
            pk.before.insert(name.clone(), v);
        }
    }
}

/// Records `msg.package_statuses` if the agent declared ReportsPackageStatuses; true when the
/// record changed. A newly failed install of the set we offered counts one attempt.
pub(super) fn record_statuses(
    state: &mut AgentState,
    msg: &AgentToServer,
    events: &mut Vec<Event>,
) -> bool {
    let Some(s) = &msg.package_statuses else {
        return false;
    };
    if state.caps() & agent_caps::REPORTS_PACKAGE_STATUSES == 0 {
        events.push(Event::CapMismatch {
            what: "package_statuses",
        });
        return false;
    }
    let reported = s
        .packages
        .iter()
        .map(|(name, p)| {
            let status =
                InstallStatus::from_wire(p.status).unwrap_or(InstallStatus::InstallPending);
            let report = PackageReport {
                has_version: p.agent_has_version.clone(),
                has_hash: hex::encode(&p.agent_has_hash),
                offered_version: p.server_offered_version.clone(),
                offered_hash: hex::encode(&p.server_offered_hash),
                status,
                error: p.error_message.clone(),
                download_percent: p.download_details.as_ref().map(|d| d.download_percent),
            };
            (name.clone(), report)
        })
        .collect();
    let pk = state.record.packages.get_or_insert_with(Default::default);
    let before = (**pk).clone();
    let echoed = hex::encode(&s.server_provided_all_packages_hash);
    let newly_failed = failed(&reported) && !failed(&pk.reported);
    pk.reported = reported;
    pk.echoed_hash = echoed;
    pk.error = s.error_message.clone();
    if newly_failed && pk.offered_hash.as_deref() == Some(pk.echoed_hash.as_str()) {
        pk.failed_attempts = pk.failed_attempts.saturating_add(1);
        events.push(Event::PackageFailed {
            attempts: pk.failed_attempts,
        });
    }
    let installed_now = !before.reported.is_empty()
        && !all_installed(&before)
        && all_installed(pk)
        && pk.offered_hash.as_deref() == Some(pk.echoed_hash.as_str());
    if installed_now {
        events.push(Event::PackagesInstalled);
    }
    **pk != before
}

fn failed(reported: &std::collections::BTreeMap<String, PackageReport>) -> bool {
    reported
        .values()
        .any(|p| p.status == InstallStatus::InstallFailed)
}

fn all_installed(pk: &AgentPackages) -> bool {
    pk.reported
        .values()
        .all(|p| p.status == InstallStatus::Installed)
}

/// Puts `offer.msg` into `reply` when the rules in the module docs say so; true when the
/// record changed (what was offered, and when, is persisted). `statuses_in_msg`: the message
/// being answered carried the agent's package statuses (so its echo is current news, and a
/// mismatch is answered with the offer at once).
pub fn offer(
    state: &mut AgentState,
    offer: &PackageOffer,
    statuses_in_msg: bool,
    now_ms: i64,
    reply: &mut ServerToAgent,
    events: &mut Vec<Event>,
) -> bool {
    if state.caps() & agent_caps::ACCEPTS_PACKAGES == 0 {
        if state.refused_packages.as_ref() != Some(&offer.hash_hex) {
            state.refused_packages = Some(offer.hash_hex.clone());
            events.push(Event::CapMismatch { what: "packages" });
        }
        return false;
    }
    let uid_jitter = i64::from(state.record.instance_uid.as_bytes()[15]) * 20;
    let pk = state.record.packages.get_or_insert_with(Default::default);
    let new_set = pk.offered_hash.as_ref() != Some(&offer.hash_hex);
    if new_set {
        pk.failed_attempts = 0;
    }
    let echoed = pk.echoed_hash == offer.hash_hex;
    let send = if !echoed {
        let offered_here = state.offered_packages.as_ref() == Some(&offer.hash_hex)
            && now_ms.saturating_sub(state.packages_offered_at_ms) < REOFFER_AFTER_MS;
        statuses_in_msg || !offered_here
    } else if failed(&pk.reported) && pk.failed_attempts < offer.max_attempts {
        let doublings = pk.failed_attempts.saturating_sub(1).min(16);
        let wait = (RETRY_BASE_MS << doublings).min(RETRY_CAP_MS) + uid_jitter;
        now_ms.saturating_sub(pk.offered_ms) >= wait
    } else {
        false
    };
    if !send {
        return new_set;
    }
    if pk.offered_hash.as_ref() != Some(&offer.hash_hex) {
        pk.first_offered_ms = now_ms;
        note_before(state, offer);
    }
    let pk = state.record.packages.get_or_insert_with(Default::default);
    pk.offered_hash = Some(offer.hash_hex.clone());
    pk.offered_ms = now_ms;
    state.offered_packages = Some(offer.hash_hex.clone());
    state.packages_offered_at_ms = now_ms;
    reply.packages_available = Some(offer.msg.clone());
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::{PackageStatus, PackageStatuses};
    use shared::domain::AgentRecord;
    use shared::ids::InstanceUid;
    use std::collections::BTreeMap;

    const CAPS: u64 = agent_caps::REPORTS_STATUS
        | agent_caps::ACCEPTS_PACKAGES
        | agent_caps::REPORTS_PACKAGE_STATUSES;

    fn agent(caps: u64) -> AgentState {
        let mut s = AgentState::new(AgentRecord::new(InstanceUid([3; 16]), 0));
        s.record.capabilities = caps;
        s
    }

    fn the_offer() -> PackageOffer {
        PackageOffer {
            hash_hex: hex::encode([5u8; 32]),
            msg: PackagesAvailable {
                packages: BTreeMap::new(),
                all_packages_hash: vec![5; 32],
            },
            max_attempts: 2,
            ..Default::default()
        }
    }

    fn offered(s: &mut AgentState, o: &PackageOffer, now: i64) -> bool {
        let mut reply = ServerToAgent::default();
        offer(s, o, false, now, &mut reply, &mut Vec::new());
        reply.packages_available.is_some()
    }

    /// A status report echoing `echo`, with every package in `status`.
    fn report(s: &mut AgentState, echo: &[u8], status: InstallStatus) -> Vec<Event> {
        let wire = match status {
            InstallStatus::Installed => 0,
            InstallStatus::InstallPending => 1,
            InstallStatus::Installing => 2,
            InstallStatus::InstallFailed => 3,
            InstallStatus::Downloading => 4,
        };
        let msg = AgentToServer {
            package_statuses: Some(PackageStatuses {
                packages: BTreeMap::from([(
                    String::new(),
                    PackageStatus {
                        status: wire,
                        error_message: "boom".into(),
                        ..Default::default()
                    },
                )]),
                server_provided_all_packages_hash: echo.to_vec(),
                error_message: String::new(),
            }),
            ..Default::default()
        };
        let mut events = Vec::new();
        record_statuses(s, &msg, &mut events);
        events
    }

    #[test]
    fn offers_go_only_to_agents_that_accept_packages() {
        let o = the_offer();
        let mut s = agent(agent_caps::REPORTS_STATUS);
        let mut events = Vec::new();
        let mut reply = ServerToAgent::default();
        offer(&mut s, &o, false, 0, &mut reply, &mut events);
        offer(&mut s, &o, true, 1, &mut reply, &mut events);
        assert!(reply.packages_available.is_none());
        assert_eq!(events, vec![Event::CapMismatch { what: "packages" }]);
        // Statuses from an agent that did not declare it reports them are not recorded.
        let events = report(&mut s, &[5; 32], InstallStatus::Installed);
        assert!(s.record.packages.is_none());
        assert_eq!(
            events,
            vec![Event::CapMismatch {
                what: "package_statuses"
            }]
        );
    }

    #[test]
    fn an_offer_goes_once_per_connection_until_the_agent_echoes_it() {
        let o = the_offer();
        let mut s = agent(CAPS);
        assert!(offered(&mut s, &o, 0));
        assert!(!offered(&mut s, &o, 1), "not twice on one connection");
        assert!(
            offered(&mut s, &o, REOFFER_AFTER_MS),
            "again when nobody answered"
        );
        s.connection_started();
        assert!(
            offered(&mut s, &o, REOFFER_AFTER_MS + 1),
            "again on a new connection"
        );
        report(&mut s, &[5; 32], InstallStatus::Installed);
        s.connection_started();
        assert!(
            !offered(&mut s, &o, REOFFER_AFTER_MS + 2),
            "the agent has the set"
        );
        report(&mut s, &[6; 32], InstallStatus::Installed);
        assert!(
            offered(&mut s, &o, REOFFER_AFTER_MS + 3),
            "it echoes another set"
        );
    }

    #[test]
    fn a_failed_install_is_offered_again_after_a_backoff_until_the_attempts_run_out() {
        let o = the_offer();
        let mut s = agent(CAPS);
        assert!(offered(&mut s, &o, 0));
        report(&mut s, &[5; 32], InstallStatus::Downloading);
        let events = report(&mut s, &[5; 32], InstallStatus::InstallFailed);
        assert_eq!(events, vec![Event::PackageFailed { attempts: 1 }]);
        // A repeat of the same failure is not another attempt.
        assert!(report(&mut s, &[5; 32], InstallStatus::InstallFailed).is_empty());
        let jitter = 3 * 20;
        assert!(
            !offered(&mut s, &o, RETRY_BASE_MS + jitter - 1),
            "within the backoff"
        );
        assert!(offered(&mut s, &o, RETRY_BASE_MS + jitter));
        report(&mut s, &[5; 32], InstallStatus::Downloading);
        let events = report(&mut s, &[5; 32], InstallStatus::InstallFailed);
        assert_eq!(events, vec![Event::PackageFailed { attempts: 2 }]);
        assert!(
            !offered(&mut s, &o, 100 * RETRY_CAP_MS),
            "given up after max_attempts"
        );
        // A new set starts counting again.
        let mut next = the_offer();
        next.hash_hex = hex::encode([8u8; 32]);
        assert!(offered(&mut s, &next, 100 * RETRY_CAP_MS));
        assert_eq!(
            s.record.packages.as_ref().map(|p| p.failed_attempts),
            Some(0)
        );
    }
}
