//! The Redis store wakes duplicates that wait for a record in flight
//! (`wait_for_in_flight`) through pub/sub: a waiter marks the record
//! watched, and only a watched record's completion or release publishes.
//! Runs on one server (`REDIS_URL`) and on a Redis Cluster
//! (`REDIS_CLUSTER_URL`); each is skipped, saying why, when its URL is unset.
#![cfg(feature = "redis")]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use idempotency_core::store::redis::RedisStore;
use idempotency_core::store::Watch;
use idempotency_core::{
    Claim, ClaimOutcome, Decision, Fingerprint, Idempotency, IdempotencyConfig, Inspection,
    LeaseToken, RecordId, Store, StoredOutcome, StoredResponse, TokenOutcome,
};

/// Long enough for a notification on a loaded machine; a watch that has
/// none never resolves (the fallback poll is the engine's, not the watch's).
const NOTIFIED_WITHIN: Duration = Duration::from_secs(5);
/// How long a watch that must stay quiet is given to resolve anyway.
const QUIET_FOR: Duration = Duration::from_millis(500);

/// Two instances (two stores, two connections) on one fresh prefix.
async fn instances(var: &str, test: &str) -> Option<(String, RedisStore, RedisStore)> {
    let url = common::service_url(var, test)?;
    let prefix = format!("{}:", common::unique("watch"));
    let a = RedisStore::connect(&url)
        .await
        .expect("connect")
        .with_prefix(prefix.clone());
    let b = RedisStore::connect(&url)
        .await
        .expect("connect")
        .with_prefix(prefix.clone());
    Some((prefix, a, b))
}

fn fp() -> Fingerprint {
    Fingerprint::compute("POST", "/watch", None, None, b"body")
}

fn id() -> RecordId {
    RecordId::from_parts(b"watch", &rand::random::<[u8; 16]>())
}

fn claim_args(fp: &Fingerprint) -> Claim<'_> {
    Claim {
        fingerprint: fp,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(60),
    }
}

async fn acquire(store: &RedisStore, id: &RecordId) -> LeaseToken {
    let fp = fp();
    let token = LeaseToken::random();
    match store
        .claim(id, token, claim_args(&fp))
        .await
        .expect("claim")
    {
        ClaimOutcome::Acquired(t) => t,
        other => panic!("not acquired: {other:?}"),
    }
}

fn response() -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![],
        body: bytes::Bytes::from_static(b"{\"id\":1}"),
    }
}

async fn watch(store: &RedisStore, id: &RecordId) -> Watch {
    store
        .watch(id)
        .await
        .expect("watch")
        .expect("the Redis store notifies")
}

async fn resolves(watch: Watch) -> bool {
    tokio::time::timeout(NOTIFIED_WITHIN, watch).await.is_ok()
}

async fn stays_quiet(watch: &mut Watch) -> bool {
    tokio::time::timeout(QUIET_FOR, watch).await.is_err()
}

