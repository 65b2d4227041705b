//! The figures of a staged rollout, without I/O: which stage each agent's answer belongs to
//! and how long each stage took. Every time is Unix milliseconds: the agents' answers from
//! the load generator's wall clock, stage starts and gate verdicts from the server's, on the
//! same machine.
//!
//! An agent gets the rollout's version only once its stage has started, and a stage starts
//! only after the previous gate saw every member's answer, which the agent stamped before
//! sending it. So the agents of stage s are exactly those whose answer falls between stage
//! s's start and stage s+1's; answers before the first start are counted apart (`early`).
//! Engine time of stage s ≥ 1 (0-based): its last answer − stage s−1's gate verdict, i.e. the
//! gate, the next stage's start, the pushes and the agents' answers.

use serde::{Deserialize, Serialize};

use crate::hist::percentile;

/// What the server recorded for one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StageClock {
    /// Members planned at creation (this stage alone).
    pub planned: u64,
    pub started_ms: Option<i64>,
    /// When the gate that passed (or failed) it was judged.
    pub gate_ms: Option<i64>,
}

/// One stage's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageFigures {
    /// 1-based, as people count stages.
    pub stage: usize,
    /// The stage's cumulative size as given (`1`, `5%`, `100%`); filled by the caller.
    #[serde(default)]
    pub size: String,
    pub planned: u64,
    /// Agents whose answer fell in this stage's window (APPLIED and FAILED).
    pub agents: usize,
    pub failed: usize,
    pub started_ms: Option<i64>,
    pub gate_ms: Option<i64>,
    /// This stage's last answer − its start: push → applied for the canary stage.
    pub push_to_last_ms: Option<f64>,
    /// Stages 2…: this stage's last answer − the previous stage's gate.
    pub engine_ms: Option<f64>,
    /// This stage's gate − its last answer: how long the engine took to notice and judge.
    pub last_to_gate_ms: Option<f64>,
    /// Answer − this stage's start, over its agents.
    pub apply_p50_ms: f64,
    pub apply_p99_ms: f64,
}

/// A staged rollout's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTimes {
    pub stages: Vec<StageFigures>,
    /// Answers before the first stage started (none expected).
    pub early: usize,
    /// Answer − own stage's start, over every agent of every stage.
    pub apply_p50_ms: f64,
    pub apply_p99_ms: f64,
    /// The largest engine time (stages 2…).
    pub engine_max_ms: Option<f64>,
    /// The last stage's gate − the creation request: the whole rollout, when it finished.
    pub total_ms: Option<f64>,
}

/// The stage an answer at `t` belongs to: the last started stage that started at or before it.
fn stage_of(clocks: &[StageClock], t: f64) -> Option<usize> {
    clocks
        .iter()
        .enumerate()
        .filter_map(|(s, c)| c.started_ms.map(|st| (s, st)))
        .filter(|&(_, st)| t >= st as f64)
        .map(|(s, _)| s)
        .next_back()
}

