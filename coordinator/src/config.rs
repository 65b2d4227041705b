//! Ampora's configuration: a TOML file, then environment overrides, then `--set` overrides.
//!
//! Parsing is one pass that reports every problem at once (unknown keys, wrong types, bad
//! values) instead of stopping at the first. Keys are matched ignoring case and underscores,
//! so the operator guide's `OpAmp:BootstrapPlaintextAllowed`, the environment's
//! `AMPORA_OPAMP__BOOTSTRAP_PLAINTEXT_ALLOWED` and the file's
//! `[opamp] bootstrap_plaintext_allowed` all name the same setting.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerSection,
    pub tls: TlsSection,
    pub opamp: OpampSection,
    pub admission: AdmissionSection,
    pub connections: ConnectionsSection,
    pub self_agent: SelfAgentSection,
    pub store: StoreSection,
    pub tokens: TokensSection,
    pub audit: AuditSection,
    pub cluster: ClusterSection,
    pub api: ApiSection,
    pub log: LogSection,
    pub packages: PackagesSection,
    pub preflight: PreflightSection,
}

/// Pre-flight checks of configs beyond Ampora's own: a Collector binary's `validate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreflightSection {
    /// A Collector binary (e.g. `/usr/bin/otelcol-contrib`): each new config version is also
    /// given to its `validate` command, in a temporary directory; empty: not run.
    pub collector_binary: PathBuf,
    /// How long `validate` may run before the config is refused for it.
    pub validate_timeout_secs: u64,
}

impl Default for PreflightSection {
    fn default() -> Self {
        Self {
            collector_binary: PathBuf::new(),
            validate_timeout_secs: 10,
        }
    }
}

/// Agent packages: which signed artifacts may be imported and how they are handed out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PackagesSection {
    /// minisign public keys (the base64 line of a `minisign.pub`); an artifact signed by one
    /// of them may be imported.
    pub trusted_keys: Vec<String>,
    /// cosign public keys (PEM text, or the path of a `cosign.pub`); an artifact whose cosign
    /// signature or Sigstore bundle verifies with one may be imported.
    pub trusted_cosign_keys: Vec<String>,
    /// Import artifacts without a signature (a bad signature is always refused).
    pub allow_unsigned: bool,
    pub max_artifact_bytes: u64,
    /// Failed installs of a package set after which an agent is marked failed.
    pub max_install_attempts: u32,
    /// Lifetime of the download credential in each offer (at most 900).
    pub download_token_ttl_secs: u64,
    /// Agents downloading and installing a package set at once, fleet-wide (each
    /// coordinator takes the share of its partitions); the others wait for a slot.
    pub max_concurrent_upgrades: u64,
    /// Downloads one gateway sends at once; more wait for a turn.
    pub max_downloads_per_gateway: u64,
    /// Cluster mode: a file holding the key of download credentials (64 hex digits), the same
    /// on every coordinator and gateway. Set, coordinators host packages (blobs in Postgres)
    /// and gateways serve them from a disk cache; empty, cluster nodes host nothing.
    pub download_key_file: PathBuf,
    /// Cluster mode: the URL agents download from, up to the host and port
    /// (`https://agents.example.com:4320`); empty: taken from `server.public_endpoint`.
    pub download_url: String,
    /// Cluster gateways: where fetched blobs are cached; empty: `<server.data_dir>/package-cache`.
    pub cache_dir: PathBuf,
    /// Cluster gateways: the most bytes of builds kept in the cache (the least recently
    /// served go first).
    pub cache_max_bytes: u64,
    /// When agents may start an upgrade: `[DAYS ]HH:MM-HH:MM` in UTC each, e.g.
    /// `"Sat,Sun 22:00-04:00"`; empty: at any time.
    pub maintenance_windows: Vec<String>,
}

