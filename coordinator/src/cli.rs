//! The `ampora` command line: `serve` plus operator commands that call the REST API.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(name = "ampora", version, about = "OpAMP fleet management server")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the embedded default: gateway and coordinator in one process on SQLite.
    Serve(ServeArgs),
    /// Run a cluster gateway: holds agent connections, relays over NATS, ownership in Redis.
    Gateway(ServeArgs),
    /// Run a cluster coordinator: agent state, configs, tokens and the API, on Postgres.
    Coordinator(ServeArgs),
    /// Agents in the fleet.
    #[command(subcommand)]
    Agents(AgentsCmd),
    /// Bootstrap tokens for agents.
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Operator API tokens and their roles (viewer, operator, admin).
    #[command(subcommand)]
    ApiTokens(ApiTokensCmd),
    /// Config versions and assignments.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Agent identities (mTLS client certificates issued after the bootstrap token).
    #[command(subcommand)]
    Identities(IdentitiesCmd),
    /// Print the OpenAPI document of the REST API.
    Openapi,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Overrides `server.data_dir`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Overrides `server.listen` (HOST:PORT; port 0 picks a free one).
    #[arg(long)]
    pub listen: Option<String>,
    /// Overrides any setting: `--set opamp.heartbeat_interval_secs=10` or
    /// `--set OpAmp:BootstrapPlaintextAllowed=false`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

/// How operator commands reach the server.
#[derive(Debug, Args, Clone)]
pub struct ApiArgs {
    /// Base URL of the Ampora API.
    #[arg(
        long,
        env = "AMPORA_SERVER",
        default_value = "http://127.0.0.1:4320",
        global = true
    )]
    pub server: String,
    /// API token; defaults to the admin token in `--data-dir`.
    #[arg(long, env = "AMPORA_API_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Data directory whose admin-token file is used when no token is given.
    #[arg(long, default_value = "ampora-data", global = true)]
    pub data_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum AgentsCmd {
    /// List agents.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Only agents whose attributes match, e.g. `--label env=prod` (repeatable).
        #[arg(long)]
        label: Vec<String>,
        /// Only connected agents.
        #[arg(long)]
        connected: bool,
    },
    /// Show one agent.
    Show {
        #[command(flatten)]
        api: ApiArgs,
        uid: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// Create a bootstrap token and print it (it is shown only once).
    Create {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long, default_value = "")]
        name: String,
        /// Lifetime, e.g. `30m`, `24h`, `7d` or seconds.
        #[arg(long)]
        ttl: Option<String>,
        /// Scope the token: only an agent whose first message reports every one of these
        /// attributes (`key=value`, repeatable) may redeem it.
        #[arg(long)]
        label: Vec<String>,
        /// Re-bootstrap one agent: the token may be used by this instance uid only (revoke
        /// the agent's identity first).
        #[arg(long)]
        agent: Option<String>,
    },
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiTokensCmd {
    /// Create an API token and print it (it is shown only once).
    Create {
        #[command(flatten)]
        api: ApiArgs,
        /// Unique, never reused; audit entries name the token's actions `api:<name>`.
        #[arg(long)]
        name: String,
        /// viewer (read only), operator (also configs and assignments) or admin (also tokens
        /// and API tokens).
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
    },
    /// List API tokens (never their text), revoked ones included.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke an API token: it gets 401 from then on.
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum IdentitiesCmd {
    /// List identities, revoked ones included, oldest first.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Only the identities of this agent (instance uid).
        #[arg(long)]
        agent: Option<String>,
    },
    /// Show one identity, with its certificate.
    Show {
        #[command(flatten)]
        api: ApiArgs,
        serial: String,
    },
    /// Revoke an identity: gateways refuse its certificate and its agent is disconnected.
    /// Give the agent a new bootstrap token to re-bootstrap it.
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        serial: String,
    },
}