/// A watch on a record in flight resolves when its holder, on another
/// instance, completes it, and when it releases it; a watch on another
/// record in flight stays quiet meanwhile. The watched record still
/// behaves as in flight (409 to a claim, fenced to a stranger's token), and
/// its completion replays.
async fn a_watch_resolves_on_completion_and_on_release_of_its_record_only(var: &str) {
    let Some((_, holder, waiter)) = instances(var, "a_watch_resolves_on_completion").await else {
        return;
    };
    let (done, released, other) = (id(), id(), id());
    let done_token = acquire(&holder, &done).await;
    let released_token = acquire(&holder, &released).await;
    let _other_token = acquire(&holder, &other).await;
    let mut on_other = watch(&waiter, &other).await;

    let on_done = watch(&waiter, &done).await;
    let fp = fp();
    assert!(
        matches!(
            waiter
                .claim(&done, LeaseToken::random(), claim_args(&fp))
                .await,
            Ok(ClaimOutcome::InFlight { .. })
        ),
        "a watched record is still in flight"
    );
    assert_eq!(
        holder
            .extend(&done, LeaseToken::random(), Duration::from_secs(30))
            .await
            .expect("extend"),
        TokenOutcome::Fenced,
        "a watched record still fences a stranger"
    );
    assert_eq!(
        holder
            .extend(&done, done_token, Duration::from_secs(30))
            .await
            .expect("extend"),
        TokenOutcome::Applied,
        "its holder still extends it"
    );
    let outcome = StoredOutcome::response(response());
    assert_eq!(
        holder
            .complete(&done, done_token, &outcome, Duration::from_secs(60))
            .await
            .expect("complete"),
        TokenOutcome::Applied
    );
    assert!(resolves(on_done).await, "the completion woke its watch");
    assert!(matches!(
        waiter
            .claim(&done, LeaseToken::random(), claim_args(&fp))
            .await,
        Ok(ClaimOutcome::Completed { .. })
    ));

    let on_released = watch(&waiter, &released).await;
    assert_eq!(
        holder
            .release(&released, released_token)
            .await
            .expect("release"),
        TokenOutcome::Applied
    );
    assert!(resolves(on_released).await, "the release woke its watch");
    assert!(
        stays_quiet(&mut on_other).await,
        "a watch on another record stayed quiet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resolves_on_completion_and_on_release_of_its_record_only_redis() {
    a_watch_resolves_on_completion_and_on_release_of_its_record_only("REDIS_URL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resolves_on_completion_and_on_release_of_its_record_only_cluster() {
    a_watch_resolves_on_completion_and_on_release_of_its_record_only("REDIS_CLUSTER_URL").await;
}

async fn decide(engine: &Idempotency, key: &str) -> Decision {
    let (parts, ()) = http::Request::post("/payments")
        .header("idempotency-key", key)
        .body(())
        .expect("request")
        .into_parts();
    let Inspection::Pending(pending) = engine.inspect(&parts, || None) else {
        panic!("not covered");
    };
    engine.decide(pending, b"{\"amount\":1}").await
}

/// 16 duplicates on another instance wait for a first request that takes
/// 600 ms: every one gets its replay, and each claims about 3 times (at
/// once, after its watch began, after the wake-up; plus a fallback poll
/// every 250 ms), where polling every 25 ms would claim about 24 times.
async fn waiting_duplicates_are_woken_not_polling(var: &str) {
    const WAITERS: u64 = 16;
    let Some((_, first_store, waiting_store)) = instances(var, "waiting_duplicates").await else {
        return;
    };
    let config = IdempotencyConfig::builder()
        .wait_for_in_flight(Duration::from_secs(10))
        .build()
        .expect("config");
    let first = Idempotency::new(first_store, config.clone());
    let counting = Arc::new(common::Counting::new(waiting_store));
    let waiting = Idempotency::new(counting.clone(), config);
    let Decision::Execute(execution) = decide(&first, "k").await else {
        panic!("the first is not executed");
    };
    let waiters: Vec<_> = (0..WAITERS)
        .map(|_| {
            let waiting = waiting.clone();
            tokio::spawn(async move { decide(&waiting, "k").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(600)).await;
    execution.complete(response()).await;
    for waiter in waiters {
        match waiter.await.expect("waiter") {
            Decision::Replay(replay) => assert_eq!(*replay, response()),
            other => panic!("a waiter did not replay: {other:?}"),
        }
    }
    let claims = counting.claims();
    assert!(
        claims <= 7 * WAITERS,
        "{claims} claims for {WAITERS} waiters: they polled"
    );
    // Woken by the completion's publish, not by a fallback poll (under which
    // every watch is dropped unresolved); the ticks, at 250 ms steps from
    // the waiters' first claims, fall well away from the completion at 600.
    let woken = counting.woken.load(Ordering::SeqCst);
    assert!(
        woken >= WAITERS / 2,
        "{woken} of {WAITERS} waiters were woken by the completion"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_duplicates_are_woken_not_polling_redis() {
    waiting_duplicates_are_woken_not_polling("REDIS_URL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_duplicates_are_woken_not_polling_cluster() {
    waiting_duplicates_are_woken_not_polling("REDIS_CLUSTER_URL").await;
}

/// Claim and complete with nobody waiting publish nothing: a subscriber on
/// the channel hears only the one watched record's completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_watched_record_publishes() {
    let Some((prefix, holder, waiter)) = instances("REDIS_URL", "only_a_watched_record").await
    else {
        return;
    };
    let url = common::service_url("REDIS_URL", "only_a_watched_record").expect("url");
    let client = redis::Client::open(url).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(format!("{prefix}settled"))
        .await
        .expect("subscribe");
    let mut messages = pubsub.into_on_message();
    let outcome = StoredOutcome::response(response());
    for _ in 0..5 {
        let plain = id();
        let token = acquire(&holder, &plain).await;
        let done = holder
            .complete(&plain, token, &outcome, Duration::from_secs(60))
            .await;
        assert_eq!(done.expect("complete"), TokenOutcome::Applied);
    }
    let watched = id();
    let token = acquire(&holder, &watched).await;
    let _watch = watch(&waiter, &watched).await;
    let done = holder
        .complete(&watched, token, &outcome, Duration::from_secs(60))
        .await;
    assert_eq!(done.expect("complete"), TokenOutcome::Applied);
    let first = tokio::time::timeout(NOTIFIED_WITHIN, messages.next())
        .await
        .expect("a message")
        .expect("the stream is open");
    assert_eq!(
        first.get_payload_bytes(),
        holder.key(&watched).as_bytes(),
        "the first message is the watched record's: nothing before it"
    );
    assert!(
        tokio::time::timeout(QUIET_FOR, messages.next())
            .await
            .is_err(),
        "nothing else was published"
    );
}

/// A subscriber that loses its connection (`CLIENT KILL TYPE pubsub`) wakes
/// its waiters at once, subscribes again, and wakes the next completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_subscription_wakes_its_waiters_and_comes_back() {
    let Some((_, holder, waiter)) = instances("REDIS_URL", "a_lost_subscription").await else {
        return;
    };
    let url = common::service_url("REDIS_URL", "a_lost_subscription").expect("url");
    let record = id();
    let token = acquire(&holder, &record).await;
    let on_record = watch(&waiter, &record).await;
    let client = redis::Client::open(url).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    // Every pub/sub client of the server: other tests' listeners come back
    // the same way.
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .expect("CLIENT KILL");
    assert!(
        resolves(on_record).await,
        "the lost subscription woke the waiter to look again"
    );
    // Back: a new watch is woken by the completion.
    let deadline = tokio::time::Instant::now() + NOTIFIED_WITHIN;
    let outcome = StoredOutcome::response(response());
    let on_record = watch(&waiter, &record).await;
    let done = holder
        .complete(&record, token, &outcome, Duration::from_secs(60))
        .await;
    assert_eq!(done.expect("complete"), TokenOutcome::Applied);
    assert!(
        tokio::time::timeout_at(deadline, on_record).await.is_ok(),
        "the completion woke the new watch after the listener came back"
    );
}
