//! The store conformance suite against every backend. Redis and PostgreSQL
//! read `REDIS_URL` and `DATABASE_URL` at run time and skip (saying why) when
//! they are unset.
#![cfg(feature = "test-util")]

mod common;

use idempotency_core::conformance::Conformance;
use idempotency_core::{FakeClock, MemoryStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_conforms_on_a_fake_clock() {
    let clock = FakeClock::new();
    Conformance::with_fake_clock(MemoryStore::with_clock(10_000, clock.clone()), clock)
        .run_all()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_conforms_on_the_system_clock() {
    Conformance::new(MemoryStore::new()).run_all().await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_conforms() {
    use idempotency_core::store::sqlite::SqliteStore;
    let db = common::TempDb::new("conformance");
    let store = SqliteStore::connect(&db.url()).await.expect("sqlite");
    Conformance::new(store).run_all().await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_conforms() {
    use idempotency_core::store::redis::RedisStore;
    let Some(url) = common::service_url("REDIS_URL", "redis_conforms") else {
        return;
    };
    let store = RedisStore::connect(&url)
        .await
        .expect("redis")
        .with_prefix(format!("{}:", common::unique("conformance")));
    Conformance::new(store).run_all().await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_conforms() {
    use idempotency_core::store::postgres::{PostgresOptions, PostgresStore};
    let Some(url) = common::service_url("DATABASE_URL", "postgres_conforms") else {
        return;
    };
    let schema = common::unique("idem_conformance");
    let store = PostgresStore::connect_with(
        &url,
        PostgresOptions::new().schema(&schema).max_connections(16),
    )
    .await
    .expect("postgres");
    Conformance::new(store.clone()).run_all().await;
    drop_schema(&store, &schema).await;
}

#[cfg(feature = "postgres")]
async fn drop_schema(store: &idempotency_core::store::postgres::PostgresStore, schema: &str) {
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(store.pool())
        .await
        .expect("drop schema");
}
