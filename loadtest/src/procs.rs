//! Server processes: spawning `ampora serve` or the baseline, and reading their memory and
//! CPU from /proc.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Clock ticks per second of /proc/<pid>/stat times (USER_HZ, 100 on Linux).
const CLK_TCK: f64 = 100.0;

/// Resident set size of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// User + system CPU seconds used so far by `pid`.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces; fields after it are fixed.
    let rest = stat.rsplit_once(')').context("bad stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: f64 = f.get(11).context("utime")?.parse()?;
    let stime: f64 = f.get(12).context("stime")?.parse()?;
    Ok((utime + stime) / CLK_TCK)
}

/// A server process the harness started; killed when dropped.
#[derive(Debug)]
pub struct Spawned {
    pub child: Child,
    pub pid: u32,
    /// `host:port` it listens on.
    pub addr: String,
    /// The admin API token (Ampora only).
    pub admin_token: Option<String>,
    /// The CA agents must trust for `wss://` (`ampora serve` only: its local CA).
    pub ca_file: Option<PathBuf>,
    /// Kept for the process's lifetime (Ampora's data directory, logs).
    _dir: Option<tempfile::TempDir>,
}

impl Spawned {
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Reads the child's stdout until `ampora … listening on ADDR` (both servers print it), then
/// keeps draining it so the child never blocks on a full pipe.
async fn wait_listening(child: &mut Child) -> anyhow::Result<String> {
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some((_, addr)) = line.split_once("listening on ") {
                return Ok(addr.trim().to_string());
            }
        }
        bail!("the server exited before listening")
    })
    .await
    .context("the server did not start within 60 s")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(found)
}

/// The last `n` lines of a log file, for error messages.
fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts `cmd` with stderr to `log` and waits for its `listening on ADDR` line. If it fails
/// to come up, the error carries the end of its log.
pub async fn spawn_listening(mut cmd: Command, log: &Path) -> anyhow::Result<Spawned> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.as_std().get_program()))?;
    let pid = child.id().context("server pid")?;
    match wait_listening(&mut child).await {
        Ok(addr) => Ok(Spawned {
            child,
            pid,
            addr,
            admin_token: None,
            ca_file: None,
            _dir: None,
        }),
        Err(e) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            Err(e.context(format!("{} said:\n{}", log.display(), log_tail(log, 20))))
        }
    }
}

/// The setting that lets bootstrap tokens in over plaintext: on when the agents connect in
/// plaintext (the server refuses them by default), off with TLS, so that a plaintext agent
/// would show up as `http_401` instead of passing unnoticed.
pub fn plaintext_bootstrap_set(tls: bool) -> String {
    format!("opamp.bootstrap_plaintext_allowed={}", !tls)
}

/// The per-address limits off: a load test's agents come from a handful of loopback
/// addresses, unlike a fleet's (the `hostile` scenario turns them back on).
pub fn per_ip_limits_off() -> [&'static str; 4] {
    [
        "admission.max_connections_per_ip=0",
        "admission.accept_rate_per_ip_per_sec=0",
        "connections.max_pending_per_ip=0",
        "connections.max_connections_per_ip=0",
    ]
}

/// `ampora serve` on 127.0.0.1 with a fresh data directory and the Self-Agent off. `tls`: the
/// agents will connect over TLS (trusting [`Spawned::ca_file`]); else in plaintext. `sets`
/// come last, so they win.
pub async fn spawn_ampora(exe: &Path, sets: &[String], tls: bool) -> anyhow::Result<Spawned> {
    let dir = tempfile::Builder::new().prefix("ampora-lt-").tempdir()?;
    let data: PathBuf = dir.path().join("data");
    let mut cmd = Command::new(exe);
    cmd.arg("serve").arg("--data-dir").arg(&data).args([
        "--listen",
        "127.0.0.1:0",
        "--set",
        "self_agent.enabled=false",
        "--set",
        &plaintext_bootstrap_set(tls),
    ]);
    for s in per_ip_limits_off() {
        cmd.args(["--set", s]);
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    let mut s = spawn_listening(cmd, &dir.path().join("server.log")).await?;
    let token = std::fs::read_to_string(data.join("admin-token")).context("admin token")?;
    s.admin_token = Some(token.trim().to_string());
    // Created by `serve` before it listens.
    s.ca_file = Some(data.join("tls").join("ca.pem"));
    s._dir = Some(dir);
    Ok(s)
}

/// `<exe> baseline --listen 127.0.0.1:0` (this binary).
pub async fn spawn_baseline(exe: &Path) -> anyhow::Result<Spawned> {
    let mut child = Command::new(exe)
        .args(["baseline", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} baseline", exe.display()))?;
    let pid = child.id().context("baseline pid")?;
    let addr = wait_listening(&mut child).await?;
    Ok(Spawned {
        child,
        pid,
        addr,
        admin_token: None,
        ca_file: None,
        _dir: None,
    })
}

/// What a measured process is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A whole server (`ampora serve`, the baseline): every agent is on it.
    #[default]
    Server,
    /// A cluster gateway: the agents of its target.
    Gateway,
    /// A cluster coordinator: holds a share of every agent's state.
    Coordinator,
}

/// Memory and CPU of one server process over a hold.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcSample {
    pub pid: u32,
    #[serde(default)]
    pub role: Role,
    /// Agents the per-agent figure divides by: those connected to this gateway, else all.
    #[serde(default)]
    pub agents: usize,
    pub rss_before_kib: u64,
    pub rss_held_kib: u64,
    /// (held − before) / agents.
    pub kib_per_agent: f64,
    /// CPU used while idle, in % of one core, over the window.
    pub idle_cpu_percent: f64,
}

/// CPU of one process over a busy window (steady, churn), in % of one core.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CpuSample {
    pub pid: u32,
    pub role: Role,
    pub cpu_percent: f64,
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_rss_and_cpu() {
        let pid = std::process::id();
        assert!(super::rss_kib(pid).expect("rss") > 0);
        assert!(super::cpu_secs(pid).expect("cpu") >= 0.0);
    }
}
