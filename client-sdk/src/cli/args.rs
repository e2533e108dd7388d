//! `exchangectl`'s command line (clap derive). Parsing only; [`super::run`] carries the commands out.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Operator CLI for gov-exchange: certificates, the catalog, nodes, records, events, grants, audit.
///
/// Certificates: pass --ca/--cert/--key, or --pki-dir with --identity NAME for DIR/ca.crt,
/// DIR/NAME.crt and DIR/NAME.key (the layout `exchangectl pki issue` writes).
///
/// Servers: the directory is --directory; your department's node is --node (records, audit,
/// node-status, and catalog publish/withdraw when given).
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
    /// Directory server address; for a directory run as several replicas, all of them separated by
    /// commas (dir-a:7443,dir-b:7443): calls go to one and move to the next when it fails.
    #[arg(long, global = true, env = "EXCHANGE_DIRECTORY", value_name = "HOST:PORT[,HOST:PORT...]", default_value = "127.0.0.1:7400")]
    pub directory: String,
    /// Your department's node, for records, audit and node-status [default: 127.0.0.1:7401]. When given,
    /// catalog publish and withdraw also go through it instead of straight to the directory.
    #[arg(long, global = true, env = "EXCHANGE_NODE", value_name = "HOST:PORT")]
    pub node: Option<String>,
    /// The server's admin port (HTTPS), for status, top, peers, outbox, backup and admin [default:
    /// 127.0.0.1:9401].
    #[arg(long, global = true, env = "EXCHANGE_ADMIN", value_name = "HOST:PORT")]
    pub admin: Option<String>,
    /// A file holding the admin port's bearer token; without it, the operator certificate
    /// (--pki-dir/--identity or --cert/--key) is presented.
    #[arg(long, global = true, env = "EXCHANGE_ADMIN_TOKEN_FILE", value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,
    /// Machine-readable output: one JSON document per command (JSON lines for `catalog watch`).
    #[arg(long, global = true)]
    pub json: bool,
    /// Deadline of each call, in seconds (not applied to `catalog watch`).
    #[arg(long, global = true, default_value_t = 30, value_name = "SECONDS")]
    pub timeout: u64,
}

/// The admin port when neither --admin nor EXCHANGE_ADMIN gives one.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9401";

/// The node address when neither --node nor EXCHANGE_NODE gives one.
pub const DEFAULT_NODE: &str = "127.0.0.1:7401";

impl GlobalOpts {
    /// The node that node commands talk to.
    pub fn node_addr(&self) -> &str {
        self.node.as_deref().unwrap_or(DEFAULT_NODE)
    }

    /// The admin port that status, top, peers, outbox, backup and admin talk to.
    pub fn admin_addr(&self) -> &str {
        self.admin.as_deref().unwrap_or(DEFAULT_ADMIN)
    }
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
    /// A node's own view of itself (ExchangeNode.NodeStatus at --node; operator of the node's department).
    NodeStatus,
    /// Who the directory takes this certificate for.
    Whoami,
    /// Records: store your department's (put), look up another department's (get), copy a whole resource
    /// (sync), through --node.
    #[command(subcommand)]
    Records(RecordsCommand),
    /// Change events: publish your department's, subscribe to another department's, receive them.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Grants of access to conditional resources, kept by the directory: request, list, decide, revoke.
    #[command(subcommand)]
    Grants(GrantsCommand),
    /// The node's audit trail (operator of the node's department): query entries, verify the seals.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// One screen from the server's admin port (--admin): identity, version, uptime, readiness,
    /// certificate expiry, directory state, traffic rates overall and per peer, backlog, peers.
    Status {
        /// Traffic rates are measured over this window (two snapshots this far apart).
        #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
        interval_ms: u64,
    },
    /// A live view of traffic per direction, peer and resource (admin port): req/s, errors, average
    /// latency, busiest first. Ctrl-C to quit.
    Top {
        /// Seconds between refreshes.
        #[arg(long, value_name = "SECONDS", default_value_t = 2.0, value_parser = refresh_seconds)]
        interval: f64,
        /// Stop after this many refreshes (scripts, tests); with --json, one JSON line per refresh.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        iterations: Option<u64>,
    },
    /// The departments this server exchanges with (admin port): status, address, calls, grants.
    Peers,
    /// Subscriptions both ways with their backlog and oldest undelivered event (a node's admin port).
    Outbox,
    /// Operator switches on the admin port: maintenance mode, reload, readiness.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Download a consistent backup of the running server's store from its admin port (--admin), verify
    /// its checksum and print what it holds. A node's backup holds its audit keys: keep it private.
    Backup {
        /// The file to write (it must not exist yet; it is created mode 0600).
        #[arg(long, short, value_name = "FILE")]
        out: PathBuf,
    },
    /// Verify a backup file and restore it into the data directory of a STOPPED server. The database is
    /// built in a new folder beside DIR and renamed into place; a damaged file changes nothing.
    Restore {
        /// The backup file (from `exchangectl backup`).
        #[arg(long, short, value_name = "FILE")]
        file: PathBuf,
        /// The server's data_dir (as in its config file).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Refuse a backup of the other kind of server.
        #[arg(long, value_parser = ["node", "directory"])]
        server: Option<String>,
        /// DIR may be non-empty: it is moved aside to DIR.before-restore-<time> (kept, never deleted).
        #[arg(long)]
        force: bool,
    },
}

