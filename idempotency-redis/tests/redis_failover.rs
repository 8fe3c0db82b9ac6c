//! A Redis Cluster master dies mid-run (SIGKILL) while requests go through
//! the engine (fail-closed, the default): requests for its slots get 503 and
//! never run the handler without a claim, until the cluster promotes its
//! replica; then they succeed again through the same store, with no restart.
//! Records replicated before the kill replay after it.
//!
//! The test starts a private cluster of its own (six redis-server processes,
//! `cluster-node-timeout` 2 s), so killing a node disturbs no other test. It
//! runs where `REDIS_CLUSTER_URL` is set (the CI signal that cluster tests
//! are wanted) and redis-server is installed; otherwise it says why it skips.

mod cluster;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use idempotency_core::{
    Decision, Idempotency, IdempotencyConfig, LeaseToken, RecordId, Scope, Store,
};
use idempotency_redis::RedisStore;
use test_support::Hooked;

/// What one request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Got {
    /// The handler ran (201).
    Executed,
    /// The stored response (201, replayed).
    Replayed,
    /// 503, with Retry-After.
    Unavailable,
    /// 409: in flight (a claim whose answer was lost, then retried).
    Conflict,
}

/// One `POST /payments` with `key` through the engine; the handler counts
/// its runs.
async fn request(engine: &Idempotency, key: &str, runs: &AtomicUsize) -> Got {
    match test_support::decide(engine, key).await {
        Decision::Execute(execution) => {
            let n = execution
                .run(async { runs.fetch_add(1, Ordering::SeqCst) + 1 })
                .await;
            let stored = execution.capture(
                201,
                [("content-type", &b"application/json"[..])].into_iter(),
                Bytes::from(format!("{{\"run\":{n}}}")),
            );
            execution.complete(stored).await;
            Got::Executed
        }
        Decision::Replay(replay) => {
            assert_eq!(replay.status, 201);
            Got::Replayed
        }
        Decision::Reject(problem) if problem.status() == 503 => {
            assert!(
                problem.retry_after_secs().is_some(),
                "503 without Retry-After"
            );
            Got::Unavailable
        }
        Decision::Reject(problem) if problem.status() == 409 => Got::Conflict,
        Decision::Reject(problem) => {
            panic!("unexpected {}: {}", problem.status(), problem.detail())
        }
        Decision::Unguarded => panic!("fail-closed ran a request unguarded"),
    }
}

fn record_id(key: &str) -> RecordId {
    RecordId::from_parts(Scope::GLOBAL.as_bytes(), key.as_bytes())
}

