//! Redis goes away mid-run and comes back on the same port: calls fail with
//! a typed StoreError (never hang, never panic), and succeed again without
//! recreating the store. Uses a private `redis-server` it starts and kills.

use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotency_core::{
    Claim, ClaimOutcome, Fingerprint, Guarded, LeaseToken, RecordId, Store, StoreError,
};
use idempotency_redis::RedisStore;

fn fresh() -> (RecordId, Fingerprint) {
    (
        RecordId::from_parts(b"outage", &rand::random::<[u8; 16]>()),
        Fingerprint::compute("POST", "/outage", None, None, b""),
    )
}

fn lease(fingerprint: &Fingerprint) -> Claim<'_> {
    Claim {
        fingerprint,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(60),
    }
}

async fn claim(store: &RedisStore) -> Result<ClaimOutcome, StoreError> {
    let (id, fp) = fresh();
    store.claim(&id, LeaseToken::random(), lease(&fp)).await
}

/// A claim through `Guarded`, as the middleware and the inbox make it.
async fn guarded_claim(guarded: &Guarded) -> Result<ClaimOutcome, StoreError> {
    let (id, fp) = fresh();
    guarded.claim(&id, LeaseToken::random(), lease(&fp)).await
}

/// Whether `result` is the Redis store's own timeout after `bound`.
fn timed_out(result: &Result<ClaimOutcome, StoreError>, bound: Duration) -> bool {
    matches!(
        result,
        Err(StoreError::Timeout {
            backend: "redis",
            timeout
        }) if *timeout == bound
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_typed_and_recovers_without_a_new_store() {
    let Some(mut server) = test_support::RedisServer::start("redis_outage") else {
        return;
    };
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    assert!(matches!(claim(&store).await, Ok(ClaimOutcome::Acquired(_))));

    server.kill();
    // Every call during the outage fails by itself, quickly, with the redis
    // error as its source.
    for _ in 0..3 {
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(5), claim(&store))
            .await
            .expect("a call during the outage hung");
        match result {
            Err(
                e @ StoreError::Backend {
                    backend: "redis", ..
                },
            ) => {
                let source = std::error::Error::source(&e).expect("the redis error is kept");
                assert!(
                    source.downcast_ref::<redis::RedisError>().is_some(),
                    "{source:?}"
                );
            }
            other => panic!("during the outage: {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }

    server.restart().expect("restart redis-server");
    // The same store, no reconnect call: it recovers by itself (and reloads
    // its scripts, which the new server does not have).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match claim(&store).await {
            Ok(ClaimOutcome::Acquired(_)) => break,
            Ok(other) => panic!("after the outage: {other:?}"),
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "still failing 10 s after Redis came back: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // And keeps working.
    for _ in 0..10 {
        assert!(matches!(claim(&store).await, Ok(ClaimOutcome::Acquired(_))));
    }
}

/// A Redis that accepts commands but does not answer (`CLIENT PAUSE`): each
/// call fails with `StoreError::Timeout` after the store's response timeout,
/// by itself: through a `Guarded` whose timeout is far longer than the pause
/// (so its own timer can never fire first), the call still fails with the
/// store's bound, within about that bound. Calls succeed again once Redis
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_that_does_not_answer_times_out_typed() {
    let Some(server) = test_support::RedisServer::start("redis_that_does_not_answer") else {
        return;
    };
    let bound = Duration::from_millis(300);
    let store = Arc::new(
        RedisStore::connect_with_timeout(&server.url(), bound)
            .await
            .expect("connect"),
    );
    // Far longer than the pause below: only the store's own bound can end a
    // call before Redis answers again.
    let patient = Duration::from_secs(30);
    let guarded = Guarded::new(Arc::clone(&store) as Arc<dyn Store>, patient);
    assert!(matches!(claim(&store).await, Ok(ClaimOutcome::Acquired(_))));
    assert!(matches!(
        guarded_claim(&guarded).await,
        Ok(ClaimOutcome::Acquired(_))
    ));

    let client = redis::Client::open(server.url()).expect("client");
    let mut admin = client
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection");
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .expect("pause");
    let paused = Instant::now();
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(5), claim(&store))
        .await
        .expect("a call to a silent Redis hung");
    assert!(timed_out(&result, bound), "{result:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    // The same through `Guarded`: the store's bound, not Guarded's timeout,
    // and well before the pause ends (a store that stopped bounding its calls
    // would wait out the pause and then succeed, or time out after 30 s).
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(5), guarded_claim(&guarded))
        .await
        .expect("a guarded call to a silent Redis hung");
    assert!(timed_out(&result, bound), "through Guarded: {result:?}");
    assert!(
        started.elapsed() < bound * 3 && paused.elapsed() < Duration::from_millis(1400),
        "through Guarded: {:?} ({:?} into the pause)",
        started.elapsed(),
        paused.elapsed()
    );

    // Once the pause is over, the same store answers again.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match claim(&store).await {
            Ok(ClaimOutcome::Acquired(_)) => break,
            other if Instant::now() > deadline => panic!("after the pause: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
