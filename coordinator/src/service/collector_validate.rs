//! A Collector binary's own check of a new config (`preflight.collector_binary`): the files
//! are written to a temporary directory and given to `<binary> validate --config <file>…`,
//! which must exit 0 within `preflight.validate_timeout_secs`. What it printed on failure is
//! the problem operators read. The process is killed at the time limit.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use shared::domain::ConfigMap;

use super::preflight::ConfigProblem;

/// The end of what `validate` printed, at most this long.
const MAX_OUTPUT: usize = 2_048;

/// Runs `binary validate` on `files`; `None` when it accepts them.
pub(super) async fn validate(
    binary: &Path,
    limit: Duration,
    files: &ConfigMap,
) -> Option<ConfigProblem> {
    let problem = |message: String| ConfigProblem {
        file: String::new(),
        line: None,
        column: None,
        message,
    };
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            return Some(problem(format!(
                "collector validate: no temporary directory: {e}"
            )))
        }
    };
    let mut cmd = tokio::process::Command::new(binary);
    cmd.arg("validate")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (i, (name, file)) in files.iter().enumerate() {
        // Written under a name of ours: the agent-facing file name is not a path to trust.
        let path = dir.path().join(format!("config-{i}.yaml"));
        if let Err(e) = std::fs::write(&path, &file.body) {
            return Some(problem(format!(
                "collector validate: writing {name:?}: {e}"
            )));
        }
        cmd.arg(format!("--config={}", path.display()));
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Some(problem(format!(
                "collector validate: {} did not start: {e}",
                binary.display()
            )))
        }
    };
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Err(_) => Some(problem(format!(
            "collector validate did not finish within {} s",
            limit.as_secs()
        ))),
        Ok(Err(e)) => Some(problem(format!("collector validate: {e}"))),
        Ok(Ok(out)) if out.status.success() => None,
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stdout));
            let text = text.trim();
            let cut = text.len().saturating_sub(MAX_OUTPUT);
            let tail = text.get(cut..).unwrap_or(text);
            Some(problem(format!(
                "collector validate failed ({}): {tail}",
                out.status
            )))
        }
    }
}
