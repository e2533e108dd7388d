//! The PostgreSQL backend: any number of directory replicas over one database (docs/OPERATOR-GUIDE.md).
//!
//! Layout (`migrations/0001_initial.sql`): one table per concern, values protobuf-encoded as in the sled
//! backend, with the columns queries filter, order or check on beside them. The schema is versioned:
//! [`open`] applies the migrations this build has and the database lacks (see [`migrate`]), and refuses a
//! database whose schema is newer than this build.
//!
//! How the trait contract is kept with several writers (`crate::store`'s module docs):
//!
//! - **Gap-free versions.** Each change log has a head row in `gx_log_heads`. A write transaction updates
//!   its log's head first, which row-locks it until commit: writers of one log run one after the other,
//!   each takes the numbers after the last committed one, and a commit becomes visible before the next
//!   writer of the log can even start. So a reader of a change log never sees version `n + 1` without `n`.
//! - **Checks at the moment of writing** (a code owned by another department, a pending grant already
//!   there, a grant changed since it was read) run inside that transaction, after the head lock, so no
//!   other writer of the log can slip in between check and write. A failed check rolls the transaction
//!   back: nothing is written, not even the counter.
//! - **Durable when acknowledged.** Every session runs with `synchronous_commit = on`, whatever the
//!   database's default, so a commit that returned is on the primary's disk.
//! - **Retries.** A transaction that fails with `serialization_failure` (40001) or `deadlock_detected`
//!   (40P01) was rolled back whole and is run again, a few times: PostgreSQL-compatible distributed
//!   databases answer contention that way.
//!
//! Heartbeats are single-statement updates: visible to every replica at once, and their durability is
//! not waited for any more than any other write's (the contract allows losing them).

mod catalog;
mod grants;
pub mod migrate;
mod registry;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_sdk::admin::api::HealthCheck;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use prost::Message;
use serde::Deserialize;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{StoreError, Stores};

pub use migrate::SCHEMA_VERSION;

/// `[store.postgres]` in the directory's config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// A libpq-style connection string or URL (`postgresql://gx@db.example:5432/gx`), without password.
    pub url: String,
    /// A file holding the password (so it stays out of the config).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Connections in the pool.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// How often this replica looks for changes other replicas wrote.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// PEM file of the CA (or CAs) that signed the database server's certificate. When set, the connection
    /// must use TLS and the server's certificate and host name are verified against it. When unset, the
    /// connection is not encrypted (the url's `sslmode` must then not be `require`).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// How long connecting to the database may take before it counts as unreachable.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

fn default_pool_size() -> usize {
    16
}
fn default_poll_interval_ms() -> u64 {
    100
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}

/// Most connections one replica may hold open.
const MAX_POOL_SIZE: usize = 1_000;
/// How long a call waits for a free pooled connection before failing.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// How long the admin port's `store` check waits for its write.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a transaction that lost a serialization race or a deadlock is tried in all. Under
/// SERIALIZABLE (CockroachDB, or a PostgreSQL database set so) every writer that waited on a log's head row
/// fails once the holder commits, so with `n` writers queued one may lose about `n` times in a row.
const ATTEMPTS: u32 = 20;
/// The longest pause between two attempts.
const MAX_BACK_OFF: Duration = Duration::from_millis(100);

impl PostgresConfig {
    /// A config for `url` with every other option at its default.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresConfig {
            url: url.into(),
            password_file: None,
            pool_size: default_pool_size(),
            poll_interval_ms: default_poll_interval_ms(),
            tls_ca_file: None,
            connect_timeout_ms: default_connect_timeout_ms(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        self.parse_url().map(drop)
    }

