//! `exchange-node --config FILE`: reads the config, sets up logging, binds the listener and runs the node
//! until Ctrl-C or SIGTERM. Everything else is in the library (`exchange_node::server::run`).
//!
//! `exchange-node audit verify --data-dir DIR [--public-key HEX|FILE]`: checks a stopped node's audit
//! trail offline (`exchange_node::audit::run_verify_command`); exit status 0 intact, 1 tampered, 2 error.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use exchange_node::config::Config;

/// mimalloc instead of glibc malloc: tantivy and the gRPC stack allocate heavily from several threads, and
/// the benchmark measured search throughput doubling with it (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A department's gov-exchange node.
#[derive(Debug, Parser)]
#[command(name = "exchange-node", version, subcommand_negates_reqs = true)]
struct Args {
    /// Configuration file (TOML); see deploy/config/node.example.toml.
    #[arg(long, short, value_name = "FILE", env = "EXCHANGE_NODE_CONFIG", required = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Offline tools for the node's audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify the audit trail of a stopped node: hash chain, sequence and seals.
    /// Exit status: 0 intact, 1 tampered with, 2 the check could not be made.
    Verify {
        /// The node's data_dir (the folder holding node.sled and audit-seal.pub). The node must be stopped.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The node's audit public key, hex or a file holding it: best the one registered with the
        /// directory. Default: DIR/audit-seal.pub, which proves less (it sits on the same disk as the log).
        #[arg(long, value_name = "HEX|FILE")]
        public_key: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Audit(AuditCommand::Verify { data_dir, public_key })) = args.command {
        let code = exchange_node::audit::run_verify_command(
            &data_dir,
            public_key.as_deref(),
            &mut std::io::stdout(),
            &mut std::io::stderr(),
        );
        std::process::exit(code);
    }
    let config = Config::load(&args.config.context("--config is required")?)?;
    let service_name = default_service_name(&config);
    let _telemetry = client_sdk::telemetry::init_telemetry(config.log_format, &config.telemetry, &service_name)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    exchange_node::server::run(listener, config, client_sdk::process::shutdown_signal()).await?;
    Ok(())
}

/// `exchange-node-<department>`, the department read from the node certificate; a certificate that cannot
/// be read here is reported by the server right after, with its own error.
fn default_service_name(config: &Config) -> String {
    match client_sdk::tls::TlsIdentity::load(&config.tls) {
        Ok(identity) => format!("exchange-node-{}", identity.current().department),
        Err(_) => "exchange-node".to_string(),
    }
}
