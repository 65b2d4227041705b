//! Groups and staged rollouts as the API and the stores see them: the records, their states
//! and the stage sizes. The engine that drives them is the coordinator's
//! (`coordinator::service::rollouts`); this module holds only data and its encodings.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::domain::Target;
use crate::ids::InstanceUid;
use crate::packages::PackageKind;

/// A named, saved label selector: its members are the agents whose description matches
/// every label (the same matching as assignments).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub author: String,
    pub created_ms: i64,
}

impl Group {
    pub fn target(&self) -> Target {
        if self.labels.is_empty() {
            Target::All
        } else {
            Target::Labels(self.labels.clone())
        }
    }
}

/// How many agents a stage reaches, counted from the start of the rollout (stages are
/// cumulative: `1, 5%, 25%, 100%`). A percentage is kept in hundredths of a percent so that
/// every coordinator computes the same sizes without floating point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    Count(u64),
    /// Hundredths of a percent: 10_000 is 100 %.
    Basis(u32),
}

impl Amount {
    pub const ALL: Amount = Amount::Basis(10_000);

    /// This amount of `n`: a percentage rounds up, so `1%` of 10 agents is one agent.
    pub fn of(self, n: u64) -> u64 {
        match self {
            Amount::Count(c) => c.min(n),
            Amount::Basis(b) => (n * u64::from(b)).div_ceil(10_000),
        }
    }
}

impl Amount {
    /// An error budget: an amount, or none at all (`0`, `0%`).
    pub fn parse_budget(s: &str) -> Result<Amount, String> {
        match s.trim() {
            "0" => Ok(Amount::Count(0)),
            "0%" => Ok(Amount::Basis(0)),
            other => other.parse(),
        }
    }
}

impl FromStr for Amount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let (whole, frac) = p.trim().split_once('.').unwrap_or((p.trim(), ""));
            if frac.len() > 2 || whole.is_empty() && frac.is_empty() {
                return Err(format!("`{s}`: at most two decimals in a percentage"));
            }
            let parse = |t: &str| {
                if t.is_empty() {
                    Ok(0)
                } else if t.bytes().all(|b| b.is_ascii_digit()) && t.len() <= 3 {
                    t.parse::<u32>().map_err(|e| e.to_string())
                } else {
                    Err(format!("`{s}` is not a percentage"))
                }
            };
            let basis = parse(whole)? * 100 + parse(&format!("{frac:0<2}"))?;
            if basis == 0 || basis > 10_000 {
                return Err(format!("`{s}`: a percentage is above 0 and at most 100"));
            }
            Ok(Amount::Basis(basis))
        } else {
            match s.parse::<u64>() {
                Ok(0) | Err(_) => Err(format!("`{s}` is neither a count above 0 nor a percentage")),
                Ok(n) => Ok(Amount::Count(n)),
            }
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Basis(b) if b % 100 == 0 => write!(f, "{}%", b / 100),
            Amount::Basis(b) => write!(f, "{}.{:02}%", b / 100, b % 100),
        }
    }
}

/// What a failed gate does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Stop and wait for the operator (the default).
    #[default]
    Pause,
    /// Return every agent the rollout changed to the version it had.
    Rollback,
}

/// Where a rollout is. Final states: succeeded, aborted, rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Created; the driving coordinator starts the canary on its next tick.
    Pending,
    /// Stage `stage` is being pushed, settling or soaking.
    Running,
    /// Held by an operator; resume continues where it stopped.
    Paused,
    /// A gate failed and the rollout stopped (on_failure = pause); the operator resumes
    /// (the stage settles, soaks and is judged again), promotes past it, aborts or rolls back.
    Failed,
    /// Every stage passed; the config is now an assignment of the rollout's target.
    Succeeded,
    /// Stopped by an operator; agents already changed keep the rollout's version.
    Aborted,
    /// The previous versions are being sent back to every agent the rollout changed.
    RollingBack,
    /// Every changed agent reported its previous version applied (or its deadline passed).
    RolledBack,
}

impl RolloutState {
    pub const ALL: [RolloutState; 8] = [
        Self::Pending,
        Self::Running,
        Self::Paused,
        Self::Failed,
        Self::Succeeded,
        Self::Aborted,
        Self::RollingBack,
        Self::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Failed => "failed",
            Self::Succeeded => "succeeded",
            Self::Aborted => "aborted",
            Self::RollingBack => "rolling_back",
            Self::RolledBack => "rolled_back",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the rollout still holds its agents: no other rollout may take them, and
    /// assignments to them are refused.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Self::Pending | Self::Running | Self::Paused | Self::Failed | Self::RollingBack
        )
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stage: its cumulative size, soak, and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    pub size: Amount,
    pub soak_ms: i64,
    /// Members of this stage alone (not cumulative), as planned at creation. Agents joining
    /// the group later belong to the last stage.
    pub planned: u64,
    pub started_ms: Option<i64>,
    /// When every member had answered (applied or failed) or the progress deadline passed.
    pub settled_ms: Option<i64>,
    /// The last evaluation of the gate (a failed one, or the passing one).
    pub gate: Option<GateResult>,
}

