//! `directory --config FILE`: reads the config, sets up logging, binds, and serves until Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use directory::config::Config;

/// mimalloc instead of glibc malloc: tantivy and the gRPC stack allocate heavily from several threads, and
/// the benchmark measured search throughput doubling with it (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The gov-exchange central directory.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (see the `directory::config` docs for the keys).
    #[arg(long, env = "DIRECTORY_CONFIG")]
    config: PathBuf,
}

/// How long a shutdown may wait for open calls and streams before the process exits anyway. Acknowledged
/// writes are already on disk, so cutting a straggler loses nothing.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::from_file(&args.config)?;
    let _telemetry = client_sdk::telemetry::init_telemetry(config.log_format, &config.telemetry, "directory")?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        client_sdk::process::shutdown_signal().await;
        let _ = stopping_tx.send(());
    };
    let server = directory::run(listener, config, shutdown);
    tokio::pin!(server);
    let drain_limit = async {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(DRAIN_LIMIT).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = &mut server => result.context("directory failed")?,
        _ = drain_limit => tracing::warn!("calls still open {}s after shutdown began; exiting anyway", DRAIN_LIMIT.as_secs()),
    }
    Ok(())
}
