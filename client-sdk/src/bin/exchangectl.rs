//! exchangectl: the gov-exchange operator CLI. Everything but parsing and the exit status lives in
//! `client_sdk::cli`, where it is tested.

use std::process::ExitCode;

use clap::Parser;
use client_sdk::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.global.json;
    let directory = cli.global.directory.clone();
    let node = cli.global.node_addr().to_string();
    let admin = cli.global.admin_addr().to_string();
    // One command at a time: a current-thread runtime is enough and starts faster.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = cli::report_error(&e, json);
            if code == cli::EXIT_UNREACHABLE && matches!(e, cli::CliError::Admin(_)) {
                eprintln!(
                    "hint: is the server running with an [admin] table? Its admin port is taken to be at {admin} \
                     (--admin or EXCHANGE_ADMIN)."
                );
            } else if code == cli::EXIT_UNREACHABLE {
                eprintln!(
                    "hint: is the server running? The directory is taken to be at {directory} \
                     (--directory or EXCHANGE_DIRECTORY), the node at {node} (--node or EXCHANGE_NODE)."
                );
            }
            ExitCode::from(code)
        }
    }
}