#[derive(Debug, Args)]
pub struct TargetArgs {
    /// One agent by instance uid.
    #[arg(long)]
    pub agent: Option<String>,
    /// Agents whose attributes match all `key=value` labels (repeatable).
    #[arg(long)]
    pub label: Vec<String>,
    /// Every agent.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Create an immutable config version from a file.
    Create {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value = "text/yaml")]
        content_type: String,
    },
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    Show {
        #[command(flatten)]
        api: ApiArgs,
        id: i64,
    },
    /// Push a config to agents: a new version from `--file`, or an existing `--version`.
    Push {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long, conflicts_with = "version")]
        file: Option<PathBuf>,
        #[arg(long)]
        version: Option<i64>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "text/yaml")]
        content_type: String,
        #[command(flatten)]
        target: TargetArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// The newest entries matching the filters.
    List {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        filter: AuditFilterArgs,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Every entry matching the filters as JSON lines, oldest first, to stdout
    /// (`ampora audit export --since 24h > audit.jsonl`).
    Export {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        filter: AuditFilterArgs,
        /// Stop after this many entries (default: all).
        #[arg(long)]
        limit: Option<u64>,
    },
}

/// Audit filters. Times are an RFC 3339 timestamp (`2025-06-01T12:00:00Z`,
/// `2025-06-01T14:00:00+02:00`) or a duration before now (`90s`, `15m`, `1h`, `7d`).
#[derive(Debug, Args, Clone)]
pub struct AuditFilterArgs {
    /// Entries at or after this time: RFC 3339, or a duration ago such as `1h`.
    #[arg(long)]
    pub since: Option<String>,
    /// Entries before this time: RFC 3339, or a duration ago such as `10m`.
    #[arg(long)]
    pub until: Option<String>,
    /// Entries about this agent (instance uid).
    #[arg(long)]
    pub agent: Option<String>,
    /// Entries by this actor, e.g. `api:admin`, `agent`, `system`.
    #[arg(long)]
    pub actor: Option<String>,
    /// Entries with this reason code, e.g. `revoked`, `scope_mismatch`.
    #[arg(long)]
    pub reason: Option<String>,
}

impl AuditFilterArgs {
    /// The API's query parameters for these filters, times resolved against `now_ms`.
    fn params(&self, now_ms: i64) -> anyhow::Result<Vec<(&'static str, String)>> {
        let mut q = Vec::new();
        if let Some(t) = &self.since {
            q.push(("since_ms", parse_time(t, now_ms)?.to_string()));
        }
        if let Some(t) = &self.until {
            q.push(("until_ms", parse_time(t, now_ms)?.to_string()));
        }
        let texts = [
            ("instance_uid", &self.agent),
            ("actor", &self.actor),
            ("reason", &self.reason),
        ];
        for (k, v) in texts {
            if let Some(v) = v {
                q.push((k, v.clone()));
            }
        }
        Ok(q)
    }
}

