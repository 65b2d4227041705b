//! Staged rollouts: one config version, or one package version (an upgrade), to a group (or a
//! selector, or every agent) in stages, each gated by the health of the agents it reached.
//! The pieces:
//!
//! - this file: the table of rollouts that still decide what some agents run (in memory on
//!   every coordinator, re-read from the store on `RolloutChanged` and every lease round), and
//!   how it enters each agent's desired config;
//! - [`plan`]: stage sizes and which agents go in which stage (recorded at creation);
//! - [`gates`]: each member's answer and the gate's verdict, from agent records;
//! - [`engine`]: the driver: one coordinator per rollout (the holder of the partition lease
//!   the rollout's id falls in) moves it through its states, writing each step fenced by that
//!   lease, so a take-over continues from the stored state;
//! - [`actions`]: what operators do: create, pause, resume, promote, abort, roll back; and
//!   the status view with live progress;
//! - [`groups`]: named label selectors.
//!
//! How a rollout decides an agent's config: a recorded member, or an agent that matches the
//! target later (a joiner, which belongs to the last stage), gets the rollout's version once
//! its stage has started, and otherwise what the assignments say (the stable side). The newer
//! of a rollout and an assignment wins, and a rollout that succeeds leaves an assignment of
//! its target behind, so it can leave the table. A rollback takes the rollout out of every
//! agent's decision, which returns them to the assignments: the version they had.
//!
//! An upgrade decides an agent's package set the same way, per package name, against the
//! package assignments (`service::packages`); config rollouts and upgrades never decide for
//! each other, and never share agents while active.

pub(crate) mod actions;
mod engine;
pub(crate) mod gates;
pub(crate) mod groups;
pub(crate) mod plan;

use std::collections::HashMap;
use std::sync::Arc;

use proto::agent_caps::{ACCEPTS_PACKAGES, ACCEPTS_REMOTE_CONFIG};
use shared::domain::{AgentRecord, Target};
use shared::ids::InstanceUid;
use shared::rollout::{Member, PackageChange, Rollout, RolloutState};

use gates::Want;

use super::Coordinator;

/// Which partition's lease holder drives a rollout (tests kill that coordinator).
pub use engine::driver_partition;
pub(crate) use engine::{describe_metrics, run_engine};

/// A rollout that still decides what some agents run, with its recorded members.
#[derive(Clone)]
pub(crate) struct Live {
    pub rollout: Rollout,
    pub members: Arc<HashMap<InstanceUid, Member>>,
}

impl Live {
    /// The stage `record` belongs to: its recorded one, else the last if it matches the
    /// target now (a joiner); `None` when the rollout is not about this agent.
    pub(crate) fn stage_of(&self, c: &Coordinator, record: &AgentRecord) -> Option<usize> {
        match self.members.get(&record.instance_uid) {
            Some(m) => Some(usize::from(m.stage)),
            None if c.target_admits(&self.rollout.target, record) => {
                Some(self.rollout.last_stage())
            }
            None => None,
        }
    }
}

/// Which rollouts [`Coordinator::overlap`] looks at: a new rollout may share agents with no
/// other; a new config or package assignment with no rollout of the same kind.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Holding {
    Any,
    Configs,
    Upgrades,
}

/// The states of rollouts that decide agents' configs: the active ones and the aborted ones
/// (whose changed agents keep the rollout's version), and rolled-back upgrades (whose agents
/// keep the build they returned to).
const DECIDING: [RolloutState; 7] = [
    RolloutState::Pending,
    RolloutState::Running,
    RolloutState::Paused,
    RolloutState::Failed,
    RolloutState::RollingBack,
    RolloutState::Aborted,
    // Upgrades only: the agents they reached stay on the build they returned to.
    RolloutState::RolledBack,
];

impl Coordinator {
    /// The config a rollout decides for `record` and when that rollout was created, if a
    /// rollout has reached the agent's stage; the newest rollout about the agent decides.
    pub(super) fn rollout_choice(&self, record: &AgentRecord) -> Option<(i64, i64)> {
        let table = self.rollouts.read().ok()?;
        for l in table.iter().rev().filter(|l| l.rollout.package.is_none()) {
            let Some(stage) = l.stage_of(self, record) else {
                continue;
            };
            return l
                .rollout
                .reached(stage)
                .then_some((l.rollout.config_id, l.rollout.created_ms));
        }
        None
    }

    /// The package versions upgrades decide for `record`: those whose stage has reached the
    /// agent, newest first, each with its rollout's id and creation time.
    pub(super) fn upgrade_choices(&self, record: &AgentRecord) -> Vec<(PackageChange, i64, i64)> {
        let Ok(table) = self.rollouts.read() else {
            return Vec::new();
        };
        table
            .iter()
            .rev()
            .filter_map(|l| {
                let p = l.rollout.package.as_ref()?;
                let stage = l.stage_of(self, record)?;
                l.rollout
                    .reached(stage)
                    .then(|| (p.clone(), l.rollout.id, l.rollout.created_ms))
            })
            .collect()
    }

