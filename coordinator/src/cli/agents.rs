//! `ampora agents`: the fleet as the API lists it, what to do about an agent whose config
//! drifted (send it its assigned config again, or adopt what it runs as a new version),
//! restarts (one agent, or many in batches), and custom messages.

use clap::Subcommand;
use serde_json::{json, Value};

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
        /// Only agents in this config state. `drifted`: the agent applied its assigned config,
        /// then began running something else; fix it with `agents reapply` or keep what it
        /// runs with `agents adopt`.
        #[arg(long, value_parser = ["none", "pending", "applied", "failed", "drifted"])]
        config_state: Option<String>,
    },
    /// Show one agent.
    Show { uid: String },
    /// Send a (drifted) agent its assigned config again.
    Reapply { uid: String },
    /// Make what a drifted agent runs a new config version, assigned to that agent.
    Adopt {
        uid: String,
        /// The new version's name (default "adopted from <uid>").
        #[arg(long)]
        name: Option<String>,
    },
    /// Send an agent the Restart command (it must declare AcceptsRestartCommand).
    Restart { uid: String },
    /// Restart the agents of a group, a label selector or the fleet, in batches: each agent
    /// must be back, connected and healthy, within the deadline; the restart stops when more
    /// than the budget do not come back.
    RestartMany {
        #[command(flatten)]
        target: super::rollouts::RolloutTarget,
        /// Agents restarting at once.
        #[arg(long, default_value_t = 10)]
        batch: u32,
        /// Each batch's time to come back, e.g. `2m`.
        #[arg(long, default_value = "2m")]
        deadline: String,
        /// Agents that may fail to come back before the restart stops.
        #[arg(long, default_value_t = 0)]
        budget: u64,
    },
    /// Send an agent a custom message for a capability it declared.
    Message {
        uid: String,
        #[arg(long)]
        capability: String,
        #[arg(long = "type")]
        kind: String,
        /// The payload, as text.
        #[arg(long, default_value = "")]
        data: String,
    },
    /// The custom capabilities an agent declared and the messages it sent back.
    Messages { uid: String },
    /// Where an agent sends its own telemetry, and its throughput (when it sends its own
    /// metrics to Ampora): rates now and a line per minute.
    Telemetry { uid: String },
    /// Show a group restart.
    Restarts {
        /// One restart by id; all of them without.
        id: Option<u64>,
    },
}

/// Columns of an agent table: `agents list`, and a group's members.
pub(super) const AGENT_HEADER: [(&str, usize); 6] = [
    ("INSTANCE UID", 36),
    ("SERVICE", 24),
    ("CONNECTED", 9),
    ("CONFIG", 8),
    ("HEALTH", 9),
    ("GATEWAY", 0),
];

pub(super) fn agent_row(a: &Value) -> [String; 6] {
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
}

pub(super) async fn run(c: &Client, cmd: AgentsCmd) -> anyhow::Result<()> {
    match cmd {
        AgentsCmd::List {
            label,
            connected,
            config_state,
        } => {
            let mut query = Vec::new();
            if !label.is_empty() {
                query.push(("label", label.join(",")));
            }
            if connected {
                query.push(("connected", "true".to_string()));
            }
            if let Some(state) = config_state {
                query.push(("config_state", state));
            }
            let v = c.get("/api/v1/agents", &query).await?;
            c.table(&v, AGENT_HEADER, agent_row)
        }
        AgentsCmd::Show { uid } => show(&c.get(&format!("/api/v1/agents/{uid}"), &[]).await?),
        AgentsCmd::Reapply { uid } => {
            c.post_empty(&format!("/api/v1/agents/{uid}/reapply"))
                .await?;
            println!("sent {uid} its assigned config again");
            Ok(())
        }
        AgentsCmd::Restart { uid } => {
            c.post_empty(&format!("/api/v1/agents/{uid}/restart"))
                .await?;
            println!("sent {uid} the restart command");
            Ok(())
        }
        AgentsCmd::RestartMany {
            target,
            batch,
            deadline,
            budget,
        } => {
            let mut body = json!({ "batch": batch, "deadline": deadline, "budget": budget });
            if let Some(g) = target.group {
                body["group"] = json!(g);
            } else if target.all {
                body["all"] = json!(true);
            } else {
                body["labels"] = Value::Object(super::client::labels(&target.label)?);
            }
            let v = c.post("/api/v1/restarts", body).await?;
            c.print(&v, |v| {
                println!(
                    "restart {} started: {} agent(s) in batches of {batch}; {} cannot restart",
                    v["id"],
                    v["members"].as_array().map_or(0, Vec::len),
                    v["unable"].as_array().map_or(0, Vec::len)
                )
            })
        }
        AgentsCmd::Message {
            uid,
            capability,
            kind,
            data,
        } => {
            let body = json!({ "capability": capability, "type": kind, "data": data });
            c.post(&format!("/api/v1/agents/{uid}/custom-messages"), body)
                .await?;
            println!("sent {uid} a {capability} message");
            Ok(())
        }
        AgentsCmd::Messages { uid } => {
            let v = c
                .get(&format!("/api/v1/agents/{uid}/custom-messages"), &[])
                .await?;
            c.print(&v, |v| {
                println!("declared: {}", v["capabilities"]);
                for m in v["messages"].as_array().into_iter().flatten() {
                    println!(
                        "{} {} {} {}",
                        m["at_ms"],
                        s(m, "capability"),
                        s(m, "type"),
                        m["text"].as_str().unwrap_or("(binary)")
                    );
                }
            })
        }
        AgentsCmd::Telemetry { uid } => {
            let v = c
                .get(&format!("/api/v1/agents/{uid}/telemetry"), &[])
                .await?;
            c.print(&v, |v| {
                println!("group: {}", v["group"].as_str().unwrap_or("(none)"));
                for o in v["offered"].as_array().into_iter().flatten() {
                    println!(
                        "{} -> {} (declared: {})",
                        s(o, "signal"),
                        s(o, "endpoint"),
                        o["declared"]
                    );
                }
                println!("settings confirmed: {}", v["settings_confirmed"]);
                match v["rates"].as_object() {
                    Some(r) => println!(
                        "in {}/s  out {}/s  dropped {}/s",
                        r["in_per_s"], r["out_per_s"], r["dropped_per_s"]
                    ),
                    None => println!("no recent own metrics"),
                }
                for p in v["points"].as_array().into_iter().flatten() {
                    println!(
                        "{}  accepted {}  sent {}  dropped {}  queue {}",
                        p["at_ms"], p["accepted"], p["sent"], p["dropped"], p["queue_size"]
                    );
                }
            })
        }
        AgentsCmd::Restarts { id } => match id {
            Some(id) => show(&c.get(&format!("/api/v1/restarts/{id}"), &[]).await?),
            None => show(&c.get("/api/v1/restarts", &[]).await?),
        },
        AgentsCmd::Adopt { uid, name } => {
            let v = c
                .post(
                    &format!("/api/v1/agents/{uid}/adopt"),
                    json!({ "name": name }),
                )
                .await?;
            c.print(&v, |v| {
                println!(
                    "config version {} ({}) adopted from {uid} and assigned to it",
                    v["id"],
                    s(v, "hash")
                )
            })
        }
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
