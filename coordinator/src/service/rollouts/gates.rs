//! Judging a stage, without I/O: each member's answer from its record, the stage's progress,
//! and the gate's verdict against the error budget.
//!
//! A member counts against the budget at most once, for the first of: it reported FAILED for
//! the rollout's config (in an upgrade: its install failed as many times as the server
//! retries); it had not answered by the progress deadline (a straggler); it is not connected;
//! it declares ReportsHealth and is (or was during the soak) unhealthy; it declares
//! ReportsEffectiveConfig and its effective config moved since it applied (config rollouts
//! only). Members that cannot be judged on health or effective config are counted, not
//! passed silently.
//!
//! In an upgrade a member has answered ("applied") when it is **verified**: it reports the
//! package installed at the rollout's version and, for a top-level package, runs it (its
//! `service.version`). One that comes back on the old version never answers, so it is a
//! straggler at the deadline.

use std::collections::HashSet;

use proto::agent_caps::{REPORTS_EFFECTIVE_CONFIG, REPORTS_HEALTH};
use shared::domain::{AgentRecord, RemoteStatus};
use shared::ids::InstanceUid;
use shared::package_profile::{report_of, same_version};
use shared::packages::{runs_version, InstallStatus, PackageKind};
use shared::rollout::{Amount, GateResult, MemberFailure, Rollout};

/// Failing members named in a gate result.
const NAMED_FAILURES: usize = 10;

/// An applied member away for less than this is reconnecting, not disconnected: a gateway or
/// coordinator fault, or an Unavailable answer, makes agents reconnect within seconds, and a
/// rollout should not fail on that. The gate waits for them instead (up to the deadline).
pub const RECONNECT_GRACE_MS: i64 = 15_000;

/// A stretch in which a coordinator's partition leases had lapsed (the store away, a stall):
/// from its last good lease round to the next. Its agents were told to retry meanwhile, and
/// they back off longer the longer they were refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Outage {
    pub from_ms: i64,
    pub to_ms: i64,
}

/// Whether an applied member away since `last_seen_ms` is still within its reconnect grace at
/// `now_ms`. One that went away before `outage` ended gets the grace counted from the end,
/// plus as long as the outage kept it away: an exponential backoff retries within about the
/// time already spent refused.
pub(crate) fn within_grace(last_seen_ms: i64, now_ms: i64, outage: Option<Outage>) -> bool {
    let until = match outage {
        Some(o) if last_seen_ms < o.to_ms => {
            let refused = o.to_ms - last_seen_ms.max(o.from_ms);
            o.to_ms
                .saturating_add(RECONNECT_GRACE_MS)
                .saturating_add(refused)
        }
        _ => last_seen_ms.saturating_add(RECONNECT_GRACE_MS),
    };
    now_ms < until
}

/// How one member stands against a config hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Not answered yet (nothing, another hash, or still applying).
    Waiting,
    Applied,
    Failed,
}

/// What a rollout brings its members to, as its gates judge answers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Want<'a> {
    /// A config version, by its hash (hex).
    Config(&'a str),
    /// A package version: an upgrade. A member whose install failed `max_attempts` times has
    /// been given up on (the server retries until then).
    Package {
        name: &'a str,
        version: &'a str,
        kind: PackageKind,
        max_attempts: u32,
    },
}

impl<'a> Want<'a> {
    pub(crate) fn of(r: &'a Rollout, max_attempts: u32) -> Self {
        match &r.package {
            Some(p) => Want::Package {
                name: &p.name,
                version: &p.version,
                kind: p.kind,
                max_attempts,
            },
            None => Want::Config(&r.config_hash),
        }
    }
}