/// A gate's verdict on one stage, from the facts stored when it was evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GateResult {
    pub at_ms: i64,
    pub passed: bool,
    /// Members judged (this stage's own, joiners included in the last).
    pub members: u64,
    pub applied: u64,
    /// Reported FAILED for the rollout's config.
    pub failed: u64,
    /// Had not answered by the stage's progress deadline.
    pub stragglers: u64,
    pub disconnected: u64,
    /// Applied, disconnected for less than the reconnect grace: not judged yet (a gate with
    /// any of these waits rather than passes).
    #[serde(default)]
    pub reconnecting: u64,
    /// Declared ReportsHealth and reported unhealthy during the soak.
    pub unhealthy: u64,
    /// Declared ReportsEffectiveConfig and report an effective config other than the one
    /// recorded when they applied.
    pub mismatched: u64,
    /// Members whose health cannot be judged (no ReportsHealth): counted, never passed
    /// silently.
    pub health_unknown: u64,
    /// Members whose effective config cannot be judged (no ReportsEffectiveConfig).
    pub effective_unknown: u64,
    /// Failures allowed (the budget resolved against `members`).
    pub budget: u64,
    /// Why it failed, one line per reason, for people.
    pub reasons: Vec<String>,
    /// The first few failing agents with what they said.
    pub failures: Vec<MemberFailure>,
}

impl GateResult {
    /// Members counting against the budget (each at most once).
    pub fn bad(&self) -> u64 {
        self.failed + self.stragglers + self.disconnected + self.unhealthy + self.mismatched
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberFailure {
    pub instance_uid: InstanceUid,
    /// `failed`, `straggler`, `disconnected`, `unhealthy` or `mismatched`.
    pub reason: String,
    /// What the agent reported (its remote-config error or health status), if anything.
    pub message: String,
}

/// The package version an upgrade rollout brings its agents to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageChange {
    /// The package's name (empty: the agent itself, the top-level package).
    pub name: String,
    pub version: String,
    /// A top-level package is verified only once the agent runs it (its `service.version`).
    #[serde(default)]
    pub kind: PackageKind,
}

/// A staged rollout of one config version, or of one package version (an upgrade), to a
/// group, a selector or every agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: i64,
    /// The config version rolled out; 0 in an upgrade (`package` is set instead).
    pub config_id: i64,
    /// Its hash (hex); empty in an upgrade.
    pub config_hash: String,
    /// Set in an upgrade: the package version rolled out instead of a config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<PackageChange>,
    /// The group it was created for, if any; `target` is its selector as it was then.
    pub group: Option<String>,
    pub target: Target,
    pub stages: Vec<Stage>,
    /// Failures each stage may have: a count or a percentage of the stage's members.
    pub budget: Amount,
    /// How long a stage's members have to answer before they count as stragglers.
    pub deadline_ms: i64,
    pub on_failure: OnFailure,
    pub state: RolloutState,
    /// The stage being pushed, soaked or judged (index into `stages`).
    pub stage: usize,
    /// Why the rollout is in its state (a failed gate's summary, who paused it).
    pub reason: Option<String>,
    /// Agents matching the target without AcceptsRemoteConfig at creation: left out.
    pub cannot_receive: u64,
    /// When the rollback started (state rolling back or rolled back).
    pub rollback_started_ms: Option<i64>,
    pub author: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Bumped by every write: writes compare it, so none overwrites another.
    pub rev: i64,
}

impl Rollout {
    /// The package version this rollout upgrades to, if it is an upgrade.
    pub fn upgrade(&self) -> Option<&PackageChange> {
        self.package.as_ref()
    }

    /// Index of the last stage.
    pub fn last_stage(&self) -> usize {
        self.stages.len().saturating_sub(1)
    }

    /// Whether agents of stage `s` are due the rollout's version now.
    pub fn reached(&self, s: usize) -> bool {
        match self.state {
            RolloutState::Pending | RolloutState::RollingBack | RolloutState::RolledBack => false,
            RolloutState::Succeeded => true,
            _ => s <= self.stage && self.stages.get(s).is_some_and(|st| st.started_ms.is_some()),
        }
    }
}

