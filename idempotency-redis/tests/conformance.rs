//! The store conformance suite on Redis (`REDIS_URL`) and on a Redis
//! Cluster (`REDIS_CLUSTER_URL`), each with a second instance (another
//! connection, the same prefix) for the watch cases; each skips (saying
//! why) when its URL is unset. And what only Redis can meet: keys this store
//! did not write.

use idempotency_core::conformance::Conformance;
use idempotency_redis::RedisStore;

/// Two instances of one store: two connections to `url`, one fresh prefix.
async fn instances(url: &str) -> (RedisStore, RedisStore) {
    let prefix = format!("{}:", test_support::unique("conformance"));
    let connect = || async {
        RedisStore::connect(url)
            .await
            .expect("redis")
            .with_prefix(prefix.clone())
    };
    (connect().await, connect().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_conforms() {
    let Some(url) = test_support::service_url("REDIS_URL", "redis_conforms") else {
        return;
    };
    let (store, peer) = instances(&url).await;
    Conformance::new(store).with_peer(peer).run_all().await;
}

/// The same suite on a Redis Cluster (`REDIS_CLUSTER_URL`): records spread
/// over every master.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_conforms() {
    let Some(url) = test_support::service_url("REDIS_CLUSTER_URL", "redis_cluster_conforms") else {
        return;
    };
    let (store, peer) = instances(&url).await;
    assert!(store.is_cluster());
    Conformance::new(store).with_peer(peer).run_all().await;
}

/// A key this store did not write (another value type, or a string in no
/// record layout) is reported by every operation and left as it was.
#[tokio::test]
async fn redis_reports_foreign_keys_and_never_overwrites_them() {
    let Some(url) = test_support::service_url("REDIS_URL", "redis_reports_foreign_keys") else {
        return;
    };
    foreign_keys(&url).await;
}

/// The same on a Redis Cluster.
#[tokio::test]
async fn redis_cluster_reports_foreign_keys_and_never_overwrites_them() {
    let Some(url) =
        test_support::service_url("REDIS_CLUSTER_URL", "redis_cluster_reports_foreign_keys")
    else {
        return;
    };
    foreign_keys(&url).await;
}

async fn foreign_keys(url: &str) {
    use std::time::Duration;

    use idempotency_core::{
        Claim, Fingerprint, LeaseToken, RecordId, Store, StoreError, StoredOutcome,
    };
    let store = RedisStore::connect(url)
        .await
        .expect("redis")
        .with_prefix(format!("{}:", test_support::unique("foreign")));
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
        let dump = |conn: &mut idempotency_redis::RedisConnection| {
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