/// Splits `answers` (Unix ms, failed) over the stages of `clocks` and times each stage;
/// `request_ms` is when the rollout was asked for.
pub fn stage_times(answers: &[(f64, bool)], clocks: &[StageClock], request_ms: f64) -> StageTimes {
    let mut per: Vec<Vec<(f64, bool)>> = vec![Vec::new(); clocks.len()];
    let mut early = 0;
    for &(t, failed) in answers {
        match stage_of(clocks, t) {
            Some(s) => per[s].push((t, failed)),
            None => early += 1,
        }
    }
    let mut all_latency = Vec::new();
    let mut stages = Vec::with_capacity(clocks.len());
    for (s, (c, mine)) in clocks.iter().zip(&per).enumerate() {
        let last = mine.iter().map(|a| a.0).reduce(f64::max);
        let mut latency: Vec<f64> = match c.started_ms {
            Some(st) => mine.iter().map(|a| a.0 - st as f64).collect(),
            None => Vec::new(),
        };
        latency.sort_by(f64::total_cmp);
        all_latency.extend_from_slice(&latency);
        let previous_gate = s
            .checked_sub(1)
            .and_then(|p| clocks.get(p))
            .and_then(|p| p.gate_ms);
        stages.push(StageFigures {
            stage: s + 1,
            size: String::new(),
            planned: c.planned,
            agents: mine.len(),
            failed: mine.iter().filter(|a| a.1).count(),
            started_ms: c.started_ms,
            gate_ms: c.gate_ms,
            push_to_last_ms: last.zip(c.started_ms).map(|(l, st)| l - st as f64),
            engine_ms: last.zip(previous_gate).map(|(l, g)| l - g as f64),
            last_to_gate_ms: last.zip(c.gate_ms).map(|(l, g)| g as f64 - l),
            apply_p50_ms: percentile(&latency, 0.5),
            apply_p99_ms: percentile(&latency, 0.99),
        });
    }
    all_latency.sort_by(f64::total_cmp);
    let engine_max_ms = stages.iter().filter_map(|s| s.engine_ms).reduce(f64::max);
    let total_ms = clocks
        .last()
        .and_then(|c| c.gate_ms)
        .map(|g| g as f64 - request_ms);
    StageTimes {
        stages,
        early,
        apply_p50_ms: percentile(&all_latency, 0.5),
        apply_p99_ms: percentile(&all_latency, 0.99),
        engine_max_ms,
        total_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(planned: u64, started: i64, gate: i64) -> StageClock {
        StageClock {
            planned,
            started_ms: Some(started),
            gate_ms: Some(gate),
        }
    }

    /// Four stages of 1, 4, 10 and 20 agents; each gate 50 ms after the stage's last answer,
    /// the next stage starting at that gate.
    fn four_stages() -> (Vec<(f64, bool)>, Vec<StageClock>) {
        let clocks = vec![
            clock(1, 1_000, 1_100),
            clock(4, 1_100, 1_400),
            clock(10, 1_400, 1_900),
            clock(20, 1_900, 2_600),
        ];
        let mut answers = vec![(1_050.0, false)];
        answers.extend((0..4).map(|i| (1_200.0 + 50.0 * f64::from(i), false)));
        answers.extend((0..10).map(|i| (1_410.0 + 40.0 * f64::from(i), i == 3)));
        answers.extend((0..20).map(|i| (1_950.0 + 30.0 * f64::from(i), false)));
        (answers, clocks)
    }

    #[test]
    fn answers_fall_in_the_stage_that_had_started() {
        let (answers, clocks) = four_stages();
        let t = stage_times(&answers, &clocks, 900.0);
        let counts: Vec<usize> = t.stages.iter().map(|s| s.agents).collect();
        assert_eq!(counts, [1, 4, 10, 20]);
        assert_eq!(t.stages[2].failed, 1);
        assert_eq!(t.early, 0);
        let planned: Vec<u64> = t.stages.iter().map(|s| s.planned).collect();
        assert_eq!(planned, [1, 4, 10, 20]);
        assert_eq!(t.stages[3].stage, 4);
    }

    #[test]
    fn a_stage_start_is_its_own_windows_first_instant() {
        // An answer at the very millisecond stage 2 started is stage 2's; one just before is
        // stage 1's; one before any start is early.
        let clocks = vec![clock(1, 100, 200), clock(2, 200, 300)];
        let answers = [
            (99.0, false),
            (199.9, false),
            (200.0, false),
            (250.0, false),
        ];
        let t = stage_times(&answers, &clocks, 50.0);
        assert_eq!(t.early, 1);
        assert_eq!(t.stages[0].agents, 1);
        assert_eq!(t.stages[1].agents, 2);
    }

    #[test]
    fn engine_time_runs_from_the_previous_gate_to_the_last_answer() {
        let (answers, clocks) = four_stages();
        let t = stage_times(&answers, &clocks, 900.0);
        let engine: Vec<Option<f64>> = t.stages.iter().map(|s| s.engine_ms).collect();
        // Stage 2: last answer 1,350 − gate 1,100; stage 3: 1,770 − 1,400; 4: 2,520 − 1,900.
        assert_eq!(engine, [None, Some(250.0), Some(370.0), Some(620.0)]);
        assert_eq!(t.engine_max_ms, Some(620.0));
        assert_eq!(t.stages[0].push_to_last_ms, Some(50.0), "the canary");
        assert_eq!(
            t.stages[1].last_to_gate_ms,
            Some(50.0),
            "gate 1,400 − 1,350"
        );
        assert_eq!(t.total_ms, Some(1_700.0), "last gate 2,600 − request 900");
    }

    #[test]
    fn engine_time_counts_from_the_gate_even_when_the_next_stage_started_later() {
        // Stage 2 started 30 ms after stage 1's gate (a resumed or promoted rollout).
        let clocks = vec![clock(1, 100, 200), clock(2, 230, 400)];
        let answers = [(150.0, false), (300.0, false), (330.0, false)];
        let t = stage_times(&answers, &clocks, 50.0);
        assert_eq!(t.stages[1].engine_ms, Some(130.0), "330 − gate 200");
        assert_eq!(t.stages[1].push_to_last_ms, Some(100.0), "330 − start 230");
        assert_eq!(t.stages[1].last_to_gate_ms, Some(70.0));
    }

    #[test]
    fn latency_after_stage_start_is_per_stage_and_overall() {
        let (answers, clocks) = four_stages();
        let t = stage_times(&answers, &clocks, 900.0);
        // Stage 2 answers 100, 150, 200, 250 ms after its start.
        assert_eq!(t.stages[1].apply_p50_ms, 150.0);
        assert_eq!(t.stages[1].apply_p99_ms, 250.0);
        assert_eq!(t.stages[0].apply_p50_ms, 50.0);
        // 35 latencies: stage 4's 50…620 hold the top; the median is among stage 4's too.
        let mut all: Vec<f64> = vec![50.0];
        all.extend((0..4).map(|i| 100.0 + 50.0 * f64::from(i)));
        all.extend((0..10).map(|i| 10.0 + 40.0 * f64::from(i)));
        all.extend((0..20).map(|i| 50.0 + 30.0 * f64::from(i)));
        all.sort_by(f64::total_cmp);
        assert_eq!(t.apply_p50_ms, percentile(&all, 0.5));
        assert_eq!(t.apply_p99_ms, 620.0);
    }

    #[test]
    fn a_rollout_that_stopped_keeps_later_answers_in_the_last_started_stage() {
        // Stage 2 failed its gate; stages 3 and 4 never started.
        let clocks = vec![
            clock(1, 1_000, 1_100),
            clock(4, 1_100, 1_500),
            StageClock {
                planned: 10,
                ..StageClock::default()
            },
            StageClock {
                planned: 20,
                ..StageClock::default()
            },
        ];
        let answers = [(1_050.0, false), (1_200.0, true), (1_300.0, false)];
        let t = stage_times(&answers, &clocks, 900.0);
        let counts: Vec<usize> = t.stages.iter().map(|s| s.agents).collect();
        assert_eq!(counts, [1, 2, 0, 0]);
        assert_eq!(t.stages[2].engine_ms, None, "no answers, no time");
        assert_eq!(t.stages[2].apply_p50_ms, 0.0);
        assert_eq!(t.total_ms, None, "never finished");
        assert_eq!(t.engine_max_ms, Some(200.0));
    }
}