/// A rollout about to be created.
#[derive(Debug, Clone)]
pub struct NewRollout {
    pub config_id: i64,
    pub config_hash: String,
    pub package: Option<PackageChange>,
    pub group: Option<String>,
    pub target: Target,
    pub stages: Vec<Stage>,
    pub budget: Amount,
    pub deadline_ms: i64,
    pub on_failure: OnFailure,
    pub cannot_receive: u64,
    pub author: String,
    pub created_ms: i64,
}

/// One agent of a rollout: the stage it belongs to and the config version it had when the
/// rollout was created (what a config rollback returns it to; unused in an upgrade, whose
/// rollback returns agents to their package assignments).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub instance_uid: InstanceUid,
    pub stage: u16,
    pub from_config: Option<i64>,
}

/// Bytes per member in [`encode_members`]: uid, stage, previous config id (-1: none).
const MEMBER_BYTES: usize = 16 + 2 + 8;

/// The members as one compact blob (26 bytes each): a rollout of 100,000 agents is one 2.6 MB
/// row written once, not 100,000 rows.
pub fn encode_members(members: &[Member]) -> Vec<u8> {
    let mut out = Vec::with_capacity(members.len() * MEMBER_BYTES);
    for m in members {
        out.extend_from_slice(m.instance_uid.as_bytes());
        out.extend_from_slice(&m.stage.to_be_bytes());
        out.extend_from_slice(&m.from_config.unwrap_or(-1).to_be_bytes());
    }
    out
}

pub fn decode_members(bytes: &[u8]) -> Result<Vec<Member>, String> {
    if !bytes.len().is_multiple_of(MEMBER_BYTES) {
        return Err(format!("member blob of {} bytes", bytes.len()));
    }
    bytes
        .chunks_exact(MEMBER_BYTES)
        .map(|c| {
            let uid = InstanceUid::from_slice(&c[..16]).ok_or("member uid")?;
            let stage = u16::from_be_bytes([c[16], c[17]]);
            let mut from = [0u8; 8];
            from.copy_from_slice(&c[18..]);
            let from = i64::from_be_bytes(from);
            Ok(Member {
                instance_uid: uid,
                stage,
                from_config: (from >= 0).then_some(from),
            })
        })
        .collect()
}

/// One line of a rollout's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutEvent {
    pub rollout_id: i64,
    pub at_ms: i64,
    /// `created`, `stage_started`, `stage_settled`, `gate_passed`, `gate_failed`, `paused`,
    /// `resumed`, `promoted`, `aborted`, `rollback_started`, `rolled_back`, `succeeded`,
    /// `taken_over`.
    pub kind: String,
    /// Who: `api:<token>`, `console:<token>`, or `engine:<coordinator>`.
    pub actor: String,
    pub stage: Option<usize>,
    pub detail: serde_json::Value,
}

/// The coordinator driving a rollout writes under its partition lease: a write is refused
/// when that lease has moved on (another coordinator took the rollout over).
#[derive(Debug, Clone)]
pub struct Fence {
    pub node: String,
    pub partition: u16,
    pub fence: i64,
    pub now_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_and_print() {
        assert_eq!("1".parse(), Ok(Amount::Count(1)));
        assert_eq!("5%".parse(), Ok(Amount::Basis(500)));
        assert_eq!("12.5%".parse(), Ok(Amount::Basis(1250)));
        assert_eq!("100%".parse(), Ok(Amount::ALL));
        for bad in ["0", "0%", "101%", "x", "1.234%", "-1", "%", "1e3%"] {
            assert!(bad.parse::<Amount>().is_err(), "{bad}");
        }
        assert_eq!(Amount::Basis(1250).to_string(), "12.50%");
        assert_eq!(Amount::Basis(500).to_string(), "5%");
        assert_eq!(Amount::parse_budget("0"), Ok(Amount::Count(0)));
        assert_eq!(Amount::parse_budget("2%"), Ok(Amount::Basis(200)));
        assert!(Amount::parse_budget("-1").is_err());
    }

    #[test]
    fn percentages_round_up_and_counts_cap() {
        assert_eq!(Amount::Basis(100).of(10), 1);
        assert_eq!(Amount::Basis(500).of(10_000), 500);
        assert_eq!(Amount::ALL.of(7), 7);
        assert_eq!(Amount::Count(5).of(3), 3);
        assert_eq!(Amount::Basis(1).of(0), 0);
    }

    #[test]
    fn members_round_trip() {
        let m = vec![
            Member {
                instance_uid: InstanceUid::new_v7(),
                stage: 3,
                from_config: Some(42),
            },
            Member {
                instance_uid: InstanceUid::new_v7(),
                stage: 0,
                from_config: None,
            },
        ];
        assert_eq!(decode_members(&encode_members(&m)), Ok(m));
        assert!(decode_members(&[0u8; 25]).is_err());
    }
}
