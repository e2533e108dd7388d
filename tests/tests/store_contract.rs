//! The directory storage traits' behaviour tests (`e2e_tests::store_contract`) for both backends: sled in
//! a temporary folder and PostgreSQL in a fresh database each (`e2e_tests::postgres::TestPostgres`), plus
//! what only PostgreSQL can show: two replicas on one database, and the schema migrations.

use e2e_tests::store_contract::{self as contract, Backend, StorePlace};

macro_rules! for_backend {
    ($module:ident, $backend:expr, [$($check:ident),* $(,)?]) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    contract::$check(&StorePlace::new($backend)).await;
                }
            )*
        }
    };
}

macro_rules! contract_checks {
    ($($module:ident => $backend:expr),*) => {
        $(
            for_backend!($module, $backend, [
                empty_stores,
                catalog_versions_tombstones_and_log,
                catalog_batch_naming_a_code_twice,
                catalog_ownership_conflict_writes_nothing,
                catalog_withdraw_of_unknown_code_writes_nothing,
                catalog_live_entries_page_in_code_order,
                nodes_register_heartbeat_and_list,
                revocations_are_idempotent_and_versioned,
                grants_ids_versions_and_order,
                grant_refusals_write_nothing,
                reopen_keeps_everything,
                concurrent_writers_get_consecutive_versions,
            ]);
        )*
    };
}

contract_checks!(sled => Backend::Sled, postgres => Backend::Postgres);

mod postgres_only {
    use super::*;
    use e2e_tests::store_contract::postgres_only;

    macro_rules! postgres_checks {
        ($($check:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    postgres_only::$check(&StorePlace::new(Backend::Postgres)).await;
                }
            )*
        };
    }

    postgres_checks!(
        concurrent_publishes_are_gap_free,
        conflicts_are_caught_across_replicas,
        revocations_and_nodes_across_replicas,
        migrations_run_once_and_refuse_a_newer_schema,
        concurrent_first_opens_both_succeed,
        unreachable_database_fails_clearly,
        database_check_and_size,
        database_over_tls,
        serializable_database_retries_collisions,
    );
}