pub(crate) fn answer(r: &AgentRecord, want: Want<'_>) -> Answer {
    match want {
        Want::Config(hash) => match &r.remote_config {
            Some(rc) if rc.hash == hash => match rc.status {
                RemoteStatus::Applied => Answer::Applied,
                RemoteStatus::Failed => Answer::Failed,
                _ => Answer::Waiting,
            },
            _ => Answer::Waiting,
        },
        Want::Package {
            name,
            version,
            kind,
            max_attempts,
        } => {
            let Some(pk) = r.packages.as_deref() else {
                return Answer::Waiting;
            };
            match report_of(r, name, kind) {
                Some(p)
                    if p.status == InstallStatus::Installed
                        && same_version(&p.has_version, version)
                        && (kind != PackageKind::TopLevel || runs_version(r, version)) =>
                {
                    Answer::Applied
                }
                Some(p)
                    if p.status == InstallStatus::InstallFailed
                        && same_version(&p.offered_version, version)
                        && pk.failed_attempts >= max_attempts =>
                {
                    Answer::Failed
                }
                _ => Answer::Waiting,
            }
        }
    }
}

/// What a failed member said: its remote-config error, or its install error.
fn failure_message(r: &AgentRecord, want: Want<'_>) -> String {
    match want {
        Want::Config(_) => r.remote_config.as_ref().map(|rc| rc.error_message.clone()),
        Want::Package { name, kind, .. } => report_of(r, name, kind).map(|p| p.error.clone()),
    }
    .unwrap_or_default()
}

pub(crate) fn unhealthy(r: &AgentRecord) -> bool {
    r.capabilities & REPORTS_HEALTH != 0 && r.health.as_ref().is_some_and(|h| !h.healthy)
}

/// Progress of a set of members towards a hash.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Progress {
    pub members: u64,
    pub applied: u64,
    pub failed: u64,
    pub waiting: u64,
}

impl Progress {
    pub(crate) fn of<'a>(
        members: impl IntoIterator<Item = &'a AgentRecord>,
        want: Want<'_>,
    ) -> Self {
        let mut p = Progress::default();
        for r in members {
            p.members += 1;
            match answer(r, want) {
                Answer::Applied => p.applied += 1,
                Answer::Failed => p.failed += 1,
                Answer::Waiting => p.waiting += 1,
            }
        }
        p
    }
}

/// Failures a budget allows among `members`: a percentage rounds down, so 5 % of 10 agents
/// allows none.
pub(crate) fn allowed(budget: Amount, members: u64) -> u64 {
    match budget {
        Amount::Count(c) => c,
        Amount::Basis(b) => members * u64::from(b) / 10_000,
    }
}

/// What a judgement looks at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Judging<'a> {
    /// Members still waiting count as stragglers.
    pub deadline_passed: bool,
    /// The stage is soaking (or done): connection, health and effective config count too.
    /// While it settles only answers do (an agent restarting with a new config is briefly
    /// unhealthy or away).
    pub soaking: bool,
    /// Members seen unhealthy earlier in the soak.
    pub seen_unhealthy: &'a HashSet<InstanceUid>,
    /// The engine's last outage, if any (see [`within_grace`]).
    pub outage: Option<Outage>,
}

