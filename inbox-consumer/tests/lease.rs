//! Lease mode on the memory store (always) and on Redis (`REDIS_URL`): the
//! same logical cases as transactional mode, in process.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idempotency_core::store::redis::RedisStore;
use idempotency_core::{FakeClock, MemoryStore, Store};
use inbox_consumer::{
    BoxFuture, DeadReason, HandlerError, Inbox, InboxConfig, InboxMessage, LeaseInbox, Outcome,
};

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
