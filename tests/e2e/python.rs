//! Interoperability with a third-party OpAMP client: the PyPI package
//! `opentelemetry-opamp-client` (0.5b0, plain-HTTP transport), driven by
//! `tests/python/opamp_agent.py`. The agent polls Ampora over HTTP with a bootstrap token, shows
//! up in the API, receives an assigned config and reports it APPLIED, then says goodbye. With
//! the shipped default it is refused over `http://`, bootstraps over `https://` trusting the
//! server's local CA, and authenticates with a client certificate Ampora issued (mTLS, no
//! token).
//!
//! Needs `AMPORA_TEST_PYTHON`: a Python with that package installed (`tests/run.sh` prepares
//! `target/pyenv` and exports it). Without it the test fails; it never skips.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context as _};
use coordinator::config::Config;
use serde_json::{json, Value};
use tests::identity::CsrIdentity;
use tests::{eventually, TestServer, DEADLINE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/opamp_agent.py");

/// The script's own bound on its run time; well past every wait below.
const MAX_SECS: &str = "90";

/// The Python agent as a child process, with its stdout parsed into JSON events.
pub(crate) struct PyAgent {
    child: Child,
    /// Closing it asks the script to stop (it sends AgentDisconnect, then exits).
    stdin: Option<ChildStdin>,
    events: mpsc::UnboundedReceiver<Value>,
    /// Every event seen so far, for failure messages.
    seen: Vec<Value>,
    stderr: Arc<Mutex<String>>,
}

impl PyAgent {
    pub(crate) fn spawn(
        python: &str,
        endpoint: &str,
        token: &str,
        service: &str,
    ) -> anyhow::Result<Self> {
        Self::spawn_with(python, endpoint, service, &["--token", token])
    }

    /// The agent with further script arguments (`--token`, `--ca-file`, `--client-cert`, …).
    pub(crate) fn spawn_with(
        python: &str,
        endpoint: &str,
        service: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(python)
            .arg("-u")
            .arg(SCRIPT)
            .args(["--endpoint", endpoint])
            .args(extra)
            .args(["--service-name", service, "--poll-secs", "0.2"])
            .args(["--max-secs", MAX_SECS])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {python} {SCRIPT}"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut stderr_pipe = child.stderr.take().context("child stderr")?;
        let stdin = child.stdin.take();

        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| json!({ "event": "unparsed", "line": line }));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            events,
            seen: Vec::new(),
            stderr,
        })
    }

    /// What the script printed so far, and the tail of its stderr.
    fn transcript(&self) -> String {
        let err = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        let tail: String = {
            let chars: Vec<char> = err.chars().collect();
            chars[chars.len().saturating_sub(4000)..].iter().collect()
        };
        let events: Vec<String> = self.seen.iter().map(Value::to_string).collect();
        format!("events:\n  {}\nstderr (tail):\n{tail}", events.join("\n  "))
    }

    /// The next event matching `pred`, within [`DEADLINE`].
    pub(crate) async fn wait_event(
        &mut self,
        what: &str,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(until, self.events.recv()).await {
                Err(_) => bail!(
                    "timed out after {DEADLINE:?} waiting for the Python agent's {what}\n{}",
                    self.transcript()
                ),
                Ok(None) => {
                    let status = self.child.try_wait().ok().flatten();
                    bail!(
                        "the Python agent closed stdout (exit: {status:?}) before {what}\n{}",
                        self.transcript()
                    )
                }
                Ok(Some(v)) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return Ok(v);
                    }
                }
            }
        }
    }

    /// Closes stdin (the script's stop signal) and waits for a clean exit.
    pub(crate) async fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        drop(self.stdin.take());
        let exit = self
            .wait_event("exit event", |v| v["event"] == "exit")
            .await?;
        assert_eq!(exit["reason"], "stdin_closed", "{}", self.transcript());
        match tokio::time::timeout(DEADLINE, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                self.child.kill().await.ok();
                bail!("the Python agent did not exit\n{}", self.transcript())
            }
        }
    }
}

