//! Lease mode on the memory store (always) and on Redis (`REDIS_URL`): the
//! same logical cases as transactional mode, in process.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idempotency_core::Claim;
use idempotency_core::{
    ClaimOutcome, FakeClock, Fingerprint, LeaseToken, MemoryStore, RecordId, Store, StoreError,
    StoredOutcome, StoredResponse, TokenOutcome,
};
use idempotency_redis::RedisStore;
use inbox_consumer::{
    BoxFuture, DeadReason, HandlerError, Inbox, InboxConfig, InboxError, InboxMessage, LeaseInbox,
    Outcome,
};
use test_support::{Hook, Hooked};

/// The effect: counts runs per test; fails while `fail` > 0.
#[derive(Clone, Default)]
struct Effect {
    runs: Arc<AtomicU32>,
    fail: Arc<AtomicU32>,
}

impl Effect {
    fn failing(n: u32) -> Self {
        let e = Self::default();
        e.fail.store(n, Ordering::SeqCst);
        e
    }

    fn handler(
        &self,
    ) -> impl for<'m> FnOnce(&'m InboxMessage) -> BoxFuture<'m, Result<(), HandlerError>> {
        let this = self.clone();
        move |message| {
            Box::pin(async move {
                let _: common::Payment =
                    serde_json::from_slice(message.payload()).map_err(HandlerError::permanent)?;
                if this
                    .fail
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err(HandlerError::transient("scripted failure"));
                }
                this.runs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        }
    }

    fn runs(&self) -> u32 {
        self.runs.load(Ordering::SeqCst)
    }
}

fn config(consumer: &str, max: u32) -> InboxConfig {
    InboxConfig::builder(consumer)
        .max_attempts(max)
        .lease(Duration::from_millis(200))
        .build()
        .unwrap()
}

fn msg(id: &str) -> InboxMessage {
    InboxMessage::new(Some(id.into()), common::payment("acct", 10))
}

async fn same_id_five_times<S: Store + Clone>(store: S) {
    let inbox = Inbox::lease(store, config(&common::unique("c"), 5));
    let effect = Effect::default();
    let mut seen = Vec::new();
    for i in 0..5 {
        let m = msg("m-1").redelivered(i > 0);
        seen.push(
            common::bounded("process", inbox.process(&m, effect.handler()))
                .await
                .name(),
        );
    }
    assert_eq!(
        seen,
        [
            "processed",
            "duplicate",
            "duplicate",
            "duplicate",
            "duplicate"
        ]
    );
    assert_eq!(effect.runs(), 1);
}

/// Two inboxes (two instances) on one store: the one that claims runs, the
/// other is told it is in flight elsewhere, then that it is a duplicate.
async fn two_consumers<S: Store + Clone>(store: S) {
    let name = common::unique("c");
    let a = Inbox::lease(store.clone(), config(&name, 5));
    let b = Inbox::lease(store, config(&name, 5));
    let effect = Effect::default();
    let entered = Arc::new(tokio::sync::Notify::new());
    let go = Arc::new(tokio::sync::Notify::new());
    let first = {
        let (a, effect, entered, go) = (a.clone(), effect.clone(), entered.clone(), go.clone());
        tokio::spawn(async move {
            a.process(&msg("m-2"), move |m| {
                Box::pin(async move {
                    entered.notify_one();
                    go.notified().await;
                    effect.handler()(m).await
                })
            })
            .await
        })
    };
    common::bounded("first handler starts", entered.notified()).await;
    let during = b.process(&msg("m-2"), effect.handler()).await;
    assert!(
        matches!(during, Outcome::InFlightElsewhere { .. }),
        "{during:?}"
    );
    go.notify_one();
    let first = common::bounded("first", first).await.unwrap();
    assert!(
        matches!(first, Outcome::Processed { attempt: 1 }),
        "{first:?}"
    );
    let after = b
        .process(&msg("m-2").redelivered(true), effect.handler())
        .await;
    assert!(matches!(after, Outcome::Duplicate), "{after:?}");
    assert_eq!(effect.runs(), 1);
}

