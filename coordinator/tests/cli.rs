//! The README's quick start, through the real `ampora` binary: serve on the embedded default
//! (which prints where its TLS CA is), see the Self-Agent, create a token, push a config and
//! see it applied.
//! (Separate from the e2e binary because only this package's tests can run its binary.)

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

const AMPORA: &str = env!("CARGO_BIN_EXE_ampora");
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ampora(args: &[&str]) -> Value {
    let out = Command::new(AMPORA)
        .args(args)
        .output()
        .expect("run ampora");
    assert!(
        out.status.success(),
        "ampora {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&out.stdout).trim().to_string()))
}

fn until(what: &str, f: impl FnMut() -> Option<Value>) -> Value {
    shared::testing::poll_blocking(DEADLINE, POLL, f)
        .unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

#[test]
fn quick_start_through_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf-8 path").to_string();
    let mut child = Command::new(AMPORA)
        .args(["serve", "--data-dir", &data, "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ampora serve");
    let stdout = child.stdout.take().expect("stdout");
    let server = Server(child);
    let mut addr = None;
    let mut ca = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("line");
        if let Some(rest) = line.strip_prefix("agents must trust the CA at ") {
            ca = Some(std::path::PathBuf::from(rest.trim()));
        }
        if let Some(rest) = line.split(" listening on ").nth(1) {
            addr = Some(rest.trim().to_string());
            break;
        }
    }
    let url = format!("http://{}", addr.expect("server prints its address"));
    // TLS on the same port from the first start: the local CA agents must trust.
    let ca = ca.expect("server prints where the CA certificate is");
    assert_eq!(ca, dir.path().join("tls").join("ca.pem"));
    assert!(std::fs::read_to_string(&ca)
        .expect("CA certificate")
        .starts_with("-----BEGIN CERTIFICATE-----"));
    let common = ["--server", &url, "--data-dir", &data, "--json"];
    let with = |extra: &[&str]| -> Value {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend_from_slice(&common);
        ampora(&args)
    };

    let self_agent = until("the Self-Agent in `ampora agents list`", || {
        let v = with(&["agents", "list"]);
        v.as_array()?
            .iter()
            .find(|a| {
                a["description"]["identifying"]["service.name"] == "ampora-self-agent"
                    && a["connected"] == true
            })
            .cloned()
    });
    let uid = self_agent["instance_uid"]
        .as_str()
        .expect("uid")
        .to_string();

    let token = with(&["tokens", "create", "--name", "quickstart", "--ttl", "1h"]);
    let text = token["token"].as_str().expect("token text");
    assert!(text.starts_with("amp-bs."));
    let listed = with(&["tokens", "list"]);
    assert!(listed
        .as_array()
        .is_some_and(|l| l.iter().any(|t| t["name"] == "quickstart")));

    let cfg = dir.path().join("collector.yaml");
    std::fs::write(&cfg, "receivers:\n  otlp: {}\n").expect("write config");
    let pushed = with(&[
        "config",
        "push",
        "--file",
        cfg.to_str().expect("path"),
        "--agent",
        &uid,
    ]);
    assert_eq!(pushed["matched_agents"], 1);
    until("the Self-Agent APPLIED the config", || {
        let a = with(&["agents", "show", &uid]);
        (a["config_state"] == "applied" && a["remote_config"]["status"] == "APPLIED").then_some(a)
    });
    drop(server);
}
