//! Workers: a set of agent tasks, driven by commands and reporting events. A worker runs
//! in-process (small fleets, tests) or as a child process (`ampora-loadtest worker`, JSON
//! lines over stdin/stdout) so a large fleet spreads over several processes, each under the
//! per-process open-file limit.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::agent::ClientTls;
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::agent::{self, AgentSpec, Mode, Params, Shared};
use crate::config;
pub use crate::report::Event;
use crate::report::Stats;

/// How long agents get to say goodbye when stopping.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Parent → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Cmd {
    /// Start these agents now.
    Start {
        agents: Vec<AgentSpec>,
        params: Params,
    },
    SetMode {
        mode: Mode,
    },
    /// Report the counters (and reset them).
    Collect,
    Stop,
}

/// The worker's one TLS client config. The parent checked the PEM already; should it still
/// fail here, TLS agents report `bad_url` (no CA) instead of connecting.
fn worker_tls(params: &Params) -> Option<ClientTls> {
    let pem = params.ca_pem.as_deref()?;
    crate::tls::client_tls(pem)
        .map_err(|e| eprintln!("worker: {e:#}"))
        .ok()
}

/// Runs a worker until `Stop` or until the command channel closes.
pub async fn run(mut cmds: mpsc::UnboundedReceiver<Cmd>, events: mpsc::UnboundedSender<Event>) {
    let (mode_tx, mode_rx) = watch::channel(Mode::Idle);
    let mut shared: Option<Arc<Shared>> = None;
    let mut tasks = JoinSet::new();
    let _ = events.send(Event::Ready);
    let collect = |shared: &Option<Arc<Shared>>| {
        shared
            .as_ref()
            .and_then(|s| s.stats.lock().ok().map(|mut st| std::mem::take(&mut *st)))
            .unwrap_or_default()
    };
    while let Some(cmd) = cmds.recv().await {
        match cmd {
            Cmd::Start { agents, params } => {
                let sh = shared
                    .get_or_insert_with(|| {
                        Arc::new(Shared {
                            events: events.clone(),
                            mode: mode_rx.clone(),
                            stats: Mutex::new(Stats::default()),
                            config: config::effective_config(params.config_bytes),
                            tls: worker_tls(&params),
                        })
                    })
                    .clone();
                let params = Arc::new(params);
                for a in agents {
                    tasks.spawn(agent::run(a, params.clone(), sh.clone()));
                }
            }
            Cmd::SetMode { mode } => {
                mode_tx.send_replace(mode);
            }
            Cmd::Collect => {
                let _ = events.send(Event::Stats {
                    stats: collect(&shared),
                });
            }
            Cmd::Stop => break,
        }
    }
    mode_tx.send_replace(Mode::Stop);
    let drained = tokio::time::timeout(STOP_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    let _ = events.send(Event::Stats {
        stats: collect(&shared),
    });
    let _ = events.send(Event::Stopped);
}

/// `ampora-loadtest worker`: [`run`] over JSON lines on stdin/stdout. End of stdin (the
/// parent died) stops the worker like `Stop`.
pub async fn serve_stdio() -> anyhow::Result<()> {
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Cmd>(&line) {
                Ok(cmd) => {
                    if cmd_tx.send(cmd).is_err() {
                        break;
                    }
                }
                Err(e) => eprintln!("worker: bad command: {e}"),
            }
        }
    });
    let worker = tokio::spawn(run(cmd_rx, ev_tx));
    let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
    while let Some(ev) = ev_rx.recv().await {
        let mut line = serde_json::to_vec(&ev)?;
        line.push(b'\n');
        out.write_all(&line).await?;
        // Batch what is already queued (thousands of Connected events) into one flush.
        if ev_rx.is_empty() {
            out.flush().await?;
        }
        if matches!(ev, Event::Stopped) {
            break;
        }
    }
    out.flush().await?;
    reader.abort();
    worker.await?;
    Ok(())
}

/// The parent's handle on one worker.
#[derive(Debug)]
pub struct WorkerLink {
    cmds: mpsc::UnboundedSender<Cmd>,
    child: Option<Child>,
    tasks: Vec<JoinHandle<()>>,
}

impl WorkerLink {
    /// A worker on this runtime.
    pub fn local(events: mpsc::UnboundedSender<Event>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            cmds: tx,
            child: None,
            tasks: vec![tokio::spawn(run(rx, events))],
        }
    }

    /// A worker process: `exe worker`.
    pub fn spawn(exe: &Path, events: mpsc::UnboundedSender<Event>) -> anyhow::Result<Self> {
        let mut child = Command::new(exe)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker {}", exe.display()))?;
        let mut stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
        let writer = tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                let Ok(mut line) = serde_json::to_vec(&cmd) else {
                    continue;
                };
                line.push(b'\n');
                if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
                    break;
                }
            }
        });
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Event>(&line) {
                    Ok(ev) => {
                        if events.send(ev).is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("bad worker event: {e}: {line}"),
                }
            }
        });
        Ok(Self {
            cmds: tx,
            child: Some(child),
            tasks: vec![writer, reader],
        })
    }

    pub fn send(&self, cmd: Cmd) -> anyhow::Result<()> {
        self.cmds
            .send(cmd)
            .map_err(|_| anyhow::anyhow!("worker is gone"))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Waits for the worker to end (after `Stop`), killing it if it takes too long.
    pub async fn finish(self) {
        let WorkerLink {
            cmds,
            child,
            mut tasks,
        } = self;
        // Closes the worker's stdin once the writer drains: a worker's stdin reader (a
        // blocking thread) only ends at EOF, and its runtime waits for it.
        drop(cmds);
        if let Some(mut child) = child {
            if tokio::time::timeout(STOP_GRACE * 2, child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        for t in tasks.drain(..) {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}
