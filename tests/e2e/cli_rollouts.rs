//! Staged rollouts through the real `ampora` binary against an embedded server: a group put,
//! a rollout created with `--stages` and `--soak`, `rollout status --watch` returning 0 when
//! it succeeds and non-zero when a canary fails it, `rollout history` with the gates passed,
//! and a refused action reported as an error.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use agent::{wait_for, Agent};
use anyhow::{bail, Context as _};
use serde_json::Value;
use tests::{Fleet, TestServer, DEADLINE};
use tokio::process::Command;

use crate::opamp::opts;

/// Marker the test agents refuse (FAILED) in a config.
const BAD: &str = "kafka/broken";

/// Variables cargo sets when it runs a test (besides `CARGO_PKG_*`).
const CARGO_RUN_VARS: [&str; 7] = [
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
];

/// The `ampora` binary, as cargo builds it. Only the coordinator package's own tests may name
/// it (`CARGO_BIN_EXE_ampora`), so this asks cargo for it, into the target directory this test
/// runs from; when it is up to date that is a no-op.
pub(crate) async fn ampora_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // <target>/<profile>/deps/e2e-<hash>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary outside a cargo target directory")?;
    let target_dir = profile_dir.parent().context("no target directory")?;
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["build", "-p", "coordinator", "--bin", "ampora"])
        .args(["--message-format", "json-render-diagnostics"])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    // What cargo sets for a running test describes this package, not the build asked for; a
    // build script that watches one (ring watches CARGO_MANIFEST_DIR) would rebuild every run.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_") || CARGO_RUN_VARS.contains(&k.as_ref()) {
            cmd.env_remove(k.as_ref());
        }
    }
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
    }
    let out = cmd.output().await.context("running cargo build")?;
    if !out.status.success() {
        bail!("cargo build of ampora failed: {}", out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "ampora")
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo named no ampora executable")
}

/// One run of the CLI against `f`: exit status success, stdout, stderr. Bounded: a command
/// that outlives [`DEADLINE`] is killed and fails the test.
async fn ampora(
    bin: &Path,
    f: &TestServer,
    args: &[&str],
) -> anyhow::Result<(bool, String, String)> {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .args(["--server", &f.api.base, "--token", &f.api.token])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .with_context(|| format!("ampora {args:?} still running after {DEADLINE:?}"))??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The CLI's JSON answer (`--json`); fails unless the command succeeded.
pub(crate) async fn ampora_json(
    bin: &Path,
    f: &TestServer,
    args: &[&str],
) -> anyhow::Result<Value> {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let (ok, out, err) = ampora(bin, f, &with_json).await?;
    if !ok {
        bail!("ampora {args:?} failed: {err}");
    }
    serde_json::from_str(&out).with_context(|| format!("ampora {args:?} printed {out}"))
}

#[tokio::test]
async fn rollout_from_the_cli_is_watched_to_its_end() -> anyhow::Result<()> {
    let bin = ampora_bin().await?;
    let f = TestServer::start_with(tests::per_ip_limits_off).await?;
    let api = f.api();
    let mut agents = Vec::new();
    for i in 0..3 {
        let mut o = opts(f.ws_url(), api.token(&format!("cli-{i}")).await?, "cli");
        o.non_identifying.push(("ring".into(), "cli".into()));
        o.fail_configs_containing = Some(BAD.into());
        let a = Agent::start(o);
        wait_for(&mut a.status(), DEADLINE, |s| s.connected && s.replies > 0).await?;
        agents.push(a);
    }

    let group = ampora_json(
        &bin,
        &f,
        &["group", "put", "cli-ring", "--label", "ring=cli"],
    )
    .await?;
    assert_eq!(group["members"], 3, "{group}");
    let (ok, listed, err) = ampora(&bin, &f, &["group", "list"]).await?;
    assert!(ok, "{err}");
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("cli-ring") && l.contains("ring=cli")),
        "{listed}"
    );

    let (good, _) = api.config("cli-good", "receivers: {otlp: {}}\n").await?;
    let good = good.to_string();
    let created = ampora_json(
        &bin,
        &f,
        &[
            "rollout", "create", "--config", &good, "--group", "cli-ring", "--stages", "1,100%",
            "--soak", "0s",
        ],
    )
    .await?;
    let id = created["id"].as_i64().context("rollout id")?.to_string();
    assert_eq!(created["stages"][0]["planned"], 1, "{created}");
    assert_eq!(created["stages"][1]["planned"], 2, "{created}");

    let (ok, watched, err) = ampora(&bin, &f, &["rollout", "status", &id, "--watch"]).await?;
    assert!(ok, "a succeeded rollout exits 0: {err}\n{watched}");
    assert!(
        watched.contains(&format!("rollout {id} succeeded")),
        "{watched}"
    );
    assert!(
        watched.contains("stage 2/2  100%   [####################]  2/2 applied"),
        "the final status has full bars: {watched}"
    );

    let (ok, history, err) = ampora(&bin, &f, &["rollout", "history", &id]).await?;
    assert!(ok, "{err}");
    let kinds: Vec<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    let passed = kinds.iter().filter(|k| **k == "gate_passed").count();
    assert_eq!(passed, 2, "a gate passed per stage: {history}");
    assert_eq!(kinds.last(), Some(&"succeeded"), "{history}");

    // An action the state forbids is the server's 409, as an error and a failing exit.
    let (ok, _, err) = ampora(&bin, &f, &["rollout", "pause", &id]).await?;
    assert!(
        !ok && err.contains("409") && err.contains("succeeded"),
        "{err}"
    );

    // A canary that FAILs stops the next rollout: the watch ends with a failing exit.
    let (bad, _) = api
        .config("cli-bad", &format!("exporters: {{{BAD}: {{}}}}\n"))
        .await?;
    let bad = bad.to_string();
    let created = ampora_json(
        &bin,
        &f,
        &[
            "rollout", "create", "--config", &bad, "--label", "ring=cli", "--stages", "1,100%",
            "--soak", "0s",
        ],
    )
    .await?;
    let id = created["id"].as_i64().context("rollout id")?.to_string();
    let (ok, watched, err) = ampora(&bin, &f, &["rollout", "status", &id, "--watch"]).await?;
    assert!(!ok, "a failed rollout exits non-zero: {watched}");
    assert!(err.contains(&format!("rollout {id} is failed")), "{err}");
    assert!(watched.contains("gate FAILED"), "{watched}");

    for a in agents {
        a.stop().await;
    }
    f.stop().await
}