impl Default for PackagesSection {
    fn default() -> Self {
        Self {
            trusted_keys: Vec::new(),
            trusted_cosign_keys: Vec::new(),
            allow_unsigned: false,
            max_artifact_bytes: 1 << 30,
            max_install_attempts: 3,
            download_token_ttl_secs: 600,
            max_concurrent_upgrades: 500,
            max_downloads_per_gateway: 500,
            download_key_file: PathBuf::new(),
            download_url: String::new(),
            cache_dir: PathBuf::new(),
            cache_max_bytes: 10 << 30,
            maintenance_windows: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Address of the one listener (OpAMP, API, health, metrics).
    pub listen: String,
    /// Where the embedded database, the admin token and the Self-Agent identity live.
    pub data_dir: PathBuf,
    /// The OpAMP URL agents should use, offered to them in connection settings. Empty: derived
    /// from `listen` (`ws://<listen>/v1/opamp`, with 0.0.0.0 shown as 127.0.0.1).
    pub public_endpoint: String,
}

/// TLS on the agent listener, which serves TLS and plaintext on the one port. Without files,
/// `ampora serve` creates a local CA in `<data_dir>/tls/` and serves a certificate from it;
/// `ampora gateway` serves plaintext only (for a gateway behind a TLS-terminating proxy);
/// `ampora coordinator` ignores the section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// PEM certificate chain, leaf first. Set together with `key_file`, or neither.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the chain's leaf.
    pub key_file: PathBuf,
    /// How often the two files are checked for changes; a changed, valid pair is served to
    /// new connections without a restart.
    pub reload_interval_secs: u64,
    /// The agent CA (PEM) that signs agent identities (coordinators) and that client
    /// certificates are verified against (gateways). Empty: `serve` uses its local CA when it
    /// has one; cluster nodes run without identities (agents keep their bound tokens).
    pub agent_ca_cert_file: PathBuf,
    /// The agent CA's private key (PEM); coordinators only.
    pub agent_ca_key_file: PathBuf,
    /// Lifetime of an issued identity; it is renewed after two thirds of it.
    pub identity_validity_secs: u64,
    /// The header a TLS-terminating proxy puts the client certificate in (URL-encoded PEM).
    pub client_cert_header: String,
    /// Addresses or CIDRs of proxies trusted to set `client_cert_header`, `X-Real-IP` /
    /// `X-Forwarded-For` (the agent's address) and `X-Forwarded-Proto` (https: it spoke TLS).
    pub trusted_proxies: Vec<String>,
    /// A file holding the secret (one per line while rotating; at least 16 visible ASCII
    /// characters) that trusted proxies must send in `X-Ampora-Proxy-Secret` for any of those
    /// headers to count. Empty: addresses and TLS are believed from `trusted_proxies` alone,
    /// forwarded client certificates never.
    pub trusted_proxy_secret_file: PathBuf,
}

impl TlsSection {
    /// `trusted_proxies` parsed. Validation has already refused any entry that does not
    /// parse, so none is dropped here.
    pub fn trusted_proxy_nets(&self) -> Vec<gateway::net::IpNet> {
        self.trusted_proxies
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// The configured certificate and key files; `None` when neither is set.
    pub fn files(&self) -> Option<(&Path, &Path)> {
        (!self.cert_file.as_os_str().is_empty() && !self.key_file.as_os_str().is_empty())
            .then_some((self.cert_file.as_path(), self.key_file.as_path()))
    }
}

impl Default for TlsSection {
    fn default() -> Self {
        Self {
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            reload_interval_secs: 5,
            agent_ca_cert_file: PathBuf::new(),
            agent_ca_key_file: PathBuf::new(),
            identity_validity_secs: 30 * 24 * 3600,
            client_cert_header: "X-SSL-Client-Cert".into(),
            trusted_proxies: Vec::new(),
            trusted_proxy_secret_file: PathBuf::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpampSection {
    /// `OpAmp:BootstrapPlaintextAllowed`: accept bootstrap tokens over plain ws:// and http://.
    /// Off by default: a token sent in the clear can be read and redeemed by someone else, so
    /// only local development should turn it on. Over TLS (also a trusted proxy's) tokens are
    /// always accepted.
    pub bootstrap_plaintext_allowed: bool,
    /// Largest accepted AgentToServer, after decompression.
    pub max_frame_bytes: u64,
    /// Heartbeat interval offered to agents that report heartbeats; never 0.
    pub heartbeat_interval_secs: u64,
    /// How long a gateway waits for a coordinator before answering "unavailable".
    pub request_timeout_secs: u64,
    /// Outbound pushes queued per WebSocket connection before new ones are dropped.
    pub write_queue: u64,
    /// Config offers a coordinator has sent in bulk (an assignment, a rollout stage) that no
    /// agent has answered yet, at most: further offers wait for answers, so a push to a big
    /// fleet goes out as fast as the cluster answers instead of flooding it.
    pub push_window: u64,
    /// Attributes (key-values, array values) in one AgentToServer, nested ones included.
    pub max_attributes: u64,
    /// Components (health and available-component entries, nested ones included) in one
    /// AgentToServer.
    pub max_components: u64,
    /// Files in one AgentToServer's effective config.
    pub max_config_files: u64,
    /// Repeated and map entries of any kind in one AgentToServer.
    pub max_entries: u64,
    /// Memory a gateway may spend decoding AgentToServer messages at once (their estimated
    /// decoded size, held until the coordinator answered); beyond it, 503 / Unavailable.
    pub decode_budget_bytes: u64,
    /// Custom capabilities (reverse-FQDN, e.g. `com.example.pause/v2`) whose messages Ampora
    /// relays between operators and agents: announced to agents, and agents' messages for
    /// them kept. Messages for any other capability are ignored, as OpAMP says.
    pub custom_capabilities: Vec<String>,
}

/// Gateway admission control, per gateway process: how many agent connections it holds and how
/// fast it takes on new ones, so a reconnect storm is served at a pace it can take. Refusals
/// (503 at the cap, 429 over the rate, both with `Retry-After`) happen before authentication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionSection {
    /// Open WebSocket connections; upgrades beyond it get 503. 0: unlimited.
    pub max_connections: u64,
    /// New WebSocket upgrades plus plain-HTTP requests per second; beyond it 429. 0: unlimited.
    pub accept_rate_per_sec: u64,
    /// How many of those may arrive at once (the token bucket's size); at least 1.
    pub accept_burst: u64,
    /// After a gateway starts, its accept rate ramps from 10 % to full over this time. 0: none.
    pub warmup_secs: u64,
    /// Open WebSockets from one source address (a trusted proxy's agent address); beyond it
    /// 429. 0: unlimited.
    pub max_connections_per_ip: u64,
    /// Open WebSockets on one credential (bootstrap token or certificate UID); beyond it 429.
    /// 0: unlimited.
    pub max_connections_per_credential: u64,
    /// Each source address's own accept rate, taken before the gateway's; beyond it 429.
    /// 0: unlimited.
    pub accept_rate_per_ip_per_sec: u64,
    /// How many of those one address may make at once; at least 1.
    pub accept_burst_per_ip: u64,
    /// A WebSocket that sends no AgentToServer within this time is closed. 0: no limit.
    pub first_message_timeout_secs: u64,
}

/// Connection-level limits of every listener (agent port, coordinator API), on the TCP peer
/// address: what a client can hold before it has sent a request. 0: unlimited / no limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionsSection {
    /// Connections waiting for their first byte or TLS handshake; when full the oldest is
    /// closed, so accepting never stops.
    pub max_pending: u64,
    /// Of those, from one peer address (trusted proxies exempt); beyond it the newest is closed.
    pub max_pending_per_ip: u64,
    /// Time to a new connection's first byte (TLS-sniffing listener).
    pub first_byte_timeout_ms: u64,
    /// Time from accept to the end of the TLS handshake.
    pub handshake_timeout_ms: u64,
    /// Time to receive a request's headers, and to wait for the next request on a keep-alive
    /// connection.
    pub header_read_timeout_secs: u64,
    /// Open HTTP connections (upgraded WebSockets excluded: `admission.max_connections`).
    pub max_connections: u64,
    /// Open HTTP connections from one peer address (trusted proxies exempt).
    pub max_connections_per_ip: u64,
}

impl Default for ConnectionsSection {
    /// Silent connections cost a few KiB each: 4,096 pending is a few MiB, and a newcomer
    /// always gets in. Agents send their first byte at once; 5 s allows slow links.
    fn default() -> Self {
        Self {
            max_pending: 4096,
            max_pending_per_ip: 256,
            first_byte_timeout_ms: 5_000,
            handshake_timeout_ms: 10_000,
            header_read_timeout_secs: 10,
            max_connections: 50_000,
            max_connections_per_ip: 5_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelfAgentSection {
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// How often changed agent status is written to the database, in one batch.
    pub flush_interval_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokensSection {
    /// TTL of bootstrap tokens created without an explicit one.
    pub default_ttl_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// Refused agent authentications are audited once per source address and reason per
    /// window, plus one row with the count of the repeats when the window ends.
    pub refusal_window_secs: u64,
}

impl Default for AuditSection {
    fn default() -> Self {
        Self {
            refusal_window_secs: 60,
        }
    }
}

/// Cluster mode (`ampora gateway`, `ampora coordinator`); `ampora serve` ignores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// This node's id (gateway or coordinator); empty: hostname plus a random suffix.
    pub node_id: String,
    pub nats_url: String,
    /// Prefix of every NATS subject, so several clusters can share one NATS.
    pub subject_prefix: String,
    pub redis_url: String,
    /// Prefix of every Redis key, for the same reason.
    pub redis_key_prefix: String,
    /// Coordinators only; gateways never open a database connection.
    pub postgres_url: String,
    pub postgres_max_connections: u64,
    /// Coordinator partition leases live this long unless renewed (every third of it). A
    /// crashed coordinator's partitions move to the others within about this time.
    pub lease_ttl_ms: u64,
    /// Redis agent-ownership entries live this long unless the gateway refreshes them (every
    /// third of it); a crashed gateway's entries vanish after it.
    pub ownership_ttl_secs: u64,
    /// A stopping gateway closes its agents spread over this window, so they reconnect to the
    /// other gateways gradually instead of all at once.
    pub drain_window_secs: u64,
    /// A gateway that has lost NATS for this long closes its agents so they reconnect
    /// through another gateway (it turns not-ready at once). 0: never; a short outage such
    /// as a NATS restart should keep the sockets.
    pub bus_lost_drain_secs: u64,
    /// Largest message on the bus (configs and effective configs travel in chunks above
    /// NATS's own payload limit; beyond this they are refused).
    pub max_bus_message_bytes: u64,
}

/// The REST API's own limits (`/api/v1`), on every coordinator. Refusals are counted in
/// `ampora_api_requests_refused_total{reason}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Largest request body, except config creation; beyond it 413.
    pub max_body_bytes: u64,
    /// Largest body of `POST /api/v1/configs` (config versions of several MiB are normal).
    pub max_config_body_bytes: u64,
    /// Time to receive a whole request body once it is being read; then 408.
    pub body_timeout_secs: u64,
    /// API requests in progress at once; beyond it 503 + Retry-After. 0: unlimited.
    pub max_concurrent_requests: u64,
    /// Accept API tokens over plaintext from non-loopback addresses. Off by default: a token
    /// sent in the clear can be read and used by anyone on the path. Over TLS (also a trusted
    /// proxy's `X-Forwarded-Proto: https`) and from loopback they are always accepted.
    pub token_plaintext_allowed: bool,
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            max_config_body_bytes: 64 * 1024 * 1024,
            body_timeout_secs: 30,
            max_concurrent_requests: 64,
            token_plaintext_allowed: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `ampora=debug,info`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:4320".into(),
            data_dir: PathBuf::from("ampora-data"),
            public_endpoint: String::new(),
        }
    }
}

impl Default for OpampSection {
    fn default() -> Self {
        Self {
            bootstrap_plaintext_allowed: false,
            max_frame_bytes: 4 * 1024 * 1024,
            heartbeat_interval_secs: 30,
            request_timeout_secs: 10,
            write_queue: 16,
            push_window: 4096,
            max_attributes: 4096,
            max_components: 4096,
            max_config_files: 256,
            max_entries: 16_384,
            decode_budget_bytes: 256 * 1024 * 1024,
            custom_capabilities: Vec::new(),
        }
    }
}

impl Default for AdmissionSection {
    /// A gateway is designed for 100k agents. 2,000 accepts/s is about what one gateway and
    /// coordinator sustain on a small (2-core) machine, token redemption included; the burst
    /// of 10,000 lets a fleet of that size (and the connect benchmark) in at once, and a
    /// restart takes the rest back over the 30 s warmup instead of all at once.
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            accept_rate_per_sec: 2_000,
            accept_burst: 10_000,
            warmup_secs: 30,
            // A NAT or site may hold thousands of agents; one address still cannot take the
            // gateway (a tenth of it), nor a token more than a reconnect overlap.
            max_connections_per_ip: 10_000,
            max_connections_per_credential: 8,
            accept_rate_per_ip_per_sec: 200,
            accept_burst_per_ip: 1_000,
            first_message_timeout_secs: 15,
        }
    }
}

impl Default for SelfAgentSection {
    fn default() -> Self {
        Self { enabled: true }
    }
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            flush_interval_ms: 1000,
        }
    }
}

