//! Helpers for the PostgreSQL tests (whose URL is `DATABASE_URL`): a store
//! on a schema of its own, dropping that schema when the test is done, and
//! rows written by hand.
#![allow(dead_code)]

use idempotency_core::{Fingerprint, LeaseToken, RecordId, StoreError};
use idempotency_sqlx::postgres::{PostgresOptions, PostgresStore};

/// A store on `url` in `schema` (created and migrated when needed).
pub async fn connect(url: &str, schema: &str) -> PostgresStore {
    PostgresStore::connect_with(url, PostgresOptions::new().schema(schema))
        .await
        .expect("connect")
}

/// Drops `store`'s schema, and the records in it.
pub async fn drop_schema(store: &PostgresStore) {
    drop_schema_in(store.pool(), store.schema()).await;
}

/// Drops `schema` through `pool`.
pub async fn drop_schema_in(pool: &sqlx::PgPool, schema: &str) {
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(pool)
        .await
        .expect("drop schema");
}

/// Writes a row in flight by hand, as another writer (or an older version
/// of the store) would: `lease_until` and `expires_at` are SQL expressions.
pub async fn insert_in_flight(
    store: &PostgresStore,
    id: &RecordId,
    fp: &Fingerprint,
    token: LeaseToken,
    lease_until: &str,
    expires_at: &str,
) {
    sqlx::query(&format!(
        "INSERT INTO \"{}\".idempotency_records VALUES ($1, $2, $3, {lease_until}, {expires_at}, NULL)",
        store.schema()
    ))
    .bind(id.as_bytes().as_slice())
    .bind(fp.as_bytes().as_slice())
    .bind(token.to_bytes().to_vec())
    .execute(store.pool())
    .await
    .expect("insert a row in flight");
}

/// Whether `err` is the PostgreSQL store's configuration error.
pub fn is_config(err: &StoreError) -> bool {
    matches!(
        err,
        StoreError::Config {
            backend: "postgres",
            ..
        }
    )
}