/// Parses `90`, `30s`, `15m`, `24h`, `7d` into seconds.
pub fn parse_ttl(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().with_context(|| format!("bad duration `{s}`"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("bad duration unit in `{s}` (use s, m, h or d)"),
    };
    Ok(n * mult)
}

/// A point in time as Unix ms: an RFC 3339 timestamp, or a duration (`parse_ttl` form) before
/// `now_ms`.
pub fn parse_time(s: &str, now_ms: i64) -> anyhow::Result<i64> {
    let s = s.trim();
    if s.contains('-') || s.contains(':') {
        return parse_rfc3339(s);
    }
    let secs = parse_ttl(s).with_context(|| {
        format!("`{s}` is neither an RFC 3339 time nor a duration such as 15m, 1h or 7d")
    })?;
    let ms = i64::try_from(secs.saturating_mul(1_000)).unwrap_or(i64::MAX);
    Ok(now_ms.saturating_sub(ms))
}

/// Parses `YYYY-MM-DD(T| )HH:MM:SS[.frac](Z|±HH:MM)` (RFC 3339) into Unix ms.
fn parse_rfc3339(s: &str) -> anyhow::Result<i64> {
    let bad = || anyhow::anyhow!("`{s}` is not an RFC 3339 time such as 2025-06-01T12:00:00Z");
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    let num = |from: usize, to: usize| -> anyhow::Result<i64> {
        let part = s.get(from..to).ok_or_else(bad)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse().map_err(|_| bad())
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let mut rest = &s[19..];
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        // Milliseconds: the first three digits, padded; finer ones are dropped.
        let first3: String = frac[..digits].chars().chain("00".chars()).take(3).collect();
        millis = first3.parse::<i64>().map_err(|_| bad())?;
        rest = &frac[digits..];
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
        _ => {
            let rb = rest.as_bytes();
            if rb.len() != 6 || !matches!(rb[0], b'+' | b'-') || rb[3] != b':' {
                return Err(bad());
            }
            let digits = |r: std::ops::Range<usize>| -> anyhow::Result<i64> {
                let part = rest.get(r).ok_or_else(bad)?;
                if !part.bytes().all(|c| c.is_ascii_digit()) {
                    return Err(bad());
                }
                part.parse().map_err(|_| bad())
            };
            let (h, m) = (digits(1..3)?, digits(4..6)?);
            if h > 23 || m > 59 {
                return Err(bad());
            }
            let sign = if rb[0] == b'-' { -1 } else { 1 };
            sign * (h * 3600 + m * 60)
        }
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => 0,
    };
    let valid_day = (1..=month_days).contains(&day);
    // Second 60 is a leap second; Unix time folds it into the next one.
    if !valid_day || hour > 23 || minute > 59 || second > 60 {
        return Err(bad());
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Ok(secs * 1_000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn labels(pairs: &[String]) -> anyhow::Result<serde_json::Map<String, Value>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .with_context(|| format!("label `{p}` is not key=value"))
        })
        .collect()
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    json: bool,
}

impl Client {
    fn new(api: &ApiArgs) -> anyhow::Result<Self> {
        let token = match &api.token {
            Some(t) => t.clone(),
            None => {
                let path = api.data_dir.join("admin-token");
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!(
                            "no --token given and cannot read {} (set AMPORA_API_TOKEN or --data-dir)",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_string()
            }
        };
        Ok(Self {
            http: reqwest::Client::new(),
            base: api.server.trim_end_matches('/').to_string(),
            token,
            json: api.json,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        self.call_with(method, path, &[], body).await
    }

    /// [`Client::call`] with query parameters (encoded here, so any value is safe to pass).
    async fn call_with(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let text = self.text(method, path, query, body).await?;
        if text.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_str(&text)?)
    }

    /// The body of a successful response as text; an error status becomes the error.
    async fn text(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> anyhow::Result<String> {
        let mut url = reqwest::Url::parse(&format!("{}{path}", self.base))
            .with_context(|| format!("bad server url {}", self.base))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut req = self.http.request(method, url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or(text);
            bail!("{status}: {msg}");
        }
        Ok(text)
    }

    fn print(&self, v: &Value, table: impl Fn(&Value)) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v)?);
        } else {
            table(v);
        }
        Ok(())
    }
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("-")
}

fn agent_name(a: &Value) -> String {
    let d = &a["description"];
    d["identifying"]["service.name"]
        .as_str()
        .or_else(|| d["non_identifying"]["service.name"].as_str())
        .unwrap_or("-")
        .to_string()
}

