//! Shared harness for the end-to-end tests: an embedded Ampora on port 0 in a temporary data
//! directory, an API client holding the admin token, metric scraping, and bounded waits.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};

pub mod browser;
pub mod cluster;
pub mod faults;
pub mod identity;
pub mod packages;
use coordinator::config::Config;
use coordinator::serve::{self, Running};
use serde_json::{json, Value};

/// Default deadline for a condition in these tests: generous for a loaded 2-core CI machine.
/// For what is genuinely slow or promises no time (a fleet starting, a rollout applied); a
/// promise of "at once" or "within seconds" gets its own bound below, so that breaking it fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Agents of a crashed gateway reconnect through another one "at once" (README, cluster mode):
/// the client retries at once, then after 250 ms doubling. Below the sandbox's ownership TTL
/// (6 s, [`cluster::Cluster::start`]), so a move that waited for the dead gateway's claims to
/// expire would miss it.
pub const RECONNECT_AFTER_CRASH: Duration = Duration::from_secs(5);

/// A stopping coordinator hands its partitions over "at once": well under one lease TTL (the
/// hand-over test sets 60 s), which a take-over by lease expiry would need.
pub const HANDOVER_WITHIN: Duration = Duration::from_secs(5);

/// A revoked token gets 401 "at once on every coordinator" (README, bootstrap tokens): one
/// `ctl` broadcast; a second of promise plus room for a 2-core machine running the whole
/// suite at once.
pub const REVOCATION_SEEN_WITHIN: Duration = Duration::from_secs(4);

/// The gateway holding an agent's old socket closes it once another gateway claimed the agent
/// (README, cluster mode: one live session): one delivery over the bus, so seconds at most
/// (with room for a 2-core machine running the whole suite at once).
pub const SUPERSEDED_CLOSE_WITHIN: Duration = Duration::from_secs(4);

/// How long past its drain window a stopping gateway may take to finish: the closing
/// handshakes and the release of its agents (the gateway's own grace is 5 s).
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Pause between two checks of a condition in [`eventually`].
const POLL: Duration = Duration::from_millis(25);

/// An embedded server in a temporary directory.
pub struct TestServer {
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub api: Api,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts with the Self-Agent off (so agent counts are exact) and `tweak` applied.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut cfg = Config::default();
        cfg.server.data_dir = dir.path().to_path_buf();
        cfg.server.listen = "127.0.0.1:0".into();
        cfg.self_agent.enabled = false;
        cfg.store.flush_interval_ms = 100;
        // Repeated refusals are summarised when their window ends: soon, in tests.
        cfg.audit.refusal_window_secs = 1;
        // The tests' agents mostly speak plaintext; explicit, so they keep working whatever
        // the default (tests of the refusal turn it off).
        cfg.opamp.bootstrap_plaintext_allowed = true;
        per_ip_limits_off(&mut cfg);
        tweak(&mut cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let running = serve::start(cfg, listener).await?;
        let addr = running.addr;
        let token = running
            .admin_token
            .clone()
            .context("a fresh server must know its admin token")?;
        Ok(Self {
            running: Some(running),
            addr,
            api: Api::new(addr, token),
            dir,
        })
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/opamp", self.addr)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}/v1/opamp", self.addr)
    }

    /// The same port over TLS (the server tells TLS from plaintext by the first byte).
    pub fn wss_url(&self) -> String {
        format!("wss://{}/v1/opamp", self.addr)
    }

    pub fn https_url(&self) -> String {
        format!("https://{}/v1/opamp", self.addr)
    }

    /// Client TLS trusting the server's local CA (`<data_dir>/tls/ca.pem`), as an agent that
    /// was given that file would.
    pub fn client_tls(&self) -> anyhow::Result<agent::ClientTls> {
        let ca = self
            .running
            .as_ref()
            .and_then(|r| r.tls_ca_cert.clone())
            .context("the server has no local CA (TLS files configured)")?;
        Ok(agent::ClientTls::from_ca_file(&ca)?)
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(r) = self.running.take() {
            r.stop().await?;
        }
        Ok(())
    }
}