    /// The url parsed and checked against the other options.
    fn parse_url(&self) -> Result<tokio_postgres::Config, String> {
        if self.url.trim().is_empty() {
            return Err("url is empty (postgresql://user@host:port/database)".into());
        }
        // The parser's own message could quote the url, password and all: say what is wrong instead.
        let config = tokio_postgres::Config::from_str(&self.url).map_err(|_| {
            "url is not a PostgreSQL connection URL or key=value string (postgresql://user@host:port/database)"
                .to_string()
        })?;
        if config.get_password().is_some() {
            return Err(
                "url must not carry the password: put it in a file named by password_file".into(),
            );
        }
        if config.get_hosts().is_empty() {
            return Err("url names no host".into());
        }
        if config.get_user().is_none() {
            return Err("url names no user (postgresql://user@host:port/database)".into());
        }
        if !(1..=MAX_POOL_SIZE).contains(&self.pool_size) {
            return Err(format!(
                "pool_size must be 1-{MAX_POOL_SIZE}, got {}",
                self.pool_size
            ));
        }
        if !(10..=60_000).contains(&self.poll_interval_ms) {
            return Err(format!(
                "poll_interval_ms must be 10-60000, got {}",
                self.poll_interval_ms
            ));
        }
        if !(100..=600_000).contains(&self.connect_timeout_ms) {
            return Err(format!(
                "connect_timeout_ms must be 100-600000, got {}",
                self.connect_timeout_ms
            ));
        }
        match (config.get_ssl_mode(), &self.tls_ca_file) {
            (tokio_postgres::config::SslMode::Require, None) => {
                return Err("the url asks for sslmode=require: set tls_ca_file to the CA of the database server's \
                            certificate"
                    .into())
            }
            (tokio_postgres::config::SslMode::Disable, Some(_)) => {
                return Err("tls_ca_file is set but the url says sslmode=disable".into())
            }
            _ => {}
        }
        Ok(config)
    }

    /// Relative paths are taken from the config file's folder.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        for p in [self.password_file.as_mut(), self.tls_ca_file.as_mut()]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

/// `postgresql://user@host:port/database` for logs and errors: never the password.
fn describe(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                tokio_postgres::config::Host::Unix(path) => format!("[{}]:{port}", path.display()),
            }
        })
        .collect();
    let user = config.get_user().unwrap_or_default();
    let database = config.get_dbname().unwrap_or(user);
    format!("postgresql://{user}@{}/{database}", hosts.join(","))
}

/// The pool and what errors and checks name it by. Shared by the four stores and [`PgDatabase`].
pub(crate) struct Pg {
    pool: Pool,
    /// `postgresql://user@host:port/database`.
    label: String,
}

/// A step of a write transaction failed: the database, or a check the store makes.
pub(crate) enum TxError {
    Db(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Db(e)
    }
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Store(e)
    }
}

pub(crate) type TxFuture<'c, T> = Pin<Box<dyn Future<Output = Result<T, TxError>> + Send + 'c>>;
pub(crate) type Transaction<'c> = deadpool_postgres::Transaction<'c>;

/// The transaction was rolled back whole and may simply run again.
fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    })
}

/// A pause before attempt `attempt + 1`: random up to a bound that doubles with each attempt (from 2 ms to
/// [`MAX_BACK_OFF`]), so the writers that collided spread out instead of colliding again.
async fn back_off(attempt: u32) {
    use std::hash::{BuildHasher, Hasher};
    let bound = Duration::from_millis(2 << attempt.min(10)).min(MAX_BACK_OFF);
    // Each RandomState has fresh keys: random enough to spread writers, without a dependency.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let pause = bound
        .mul_f64((random % 1_000) as f64 / 1_000.0)
        .max(Duration::from_micros(500));
    tokio::time::sleep(pause).await;
}