pub(crate) fn python() -> anyhow::Result<String> {
    let python = std::env::var("AMPORA_TEST_PYTHON").context(
        "AMPORA_TEST_PYTHON is not set: it must name a Python with the PyPI package \
         opentelemetry-opamp-client==0.5b0 installed (tests/run.sh prepares target/pyenv and \
         exports it; by hand: python3 -m venv target/pyenv && target/pyenv/bin/pip install \
         'opentelemetry-opamp-client==0.5b0' && export AMPORA_TEST_PYTHON=$PWD/target/pyenv/bin/python)",
    )?;
    if python.trim().is_empty() {
        bail!("AMPORA_TEST_PYTHON is empty");
    }
    Ok(python)
}

#[tokio::test]
async fn python_opamp_client_receives_config_and_reports_applied() -> anyhow::Result<()> {
    let python = python()?;
    let server = TestServer::start_with(|c| c.opamp.heartbeat_interval_secs = 1).await?;
    let token = server.api.token("python-interop").await?;
    let service = "python-interop";
    let mut agent = PyAgent::spawn(&python, &server.http_url(), &token, service)?;

    let uid_event = agent
        .wait_event("instance_uid", |v| v["event"] == "instance_uid")
        .await?;
    let uid = uid_event["uid"]
        .as_str()
        .context("instance_uid event without uid")?
        .to_string();
    agent
        .wait_event("first successful exchange", |v| v["event"] == "connected")
        .await?;

    let shown = eventually("python agent connected in API", DEADLINE, || async {
        Ok(server.api.agent(&uid).await?.filter(|a| {
            a["connected"] == true && a["description"]["identifying"]["service.name"] == service
        }))
    })
    .await?;
    assert_eq!(shown["instance_uid"], uid.as_str());
    assert_eq!(shown["transport"], "http");
    assert_eq!(shown["config_state"], "none");
    let caps = shown["capability_names"]
        .as_array()
        .context("capability_names")?;
    for cap in [
        "ReportsStatus",
        "AcceptsRemoteConfig",
        "ReportsRemoteConfig",
        "ReportsEffectiveConfig",
        "ReportsHeartbeat",
    ] {
        assert!(caps.contains(&json!(cap)), "{cap} missing from {shown}");
    }

    let body = "receivers:\n  otlp:\n    protocols:\n      http: {}\n";
    let (id, hash) = server.api.config("python-base", body).await?;
    let res = server
        .api
        .assign(json!({ "config_id": id, "agent": uid }))
        .await?;
    assert_eq!(res["matched_agents"], 1, "{res}");

    let got = agent
        .wait_event("config event", |v| v["event"] == "config")
        .await?;
    assert_eq!(got["hash"], hash.as_str(), "{}", agent.transcript());
    assert_eq!(got["body"], body);
    agent
        .wait_event("applied event", |v| {
            v["event"] == "applied" && v["hash"] == hash.as_str()
        })
        .await?;

    let applied = eventually("config_state applied in API", DEADLINE, || async {
        Ok(server.api.agent(&uid).await?.filter(|a| {
            a["config_state"] == "applied" && a["remote_config"]["status"] == "APPLIED"
        }))
    })
    .await;
    let applied = match applied {
        Ok(a) => a,
        Err(e) => bail!(
            "{e}\nagent in API: {:?}\n{}",
            server.api.agent(&uid).await,
            agent.transcript()
        ),
    };
    assert_eq!(applied["remote_config"]["hash"], hash.as_str());
    assert!(
        applied["remote_config"]
            .get("error_message")
            .is_none_or(|e| e == ""),
        "{applied}"
    );
    // The effective config travels in the library's full-state message sent right after the
    // status; wait for it rather than assume it came with the status.
    eventually("effective config in API", DEADLINE, || async {
        Ok(server
            .api
            .agent(&uid)
            .await?
            .filter(|a| a["effective_config"][""]["body"] == body))
    })
    .await?;

    // The library's stop() sends AgentDisconnect before the process exits; its poll thread may
    // still get one last poll in after it, in which case liveness (three missed one-second
    // polls, as configured above) takes the agent offline instead.
    let status = agent.stop().await?;
    assert!(
        status.success(),
        "python agent exit {status}\n{}",
        agent.transcript()
    );
    eventually(
        "python agent offline after it stopped",
        DEADLINE,
        || async {
            Ok(server
                .api
                .agent(&uid)
                .await?
                .filter(|a| a["connected"] == false))
        },
    )
    .await?;

    server.stop().await
}

