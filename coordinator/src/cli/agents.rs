//! `ampora agents`: the fleet as the API lists it.

use clap::Subcommand;
use serde_json::Value;

use super::client::{s, show, Client};

#[derive(Debug, Subcommand)]
pub enum AgentsCmd {
    /// List agents.
    List {
        /// Only agents whose attributes match, e.g. `--label env=prod` (repeatable).
        #[arg(long)]
        label: Vec<String>,
        /// Only connected agents.
        #[arg(long)]
        connected: bool,
    },
    /// Show one agent.
    Show { uid: String },
}

pub(super) async fn run(c: &Client, cmd: AgentsCmd) -> anyhow::Result<()> {
    match cmd {
        AgentsCmd::List { label, connected } => {
            let mut query = Vec::new();
            if !label.is_empty() {
                query.push(("label", label.join(",")));
            }
            if connected {
                query.push(("connected", "true".to_string()));
            }
            let v = c.get("/api/v1/agents", &query).await?;
            let header = [
                ("INSTANCE UID", 36),
                ("SERVICE", 24),
                ("CONNECTED", 9),
                ("CONFIG", 8),
                ("HEALTH", 9),
                ("GATEWAY", 0),
            ];
            c.table(&v, header, |a| {
                let health = match a["health"]["healthy"].as_bool() {
                    Some(true) => "healthy",
                    Some(false) => "unhealthy",
                    None => "unknown",
                };
                [
                    s(a, "instance_uid"),
                    service_name(a),
                    a["connected"].as_bool().unwrap_or(false).to_string(),
                    s(a, "config_state"),
                    health.to_string(),
                    s(a, "gateway"),
                ]
            })
        }
        AgentsCmd::Show { uid } => show(&c.get(&format!("/api/v1/agents/{uid}"), &[]).await?),
    }
}

fn service_name(a: &Value) -> String {
    let d = &a["description"];
    d["identifying"]["service.name"]
        .as_str()
        .or_else(|| d["non_identifying"]["service.name"].as_str())
        .unwrap_or("-")
        .to_string()
}