/// Whether `reply` asks the agent to retry (`error_response` Unavailable). In a cluster that
/// is a correct answer at any moment (a partition moving, a coordinator whose lease round ran
/// late), and an agent honours it by retrying.
pub fn is_retry(reply: &proto::ServerToAgent) -> bool {
    reply
        .error_response
        .as_ref()
        .is_some_and(|e| e.r#type == proto::v1::ServerErrorResponseType::Unavailable as i32)
}

/// Sends `msg` on `conn` and returns the first reply that is not "retry", as an agent
/// would get it by retrying; fails if the connection closes or [`DEADLINE`] passes.
pub async fn ws_until_served(
    conn: &mut agent::WsConnection,
    msg: &proto::AgentToServer,
) -> anyhow::Result<proto::ServerToAgent> {
    let conn = tokio::sync::Mutex::new(conn);
    eventually("an answer other than retry", DEADLINE, || async {
        let mut conn = conn.lock().await;
        conn.send(msg).await?;
        let reply = conn.recv().await?.context("closed")?;
        Ok((!is_retry(&reply)).then_some(reply))
    })
    .await
}

/// [`ws_until_served`] for a plain-HTTP exchange: the first outcome that is not "retry".
pub async fn http_until_served(
    http: &mut agent::HttpTransport,
    msg: &proto::AgentToServer,
) -> anyhow::Result<Result<proto::ServerToAgent, agent::ClientError>> {
    let http = tokio::sync::Mutex::new(http);
    eventually("an answer other than retry", DEADLINE, || async {
        let outcome = http.lock().await.exchange(msg).await;
        Ok((!outcome.as_ref().is_ok_and(is_retry)).then_some(outcome))
    })
    .await
}

/// Every test client connects from 127.0.0.1, so the per-address limits are off in the
/// harness; the tests of those limits (`e2e/hostile.rs`) turn them back on.
pub fn per_ip_limits_off(cfg: &mut Config) {
    cfg.admission.max_connections_per_ip = 0;
    cfg.admission.accept_rate_per_ip_per_sec = 0;
    cfg.connections.max_pending_per_ip = 0;
    cfg.connections.max_connections_per_ip = 0;
}

/// Where agents connect and operators call the API: the embedded default ([`TestServer`]) or a
/// cluster sandbox ([`cluster::Cluster`]). The behaviour suite runs against both.
/// `Authorization: Bearer <token>`, as agents send their bootstrap token.
pub fn bearer(token: &str) -> Vec<(String, String)> {
    vec![("Authorization".into(), format!("Bearer {token}"))]
}

/// A first message of agent `uid` that reports status and an (empty) description.
pub fn hello(uid: shared::ids::InstanceUid) -> proto::AgentToServer {
    proto::AgentToServer {
        agent_description: Some(Default::default()),
        ..shared::testing::first_message(uid)
    }
}

/// A first message describing agent `uid` with `labels` (identifying attributes).
pub fn described(uid: shared::ids::InstanceUid, labels: &[(&str, &str)]) -> proto::AgentToServer {
    let mut msg = hello(uid);
    msg.agent_description = Some(proto::v1::AgentDescription {
        identifying_attributes: labels
            .iter()
            .map(|(k, v)| proto::v1::KeyValue {
                key: (*k).into(),
                value: Some(proto::v1::AnyValue {
                    value: Some(proto::v1::any_value::Value::StringValue((*v).into())),
                }),
            })
            .collect(),
        non_identifying_attributes: Vec::new(),
    });
    msg
}

/// An HTTP/1.1 request of which only the head and `sent` bytes of a `declared`-byte JSON
/// body have been written; the connection stays open.
pub async fn partial_post(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
    declared: usize,
    sent: usize,
) -> anyhow::Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt as _;
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {declared}\r\n{auth}\r\n"
    );
    s.write_all(head.as_bytes()).await?;
    // The start of a plausible config: `{"name":"big","body":"aaaa…`.
    let mut body = br#"{"name":"big","body":""#.to_vec();
    body.resize(sent.max(body.len()), b'a');
    s.write_all(&body[..sent]).await?;
    s.flush().await?;
    Ok(s)
}

pub trait Fleet {
    fn ws_url(&self) -> String;
    fn http_url(&self) -> String;
    fn api(&self) -> &Api;
    /// A live coordinator of the fleet (its store, its caches): for tests that must set up what
    /// the API cannot make, such as a token that has already expired.
    fn coordinator(&self) -> anyhow::Result<std::sync::Arc<coordinator::service::Coordinator>>;
}

impl Fleet for TestServer {
    fn ws_url(&self) -> String {
        TestServer::ws_url(self)
    }

    fn http_url(&self) -> String {
        TestServer::http_url(self)
    }

    fn api(&self) -> &Api {
        &self.api
    }

    fn coordinator(&self) -> anyhow::Result<std::sync::Arc<coordinator::service::Coordinator>> {
        self.running
            .as_ref()
            .map(|r| r.coordinator.clone())
            .context("the server is stopped")
    }
}

/// A JSON client for `/api/v1` with the admin token.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    pub base: String,
    pub token: String,
}

