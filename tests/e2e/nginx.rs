//! Ampora behind nginx, configured from the template that `deploy/` ships
//! (`deploy/nginx/ampora.conf.template`): agents over WebSocket and plain HTTP and the REST API
//! all go through a real nginx, and the rendered configuration keeps idle agent connections open.
//!
//! nginx is required: if it is not installed these tests fail (tests/run.sh installs it).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use gateway::client::{wait_for, Agent, AgentOptions};
use serde_json::json;
use shared::ids::InstanceUid;
use tests::{eventually, Api, TestServer, DEADLINE};

/// The template, read at build time so the test always renders the file that is deployed.
const TEMPLATE: &str = include_str!("../../deploy/nginx/ampora.conf.template");

/// The placeholders the template documents; all three must be substituted.
const PLACEHOLDERS: [&str; 3] = [
    "${NGINX_LISTEN}",
    "${GATEWAY_SERVERS}",
    "${COORDINATOR_SERVERS}",
];

/// The longest silence a long-lived agent connection must survive through the proxy.
const MIN_AGENT_TIMEOUT: Duration = Duration::from_secs(3600);

/// Renders the template the way deploy/local-cluster.sh does (envsubst of the three names).
fn render(listen: &str, gateways: &[SocketAddr], coordinators: &[SocketAddr]) -> String {
    let servers = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|a| format!("server {a};"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    TEMPLATE
        .replace(PLACEHOLDERS[0], listen)
        .replace(PLACEHOLDERS[1], &servers(gateways))
        .replace(PLACEHOLDERS[2], &servers(coordinators))
}

/// Debian puts nginx in /usr/sbin, which is not on every user's PATH.
fn nginx_binary() -> anyhow::Result<PathBuf> {
    let sbin = PathBuf::from("/usr/sbin/nginx");
    if sbin.is_file() {
        return Ok(sbin);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
        .context(
            "nginx is not installed: install it (apt-get install nginx-light) or run tests/run.sh, \
             which does",
        )
}

/// A private nginx in a temporary prefix, in front of one Ampora. Killed on drop, so a failing
/// test does not leave it behind.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    prefix: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with `upstream` as the only gateway and the only coordinator. The port is
    /// picked free just before; if another process takes it first, nginx exits and we retry.
    async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let bin = nginx_binary()?;
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(&bin, upstream).await {
                Ok(n) => return Ok(n),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("nginx did not start")))
    }

    async fn try_start(bin: &Path, upstream: SocketAddr) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let prefix = tempfile::tempdir()?;
        std::fs::create_dir(prefix.path().join("logs"))?;
        let conf_path = prefix.path().join("nginx.conf");
        std::fs::write(
            &conf_path,
            render(&addr.to_string(), &[upstream], &[upstream]),
        )?;
        // Master and worker in one process: killing the child then stops all of nginx.
        let child = Command::new(bin)
            .arg("-p")
            .arg(format!("{}/", prefix.path().display()))
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(prefix.path().join("logs/error.log"))
            .args(["-g", "daemon off; master_process off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut nginx = Self {
            child,
            addr,
            prefix,
        };
        nginx.wait_ready().await?;
        Ok(nginx)
    }

    /// Waits until nginx answers `/health/ready` from the upstream, or fails with its error log
    /// if it exited.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let url = format!("http://{}/health/ready", self.addr);
        let http = reqwest::Client::new();
        let log = self.prefix.path().join("logs/error.log");
        let child = &mut self.child;
        eventually("nginx proxies /health/ready", DEADLINE, || {
            let exited = child.try_wait();
            let req = http.get(&url).send();
            let log = &log;
            async move {
                if let Some(status) = exited? {
                    let errors = std::fs::read_to_string(log).unwrap_or_default();
                    bail!("nginx exited with {status}: {errors}");
                }
                Ok(req.await.ok().filter(|r| r.status() == 200).map(|_| ()))
            }
        })
        .await
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/v1/opamp", self.addr)
    }

    fn http_url(&self) -> String {
        format!("http://{}/v1/opamp", self.addr)
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.prefix.path().join("logs/access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent connects through nginx with a bootstrap token, shows up in the API (read through
/// nginx), gets a config assigned through nginx and reports it applied. `access` is the line
/// nginx must have logged for the agent's transport.
async fn apply_through_nginx(
    endpoint: impl Fn(&Nginx) -> String,
    access: &str,
) -> anyhow::Result<()> {
    // A one-second heartbeat, offered to the agent, is also the HTTP poll interval.
    let server = TestServer::start_with(|c| c.opamp.heartbeat_interval_secs = 1).await?;
    let nginx = Nginx::start(server.addr).await?;
    let api = Api::new(nginx.addr, server.api.token.clone());

    let token = api.token("behind-nginx").await?;
    let agent = Agent::start(AgentOptions {
        endpoint: endpoint(&nginx),
        token: Some(token),
        instance_uid: Some(InstanceUid::new_v7().0),
        description: vec![("service.name".into(), "proxied-collector".into())],
        heartbeat: Duration::from_millis(200),
        ..AgentOptions::default()
    });
    let mut st = agent.status();
    let s = wait_for(&mut st, DEADLINE, |s| s.connected && s.replies > 0).await?;
    let uid = s
        .instance_uid
        .map(|u| InstanceUid(u).to_string())
        .context("agent has a uid")?;
    let shown = api
        .wait_agent(&uid, "connected", |a| a["connected"] == true)
        .await?;
    assert_eq!(
        shown["description"]["identifying"]["service.name"],
        "proxied-collector"
    );

    let body = "exporters:\n  debug: {}\n";
    let (id, hash) = api.config("via-nginx", body).await?;
    let res = api.assign(json!({ "config_id": id, "agent": uid })).await?;
    assert_eq!(res["matched_agents"], 1);
    let s = wait_for(&mut st, DEADLINE, |s| s.applied_configs >= 1).await?;
    assert_eq!(s.effective_config, body);
    let a = api
        .wait_agent(&uid, "config applied", |a| a["config_state"] == "applied")
        .await?;
    assert_eq!(a["remote_config"]["status"], "APPLIED");
    assert_eq!(a["remote_config"]["hash"], hash);

    agent.stop().await;
    api.wait_agent(&uid, "offline after goodbye", |a| a["connected"] == false)
        .await?;
    // The agent's traffic really went through nginx (a WebSocket is logged once it closes).
    eventually("nginx logged the agent", DEADLINE, || async {
        Ok(nginx.access_log().contains(access).then_some(()))
    })
    .await?;
    drop(nginx);
    server.stop().await
}

#[tokio::test]
async fn websocket_agent_through_nginx_receives_config_and_reports_applied() -> anyhow::Result<()> {
    apply_through_nginx(Nginx::ws_url, "\"GET /v1/opamp HTTP/1.1\" 101 ").await
}

#[tokio::test]
async fn http_agent_through_nginx_receives_config_and_reports_applied() -> anyhow::Result<()> {
    apply_through_nginx(Nginx::http_url, "\"POST /v1/opamp HTTP/1.1\" 200 ").await
}

/// The text of the block that follows `opening` (e.g. `location = /v1/opamp`), comments removed.
fn block<'a>(conf: &'a str, opening: &str) -> anyhow::Result<&'a str> {
    let start = conf
        .find(opening)
        .with_context(|| format!("no `{opening}` block"))?;
    let open = start + conf[start..].find('{').context("no `{`")? + 1;
    let mut depth = 1;
    for (i, c) in conf[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Ok(&conf[open..open + i]);
                }
            }
            _ => {}
        }
    }
    bail!("unterminated `{opening}` block")
}