/// Runs an operator command.
pub async fn run_client(cmd: Command) -> anyhow::Result<()> {
    use reqwest::Method;
    match cmd {
        Command::Serve(_) | Command::Gateway(_) | Command::Coordinator(_) | Command::Openapi => {
            unreachable_serve()
        }
        Command::Agents(AgentsCmd::List {
            api,
            label,
            connected,
        }) => {
            let c = Client::new(&api)?;
            let mut q = Vec::new();
            if !label.is_empty() {
                q.push(format!("label={}", label.join(",")));
            }
            if connected {
                q.push("connected=true".into());
            }
            let path = if q.is_empty() {
                "/api/v1/agents".to_string()
            } else {
                format!("/api/v1/agents?{}", q.join("&"))
            };
            let v = c.call(Method::GET, &path, None).await?;
            c.print(&v, |v| {
                println!(
                    "{:<36}  {:<24}  {:<9}  {:<8}  {:<9}  GATEWAY",
                    "INSTANCE UID", "SERVICE", "CONNECTED", "CONFIG", "HEALTH"
                );
                for a in v.as_array().into_iter().flatten() {
                    let health = match a["health"]["healthy"].as_bool() {
                        Some(true) => "healthy",
                        Some(false) => "unhealthy",
                        None => "unknown",
                    };
                    println!(
                        "{:<36}  {:<24}  {:<9}  {:<8}  {:<9}  {}",
                        s(a, "instance_uid"),
                        agent_name(a),
                        a["connected"].as_bool().unwrap_or(false),
                        s(a, "config_state"),
                        health,
                        a["gateway"].as_str().unwrap_or("-")
                    );
                }
            })
        }
        Command::Agents(AgentsCmd::Show { api, uid }) => {
            let c = Client::new(&api)?;
            let v = c
                .call(Method::GET, &format!("/api/v1/agents/{uid}"), None)
                .await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Command::Tokens(TokensCmd::Create {
            api,
            name,
            ttl,
            label,
            agent,
        }) => {
            let c = Client::new(&api)?;
            let ttl_secs = ttl.as_deref().map(parse_ttl).transpose()?;
            let mut body = json!({ "name": name, "ttl_secs": ttl_secs });
            if !label.is_empty() {
                body["scope"] = json!({ "labels": Value::Object(labels(&label)?) });
            }
            if let Some(uid) = agent {
                body["instance_uid"] = json!(uid);
            }
            let v = c.call(Method::POST, "/api/v1/tokens", Some(body)).await?;
            c.print(&v, |v| println!("{}", s(v, "token")))
        }
        Command::Tokens(TokensCmd::List { api }) => {
            let c = Client::new(&api)?;
            let v = c.call(Method::GET, "/api/v1/tokens", None).await?;
            c.print(&v, |v| {
                println!(
                    "{:<32}  {:<16}  {:<18}  {:<8}  {:<36}  SCOPE",
                    "ID", "NAME", "PREFIX", "STATE", "BOUND TO"
                );
                let now = shared::now_ms();
                for t in v.as_array().into_iter().flatten() {
                    let state = if !t["revoked_ms"].is_null() {
                        "revoked"
                    } else if t["expires_ms"].as_i64().unwrap_or(0) <= now {
                        "expired"
                    } else if !t["bound_uid"].is_null() {
                        "redeemed"
                    } else {
                        "active"
                    };
                    let scope = t["scope"]["labels"]
                        .as_object()
                        .map(|l| {
                            l.iter()
                                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:<32}  {:<16}  {:<18}  {:<8}  {:<36}  {}",
                        s(t, "id"),
                        s(t, "name"),
                        s(t, "prefix"),
                        state,
                        s(t, "bound_uid"),
                        scope
                    );
                }
            })
        }
        Command::Tokens(TokensCmd::Revoke { api, id }) => {
            let c = Client::new(&api)?;
            c.call(Method::DELETE, &format!("/api/v1/tokens/{id}"), None)
                .await?;
            println!("revoked {id}");
            Ok(())
        }
        Command::ApiTokens(ApiTokensCmd::Create { api, name, role }) => {
            let c = Client::new(&api)?;
            let v = c
                .call(
                    Method::POST,
                    "/api/v1/api-tokens",
                    Some(json!({ "name": name, "role": role })),
                )
                .await?;
            c.print(&v, |v| println!("{}", s(v, "token")))
        }
        Command::ApiTokens(ApiTokensCmd::List { api }) => {
            let c = Client::new(&api)?;
            let v = c.call(Method::GET, "/api/v1/api-tokens", None).await?;
            c.print(&v, |v| {
                println!("{:<32}  {:<20}  {:<8}  STATE", "ID", "NAME", "ROLE");
                for t in v.as_array().into_iter().flatten() {
                    let state = if t["revoked_ms"].is_null() {
                        "active"
                    } else {
                        "revoked"
                    };
                    println!(
                        "{:<32}  {:<20}  {:<8}  {}",
                        s(t, "id"),
                        s(t, "name"),
                        s(t, "role"),
                        state
                    );
                }
            })
        }
        Command::ApiTokens(ApiTokensCmd::Revoke { api, id }) => {
            let c = Client::new(&api)?;
            c.call(Method::DELETE, &format!("/api/v1/api-tokens/{id}"), None)
                .await?;
            println!("revoked {id}");
            Ok(())
        }
        Command::Config(ConfigCmd::Create {
            api,
            name,
            file,
            content_type,
        }) => {
            let c = Client::new(&api)?;
            let v = create_version(&c, name, &file, &content_type).await?;
            c.print(&v, |v| {
                println!("config version {} ({})", v["id"], s(v, "hash"))
            })
        }
        Command::Config(ConfigCmd::List { api }) => {
            let c = Client::new(&api)?;
            let v = c.call(Method::GET, "/api/v1/configs", None).await?;
            c.print(&v, |v| {
                println!("{:<6}  {:<24}  {:<16}  AUTHOR", "ID", "NAME", "HASH");
                for cfg in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<6}  {:<24}  {:<16}  {}",
                        cfg["id"],
                        s(cfg, "name"),
                        s(cfg, "hash").chars().take(16).collect::<String>(),
                        s(cfg, "author")
                    );
                }
            })
        }
        Command::Config(ConfigCmd::Show { api, id }) => {
            let c = Client::new(&api)?;
            let v = c
                .call(Method::GET, &format!("/api/v1/configs/{id}"), None)
                .await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Command::Config(ConfigCmd::Push {
            api,
            file,
            version,
            name,
            content_type,
            target,
        }) => {
            let c = Client::new(&api)?;
            let config_id = match (file, version) {
                (Some(f), None) => create_version(&c, name, &f, &content_type).await?["id"]
                    .as_i64()
                    .context("server returned no config id")?,
                (None, Some(v)) => v,
                _ => bail!("give --file or --version"),
            };
            let mut body = json!({ "config_id": config_id });
            match (&target.agent, target.label.is_empty(), target.all) {
                (Some(uid), true, false) => body["agent"] = json!(uid),
                (None, false, false) => body["labels"] = Value::Object(labels(&target.label)?),
                (None, true, true) => body["all"] = json!(true),
                _ => bail!("give exactly one of --agent, --label or --all"),
            }
            let v = c
                .call(Method::POST, "/api/v1/assignments", Some(body))
                .await?;
            c.print(&v, |v| {
                println!(
                    "config version {config_id} assigned to {} agent(s)",
                    v["matched_agents"]
                )
            })
        }
        Command::Audit(AuditCmd::List { api, filter, limit }) => {
            let c = Client::new(&api)?;
            let mut query = filter.params(shared::now_ms())?;
            query.push(("limit", limit.to_string()));
            let v = c
                .call_with(Method::GET, "/api/v1/audit", &query, None)
                .await?;
            c.print(&v, |v| {
                for e in v.as_array().into_iter().flatten() {
                    println!(
                        "{}  {:<16}  {:<14}  {:<16}  {:<15}  {}",
                        e["at_ms"],
                        s(e, "action"),
                        s(e, "actor"),
                        s(e, "reason"),
                        s(e, "source_ip"),
                        s(e, "instance_uid")
                    );
                }
            })
        }
        Command::Audit(AuditCmd::Export { api, filter, limit }) => {
            let c = Client::new(&api)?;
            export_audit(&c, &filter, limit).await
        }
        Command::Identities(IdentitiesCmd::List { api, agent }) => {
            let c = Client::new(&api)?;
            let query: Vec<(&str, String)> =
                agent.into_iter().map(|a| ("instance_uid", a)).collect();
            let v = c
                .call_with(Method::GET, "/api/v1/identities", &query, None)
                .await?;
            c.print(&v, |v| {
                println!(
                    "{:<32}  {:<36}  {:<9}  EXPIRES (ms)",
                    "SERIAL", "INSTANCE UID", "STATE"
                );
                for i in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<32}  {:<36}  {:<9}  {}",
                        s(i, "serial"),
                        s(i, "instance_uid"),
                        s(i, "state"),
                        i["not_after_ms"]
                    );
                }
            })
        }
        Command::Identities(IdentitiesCmd::Show { api, serial }) => {
            let c = Client::new(&api)?;
            let v = c
                .call(Method::GET, &format!("/api/v1/identities/{serial}"), None)
                .await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Command::Identities(IdentitiesCmd::Revoke { api, serial }) => {
            let c = Client::new(&api)?;
            c.call(
                Method::DELETE,
                &format!("/api/v1/identities/{serial}"),
                None,
            )
            .await?;
            println!("revoked {serial}");
            Ok(())
        }
    }
}

