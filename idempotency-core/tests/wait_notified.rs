//! Duplicates that wait for the first request (`wait_for_in_flight`) wake
//! when it completes or is released, instead of polling the store.
//!
//! Tokio's clock is paused, so "at once" is exact: a woken waiter returns at
//! the same instant as the completion, where a polling one returns at its
//! next tick.

use std::sync::Arc;
use std::time::Duration;

use idempotency_core::Store;
use idempotency_core::{
    Decision, Idempotency, IdempotencyConfig, MemoryStore, RecordId, StoredResponse,
};
use test_support::{decide, Hooked};
use tokio::time::Instant;

const WAITERS: usize = 16;

fn engine(notify: bool) -> (Idempotency, Arc<Hooked<MemoryStore>>) {
    let store = Arc::new(if notify {
        Hooked::new(MemoryStore::new())
    } else {
        Hooked::polling(MemoryStore::new())
    });
    let config = IdempotencyConfig::builder()
        .wait_for_in_flight(Duration::from_secs(10))
        .build()
        .expect("config");
    (Idempotency::new(store.clone(), config), store)
}

fn response() -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: Vec::new(),
        body: bytes::Bytes::from_static(b"{\"id\":1}"),
    }
}

/// Starts the first request and `WAITERS` duplicates, lets them wait
/// `parked`, then completes the first; returns how long after the
/// completion each duplicate returned, and the store.
async fn waiters_after_completion(
    notify: bool,
    parked: Duration,
) -> (Vec<Duration>, Arc<Hooked<MemoryStore>>) {
    let (engine, store) = engine(notify);
    let Decision::Execute(first) = decide(&engine, "k").await else {
        panic!("the first is not executed");
    };
    let waiters: Vec<_> = (0..WAITERS)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let decision = decide(&engine, "k").await;
                (decision, Instant::now())
            })
        })
        .collect();
    tokio::time::sleep(parked).await;
    let completed = Instant::now();
    first.complete(response()).await;
    let mut delays = Vec::new();
    for waiter in waiters {
        let (decision, at) = waiter.await.expect("waiter");
        let Decision::Replay(replay) = decision else {
            panic!("a waiter did not get the replay: {decision:?}");
        };
        assert_eq!(*replay, response());
        delays.push(at - completed);
    }
    (delays, store)
}

#[tokio::test(start_paused = true)]
async fn waiters_wake_when_the_first_completes_without_polling() {
    let (delays, store) = waiters_after_completion(true, Duration::from_millis(210)).await;
    assert!(
        delays.iter().all(|d| d.is_zero()),
        "every waiter returned at the instant of the completion: {delays:?}"
    );
    // The first's claim, then for each waiter: its claim, the claim after
    // the watch began, and the claim after the wake-up. No poll in between.
    assert_eq!(store.claims(), 1 + 3 * WAITERS as u64, "claims");
}

/// The same run where the store cannot notify: the waiters poll, return
/// after the completion, and claim once per tick (what the test above would
/// see if the notification were lost).
#[tokio::test(start_paused = true)]
async fn without_notification_waiters_poll() {
    let (delays, store) = waiters_after_completion(false, Duration::from_millis(210)).await;
    assert!(
        delays.iter().all(|d| !d.is_zero()),
        "polling waiters return at their next tick: {delays:?}"
    );
    assert!(
        store.claims() > 8 * WAITERS as u64,
        "at least one claim per 25 ms tick: {}",
        store.claims()
    );
}

/// When the first is released (it failed in a way that must be retried),
/// one waiter wakes and runs; the others wait on for it and replay its
/// response.
#[tokio::test(start_paused = true)]
async fn a_release_wakes_one_waiter_to_run_and_the_rest_replay_it() {
    let (engine, _store) = engine(true);
    let Decision::Execute(first) = decide(&engine, "r").await else {
        panic!("the first is not executed");
    };
    let (tx, mut ran) = tokio::sync::mpsc::unbounded_channel();
    let waiters: Vec<_> = (0..WAITERS)
        .map(|_| {
            let engine = engine.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match decide(&engine, "r").await {
                    Decision::Execute(execution) => {
                        let _ = tx.send(Instant::now());
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        execution.complete(response()).await;
                        "executed"
                    }
                    Decision::Replay(replay) => {
                        assert_eq!(*replay, response());
                        "replayed"
                    }
                    other => panic!("{other:?}"),
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let released = Instant::now();
    first.release().await;
    let mut outcomes = Vec::new();
    for waiter in waiters {
        outcomes.push(waiter.await.expect("waiter"));
    }
    let executed = outcomes.iter().filter(|o| **o == "executed").count();
    assert_eq!(executed, 1, "exactly one waiter ran: {outcomes:?}");
    let started = ran.recv().await.expect("one ran");
    assert_eq!(
        started, released,
        "the waiter ran at the instant of the release"
    );
}

/// A waiter whose bound passes gets 409 and leaves nothing registered: a
/// later completion finds no watch.
#[tokio::test(start_paused = true)]
async fn a_waiter_that_gives_up_leaves_no_watch_behind() {
    let store = MemoryStore::new();
    let config = IdempotencyConfig::builder()
        .wait_for_in_flight(Duration::from_millis(300))
        .build()
        .expect("config");
    let engine = Idempotency::new(store.clone(), config);
    let Decision::Execute(first) = decide(&engine, "g").await else {
        panic!("the first is not executed");
    };
    let Decision::Reject(problem) = decide(&engine, "g").await else {
        panic!("the waiter did not give up");
    };
    assert_eq!(problem.status(), 409);
    first.complete(response()).await;
    let Decision::Replay(_) = decide(&engine, "g").await else {
        panic!("not replayed");
    };
    // A new watch on another record is unaffected by the old one.
    let id = RecordId::from_parts(b"", b"other");
    let watch = store.watch(&id).await.expect("watch").expect("notifies");
    assert!(tokio::time::timeout(Duration::from_millis(10), watch)
        .await
        .is_err());
}
