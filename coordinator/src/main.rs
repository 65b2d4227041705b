//! The `ampora` binary: parses the command line, sets up logging, and hands over to the
//! library (`serve::run` for the server, `cli::run_client` for operator commands).

use anyhow::Context as _;
use clap::Parser;
use coordinator::cli::{Cli, Command, ServeArgs};
use coordinator::config;
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let (cfg, listener) = prepare(args)?;
            coordinator::serve::run(cfg, listener, shutdown_signal()).await
        }
        Command::Gateway(args) => {
            let (cfg, listener) = prepare(args)?;
            coordinator::cluster::run_gateway(cfg, listener, shutdown_signal()).await
        }
        Command::Coordinator(args) => {
            let (cfg, listener) = prepare(args)?;
            coordinator::cluster::run_coordinator(cfg, listener, shutdown_signal()).await
        }
        Command::Openapi => {
            println!("{}", coordinator::api::openapi_json());
            Ok(())
        }
        other => coordinator::cli::run_client(other).await,
    }
}

/// Loads the configuration (exiting with every problem listed if it is invalid), sets up
/// logging and binds the listener.
fn prepare(args: ServeArgs) -> anyhow::Result<(config::Config, tokio::net::TcpListener)> {
    let mut sets = args.sets;
    if let Some(d) = args.data_dir {
        sets.push(format!(
            "server.data_dir={}",
            toml_string(&d.to_string_lossy())
        ));
    }
    if let Some(l) = args.listen {
        sets.push(format!("server.listen={}", toml_string(&l)));
    }
    let cfg = match config::load(args.config.as_deref(), std::env::vars(), &sets) {
        Ok(c) => c,
        Err(errors) => {
            eprint!("{errors}");
            std::process::exit(2);
        }
    };
    init_tracing(&cfg.log);
    let listener = coordinator::serve::bind(&cfg.server.listen)
        .with_context(|| format!("binding {}", cfg.server.listen))?;
    Ok((cfg, listener))
}

/// Quotes a string as a TOML basic string for `--set` values.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn init_tracing(log: &config::LogSection) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