async fn fails_twice_then_succeeds<S: Store + Clone>(store: S) {
    let inbox = Inbox::lease(store, config(&common::unique("c"), 5));
    let effect = Effect::failing(2);
    let mut seen = Vec::new();
    for i in 0..4 {
        let m = msg("m-3").redelivered(i > 0);
        match inbox.process(&m, effect.handler()).await {
            Outcome::Failed { attempt, .. } => seen.push(format!("failed {attempt}")),
            Outcome::Processed { attempt } => seen.push(format!("processed {attempt}")),
            other => seen.push(other.name().to_owned()),
        }
    }
    assert_eq!(seen, ["failed 1", "failed 2", "processed 3", "duplicate"]);
    assert_eq!(effect.runs(), 1);
}

async fn poison_dies_and_the_next_process<S: Store + Clone>(store: S) {
    let inbox = Inbox::lease(store, config(&common::unique("c"), 3));
    let poison = Effect::failing(u32::MAX);
    let mut seen = Vec::new();
    for i in 0..3 {
        // Even without the broker's redelivered flag the failures are counted.
        let m = msg("poison").redelivered(i > 0 && i % 2 == 0);
        let o = inbox.process(&m, poison.handler()).await;
        if let Outcome::Dead { reason } = &o {
            assert!(
                matches!(reason, DeadReason::MaxAttempts { attempts: 3, .. }),
                "{reason:?}"
            );
        }
        seen.push(o.name());
    }
    assert_eq!(seen, ["failed", "failed", "dead"]);
    let fine = Effect::default();
    let again = inbox
        .process(&msg("poison").redelivered(true), fine.handler())
        .await;
    assert!(
        matches!(
            again,
            Outcome::Dead {
                reason: DeadReason::AlreadyDead
            }
        ),
        "{again:?}"
    );
    for id in ["behind-1", "behind-2"] {
        let o = inbox.process(&msg(id), fine.handler()).await;
        assert!(matches!(o, Outcome::Processed { attempt: 1 }), "{o:?}");
    }
    assert_eq!(fine.runs(), 2);

    let bad = InboxMessage::new(Some("undecodable".into()), &b"not json"[..]);
    let o = inbox.process(&bad, fine.handler()).await;
    assert!(
        matches!(
            o,
            Outcome::Dead {
                reason: DeadReason::Rejected { attempt: 1, .. }
            }
        ),
        "{o:?}"
    );
    let anonymous = InboxMessage::new(None, common::payment("a", 1));
    let o = inbox.process(&anonymous, fine.handler()).await;
    assert!(
        matches!(
            o,
            Outcome::Dead {
                reason: DeadReason::MissingId
            }
        ),
        "{o:?}"
    );
}

/// A crash after the effect and before the mark: the claim lapses after its
/// lease and the redelivery runs the effect again. This is the documented
/// at-least-once window of lease mode; the test pins it down.
async fn crash_mid_handler_runs_again_after_the_lease<S: Store + Clone>(
    store: S,
    pass_the_lease: impl std::future::Future<Output = ()>,
) {
    let inbox: LeaseInbox<S> = Inbox::lease(store, config(&common::unique("c"), 5));
    let effect = Effect::default();
    let crashed = {
        let effect = effect.clone();
        tokio::time::timeout(
            Duration::from_millis(50),
            inbox.process(&msg("m-4"), move |m| {
                Box::pin(async move {
                    effect.handler()(m).await?;
                    std::future::pending::<()>().await;
                    Ok(())
                })
            }),
        )
        .await
    };
    assert!(crashed.is_err(), "the handler was cut off before its mark");
    let held = inbox
        .process(&msg("m-4").redelivered(true), effect.handler())
        .await;
    assert!(
        matches!(held, Outcome::InFlightElsewhere { .. }),
        "{held:?}"
    );
    pass_the_lease.await;
    let taken = inbox
        .process(&msg("m-4").redelivered(true), effect.handler())
        .await;
    assert!(matches!(taken, Outcome::Processed { .. }), "{taken:?}");
    assert_eq!(effect.runs(), 2, "at-least-once: the effect ran again");
    let dup = inbox
        .process(&msg("m-4").redelivered(true), effect.handler())
        .await;
    assert!(matches!(dup, Outcome::Duplicate), "{dup:?}");
}

