//! A record survives a process restart: a child process (this test binary,
//! re-run) claims and completes a record and exits; the parent opens a new
//! store and must replay it byte for byte (`test_support::restart`). SQLite
//! always; PostgreSQL when `DATABASE_URL` is set.
#![cfg(any(feature = "sqlite", feature = "postgres"))]

#[cfg(feature = "postgres")]
mod pg;

use std::sync::Arc;

use idempotency_core::Store;
use test_support::restart::{child_writes_a_record, survives_a_process_restart};

#[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
async fn open(backend: String, url: String, namespace: String) -> Arc<dyn Store> {
    match backend.as_str() {
        #[cfg(feature = "sqlite")]
        "sqlite" => Arc::new(
            idempotency_sqlx::sqlite::SqliteStore::connect(&url)
                .await
                .expect("sqlite"),
        ),
        #[cfg(feature = "postgres")]
        "postgres" => Arc::new(pg::connect(&url, &namespace).await),
        other => panic!("unknown backend {other} (or its feature is off)"),
    }
}

/// Run by the parent as a child process: claims and completes one record.
#[tokio::test]
#[ignore = "run as a child process by survives_a_process_restart"]
async fn restart_child_writes_a_record() {
    child_writes_a_record(open).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_records_survive_a_process_restart() {
    let db = test_support::TempDb::new("restart");
    survives_a_process_restart("sqlite", &db.url(), "", open).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_records_survive_a_process_restart() {
    let Some(url) =
        test_support::service_url("DATABASE_URL", "postgres_records_survive_a_process_restart")
    else {
        return;
    };
    let schema = test_support::unique("idem_restart");
    survives_a_process_restart("postgres", &url, &schema, open).await;
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    pg::drop_schema_in(&pool, &schema).await;
}