/// The gate's view of a stage's members now.
pub(crate) fn judge(
    members: &[&AgentRecord],
    want: Want<'_>,
    budget: Amount,
    how: Judging<'_>,
    now_ms: i64,
) -> GateResult {
    let Judging {
        deadline_passed,
        soaking,
        seen_unhealthy,
        outage,
    } = how;
    let mut g = GateResult {
        at_ms: now_ms,
        members: members.len() as u64,
        budget: allowed(budget, members.len() as u64),
        ..GateResult::default()
    };
    for r in members {
        if r.capabilities & REPORTS_HEALTH == 0 {
            g.health_unknown += 1;
        }
        if matches!(want, Want::Config(_)) && r.capabilities & REPORTS_EFFECTIVE_CONFIG == 0 {
            g.effective_unknown += 1;
        }
        let failure = match answer(r, want) {
            Answer::Failed => Some(("failed", failure_message(r, want))),
            Answer::Waiting if deadline_passed => Some(("straggler", String::new())),
            Answer::Waiting => None,
            Answer::Applied => {
                g.applied += 1;
                if !soaking {
                    None
                } else if !r.connected
                    && !deadline_passed
                    && within_grace(r.last_seen_ms, now_ms, outage)
                {
                    g.reconnecting += 1;
                    None
                } else if !r.connected {
                    Some(("disconnected", String::new()))
                } else if unhealthy(r) || seen_unhealthy.contains(&r.instance_uid) {
                    let h = r.health.as_ref();
                    let said = h.map(|h| {
                        if h.last_error.is_empty() {
                            h.status.clone()
                        } else {
                            h.last_error.clone()
                        }
                    });
                    Some(("unhealthy", said.unwrap_or_default()))
                } else if matches!(want, Want::Config(_))
                    && r.capabilities & REPORTS_EFFECTIVE_CONFIG != 0
                    && matches!(
                        (&r.applied_effective_hash, &r.effective_config_hash),
                        (Some(a), Some(e)) if a != e
                    )
                {
                    Some(("mismatched", String::new()))
                } else {
                    None
                }
            }
        };
        let Some((reason, message)) = failure else {
            continue;
        };
        match reason {
            "failed" => g.failed += 1,
            "straggler" => g.stragglers += 1,
            "disconnected" => g.disconnected += 1,
            "unhealthy" => g.unhealthy += 1,
            _ => g.mismatched += 1,
        }
        if g.failures.len() < NAMED_FAILURES {
            g.failures.push(MemberFailure {
                instance_uid: r.instance_uid,
                reason: reason.into(),
                message,
            });
        }
    }
    g.passed = g.bad() <= g.budget;
    g.reasons = reasons(&g, want);
    g
}

