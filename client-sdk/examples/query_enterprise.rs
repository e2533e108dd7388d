//! Looks up one enterprise record through your department's exchange node and prints it.
//!
//! ```sh
//! cargo run -p client-sdk --example query_enterprise -- \
//!     --node 127.0.0.1:7401 --ca pki/ca.crt --cert pki/tax-app.crt --key pki/tax-app.key \
//!     101001/000001 91350100M000100Y43
//! ```
//!
//! The certificate must be an `app` certificate of your department; the node finds the provider, relays
//! the query over mutual TLS and returns only the items your department is granted.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use client_sdk::error::ClientError;
use client_sdk::records::{EnterpriseRecord, ExchangeClient};
use client_sdk::tls::{TlsIdentity, TlsPaths};

#[derive(Parser)]
struct Args {
    /// Your department's node.
    #[arg(long, env = "EXCHANGE_NODE", default_value = "127.0.0.1:7401")]
    node: String,
    /// CA certificate (PEM).
    #[arg(long, env = "EXCHANGE_CA")]
    ca: PathBuf,
    /// Your application's certificate (PEM).
    #[arg(long, env = "EXCHANGE_CERT")]
    cert: PathBuf,
    /// Your application's private key (PEM).
    #[arg(long, env = "EXCHANGE_KEY")]
    key: PathBuf,
    /// Why you ask; both departments' audit trails record it.
    #[arg(long, default_value = "企业登记信息核验")]
    purpose: String,
    /// Resource code of the enterprise registration records, e.g. 101001/000001.
    resource: String,
    /// 统一社会信用代码 (18 characters, upper case).
    credit_code: String,
}

async fn query(args: &Args) -> Result<EnterpriseRecord, ClientError> {
    let paths = TlsPaths { ca: args.ca.clone(), cert: args.cert.clone(), key: args.key.clone() };
    let identity = TlsIdentity::load(&paths)?;
    let client = ExchangeClient::connect(&args.node, None, &identity)?;
    client.query_enterprise(&args.resource, &args.credit_code, &args.purpose).await
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match query(&args).await {
        Ok(record) => {
            print!("{record}");
            ExitCode::SUCCESS
        }
        Err(ClientError::PermissionDenied(reason)) => {
            eprintln!("access refused: {reason}");
            eprintln!(
                "(ask the provider for a grant: exchangectl grants request --resource {} --items ...)",
                args.resource
            );
            ExitCode::FAILURE
        }
        Err(ClientError::NotFound(what)) => {
            eprintln!("not found: {what}");
            ExitCode::FAILURE
        }
        Err(ClientError::ResourceExhausted { message, retry_after }) => {
            let wait = retry_after.map_or("later".to_string(), |d| format!("in {:.1}s", d.as_secs_f64()));
            eprintln!("rate limited by the provider ({message}); try again {wait}");
            ExitCode::FAILURE
        }
        Err(other) => {
            eprintln!("query failed: {other}");
            ExitCode::FAILURE
        }
    }
}
