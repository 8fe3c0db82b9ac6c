//! The metrics, seen through `metrics-util`'s `DebuggingRecorder`: every
//! decision counts once under its outcome, and every store call that failed
//! counts under its backend and op; a store call that waits is timed, one
//! that answers at once is not. (Transactional mode's counts: in
//! idempotency-sqlx's tests, on SQLite.)

use std::sync::Arc;
use std::time::Duration;

use idempotency_core::metrics::{
    op, outcome, REQUESTS_TOTAL, STORE_DURATION_SECONDS, STORE_ERRORS_TOTAL,
};
use idempotency_core::{
    Claim, ClaimOutcome, FailureMode, Idempotency, LeaseToken, MemoryStore, RecordId, Store,
    StoreError, StoreFuture, StoredOutcome, TokenOutcome,
};
use test_support::recorder::{config, post, recorded, DebuggingRecorder, MetricKind, Seen};

/// A body over the 64-byte limit of [`config`].
const TOO_LARGE: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

#[test]
fn every_decision_counts_once_under_its_outcome() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let statuses = recorded(&recorder, async {
        idempotency_core::metrics::describe();
        let engine = Idempotency::new(MemoryStore::new(), config().build().expect("config"));
        let mut statuses = Vec::new();
        for key in ["a", "b", "c"] {
            statuses.push(post(&engine, key, r#"{"n":1}"#, None).await);
        }
        for _ in 0..2 {
            statuses.push(post(&engine, "a", r#"{"n":1}"#, None).await);
        }
        statuses.push(post(&engine, "a", r#"{"n":2}"#, None).await);
        statuses.push(post(&engine, "", r#"{"n":1}"#, None).await);
        statuses.push(post(&engine, "d", TOO_LARGE, None).await);
        // A duplicate while the first is still in its handler.
        let gate = tokio::sync::Notify::new();
        let (first, second) = tokio::join!(post(&engine, "e", r#"{"n":1}"#, Some(&gate)), async {
            let status = post(&engine, "e", r#"{"n":1}"#, None).await;
            gate.notify_one();
            status
        });
        statuses.extend([first, second]);
        statuses
    });
    assert_eq!(statuses, [201, 201, 201, 201, 201, 422, 400, 413, 201, 409]);
    // executed, replayed, conflict, mismatch, rejected, unavailable, unguarded
    let seen = Seen::take(&snapshotter);
    assert_eq!(seen.outcomes(), [4, 2, 1, 1, 2, 0, 0]);
    // Every outcome is a series from `describe` on, at 0 if nothing happened.
    assert_eq!(
        seen.series(MetricKind::Counter, REQUESTS_TOTAL),
        outcome::ALL.len()
    );
    // The memory store answers at once: no call is timed, none failed, and
    // its error series exist (at 0) from the engine's creation.
    assert_eq!(
        seen.series(MetricKind::Histogram, STORE_DURATION_SECONDS),
        0
    );
    assert_eq!(
        seen.series(MetricKind::Counter, STORE_ERRORS_TOTAL),
        op::ALL.len()
    );
    for op in op::ALL {
        assert_eq!(seen.errors("memory", op), 0, "{op}");
    }
}

/// How a [`Scripted`] store answers.
#[derive(Clone, Copy)]
enum Mode {
    /// An error, at once.
    FailNow,
    /// An error, after a wait.
    FailLater,
    /// Never (the store timeout passes).
    Hang,
    /// The memory store's answer, after a wait.
    Slow,
}

/// A store that fails, hangs or is slow, as its mode says.
struct Scripted {
    mode: Mode,
    memory: MemoryStore,
}

impl Scripted {
    fn new(mode: Mode) -> Self {
        Self {
            mode,
            memory: MemoryStore::new(),
        }
    }

    fn answer<'a, T: Send + 'a>(
        &'a self,
        ok: StoreFuture<'a, Result<T, StoreError>>,
    ) -> StoreFuture<'a, Result<T, StoreError>> {
        let failed = || StoreError::backend("scripted", "scripted failure");
        match self.mode {
            Mode::FailNow => StoreFuture::ready(Err(failed())),
            Mode::FailLater => StoreFuture::new(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Err(failed())
            }),
            Mode::Hang => StoreFuture::new(std::future::pending()),
            Mode::Slow => StoreFuture::new(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                ok.await
            }),
        }
    }
}

impl Store for Scripted {
    fn claim<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> StoreFuture<'a, Result<ClaimOutcome, StoreError>> {
        self.answer(self.memory.claim(id, token, claim))
    }
    fn complete<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        outcome: &'a StoredOutcome,
        ttl: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        self.answer(self.memory.complete(id, token, outcome, ttl))
    }
    fn release<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        self.answer(self.memory.release(id, token))
    }
    fn extend<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        self.answer(self.memory.extend(id, token, lease))
    }
    fn backend(&self) -> &'static str {
        "scripted"
    }
}