impl Pg {
    /// A pooled connection.
    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(|e| self.pool_error(e))
    }

    fn pool_error(&self, e: PoolError) -> StoreError {
        let why = match e {
            PoolError::Backend(e) => client_sdk::tls::error_chain(&e),
            PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => {
                format!(
                    "no free connection in the pool within {} s",
                    POOL_WAIT.as_secs()
                )
            }
            PoolError::Timeout(_) => "timed out".to_string(),
            other => other.to_string(),
        };
        StoreError::Backend(format!("connect to {}: {why}", self.label))
    }

    fn db_error(&self, what: &str, e: &tokio_postgres::Error) -> StoreError {
        StoreError::Backend(format!("{what} ({}): {}", self.label, client_sdk::tls::error_chain(e)))
    }

    /// Runs one statement (in its own implicit transaction), retried like [`Pg::write`].
    pub(crate) async fn query(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let mut attempt = 1;
        loop {
            let client = self.client().await?;
            let result = async {
                let statement = client.prepare_cached(sql).await?;
                client.query(&statement, params).await
            }
            .await;
            match result {
                Ok(rows) => return Ok(rows),
                // A pooled connection the server dropped (a database restart or failover): statements run
                // here are single reads and idempotent upserts, so they run again on a fresh connection.
                Err(e) if (retryable(&e) || e.is_closed()) && attempt < ATTEMPTS => {
                    drop(client);
                    back_off(attempt).await;
                    attempt += 1;
                }
                Err(e) => return Err(self.db_error(what, &e)),
            }
        }
    }

    /// Runs `work` in a transaction and commits it; a check that fails inside rolls everything back. The
    /// whole transaction runs again when the database says it lost a serialization race or a deadlock.
    /// `input` is handed to each attempt (it lives as long as the transaction, so `work` can borrow it).
    pub(crate) async fn write<I: ?Sized + Sync, T>(
        &self,
        what: &str,
        input: &I,
        work: impl for<'c> Fn(&'c Transaction<'c>, &'c I) -> TxFuture<'c, T> + Send + Sync,
    ) -> Result<T, StoreError> {
        let mut attempt = 1;
        loop {
            let mut client = self.client().await?;
            let failed = match client.transaction().await {
                // The connection was dropped by the server before anything was sent: a fresh one may begin.
                Err(e) if e.is_closed() && attempt < ATTEMPTS => {
                    tracing::debug!(what, attempt, "pooled database connection was closed; taking another");
                    attempt += 1;
                    continue;
                }
                Err(e) => e,
                Ok(tx) => match work(&tx, input).await {
                    Ok(out) => match tx.commit().await {
                        Ok(()) => return Ok(out),
                        Err(e) => e,
                    },
                    Err(TxError::Store(e)) => {
                        // A failed check: nothing of this transaction may stay.
                        let _ = tx.rollback().await;
                        return Err(e);
                    }
                    Err(TxError::Db(e)) => {
                        let _ = tx.rollback().await;
                        e
                    }
                },
            };
            if retryable(&failed) && attempt < ATTEMPTS {
                tracing::debug!(what, attempt, error = %failed, "write transaction rolled back by the database; running it again");
                drop(client);
                back_off(attempt).await;
                attempt += 1;
                continue;
            }
            return Err(self.db_error(what, &failed));
        }
    }
}

/// Statements of a transaction, through the connection's statement cache.
pub(crate) async fn tx_query(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.query(&statement, params).await
}

pub(crate) async fn tx_execute(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.execute(&statement, params).await
}

/// Takes the next `count` numbers of `log` (the caller's transaction holds the log's head row from now
/// until it ends) and returns the first of them.
pub(crate) async fn take_versions(
    tx: &Transaction<'_>,
    log: &str,
    count: usize,
) -> Result<u64, TxError> {
    let count = i64::try_from(count)
        .map_err(|_| StoreError::Backend(format!("{count} changes in one write")))?;
    let rows = tx_query(
        tx,
        "UPDATE gx_log_heads SET version = version + $2 WHERE log = $1 RETURNING version",
        &[&log, &count],
    )
    .await?;
    let row = rows.first().ok_or_else(|| StoreError::Corrupt {
        key: format!("gx_log_heads/{log}"),
        reason: "row missing".into(),
    })?;
    let last = version_of(&format!("gx_log_heads/{log}"), row.get(0))?;
    Ok(last + 1 - count as u64)
}

/// The head version of `log`, as last committed.
pub(crate) async fn head_version(pg: &Pg, log: &str) -> Result<u64, StoreError> {
    let rows = pg
        .query(
            "read a change log's version",
            "SELECT version FROM gx_log_heads WHERE log = $1",
            &[&log],
        )
        .await?;
    let row = rows.first().ok_or_else(|| StoreError::Corrupt {
        key: format!("gx_log_heads/{log}"),
        reason: "row missing".into(),
    })?;
    version_of(&format!("gx_log_heads/{log}"), row.get(0))
}

/// A stored BIGINT version or sequence number as the u64 the traits speak.
pub(crate) fn version_of(key: &str, stored: i64) -> Result<u64, StoreError> {
    u64::try_from(stored).map_err(|_| StoreError::Corrupt {
        key: key.to_string(),
        reason: format!("negative number {stored}"),
    })
}

/// A u64 version or sequence number as a BIGINT.
pub(crate) fn to_bigint(what: &str, n: u64) -> Result<i64, StoreError> {
    i64::try_from(n)
        .map_err(|_| StoreError::Backend(format!("{what} {n} is beyond what the database stores")))
}

