//! The `ampora` command line: `serve`, `gateway` and `coordinator` run a node; every other
//! command is an operator command that calls the REST API through [`client::Client`], one
//! module per resource (`agents`, `tokens` with API tokens, `configs`, `audit`,
//! `identities`), each owning its subcommands and how their results print.

mod agents;
mod audit;
mod client;
mod configs;
mod identities;
mod time;
mod tokens;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use agents::AgentsCmd;
pub use audit::{AuditCmd, AuditFilterArgs};
pub use client::ApiArgs;
pub use configs::{ConfigCmd, TargetArgs};
pub use identities::IdentitiesCmd;
pub use time::{parse_time, parse_ttl};
pub use tokens::{ApiTokensCmd, TokensCmd};

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
    Agents(Api<AgentsCmd>),
    /// Bootstrap tokens for agents.
    Tokens(Api<TokensCmd>),
    /// Operator API tokens and their roles (viewer, operator, admin).
    ApiTokens(Api<ApiTokensCmd>),
    /// Config versions and assignments.
    Config(Api<ConfigCmd>),
    /// The audit log.
    Audit(Api<AuditCmd>),
    /// Agent identities (mTLS client certificates issued after the bootstrap token).
    Identities(Api<IdentitiesCmd>),
    /// Print the OpenAPI document of the REST API.
    Openapi,
}

/// An operator command: how to reach the API (global options, so they may follow the
/// subcommand) and what to ask it.
#[derive(Debug, Args)]
pub struct Api<C: Subcommand> {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub cmd: C,
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

/// Runs an operator command.
pub async fn run_client(cmd: Command) -> anyhow::Result<()> {
    use client::Client;
    match cmd {
        Command::Serve(_) | Command::Gateway(_) | Command::Coordinator(_) | Command::Openapi => {
            anyhow::bail!("not an API command")
        }
        Command::Agents(Api { api, cmd }) => agents::run(&Client::new(&api)?, cmd).await,
        Command::Tokens(Api { api, cmd }) => tokens::run(&Client::new(&api)?, cmd).await,
        Command::ApiTokens(Api { api, cmd }) => tokens::run_api(&Client::new(&api)?, cmd).await,
        Command::Config(Api { api, cmd }) => configs::run(&Client::new(&api)?, cmd).await,
        Command::Audit(Api { api, cmd }) => audit::run(&Client::new(&api)?, cmd).await,
        Command::Identities(Api { api, cmd }) => identities::run(&Client::new(&api)?, cmd).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Command::Config(Api {
                cmd: ConfigCmd::Push { .. },
                ..
            })
        ));
        let cli = Cli::try_parse_from([
            "ampora", "audit", "export", "--since", "1h", "--agent", "x", "--actor", "api:ci",
            "--reason", "revoked",
        ])
        .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Audit(Api {
                cmd: AuditCmd::Export { .. },
                ..
            })
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
            Command::ApiTokens(Api {
                cmd: ApiTokensCmd::Create { .. },
                ..
            })
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
            Command::Tokens(Api { cmd: TokensCmd::Create { ref label, .. }, .. }) if label.len() == 2
        ));
        let cli =
            Cli::try_parse_from(["ampora", "identities", "list", "--agent", "x"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Identities(Api {
                cmd: IdentitiesCmd::List { agent: Some(_), .. },
                ..
            })
        ));
        let cli = Cli::try_parse_from(["ampora", "identities", "revoke", "4abc"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Identities(Api {
                cmd: IdentitiesCmd::Revoke { .. },
                ..
            })
        ));
    }
}
