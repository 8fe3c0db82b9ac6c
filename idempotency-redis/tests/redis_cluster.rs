//! The Redis store on a Redis Cluster (`REDIS_CLUSTER_URL`, skipped with the
//! reason when unset):
//! - two instances (two engines, each with its own store and cluster
//!   connection) get 32 concurrent duplicates split between them: the
//!   handler runs exactly once; later retries on either replay it;
//! - two stores race on many keys spread over every master: exactly one
//!   claim acquires each.
//!
//! (That `connect` takes `redis+cluster://` URLs, and that a bad one is a
//! readable error, is in idempotency-connect's tests.)

mod cluster;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idempotency_core::{
    Decision, Idempotency, IdempotencyConfig, Inspection, LeaseToken, RecordId, Store,
};
use idempotency_redis::RedisStore;

/// What one request got: the handler's run number (fresh or replayed), or
/// the status of a refusal.
#[derive(Debug)]
enum Got {
    Ran(Bytes),
    Replayed(Bytes),
    Refused(u16),
}

/// `POST /payments` with `key` through `engine`; the handler counts its
/// runs and takes `delay`.
async fn request(engine: &Idempotency, key: &str, runs: &AtomicUsize, delay: Duration) -> Got {
    let (parts, ()) = http::Request::post("/payments")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(())
        .expect("request")
        .into_parts();
    let Inspection::Pending(pending) = engine.inspect(&parts, || None) else {
        panic!("not covered");
    };
    match engine
        .decide(pending, br#"{"amount":100,"currency":"EUR"}"#)
        .await
    {
        Decision::Execute(execution) => {
            let n = execution
                .run(async {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(delay).await;
                    n
                })
                .await;
            let body = Bytes::from(format!("{{\"run\":{n}}}"));
            let stored = execution.capture(
                201,
                [("content-type", &b"application/json"[..])].into_iter(),
                body.clone(),
            );
            execution.complete(stored).await;
            Got::Ran(body)
        }
        Decision::Replay(replay) => {
            assert_eq!(replay.status, 201);
            Got::Replayed(replay.body.clone())
        }
        Decision::Reject(problem) => Got::Refused(problem.status()),
        Decision::Unguarded => panic!("fail-closed ran a request unguarded"),
    }
}

fn engine(store: RedisStore) -> Idempotency {
    let config = IdempotencyConfig::builder()
        .lease(Duration::from_secs(10))
        .ttl(Duration::from_secs(120))
        .build()
        .expect("config");
    Idempotency::new(store, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_cluster_run_the_handler_once() {
    let Some(url) = test_support::service_url("REDIS_CLUSTER_URL", "two_instances_on_one_cluster")
    else {
        return;
    };
    let prefix = format!("{}:", test_support::unique("two"));
    let a = RedisStore::connect(&url).await.expect("cluster a");
    let b = RedisStore::connect(&url).await.expect("cluster b");
    let engines = [
        engine(a.with_prefix(&prefix)),
        engine(b.with_prefix(&prefix)),
    ];
    let runs = Arc::new(AtomicUsize::new(0));
    // Several keys, so the records land on more than one master.
    for round in 0..4 {
        let key = format!("cluster-{round}-{}", LeaseToken::random().to_hex());
        let before = runs.load(Ordering::SeqCst);
        let barrier = Arc::new(tokio::sync::Barrier::new(32));
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (engine, key) = (engines[i % 2].clone(), key.clone());
                let (runs, barrier) = (Arc::clone(&runs), Arc::clone(&barrier));
                tokio::spawn(async move {
                    barrier.wait().await;
                    request(&engine, &key, &runs, Duration::from_millis(300)).await
                })
            })
            .collect();
        let mut first = None;
        for t in tasks {
            match t.await.expect("task") {
                Got::Ran(body) => {
                    assert!(first.is_none(), "two requests ran the handler");
                    first = Some(body);
                }
                Got::Replayed(_) | Got::Refused(409) => {}
                Got::Refused(status) => panic!("unexpected {status}"),
            }
        }
        assert_eq!(
            runs.load(Ordering::SeqCst) - before,
            1,
            "the handler ran more than once"
        );
        let first = first.expect("no request ran the handler");
        for engine in &engines {
            match request(engine, &key, &runs, Duration::ZERO).await {
                Got::Replayed(body) => assert_eq!(body, first, "the replay differs"),
                other => panic!("a retry got {other:?}"),
            }
        }
        assert_eq!(runs.load(Ordering::SeqCst) - before, 1);
    }
}

/// Two stores with their own cluster connections race on 64 fresh keys at
/// once, 8 claims each: exactly one acquires each key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_race_on_many_keys_of_a_cluster() {
    let Some(url) = test_support::service_url(
        "REDIS_CLUSTER_URL",
        "two_instances_race_on_many_keys_of_a_cluster",
    ) else {
        return;
    };
    let prefix = format!("{}:", test_support::unique("race"));
    let stores: [Arc<dyn Store>; 2] = [
        Arc::new(
            RedisStore::connect(&url)
                .await
                .expect("a")
                .with_prefix(&prefix),
        ),
        Arc::new(
            RedisStore::connect(&url)
                .await
                .expect("b")
                .with_prefix(&prefix),
        ),
    ];
    let ids: Vec<RecordId> = (0..64)
        .map(|_| RecordId::from_parts(b"race", &rand::random::<[u8; 16]>()))
        .collect();
    let acquired = test_support::records::race(&stores, &ids, 8).await;
    for id in &ids {
        assert_eq!(acquired[id], 1, "{id:?}");
    }
    // The keys spread over more than one master.
    let seeds = cluster::seeds(&url);
    let mut admin = cluster::node(&seeds[0]).await;
    let probe = RedisStore::connect(&url)
        .await
        .expect("probe")
        .with_prefix(&prefix);
    let mut masters = std::collections::HashSet::new();
    for id in &ids {
        let slot = cluster::keyslot(&mut admin, &probe.key(id)).await;
        if let Some(m) = cluster::master_of(&mut admin, slot).await {
            masters.insert(m.id);
        }
    }
    assert!(masters.len() > 1, "every key on one master: {masters:?}");
}
