//! The parent's view of the fleet: workers (in-process or child processes), the events
//! they report, and bounded waits on them.

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use indicatif::ProgressBar;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::agent::{AgentSpec, Mode, Params};
use crate::report::Stats;
use crate::worker::{Cmd, Event, WorkerLink};

/// The `k`-th of `steps` equal consecutive slices of `range` (the last ones may be empty).
fn step_slice(range: &Range<usize>, k: usize, steps: usize) -> Range<usize> {
    let (len, steps) = (range.len(), steps.max(1));
    (range.start + len * k / steps)..(range.start + len * (k + 1) / steps)
}

/// A progress bar and the counter it shows.
pub type Bar<'a> = Option<(&'a ProgressBar, fn(&Fleet) -> u64)>;

#[derive(Debug)]
pub struct Fleet {
    links: Vec<WorkerLink>,
    /// Agent index range of each worker.
    chunks: Vec<Range<usize>>,
    events: mpsc::UnboundedReceiver<Event>,
    ready: usize,
    stopped: usize,
    pub connected_at: Vec<Option<u64>>,
    pub connected: usize,
    /// (unix µs, failed) of the last APPLIED/FAILED of each agent since [`Fleet::reset_applied`]
    /// (with [`Fleet::watch_config`]: the first for the watched config).
    pub applied_at: Vec<Option<(u64, bool)>>,
    pub applied: usize,
    /// Only answers for this config hash (hex) count, each agent's first.
    watched: Option<String>,
    stats: Vec<Stats>,
}