#[tokio::test]
async fn python_opamp_client_bootstraps_over_https_only_and_connects_with_its_certificate(
) -> anyhow::Result<()> {
    let python = python()?;
    // The shipped default, which the harness overrides for its plaintext agents.
    let server = TestServer::start_with(|c| {
        c.opamp.bootstrap_plaintext_allowed = Config::default().opamp.bootstrap_plaintext_allowed;
    })
    .await?;
    let ca_file = server.dir.path().join("tls").join("ca.pem");
    let ca_arg = ca_file.to_str().context("CA path")?.to_string();
    let token = server.api.token("python-tls").await?;

    // Over http:// the token is refused, and not used up.
    let mut plain = PyAgent::spawn(&python, &server.http_url(), &token, "python-plain")?;
    let refused = plain
        .wait_event("refusal", |v| v["event"] == "connect_failed")
        .await?;
    assert!(
        refused["error"].as_str().is_some_and(|e| e.contains("401")),
        "{}",
        plain.transcript()
    );
    plain.stop().await?;

    // Over https://, trusting the CA the server created, the same token gets it in.
    let mut tls = PyAgent::spawn_with(
        &python,
        &server.https_url(),
        "python-tls",
        &["--token", &token, "--ca-file", &ca_arg],
    )?;
    let uid = tls
        .wait_event("instance_uid", |v| v["event"] == "instance_uid")
        .await?["uid"]
        .as_str()
        .context("uid")?
        .to_string();
    tls.wait_event("first successful exchange", |v| v["event"] == "connected")
        .await?;
    server
        .api
        .wait_agent(&uid, "python agent over https", |a| a["connected"] == true)
        .await?;
    assert!(tls.stop().await?.success(), "{}", tls.transcript());

    // mTLS: a certificate issued for an agent (here through a CSR on another connection, as
    // this client does not take connection settings) authenticates the Python client with no
    // token at all.
    let enrolled = CsrIdentity::enroll(
        &server.wss_url(),
        &std::fs::read_to_string(&ca_file)?,
        &server.api.token("python-mtls").await?,
    )
    .await?;
    let files = tempfile::tempdir()?;
    let cert = files.path().join("agent.pem");
    let key = files.path().join("agent-key.pem");
    std::fs::write(&cert, &enrolled.cert_pem)?;
    std::fs::write(&key, &enrolled.key_pem)?;
    let uid = enrolled.uid.to_string();
    let mut mtls = PyAgent::spawn_with(
        &python,
        &server.https_url(),
        "python-mtls",
        &[
            "--ca-file",
            &ca_arg,
            "--client-cert",
            cert.to_str().context("cert path")?,
            "--client-key",
            key.to_str().context("key path")?,
            "--instance-uid",
            &uid,
        ],
    )?;
    mtls.wait_event("first successful exchange", |v| v["event"] == "connected")
        .await?;
    server
        .api
        .wait_agent(&uid, "python agent over mTLS", |a| {
            a["connected"] == true
                && a["description"]["identifying"]["service.name"] == "python-mtls"
        })
        .await?;
    server
        .api
        .wait_identity(&uid, &enrolled.serial, "confirmed")
        .await?;
    assert!(mtls.stop().await?.success(), "{}", mtls.transcript());
    server.stop().await
}
