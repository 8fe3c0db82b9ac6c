//! `connect` takes `redis+cluster://` URLs (a Redis Cluster at
//! `REDIS_CLUSTER_URL`, skipped with the reason when unset), and a bad one
//! is a readable error (no cluster needed for that one).
#![cfg(feature = "redis")]

use std::time::Duration;

use idempotency_connect::{connect, ConnectError};
use idempotency_core::{Claim, ClaimOutcome, Fingerprint, LeaseToken, RecordId, StoreError};

/// `connect` takes a cluster URL (the examples' `--store`).
#[tokio::test]
async fn connect_takes_a_cluster_url() {
    let Some(url) = test_support::service_url("REDIS_CLUSTER_URL", "connect_takes_a_cluster_url")
    else {
        return;
    };
    let store = connect(&url).await.expect("connect");
    assert_eq!(store.backend(), "redis");
    let id = RecordId::from_parts(b"connect", &rand::random::<[u8; 16]>());
    let fp = Fingerprint::compute("POST", "/c", None, None, b"");
    let claim = Claim {
        fingerprint: &fp,
        lease: Duration::from_secs(1),
        ttl: Duration::from_secs(1),
    };
    let outcome = store.claim(&id, LeaseToken::random(), claim).await;
    assert!(
        matches!(outcome, Ok(ClaimOutcome::Acquired(_))),
        "{outcome:?}"
    );
}

/// A cluster URL without a usable node list is a readable error: the
/// message says what is wrong and the form to write, and hides passwords.
#[tokio::test]
async fn a_bad_cluster_url_is_a_readable_error() {
    for (url, says) in [
        ("redis+cluster://", "names no node"),
        ("redis+cluster://user:hunter2@", "names no node"),
        ("redis+cluster://127.0.0.1:7000,,127.0.0.1:7001", "is empty"),
        ("redis+cluster://user:hunter2@127.0.0.1:port", "bad port"),
    ] {
        let err = connect(url).await.err().expect(url);
        let ConnectError::Store {
            backend: "redis",
            source: ref store @ StoreError::Config { .. },
        } = err
        else {
            panic!("{url}: {err}");
        };
        let chain = format!(
            "{err}: {store}: {}",
            std::error::Error::source(store).expect("a cause")
        );
        assert!(chain.contains(says), "{url}: {chain}");
        assert!(chain.contains("redis+cluster://HOST:PORT"), "{chain}");
        assert!(!chain.contains("hunter2"), "{chain}");
    }
    // Nothing listens: a typed error, not a hang or a panic.
    let err = connect("redis+cluster://127.0.0.1:1")
        .await
        .err()
        .expect("nothing listens on port 1");
    assert!(
        matches!(
            err,
            ConnectError::Store {
                source: StoreError::Backend { .. },
                ..
            }
        ),
        "{err}"
    );
    // And the unknown-scheme message lists the cluster scheme.
    let err = connect("cluster://x").await.err().expect("unknown");
    assert!(err.to_string().contains("redis+cluster://"), "{err}");
}
