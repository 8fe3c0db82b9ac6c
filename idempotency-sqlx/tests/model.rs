//! The model-based property test of the store contract (DESIGN section 3)
//! on SQLite (a temporary file) and PostgreSQL (`DATABASE_URL`; skipped,
//! saying why, when it is unset). The model and the machinery are
//! `test_support::model`'s: these stores keep their own clocks, so an
//! advance really waits, and the sequences are short and their times coarse.
#![cfg(any(feature = "sqlite", feature = "postgres"))]

#[cfg(feature = "postgres")]
mod pg;

use test_support::model::{check_real, runtime, REAL_CASES};

#[cfg(feature = "sqlite")]
#[test]
fn sqlite_store_follows_the_model() {
    use idempotency_sqlx::sqlite::SqliteStore;
    let db = test_support::TempDb::new("idempotency_model");
    let rt = runtime();
    let store = rt
        .block_on(SqliteStore::connect(&db.url()))
        .expect("sqlite");
    check_real(&store, &rt, REAL_CASES);
    rt.block_on(store.pool().close());
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_store_follows_the_model() {
    use idempotency_sqlx::postgres::{PostgresOptions, PostgresStore};
    let Some(url) = test_support::service_url("DATABASE_URL", "postgres_store_follows_the_model")
    else {
        return;
    };
    let rt = runtime();
    let schema = test_support::unique("idem_model");
    let store = rt
        .block_on(PostgresStore::connect_with(
            &url,
            PostgresOptions::new().schema(&schema).max_connections(2),
        ))
        .expect("postgres");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check_real(&store, &rt, REAL_CASES);
    }));
    rt.block_on(pg::drop_schema(&store));
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
