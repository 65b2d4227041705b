//! `ampora config`: immutable config versions and pushing one to agents (an assignment).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::client::{labels, s, show, Client};

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Create an immutable config version from a file.
    Create {
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value = "text/yaml")]
        content_type: String,
        /// Create it though its YAML does not parse or its pipelines name undefined
        /// components (audited as forced).
        #[arg(long)]
        force: bool,
    },
    List,
    Show {
        id: i64,
    },
    /// Check a version against the agents it would reach, without pushing it: its YAML,
    /// its pipelines, and per build the components it uses that the build lacks.
    Check {
        version: i64,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Push a config to agents: a new version from `--file`, or an existing `--version`.
    Push {
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
        /// Push though the config fails its pre-flight check (audited as forced).
        #[arg(long)]
        force: bool,
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

pub(super) async fn run(c: &Client, cmd: ConfigCmd) -> anyhow::Result<()> {
    match cmd {
        ConfigCmd::Create {
            name,
            file,
            content_type,
            force,
        } => {
            let v = create_version(c, name, &file, &content_type, force).await?;
            c.print(&v, |v| {
                println!("config version {} ({})", v["id"], s(v, "hash"))
            })
        }
        ConfigCmd::List => {
            let v = c.get("/api/v1/configs", &[]).await?;
            let header = [("ID", 6), ("NAME", 24), ("HASH", 16), ("AUTHOR", 0)];
            c.table(&v, header, |cfg| {
                [
                    cfg["id"].to_string(),
                    s(cfg, "name"),
                    s(cfg, "hash").chars().take(16).collect(),
                    s(cfg, "author"),
                ]
            })
        }
        ConfigCmd::Show { id } => show(&c.get(&format!("/api/v1/configs/{id}"), &[]).await?),
        ConfigCmd::Check { version, target } => {
            let mut body = json!({ "config_id": version });
            target_into(&target, &mut body)?;
            let v = c
                .post(&format!("/api/v1/configs/{version}/check"), body)
                .await?;
            c.print(&v, |v| {
                println!(
                    "{} passing, {} unchecked (components unknown)",
                    v["passing"], v["unchecked"]
                );
                for p in v["problems"].as_array().into_iter().flatten() {
                    println!("problem: {} {}", s(p, "file"), s(p, "message"));
                }
                for g in v["failing"].as_array().into_iter().flatten() {
                    println!(
                        "would fail on {} agent(s): their build lacks {}",
                        g["agents"], g["missing"]
                    );
                }
            })
        }
        ConfigCmd::Push {
            file,
            version,
            name,
            content_type,
            target,
            force,
        } => {
            let config_id = match (file, version) {
                (Some(f), None) => create_version(c, name, &f, &content_type, force).await?["id"]
                    .as_i64()
                    .context("server returned no config id")?,
                (None, Some(v)) => v,
                _ => bail!("give --file or --version"),
            };
            let mut body = json!({ "config_id": config_id, "force": force });
            target_into(&target, &mut body)?;
            let v = c.post("/api/v1/assignments", body).await?;
            c.print(&v, |v| {
                println!(
                    "config version {config_id} assigned to {} agent(s)",
                    v["matched_agents"]
                )
            })
        }
    }
}

/// Puts `--agent`, `--label` or `--all` into a request body.
fn target_into(target: &TargetArgs, body: &mut Value) -> anyhow::Result<()> {
    match (&target.agent, target.label.is_empty(), target.all) {
        (Some(uid), true, false) => body["agent"] = json!(uid),
        (None, false, false) => body["labels"] = Value::Object(labels(&target.label)?),
        (None, true, true) => body["all"] = json!(true),
        _ => bail!("give exactly one of --agent, --label or --all"),
    }
    Ok(())
}

/// Creates a config version from a file; its name defaults to the file's.
async fn create_version(
    c: &Client,
    name: Option<String>,
    file: &Path,
    content_type: &str,
    force: bool,
) -> anyhow::Result<Value> {
    let body =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let name = name.unwrap_or_else(|| {
        file.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let request =
        json!({ "name": name, "body": body, "content_type": content_type, "force": force });
    c.post("/api/v1/configs", request).await
}
