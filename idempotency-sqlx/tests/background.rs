//! What a SQL store does by itself: a store made by `connect_with` purges
//! its expired records in the background (no `spawn_purger` call), and the
//! task ends when the store is dropped; and a pool whose connections are
//! all in use is reported as exhausted, not as a timeout or an outage.
//! SQLite always; PostgreSQL when `DATABASE_URL` is set.
#![cfg(all(feature = "sqlite", feature = "postgres"))]

mod pg;

use std::time::Duration;

use idempotency_core::{
    Claim, ClaimOutcome, Fingerprint, LeaseToken, RecordId, Store, StoreError, StoredOutcome,
    StoredResponse, TokenOutcome,
};
use idempotency_sqlx::postgres::{PostgresOptions, PostgresStore};
use idempotency_sqlx::sqlite::{SqliteOptions, SqliteStore};
use test_support::{eventually, service_url, unique, TempDb};

const EVERY: Duration = Duration::from_millis(50);

fn claim_of(ttl: Duration) -> (Fingerprint, Duration) {
    (Fingerprint::compute("POST", "/bg", None, None, b"x"), ttl)
}

/// A record completed with a ttl of 1 ms: expired at once.
async fn expired_record(store: &dyn Store) {
    let id = RecordId::from_parts(b"background", &rand::random::<[u8; 16]>());
    let (fingerprint, ttl) = claim_of(Duration::from_secs(60));
    let claim = Claim {
        fingerprint: &fingerprint,
        lease: Duration::from_secs(30),
        ttl,
    };
    let Ok(ClaimOutcome::Acquired(token)) = store.claim(&id, LeaseToken::random(), claim).await
    else {
        panic!("claim not acquired")
    };
    let outcome = StoredOutcome::response(StoredResponse {
        status: 201,
        headers: vec![],
        body: bytes::Bytes::from_static(b"{}"),
    });
    let done = store
        .complete(&id, token, &outcome, Duration::from_millis(1))
        .await;
    assert_eq!(done.expect("complete"), TokenOutcome::Applied);
}

async fn rows_sqlite(pool: &sqlx::SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM idempotency_records")
        .fetch_one(pool)
        .await
        .expect("count")
}

async fn rows_postgres(pool: &sqlx::PgPool, schema: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{schema}\".idempotency_records"
    ))
    .fetch_one(pool)
    .await
    .expect("count")
}

#[tokio::test]
async fn sqlite_store_from_connect_with_purges_by_itself_until_dropped() {
    let file = TempDb::new("bg_purge");
    let store = SqliteStore::connect_with(&file.url(), SqliteOptions::new().purge_every(EVERY))
        .await
        .expect("open");
    assert!(store.purges_in_background());
    // Another instance on the same file that never purges: it writes and counts.
    let other =
        SqliteStore::connect_with(&file.url(), SqliteOptions::new().purge_in_background(false))
            .await
            .expect("open");
    assert!(!other.purges_in_background());
    for _ in 0..3 {
        expired_record(&other).await;
    }
    assert_eq!(rows_sqlite(other.pool()).await, 3);
    eventually("the store purges its expired records by itself", || async {
        rows_sqlite(other.pool()).await == 0
    })
    .await;
    // A clone keeps the task; dropping every clone ends it.
    let clone = store.clone();
    drop(store);
    expired_record(&other).await;
    eventually("a clone still purges", || async {
        rows_sqlite(other.pool()).await == 0
    })
    .await;
    drop(clone);
    expired_record(&other).await;
    tokio::time::sleep(EVERY * 10).await;
    assert_eq!(
        rows_sqlite(other.pool()).await,
        1,
        "the purge task ended with the store"
    );
}