/// `top --interval`: a positive number of seconds, at least 0.1 (the admin port is not a firehose).
fn refresh_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.1..=3600.0).contains(&v) {
        return Err("must be between 0.1 and 3600 seconds".into());
    }
    Ok(v)
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Maintenance mode: `on` makes /readyz answer 503 and gRPC health NOT_SERVING, so load balancers
    /// drain the server; calls that still arrive are served. `off` ends it.
    Maintenance {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Re-read the certificate and key files (rotation) and the reloadable configuration.
    Reload,
    /// Print /readyz; exit status 0 when ready, 1 when not.
    Ready,
}

#[derive(Debug, Subcommand)]
pub enum RecordsCommand {
    /// Store records of a resource your department publishes (app or operator certificate).
    ///
    /// All or nothing per batch of 5000: one bad record refuses its batch, and every problem is listed
    /// as records[i].key or records[i].items[名称] (i counts from 0 in the file).
    Put {
        /// Resource code (your department's catalog entry).
        #[arg(long, value_name = "CODE")]
        resource: String,
        /// A JSON array of {"key": "...", "items": {"名称": "值", ...}}, or one such object per line
        /// (JSON lines); `-` reads standard input.
        #[arg(long, short, value_name = "FILE")]
        file: PathBuf,
    },
    /// Look up records of another department's resource by key (app certificate).
    Get {
        /// Resource code.
        #[arg(long, value_name = "CODE")]
        resource: String,
        /// Record keys: 统一社会信用代码, 公民身份号码, or the entry's key item.
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
        /// Why you ask (recorded in both departments' audit trails).
        #[arg(long, value_name = "TEXT", default_value = "")]
        purpose: String,
    },
    /// Copy every record of another department's resource into a JSON-lines file, through --node.
    ///
    /// One record per line: {"key": "...", "version": N, "items": {...}}, in key order. If FILE exists,
    /// the sync continues after the last complete line's key (appending); a partial last line left by an
    /// interrupted run is dropped first. Subscribe before syncing to keep the copy current: apply an event
    /// to a key only if its seq is greater than the record's version.
    Sync {
        /// Resource code.
        #[arg(long, value_name = "CODE")]
        resource: String,
        /// The JSON-lines file to write (or to continue).
        #[arg(long, short, value_name = "FILE.jsonl")]
        out: PathBuf,
        /// Why you copy the data (recorded in both departments' audit trails).
        #[arg(long, value_name = "TEXT", default_value = "")]
        purpose: String,
        /// Start over: truncate FILE instead of continuing it.
        #[arg(long)]
        restart: bool,
        /// No progress bar (it is also hidden when stderr is not a terminal, and with --json).
        #[arg(long, short)]
        quiet: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Publish changes of records of a resource your department publishes (app or operator certificate):
    /// the records are stored and every subscriber receives the changes.
    Publish {
        /// Resource code (your department's catalog entry).
        #[arg(long, value_name = "CODE")]
        resource: String,
        /// Records as for `records put`: a JSON array of {"key": "...", "items": {...}} or JSON lines;
        /// `-` reads standard input.
        #[arg(long, short, value_name = "FILE")]
        file: PathBuf,
        /// The kind of every change [default: created for a new key, updated otherwise].
        #[arg(long, value_parser = ["created", "updated", "deregistered"])]
        kind: Option<String>,
    },
    /// Subscribe your department to another department's resource; the node then keeps every change in
    /// its inbox until an application acknowledges it. Subscribing again is harmless.
    Subscribe {
        /// Resource code.
        #[arg(long, value_name = "CODE")]
        resource: String,
    },
    /// End your department's subscription to a resource.
    Unsubscribe {
        /// Resource code.
        #[arg(long, value_name = "CODE")]
        resource: String,
    },
    /// The node's subscriptions, both sides: positions, backlog, connection, state.
    List,
    /// Print a subscription's events as JSON lines (seq, kind, key, version, items) on stdout.
    ///
    /// Starts after the node's acknowledged position (or --after), acknowledges after each batch is
    /// written (unless --no-ack), and stops when no event arrives within a second (or --max are printed);
    /// with --follow it waits for more until Ctrl-C. Reconnects after the last event printed.
    Receive {
        /// Resource code.
        #[arg(long, value_name = "CODE")]
        resource: String,
        /// Start after this seq (the last one you processed) instead of the node's acknowledged position.
        #[arg(long, value_name = "SEQ")]
        after: Option<u64>,
        /// Keep waiting for events until Ctrl-C or the end of the subscription.
        #[arg(long, short = 'F')]
        follow: bool,
        /// Stop after this many events.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        max: Option<u64>,
        /// Do not acknowledge: the node keeps the events (the next receive sees them again).
        #[arg(long)]
        no_ack: bool,
    },
}

/// Grant status words, as `grants list --status` takes them.
pub const GRANT_STATUS_WORDS: [&str; 6] = ["pending", "approved", "rejected", "revoked", "expired", "superseded"];

#[derive(Debug, Subcommand)]
pub enum GrantsCommand {
    /// Ask for access to data items of a conditional resource (your department is the consumer).
    Request {
        /// Resource code.
        #[arg(long, value_name = "CODE")]
        resource: String,
        /// The data items needed, comma-separated (e.g. 企业名称,登记状态).
        #[arg(long, value_name = "A,B,C", value_delimiter = ',', required = true)]
        items: Vec<String>,
        /// 用途: what the data is for.
        #[arg(long, value_name = "TEXT", default_value = "")]
        purpose: String,
        /// 依据: the law or agreement that allows it.
        #[arg(long, value_name = "TEXT", default_value = "")]
        legal_basis: String,
    },
    /// Grants where your department is provider or consumer, newest request first.
    List {
        /// Only grants where your department is this side.
        #[arg(long, value_parser = ["provider", "consumer"])]
        side: Option<String>,
        /// Only grants in this status.
        #[arg(long, value_parser = GRANT_STATUS_WORDS)]
        status: Option<String>,
        /// Only grants of this resource.
        #[arg(long, value_name = "CODE")]
        resource: Option<String>,
    },
    /// Approve a pending grant (operator of the provider department).
    Approve {
        /// Grant id (G + 8 digits).
        id: String,
        /// Grant only these of the requested items, comma-separated (default: all requested).
        #[arg(long, value_name = "A,B", value_delimiter = ',')]
        items: Vec<String>,
        /// Last day of access: the grant expires at the end of that day, UTC (23:59:59.999Z). An RFC 3339
        /// time is taken as is. Default: no expiry.
        #[arg(long, value_name = "YYYY-MM-DD")]
        expires: Option<String>,
    },
    /// Reject a pending grant (operator of the provider department).
    Reject {
        /// Grant id.
        id: String,
        /// Why (the consumer sees it).
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
    /// End an approved grant (operator of the provider department).
    Revoke {
        /// Grant id.
        id: String,
        /// Why (the consumer sees it).
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain and seals of the node's audit trail; exit status 1 when it was tampered with.
    Verify,
    /// Audit entries, newest first.
    Query(AuditQueryArgs),
}

#[derive(Debug, Clone, Args)]
pub struct AuditQueryArgs {
    /// From this time: RFC 3339 (2026-01-31T08:00:00+08:00), a date (UTC midnight) or a duration ago
    /// (30s, 15m, 2h, 1d, 1w).
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Until this time (same forms as --since).
    #[arg(long, value_name = "T")]
    pub until: Option<String>,
    /// Only calls with this department on the other side.
    #[arg(long, value_name = "DEPT")]
    pub peer: Option<String>,
    /// Only calls for this resource.
    #[arg(long, value_name = "CODE")]
    pub resource: Option<String>,
    /// ok, error, or a gRPC code name (PERMISSION_DENIED, NOT_FOUND...).
    #[arg(long, value_name = "ok|error|CODE")]
    pub result: Option<String>,
    /// Only calls for this record key (the node matches its keyed hash; keys are never stored). Not
    /// `--key`: that is the private key of the certificate.
    #[arg(long, value_name = "KEY")]
    pub record_key: Option<String>,
    /// Only this relay message id.
    #[arg(long, value_name = "ID")]
    pub message_id: Option<String>,
    /// At most this many entries (the node's default is 100).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: Option<u32>,
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
    /// Directly to the directory (operator or node certificate of the entries' department), or, when
    /// --node (or EXCHANGE_NODE) is set, through that node's ExchangeNode.PublishCatalog (app or operator
    /// certificate of the node's department).
    Publish {
        /// Catalog file: [[entries]] tables (see deploy/local/catalog/*.toml).
        #[arg(long, short, value_name = "FILE.toml")]
        file: PathBuf,
        /// Only read and check the file; send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Withdraw entries (they stay as tombstones so watchers see the withdrawal); through --node when it
    /// is set, as for publish.
    Withdraw {
        #[arg(required = true, value_name = "CODE")]
        codes: Vec<String>,
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
        assert_eq!(cli.global.node.as_deref(), Some("n:7401"));
        let Command::Catalog(CatalogCommand::Withdraw { codes }) = cli.command else { panic!() };
        assert_eq!(codes.len(), 2);
    }

    #[test]
    fn node_is_one_global_option_with_a_default() {
        let cli = parse(&["--node", "tax.example:7401", "node-status"]).unwrap();
        assert_eq!(cli.global.node_addr(), "tax.example:7401");
        let cli = parse(&["catalog", "publish", "--file", "c.toml", "--node", "n:1"]).unwrap();
        assert_eq!(cli.global.node_addr(), "n:1");
        if std::env::var_os("EXCHANGE_NODE").is_none() {
            let cli = parse(&["node-status"]).unwrap();
            assert_eq!(cli.global.node, None, "catalog publish goes to the directory unless a node is given");
            assert_eq!(cli.global.node_addr(), DEFAULT_NODE);
        }
    }

    #[test]
    fn records_put_and_get() {
        let cli = parse(&["records", "put", "--resource", "101001/000001", "--file", "-"]).unwrap();
        let Command::Records(RecordsCommand::Put { resource, file }) = cli.command else { panic!() };
        assert_eq!((resource.as_str(), file), ("101001/000001", PathBuf::from("-")));
        assert!(parse(&["records", "put", "--resource", "r"]).is_err(), "--file is required");
        assert!(parse(&["records", "get", "--resource", "r"]).is_err(), "at least one key");
        let cli = parse(&["records", "get", "--resource", "r", "K1", "K2", "--purpose", "核验", "--json"]).unwrap();
        assert!(cli.global.json);
        let Command::Records(RecordsCommand::Get { keys, purpose, .. }) = cli.command else { panic!() };
        assert_eq!(keys, ["K1", "K2"]);
        assert_eq!(purpose, "核验");
    }

    #[test]
    fn records_sync_and_events_commands() {
        let cli = parse(&["records", "sync", "--resource", "r", "--out", "r.jsonl", "--purpose", "初始化", "-q"]).unwrap();
        let Command::Records(RecordsCommand::Sync { out, purpose, restart, quiet, .. }) = cli.command else { panic!() };
        assert_eq!((out, purpose.as_str(), restart, quiet), (PathBuf::from("r.jsonl"), "初始化", false, true));
        assert!(parse(&["records", "sync", "--resource", "r"]).is_err(), "--out is required");

        let cli = parse(&["events", "publish", "--resource", "r", "-f", "x.json", "--kind", "deregistered"]).unwrap();
        let Command::Events(EventsCommand::Publish { kind, .. }) = cli.command else { panic!() };
        assert_eq!(kind.as_deref(), Some("deregistered"));
        assert!(parse(&["events", "publish", "--resource", "r", "-f", "x", "--kind", "deleted"]).is_err());
        assert!(matches!(parse(&["events", "list"]).unwrap().command, Command::Events(EventsCommand::List)));
        assert!(parse(&["events", "subscribe"]).is_err(), "--resource is required");

        let cli = parse(&["events", "receive", "--resource", "r", "--after", "41", "--follow", "--max", "10", "--no-ack"]).unwrap();
        let Command::Events(EventsCommand::Receive { after, follow, max, no_ack, .. }) = cli.command else { panic!() };
        assert_eq!((after, follow, max, no_ack), (Some(41), true, Some(10), true));
        assert!(parse(&["events", "receive", "--resource", "r", "--max", "0"]).is_err());
    }

    #[test]
    fn grants_commands() {
        let cli =
            parse(&["grants", "request", "--resource", "r", "--items", "企业名称,登记状态", "--legal-basis", "协议"]).unwrap();
        let Command::Grants(GrantsCommand::Request { items, legal_basis, purpose, .. }) = cli.command else { panic!() };
        assert_eq!(items, ["企业名称", "登记状态"]);
        assert_eq!((legal_basis.as_str(), purpose.as_str()), ("协议", ""));
        assert!(parse(&["grants", "request", "--resource", "r"]).is_err(), "--items is required");

        let cli = parse(&["grants", "list", "--side", "provider", "--status", "pending"]).unwrap();
        assert!(matches!(cli.command, Command::Grants(GrantsCommand::List { side: Some(_), status: Some(_), resource: None })));
        assert!(parse(&["grants", "list", "--status", "open"]).is_err());
        assert!(parse(&["grants", "list", "--side", "both"]).is_err());

        let cli = parse(&["grants", "approve", "G00000001", "--items", "企业名称", "--expires", "2026-12-31"]).unwrap();
        let Command::Grants(GrantsCommand::Approve { id, items, expires }) = cli.command else { panic!() };
        assert_eq!((id.as_str(), items.len(), expires.as_deref()), ("G00000001", 1, Some("2026-12-31")));
        let cli = parse(&["grants", "approve", "G00000001"]).unwrap();
        assert!(matches!(cli.command, Command::Grants(GrantsCommand::Approve { ref items, expires: None, .. }) if items.is_empty()));

        assert!(parse(&["grants", "reject", "G00000001"]).is_err(), "--reason is required");
        assert!(parse(&["grants", "revoke", "G00000001", "--reason", "协议到期"]).is_ok());
    }

    #[test]
    fn ops_commands() {
        let cli = parse(&["status", "--admin", "10.0.0.5:9401", "--interval-ms", "500"]).unwrap();
        assert_eq!(cli.global.admin_addr(), "10.0.0.5:9401");
        assert!(matches!(cli.command, Command::Status { interval_ms: 500 }));
        assert!(parse(&["status", "--interval-ms", "0"]).is_err());
        let cli = parse(&["top", "--iterations", "2", "--interval", "0.5"]).unwrap();
        assert!(matches!(cli.command, Command::Top { interval, iterations: Some(2) } if interval == 0.5));
        assert!(matches!(parse(&["top"]).unwrap().command, Command::Top { interval, iterations: None } if interval == 2.0));
        assert!(parse(&["top", "--interval", "0"]).is_err());
        assert!(parse(&["top", "--interval", "soon"]).is_err());
        assert!(parse(&["top", "--iterations", "0"]).is_err());
        assert!(matches!(parse(&["peers"]).unwrap().command, Command::Peers));
        assert!(matches!(parse(&["outbox"]).unwrap().command, Command::Outbox));
        let cli = parse(&["admin", "maintenance", "on", "--admin-token-file", "t"]).unwrap();
        assert_eq!(cli.global.admin_token_file, Some(PathBuf::from("t")));
        assert!(matches!(cli.command, Command::Admin(AdminCommand::Maintenance { ref state }) if state == "on"));
        assert!(parse(&["admin", "maintenance", "maybe"]).is_err());
        assert!(parse(&["admin", "maintenance"]).is_err());
        assert!(matches!(parse(&["admin", "reload"]).unwrap().command, Command::Admin(AdminCommand::Reload)));
        assert!(matches!(parse(&["admin", "ready"]).unwrap().command, Command::Admin(AdminCommand::Ready)));
    }

    #[test]
    fn audit_commands() {
        assert!(matches!(parse(&["audit", "verify"]).unwrap().command, Command::Audit(AuditCommand::Verify)));
        let cli = parse(&[
            "audit", "query", "--since", "2h", "--peer", "commerce", "--result", "PERMISSION_DENIED", "--record-key", "K",
            "--limit", "20",
        ])
        .unwrap();
        let Command::Audit(AuditCommand::Query(q)) = cli.command else { panic!() };
        assert_eq!(q.since.as_deref(), Some("2h"));
        assert_eq!(q.record_key.as_deref(), Some("K"));
        assert_eq!(q.limit, Some(20));
        assert!(parse(&["audit", "query", "--limit", "0"]).is_err());
        assert!(parse(&["audit", "query", "--limit", "10001"]).is_err());
    }
}