/// Runs two requests on a [`Scripted`] store in `mode` under `failure`; the
/// statuses, the outcomes' counts, the claim errors and the timed claims.
fn on_scripted(mode: Mode, failure: FailureMode) -> (Vec<u16>, [u64; 7], u64, usize) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let config = config()
        .failure_mode(failure)
        .store_timeout(Duration::from_millis(20))
        .build()
        .expect("config");
    let statuses = recorded(&recorder, async {
        let engine = Idempotency::from_arc(Arc::new(Scripted::new(mode)), config);
        vec![
            post(&engine, "a", "{}", None).await,
            post(&engine, "b", "{}", None).await,
        ]
    });
    let seen = Seen::take(&snapshotter);
    (
        statuses,
        seen.outcomes(),
        seen.errors("scripted", op::CLAIM),
        seen.timed("scripted", op::CLAIM),
    )
}

#[test]
fn a_failing_store_counts_its_errors_and_fail_closed_is_unavailable() {
    for mode in [Mode::FailNow, Mode::FailLater, Mode::Hang] {
        let (statuses, outcomes, errors, timed) = on_scripted(mode, FailureMode::Closed);
        assert_eq!(statuses, [503, 503]);
        assert_eq!(outcomes, [0, 0, 0, 0, 0, 2, 0]);
        assert_eq!(errors, 2, "every failed claim is a store error");
        // A call that waits is timed, failed or not; one answered at once is not.
        let waits = !matches!(mode, Mode::FailNow);
        assert_eq!(timed, if waits { 2 } else { 0 });
    }
}

#[test]
fn fail_open_counts_unguarded_not_executed() {
    let (statuses, outcomes, errors, _) = on_scripted(Mode::FailNow, FailureMode::Open);
    assert_eq!(statuses, [201, 201]);
    assert_eq!(outcomes, [0, 0, 0, 0, 0, 0, 2]);
    assert_eq!(errors, 2);
}

#[test]
fn a_store_call_that_waits_is_timed_per_op() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let statuses = recorded(&recorder, async {
        let engine = Idempotency::from_arc(
            Arc::new(Scripted::new(Mode::Slow)),
            config().build().expect("config"),
        );
        vec![
            post(&engine, "a", "{}", None).await,
            post(&engine, "a", "{}", None).await,
        ]
    });
    assert_eq!(statuses, [201, 201]);
    let seen = Seen::take(&snapshotter);
    assert_eq!(seen.outcomes(), [1, 1, 0, 0, 0, 0, 0]);
    assert_eq!(seen.timed("scripted", op::CLAIM), 2);
    assert_eq!(seen.timed("scripted", op::COMPLETE), 1);
    assert_eq!(seen.timed("scripted", op::RELEASE), 0);
    for op in op::ALL {
        assert_eq!(seen.errors("scripted", op), 0, "{op}");
    }
}