#[tokio::test]
async fn postgres_store_from_connect_with_purges_by_itself_until_dropped() {
    let test = "postgres_store_from_connect_with_purges_by_itself_until_dropped";
    let Some(url) = service_url("DATABASE_URL", test) else {
        return;
    };
    let schema = unique("idem_bg");
    let options = PostgresOptions::new().schema(&schema);
    let store = PostgresStore::connect_with(&url, options.clone().purge_every(EVERY))
        .await
        .expect("connect");
    assert!(store.purges_in_background());
    let other = PostgresStore::connect_with(&url, options.purge_in_background(false))
        .await
        .expect("connect");
    assert!(!other.purges_in_background());
    for _ in 0..3 {
        expired_record(&other).await;
    }
    eventually("the store purges its expired records by itself", || async {
        rows_postgres(other.pool(), &schema).await == 0
    })
    .await;
    drop(store);
    expired_record(&other).await;
    tokio::time::sleep(EVERY * 10).await;
    assert_eq!(
        rows_postgres(other.pool(), &schema).await,
        1,
        "the purge task ended with the store"
    );
    pg::drop_schema(&other).await;
}

#[tokio::test]
async fn connect_purges_every_minute_by_default() {
    let file = TempDb::new("bg_default");
    let store = SqliteStore::connect(&file.url()).await.expect("open");
    assert!(store.purges_in_background(), "connect purges");
    let pool = sqlx::SqlitePool::connect(&file.url()).await.expect("pool");
    let from_pool = SqliteStore::from_pool(pool);
    assert!(
        !from_pool.purges_in_background(),
        "a pool of yours does not"
    );
    assert_eq!(
        idempotency_sqlx::DEFAULT_PURGE_EVERY,
        Duration::from_secs(60)
    );
    assert_eq!(idempotency_sqlx::DEFAULT_PURGE_BATCH, 1000);
}

/// A claim through `store` while the test holds every connection of its pool.
async fn claim_while_held(store: &dyn Store) -> Result<ClaimOutcome, StoreError> {
    let id = RecordId::from_parts(b"exhausted", &rand::random::<[u8; 16]>());
    let (fingerprint, ttl) = claim_of(Duration::from_secs(60));
    let claim = Claim {
        fingerprint: &fingerprint,
        lease: Duration::from_secs(30),
        ttl,
    };
    store.claim(&id, LeaseToken::random(), claim).await
}

fn assert_exhausted(err: &StoreError, backend: &str, connections: u32) {
    assert!(
        matches!(err, StoreError::PoolExhausted { backend: b, connections: n } if *b == backend && *n == connections),
        "{err:?}"
    );
    let text = err.to_string();
    let plural = if connections == 1 { "" } else { "s" };
    assert!(
        text.contains(&format!(
            "pool exhausted ({connections} connection{plural})"
        )),
        "{text}"
    );
    assert!(!text.contains("did not answer"), "{text}");
}

#[tokio::test]
async fn sqlite_exhausted_pool_says_so() {
    let file = TempDb::new("bg_exhausted");
    let options = SqliteOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_millis(200));
    let store = SqliteStore::connect_with(&file.url(), options)
        .await
        .expect("open");
    let held = store.pool().acquire().await.expect("the one connection");
    let err = claim_while_held(&store).await.expect_err("no connection");
    assert_exhausted(&err, "sqlite", 1);
    drop(held);
    claim_while_held(&store).await.expect("a connection again");
}

#[tokio::test]
async fn postgres_exhausted_pool_says_so() {
    let test = "postgres_exhausted_pool_says_so";
    let Some(url) = service_url("DATABASE_URL", test) else {
        return;
    };
    let options = PostgresOptions::new()
        .schema(unique("idem_exhausted"))
        .max_connections(3)
        .acquire_timeout(Duration::from_millis(200));
    let store = PostgresStore::connect_with(&url, options)
        .await
        .expect("connect");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(store.pool().acquire().await.expect("a connection"));
    }
    let err = claim_while_held(&store).await.expect_err("no connection");
    assert_exhausted(&err, "postgres", 3);
    drop(held);
    pg::drop_schema(&store).await;
}

/// A database that refuses connections also makes sqlx time out waiting
/// for one; that is an outage, not an exhausted pool.
#[tokio::test]
async fn a_database_that_refuses_connections_is_not_an_exhausted_pool() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy(&format!("postgres://postgres@127.0.0.1:{port}/none"))
        .expect("a lazy pool");
    let store = PostgresStore::from_pool(pool, "idem_refused").expect("store");
    let err = claim_while_held(&store).await.expect_err("nothing listens");
    assert!(matches!(err, StoreError::Backend { .. }), "{err:?}");
}
