//! The `ampora` command line: `serve` plus operator commands that call the REST API.

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
    /// Config versions and assignments.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
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
    List {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        reason: Option<String>,
    },
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
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
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
        if text.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_str(&text)?)
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
        Command::Tokens(TokensCmd::Create { api, name, ttl }) => {
            let c = Client::new(&api)?;
            let ttl_secs = ttl.as_deref().map(parse_ttl).transpose()?;
            let v = c
                .call(
                    Method::POST,
                    "/api/v1/tokens",
                    Some(json!({ "name": name, "ttl_secs": ttl_secs })),
                )
                .await?;
            c.print(&v, |v| println!("{}", s(v, "token")))
        }
        Command::Tokens(TokensCmd::List { api }) => {
            let c = Client::new(&api)?;
            let v = c.call(Method::GET, "/api/v1/tokens", None).await?;
            c.print(&v, |v| {
                println!(
                    "{:<12}  {:<16}  {:<18}  {:<8}  BOUND TO",
                    "ID", "NAME", "PREFIX", "STATE"
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
                    println!(
                        "{:<12}  {:<16}  {:<18}  {:<8}  {}",
                        s(t, "id"),
                        s(t, "name"),
                        s(t, "prefix"),
                        state,
                        s(t, "bound_uid")
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
        Command::Audit(AuditCmd::List { api, limit, reason }) => {
            let c = Client::new(&api)?;
            let mut path = format!("/api/v1/audit?limit={limit}");
            if let Some(r) = reason {
                path.push_str(&format!("&reason={r}"));
            }
            let v = c.call(Method::GET, &path, None).await?;
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
    }
}
