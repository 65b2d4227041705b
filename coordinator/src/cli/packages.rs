//! `ampora packages`: importing signed agent builds, listing them, assigning a version to
//! agents, and one agent's upgrade state.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use clap::Subcommand;
use serde_json::{json, Value};

use super::client::{labels, s, segment, show, Client};
use super::configs::TargetArgs;

#[derive(Debug, Subcommand)]
pub enum PackagesCmd {
    /// Import a build: stored by its SHA-256, its signature checked against
    /// `packages.trusted_keys` / `packages.trusted_cosign_keys`. With `--url` instead of a
    /// file, the build the operator hosts there is fetched once and checked, not stored.
    Import {
        #[arg(required_unless_present = "url", conflicts_with = "url")]
        file: Option<PathBuf>,
        /// Where the operator hosts the build (http or https); agents download it there.
        #[arg(long)]
        url: Option<String>,
        /// Package name (empty for the Collector supervisor's top-level package).
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long)]
        version: String,
        /// `os/arch`, as agents report `os.type` / `host.arch`, e.g. linux/amd64.
        #[arg(long)]
        platform: String,
        /// top_level or addon.
        #[arg(long, default_value = "top_level")]
        kind: String,
        /// The signature file: minisign (`FILE.minisig`), or cosign (`cosign sign-blob`'s
        /// base64 signature, or its Sigstore bundle).
        #[arg(long)]
        signature: Option<PathBuf>,
    },
    /// List imported artifacts.
    List,
    /// Offer a package version to agents (per package name, the newest matching
    /// assignment wins).
    Assign {
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long)]
        version: String,
        #[command(flatten)]
        target: TargetArgs,
        /// Agents may be taken to an older version than they run.
        #[arg(long)]
        allow_downgrade: bool,
    },
    /// One agent's upgrade: what it should have, what it reports, its state.
    Status { agent: String },
}

pub(super) async fn run(c: &Client, cmd: PackagesCmd) -> anyhow::Result<()> {
    match cmd {
        PackagesCmd::Import {
            file,
            url,
            name,
            version,
            platform,
            kind,
            signature,
        } => {
            let mut headers = Vec::new();
            if let Some(sig) = signature {
                let text =
                    std::fs::read(&sig).with_context(|| format!("reading {}", sig.display()))?;
                let b64 = base64::engine::general_purpose::STANDARD.encode(text);
                headers.push(("x-ampora-signature", b64));
            }
            let mut query = vec![
                ("name", name),
                ("version", version),
                ("platform", platform),
                ("kind", kind),
            ];
            // Refused for what the server can tell without the build: say so before sending it.
            c.check("/api/v1/packages/check", &query, &headers).await?;
            let v = match (file, url) {
                (Some(file), _) => {
                    c.upload("/api/v1/packages", &query, &headers, &file)
                        .await?
                }
                (None, Some(url)) => {
                    query.push(("url", url));
                    c.post_query("/api/v1/packages", &query, &headers).await?
                }
                (None, None) => anyhow::bail!("a FILE or --url"),
            };
            c.print(&v, |v| {
                println!(
                    "imported {:?} {} for {}: sha256 {} ({} bytes), signed by {}",
                    s(v, "name"),
                    s(v, "version"),
                    s(v, "platform"),
                    s(v, "sha256"),
                    v["size"],
                    v["signer"].as_str().unwrap_or("nobody (unsigned)")
                )
            })
        }
        PackagesCmd::List => {
            let v = c.get("/api/v1/packages", &[]).await?;
            let header = [
                ("NAME", 16),
                ("VERSION", 12),
                ("PLATFORM", 14),
                ("SIZE", 12),
                ("SHA256", 16),
                ("SIGNED", 0),
            ];
            c.table(&v, header, |a| {
                [
                    s(a, "name"),
                    s(a, "version"),
                    s(a, "platform"),
                    a["size"].to_string(),
                    s(a, "sha256").chars().take(16).collect(),
                    if a["signer"].is_string() { "yes" } else { "no" }.into(),
                ]
            })
        }
        PackagesCmd::Assign {
            name,
            version,
            target,
            allow_downgrade,
        } => {
            let mut body =
                json!({ "name": name, "version": version, "allow_downgrade": allow_downgrade });
            match (&target.agent, target.label.is_empty(), target.all) {
                (Some(uid), true, false) => body["agent"] = json!(uid),
                (None, false, false) => body["labels"] = Value::Object(labels(&target.label)?),
                (None, true, true) => body["all"] = json!(true),
                _ => bail!("give exactly one of --agent, --label or --all"),
            }
            let v = c.post("/api/v1/packages/assignments", body).await?;
            c.print(&v, |v| {
                println!(
                    "package {:?} {} assigned (assignment {})",
                    s(v, "name"),
                    s(v, "version"),
                    v["id"]
                )
            })
        }
        PackagesCmd::Status { agent } => show(
            &c.get(&format!("/api/v1/agents/{}/upgrade", segment(&agent)), &[])
                .await?,
        ),
    }
}