async fn redis(test: &str) -> Option<RedisStore> {
    let url = common::service_url("REDIS_URL", test)?;
    Some(
        RedisStore::connect(&url)
            .await
            .expect("REDIS_URL is set but Redis does not answer")
            .with_prefix(format!("{}:", common::unique("inbox-test"))),
    )
}

#[tokio::test]
async fn memory_same_id_five_times_gives_one_effect() {
    same_id_five_times(MemoryStore::new()).await;
}

#[tokio::test]
async fn memory_two_consumers_give_one_effect() {
    two_consumers(MemoryStore::new()).await;
}

#[tokio::test]
async fn memory_fails_twice_then_succeeds() {
    fails_twice_then_succeeds(MemoryStore::new()).await;
}

#[tokio::test]
async fn memory_poison_dies_and_the_next_process() {
    poison_dies_and_the_next_process(MemoryStore::new()).await;
}

#[tokio::test]
async fn memory_crash_mid_handler_runs_again_after_the_lease() {
    let clock = FakeClock::new();
    let store = MemoryStore::with_clock(1000, clock.clone());
    crash_mid_handler_runs_again_after_the_lease(store, async move {
        clock.advance(Duration::from_millis(201));
    })
    .await;
}

#[tokio::test]
async fn redis_same_id_five_times_gives_one_effect() {
    let Some(store) = redis("redis_same_id_five_times_gives_one_effect").await else {
        return;
    };
    same_id_five_times(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_consumers_give_one_effect() {
    let Some(store) = redis("redis_two_consumers_give_one_effect").await else {
        return;
    };
    two_consumers(store).await;
}

#[tokio::test]
async fn redis_fails_twice_then_succeeds() {
    let Some(store) = redis("redis_fails_twice_then_succeeds").await else {
        return;
    };
    fails_twice_then_succeeds(store).await;
}

#[tokio::test]
async fn redis_poison_dies_and_the_next_process() {
    let Some(store) = redis("redis_poison_dies_and_the_next_process").await else {
        return;
    };
    poison_dies_and_the_next_process(store).await;
}

#[tokio::test]
async fn redis_crash_mid_handler_runs_again_after_the_lease() {
    let Some(store) = redis("redis_crash_mid_handler_runs_again_after_the_lease").await else {
        return;
    };
    // Redis keeps its own time: wait the 200 ms lease out.
    crash_mid_handler_runs_again_after_the_lease(
        store,
        tokio::time::sleep(Duration::from_millis(400)),
    )
    .await;
}

/// A store whose every call waits for ever: a network partition, a backend
/// that accepts the connection and never answers.
fn hanging_store() -> Hooked<MemoryStore> {
    Hooked::with_hook(MemoryStore::new(), |_| Hook::Hang).named("hanging")
}

/// A store that never answers makes `process` report `Unavailable` within
/// the store timeout, without running the handler (it used to hang for ever).
#[tokio::test]
async fn a_hanging_store_is_unavailable_within_the_store_timeout() {
    let timeout = Duration::from_millis(200);
    let inbox = Inbox::lease(
        hanging_store(),
        InboxConfig::builder(common::unique("c"))
            .store_timeout(timeout)
            .build()
            .unwrap(),
    );
    let effect = Effect::default();
    let start = std::time::Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(5),
        inbox.process(&msg("m-hang"), effect.handler()),
    )
    .await
    .expect("process hung on a store that never answers");
    let took = start.elapsed();
    match &outcome {
        Outcome::Unavailable {
            error:
                InboxError::Store(StoreError::Timeout {
                    backend,
                    timeout: t,
                }),
            ..
        } => assert_eq!((*backend, *t), ("hanging", timeout)),
        other => panic!("expected Unavailable with a store timeout, got {other:?}"),
    }
    assert!(took >= timeout, "answered before the timeout: {took:?}");
    assert!(
        took < timeout * 5,
        "took {took:?} for a {timeout:?} timeout"
    );
    assert_eq!(effect.runs(), 0, "the handler must not run");
    assert_eq!(inbox.metrics().unavailable, 1);
}

/// The record of `id` for `consumer`, as the inbox addresses it.
fn record_of(consumer: &str, id: &str) -> RecordId {
    RecordId::from_parts(consumer.as_bytes(), id.as_bytes())
}

/// A claim such as an earlier version made: the all-zero fingerprint.
async fn legacy_claim(store: &MemoryStore, id: &RecordId, lease: Duration) -> LeaseToken {
    let zero = Fingerprint::from_bytes([0; 32]);
    let claim = Claim {
        fingerprint: &zero,
        lease,
        ttl: Duration::from_secs(3600),
    };
    match store.claim(id, LeaseToken::random(), claim).await.unwrap() {
        ClaimOutcome::Acquired(token) => token,
        other => panic!("{other:?}"),
    }
}

/// What an earlier version stored: a made-up HTTP response with that status.
async fn legacy_mark(store: &MemoryStore, id: &RecordId, status: u16) {
    let token = legacy_claim(store, id, Duration::from_secs(30)).await;
    let response = StoredOutcome::response(StoredResponse {
        status,
        headers: Vec::new(),
        body: bytes::Bytes::new(),
    });
    let done = store
        .complete(id, token, &response, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(done, TokenOutcome::Applied);
}

/// Records written by an earlier version (HTTP responses 200 and 410 as
/// marks) still read as done and dead.
#[tokio::test]
async fn marks_of_an_earlier_version_still_read_as_done_and_dead() {
    let store = MemoryStore::new();
    let consumer = common::unique("c");
    legacy_mark(&store, &record_of(&consumer, "old-done"), 200).await;
    legacy_mark(&store, &record_of(&consumer, "old-dead"), 410).await;
    let inbox = Inbox::lease(store, config(&consumer, 5));
    let effect = Effect::default();
    let done = inbox
        .process(&msg("old-done").redelivered(true), effect.handler())
        .await;
    assert!(matches!(done, Outcome::Duplicate), "{done:?}");
    let dead = inbox
        .process(&msg("old-dead").redelivered(true), effect.handler())
        .await;
    assert!(
        matches!(
            dead,
            Outcome::Dead {
                reason: DeadReason::AlreadyDead
            }
        ),
        "{dead:?}"
    );
    assert_eq!(effect.runs(), 0);
}

/// A claim an earlier version left in flight is taken over once its lease
/// has passed, like any crashed holder's.
#[tokio::test]
async fn a_lapsed_claim_of_an_earlier_version_is_taken_over() {
    let clock = FakeClock::new();
    let store = MemoryStore::with_clock(1000, clock.clone());
    let consumer = common::unique("c");
    let _crashed = legacy_claim(
        &store,
        &record_of(&consumer, "m-old"),
        Duration::from_millis(200),
    )
    .await;
    let inbox = Inbox::lease(store, config(&consumer, 5));
    let effect = Effect::default();
    let held = inbox
        .process(&msg("m-old").redelivered(true), effect.handler())
        .await;
    assert!(
        matches!(held, Outcome::InFlightElsewhere { .. }),
        "{held:?}"
    );
    clock.advance(Duration::from_millis(201));
    let taken = inbox
        .process(&msg("m-old").redelivered(true), effect.handler())
        .await;
    assert!(
        matches!(taken, Outcome::Processed { attempt: 1 }),
        "{taken:?}"
    );
    assert_eq!(effect.runs(), 1);
}

/// The inbox stores marks, not HTTP responses, under a fingerprint that is
/// the record id's own bytes (not all zeros).
#[tokio::test]
async fn done_and_dead_are_stored_as_marks_under_the_record_id() {
    let store = Arc::new(MemoryStore::new());
    let consumer = common::unique("c");
    let inbox = Inbox::lease(store.clone(), config(&consumer, 1));
    let fine = Effect::default();
    let poison = Effect::failing(u32::MAX);
    assert_eq!(
        inbox.process(&msg("ok"), fine.handler()).await.name(),
        "processed"
    );
    assert_eq!(
        inbox.process(&msg("bad"), poison.handler()).await.name(),
        "dead"
    );
    let mut marks = Vec::new();
    for key in ["ok", "bad"] {
        let id = record_of(&consumer, key);
        let fingerprint = Fingerprint::from_bytes(*id.as_bytes());
        let claim = Claim {
            fingerprint: &fingerprint,
            lease: Duration::from_secs(1),
            ttl: Duration::from_secs(1),
        };
        match store.claim(&id, LeaseToken::random(), claim).await.unwrap() {
            ClaimOutcome::Completed {
                fingerprint: stored,
                outcome: outcome @ StoredOutcome::Mark(_),
            } => {
                assert_eq!(stored, fingerprint, "{key}");
                marks.push(outcome);
            }
            other => panic!("{key}: {other:?}"),
        }
    }
    assert_ne!(marks[0], marks[1], "done and dead are different marks");
    // `store()` is the store given to `lease`.
    assert!(Arc::ptr_eq(inbox.store(), &store));
}

/// A handler slower than its lease keeps its claim: the heartbeat extends it,
/// so a concurrent copy is in flight elsewhere, not a takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_its_lease_keeps_its_claim() {
    let store = MemoryStore::new();
    let name = common::unique("c");
    let a = Inbox::lease(store.clone(), config(&name, 5));
    let b = Inbox::lease(store, config(&name, 5));
    let effect = Effect::default();
    let first = {
        let (a, effect) = (a.clone(), effect.clone());
        tokio::spawn(async move {
            a.process(&msg("slow"), move |m| {
                Box::pin(async move {
                    // Three leases of 200 ms.
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    effect.handler()(m).await
                })
            })
            .await
        })
    };
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let during = b
            .process(&msg("slow").redelivered(true), effect.handler())
            .await;
        assert!(
            matches!(during, Outcome::InFlightElsewhere { .. }),
            "{during:?}"
        );
    }
    let first = common::bounded("slow handler", first).await.unwrap();
    assert!(
        matches!(first, Outcome::Processed { attempt: 1 }),
        "{first:?}"
    );
    assert_eq!(effect.runs(), 1);
    assert_eq!(a.metrics().lease_lost, 0);
}

