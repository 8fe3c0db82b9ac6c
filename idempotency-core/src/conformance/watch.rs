//! The cases of a store that wakes waiting duplicates ([`Store::watch`]):
//! a watch resolves on its record's completion and release only, on
//! whichever instance they happen, and the engine's waiting duplicates are
//! woken instead of polling. A store whose `watch` answers `None` (it
//! cannot notify) skips them, saying so.

use std::sync::Arc;
use std::time::Duration;

use super::{fingerprint, fresh_id, response, Conformance, Hooked, LONG};
use crate::record::{ClaimOutcome, LeaseToken, StoredOutcome, TokenOutcome};
use crate::store::{Claim, Store, Watch};
use crate::{Decision, Idempotency, IdempotencyConfig, Inspection, RecordId};

/// Long enough for a notification on a loaded machine; a watch that has
/// none never resolves (the fallback poll is the engine's, not the watch's).
const NOTIFIED_WITHIN: Duration = Duration::from_secs(5);
/// How long a watch that must stay quiet is given to resolve anyway.
const QUIET_FOR: Duration = Duration::from_millis(500);
/// How many duplicates wait in [`Conformance::waiting_duplicates_are_woken`].
const WAITERS: u64 = 16;

impl Conformance {
    /// The instance that holds and settles the records the watch cases
    /// watch: the peer when there is one (another connection to the same
    /// data, as another service instance), else the store under test.
    fn holder(&self) -> &Arc<dyn Store> {
        self.peer.as_ref().unwrap_or(&self.store)
    }

    /// A watch on `id` from the store under test; `None` when it cannot
    /// notify.
    async fn watch(&self, id: &RecordId) -> Option<Watch> {
        self.store
            .watch(id)
            .await
            .unwrap_or_else(|e| panic!("{}: watch failed: {e:?}", self.name()))
    }

    async fn acquire_on(&self, store: &dyn Store, id: &RecordId) -> LeaseToken {
        let fp = fingerprint(b"watch");
        let token = LeaseToken::random();
        let claim = Claim {
            fingerprint: &fp,
            lease: LONG,
            ttl: LONG,
        };
        match store.claim(id, token, claim).await {
            Ok(ClaimOutcome::Acquired(t)) => t,
            other => panic!("{}: expected Acquired, got {other:?}", self.name()),
        }
    }

    /// A watch on a record in flight resolves when its holder (on the peer
    /// instance, when there is one) completes it, and when it releases it;
    /// a watch on another record in flight stays quiet meanwhile. The
    /// watched record still behaves as in flight (a claim finds it in
    /// flight, a stranger's token is fenced), and its completion replays.
    pub async fn a_watch_resolves_on_completion_and_on_release_of_its_record_only(&self) {
        let (done, released, other) = (fresh_id(), fresh_id(), fresh_id());
        let holder = &**self.holder();
        let done_token = self.acquire_on(holder, &done).await;
        let released_token = self.acquire_on(holder, &released).await;
        let _other_token = self.acquire_on(holder, &other).await;
        let Some(mut on_other) = self.watch(&other).await else {
            eprintln!(
                "{}: watch cases skipped: the store cannot notify (watch answers None)",
                self.name()
            );
            return;
        };
        let on_done = self.watch(&done).await.expect("the store notifies");
        let fp = fingerprint(b"watch");
        self.expect_in_flight(&done, &fp, &fp, "a watched record")
            .await;
        assert_eq!(
            holder
                .extend(&done, LeaseToken::random(), LONG)
                .await
                .expect("extend"),
            TokenOutcome::Fenced,
            "{}: a watched record still fences a stranger",
            self.name()
        );
        assert_eq!(
            holder
                .extend(&done, done_token, LONG)
                .await
                .expect("extend"),
            TokenOutcome::Applied,
            "{}: its holder still extends it",
            self.name()
        );
        let outcome = response(201, b"watched");
        assert_eq!(
            holder
                .complete(&done, done_token, &outcome, LONG)
                .await
                .expect("complete"),
            TokenOutcome::Applied
        );
        assert!(
            tokio::time::timeout(NOTIFIED_WITHIN, on_done).await.is_ok(),
            "{}: the completion woke its watch",
            self.name()
        );
        self.expect_completed(&done, &fp, &fp, &outcome, "a watched record, completed")
            .await;

        let on_released = self.watch(&released).await.expect("the store notifies");
        assert_eq!(
            holder
                .release(&released, released_token)
                .await
                .expect("release"),
            TokenOutcome::Applied
        );
        assert!(
            tokio::time::timeout(NOTIFIED_WITHIN, on_released)
                .await
                .is_ok(),
            "{}: the release woke its watch",
            self.name()
        );
        assert!(
            tokio::time::timeout(QUIET_FOR, &mut on_other)
                .await
                .is_err(),
            "{}: a watch on another record stayed quiet",
            self.name()
        );
    }

    /// 16 duplicates (on the store under test) wait for a first request (on
    /// the peer) that takes 600 ms: every one gets its replay, and each
    /// claims about 3 times (at once, after its watch began, after the
    /// wake-up; plus a fallback poll every 250 ms), where polling every
    /// 25 ms would claim about 24 times; most are woken by the completion
    /// itself, not by a fallback poll.
    pub async fn waiting_duplicates_are_woken(&self) {
        if self.watch(&fresh_id()).await.is_none() {
            return;
        }
        let config = IdempotencyConfig::builder()
            .wait_for_in_flight(Duration::from_secs(10))
            .build()
            .expect("config");
        // Each case on a key of its own, as the engine derives the record from it.
        let key = format!("k{:016x}", rand::random::<u64>());
        let first = Idempotency::from_arc(Arc::clone(self.holder()), config.clone());
        let counting = Arc::new(Hooked::new(Arc::clone(&self.store)));
        let waiting = Idempotency::new(Arc::clone(&counting), config);
        let Decision::Execute(execution) = decide(&first, &key).await else {
            panic!("{}: the first request was not executed", self.name());
        };
        let waiters: Vec<_> = (0..WAITERS)
            .map(|_| {
                let (waiting, key) = (waiting.clone(), key.clone());
                tokio::spawn(async move { decide(&waiting, &key).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let StoredOutcome::Response(stored) = response(201, b"first") else {
            unreachable!("a response")
        };
        execution.complete((*stored).clone()).await;
        for waiter in waiters {
            match waiter.await.expect("a waiter panicked") {
                Decision::Replay(replay) => assert_eq!(
                    *replay,
                    *stored,
                    "{}: a waiter replayed another response",
                    self.name()
                ),
                other => panic!("{}: a waiter did not replay: {other:?}", self.name()),
            }
        }
        let claims = counting.claims();
        assert!(
            claims <= 7 * WAITERS,
            "{}: {claims} claims for {WAITERS} waiters: they polled",
            self.name()
        );
        // Woken by the completion's notification, not by a fallback poll
        // (under which every watch is dropped unresolved); the ticks, at
        // 250 ms steps from the waiters' first claims, fall well away from
        // the completion at 600.
        let woken = counting.woken();
        assert!(
            woken >= WAITERS / 2,
            "{}: {woken} of {WAITERS} waiters were woken by the completion",
            self.name()
        );
    }
}

/// The engine's decision for a `POST /payments` with `key` and the body
/// `{"amount":1}`, as a test makes it.
pub async fn decide(engine: &Idempotency, key: &str) -> Decision {
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