impl Fleet {
    /// Starts `processes` worker processes (0: one in-process worker) for `n` agents and
    /// waits until each is ready. No agent connects yet.
    pub async fn launch(n: usize, processes: usize, exe: Option<PathBuf>) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut links = Vec::new();
        if processes == 0 {
            links.push(WorkerLink::local(tx));
        } else {
            let exe = match exe {
                Some(e) => e,
                None => std::env::current_exe().context("locating ampora-loadtest")?,
            };
            for _ in 0..processes {
                links.push(WorkerLink::spawn(&exe, tx.clone())?);
            }
        }
        let k = links.len();
        let chunks = (0..k).map(|w| (n * w / k)..(n * (w + 1) / k)).collect();
        let mut fleet = Self {
            links,
            chunks,
            events: rx,
            ready: 0,
            stopped: 0,
            connected_at: vec![None; n],
            connected: 0,
            applied_at: vec![None; n],
            applied: 0,
            watched: None,
            stats: Vec::new(),
        };
        let ok = fleet
            .pump_until(Duration::from_secs(30), None, |f| f.ready == k)
            .await;
        anyhow::ensure!(ok, "workers did not start within 30 s");
        Ok(fleet)
    }

    pub fn worker_pids(&self) -> Vec<u32> {
        self.links.iter().filter_map(WorkerLink::pid).collect()
    }

    pub fn workers(&self) -> usize {
        self.links.len()
    }

    /// Hands every worker its agents; they start connecting at once.
    pub fn start(&self, specs: &[AgentSpec], params: &Params) -> anyhow::Result<()> {
        self.start_step(specs, params, 0, 1)
    }

    /// Step `k` of `steps` of a ramp: every worker starts the `k`-th of `steps` equal slices
    /// of its agents, so each step spreads over all workers (and, round-robin, all targets).
    pub fn start_step(
        &self,
        specs: &[AgentSpec],
        params: &Params,
        k: usize,
        steps: usize,
    ) -> anyhow::Result<()> {
        for (link, range) in self.links.iter().zip(&self.chunks) {
            let slice = step_slice(range, k, steps);
            if slice.is_empty() {
                continue;
            }
            link.send(Cmd::Start {
                agents: specs[slice].to_vec(),
                params: params.clone(),
            })?;
        }
        Ok(())
    }

    pub fn set_mode(&self, mode: Mode) -> anyhow::Result<()> {
        for link in &self.links {
            link.send(Cmd::SetMode { mode })?;
        }
        Ok(())
    }

    pub fn reset_applied(&mut self) {
        self.applied_at.iter_mut().for_each(|a| *a = None);
        self.applied = 0;
        self.watched = None;
    }

    /// From now on only APPLIED/FAILED for config `hash` (hex) count, and each agent's first
    /// one only. Events still queued are judged by it too: they are only read while pumping.
    pub fn watch_config(&mut self, hash: &str) {
        self.watched = Some(hash.to_string());
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Ready => self.ready += 1,
            Event::Connected { idx, at_us } => {
                if let Some(slot @ None) = self.connected_at.get_mut(idx) {
                    *slot = Some(at_us);
                    self.connected += 1;
                }
            }
            Event::Applied {
                idx,
                at_us,
                failed,
                hash,
            } => {
                if let Some(w) = &self.watched {
                    let first = self.applied_at.get(idx).is_some_and(Option::is_none);
                    if hash.as_deref() != Some(w.as_str()) || !first {
                        return;
                    }
                }
                if let Some(slot) = self.applied_at.get_mut(idx) {
                    if slot.is_none() {
                        self.applied += 1;
                    }
                    *slot = Some((at_us, failed));
                }
            }
            Event::Stats { stats } => self.stats.push(stats),
            Event::Stopped => self.stopped += 1,
        }
    }

    /// Processes events until `done` holds or `limit` passes; true if `done` held. The bar,
    /// if any, shows `done`'s progress through the counter it is given.
    pub async fn pump_until(
        &mut self,
        limit: Duration,
        bar: Bar<'_>,
        done: impl Fn(&Fleet) -> bool,
    ) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((bar, pos)) = &bar {
                bar.set_position(pos(self));
            }
            if done(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) => {
                    self.on_event(ev);
                    // Drain what is queued before re-checking (cheap batches of events).
                    while let Ok(ev) = self.events.try_recv() {
                        self.on_event(ev);
                    }
                }
                Ok(None) | Err(_) => return done(self),
            }
        }
    }

    /// Keeps processing events for `d` (a measurement window).
    pub async fn pump_for(&mut self, d: Duration) {
        self.pump_until(d, None, |_| false).await;
    }

    /// Counters of all workers since the last collection, merged.
    pub async fn collect(&mut self) -> anyhow::Result<Stats> {
        self.stats.clear();
        for link in &self.links {
            link.send(Cmd::Collect)?;
        }
        let k = self.links.len();
        let ok = self
            .pump_until(Duration::from_secs(30), None, |f| f.stats.len() >= k)
            .await;
        anyhow::ensure!(ok, "workers did not report their counters");
        let mut total = Stats::default();
        for s in self.stats.drain(..) {
            total.merge(&s);
        }
        Ok(total)
    }

    /// Stops every agent (goodbye, close) and every worker; returns the last counters.
    pub async fn stop(mut self) -> Stats {
        self.stats.clear();
        for link in &self.links {
            let _ = link.send(Cmd::Stop);
        }
        let k = self.links.len();
        self.pump_until(Duration::from_secs(40), None, |f| f.stopped >= k)
            .await;
        let mut total = Stats::default();
        for s in self.stats.drain(..) {
            total.merge(&s);
        }
        for link in self.links.drain(..) {
            link.finish().await;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::step_slice;

    #[test]
    fn ramp_steps_cover_every_agent_once() {
        for (range, steps) in [
            (0..10, 3),
            (5..12, 1),
            (100..101, 4),
            (0..0, 2),
            (3..1003, 7),
        ] {
            let mut next = range.start;
            for k in 0..steps {
                let s = step_slice(&range, k, steps);
                assert_eq!(s.start, next, "{range:?} {k}/{steps}");
                next = s.end;
            }
            assert_eq!(next, range.end, "{range:?} in {steps} steps");
        }
    }
}