/// A lower bound for `WHERE version > $1`: past every stored version when it does not fit.
pub(crate) fn after_bound(after: u64) -> i64 {
    i64::try_from(after).unwrap_or(i64::MAX)
}

/// A LIMIT.
pub(crate) fn limit_of(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

pub(crate) fn decode<M: Message + Default>(
    key: impl FnOnce() -> String,
    bytes: &[u8],
) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt {
        key: key(),
        reason: e.to_string(),
    })
}

/// A handle on the database under the stores, for the admin port.
#[derive(Clone)]
pub struct PgDatabase {
    pg: Arc<Pg>,
}

impl PgDatabase {
    /// `postgresql://user@host:port/database` (no password).
    pub fn describe(&self) -> &str {
        &self.pg.label
    }

    /// The database's size on disk.
    pub async fn size_bytes(&self) -> Result<u64, StoreError> {
        let rows = self
            .pg
            .query(
                "read the database size",
                "SELECT pg_database_size(current_database())",
                &[],
            )
            .await?;
        let bytes: i64 = rows.first().map(|r| r.get(0)).unwrap_or(0);
        Ok(u64::try_from(bytes).unwrap_or(0))
    }

    /// The `store` readiness check: a small write that must commit within [`CHECK_TIMEOUT`].
    pub async fn check(&self) -> HealthCheck {
        let started = Instant::now();
        let now = chrono::Utc::now().timestamp_millis();
        let params: [&(dyn ToSql + Sync); 1] = [&now];
        let write = self.pg.query(
            "write the store probe",
            "INSERT INTO gx_probe (id, written_at_unix_ms) VALUES ('store-check', $1) \
             ON CONFLICT (id) DO UPDATE SET written_at_unix_ms = EXCLUDED.written_at_unix_ms",
            &params,
        );
        let (ok, detail) = match tokio::time::timeout(CHECK_TIMEOUT, write).await {
            Ok(Ok(_)) => (
                true,
                format!(
                    "writable ({}, {} ms)",
                    self.pg.label,
                    started.elapsed().as_millis()
                ),
            ),
            Ok(Err(e)) => (false, format!("cannot write the store: {e}")),
            Err(_) => (
                false,
                format!(
                    "no answer from {} within {} s",
                    self.pg.label,
                    CHECK_TIMEOUT.as_secs()
                ),
            ),
        };
        HealthCheck {
            name: "store".into(),
            ok,
            detail,
        }
    }
}

/// Reads the password file: its content up to the end of the first line.
fn read_password(path: &std::path::Path) -> Result<String, StoreError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        StoreError::Backend(format!("cannot read password_file {}: {e}", path.display()))
    })?;
    let password = text.lines().next().unwrap_or_default().to_string();
    if password.is_empty() {
        return Err(StoreError::Backend(format!(
            "password_file {} is empty",
            path.display()
        )));
    }
    Ok(password)
}

