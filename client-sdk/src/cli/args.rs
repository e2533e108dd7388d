//! `exchangectl`'s command line (clap derive). Parsing only; [`super::run`] carries the commands out.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Operator CLI for gov-exchange: certificates, the catalog, nodes.
///
/// Certificates: pass --ca/--cert/--key, or --pki-dir with --identity NAME for DIR/ca.crt,
/// DIR/NAME.crt and DIR/NAME.key (the layout `exchangectl pki issue` writes).
#[derive(Debug, Parser)]
#[command(name = "exchangectl", version, propagate_version = true, max_term_width = 110)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalOpts {
    /// Folder holding ca.crt and NAME.crt/NAME.key (see --identity).
    #[arg(long, global = true, env = "EXCHANGE_PKI_DIR", value_name = "DIR")]
    pub pki_dir: Option<PathBuf>,
    /// Certificate name in --pki-dir to act as (e.g. tax-operator).
    #[arg(long, global = true, env = "EXCHANGE_IDENTITY", value_name = "NAME")]
    pub identity: Option<String>,
    /// CA certificate (PEM); overrides --pki-dir.
    #[arg(long, global = true, env = "EXCHANGE_CA", value_name = "PATH")]
    pub ca: Option<PathBuf>,
    /// Own certificate (PEM); overrides --pki-dir/--identity.
    #[arg(long, global = true, env = "EXCHANGE_CERT", value_name = "PATH")]
    pub cert: Option<PathBuf>,
    /// Own private key (PEM); overrides --pki-dir/--identity.
    #[arg(long, global = true, env = "EXCHANGE_KEY", value_name = "PATH")]
    pub key: Option<PathBuf>,
    /// Directory server address.
    #[arg(long, global = true, env = "EXCHANGE_DIRECTORY", value_name = "HOST:PORT", default_value = "127.0.0.1:7400")]
    pub directory: String,
    /// Machine-readable output: one JSON document per command (JSON lines for `catalog watch`).
    #[arg(long, global = true)]
    pub json: bool,
    /// Deadline of each call, in seconds (not applied to `catalog watch`).
    #[arg(long, global = true, default_value_t = 30, value_name = "SECONDS")]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Certificates: a CA, issuing, revoking, inspecting.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// The catalog: search, read, publish, withdraw, watch.
    #[command(subcommand)]
    Catalog(CatalogCommand),
    /// Registered nodes with status, address and last heartbeat.
    Nodes {
        /// Only this department's nodes.
        #[arg(long, value_name = "CODE")]
        dept: Option<String>,
    },
    /// A node's own view of itself (ExchangeNode.NodeStatus; operator of the node's department).
    NodeStatus {
        /// The node's address.
        #[arg(long, value_name = "HOST:PORT")]
        node: String,
    },
    /// Who the directory takes this certificate for.
    Whoami,
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a CA: DIR/ca.crt and DIR/ca.key.
    Init {
        #[arg(long, env = "EXCHANGE_PKI_DIR", value_name = "DIR")]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: i64,
        /// The CA's common name.
        #[arg(long, default_value = "gov-exchange CA")]
        cn: String,
    },
    /// Issue DIR/NAME.crt and DIR/NAME.key, signed by the CA in DIR.
    Issue {
        #[arg(long, env = "EXCHANGE_PKI_DIR", value_name = "DIR")]
        dir: PathBuf,
        /// Department code (tax, commerce, quality...).
        #[arg(long, value_name = "CODE")]
        dept: String,
        /// directory, node, app or operator.
        #[arg(long, value_parser = ["directory", "node", "app", "operator"])]
        role: String,
        /// Common name and file stem.
        #[arg(long)]
        name: String,
        /// DNS name or IP the holder serves on (repeatable; localhost and 127.0.0.1 are always added).
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
    /// Revoke a certificate at the directory (operator certificate).
    #[command(group(clap::ArgGroup::new("which").required(true).args(["serial", "cert_file"])))]
    Revoke {
        /// Serial number in hex (as `pki issue` and `pki show` print it; colons allowed).
        #[arg(long, value_name = "HEX")]
        serial: Option<String>,
        /// The certificate file itself (lets a department operator revoke its own department's certificates).
        #[arg(long, value_name = "PATH")]
        cert_file: Option<PathBuf>,
        /// Why (kept in the revocation list).
        #[arg(long, value_name = "TEXT", default_value = "")]
        reason: String,
    },
    /// Print a certificate's identity, serial and expiry.
    Show {
        /// Certificate file (PEM).
        path: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum CatalogCommand {
    /// Full-text search with filters and facets.
    Search(SearchArgs),
    /// One entry by resource code.
    Get {
        code: String,
        /// Show the withdrawal tombstone instead of "not found".
        #[arg(long)]
        include_withdrawn: bool,
    },
    /// Which node(s) provide a resource, and where to reach them (online first).
    Resolve { code: String },
    /// Publish the entries of a TOML catalog file.
    ///
    /// Directly to the directory (operator or node certificate of the entries' department), or with
    /// --node through that department's node (app or operator certificate).
    Publish {
        /// Catalog file: [[entries]] tables (see deploy/local/catalog/*.toml).
        #[arg(long, short, value_name = "FILE.toml")]
        file: PathBuf,
        /// Publish through this node's ExchangeNode.PublishCatalog instead of the directory.
        #[arg(long, value_name = "HOST:PORT")]
        node: Option<String>,
        /// Only read and check the file; send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Withdraw entries (they stay as tombstones so watchers see the withdrawal).
    Withdraw {
        #[arg(required = true, value_name = "CODE")]
        codes: Vec<String>,
        /// Withdraw through this node's ExchangeNode.WithdrawCatalog instead of the directory.
        #[arg(long, value_name = "HOST:PORT")]
        node: Option<String>,
    },
    /// Print catalog changes as they happen; reconnects and resumes after the last version seen.
    Watch {
        /// Start after this catalog version (0: replay every change from the beginning).
        #[arg(long, value_name = "VERSION", default_value_t = 0)]
        from: u64,
    },
}

#[derive(Debug, Clone, Args)]
pub struct SearchArgs {
    /// Chinese or English words matched against name, summary and data items; omit to list everything.
    pub query: Option<String>,
    /// Only this provider department.
    #[arg(long, value_name = "CODE")]
    pub provider: Option<String>,
    /// Only classifications starting with this prefix (1, 101, 101001...).
    #[arg(long = "class", value_name = "PREFIX")]
    pub class: Option<String>,
    /// unconditional, conditional or not_shared.
    #[arg(long, value_name = "TYPE")]
    pub share_type: Option<String>,
    /// enterprise, population or other.
    #[arg(long, value_name = "KIND")]
    pub record_kind: Option<String>,
    /// real_time, daily, weekly, monthly, quarterly, yearly or irregular.
    #[arg(long, value_name = "CYCLE")]
    pub update_cycle: Option<String>,
    /// Hits per page (the directory allows at most 200).
    #[arg(long, value_name = "N")]
    pub page_size: Option<u32>,
    /// Continue from a previous page (printed under the table).
    #[arg(long, value_name = "TOKEN", conflicts_with = "all")]
    pub page_token: Option<String>,
    /// Follow page tokens to the last page and print every hit.
    #[arg(long)]
    pub all: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("exchangectl").chain(args.iter().copied()))
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let cli = parse(&["catalog", "get", "101/000001", "--json", "--directory", "dir.example:7400"]).unwrap();
        assert!(cli.global.json);
        assert_eq!(cli.global.directory, "dir.example:7400");
        assert!(matches!(cli.command, Command::Catalog(CatalogCommand::Get { ref code, .. }) if code == "101/000001"));
    }

    #[test]
    fn search_flags() {
        let cli = parse(&[
            "catalog", "search", "企业 登记", "--provider", "commerce", "--class", "101", "--share-type",
            "conditional", "--record-kind", "enterprise", "--update-cycle", "daily", "--page-size", "50",
        ])
        .unwrap();
        let Command::Catalog(CatalogCommand::Search(s)) = cli.command else { panic!() };
        assert_eq!(s.query.as_deref(), Some("企业 登记"));
        assert_eq!(s.class.as_deref(), Some("101"));
        assert_eq!(s.page_size, Some(50));
        assert!(parse(&["catalog", "search", "--all", "--page-token", "x"]).is_err());
    }

    #[test]
    fn revoke_needs_exactly_one_of_serial_or_file() {
        assert!(parse(&["pki", "revoke"]).is_err());
        assert!(parse(&["pki", "revoke", "--serial", "0a", "--cert-file", "x.crt"]).is_err());
        let cli = parse(&["pki", "revoke", "--serial", "0A:FF", "--reason", "key lost"]).unwrap();
        assert!(matches!(cli.command, Command::Pki(PkiCommand::Revoke { serial: Some(_), .. })));
    }

    #[test]
    fn issue_takes_repeated_hosts_and_checks_role() {
        let cli = parse(&[
            "pki", "issue", "--dir", "pki", "--dept", "tax", "--role", "node", "--name", "tax-node", "--host",
            "tax.example", "--host", "10.0.0.5",
        ])
        .unwrap();
        let Command::Pki(PkiCommand::Issue { hosts, days, .. }) = cli.command else { panic!() };
        assert_eq!(hosts, ["tax.example", "10.0.0.5"]);
        assert_eq!(days, 365);
        assert!(parse(&["pki", "issue", "--dir", "p", "--dept", "tax", "--role", "root", "--name", "x"]).is_err());
    }

    #[test]
    fn withdraw_needs_codes_and_publish_needs_file() {
        assert!(parse(&["catalog", "withdraw"]).is_err());
        assert!(parse(&["catalog", "publish"]).is_err());
        let cli = parse(&["catalog", "withdraw", "101/000001", "101/000002", "--node", "n:7401"]).unwrap();
        let Command::Catalog(CatalogCommand::Withdraw { codes, node }) = cli.command else { panic!() };
        assert_eq!(codes.len(), 2);
        assert_eq!(node.as_deref(), Some("n:7401"));
    }
}
