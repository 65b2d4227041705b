//! `ampora identities`: agent identities (mTLS client certificates issued after the bootstrap
//! token): list, show with the certificate, revoke.

use clap::Subcommand;

use super::client::{s, show, Client};
use super::tokens::revoke;

#[derive(Debug, Subcommand)]
pub enum IdentitiesCmd {
    /// List identities, revoked ones included, oldest first.
    List {
        /// Only the identities of this agent (instance uid).
        #[arg(long)]
        agent: Option<String>,
    },
    /// Show one identity, with its certificate.
    Show { serial: String },
    /// Revoke an identity: gateways refuse its certificate and its agent is disconnected.
    /// Give the agent a new bootstrap token to re-bootstrap it.
    Revoke { serial: String },
}

pub(super) async fn run(c: &Client, cmd: IdentitiesCmd) -> anyhow::Result<()> {
    match cmd {
        IdentitiesCmd::List { agent } => {
            let query: Vec<(&str, String)> =
                agent.into_iter().map(|a| ("instance_uid", a)).collect();
            let v = c.get("/api/v1/identities", &query).await?;
            let header = [
                ("SERIAL", 32),
                ("INSTANCE UID", 36),
                ("STATE", 9),
                ("EXPIRES (ms)", 0),
            ];
            c.table(&v, header, |i| {
                [
                    s(i, "serial"),
                    s(i, "instance_uid"),
                    s(i, "state"),
                    i["not_after_ms"].to_string(),
                ]
            })
        }
        IdentitiesCmd::Show { serial } => {
            show(&c.get(&format!("/api/v1/identities/{serial}"), &[]).await?)
        }
        IdentitiesCmd::Revoke { serial } => {
            revoke(c, &format!("/api/v1/identities/{serial}"), &serial).await
        }
    }
}
