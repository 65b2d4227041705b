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
    vm_rss_kib(&status).with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// The `VmRSS:` line of a `/proc/<pid>/status` text, in KiB (the kernel writes `kB`).
pub fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// User + system CPU seconds used so far by `pid`.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    stat_cpu_secs(&stat).with_context(|| format!("bad /proc/{pid}/stat: {stat}"))
}

/// User + system CPU seconds of a `/proc/<pid>/stat` text: its own time only, not its waited-for
/// children's.
pub fn stat_cpu_secs(stat: &str) -> Option<f64> {
    // The command name (field 2) may contain spaces and parentheses; the fields after its last
    // ")" are fixed.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / CLK_TCK)
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
    spawn_ampora_in(fresh_dir()?, exe, sets, tls).await
}

/// A fresh directory for one spawned server; its data directory is `<dir>/data`.
pub fn fresh_dir() -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix("ampora-lt-").tempdir()?)
}

/// [`spawn_ampora`] in `dir`, whose `data` directory may already hold a store (seeded).
pub async fn spawn_ampora_in(
    dir: tempfile::TempDir,
    exe: &Path,
    sets: &[String],
    tls: bool,
) -> anyhow::Result<Spawned> {
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
    use super::*;
    use crate::agent::AgentSpec;
    use crate::measure::measured;
    use crate::options::RunOptions;
    use crate::scenario::{
        hold_report, Comparison, ConnectReport, HoldReport, Report, SteadyReport,
    };

    /// `/proc/<pid>/stat` of a process whose name holds spaces and parentheses, with distinct
    /// numbers in every field around the CPU times: utime 1234 and stime 567 ticks (fields 14,
    /// 15); its children's 8 and 9 (16, 17) and the faults before (10-13) must not count.
    const STAT: &str = "4242 (ampora (rt) 1) S 1 4242 4242 0 -1 4194560 9000 17 3 5 1234 567 8 \
                        9 20 0 12 0 5000 123456789 2500 18446744073709551615 1 1 0 0 0 0 0 \
                        4096 17640 0 0 0 17 1 0 0 0 0 0";

    /// `/proc/<pid>/status` around VmRSS: the peak and the virtual size must not be taken.
    const STATUS: &str = "Name:\tampora\nState:\tS (sleeping)\nVmPeak:\t  912340 kB\n\
                          VmSize:\t  901234 kB\nVmHWM:\t   65432 kB\nVmRSS:\t   54321 kB\n\
                          RssAnon:\t   40000 kB\nThreads:\t12\n";

    #[test]
    fn cpu_is_user_plus_system_ticks_of_the_process_itself() {
        assert_eq!(stat_cpu_secs(STAT), Some((1234.0 + 567.0) / 100.0));
        assert_eq!(stat_cpu_secs("4242 (truncated) S 1 2"), None);
        assert_eq!(stat_cpu_secs("no parenthesis at all"), None);
    }

    #[test]
    fn rss_is_the_vmrss_line() {
        assert_eq!(vm_rss_kib(STATUS), Some(54_321));
        assert_eq!(vm_rss_kib("Name:\tx\nVmHWM:\t1 kB\n"), None);
    }

    #[test]
    fn reads_own_rss_and_cpu() {
        let pid = std::process::id();
        // A test binary with a tokio runtime linked in is resident in more than a MiB; the
        // CPU time grows with work done.
        let rss = rss_kib(pid).expect("rss");
        assert!(rss > 1024, "{rss} KiB");
        let before = cpu_secs(pid).expect("cpu");
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = cpu_secs(pid).expect("cpu");
        assert!(
            after > before,
            "100 ms of spinning used no CPU: {before} → {after}"
        );
    }

    fn spec(index: usize) -> AgentSpec {
        AgentSpec {
            index,
            endpoint: String::new(),
            token: None,
            source_ip: None,
            fail_configs: false,
        }
    }

    /// A cluster of 2 gateways and 2 coordinators with 5 agents, round-robin over the gateways'
    /// targets (3 on the first, 2 on the second); RSS in KiB before and held, CPU seconds over
    /// a 2 s window.
    fn cluster_hold() -> HoldReport {
        let opts = RunOptions {
            targets: vec!["ws://a/v1/opamp".into(), "ws://b/v1/opamp".into()],
            gateway_pids: vec![10, 11],
            coordinator_pids: vec![20, 21],
            ..RunOptions::default()
        };
        let specs: Vec<AgentSpec> = (0..5).map(spec).collect();
        let m = measured(&opts, &specs);
        let before = [100_000, 100_000, 200_000, 300_000];
        let held = [100_300, 100_100, 200_500, 301_000];
        let cpu = [0.5, 0.25, 1.0, 0.0];
        hold_report(&m, &before, &held, &cpu, 2.0, specs.len())
    }

    #[test]
    fn hold_figures_of_a_cluster() {
        let h = cluster_hold();
        let per_process: Vec<(u32, Role, usize, f64, f64)> = h
            .servers
            .iter()
            .map(|s| (s.pid, s.role, s.agents, s.kib_per_agent, s.idle_cpu_percent))
            .collect();
        assert_eq!(
            per_process,
            [
                // A gateway's growth over the agents on it; a coordinator's over all of them.
                (10, Role::Gateway, 3, 100.0, 25.0),
                (11, Role::Gateway, 2, 50.0, 12.5),
                (20, Role::Coordinator, 5, 100.0, 50.0),
                (21, Role::Coordinator, 5, 200.0, 0.0),
            ]
        );
        // All growth over all agents: (300 + 100 + 500 + 1000) / 5.
        assert_eq!(h.kib_per_agent, 380.0);
        // The gateway figure is the mean of the gateways' own; the coordinator one their
        // growth together over all agents.
        assert_eq!(h.gateway_kib_per_agent, Some(75.0));
        assert_eq!(h.coordinator_kib_per_agent, Some(300.0));
        assert_eq!(h.idle_cpu_percent, 87.5);
        assert_eq!(h.gateway_idle_cpu_percent, Some(37.5));
        assert_eq!(h.coordinator_idle_cpu_percent, Some(50.0));
        assert_eq!(h.window_secs, 2.0);
    }

    #[test]
    fn hold_figures_of_one_server() {
        let opts = RunOptions {
            targets: vec!["ws://a/v1/opamp".into()],
            server_pids: vec![7],
            ..RunOptions::default()
        };
        let specs: Vec<AgentSpec> = (0..4).map(spec).collect();
        let m = measured(&opts, &specs);
        let h = hold_report(&m, &[50_000], &[50_400], &[0.1], 0.5, 4);
        assert_eq!(h.servers.len(), 1);
        assert_eq!((h.servers[0].role, h.servers[0].agents), (Role::Server, 4));
        assert_eq!(h.servers[0].rss_before_kib, 50_000);
        assert_eq!(h.servers[0].rss_held_kib, 50_400);
        assert_eq!(h.kib_per_agent, 100.0);
        assert_eq!(h.servers[0].kib_per_agent, 100.0);
        assert_eq!(h.idle_cpu_percent, 20.0);
        assert_eq!(
            (h.gateway_kib_per_agent, h.coordinator_kib_per_agent),
            (None, None),
            "no split without a cluster"
        );
    }

    #[test]
    fn comparison_ratios_are_ampora_over_baseline() {
        let report = |kib: f64, connect_secs: f64, rate: f64| Report {
            hold: Some(HoldReport {
                kib_per_agent: kib,
                ..HoldReport::default()
            }),
            connect: ConnectReport {
                seconds: connect_secs,
                ..ConnectReport::default()
            },
            steady: Some(SteadyReport {
                rate_per_sec: rate,
                ..SteadyReport::default()
            }),
            ..Report::default()
        };
        let c = Comparison::new(report(30.0, 2.0, 500.0), report(10.0, 4.0, 1000.0));
        assert_eq!(
            (
                c.kib_per_agent_ratio,
                c.connect_seconds_ratio,
                c.steady_rate_ratio
            ),
            (3.0, 0.5, 0.5)
        );
        assert!(c
            .summary()
            .contains("RSS per agent 3.00×, connect time 0.50×, steady msg/s 0.50×"));
        // A baseline figure that is missing or zero gives 0, not infinity.
        let c = Comparison::new(report(30.0, 2.0, 500.0), Report::default());
        assert_eq!(
            (
                c.kib_per_agent_ratio,
                c.connect_seconds_ratio,
                c.steady_rate_ratio
            ),
            (0.0, 0.0, 0.0)
        );
    }
}
