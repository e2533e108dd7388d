//! `exchange-node --config FILE`: reads the config, sets up logging, binds the listener and runs the node
//! until Ctrl-C or SIGTERM. Everything else is in the library (`exchange_node::server::run`).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use exchange_node::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc malloc: tantivy and the gRPC stack allocate heavily from several threads, and
/// the benchmark measured search throughput doubling with it (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A department's gov-exchange node.
#[derive(Debug, Parser)]
#[command(name = "exchange-node", version)]
struct Args {
    /// Configuration file (TOML); see deploy/config/node.example.toml.
    #[arg(long, short, value_name = "FILE", env = "EXCHANGE_NODE_CONFIG")]
    config: PathBuf,
}

/// Logs go to stderr; `RUST_LOG` sets the level (default `info`).
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on Ctrl-C, or SIGTERM (what service managers and containers send).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C received"),
        _ = terminate => tracing::info!("SIGTERM received"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(&args.config)?;
    init_logging(config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    exchange_node::server::run(listener, config, shutdown_signal()).await?;
    Ok(())
}
