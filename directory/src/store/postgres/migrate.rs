//! Versioned schema migrations, run by every replica at start.
//!
//! Each migration is one SQL file under `migrations/`, compiled in. `gx_schema_migrations` has a row per
//! applied migration; a migration and its row commit in one transaction, so a database is always at
//! exactly one version. Replicas starting together race safely: each inserts the migration's row first,
//! a second inserter waits on the first one's uncommitted row and then finds it there (and skips), or,
//! if the first rolled back, applies the migration itself. A database whose schema is newer than this
//! build is refused: this build would not know what the newer tables mean.

use deadpool_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::store::StoreError;

/// One schema step.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// Every migration this build knows, in version order, consecutive from 1.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "initial",
    sql: include_str!("migrations/0001_initial.sql"),
}];

/// The schema version this build migrates a database to.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS gx_schema_migrations (\
     version BIGINT PRIMARY KEY, \
     name TEXT NOT NULL, \
     applied_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP)";

fn failed(label: &str, what: &str, e: &tokio_postgres::Error) -> StoreError {
    StoreError::Backend(format!(
        "schema migration of {label}: {what}: {}",
        client_sdk::tls::error_chain(e)
    ))
}

/// Brings the database at `label` to [`SCHEMA_VERSION`].
pub(super) async fn run(client: &mut Client, label: &str) -> Result<(), StoreError> {
    create_table(client, label).await?;
    let already = applied(client, label).await?;
    check_known(&already, label)?;
    for migration in MIGRATIONS {
        if already.iter().any(|(v, _)| *v == migration.version) {
            continue;
        }
        let tx = client
            .transaction()
            .await
            .map_err(|e| failed(label, "begin", &e))?;
        let claimed = tx
            .execute(
                "INSERT INTO gx_schema_migrations (version, name) VALUES ($1, $2) ON CONFLICT (version) DO NOTHING",
                &[&migration.version, &migration.name],
            )
            .await
            .map_err(|e| failed(label, "claim a migration", &e))?;
        if claimed == 0 {
            // Another replica applied it while we looked.
            tx.rollback()
                .await
                .map_err(|e| failed(label, "rollback", &e))?;
            continue;
        }
        let step = format!("migration {:04}_{}", migration.version, migration.name);
        tx.batch_execute(migration.sql)
            .await
            .map_err(|e| failed(label, &step, &e))?;
        tx.commit().await.map_err(|e| failed(label, &step, &e))?;
        tracing::info!(database = %label, version = migration.version, name = migration.name, "schema migration applied");
    }
    // A newer replica may have migrated further while this one ran.
    check_known(&applied(client, label).await?, label)
}

/// Creates the migrations table if there is none. Two sessions creating it at once can collide in the
/// system catalogs even with IF NOT EXISTS (a unique violation on the table's row type, "type already
/// exists", "relation already exists"): then the other one made it, and the next try sees it.
async fn create_table(client: &Client, label: &str) -> Result<(), StoreError> {
    let mut attempt = 0;
    loop {
        match client.batch_execute(CREATE_TABLE).await {
            Ok(()) => return Ok(()),
            Err(e)
                if attempt < 5
                    && e.code().is_some_and(|c| {
                        *c == SqlState::UNIQUE_VIOLATION
                            || *c == SqlState::DUPLICATE_TABLE
                            || *c == SqlState::DUPLICATE_OBJECT
                            || *c == SqlState::T_R_SERIALIZATION_FAILURE
                            || *c == SqlState::T_R_DEADLOCK_DETECTED
                    }) =>
            {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20 * attempt)).await;
            }
            Err(e) => return Err(failed(label, "create gx_schema_migrations", &e)),
        }
    }
}

async fn applied(client: &Client, label: &str) -> Result<Vec<(i64, String)>, StoreError> {
    let rows = client
        .query(
            "SELECT version, name FROM gx_schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(|e| failed(label, "read gx_schema_migrations", &e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Refuses a database that holds a migration this build does not know (newer, or another one under a
/// known number).
fn check_known(applied: &[(i64, String)], label: &str) -> Result<(), StoreError> {
    if let Some((newest, name)) = applied
        .iter()
        .max_by_key(|(v, _)| *v)
        .filter(|(v, _)| *v > SCHEMA_VERSION)
    {
        return Err(StoreError::Backend(format!(
            "the database {label} has schema version {newest} ({name}), newer than this directory build knows \
             (schema version {SCHEMA_VERSION}): run a directory release that knows schema version {newest}"
        )));
    }
    for (version, name) in applied {
        if let Some(known) = MIGRATIONS
            .iter()
            .find(|m| m.version == *version)
            .filter(|m| m.name != name)
        {
            return Err(StoreError::Backend(format!(
                "the database {label} has schema migration {version} named {name:?}, but this build's migration \
                 {version} is {:?}: the database was made by an incompatible build",
                known.name
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_one_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "{}", m.name);
        }
        assert_eq!(SCHEMA_VERSION, MIGRATIONS.len() as i64);
    }

    #[test]
    fn a_newer_or_foreign_schema_is_refused() {
        assert!(check_known(&[(1, "initial".into())], "db").is_ok());
        let newer = check_known(
            &[(1, "initial".into()), (SCHEMA_VERSION + 1, "later".into())],
            "db",
        )
        .unwrap_err();
        let text = newer.to_string();
        assert!(
            text.contains(&format!("schema version {}", SCHEMA_VERSION + 1)),
            "{text}"
        );
        assert!(
            text.contains(&format!("schema version {SCHEMA_VERSION})")),
            "{text}"
        );
        assert!(check_known(&[(1, "other".into())], "db").is_err());
    }
}