impl Default for TokensSection {
    fn default() -> Self {
        Self {
            default_ttl_secs: 24 * 3600,
        }
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            node_id: String::new(),
            nats_url: "nats://127.0.0.1:4222".into(),
            subject_prefix: "ampora".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_key_prefix: "ampora".into(),
            postgres_url: "postgres://postgres@127.0.0.1:5432/ampora".into(),
            postgres_max_connections: 16,
            lease_ttl_ms: 10_000,
            ownership_ttl_secs: 60,
            drain_window_secs: 30,
            bus_lost_drain_secs: 10,
            max_bus_message_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// Every problem found, one per line.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problems):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Where a value came from, for error messages.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Env(String),
    Flag(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Env(v) => write!(f, "environment variable {v}"),
            Self::Flag(s) => write!(f, "--set {s}"),
        }
    }
}

fn normalize(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Builds the configuration from an optional file, the process environment (`AMPORA_*` and the
/// operator-guide form `OpAmp__Key`) and `--set KEY=VALUE` pairs, in that order of precedence
/// (later wins).
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    sets: &[String],
) -> Result<Config, ConfigErrors> {
    let read = file.map(|path| (path, std::fs::read_to_string(path)));
    let file = read
        .as_ref()
        .map(|(path, text)| (*path, text.as_deref().map_err(|e| e.to_string())));
    build(file, env, sets)
}

/// [`load`] of a file's text already in memory (`path` names it in errors): the same merge
/// and validation, no file system.
pub fn from_toml_str(
    path: &Path,
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
    sets: &[String],
) -> Result<Config, ConfigErrors> {
    build(Some((path, Ok(text))), env, sets)
}

/// `file`: the config file's path and its text, or why it could not be read.
fn build(
    file: Option<(&Path, Result<&str, String>)>,
    env: impl IntoIterator<Item = (String, String)>,
    sets: &[String],
) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let defaults = toml::Value::try_from(Config::default()).unwrap_or(toml::Value::Boolean(false));
    let Some(schema) = defaults.as_table() else {
        return Err(ConfigErrors(vec![
            "internal: defaults are not a table".into()
        ]));
    };
    let mut merged = toml::Table::new();

    if let Some((path, text)) = file {
        match text {
            Err(e) => errors.push(format!("{}: cannot read: {e}", path.display())),
            Ok(text) => match text.parse::<toml::Table>() {
                Err(e) => errors.push(format!("{}: {}", path.display(), e.message())),
                Ok(table) => {
                    for (section, value) in table {
                        let Some(keys) = value.as_table() else {
                            errors.push(format!(
                                "{}: `{section}` must be a [section]",
                                path.display()
                            ));
                            continue;
                        };
                        for (key, v) in keys {
                            set_key(
                                schema,
                                &mut merged,
                                &section,
                                key,
                                v.clone(),
                                &Source::File(path.to_path_buf()),
                                &mut errors,
                            );
                        }
                    }
                }
            },
        }
    }

    for (name, raw) in env {
        let rest = if let Some(r) = name.strip_prefix("AMPORA_") {
            r
        } else if normalize(&name).starts_with("opamp") && name.contains("__") {
            name.as_str()
        } else {
            continue;
        };
        // AMPORA_SERVER_URL and AMPORA_API_TOKEN belong to the CLI, not to the server config.
        let Some((section, key)) = rest.split_once("__") else {
            continue;
        };
        set_key(
            schema,
            &mut merged,
            section,
            key,
            parse_scalar(&raw),
            &Source::Env(name.clone()),
            &mut errors,
        );
    }

    for s in sets {
        let Some((path, raw)) = s.split_once('=') else {
            errors.push(format!("--set {s}: expected KEY=VALUE"));
            continue;
        };
        let Some((section, key)) = path.split_once(['.', ':']) else {
            errors.push(format!("--set {s}: expected SECTION.KEY or Section:Key"));
            continue;
        };
        set_key(
            schema,
            &mut merged,
            section,
            key,
            parse_scalar(raw),
            &Source::Flag(s.clone()),
            &mut errors,
        );
    }

    let config = match toml::Value::Table(merged).try_into::<Config>() {
        Ok(c) => Some(c),
        Err(e) => {
            errors.push(e.message().to_string());
            None
        }
    };
    if let Some(c) = &config {
        validate(c, &mut errors);
    }
    match config {
        Some(c) if errors.is_empty() => Ok(c),
        _ => Err(ConfigErrors(errors)),
    }
}

