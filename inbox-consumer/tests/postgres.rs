//! Transactional mode on PostgreSQL (`DATABASE_URL`), in process.
#![cfg(feature = "postgres")]

#[macro_use]
mod common;

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

async fn setup(test: &str) -> Option<(PgPool, common::PgTable)> {
    let url = common::service_url("DATABASE_URL", test)?;
    let pool = PgPoolOptions::new()
        .max_connections(6)
        .connect(&url)
        .await
        .expect("DATABASE_URL is set but PostgreSQL does not answer");
    let columns = "account TEXT NOT NULL, amount BIGINT NOT NULL, message_id TEXT NOT NULL";
    let table = common::PgTable::create(&pool, &url, columns).await;
    Some((pool, table))
}

async fn age(pool: &PgPool, consumer: &str, days: i32) {
    sqlx::query(
        "UPDATE inbox_consumer.messages SET processed_at = now() - make_interval(days => $2) \
         WHERE consumer = $1",
    )
    .bind(consumer)
    .bind(days)
    .execute(pool)
    .await
    .unwrap();
}

transactional_cases! {
    db = sqlx::Postgres,
    setup = setup,
    new = inbox_consumer::Inbox::postgres,
    insert = "INSERT INTO {} (account, amount, message_id) VALUES ($1, $2, $3)",
    count = "SELECT COUNT(*) FROM {} WHERE message_id = $1",
    age = age,
}

#[tokio::test]
async fn migrations_run_concurrently_and_twice() {
    let Some((pool, _)) = setup("migrations_run_concurrently_and_twice").await else {
        return;
    };
    let runs = (0..4).map(|_| inbox_consumer::migrate_postgres(&pool));
    for r in futures_util::future::join_all(runs).await {
        r.unwrap();
    }
}