/// The rustls client config for the database connection: the configured CA only, ring as the provider.
fn tls_connector(
    ca_file: &std::path::Path,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let bad =
        |why: String| StoreError::Backend(format!("tls_ca_file {}: {why}", ca_file.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| bad(e.to_string()))? {
        roots
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Connects, runs the schema migrations, and returns the four stores.
pub async fn open(config: &PostgresConfig) -> Result<(Stores, PgDatabase), StoreError> {
    let mut pg_config = config
        .parse_url()
        .map_err(|e| StoreError::Backend(format!("store.postgres: {e}")))?;
    let label = describe(&pg_config);
    if let Some(path) = &config.password_file {
        pg_config.password(read_password(path)?);
    }
    let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
    pg_config.connect_timeout(connect_timeout);
    // A replica must notice a database that went away without closing its connections.
    pg_config.keepalives_idle(Duration::from_secs(30));
    if pg_config.get_application_name().is_none() {
        pg_config.application_name("gov-exchange-directory");
    }
    // Acknowledged writes must survive a crash of the database, whatever its default says.
    let options = match pg_config.get_options() {
        Some(existing) => format!("{existing} -c synchronous_commit=on"),
        None => "-c synchronous_commit=on".to_string(),
    };
    pg_config.options(&options);
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match &config.tls_ca_file {
        Some(ca) => {
            pg_config.ssl_mode(tokio_postgres::config::SslMode::Require);
            Manager::from_config(pg_config, tls_connector(ca)?, manager_config)
        }
        None => Manager::from_config(pg_config, tokio_postgres::NoTls, manager_config),
    };
    let pool = Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(connect_timeout))
        .wait_timeout(Some(POOL_WAIT))
        .build()
        .map_err(|e| StoreError::Backend(format!("connection pool for {label}: {e}")))?;
    let pg = Arc::new(Pg { pool, label });

    let mut client = pg.client().await?;
    migrate::run(&mut client, &pg.label).await?;
    drop(client);

    let stores = Stores {
        catalog: Arc::new(catalog::PgCatalogStore::new(pg.clone())),
        nodes: Arc::new(registry::PgNodeStore::new(pg.clone())),
        revocations: Arc::new(registry::PgRevocationStore::new(pg.clone())),
        grants: Arc::new(grants::PgGrantStore::new(pg.clone())),
    };
    Ok((stores, PgDatabase { pg }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_checks() {
        let ok = PostgresConfig::new("postgresql://gx@db.example:5433/gx");
        assert!(ok.validate().is_ok());
        assert_eq!(
            describe(&ok.parse_url().unwrap()),
            "postgresql://gx@db.example:5433/gx"
        );
        let kv = PostgresConfig::new("host=db1,db2 port=5432 user=gx dbname=dir");
        assert_eq!(
            describe(&kv.parse_url().unwrap()),
            "postgresql://gx@db1:5432,db2:5432/dir"
        );

        let err = |c: PostgresConfig| c.validate().unwrap_err();
        let leaked = err(PostgresConfig::new("postgresql://gx:s3cret@db/gx"));
        assert!(
            leaked.contains("password_file") && !leaked.contains("s3cret"),
            "{leaked}"
        );
        assert!(
            err(PostgresConfig::new("postgresql://gx@db/gx?sslmode=require"))
                .contains("tls_ca_file")
        );
        assert!(err(PostgresConfig::new("")).contains("empty"));
        assert!(err(PostgresConfig::new("postgresql://db/gx")).contains("user"));
        let garbled = err(PostgresConfig::new("postgresql://gx:pw@db:notaport/gx"));
        assert!(!garbled.contains("pw"), "{garbled}");
        assert!(err(PostgresConfig {
            pool_size: 0,
            ..ok.clone()
        })
        .contains("pool_size"));
        assert!(err(PostgresConfig {
            poll_interval_ms: 0,
            ..ok.clone()
        })
        .contains("poll_interval_ms"));
        assert!(err(PostgresConfig {
            connect_timeout_ms: 1,
            ..ok.clone()
        })
        .contains("connect_timeout_ms"));
        let tls = PostgresConfig {
            tls_ca_file: Some("ca.pem".into()),
            ..ok.clone()
        };
        assert!(tls.validate().is_ok());
        let disabled = PostgresConfig {
            url: format!("{}?sslmode=disable", ok.url),
            ..tls
        };
        assert!(err(disabled).contains("sslmode=disable"));
    }

    #[test]
    fn relative_paths_are_taken_from_the_config_folder() {
        let mut c = PostgresConfig {
            password_file: Some("secrets/pw".into()),
            tls_ca_file: Some("/etc/ca.pem".into()),
            ..PostgresConfig::new("postgresql://gx@db/gx")
        };
        c.resolve_paths(std::path::Path::new("/etc/gx"));
        assert_eq!(
            c.password_file.unwrap(),
            PathBuf::from("/etc/gx/secrets/pw")
        );
        assert_eq!(c.tls_ca_file.unwrap(), PathBuf::from("/etc/ca.pem"));
    }

    #[test]
    fn toml_form() {
        let c: PostgresConfig = toml::from_str(
            "url = \"postgresql://gx@db/gx\"\npassword_file = \"pw\"\ntls_ca_file = \"ca.pem\"\nconnect_timeout_ms = 2000\n",
        )
        .unwrap();
        assert_eq!(
            (c.pool_size, c.poll_interval_ms, c.connect_timeout_ms),
            (16, 100, 2000)
        );
        assert!(toml::from_str::<PostgresConfig>(
            "url = \"postgresql://gx@db/gx\"\npasword_file = \"pw\"\n"
        )
        .is_err());
    }
}