/// Values from the environment and flags are TOML scalars when they parse as one, else strings.
fn parse_scalar(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !v.is_table())
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn set_key(
    schema: &toml::Table,
    merged: &mut toml::Table,
    section: &str,
    key: &str,
    value: toml::Value,
    source: &Source,
    errors: &mut Vec<String>,
) {
    let Some((sname, skeys)) = schema
        .iter()
        .find(|(s, _)| normalize(s) == normalize(section))
    else {
        errors.push(format!("{source}: unknown section `{section}`"));
        return;
    };
    let Some(skeys) = skeys.as_table() else {
        return;
    };
    let Some((kname, default)) = skeys.iter().find(|(k, _)| normalize(k) == normalize(key)) else {
        errors.push(format!("{source}: unknown key `{section}.{key}`"));
        return;
    };
    if default.type_str() != value.type_str() {
        errors.push(format!(
            "{source}: `{sname}.{kname}` must be a {}, got a {}",
            default.type_str(),
            value.type_str()
        ));
        return;
    }
    if let toml::Value::Table(t) = merged
        .entry(sname.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
    {
        t.insert(kname.clone(), value);
    }
}

fn validate(c: &Config, errors: &mut Vec<String>) {
    if c.server.listen.parse::<SocketAddr>().is_err() {
        errors.push(format!(
            "server.listen: `{}` is not HOST:PORT with an IP address",
            c.server.listen
        ));
    }
    if c.tls.cert_file.as_os_str().is_empty() != c.tls.key_file.as_os_str().is_empty() {
        errors.push("tls.cert_file, tls.key_file: set both or neither".into());
    }
    if c.tls.reload_interval_secs == 0 {
        errors.push("tls.reload_interval_secs: must be at least 1".into());
    }
    if c.tls.agent_ca_cert_file.as_os_str().is_empty()
        && !c.tls.agent_ca_key_file.as_os_str().is_empty()
    {
        errors.push("tls.agent_ca_key_file: needs tls.agent_ca_cert_file".into());
    }
    if c.tls.identity_validity_secs == 0 {
        errors.push("tls.identity_validity_secs: must be at least 1".into());
    }
    if !c.tls.client_cert_header.is_empty()
        && axum::http::HeaderName::from_bytes(c.tls.client_cert_header.as_bytes()).is_err()
    {
        errors.push(format!(
            "tls.client_cert_header: `{}` is not a header name",
            c.tls.client_cert_header
        ));
    }
    for p in &c.tls.trusted_proxies {
        if let Err(e) = p.parse::<gateway::server::IpNet>() {
            errors.push(format!("tls.trusted_proxies: {e}"));
        }
    }
    if c.opamp.max_frame_bytes < 1024 {
        errors.push("opamp.max_frame_bytes: must be at least 1024".into());
    }
    if c.opamp.heartbeat_interval_secs == 0 {
        errors.push(
            "opamp.heartbeat_interval_secs: must be at least 1 (0 disables agent heartbeats)"
                .into(),
        );
    }
    if c.opamp.request_timeout_secs == 0 {
        errors.push("opamp.request_timeout_secs: must be at least 1".into());
    }
    if c.opamp.push_window == 0 {
        errors.push("opamp.push_window: must be at least 1".into());
    }
    if c.opamp.write_queue == 0 {
        errors.push("opamp.write_queue: must be at least 1".into());
    }
    if [
        c.opamp.max_attributes,
        c.opamp.max_components,
        c.opamp.max_config_files,
        c.opamp.max_entries,
    ]
    .contains(&0)
    {
        errors.push("opamp.max_attributes, max_components, max_config_files, max_entries: must be at least 1".into());
    }
    if c.opamp.decode_budget_bytes < c.opamp.max_frame_bytes {
        errors.push("opamp.decode_budget_bytes: must be at least opamp.max_frame_bytes".into());
    }
    if c.opamp
        .custom_capabilities
        .iter()
        .any(|cap| cap.is_empty() || cap.len() > 256)
    {
        errors.push("opamp.custom_capabilities: each must be 1 to 256 characters".into());
    }
    if c.preflight.validate_timeout_secs == 0 {
        errors.push("preflight.validate_timeout_secs: must be at least 1".into());
    }
    if c.admission.accept_rate_per_ip_per_sec > 0 && c.admission.accept_burst_per_ip == 0 {
        errors.push("admission.accept_burst_per_ip: must be at least 1 when accept_rate_per_ip_per_sec is set".into());
    }
    if c.connections.handshake_timeout_ms == 0 || c.connections.first_byte_timeout_ms == 0 {
        errors.push(
            "connections.first_byte_timeout_ms, handshake_timeout_ms: must be at least 1".into(),
        );
    }
    if c.admission.accept_rate_per_sec > 0 && c.admission.accept_burst == 0 {
        errors.push(
            "admission.accept_burst: must be at least 1 when accept_rate_per_sec is set (0 would refuse every connection)"
                .into(),
        );
    }
    if c.store.flush_interval_ms == 0 {
        errors.push("store.flush_interval_ms: must be at least 1".into());
    }
    if c.api.max_body_bytes < 1024 || c.api.max_config_body_bytes < c.api.max_body_bytes {
        errors.push(
            "api.max_body_bytes: must be at least 1024, and api.max_config_body_bytes at least that"
                .into(),
        );
    }
    if c.api.body_timeout_secs == 0 {
        errors.push("api.body_timeout_secs: must be at least 1".into());
    }
    if c.audit.refusal_window_secs == 0 {
        errors.push("audit.refusal_window_secs: must be at least 1".into());
    }
    if c.tokens.default_ttl_secs == 0 {
        errors.push("tokens.default_ttl_secs: must be at least 1".into());
    }
    if c.cluster.lease_ttl_ms < 300 {
        errors.push("cluster.lease_ttl_ms: must be at least 300".into());
    }
    if c.cluster.ownership_ttl_secs < 3 {
        errors.push("cluster.ownership_ttl_secs: must be at least 3".into());
    }
    if c.cluster.max_bus_message_bytes < c.opamp.max_frame_bytes {
        errors.push("cluster.max_bus_message_bytes: must be at least opamp.max_frame_bytes".into());
    }
    if !(1..=900).contains(&c.packages.download_token_ttl_secs) {
        errors.push("packages.download_token_ttl_secs: must be 1 to 900".into());
    }
    for w in &c.packages.maintenance_windows {
        if let Err(e) = crate::service::maintenance::Window::parse(w) {
            errors.push(format!("packages.maintenance_windows: {e}"));
        }
    }
    if c.packages.cache_max_bytes < c.packages.max_artifact_bytes {
        errors.push(
            "packages.cache_max_bytes: must hold at least one build (packages.max_artifact_bytes)"
                .into(),
        );
    }
    if c.packages.max_downloads_per_gateway == 0 {
        errors.push("packages.max_downloads_per_gateway: must be at least 1".into());
    }
    if c.packages.max_concurrent_upgrades == 0 {
        errors.push("packages.max_concurrent_upgrades: must be at least 1".into());
    }
    if c.packages.max_install_attempts == 0 {
        errors.push("packages.max_install_attempts: must be at least 1".into());
    }
    if !matches!(c.log.format.as_str(), "text" | "json") {
        errors.push(format!(
            "log.format: `{}` is neither text nor json",
            c.log.format
        ));
    }
}

impl Config {
    /// The OpAMP URL agents are told to use.
    pub fn public_endpoint(&self, bound: SocketAddr) -> String {
        if !self.server.public_endpoint.is_empty() {
            return self.server.public_endpoint.clone();
        }
        let mut addr = bound;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("ws://{addr}/v1/opamp")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(load(None, env(&[]), &[]), Ok(Config::default()));
        assert!(
            !Config::default().opamp.bootstrap_plaintext_allowed,
            "secure by default: bootstrap over plaintext is for local development"
        );
    }

    /// The configurations shipped in deploy/ are ones the nodes accept, the download key
    /// (cluster package hosting) included.
    #[test]
    fn the_shipped_deploy_configs_load() {
        let compose = include_str!("../../deploy/compose/ampora.toml");
        let k8s = include_str!("../../deploy/k8s/configmap.yaml");
        // The configmap's TOML is the indented block under `ampora.toml: |`.
        let k8s: String = k8s
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("ampora.toml: |"))
            .skip(1)
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
            .collect();
        // What an operator must set before the nodes start.
        let k8s = k8s.replace("SET-ME-ingress-controller-addresses", "10.0.0.0/24");
        for (path, text, key) in [
            ("compose", compose, "/etc/ampora-keys/download.key"),
            ("k8s", k8s.as_str(), "/etc/ampora-download-key/key"),
        ] {
            let c = from_toml_str(Path::new(path), text, env(&[]), &[])
                .unwrap_or_else(|e| panic!("{path}: {e:?}"));
            assert_eq!(c.packages.download_key_file, Path::new(key), "{path}");
        }
    }

    #[test]
    fn operator_guide_key_works_in_every_form() {
        for (e, s) in [
            (env(&[("OpAmp__BootstrapPlaintextAllowed", "true")]), vec![]),
            (
                env(&[("AMPORA_OPAMP__BOOTSTRAP_PLAINTEXT_ALLOWED", "true")]),
                vec![],
            ),
            (
                env(&[]),
                vec!["OpAmp:BootstrapPlaintextAllowed=true".to_string()],
            ),
            (
                env(&[]),
                vec!["opamp.bootstrap_plaintext_allowed=true".to_string()],
            ),
        ] {
            let c = load(None, e, &s).expect("valid");
            assert!(
                c.opamp.bootstrap_plaintext_allowed,
                "the operator guide's key turns on what is off by default"
            );
        }
    }

    /// `load` with `toml` as the configuration file.
    fn load_file(
        toml: &str,
        env: Vec<(String, String)>,
        sets: &[String],
    ) -> Result<Config, ConfigErrors> {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), toml).expect("write");
        load(Some(file.path()), env, sets)
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let errs = load_file(
            "[server]\nlisten = 5\nbogus = 1\n[opamp]\nheartbeat_interval_secs = 0\n[nope]\nx = 1\n",
            env(&[("AMPORA_LOG__FORMAT", "xml")]),
            &["store.flush_interval_ms=fast".into()],
        )
        .expect_err("invalid");
        let text = errs.to_string();
        for needle in [
            "`server.listen` must be a string",
            "unknown key `server.bogus`",
            "unknown section `nope`",
            "`store.flush_interval_ms` must be a integer",
            "heartbeat_interval_secs: must be at least 1",
            "log.format",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn file_then_env_then_flags() {
        let c = load_file(
            "[server]\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\n",
            env(&[("AMPORA_SERVER__LISTEN", "127.0.0.1:2")]),
            &["server.data_dir=/y".into()],
        )
        .expect("valid");
        assert_eq!(c.server.listen, "127.0.0.1:2");
        assert_eq!(c.server.data_dir, PathBuf::from("/y"));
    }

    /// The README's reference block is the documentation of every key: it must parse, and it
    /// must show the real defaults.
    #[test]
    fn readme_documents_every_key_with_its_default() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\n").expect("README has a toml block") + 8;
        let block = &readme[start..];
        let block = &block[..block.find("```").expect("closed block")];
        assert_eq!(load_file(block, env(&[]), &[]), Ok(Config::default()));
        let documented: toml::Table = block.parse().expect("toml");
        let all = toml::Value::try_from(Config::default()).expect("defaults");
        for (section, keys) in all.as_table().expect("table") {
            for key in keys.as_table().expect("section").keys() {
                assert!(
                    documented.get(section).and_then(|s| s.get(key)).is_some(),
                    "README does not document {section}.{key}"
                );
            }
        }
    }

    #[test]
    fn tls_files_go_together() {
        let errs = load(
            None,
            env(&[("AMPORA_TLS__CERT_FILE", "/etc/ampora/cert.pem")]),
            &["tls.reload_interval_secs=0".into()],
        )
        .expect_err("invalid")
        .to_string();
        assert!(errs.contains("set both or neither"), "{errs}");
        assert!(errs.contains("reload_interval_secs"), "{errs}");
        let c = load(
            None,
            env(&[]),
            &["tls.cert_file=/c.pem".into(), "Tls:KeyFile=/k.pem".into()],
        )
        .expect("valid");
        assert_eq!(
            c.tls.files(),
            Some((Path::new("/c.pem"), Path::new("/k.pem")))
        );
        assert_eq!(Config::default().tls.files(), None);
    }

    #[test]
    fn public_endpoint_is_derived() {
        let c = Config::default();
        let addr: SocketAddr = "0.0.0.0:4320".parse().expect("addr");
        assert_eq!(c.public_endpoint(addr), "ws://127.0.0.1:4320/v1/opamp");
    }
}