/// One line per kind of failure, for people.
fn reasons(g: &GateResult, want: Want<'_>) -> Vec<String> {
    let failed = match want {
        Want::Config(_) => "reported FAILED",
        Want::Package { .. } => "failed every install attempt",
    };
    let first = |reason: &str| {
        g.failures
            .iter()
            .find(|f| f.reason == reason && !f.message.is_empty())
            .map(|f| format!(" (first: {})", f.message))
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for (n, what, reason) in [
        (g.failed, failed, "failed"),
        (g.stragglers, "did not answer by the deadline", "straggler"),
        (g.disconnected, "disconnected", "disconnected"),
        (g.unhealthy, "unhealthy during the soak", "unhealthy"),
        (
            g.mismatched,
            "effective config differs from what was applied",
            "mismatched",
        ),
    ] {
        if n > 0 {
            out.push(format!("{n} of {} {what}{}", g.members, first(reason)));
        }
    }
    if !out.is_empty() {
        out.push(format!("budget {}", g.budget));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::domain::{Health, RemoteConfigReport};

    const HASH: &str = "aa";

    fn agent(status: Option<RemoteStatus>, caps: u64) -> AgentRecord {
        let mut r = AgentRecord::new(InstanceUid::new_v7(), 0);
        r.connected = true;
        r.capabilities = caps;
        r.remote_config = status.map(|status| RemoteConfigReport {
            hash: HASH.into(),
            status,
            error_message: "bad exporter".into(),
        });
        r
    }

    fn how(late: bool, seen: &HashSet<InstanceUid>) -> Judging<'_> {
        Judging {
            deadline_passed: late,
            soaking: true,
            seen_unhealthy: seen,
            outage: None,
        }
    }

    fn judge_now(members: &[AgentRecord], budget: &str, late: bool) -> GateResult {
        let refs: Vec<&AgentRecord> = members.iter().collect();
        let none = HashSet::new();
        let budget = Amount::parse_budget(budget).expect("budget");
        judge(&refs, Want::Config(HASH), budget, how(late, &none), 1)
    }

    #[test]
    fn a_failed_member_fails_a_zero_budget_with_its_error() {
        let m = [
            agent(Some(RemoteStatus::Applied), 0),
            agent(Some(RemoteStatus::Failed), 0),
        ];
        let g = judge_now(&m, "0", false);
        assert!(!g.passed);
        assert_eq!((g.failed, g.applied, g.budget), (1, 1, 0));
        assert_eq!(g.failures[0].message, "bad exporter");
        assert!(g.reasons[0].contains("reported FAILED") && g.reasons[0].contains("bad exporter"));
        assert!(
            judge_now(&m, "1", false).passed,
            "a budget of one allows it"
        );
        assert!(judge_now(&m, "50%", false).passed);
        assert!(
            !judge_now(&m, "49%", false).passed,
            "percentages round down"
        );
    }

    #[test]
    fn waiting_members_become_stragglers_at_the_deadline() {
        let m = [agent(None, 0), agent(Some(RemoteStatus::Applying), 0)];
        assert!(judge_now(&m, "0", false).passed, "nobody failed yet");
        let g = judge_now(&m, "0", true);
        assert_eq!((g.stragglers, g.passed), (2, false));
    }

    #[test]
    fn health_connection_and_effective_config_count_only_when_declared() {
        let mut sick = agent(Some(RemoteStatus::Applied), REPORTS_HEALTH);
        sick.health = Some(Health {
            healthy: false,
            last_error: "exporter down".into(),
            ..Health::default()
        });
        let mut silent_sick = agent(Some(RemoteStatus::Applied), 0);
        silent_sick.health = sick.health.clone();
        let mut gone = agent(Some(RemoteStatus::Applied), 0);
        gone.connected = false;
        // Away for the whole reconnect grace (judged at 1).
        gone.last_seen_ms = 1 - RECONNECT_GRACE_MS;
        let mut moved = agent(Some(RemoteStatus::Applied), REPORTS_EFFECTIVE_CONFIG);
        moved.applied_effective_hash = Some("e1".into());
        moved.effective_config_hash = Some("e2".into());
        let g = judge_now(&[sick, silent_sick, gone, moved], "0", false);
        assert_eq!(
            (g.unhealthy, g.disconnected, g.mismatched, g.applied),
            (1, 1, 1, 4)
        );
        assert_eq!(g.health_unknown, 3, "health cannot be judged on three");
        assert_eq!(g.effective_unknown, 3);
        assert_eq!(g.failures[0].message, "exporter down");
    }

    #[test]
    fn a_member_away_for_less_than_the_grace_is_waited_for_not_counted() {
        let mut away = agent(Some(RemoteStatus::Applied), 0);
        away.connected = false;
        away.last_seen_ms = 1 - RECONNECT_GRACE_MS + 1;
        let g = judge_now(std::slice::from_ref(&away), "0", false);
        assert_eq!((g.reconnecting, g.disconnected, g.passed), (1, 0, true));
        away.last_seen_ms -= 1;
        let g = judge_now(std::slice::from_ref(&away), "0", false);
        assert_eq!((g.reconnecting, g.disconnected, g.passed), (0, 1, false));
        away.last_seen_ms = 1;
        let g = judge_now(&[away], "0", true);
        assert_eq!(g.disconnected, 1, "at the deadline nobody is waited for");
    }

    #[test]
    fn members_kept_away_by_a_store_outage_get_the_grace_from_its_end_plus_its_length() {
        let o = Outage {
            from_ms: 100_000,
            to_ms: 130_000,
        };
        // Away since 10 s into the outage: refused for 20 s, so waited for 15 + 20 s after it.
        let gone = 110_000;
        assert!(within_grace(
            gone,
            130_000 + RECONNECT_GRACE_MS + 20_000 - 1,
            Some(o)
        ));
        assert!(!within_grace(
            gone,
            130_000 + RECONNECT_GRACE_MS + 20_000,
            Some(o)
        ));
        assert!(
            !within_grace(gone, 130_000, None),
            "without the outage it would be disconnected already"
        );
        // Away since before the outage: only the outage's own length is added.
        assert!(within_grace(
            90_000,
            130_000 + RECONNECT_GRACE_MS + 29_999,
            Some(o)
        ));
        assert!(!within_grace(
            90_000,
            130_000 + RECONNECT_GRACE_MS + 30_000,
            Some(o)
        ));
        // Away only after the outage ended: the plain grace.
        assert!(within_grace(
            140_000,
            140_000 + RECONNECT_GRACE_MS - 1,
            Some(o)
        ));
        assert!(!within_grace(
            140_000,
            140_000 + RECONNECT_GRACE_MS,
            Some(o)
        ));
        // Through judge: the member is reconnecting, the gate waits.
        let mut away = agent(Some(RemoteStatus::Applied), 0);
        away.connected = false;
        away.last_seen_ms = gone;
        let refs = [&away];
        let none = HashSet::new();
        let with = Judging {
            outage: Some(o),
            ..how(false, &none)
        };
        let g = judge(&refs, Want::Config(HASH), Amount::Count(0), with, 150_000);
        assert_eq!((g.reconnecting, g.disconnected, g.passed), (1, 0, true));
        let g = judge(
            &refs,
            Want::Config(HASH),
            Amount::Count(0),
            how(false, &none),
            150_000,
        );
        assert_eq!((g.reconnecting, g.disconnected, g.passed), (0, 1, false));
    }

    #[test]
    fn unhealthy_earlier_in_the_soak_still_counts() {
        let m = [agent(Some(RemoteStatus::Applied), REPORTS_HEALTH)];
        let seen = HashSet::from([m[0].instance_uid]);
        let refs: Vec<&AgentRecord> = m.iter().collect();
        let g = judge(
            &refs,
            Want::Config(HASH),
            Amount::Count(0),
            how(false, &seen),
            1,
        );
        assert_eq!((g.unhealthy, g.passed), (1, false));
        let settling = Judging {
            soaking: false,
            ..how(false, &seen)
        };
        let g = judge(&refs, Want::Config(HASH), Amount::Count(0), settling, 1);
        assert!(g.passed, "while settling only answers count");
    }

    #[test]
    fn an_upgrade_member_answers_once_verified_and_fails_once_given_up() {
        use shared::packages::{AgentPackages, PackageReport};
        let want = Want::Package {
            name: "",
            version: "0.2.0",
            kind: PackageKind::TopLevel,
            max_attempts: 2,
        };
        let member = |status: InstallStatus, has: &str, running: &str, failed: u32| {
            let mut r = agent(None, 0);
            r.description
                .identifying
                .insert("service.version".into(), running.into());
            let report = PackageReport {
                has_version: has.into(),
                has_hash: String::new(),
                offered_version: "0.2.0".into(),
                offered_hash: String::new(),
                status,
                error: "disk full".into(),
                download_percent: None,
            };
            r.packages = Some(Box::new(AgentPackages {
                reported: std::collections::BTreeMap::from([(String::new(), report)]),
                failed_attempts: failed,
                ..AgentPackages::default()
            }));
            r
        };
        let ok = member(InstallStatus::Installed, "0.2.0", "0.2.0", 0);
        assert_eq!(answer(&ok, want), Answer::Applied);
        let not_restarted = member(InstallStatus::Installed, "0.2.0", "0.1.0", 0);
        assert_eq!(
            answer(&not_restarted, want),
            Answer::Waiting,
            "installed but still running the old build"
        );
        let addon = Want::Package {
            name: "",
            version: "0.2.0",
            kind: PackageKind::Addon,
            max_attempts: 2,
        };
        assert_eq!(answer(&not_restarted, addon), Answer::Applied);
        let retrying = member(InstallStatus::InstallFailed, "0.1.0", "0.1.0", 1);
        assert_eq!(answer(&retrying, want), Answer::Waiting, "still retried");
        let given_up = member(InstallStatus::InstallFailed, "0.1.0", "0.1.0", 2);
        assert_eq!(answer(&given_up, want), Answer::Failed);
        let g = judge(
            &[&given_up, &ok],
            want,
            Amount::Count(0),
            how(false, &HashSet::new()),
            1,
        );
        assert_eq!((g.failed, g.applied, g.passed), (1, 1, false));
        assert!(g.reasons[0].contains("failed every install attempt (first: disk full)"));
    }

    #[test]
    fn an_empty_stage_passes() {
        let g = judge_now(&[], "0", true);
        assert!(g.passed && g.reasons.is_empty());
    }
}
