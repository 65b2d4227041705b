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
        GroupCmd::Delete { name } => {
            c.delete(&format!("/api/v1/groups/{}", segment(&name)))
                .await?;
            println!("deleted group {name}");
            Ok(())
        }
    }
}
