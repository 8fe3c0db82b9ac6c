//! Counts the store's round trips on the wire, through a TCP proxy: a fresh
//! request (claim + complete) costs 2 statements, a replay 1, on
//! PostgreSQL. Reads `DATABASE_URL` at run time; skips when unset. (Redis's:
//! in idempotency-redis's tests.)
#![cfg(feature = "postgres")]

mod pg;

use std::str::FromStr;
use std::time::Duration;

use idempotency_sqlx::postgres::{PostgresOptions, PostgresStore};
use sqlx::postgres::PgConnectOptions;
use test_support::records::{fresh, replay};
use test_support::CountingProxy;

#[tokio::test]
async fn postgres_fresh_is_two_statements_and_replay_one() {
    let Some(url) = test_support::service_url("DATABASE_URL", "postgres_fresh_is_two_statements")
    else {
        return;
    };
    let options = PgConnectOptions::from_str(&url).expect("DATABASE_URL");
    let upstream = format!("{}:{}", options.get_host(), options.get_port());
    let proxy = CountingProxy::start(upstream, true).await;
    // Through the proxy, in plain text so that it can read the protocol
    // (trust authentication: the proxy URL carries no password).
    let proxied = format!(
        "postgres://{}@127.0.0.1:{}/{}?sslmode=disable",
        options.get_username(),
        proxy.port,
        options.get_database().unwrap_or("postgres"),
    );
    let store = PostgresStore::connect_with(
        &proxied,
        PostgresOptions::new()
            .schema(test_support::unique("idem_rt"))
            .max_connections(1),
    )
    .await
    .expect("connect through the proxy");
    // Warm up: the connection prepares each statement once.
    let id = fresh(&store).await;
    replay(&store, &id).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..5 {
        let [_, e0, q0, p0, f0] = proxy.counts.snapshot();
        let id = fresh(&store).await;
        let [_, e1, q1, _, f1] = proxy.counts.snapshot();
        replay(&store, &id).await;
        let [_, e2, q2, p2, f2] = proxy.counts.snapshot();
        assert_eq!(
            (e1 - e0, q1 - q0),
            (2, 0),
            "fresh request: statements (Execute, Query)"
        );
        assert_eq!(f1 - f0, 2, "fresh request: round trips that run statements");
        assert_eq!(
            (e2 - e1, q2 - q1),
            (1, 0),
            "replay: statements (Execute, Query)"
        );
        assert_eq!(f2 - f1, 1, "replay: round trips that run statements");
        assert_eq!(p2 - p0, 0, "no statement is prepared again");
    }
    let [flights, ..] = proxy.counts.snapshot();
    eprintln!("(all flights on the wire, including the pool's background Sync checks: {flights})");
    pg::drop_schema(&store).await;
}
