//! The store conformance suite, and its transactional cases, on SQLite (a
//! temporary file) and PostgreSQL (`DATABASE_URL`, with a second instance
//! for the watch cases; skipped, saying why, when it is unset).
#![cfg(any(feature = "sqlite", feature = "postgres"))]

#[cfg(feature = "postgres")]
mod pg;

use idempotency_core::conformance::{Conformance, TransactionalConformance};

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_conforms() {
    use idempotency_sqlx::sqlite::SqliteStore;
    let db = test_support::TempDb::new("conformance");
    let store = SqliteStore::connect(&db.url()).await.expect("sqlite");
    Conformance::new(store).run_all().await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_conforms_in_transactional_mode() {
    use idempotency_sqlx::{sqlite::SqliteStore, SqliteTransaction};
    let db = test_support::TempDb::new("conformance_tx");
    let store = SqliteStore::connect(&db.url()).await.expect("sqlite");
    TransactionalConformance::<SqliteTransaction>::new(store)
        .run_all()
        .await;
}

/// A store on a fresh schema (and the schema's name), or `None` when
/// `DATABASE_URL` is unset.
#[cfg(feature = "postgres")]
async fn postgres(test: &str) -> Option<(String, idempotency_sqlx::postgres::PostgresStore)> {
    use idempotency_sqlx::postgres::{PostgresOptions, PostgresStore};
    let url = test_support::service_url("DATABASE_URL", test)?;
    let schema = test_support::unique("idem_conformance");
    let store = PostgresStore::connect_with(
        &url,
        PostgresOptions::new().schema(&schema).max_connections(16),
    )
    .await
    .expect("postgres");
    Some((url, store))
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_conforms() {
    let Some((url, store)) = postgres("postgres_conforms").await else {
        return;
    };
    // Another instance (its own pool, its own listener) on the same schema.
    let peer = pg::connect(&url, store.schema()).await;
    Conformance::new(store.clone())
        .with_peer(peer)
        .run_all()
        .await;
    pg::drop_schema(&store).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_conforms_in_transactional_mode() {
    let Some((_, store)) = postgres("postgres_conforms_in_transactional_mode").await else {
        return;
    };
    TransactionalConformance::<idempotency_sqlx::PostgresTransaction>::new(store.clone())
        .run_all()
        .await;
    pg::drop_schema(&store).await;
}
