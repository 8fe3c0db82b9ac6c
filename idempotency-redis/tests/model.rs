//! The model-based property test of the store contract (DESIGN section 3)
//! on Redis (`REDIS_URL`) and on a Redis Cluster (`REDIS_CLUSTER_URL`); each
//! skips, saying why, when its URL is unset. The model and the machinery are
//! `test_support::model`'s: Redis keeps its own clock, so an advance really
//! waits, and the sequences are short and their times coarse.

use idempotency_redis::RedisStore;
use test_support::model::{check_real, runtime, REAL_CASES};

/// Runs the property on a store with a fresh prefix on `url` (a Redis
/// Cluster's when `cluster`).
fn follows_the_model(url: &str, cluster: bool) {
    let rt = runtime();
    let store = rt
        .block_on(RedisStore::connect(url))
        .expect("redis")
        .with_prefix(format!("{}:", test_support::unique("model")));
    if cluster {
        assert!(store.is_cluster());
    }
    check_real(&store, &rt, REAL_CASES);
}

#[test]
fn redis_store_follows_the_model() {
    if let Some(url) = test_support::service_url("REDIS_URL", "redis_store_follows_the_model") {
        follows_the_model(&url, false);
    }
}

/// The same on a Redis Cluster (`REDIS_CLUSTER_URL`).
#[test]
fn redis_cluster_store_follows_the_model() {
    let test = "redis_cluster_store_follows_the_model";
    if let Some(url) = test_support::service_url("REDIS_CLUSTER_URL", test) {
        follows_the_model(&url, true);
    }
}