/// The argument of every `name ...;` directive in `text`.
fn directives<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.split(';')
        .filter_map(|stmt| {
            let stmt = stmt.rsplit(['{', '}']).next()?.trim();
            let (n, arg) = stmt.split_once(char::is_whitespace)?;
            (n == name).then(|| arg.trim())
        })
        .collect()
}

/// An nginx time value: a number with an optional unit (`s` when absent).
fn nginx_duration(v: &str) -> anyhow::Result<Duration> {
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let n: u64 = v[..split]
        .parse()
        .with_context(|| format!("bad time `{v}`"))?;
    let secs = match &v[split..] {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        other => bail!("unexpected unit `{other}` in `{v}`"),
    };
    Ok(Duration::from_secs(secs))
}

/// Idle agent connections must outlive nginx's 60 s defaults: asserted on the rendered
/// configuration rather than by waiting an hour. The rest of what the proxy must do for OpAMP is
/// checked here too, since a missing directive would only show under load or with large configs.
#[test]
fn rendered_config_keeps_agent_connections_open_and_unbuffered() -> anyhow::Result<()> {
    let up: SocketAddr = "127.0.0.1:4321".parse()?;
    let conf = render("127.0.0.1:4320", &[up], &[up]);
    for p in PLACEHOLDERS {
        assert!(!conf.contains(p), "{p} left in the rendered config");
    }
    let code: String = conf
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let opamp = block(&code, "location = /v1/opamp")?;
    for name in ["proxy_read_timeout", "proxy_send_timeout"] {
        let values = directives(opamp, name);
        assert_eq!(values.len(), 1, "{name} must be set for /v1/opamp");
        let t = nginx_duration(values[0])?;
        assert!(
            t >= MIN_AGENT_TIMEOUT,
            "{name} {t:?} is below {MIN_AGENT_TIMEOUT:?}"
        );
    }

    // A draining gateway's 503 sends a reconnecting agent to another gateway.
    assert!(
        directives(opamp, "proxy_next_upstream")
            .first()
            .is_some_and(|v| v.split_whitespace().any(|w| w == "http_503")),
        "/v1/opamp must retry a 503 on the next gateway"
    );

    let server = block(&code, "server {")?;
    assert_eq!(directives(server, "proxy_http_version"), ["1.1"]);
    let headers = directives(server, "proxy_set_header");
    for h in [
        "Upgrade $http_upgrade",
        "Connection $connection_upgrade",
        "X-Forwarded-For $proxy_add_x_forwarded_for",
        "X-Real-IP $remote_addr",
    ] {
        assert!(headers.contains(&h), "missing proxy_set_header {h}");
    }
    assert!(
        code.contains("map $http_upgrade $connection_upgrade"),
        "the Connection header must follow Upgrade"
    );
    assert_eq!(directives(server, "proxy_buffering"), ["off"]);
    assert_eq!(directives(server, "proxy_request_buffering"), ["off"]);
    let body = directives(server, "client_max_body_size");
    let mib: u64 = body
        .first()
        .and_then(|v| v.strip_suffix('m'))
        .context("client_max_body_size in MiB")?
        .parse()?;
    assert!(mib > 4, "4 MiB OpAMP messages must pass: {body:?}");
    for upstream in ["upstream ampora_gateways", "upstream ampora_coordinators"] {
        assert_eq!(
            directives(block(&code, upstream)?, "server"),
            ["127.0.0.1:4321"]
        );
        assert_eq!(directives(block(&code, upstream)?, "keepalive").len(), 1);
    }
    Ok(())
}
