//! The `ampora` command line: `serve`, `gateway` and `coordinator` run a node; every other
//! command is an operator command that calls the REST API through [`client::Client`], one
//! module per resource (`agents`, `tokens` with API tokens, `configs`, `audit`,
//! `identities`, `groups`, `rollouts`, `packages`), each owning its subcommands and how their results
//! print.

mod agents;
mod audit;
mod client;
mod configs;
mod groups;
mod identities;
mod packages;
mod rollouts;
mod time;
mod tokens;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use agents::AgentsCmd;
pub use audit::{AuditCmd, AuditFilterArgs};
pub use client::ApiArgs;
pub use configs::{ConfigCmd, TargetArgs};
pub use groups::GroupCmd;
pub use identities::IdentitiesCmd;
pub use packages::PackagesCmd;
pub use rollouts::{RolloutCmd, RolloutTarget};
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
    /// Groups: named label selectors that rollouts target.
    Group(Api<GroupCmd>),
    /// Staged rollouts of a config version, stage by stage behind health gates.
    Rollout(Api<RolloutCmd>),
    /// Agent packages: signed builds, and upgrades to them.
    Packages(Api<PackagesCmd>),
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
        Command::Group(Api { api, cmd }) => groups::run(&Client::new(&api)?, cmd).await,
        Command::Rollout(Api { api, cmd }) => rollouts::run(&Client::new(&api)?, cmd).await,
        Command::Packages(Api { api, cmd }) => packages::run(&Client::new(&api)?, cmd).await,
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

    #[test]
    fn rollout_group_and_drift_commands_parse() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["ampora"], args].concat());
        let cli = parse(&[
            "rollout",
            "create",
            "--config",
            "3",
            "--group",
            "canary",
            "--stages",
            "1,5%,25%,100%",
            "--soak",
            "5m",
            "--deadline",
            "10m",
            "--budget",
            "5%",
            "--on-failure",
            "rollback",
        ])
        .expect("parses");
        let Command::Rollout(Api {
            cmd: RolloutCmd::Create(args),
            ..
        }) = cli.command
        else {
            panic!("not rollout create: {:?}", cli.command);
        };
        let rollouts::CreateArgs {
            config,
            target,
            stages,
            soak,
            budget,
            on_failure,
            ..
        } = *args;
        assert_eq!(config, Some(3));
        assert_eq!(target.group.as_deref(), Some("canary"));
        assert!(target.label.is_empty() && !target.all);
        assert_eq!(stages.as_deref(), Some("1,5%,25%,100%"));
        assert_eq!(soak.as_deref(), Some("5m"));
        assert_eq!(budget.as_deref(), Some("5%"));
        assert_eq!(on_failure.as_deref(), Some("rollback"));
        let cli = parse(&[
            "rollout", "create", "--config", "3", "--label", "ring=a", "--label", "env=prod",
        ])
        .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Rollout(Api { cmd: RolloutCmd::Create(ref a), .. })
                if a.target.label.len() == 2 && a.target.group.is_none()
        ));
        parse(&["rollout", "create", "--config", "3", "--all"]).expect("parses");
        // An upgrade: a package and its version instead of a config.
        let cli = parse(&[
            "rollout",
            "create",
            "--package",
            "",
            "--version",
            "0.2.0",
            "--all",
        ])
        .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Rollout(Api { cmd: RolloutCmd::Create(ref a), .. })
                if a.package.as_deref() == Some("") && a.version.as_deref() == Some("0.2.0")
                    && a.config.is_none()
        ));
        for bad in [
            // Neither a config nor a package; both; a package without its version.
            &["rollout", "create", "--all"][..],
            &[
                "rollout",
                "create",
                "--config",
                "3",
                "--package",
                "p",
                "--version",
                "1",
                "--all",
            ],
            &["rollout", "create", "--package", "p", "--all"],
            // No target, two targets.
            &["rollout", "create", "--config", "3"][..],
            &[
                "rollout", "create", "--config", "3", "--group", "g", "--all",
            ],
            &[
                "rollout", "create", "--config", "3", "--group", "g", "--label", "a=b",
            ],
            // Stages that do not grow, do not end at 100%, or are not sizes.
            &[
                "rollout",
                "create",
                "--config",
                "3",
                "--all",
                "--stages",
                "5%,1%,100%",
            ],
            &[
                "rollout", "create", "--config", "3", "--all", "--stages", "1,5%",
            ],
            &[
                "rollout", "create", "--config", "3", "--all", "--stages", "0,100%",
            ],
            &[
                "rollout", "create", "--config", "3", "--all", "--soak", "soon",
            ],
            &[
                "rollout", "create", "--config", "3", "--all", "--budget", "some",
            ],
            &[
                "rollout",
                "create",
                "--config",
                "3",
                "--all",
                "--on-failure",
                "retry",
            ],
            &["rollout", "create", "--config", "v3", "--all"],
            &["group", "put", "canary"],
            &["agents", "list", "--config-state", "sideways"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must not parse");
        }
        let cli = parse(&["rollout", "status", "7", "--watch"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Rollout(Api {
                cmd: RolloutCmd::Status { id: 7, watch: true },
                ..
            })
        ));
        for action in ["pause", "resume", "promote", "abort", "rollback", "history"] {
            parse(&["rollout", action, "7"]).expect(action);
        }
        let cli = parse(&[
            "group", "put", "canary", "--label", "ring=a", "--label", "env=b",
        ])
        .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Group(Api { cmd: GroupCmd::Put { ref name, ref label }, .. })
                if name == "canary" && label.len() == 2
        ));
        for ok in [
            &["group", "list"][..],
            &["group", "show", "g"],
            &["group", "delete", "g"],
        ] {
            parse(ok).expect("parses");
        }
        let cli = parse(&["agents", "list", "--config-state", "drifted"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Agents(Api { cmd: AgentsCmd::List { config_state: Some(ref s), .. }, .. })
                if s == "drifted"
        ));
        let cli = parse(&["agents", "adopt", "abc", "--name", "kept"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Agents(Api {
                cmd: AgentsCmd::Adopt { name: Some(_), .. },
                ..
            })
        ));
        parse(&["agents", "reapply", "abc"]).expect("parses");
    }
}