/// A handler whose claim is taken over while it runs (its lease passed) is
/// counted once as a lost lease, and the new holder's mark stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_over_while_the_handler_runs_is_counted_once() {
    let clock = FakeClock::new();
    let store = MemoryStore::with_clock(1000, clock.clone());
    let name = common::unique("c");
    let a = Inbox::lease(store.clone(), config(&name, 5));
    let b = Inbox::lease(store, config(&name, 5));
    let effect = Effect::default();
    let entered = Arc::new(tokio::sync::Notify::new());
    let go = Arc::new(tokio::sync::Notify::new());
    let first = {
        let (a, effect, entered, go) = (a.clone(), effect.clone(), entered.clone(), go.clone());
        tokio::spawn(async move {
            a.process(&msg("lost"), move |m| {
                Box::pin(async move {
                    entered.notify_one();
                    go.notified().await;
                    effect.handler()(m).await
                })
            })
            .await
        })
    };
    common::bounded("first handler starts", entered.notified()).await;
    // The store's time passes the lease at once; the heartbeat (every 100 ms
    // of real time) then finds the claim taken over.
    clock.advance(Duration::from_millis(201));
    let taken = b
        .process(&msg("lost").redelivered(true), effect.handler())
        .await;
    assert!(matches!(taken, Outcome::Processed { .. }), "{taken:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    go.notify_one();
    let first = common::bounded("first", first).await.unwrap();
    assert!(matches!(first, Outcome::Processed { .. }), "{first:?}");
    assert_eq!(effect.runs(), 2, "at-least-once: both ran");
    assert_eq!(a.metrics().lease_lost, 1);
    assert_eq!(b.metrics().lease_lost, 0);
}
