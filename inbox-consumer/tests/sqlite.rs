//! Transactional mode on SQLite (a temporary file; always runs).
#![cfg(feature = "sqlite")]

#[macro_use]
mod common;

use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::SqlitePool;

async fn setup(_test: &str) -> Option<(SqlitePool, String)> {
    let path = std::env::temp_dir().join(format!("{}.db", common::unique("inbox")));
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(2));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    let table = common::unique("ledger");
    sqlx::query(&format!(
        "CREATE TABLE {table} (account TEXT NOT NULL, amount INTEGER NOT NULL, message_id TEXT NOT NULL)"
    ))
    .execute(&pool)
    .await
    .unwrap();
    Some((pool, table))
}

async fn age(pool: &SqlitePool, consumer: &str, days: i64) {
    sqlx::query(
        "UPDATE inbox_consumer_messages SET processed_at = processed_at - ?2 * 86400000 \
         WHERE consumer = ?1",
    )
    .bind(consumer)
    .bind(days)
    .execute(pool)
    .await
    .unwrap();
}

transactional_cases! {
    db = sqlx::Sqlite,
    setup = setup,
    new = inbox_consumer::Inbox::sqlite,
    insert = "INSERT INTO {} (account, amount, message_id) VALUES (?1, ?2, ?3)",
    count = "SELECT COUNT(*) FROM {} WHERE message_id = ?1",
    age = age,
}
