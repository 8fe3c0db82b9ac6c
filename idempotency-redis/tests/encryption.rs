//! Encryption at rest on Redis (`REDIS_URL`) and on a Redis Cluster
//! (`REDIS_CLUSTER_URL`), each skipped (saying why) when its URL is unset:
//! the conformance suite over encrypted stores (with a second instance for
//! the watch cases), the encryption cases, and what only Redis can show:
//! the value Redis holds is ciphertext, and a value changed in Redis, or
//! copied to another record's key, is `Corrupt`.

use std::time::Duration;

use idempotency_core::conformance::{Conformance, EncryptionConformance};
use idempotency_core::{
    Claim, ClaimOutcome, DecryptError, Encrypted, EncryptionKeys, Fingerprint, LeaseToken,
    RecordId, Store, StoreError, StoredOutcome, StoredResponse, TokenOutcome,
};
use idempotency_redis::RedisStore;

/// Two instances of one store: two connections to `url`, one fresh prefix.
async fn instances(url: &str) -> (RedisStore, RedisStore) {
    let prefix = format!("{}:", test_support::unique("encrypted"));
    let connect = || async {
        RedisStore::connect(url)
            .await
            .expect("redis")
            .with_prefix(prefix.clone())
    };
    (connect().await, connect().await)
}

/// The short lease of the suites: unoptimised (a test build), AES-GCM
/// takes about 250 ms a MiB, and the 1 MiB case runs beside the timing
/// cases.
const SLOW: Duration = Duration::from_secs(2);

async fn conforms(url: &str) {
    let keys = EncryptionKeys::new("k1", rand::random()).expect("key");
    let (store, peer) = instances(url).await;
    Conformance::new(Encrypted::new(store.clone(), keys.clone()))
        .short_lease(SLOW)
        .with_peer(Encrypted::new(peer, keys))
        .run_all()
        .await;
    EncryptionConformance::new(store).run_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_encrypted_redis_store_conforms() {
    let Some(url) = test_support::service_url("REDIS_URL", "an_encrypted_redis_store_conforms")
    else {
        return;
    };
    conforms(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_encrypted_redis_cluster_store_conforms() {
    let Some(url) = test_support::service_url(
        "REDIS_CLUSTER_URL",
        "an_encrypted_redis_cluster_store_conforms",
    ) else {
        return;
    };
    conforms(&url).await;
}

#[tokio::test]
async fn redis_holds_ciphertext_and_a_value_changed_or_moved_in_redis_is_corrupt() {
    let Some(url) = test_support::service_url("REDIS_URL", "redis_holds_ciphertext") else {
        return;
    };
    at_rest(&url).await;
}

#[tokio::test]
async fn a_redis_cluster_holds_ciphertext_and_a_value_changed_or_moved_is_corrupt() {
    let Some(url) =
        test_support::service_url("REDIS_CLUSTER_URL", "redis_cluster_holds_ciphertext")
    else {
        return;
    };
    at_rest(&url).await;
}

const SECRET: &[u8] = b"IBAN DE89370400440532013000";

async fn at_rest(url: &str) {
    let (store, _) = instances(url).await;
    let keys = EncryptionKeys::new("k1", rand::random()).expect("key");
    let encrypted = Encrypted::new(store.clone(), keys);
    let fp = Fingerprint::compute("POST", "/payments", None, None, b"{}");
    let claim = Claim {
        fingerprint: &fp,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(60),
    };
    let response = StoredOutcome::response(StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), "text/plain".into())],
        body: bytes::Bytes::from_static(SECRET),
    });
    let id = RecordId::from_parts(b"encrypted", &rand::random::<[u8; 16]>());
    let token = LeaseToken::random();
    assert!(matches!(
        encrypted.claim(&id, token, claim).await,
        Ok(ClaimOutcome::Acquired(_))
    ));
    assert_eq!(
        encrypted
            .complete(&id, token, &response, Duration::from_secs(60))
            .await
            .expect("complete"),
        TokenOutcome::Applied
    );

    // What Redis holds: `c`, the fingerprint, then the sealed outcome.
    let mut conn = store.connection().clone();
    let key = store.key(&id);
    let value: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("get");
    assert_eq!(&value[33..35], &[1, 3], "not a sealed outcome");
    assert!(
        !value.windows(SECRET.len()).any(|w| w == SECRET),
        "the body is in Redis in clear"
    );
    assert!(!value.windows(10).any(|w| w == b"text/plain"));
    let read = |id: RecordId| {
        let encrypted = &encrypted;
        async move {
            let fp = Fingerprint::compute("POST", "/payments", None, None, b"{}");
            let claim = Claim {
                fingerprint: &fp,
                lease: Duration::from_secs(30),
                ttl: Duration::from_secs(60),
            };
            encrypted.claim(&id, LeaseToken::random(), claim).await
        }
    };
    match read(id).await {
        Ok(ClaimOutcome::Completed { outcome, .. }) => assert_eq!(outcome, response),
        other => panic!("read back: {other:?}"),
    }

    // The value copied, as it is, to another record's key.
    let moved = RecordId::from_parts(b"encrypted", &rand::random::<[u8; 16]>());
    let _: () = redis::cmd("SET")
        .arg(store.key(&moved))
        .arg(&value)
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .expect("set");
    expect_not_authentic(read(moved).await, "moved to another key");

    // One byte of the ciphertext changed in place.
    let at = value.len() - 20;
    let _: i64 = redis::cmd("SETRANGE")
        .arg(&key)
        .arg(at)
        .arg(&[value[at] ^ 0x01][..])
        .query_async(&mut conn)
        .await
        .expect("setrange");
    expect_not_authentic(read(id).await, "changed in Redis");
}

fn expect_not_authentic(found: Result<ClaimOutcome, StoreError>, what: &str) {
    match found {
        Err(StoreError::Corrupt {
            backend: "redis",
            source,
        }) => assert!(
            matches!(
                source.downcast_ref::<DecryptError>(),
                Some(DecryptError::NotAuthentic { key_id }) if key_id == "k1"
            ),
            "{what}: {source}"
        ),
        other => panic!("{what}: expected Corrupt, got {other:?}"),
    }
}