/// Entries asked for per export request: the server's largest page.
const EXPORT_PAGE: u64 = 10_000;

/// Writes every matching audit entry to stdout as JSON lines, oldest first, one page per
/// request, each page continuing after the last line of the one before. Times are resolved
/// once, so every page has the same window.
async fn export_audit(
    c: &Client,
    filter: &AuditFilterArgs,
    limit: Option<u64>,
) -> anyhow::Result<()> {
    let base = filter.params(shared::now_ms())?;
    let mut after: Option<String> = None;
    let mut written = 0u64;
    let stdout = std::io::stdout();
    loop {
        let want = limit.map_or(EXPORT_PAGE, |l| (l - written).min(EXPORT_PAGE));
        if want == 0 {
            return Ok(());
        }
        let mut query = base.clone();
        query.push(("limit", want.to_string()));
        if let Some(a) = &after {
            query.push(("after", a.clone()));
        }
        let text = c
            .text(reqwest::Method::GET, "/api/v1/audit/export", &query, None)
            .await?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        let mut out = stdout.lock();
        for line in &lines {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
        written += lines.len() as u64;
        if (lines.len() as u64) < want {
            return Ok(());
        }
        let Some(last) = lines.last() else {
            return Ok(());
        };
        let last: Value = serde_json::from_str(last).context("export returned a bad line")?;
        let (Some(at_ms), Some(id)) = (last["at_ms"].as_i64(), last["id"].as_i64()) else {
            bail!("export line without at_ms and id");
        };
        after = Some(format!("{at_ms}.{id}"));
    }
}

fn unreachable_serve() -> anyhow::Result<()> {
    bail!("not an API command")
}

async fn create_version(
    c: &Client,
    name: Option<String>,
    file: &std::path::Path,
    content_type: &str,
) -> anyhow::Result<Value> {
    let body =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let name = name.unwrap_or_else(|| {
        file.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    c.call(
        reqwest::Method::POST,
        "/api/v1/configs",
        Some(json!({ "name": name, "body": body, "content_type": content_type })),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("90").expect("ok"), 90);
        assert_eq!(parse_ttl("15m").expect("ok"), 900);
        assert_eq!(parse_ttl("24h").expect("ok"), 86_400);
        assert_eq!(parse_ttl("7d").expect("ok"), 604_800);
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
    }

    #[test]
    fn times_are_rfc3339_or_durations_ago() {
        let now = 1_750_000_000_000;
        assert_eq!(parse_time("1h", now).expect("ok"), now - 3_600_000);
        assert_eq!(parse_time("90", now).expect("ok"), now - 90_000);
        assert_eq!(parse_time("7d", now).expect("ok"), now - 604_800_000);
        assert_eq!(parse_time("1970-01-01T00:00:00Z", now).expect("ok"), 0);
        assert_eq!(
            parse_time("2025-06-01T12:00:00Z", now).expect("ok"),
            1_748_779_200_000
        );
        assert_eq!(
            parse_time("2025-06-01T14:00:00+02:00", now).expect("ok"),
            1_748_779_200_000
        );
        assert_eq!(
            parse_time("2025-06-01 11:30:00.25-00:30", now).expect("ok"),
            1_748_779_200_250
        );
        assert_eq!(
            parse_time("2024-02-29T00:00:00.123456Z", now).expect("ok"),
            1_709_164_800_123
        );
        assert_eq!(parse_time("1969-12-31T23:59:59Z", now).expect("ok"), -1_000);
        for bad in [
            "2025-02-29T00:00:00Z",
            "2025-13-01T00:00:00Z",
            "2025-06-01T24:00:00Z",
            "2025-06-01T12:00:00",
            "2025-06-01T12:00:00+2:00",
            "2025-06-01",
            "yesterday",
            "1w",
            "2025-06-01T12:00:00.Z",
        ] {
            assert!(parse_time(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "ampora", "config", "push", "--file", "x.yaml", "--label", "env=prod",
        ])
        .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Config(ConfigCmd::Push { .. })
        ));
        let cli = Cli::try_parse_from([
            "ampora", "audit", "export", "--since", "1h", "--agent", "x", "--actor", "api:ci",
            "--reason", "revoked",
        ])
        .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Audit(AuditCmd::Export { .. })
        ));
        let cli = Cli::try_parse_from([
            "ampora",
            "api-tokens",
            "create",
            "--name",
            "ci",
            "--role",
            "viewer",
        ])
        .expect("parses");
        assert!(matches!(
            cli.command,
            Command::ApiTokens(ApiTokensCmd::Create { .. })
        ));
        assert!(Cli::try_parse_from([
            "ampora",
            "api-tokens",
            "create",
            "--name",
            "ci",
            "--role",
            "root",
        ])
        .is_err());
        let cli = Cli::try_parse_from([
            "ampora",
            "tokens",
            "create",
            "--label",
            "env=prod",
            "--label",
            "region=eu",
        ])
        .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Tokens(TokensCmd::Create { ref label, .. }) if label.len() == 2
        ));
        let cli =
            Cli::try_parse_from(["ampora", "identities", "list", "--agent", "x"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Identities(IdentitiesCmd::List { agent: Some(_), .. })
        ));
        let cli = Cli::try_parse_from(["ampora", "identities", "revoke", "4abc"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Identities(IdentitiesCmd::Revoke { .. })
        ));
    }
}
