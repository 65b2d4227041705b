//! What a worker reports to the parent process: its events (one JSON line each) and the
//! counters of its agents, merged by the parent. Agents produce them and workers send them,
//! so both depend on this module rather than on each other.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hist::Histogram;

/// Worker → parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Ready,
    /// The agent's first hello was answered.
    Connected {
        idx: usize,
        at_us: u64,
    },
    /// The agent sent APPLIED (or FAILED) for a pushed config.
    Applied {
        idx: usize,
        /// Wall clock just before the answer was sent.
        at_us: u64,
        failed: bool,
        /// The config's hash (hex), as the agent reports it.
        #[serde(default)]
        hash: Option<String>,
    },
    Stats {
        stats: Stats,
    },
    Stopped,
}

/// Counters of one worker, merged by the parent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Steady-state exchanges completed (report sent, reply received).
    pub messages: u64,
    pub steady_latency: Histogram,
    /// Successful connects (hello answered), first ones included.
    pub connects: u64,
    /// Connected sessions that ended (any reason): `connects - ended` are connected now.
    #[serde(default)]
    pub ended: u64,
    pub errors: BTreeMap<String, u64>,
}

impl Stats {
    pub fn merge(&mut self, o: &Stats) {
        self.messages += o.messages;
        self.steady_latency.merge(&o.steady_latency);
        self.connects += o.connects;
        self.ended += o.ended;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }
}