impl Api {
    pub fn new(addr: SocketAddr, token: String) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
            token,
        }
    }

    pub async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, v))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let (s, v) = self.raw(reqwest::Method::GET, path, None).await?;
        if s != 200 {
            bail!("GET {path}: {s} {v}");
        }
        Ok(v)
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let (s, v) = self.raw(reqwest::Method::POST, path, Some(body)).await?;
        if s != 200 {
            bail!("POST {path}: {s} {v}");
        }
        Ok(v)
    }

    pub async fn put_json(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let (s, v) = self.raw(reqwest::Method::PUT, path, Some(body)).await?;
        if s != 200 {
            bail!("PUT {path}: {s} {v}");
        }
        Ok(v)
    }

    /// Creates a bootstrap token and returns its text.
    pub async fn token(&self, name: &str) -> anyhow::Result<String> {
        let v = self.post("/api/v1/tokens", json!({ "name": name })).await?;
        v["token"]
            .as_str()
            .map(str::to_string)
            .context("no token in response")
    }

    /// Creates a single-file YAML config version; returns (id, hash).
    pub async fn config(&self, name: &str, body: &str) -> anyhow::Result<(i64, String)> {
        let v = self
            .post(
                "/api/v1/configs",
                json!({ "name": name, "body": body, "content_type": "text/yaml" }),
            )
            .await?;
        Ok((
            v["id"].as_i64().context("id")?,
            v["hash"].as_str().context("hash")?.to_string(),
        ))
    }

    pub async fn assign(&self, body: Value) -> anyhow::Result<Value> {
        self.post("/api/v1/assignments", body).await
    }

    pub async fn agent(&self, uid: &str) -> anyhow::Result<Option<Value>> {
        let (s, v) = self
            .raw(reqwest::Method::GET, &format!("/api/v1/agents/{uid}"), None)
            .await?;
        match s {
            200 => Ok(Some(v)),
            404 => Ok(None),
            _ => bail!("GET agent {uid}: {s} {v}"),
        }
    }

    /// Waits until the API shows agent `uid` in a state satisfying `pred`; returns that view.
    pub async fn wait_agent(
        &self,
        uid: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        eventually(&format!("agent {uid}: {what}"), DEADLINE, || async {
            Ok(self.agent(uid).await?.filter(|a| pred(a)))
        })
        .await
    }

    /// The whole `/metrics` page (Prometheus text).
    pub async fn metrics_text(&self) -> anyhow::Result<String> {
        let resp = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?;
        anyhow::ensure!(resp.status() == 200, "GET /metrics: {}", resp.status());
        Ok(resp.text().await?)
    }
}

/// How many refused authentications the audit rows record: a source's first refusal of a
/// reason in a window is a row of its own (`count` 1), its repeats one row with their count.
pub fn refusals(rows: &[Value]) -> u64 {
    rows.iter()
        .filter(|r| r["action"] == "auth.failed")
        .map(|r| r["detail"]["count"].as_u64().unwrap_or(0))
        .sum()
}

/// Whether an audit row of refusals shows `field: value` among what was presented (the first
/// refusal's own detail, or the samples of a summary).
pub fn presented(row: &Value, field: &str, value: &str) -> bool {
    row["detail"][field] == value
        || row["detail"]["presented"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p[field] == value))
}

/// Starts an agent and waits (up to [`DEADLINE`]) until it is connected, has its instance
/// uid and has had a reply; returns it with the uid as the API writes it.
pub async fn connected_agent(opts: agent::AgentOptions) -> anyhow::Result<(agent::Agent, String)> {
    let a = agent::Agent::start(opts);
    let s = agent::wait_for(&mut a.status(), DEADLINE, |s| {
        s.connected && s.instance_uid.is_some() && s.replies > 0
    })
    .await?;
    let uid = shared::ids::InstanceUid(s.instance_uid.unwrap_or_default()).to_string();
    Ok((a, uid))
}

/// Polls `check` until it yields `Some`, or fails after `deadline`. Never a fixed sleep: the
/// pause between polls is short and the deadline bounds the whole wait.
pub async fn eventually<T, F, Fut>(
    what: &str,
    deadline: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let last_err = std::sync::Mutex::new(None);
    let last = &last_err;
    let got = shared::testing::poll(deadline, POLL, || {
        let fut = check();
        async move {
            match fut.await {
                Ok(v) => v,
                Err(e) => {
                    *last.lock().expect("last error") = Some(e);
                    None
                }
            }
        }
    })
    .await;
    match got {
        Some(v) => Ok(v),
        None => {
            let last_err = last_err.into_inner().expect("last error");
            bail!("timed out after {deadline:?} waiting for {what} (last error: {last_err:?})")
        }
    }
}

impl Api {
    /// `GET path` for a body that is not one JSON value (JSON lines, say): the status, the
    /// headers and the text.
    pub async fn get_text(
        &self,
        path: &str,
    ) -> anyhow::Result<(u16, reqwest::header::HeaderMap, String)> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        Ok((status, headers, resp.text().await?))
    }
}
