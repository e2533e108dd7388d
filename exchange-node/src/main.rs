//! `exchange-node --config FILE`: reads the config, sets up logging, binds the listener and runs the node
//! until Ctrl-C or SIGTERM. Everything else is in the library (`exchange_node::server::run`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use exchange_node::config::Config;

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(&args.config)?;
    client_sdk::process::init_logging(config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    exchange_node::server::run(listener, config, client_sdk::process::shutdown_signal()).await?;
    Ok(())
}
