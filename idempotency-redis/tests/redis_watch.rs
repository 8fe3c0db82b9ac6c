//! The Redis store wakes duplicates that wait for a record in flight
//! (`wait_for_in_flight`) through pub/sub: a waiter marks the record
//! watched, and only a watched record's completion or release publishes.
//! What every notifying store does (a watch resolves on its record's
//! completion and release only, waiting duplicates are woken instead of
//! polling) is in the conformance suite's watch cases (`conformance.rs`, on
//! one server and on a Redis Cluster); here, what only Redis does. Reads
//! `REDIS_URL`; skipped, saying why, when it is unset.

use std::time::Duration;

use futures_util::StreamExt;
use idempotency_core::{Store, StoredOutcome, TokenOutcome};
use idempotency_redis::RedisStore;
use test_support::watching::{acquire, id, resolves, response, watch, NOTIFIED_WITHIN, QUIET_FOR};

/// Taken by each test for its whole run:
/// [`a_lost_subscription_wakes_its_waiters_and_comes_back`] kills every
/// pub/sub client of the server, which would end the subscription
/// [`only_a_watched_record_publishes`] listens on.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Two instances (two stores, two connections) on one fresh prefix.
async fn instances(var: &str, test: &str) -> Option<(String, RedisStore, RedisStore)> {
    let url = test_support::service_url(var, test)?;
    let prefix = format!("{}:", test_support::unique("watch"));
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

/// Claim and complete with nobody waiting publish nothing: a subscriber on
/// the channel hears only the one watched record's completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_watched_record_publishes() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let Some((prefix, holder, waiter)) = instances("REDIS_URL", "only_a_watched_record").await
    else {
        return;
    };
    let url = test_support::service_url("REDIS_URL", "only_a_watched_record").expect("url");
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
    let _alone = ONE_AT_A_TIME.lock().await;
    let Some((_, holder, waiter)) = instances("REDIS_URL", "a_lost_subscription").await else {
        return;
    };
    let url = test_support::service_url("REDIS_URL", "a_lost_subscription").expect("url");
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
