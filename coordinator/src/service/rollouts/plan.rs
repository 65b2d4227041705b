//! Planning a rollout, without I/O: checking the stage list, sizing each stage from the
//! eligible agents, and choosing which agents go in which stage. The plan is recorded at
//! creation, so a restart or a take-over works from the same members.

use shared::ids::InstanceUid;
use shared::rollout::{Amount, Member};

/// At most this many stages: more is a mistake, not a plan.
pub(crate) const MAX_STAGES: usize = 20;

/// An agent that may receive the rollout.
pub(crate) struct Candidate {
    pub uid: InstanceUid,
    /// Connected and not reporting unhealthy: preferred for the first stages.
    pub preferred: bool,
    pub from_config: Option<i64>,
}

/// Checks a stage list: 1 to [`MAX_STAGES`] stages, sizes growing (counts among counts and
/// percentages among percentages; a count and a percentage are compared per rollout, when
/// the fleet's size is known) and the last reaching every agent.
pub(crate) fn check_stages(amounts: &[Amount]) -> Result<(), String> {
    if amounts.is_empty() || amounts.len() > MAX_STAGES {
        return Err(format!("give 1 to {MAX_STAGES} stages"));
    }
    if amounts.last() != Some(&Amount::ALL) {
        return Err("the last stage must be 100%".into());
    }
    for w in amounts.windows(2) {
        let shrinks = match (w[0], w[1]) {
            (Amount::Count(a), Amount::Count(b)) => b <= a,
            (Amount::Basis(a), Amount::Basis(b)) => b <= a,
            _ => false,
        };
        if shrinks {
            return Err(format!(
                "stages grow: `{}` after `{}` reaches no more agents",
                w[1], w[0]
            ));
        }
    }
    Ok(())
}

/// How many agents each stage adds when `n` are eligible: the cumulative sizes, never
/// shrinking, the last taking every agent left.
pub(crate) fn stage_sizes(amounts: &[Amount], n: u64) -> Vec<u64> {
    let mut reached = 0;
    let mut out = Vec::with_capacity(amounts.len());
    for (i, a) in amounts.iter().enumerate() {
        let upto = if i + 1 == amounts.len() {
            n
        } else {
            a.of(n).max(reached)
        };
        out.push(upto - reached);
        reached = upto;
    }
    out
}

/// The members of each stage: preferred agents first, then in an order that mixes `seed` with
/// the uid (so successive rollouts do not always pick the same canaries), cut into stages of
/// `sizes`.
pub(crate) fn assign_stages(seed: u64, sizes: &[u64], mut agents: Vec<Candidate>) -> Vec<Member> {
    agents.sort_by_key(|c| (!c.preferred, mix(seed, &c.uid), c.uid));
    let mut out = Vec::with_capacity(agents.len());
    let mut it = agents.into_iter();
    for (stage, &size) in sizes.iter().enumerate() {
        let stage = u16::try_from(stage).unwrap_or(u16::MAX);
        for c in it
            .by_ref()
            .take(usize::try_from(size).unwrap_or(usize::MAX))
        {
            out.push(Member {
                instance_uid: c.uid,
                stage,
                from_config: c.from_config,
            });
        }
    }
    out
}

/// FNV-1a over the seed and the uid: stable across processes and versions.
fn mix(seed: u64, uid: &InstanceUid) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_be_bytes().iter().chain(uid.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amounts(s: &str) -> Vec<Amount> {
        s.split(',').map(|a| a.parse().expect("amount")).collect()
    }

    #[test]
    fn stage_lists_must_grow_and_end_at_everyone() {
        assert!(check_stages(&amounts("1,5%,25%,100%")).is_ok());
        assert!(check_stages(&amounts("100%")).is_ok());
        assert!(check_stages(&amounts("1,5%,25%")).is_err(), "not 100% last");
        assert!(check_stages(&amounts("10%,5%,100%")).is_err(), "shrinks");
        assert!(check_stages(&amounts("2,2,100%")).is_err(), "repeats");
        assert!(check_stages(&[]).is_err());
    }

    #[test]
    fn sizes_are_cumulative_and_cover_everyone() {
        assert_eq!(
            stage_sizes(&amounts("1,5%,25%,100%"), 10_000),
            [1, 499, 2000, 7500]
        );
        assert_eq!(stage_sizes(&amounts("1,5%,25%,100%"), 10), [1, 0, 2, 7]);
        assert_eq!(stage_sizes(&amounts("5,10%,100%"), 3), [3, 0, 0]);
        assert_eq!(stage_sizes(&amounts("1,100%"), 0), [0, 0]);
    }

    #[test]
    fn preferred_agents_go_first_and_the_plan_is_deterministic() {
        let uids: Vec<InstanceUid> = (0..50).map(|_| InstanceUid::new_v7()).collect();
        let candidates = |seed_flip: bool| {
            uids.iter()
                .enumerate()
                .map(|(i, &uid)| Candidate {
                    uid,
                    preferred: (i == 7) ^ seed_flip && i == 7,
                    from_config: Some(i as i64),
                })
                .collect::<Vec<_>>()
        };
        let sizes = stage_sizes(&amounts("1,10%,100%"), 50);
        let a = assign_stages(42, &sizes, candidates(false));
        let mut reversed = candidates(false);
        reversed.reverse();
        let b = assign_stages(42, &sizes, reversed);
        assert_eq!(a, b, "the input order does not matter");
        assert_eq!(a.len(), 50);
        assert_eq!(
            a[0].instance_uid, uids[7],
            "the only preferred agent is the canary"
        );
        assert_eq!(a[0].stage, 0);
        assert_eq!(a.iter().filter(|m| m.stage == 1).count(), 4);
        assert_eq!(a.iter().filter(|m| m.stage == 2).count(), 45);
        assert_eq!(a[0].from_config, Some(7), "the previous version is kept");
    }
}
