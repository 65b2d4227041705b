//! Ampora behind nginx, configured from the template that `deploy/` ships
//! (`deploy/nginx/ampora.conf.template`): agents over WebSocket and plain HTTP and the REST API
//! all go through a real nginx, and the rendered configuration keeps idle agent connections open.
//! Rendered with TLS, nginx terminates it and checks agents' client certificates, and Ampora,
//! trusting nginx (`tls.trusted_proxies`), takes the agent's certificate, address and TLS from
//! nginx's headers; a client cannot forge those headers through nginx.
//!
//! nginx is required: if it is not installed these tests fail (tests/run.sh installs it).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agent::{
    wait_for, Agent, AgentOptions, ClientError, ClientTls, ConnectError, HttpTransport,
    WsConnection,
};
use anyhow::{bail, Context as _};
use gateway::server::PROXY_SECRET_HEADER;
use serde_json::{json, Value};
use shared::ids::InstanceUid;
use tests::identity::{
    connected_on_certificate, proxy_secret_header, trust_proxy, url_encode, CLIENT_CERT_HEADER,
    PROXY_SECRET,
};
use tests::{bearer, eventually, hello, Api, TestServer, DEADLINE};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The template, read at build time so the test always renders the file that is deployed.
const TEMPLATE: &str = include_str!("../../deploy/nginx/ampora.conf.template");

/// The placeholders the template documents; all five must be substituted.
const PLACEHOLDERS: [&str; 5] = [
    "${NGINX_LISTEN}",
    "${NGINX_TLS}",
    "${GATEWAY_SERVERS}",
    "${COORDINATOR_SERVERS}",
    "${AMPORA_PROXY_SECRET}",
];

/// The longest silence a long-lived agent connection must survive through the proxy.
const MIN_AGENT_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where nginx's connections to Ampora come from (both on loopback): the trusted proxy.
const PROXY_IP: &str = "127.0.0.1";

/// Agents' own addresses, other loopback addresses than nginx's, so that the address Ampora
/// audits shows whose it is: an agent straight to Ampora, and one through nginx.
const AGENT_DIRECT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const AGENT_VIA_NGINX: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

/// An address a client claims in forwarding headers (TEST-NET-1: nobody's).
const FORGED_IP: &str = "192.0.2.1";

/// Agents' heartbeat, and the interval Ampora offers them: short, so "it keeps talking" is quick
/// to see.
const HEARTBEAT: Duration = Duration::from_millis(200);
const OFFERED_HEARTBEAT_SECS: u64 = 1;

/// What `NGINX_TLS` is rendered with: the server certificate, the agent CA that client
/// certificates are checked against, and that CA's CRL.
pub(crate) struct NginxTls {
    cert: PathBuf,
    key: PathBuf,
    agent_ca: PathBuf,
    crl: PathBuf,
    /// What clients trust to reach nginx.
    trust: ClientTls,
}

impl NginxTls {
    /// The embedded server's local CA (`<data_dir>/tls/`): it issued the server certificate
    /// (valid for 127.0.0.1) that nginx presents, and it is the agent CA as well. Its CRL is
    /// fetched as README § Reverse proxies says, so the documented setup is the one tested.
    async fn local_ca(server: &TestServer) -> anyhow::Result<Self> {
        let dir = server.dir.path().join("tls");
        let url = format!("http://{}/api/v1/identities/crl?format=pem", server.addr);
        let resp = reqwest::get(&url).await?.error_for_status()?;
        let crl = dir.join("agents.crl.pem");
        std::fs::write(&crl, resp.bytes().await?)?;
        Ok(Self {
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
            agent_ca: dir.join("ca.pem"),
            crl,
            trust: server.client_tls()?,
        })
    }

    /// The directives, as the template's header describes them.
    fn directives(&self) -> String {
        format!(
            "ssl_certificate {}; ssl_certificate_key {}; ssl_client_certificate {}; \
             ssl_verify_client optional; ssl_verify_depth 2; ssl_crl {};",
            self.cert.display(),
            self.key.display(),
            self.agent_ca.display(),
            self.crl.display(),
        )
    }
}

