//! A record survives a process restart: a child process (this test binary,
//! re-run) claims and completes a record and exits; the parent opens a new
//! store and must replay it byte for byte (`test_support::restart`). Redis
//! when `REDIS_URL` is set.

use std::sync::Arc;

use idempotency_core::Store;
use idempotency_redis::RedisStore;
use test_support::restart::{child_writes_a_record, survives_a_process_restart};

async fn open(backend: String, url: String, namespace: String) -> Arc<dyn Store> {
    assert_eq!(backend, "redis", "unknown backend {backend}");
    Arc::new(
        RedisStore::connect(&url)
            .await
            .expect("redis")
            .with_prefix(namespace),
    )
}

/// Run by the parent as a child process: claims and completes one record.
#[tokio::test]
#[ignore = "run as a child process by survives_a_process_restart"]
async fn restart_child_writes_a_record() {
    child_writes_a_record(open).await;
}

#[tokio::test]
async fn redis_records_survive_a_process_restart() {
    let Some(url) =
        test_support::service_url("REDIS_URL", "redis_records_survive_a_process_restart")
    else {
        return;
    };
    let namespace = format!("{}:", test_support::unique("restart"));
    survives_a_process_restart("redis", &url, &namespace, open).await;
}
