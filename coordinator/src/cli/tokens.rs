//! `ampora tokens` (bootstrap tokens for agents) and `ampora api-tokens` (operator API tokens
//! and their roles): create (shown once), list, revoke.

use clap::Subcommand;
use serde_json::{json, Value};

use super::client::{label_text, labels, s, Client};
use super::time::parse_ttl;

#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// Create a bootstrap token and print it (it is shown only once).
    Create {
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
    List,
    Revoke {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiTokensCmd {
    /// Create an API token and print it (it is shown only once).
    Create {
        /// Unique, never reused; audit entries name the token's actions `api:<name>`.
        #[arg(long)]
        name: String,
        /// viewer (read only), operator (also configs and assignments) or admin (also tokens
        /// and API tokens).
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
    },
    /// List API tokens (never their text), revoked ones included.
    List,
    /// Revoke an API token: it gets 401 from then on.
    Revoke { id: String },
}

pub(super) async fn run(c: &Client, cmd: TokensCmd) -> anyhow::Result<()> {
    match cmd {
        TokensCmd::Create {
            name,
            ttl,
            label,
            agent,
        } => {
            let ttl_secs = ttl.as_deref().map(parse_ttl).transpose()?;
            let mut body = json!({ "name": name, "ttl_secs": ttl_secs });
            if !label.is_empty() {
                body["scope"] = json!({ "labels": Value::Object(labels(&label)?) });
            }
            if let Some(uid) = agent {
                body["instance_uid"] = json!(uid);
            }
            let v = c.post("/api/v1/tokens", body).await?;
            c.print(&v, |v| println!("{}", s(v, "token")))
        }
        TokensCmd::List => {
            let v = c.get("/api/v1/tokens", &[]).await?;
            let now = shared::now_ms();
            let header = [
                ("ID", 32),
                ("NAME", 16),
                ("PREFIX", 18),
                ("STATE", 8),
                ("BOUND TO", 36),
                ("SCOPE", 0),
            ];
            c.table(&v, header, |t| {
                let state = if !t["revoked_ms"].is_null() {
                    "revoked"
                } else if t["expires_ms"].as_i64().unwrap_or(0) <= now {
                    "expired"
                } else if !t["bound_uid"].is_null() {
                    "redeemed"
                } else {
                    "active"
                };
                let scope = label_text(&t["scope"]["labels"]);
                [
                    s(t, "id"),
                    s(t, "name"),
                    s(t, "prefix"),
                    state.to_string(),
                    s(t, "bound_uid"),
                    scope,
                ]
            })
        }
        TokensCmd::Revoke { id } => revoke(c, &format!("/api/v1/tokens/{id}"), &id).await,
    }
}

pub(super) async fn run_api(c: &Client, cmd: ApiTokensCmd) -> anyhow::Result<()> {
    match cmd {
        ApiTokensCmd::Create { name, role } => {
            let body = json!({ "name": name, "role": role });
            let v = c.post("/api/v1/api-tokens", body).await?;
            c.print(&v, |v| println!("{}", s(v, "token")))
        }
        ApiTokensCmd::List => {
            let v = c.get("/api/v1/api-tokens", &[]).await?;
            let header = [("ID", 32), ("NAME", 20), ("ROLE", 8), ("STATE", 0)];
            c.table(&v, header, |t| {
                let state = if t["revoked_ms"].is_null() {
                    "active"
                } else {
                    "revoked"
                };
                [s(t, "id"), s(t, "name"), s(t, "role"), state.to_string()]
            })
        }
        ApiTokensCmd::Revoke { id } => revoke(c, &format!("/api/v1/api-tokens/{id}"), &id).await,
    }
}

/// `DELETE path`, then says what was revoked.
pub(super) async fn revoke(c: &Client, path: &str, what: &str) -> anyhow::Result<()> {
    c.delete(path).await?;
    println!("revoked {what}");
    Ok(())
}