/// Renders the template the way deploy/local-cluster.sh does (envsubst of the five names);
/// `secret` is the proxy secret nginx sends (empty: none).
fn render(
    listen: &str,
    tls: &str,
    gateways: &[SocketAddr],
    coordinators: &[SocketAddr],
    secret: &str,
) -> String {
    let servers = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|a| format!("server {a};"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    TEMPLATE
        .replace(PLACEHOLDERS[0], listen)
        .replace(PLACEHOLDERS[1], tls)
        .replace(PLACEHOLDERS[2], &servers(gateways))
        .replace(PLACEHOLDERS[3], &servers(coordinators))
        .replace(PLACEHOLDERS[4], secret)
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
pub(crate) struct Nginx {
    child: Child,
    pub(crate) addr: SocketAddr,
    prefix: tempfile::TempDir,
    /// Trust for its TLS port, when it terminates TLS.
    tls: Option<ClientTls>,
}

impl Nginx {
    /// Starts nginx, plaintext, with `upstream` as the only gateway and the only coordinator,
    /// sending the proxy `secret` (empty: none). The port is picked free just before; if
    /// another process takes it first, nginx exits and we retry.
    pub(crate) async fn start(upstream: SocketAddr, secret: &str) -> anyhow::Result<Self> {
        let bin = nginx_binary()?;
        let mut last = None;
        for _ in 0..3 {
            match Self::start_on(&bin, free_addr()?, upstream, None, secret).await {
                Ok(n) => return Ok(n),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("nginx did not start")))
    }

    /// Starts nginx on `addr`, terminating TLS with `tls` if given; fails if nginx cannot
    /// listen there.
    async fn start_on(
        bin: &Path,
        addr: SocketAddr,
        upstream: SocketAddr,
        tls: Option<&NginxTls>,
        secret: &str,
    ) -> anyhow::Result<Self> {
        let prefix = tempfile::tempdir()?;
        std::fs::create_dir(prefix.path().join("logs"))?;
        let conf_path = prefix.path().join("nginx.conf");
        let (listen, directives) = match tls {
            Some(t) => (format!("{addr} ssl"), t.directives()),
            None => (addr.to_string(), String::new()),
        };
        std::fs::write(
            &conf_path,
            render(&listen, &directives, &[upstream], &[upstream], secret),
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
            tls: tls.map(|t| t.trust.clone()),
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
        let (addr, tls) = (self.addr, self.tls.clone());
        let child = &mut self.child;
        eventually("nginx proxies /health/ready", DEADLINE, || {
            let exited = child.try_wait();
            let http = &http;
            let (url, log, tls) = (&url, &log, &tls);
            async move {
                if let Some(status) = exited? {
                    let errors = std::fs::read_to_string(log).unwrap_or_default();
                    bail!("nginx exited with {status}: {errors}");
                }
                let status = match tls {
                    Some(tls) => https_status(addr, tls, "/health/ready").await.ok(),
                    None => http.get(url).send().await.ok().map(|r| r.status().as_u16()),
                };
                Ok((status == Some(200)).then_some(()))
            }
        })
        .await
    }

    /// The OpAMP URL over WebSocket: `wss://` when nginx terminates TLS.
    pub(crate) fn ws_url(&self) -> String {
        let s = if self.tls.is_some() { "s" } else { "" };
        format!("ws{s}://{}/v1/opamp", self.addr)
    }

    /// The OpAMP URL over plain HTTP: `https://` when nginx terminates TLS.
    fn http_url(&self) -> String {
        let s = if self.tls.is_some() { "s" } else { "" };
        format!("http{s}://{}/v1/opamp", self.addr)
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.prefix.path().join("logs/access.log")).unwrap_or_default()
    }

    /// The access log's entries for `request` (`"GET /v1/opamp HTTP/1.1"`, say).
    fn accesses(&self, request: &str) -> Vec<Access> {
        self.access_log()
            .lines()
            .filter_map(Access::parse)
            .filter(|a| a.request == request)
            .collect()
    }
}

/// One entry of the template's `ampora` access log format: the request line, the status nginx
/// answered and the one the upstream answered (`-` when nginx answered alone: no upstream).
#[derive(Debug, PartialEq)]
struct Access {
    request: String,
    status: u16,
    upstream_status: Option<u16>,
}

impl Access {
    /// `$remote_addr - $remote_user [$time_local] "$request" $status … upstream_status=$upstream_status …`
    fn parse(line: &str) -> Option<Self> {
        let (_, rest) = line.split_once('"')?;
        let (request, rest) = rest.split_once('"')?;
        let mut fields = rest.split_whitespace();
        let status = fields.next()?.parse().ok()?;
        let upstream_status = fields
            .find_map(|f| f.strip_prefix("upstream_status="))
            .and_then(|v| v.parse().ok());
        Some(Self {
            request: request.to_string(),
            status,
            upstream_status,
        })
    }

    /// Answered `status` by Ampora and passed on as such by nginx.
    fn answered(&self, status: u16) -> bool {
        self.status == status && self.upstream_status == Some(status)
    }
}

#[test]
fn access_log_lines_parse() {
    let line = "127.0.0.1 - - [05/Dec/2025:22:20:01 +0000] \"GET /v1/opamp HTTP/1.1\" 101 1234 \
                \"-\" \"ampora-agent\" upstream=127.0.0.1:4320 upstream_status=101 \
                request_time=3.201";
    assert_eq!(
        Access::parse(line),
        Some(Access {
            request: "GET /v1/opamp HTTP/1.1".into(),
            status: 101,
            upstream_status: Some(101),
        })
    );
    // nginx answering alone (no upstream reached): no upstream status.
    let alone = "127.0.0.1 - - [05/Dec/2025:22:20:01 +0000] \"GET /v1/opamp HTTP/1.1\" 502 157 \
                 \"-\" \"-\" upstream=- upstream_status=- request_time=0.001";
    let a = Access::parse(alone).expect("parses");
    assert!(!a.answered(502) && a.status == 502 && a.upstream_status.is_none());
}

/// A loopback address with a port free right now (a listener bound and closed again).
fn free_addr() -> anyhow::Result<SocketAddr> {
    let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

/// Ampora configured by `tweak` behind nginx terminating TLS (see [`NginxTls::local_ca`]), and
/// offering agents nginx's URL (`server.public_endpoint`): an agent that takes up a certificate
/// moves to the offered endpoint. So nginx's port is chosen before Ampora starts; if another
/// process takes it before nginx listens, both start again.
pub(crate) async fn behind_tls_nginx(
    tweak: fn(&mut coordinator::config::Config),
) -> anyhow::Result<(TestServer, Nginx, NginxTls)> {
    let bin = nginx_binary()?;
    let mut last = None;
    for _ in 0..3 {
        let addr = free_addr()?;
        let server = TestServer::start_with(|c| {
            tweak(c);
            c.server.public_endpoint = format!("wss://{addr}/v1/opamp");
        })
        .await?;
        let tls = NginxTls::local_ca(&server).await?;
        match Nginx::start_on(&bin, addr, server.addr, Some(&tls), PROXY_SECRET).await {
            Ok(nginx) => return Ok((server, nginx, tls)),
            Err(e) => {
                last = Some(e);
                server.stop().await?;
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("nginx did not start")))
}

/// The status code of `GET path` over TLS (the tests' reqwest has no TLS).
async fn https_status(addr: SocketAddr, tls: &ClientTls, path: &str) -> anyhow::Result<u16> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut stream = tls.handshake(&addr.ip().to_string(), tcp).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    // Only the status line is needed: read until it is complete.
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("connection closed before a status line");
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status in {line:?}"))
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent connects through nginx with a bootstrap token, shows up in the API (read through
/// nginx), gets a config assigned through nginx and reports it applied. `request` is the
/// request line of the agent's transport, which nginx must have logged with `status` from
/// Ampora for each of the agent's connections (a WebSocket) or exchanges (plain HTTP).
async fn apply_through_nginx(
    endpoint: impl Fn(&Nginx) -> String,
    request: &str,
    status: u16,
) -> anyhow::Result<()> {
    // A one-second heartbeat, offered to the agent, is also the HTTP poll interval.
    let server = TestServer::start_with(|c| c.opamp.heartbeat_interval_secs = 1).await?;
    // This Ampora trusts no proxy: nginx has no secret to send.
    let nginx = Nginx::start(server.addr, "").await?;
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

    // The console through nginx: `/` leads to it, signing in works, the agent is listed.
    let base = format!("http://{}", nginx.addr);
    let (http, cookie) = tests::browser::console_session(&base, &server.api.token).await?;
    let root = http.get(format!("{base}/")).send().await?;
    assert_eq!(root.headers()["location"], "/ui/");
    let fleet = http
        .get(format!("http://{}/ui/?q={uid}", nginx.addr))
        .header("cookie", cookie)
        .send()
        .await?
        .text()
        .await?;
    assert!(fleet.contains("proxied-collector"), "{fleet}");

    agent.stop().await;
    api.wait_agent(&uid, "offline after goodbye", |a| a["connected"] == false)
        .await?;
    // The agent's traffic really went through nginx (a WebSocket is logged once it closes):
    // every connection it established (a WebSocket's 101), or every reply it had (plain
    // HTTP), is an entry answered by Ampora and passed on by nginx.
    let s = st.borrow().clone();
    let expected = if status == 101 {
        s.connections_established
    } else {
        s.replies
    };
    let logged = eventually("nginx logged the agent", DEADLINE, || async {
        let logged = nginx.accesses(request);
        Ok((logged.len() as u64 >= expected).then_some(logged))
    })
    .await?;
    assert!(expected > 0, "{s:?}");
    assert!(
        logged.iter().all(|a| a.answered(status)),
        "every {request} answered {status} by Ampora: {logged:?}"
    );
    if status == 101 {
        assert_eq!(logged.len() as u64, expected, "one entry per upgrade");
    }
    drop(nginx);
    server.stop().await
}

#[tokio::test]
async fn websocket_agent_through_nginx_receives_config_and_reports_applied() -> anyhow::Result<()> {
    apply_through_nginx(Nginx::ws_url, "GET /v1/opamp HTTP/1.1", 101).await
}

#[tokio::test]
async fn http_agent_through_nginx_receives_config_and_reports_applied() -> anyhow::Result<()> {
    apply_through_nginx(Nginx::http_url, "POST /v1/opamp HTTP/1.1", 200).await
}

/// Ampora as it runs behind a TLS-terminating proxy: the proxy's address trusted when it sends
/// the proxy secret, bootstrap tokens refused over plaintext (which the hop from nginx is).
pub(crate) fn behind_tls_proxy(c: &mut coordinator::config::Config) {
    trust_proxy(c, PROXY_IP);
    c.opamp.bootstrap_plaintext_allowed = false;
    c.opamp.heartbeat_interval_secs = OFFERED_HEARTBEAT_SECS;
}

/// `Authorization: Bearer <token>`, plus any further headers.
fn with_bearer(token: &str, more: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut headers = bearer(token);
    headers.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    headers
}

/// The source addresses of the audited authentication failures with `reason`.
async fn audited_sources(api: &Api, reason: &str) -> anyhow::Result<Vec<String>> {
    let entries = api.get(&format!("/api/v1/audit?reason={reason}")).await?;
    Ok(entries
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["action"] == "auth.failed")
        .filter_map(|e| e["source_ip"].as_str().map(str::to_string))
        .collect())
}

/// Waits until a failure with `reason` from each of `sources` is audited; on timeout says which
/// addresses were audited instead.
async fn wait_audited_from(api: &Api, reason: &str, sources: &[IpAddr]) -> anyhow::Result<()> {
    let want: Vec<String> = sources.iter().map(IpAddr::to_string).collect();
    let waited = eventually(
        &format!("{reason} audited from {want:?}"),
        DEADLINE,
        || async {
            let got = audited_sources(api, reason).await?;
            Ok(want.iter().all(|w| got.contains(w)).then_some(()))
        },
    )
    .await;
    if let Err(e) = waited {
        let got = audited_sources(api, reason).await?;
        bail!("{e}; audited source addresses for {reason}: {got:?}");
    }
    Ok(())
}

/// The production setup: nginx terminates TLS and checks client certificates against the agent
/// CA; Ampora behind it, reached over plaintext, trusts nginx and refuses bootstrap tokens over
/// plaintext. An agent bootstraps over wss through nginx (let in because nginx says https),
/// takes up the certificate it is issued and reconnects with it: nginx verifies it and passes
/// it on in its header, the only way Ampora sees it. From then on its token is refused.
#[tokio::test]
async fn agent_bootstraps_through_tls_nginx_then_authenticates_with_its_certificate(
) -> anyhow::Result<()> {
    let (server, nginx, tls) = behind_tls_nginx(behind_tls_proxy).await?;
    let token = server.api.token("behind-tls-nginx").await?;
    let uid = InstanceUid::new_v7();
    let agent = Agent::start(AgentOptions {
        endpoint: nginx.ws_url(),
        tls: Some(tls.trust.clone()),
        token: Some(token.clone()),
        instance_uid: Some(uid.0),
        heartbeat: HEARTBEAT,
        accept_identity: true,
        ..AgentOptions::default()
    });
    let mut st = agent.status();
    let serial = connected_on_certificate(&mut st).await?;

    // Confirmed by the agent's first message on the certificate, which Ampora only had from
    // nginx's header.
    let identity = eventually("identity confirmed through nginx", DEADLINE, || async {
        let v = server
            .api
            .get(&format!("/api/v1/identities/{serial}"))
            .await?;
        Ok((v["state"] == "confirmed").then_some(v))
    })
    .await?;
    assert_eq!(identity["instance_uid"], uid.to_string().as_str());
    // It keeps talking on the certificate.
    let replies = st.borrow().replies;
    let s = wait_for(&mut st, DEADLINE, |s| {
        s.connected && s.replies > replies + 2
    })
    .await?;
    assert_eq!(s.client_cert_serial.as_deref(), Some(serial.as_str()));
    // Both connections went through nginx: the bootstrap one, closed for the switch, and the
    // one on the certificate (nginx logs a WebSocket when it ends). Each upgrade the agent saw
    // is one entry that Ampora answered 101, and there is no other.
    agent.stop().await;
    let established = st.borrow().connections_established;
    assert!(established >= 2, "bootstrap and certificate: {established}");
    let upgrades = eventually("nginx logged both WebSockets", DEADLINE, || async {
        let logged = nginx.accesses("GET /v1/opamp HTTP/1.1");
        Ok((logged.len() as u64 >= established).then_some(logged))
    })
    .await?;
    assert_eq!(upgrades.len() as u64, established, "{upgrades:?}");
    assert!(
        upgrades.iter().all(|a| a.answered(101)),
        "every upgrade answered 101 by Ampora: {upgrades:?}"
    );

    // The token, through nginx over TLS, no longer admits this agent.
    let headers = with_bearer(
        &token,
        &[(
            gateway::server::INSTANCE_UID_HEADER.as_str(),
            &uid.to_string(),
        )],
    );
    let connected = WsConnection::connect_with(
        &nginx.ws_url(),
        &headers,
        Some(AGENT_VIA_NGINX),
        Some(&tls.trust),
    )
    .await;
    match connected {
        Err(ConnectError::Status { status, body, .. }) => assert_eq!(status, 401, "{body}"),
        Err(e) => bail!("expected 401, got {e}"),
        Ok(mut conn) => {
            // Refused on the first message instead: an error and a close.
            conn.send(&hello(uid)).await?;
            let reply = conn.recv().await?;
            assert!(
                reply.is_none_or(|r| r.error_response.is_some()),
                "the token must be refused"
            );
        }
    }
    // Audited with the address nginx saw.
    wait_audited_from(&server.api, "identity_required", &[AGENT_VIA_NGINX]).await?;

    drop(nginx);
    server.stop().await
}

/// The address Ampora audits for a refused agent is the agent's own: through nginx the one
/// nginx names (it is trusted), directly the peer's, whatever forwarding headers the agent
/// sends itself.
#[tokio::test]
async fn refused_agent_is_audited_with_its_own_address_through_nginx() -> anyhow::Result<()> {
    let (server, nginx, tls) = behind_tls_nginx(behind_tls_proxy).await?;
    let uid = InstanceUid::new_v7();
    let refused = |mut http: HttpTransport| async move {
        match http.exchange(&hello(uid)).await {
            Err(ClientError::Status { status: 401, .. }) => Ok(()),
            other => bail!("expected 401 without credentials, got {other:?}"),
        }
    };
    // Straight to Ampora from an address it does not trust, claiming another.
    let forged = [("X-Real-IP", FORGED_IP), ("X-Forwarded-For", FORGED_IP)]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec();
    refused(
        HttpTransport::new(&server.http_url(), forged, false).with_source_ip(Some(AGENT_DIRECT)),
    )
    .await?;
    // Through nginx over TLS, from another address.
    refused(
        HttpTransport::new_tls(&nginx.http_url(), Vec::new(), false, tls.trust.clone())
            .with_source_ip(Some(AGENT_VIA_NGINX)),
    )
    .await?;

    wait_audited_from(
        &server.api,
        "missing_credentials",
        &[AGENT_DIRECT, AGENT_VIA_NGINX],
    )
    .await?;
    let got = audited_sources(&server.api, "missing_credentials").await?;
    assert!(
        !got.iter().any(|ip| ip == FORGED_IP || ip == PROXY_IP),
        "neither the forged address nor nginx's may be audited: {got:?}"
    );
    drop(nginx);
    server.stop().await
}

/// nginx replaces the forwarding headers a client sends with its own, so the trust Ampora puts
/// in nginx cannot be borrowed: through plaintext nginx a forged certificate header and a
/// forged `X-Forwarded-Proto: https` count for nothing, though the same headers sent to Ampora
/// from nginx's (trusted) address with the proxy secret would be believed.
#[tokio::test]
async fn clients_cannot_forge_the_trusted_headers_through_nginx() -> anyhow::Result<()> {
    let server = TestServer::start_with(behind_tls_proxy).await?;
    let nginx = Nginx::start(server.addr, PROXY_SECRET).await?;

    // A real agent certificate: an agent bootstraps over TLS straight to Ampora and takes one
    // up; its PEM is in the API.
    let token = server.api.token("certificate-owner").await?;
    let uid = InstanceUid::new_v7();
    let agent = Agent::start(AgentOptions {
        endpoint: server.wss_url(),
        tls: Some(server.client_tls()?),
        token: Some(token),
        instance_uid: Some(uid.0),
        heartbeat: HEARTBEAT,
        accept_identity: true,
        ..AgentOptions::default()
    });
    let mut st = agent.status();
    let s = wait_for(&mut st, DEADLINE, |s| s.client_cert_serial.is_some()).await?;
    agent.stop().await;
    let serial = s.client_cert_serial.context("serial")?;
    let identity: Value = server
        .api
        .get(&format!("/api/v1/identities/{serial}"))
        .await?;
    let cert_pem = identity["cert_pem"].as_str().context("cert_pem")?;
    let cert_header = vec![(CLIENT_CERT_HEADER.to_string(), url_encode(cert_pem))];

    // From nginx's address with the proxy secret the header alone authenticates...
    let mut direct = HttpTransport::new(
        &server.http_url(),
        [cert_header.clone(), vec![proxy_secret_header()]].concat(),
        false,
    );
    let reply = direct.exchange(&hello(uid)).await?;
    assert!(reply.error_response.is_none(), "{:?}", reply.error_response);
    // ...but nginx sends no certificate header of a client's (nor a secret of a client's: it
    // sends its own): this one has no credentials.
    let forged_secret = (
        PROXY_SECRET_HEADER.to_string(),
        "guessed-secret-0123456789".into(),
    );
    let mut via = HttpTransport::new(
        &nginx.http_url(),
        [cert_header, vec![forged_secret]].concat(),
        false,
    );
    match via.exchange(&hello(uid)).await {
        Err(ClientError::Status { status, body, .. }) => {
            assert_eq!(status, 401, "{body}");
            assert!(
                body.contains("Authorization"),
                "refused for no credentials: {body}"
            );
        }
        other => bail!("a forged certificate header must not pass nginx, got {other:?}"),
    }

    // Likewise a claim of TLS: nginx says http, so the token is refused as plaintext bootstrap
    // (and not used up)...
    let token = server.api.token("forged-proto").await?;
    let claim = with_bearer(&token, &[("X-Forwarded-Proto", "https")]);
    let new_agent = InstanceUid::new_v7();
    let mut via = HttpTransport::new(&nginx.http_url(), claim.clone(), false);
    match via.exchange(&hello(new_agent)).await {
        Err(ClientError::Status { status, body, .. }) => {
            assert_eq!(status, 401, "{body}");
            assert!(body.contains("plaintext"), "refused as plaintext: {body}");
        }
        other => bail!("a forged X-Forwarded-Proto must not pass nginx, got {other:?}"),
    }
    // ...while from nginx's address with its secret the same claim lets the same token in.
    let mut direct = HttpTransport::new(
        &server.http_url(),
        [claim, vec![proxy_secret_header()]].concat(),
        false,
    );
    let reply = direct.exchange(&hello(new_agent)).await?;
    assert!(reply.error_response.is_none(), "{:?}", reply.error_response);

    drop(nginx);
    server.stop().await
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
    let conf = render("127.0.0.1:4320", "", &[up], &[up], "s3cret");
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
        "X-Forwarded-Proto $scheme",
        "X-SSL-Client-Cert $ssl_client_escaped_cert",
        "X-Ampora-Proxy-Secret \"s3cret\"",
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
