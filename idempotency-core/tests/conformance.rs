//! The store conformance suite against every backend. Redis, Redis Cluster
//! and PostgreSQL read `REDIS_URL`, `REDIS_CLUSTER_URL` and `DATABASE_URL` at
//! run time and skip (saying why) when they are unset.
#![cfg(feature = "test-util")]

#[cfg(feature = "redis")]
mod cluster;
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

/// The same suite on a Redis Cluster (`REDIS_CLUSTER_URL`): records spread
/// over every master.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_conforms() {
    use idempotency_core::store::redis::RedisStore;
    let Some(url) = cluster::cluster_url("redis_cluster_conforms") else {
        return;
    };
    let store = RedisStore::connect(&url)
        .await
        .expect("redis cluster")
        .with_prefix(format!("{}:", common::unique("conformance")));
    assert!(store.is_cluster());
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

/// A key this store did not write (another value type, or a string in no
/// record layout) is reported by every operation and left as it was.
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_reports_foreign_keys_and_never_overwrites_them() {
    let Some(url) = common::service_url("REDIS_URL", "redis_reports_foreign_keys") else {
        return;
    };
    foreign_keys(&url).await;
}

/// The same on a Redis Cluster.
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_cluster_reports_foreign_keys_and_never_overwrites_them() {
    let Some(url) = cluster::cluster_url("redis_cluster_reports_foreign_keys") else {
        return;
    };
    foreign_keys(&url).await;
}

#[cfg(feature = "redis")]
async fn foreign_keys(url: &str) {
    use std::time::Duration;

    use idempotency_core::store::redis::RedisStore;
    use idempotency_core::{
        Claim, Fingerprint, LeaseToken, RecordId, Store, StoreError, StoredOutcome,
    };
    let store = RedisStore::connect(url)
        .await
        .expect("redis")
        .with_prefix(format!("{}:", common::unique("foreign")));
    let mut conn = store.connection().clone();
    let fingerprint = Fingerprint::compute("POST", "/p", None, None, b"{}");
    let token = LeaseToken::random();
    type Plant = fn(&str) -> redis::Cmd;
    let plants: [(&str, Plant); 3] = [
        ("hash", |key| {
            redis::cmd("HSET").arg(key).arg("s").arg("c").clone()
        }),
        ("garbage", |key| {
            redis::cmd("SET").arg(key).arg("zzz").clone()
        }),
        ("short in-flight", |key| {
            redis::cmd("SET").arg(key).arg("i123").clone()
        }),
    ];
    for (name, plant) in plants {
        let id = RecordId::from_parts(b"foreign", name.as_bytes());
        let key = store.key(&id);
        let _: () = plant(&key).query_async(&mut conn).await.expect("plant");
        let dump = |conn: &mut idempotency_core::store::redis::RedisConnection| {
            let mut conn = conn.clone();
            let key = key.clone();
            async move {
                let v: Vec<u8> = redis::cmd("DUMP")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .expect("dump");
                v
            }
        };
        let before = dump(&mut conn).await;
        let claim = store
            .claim(
                &id,
                token,
                Claim {
                    fingerprint: &fingerprint,
                    lease: Duration::from_secs(30),
                    ttl: Duration::from_secs(60),
                },
            )
            .await;
        assert!(
            matches!(
                claim,
                Err(StoreError::Corrupt { .. } | StoreError::Backend { .. })
            ),
            "{name}: claim accepted a foreign key: {claim:?}"
        );
        let outcome = StoredOutcome::NotReplayable { status: 201 };
        let complete = store
            .complete(&id, token, &outcome, Duration::from_secs(60))
            .await;
        let release = store.release(&id, token).await;
        let extend = store.extend(&id, token, Duration::from_secs(1)).await;
        for (op, result) in [
            ("complete", complete),
            ("release", release),
            ("extend", extend),
        ] {
            assert!(
                !matches!(result, Ok(idempotency_core::TokenOutcome::Applied)),
                "{name}: {op} applied to a foreign key"
            );
        }
        assert_eq!(dump(&mut conn).await, before, "{name}: the key changed");
        let _: () = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("del");
    }
}