    /// The upgrades being rolled back (or rolled back) that had reached `record`: it returns
    /// to what it ran before, where nothing else decides the package for it.
    pub(super) fn rolled_back_upgrades(&self, record: &AgentRecord) -> Vec<(PackageChange, i64)> {
        let Ok(table) = self.rollouts.read() else {
            return Vec::new();
        };
        table
            .iter()
            .filter(|l| {
                matches!(
                    l.rollout.state,
                    RolloutState::RollingBack | RolloutState::RolledBack
                )
            })
            .filter_map(|l| {
                let p = l.rollout.package.as_ref()?;
                let stage = l.stage_of(self, record)?;
                let r = &l.rollout;
                let started = r.stages.get(stage).is_some_and(|s| s.started_ms.is_some());
                (stage <= r.stage && started).then(|| (p.clone(), r.created_ms))
            })
            .collect()
    }

    /// What `r` brings its members to, as its gates judge answers.
    pub(crate) fn want<'a>(&self, r: &'a Rollout) -> Want<'a> {
        Want::of(r, self.cfg.packages.as_ref().map_or(1, |h| h.max_attempts))
    }

    /// Whether `record` can receive a rollout: a config one if it accepts remote config; an
    /// upgrade to `package` if it accepts packages and a build exists for its platform.
    pub(crate) fn can_receive(
        &self,
        package: Option<&PackageChange>,
        record: &AgentRecord,
    ) -> bool {
        match package {
            None => record.capabilities & ACCEPTS_REMOTE_CONFIG != 0,
            Some(p) => {
                record.capabilities & ACCEPTS_PACKAGES != 0
                    && self.has_build_for(&p.name, &p.version, record)
            }
        }
    }

    /// The live rollouts, oldest first.
    pub(crate) fn live_rollouts(&self) -> Vec<Live> {
        self.rollouts.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// Re-reads the rollouts from the store; when any that decides agents' configs changed,
    /// brings this coordinator's agents in line (pushing configs). Idempotent.
    pub(crate) async fn sync_rollouts(&self) {
        match self.load_rollouts().await {
            Ok(true) => {
                let held: Vec<u16> = self.held().into_keys().collect();
                self.reconcile(&held).await;
                if self.cfg.packages.is_some() {
                    self.push_packages().await;
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "loading rollouts failed"),
        }
    }

    /// Replaces the table with the store's; true when what it decides changed.
    pub(super) async fn load_rollouts(&self) -> Result<bool, shared::store::StoreError> {
        let _one = self.rollout_sync.lock().await;
        let mut all = self.store.list_rollouts_in(&DECIDING).await?;
        // A config rollback re-pointed its agents' assignments: nothing of it decides more.
        all.retain(|r| r.state != RolloutState::RolledBack || r.package.is_some());
        engine::count_states(&self.store.count_rollouts().await?);
        let old = self.live_rollouts();
        // A rollout leaving the table may have succeeded and left an assignment behind: have
        // it first, or its agents would fall back to an older one for a moment (for an
        // upgrade, a set without the package: an order to delete it).
        if old
            .iter()
            .any(|l| !all.iter().any(|r| r.id == l.rollout.id))
        {
            self.sync_assignments().await;
            self.sync_packages().await;
        }
        let mut next = Vec::new();
        for r in all {
            if r.package.is_none() {
                self.load_desired(r.config_id).await?;
            }
            let members = match old.iter().find(|l| l.rollout.id == r.id) {
                Some(l) => l.members.clone(),
                None => Arc::new(
                    self.store
                        .rollout_members(r.id)
                        .await?
                        .into_iter()
                        .map(|m| (m.instance_uid, m))
                        .collect(),
                ),
            };
            next.push(Live {
                rollout: r,
                members,
            });
        }
        let key = |t: &[Live]| -> Vec<(i64, RolloutState, usize, usize)> {
            t.iter()
                .map(|l| {
                    let started = l.rollout.stages.iter().filter(|s| s.started_ms.is_some());
                    (
                        l.rollout.id,
                        l.rollout.state,
                        l.rollout.stage,
                        started.count(),
                    )
                })
                .collect()
        };
        let changed = key(&old) != key(&next);
        if let Ok(mut t) = self.rollouts.write() {
            *t = next;
        }
        Ok(changed)
    }

    /// The active rollout of `kind` that already holds some agent `target` admits among
    /// `agents`, with how many of them: two rollouts, or a rollout and an assignment of what
    /// it rolls out, never share agents.
    pub(crate) fn overlap(
        &self,
        target: &Target,
        agents: &[AgentRecord],
        kind: Holding,
    ) -> Option<(i64, RolloutState, usize)> {
        let table = self.live_rollouts();
        table
            .iter()
            .filter(|l| l.rollout.state.is_active())
            .filter(|l| match kind {
                Holding::Any => true,
                Holding::Configs => l.rollout.package.is_none(),
                Holding::Upgrades => l.rollout.package.is_some(),
            })
            .find_map(|l| {
                let n = agents
                    .iter()
                    .filter(|r| self.target_admits(target, r) && l.stage_of(self, r).is_some())
                    .count();
                (n > 0).then_some((l.rollout.id, l.rollout.state, n))
            })
    }
}