/// Request keys whose records live on the master on `port`.
async fn keys_on(
    admin: &mut redis::aio::MultiplexedConnection,
    store: &RedisStore,
    port: u16,
    n: usize,
    tag: &str,
) -> Vec<String> {
    let master = cluster::nodes(admin)
        .await
        .into_iter()
        .find(|n| n.port == port && n.master)
        .expect("the master");
    let mut keys = Vec::new();
    while keys.len() < n {
        let key = format!("{tag}-{}", LeaseToken::random().to_hex());
        if master.serves(cluster::keyslot(admin, &store.key(&record_id(&key))).await) {
            keys.push(key);
        }
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_dies_503_until_its_replica_is_promoted_then_recovery_without_restart() {
    let test = "redis_failover";
    if test_support::service_url("REDIS_CLUSTER_URL", test).is_none() {
        return;
    }
    let Some(mut private) = cluster::PrivateCluster::start(test, Duration::from_millis(2000))
    else {
        return;
    };
    // A short bound, well under the node timeout: calls to the dead master
    // fail (503) rather than wait out the failover.
    let bound = Duration::from_millis(1000);
    let redis = RedisStore::connect_with_timeout(&private.url(), bound)
        .await
        .expect("connect the private cluster")
        .with_prefix("failover:");
    let store = Arc::new(Hooked::new(redis.clone()));
    let config = IdempotencyConfig::builder()
        .lease(Duration::from_secs(10))
        .ttl(Duration::from_secs(300))
        .store_timeout(bound)
        .build()
        .expect("config");
    let engine = Idempotency::from_arc(Arc::clone(&store) as Arc<dyn Store>, config);

    // The victim: the master of a chosen record's slot.
    let seed = format!("127.0.0.1:{}", private.ports[0]);
    let mut admin = cluster::node(&seed).await;
    let chosen = "chosen-record";
    let slot = cluster::keyslot(&mut admin, &redis.key(&record_id(chosen))).await;
    let victim = cluster::master_of(&mut admin, slot)
        .await
        .expect("a master for the chosen slot");
    let replica = cluster::nodes(&mut admin)
        .await
        .into_iter()
        .find(|n| n.replica_of.as_deref() == Some(victim.id.as_str()))
        .expect("the victim's replica");
    // Survivors to ask about the cluster once the victim is gone.
    let survivor = private
        .ports
        .iter()
        .copied()
        .find(|&p| p != victim.port && p != replica.port)
        .expect("a survivor");
    let mut admin = cluster::node(&format!("127.0.0.1:{survivor}")).await;

    // Before the kill: the chosen record and a few more complete, and reach
    // the replica (WAIT on the victim), so they must replay after the failover.
    let runs = Arc::new(AtomicUsize::new(0));
    let mut before = keys_on(&mut admin, &redis, victim.port, 10, "before").await;
    before.push(chosen.to_owned());
    for key in &before {
        assert_eq!(request(&engine, key, &runs).await, Got::Executed, "{key}");
    }
    let mut on_victim = cluster::node(&victim.addr).await;
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut on_victim)
        .await
        .expect("wait");
    assert_eq!(acked, 1, "the replica did not acknowledge the writes");
    drop(on_victim);

    // Fresh keys for the victim's slots, sent by workers that run throughout.
    let pool = Arc::new(Mutex::new(
        keys_on(&mut admin, &redis, victim.port, 1500, "during").await,
    ));
    let killed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    // (the kill came before the request started, before it ended, its answer)
    let log: Arc<Mutex<Vec<(bool, bool, Got)>>> = Arc::default();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (engine, runs, pool) = (engine.clone(), Arc::clone(&runs), Arc::clone(&pool));
            let (killed, stop, log) = (Arc::clone(&killed), Arc::clone(&stop), Arc::clone(&log));
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let Some(key) = pool.lock().unwrap().pop() else {
                        break;
                    };
                    let started_after = killed.load(Ordering::SeqCst);
                    let got = request(&engine, &key, &runs).await;
                    let ended_after = killed.load(Ordering::SeqCst);
                    log.lock().unwrap().push((started_after, ended_after, got));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    // Let a few requests through, then kill the master mid-run.
    while log.lock().unwrap().len() < 8 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    killed.store(true, Ordering::SeqCst);
    private.kill(victim.port);
    let killed_at = Instant::now();

    // Wait (a liveness bound, not a speed assertion) until requests for the
    // victim's slots succeed again after a 503.
    let deadline = killed_at + Duration::from_secs(60);
    let (first_503, recovered) = loop {
        {
            let log = log.lock().unwrap();
            let after: Vec<Got> = log
                .iter()
                .filter(|(k, _, _)| *k)
                .map(|(_, _, g)| *g)
                .collect();
            let first_503 = after.iter().position(|g| *g == Got::Unavailable);
            if let Some(i) = first_503 {
                let ok_after = after[i..].iter().filter(|g| **g == Got::Executed).count();
                if ok_after >= 10 {
                    break (i, ok_after);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "requests for the dead master's slots did not recover within 60 s: {:?}",
            summary(&log.lock().unwrap())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let recovered_after = killed_at.elapsed();
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.expect("worker");
    }

    // The replica is the slot's master now.
    let promoted = cluster::master_of(&mut admin, slot)
        .await
        .expect("a master for the slot after the failover");
    assert_eq!(
        promoted.id, replica.id,
        "the slot's master is not the replica"
    );

    let log = log.lock().unwrap().clone();
    let counts = summary(&log);
    eprintln!(
        "failover: {counts:?}; first 503 was request {first_503} after the kill; {recovered} executed after it; recovered {recovered_after:?} after the kill"
    );
    // Every request that ended before the kill ran; fail-closed answered
    // 503 (never ran the handler unguarded) while the master was gone.
    assert!(log
        .iter()
        .filter(|(_, ended_after, _)| !*ended_after)
        .all(|(_, _, g)| *g == Got::Executed));
    assert!(counts.get(&Got::Unavailable).copied().unwrap_or(0) >= 1);
    assert_eq!(
        counts.get(&Got::Replayed).copied().unwrap_or(0),
        0,
        "a fresh key was replayed"
    );
    // The handler ran exactly once per acquired claim, and once per
    // request that was executed: never without a claim.
    let executed = counts.get(&Got::Executed).copied().unwrap_or(0) + before.len();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        executed,
        "handler runs vs executed requests"
    );
    assert_eq!(
        usize::try_from(store.acquired()).expect("a count"),
        executed,
        "acquired claims vs handler runs"
    );

    // What completed and replicated before the kill replays after it, on
    // the same store: the handler does not run again.
    let runs_before = runs.load(Ordering::SeqCst);
    for key in &before {
        assert_eq!(request(&engine, key, &runs).await, Got::Replayed, "{key}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), runs_before);
}

fn summary(log: &[(bool, bool, Got)]) -> HashMap<Got, usize> {
    let mut counts = HashMap::new();
    for (_, _, got) in log {
        *counts.entry(*got).or_default() += 1;
    }
    counts
}
