//! keel-node: the per-server service and the `keel` CLI.
//!
//! * [`service`] — `keel serve`: listeners, the cluster database, agent and duties.
//! * [`api`] — the HTTPS API and the admin socket (one set of handlers).
//! * [`duties`] — leader-only management duties (host health, voters).
//! * [`host`] — the host's own systemd units the service keeps running (libvirtd).
//! * [`cli`] / [`client`] — the command line and its admin-socket client.

pub mod api;
pub mod cli;
pub mod client;
pub mod compute;
pub mod config;
pub mod console_client;
pub mod duties;
pub mod host;
pub mod inventory;
pub mod join;
pub mod metrics;
pub mod network;
pub mod service;
pub mod views;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Cmd};
use crate::config::LogFormat;

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,openraft=warn,h2=warn,tower=warn,hyper=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Entry point of the `keel` binary.
pub fn main() -> ExitCode {
    let socket_given = std::env::args().any(|a| a == "--socket" || a.starts_with("--socket="))
        || std::env::var_os("KEEL_SOCKET").is_some();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keel: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async move {
        match cli.command {
            Cmd::Serve(args) => {
                let config = args.into_config(cli.socket, socket_given)?;
                init_tracing(config.log_format);
                service::serve(config).await?;
                Ok(())
            }
            command => cli::run_client(cli.socket, cli.output, command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            let mut line = String::new();
            for part in chain {
                if !line.contains(&part) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&part);
                }
            }
            // One line, on stderr only: scripts and tests read it, and a tracing record of
            // the same text would say it twice.
            eprintln!("keel: error: {line}");
            ExitCode::FAILURE
        }
    }
}
