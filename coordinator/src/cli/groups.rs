//! `ampora group`: named label selectors that rollouts target: put (create or replace), list
//! with live member counts, show with the members, delete.

use clap::Subcommand;
use serde_json::{json, Value};

use super::agents::{agent_row, AGENT_HEADER};
use super::client::{label_text, labels, print_table, s, segment, Client};

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Create or replace a group: its members are the agents matching every label.
    Put {
        name: String,
        /// `key=value` an agent's attributes must have (repeatable, at least one; target
        /// every agent with `rollout create --all` instead).
        #[arg(long, required = true)]
        label: Vec<String>,
    },
    /// List groups with how many agents each matches now.
    List,
    /// Show a group and its members (the first 1,000).
    Show { name: String },
    /// Delete a group (rollouts created for it keep their selector).
    Delete { name: String },
    /// Set where the group's agents send their own telemetry (or show it, with no option).
    Telemetry {
        name: String,
        /// Own metrics go to Ampora itself (each agent gets its own credential).
        #[arg(long, conflicts_with = "metrics")]
        metrics_to_ampora: bool,
        /// OTLP/HTTP URL for own metrics (`https://…/v1/metrics`).
        #[arg(long)]
        metrics: Option<String>,
        /// OTLP/HTTP URL for own traces.
        #[arg(long)]
        traces: Option<String>,
        /// OTLP/HTTP URL for own logs.
        #[arg(long)]
        logs: Option<String>,
        /// `Name=value` header sent with every export to the URLs given (repeatable).
        #[arg(long)]
        header: Vec<String>,
        /// Remove the group's settings.
        #[arg(long)]
        clear: bool,
    },
}

const GROUP_HEADER: [(&str, usize); 4] =
    [("NAME", 20), ("MEMBERS", 7), ("AUTHOR", 16), ("LABELS", 0)];

fn group_row(g: &Value) -> [String; 4] {
    [
        s(g, "name"),
        g["members"].to_string(),
        s(g, "author"),
        label_text(&g["labels"]),
    ]
}

pub(super) async fn run(c: &Client, cmd: GroupCmd) -> anyhow::Result<()> {
    match cmd {
        GroupCmd::Put { name, label } => {
            let body = json!({ "labels": Value::Object(labels(&label)?) });
            let v = c
                .put(&format!("/api/v1/groups/{}", segment(&name)), body)
                .await?;
            c.print(&v, |v| {
                println!(
                    "group {} ({}): {} agent(s) match now",
                    s(v, "name"),
                    label_text(&v["labels"]),
                    v["members"]
                )
            })
        }
        GroupCmd::List => {
            let v = c.get("/api/v1/groups", &[]).await?;
            c.table(&v, GROUP_HEADER, group_row)
        }
        GroupCmd::Show { name } => {
            let v = c
                .get(&format!("/api/v1/groups/{}", segment(&name)), &[])
                .await?;
            c.print(&v, |v| {
                print_table(&json!([v]), GROUP_HEADER, group_row);
                println!();
                print_table(&v["agents"], AGENT_HEADER, agent_row);
            })
        }
        GroupCmd::Telemetry {
            name,
            metrics_to_ampora,
            metrics,
            traces,
            logs,
            header,
            clear,
        } => {
            let path = format!("/api/v1/groups/{}/telemetry", segment(&name));
            let given =
                metrics_to_ampora || metrics.is_some() || traces.is_some() || logs.is_some();
            if !given && !clear {
                let v = c.get(&path, &[]).await?;
                return c.print(&v, |v| {
                    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
                });
            }
            let headers = Value::Object(labels(&header)?);
            let to = |url: Option<String>| {
                url.map(|u| json!({ "endpoint": u, "headers": headers.clone() }))
            };
            let mut body = serde_json::Map::new();
            if !clear {
                let metrics = if metrics_to_ampora {
                    Some(json!({ "ampora": true }))
                } else {
                    to(metrics)
                };
                for (k, v) in [
                    ("metrics", metrics),
                    ("traces", to(traces)),
                    ("logs", to(logs)),
                ] {
                    if let Some(v) = v {
                        body.insert(k.into(), v);
                    }
                }
            }
            let v = c.put(&path, Value::Object(body)).await?;
            c.print(&v, |_| {
                if clear {
                    println!("group {name}: own-telemetry settings removed");
                } else {
                    println!("group {name}: own-telemetry settings offered to its agents");
                }
            })
        }
        GroupCmd::Delete { name } => {
            c.delete(&format!("/api/v1/groups/{}", segment(&name)))
                .await?;
            println!("deleted group {name}");
            Ok(())
        }
    }
}
