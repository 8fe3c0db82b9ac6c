//! The metrics, seen through `metrics-util`'s `DebuggingRecorder`: every
//! decision counts once under its outcome, and every store call that failed
//! counts under its backend and op; a store call that waits is timed, one
//! that answers at once is not.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use idempotency_core::metrics::{
    label, op, outcome, REQUESTS_TOTAL, STORE_DURATION_SECONDS, STORE_ERRORS_TOTAL,
};
use idempotency_core::{
    Chunks, Claim, ClaimOutcome, FailureMode, Idempotency, IdempotencyConfig, Inspection,
    LeaseToken, MemoryStore, RecordId, Reply, Store, StoreError, StoreFuture, StoredOutcome,
    TokenOutcome,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;

/// A body held in memory.
struct Full(Option<Bytes>);

impl Chunks for Full {
    type Error = std::convert::Infallible;

    fn poll_chunk(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Poll::Ready(self.get_mut().0.take().map(Ok))
    }
}

/// Runs `f` on a current-thread runtime with `recorder` as the thread's
/// recorder, so that every task it spawns records there too.
fn recorded<F: Future>(recorder: &DebuggingRecorder, f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    metrics::with_local_recorder(recorder, || rt.block_on(f))
}

/// One snapshot of a recorder (taking it resets the recorder's counters).
struct Seen(Vec<(MetricKind, metrics::Key, DebugValue)>);

impl Seen {
    fn take(snapshotter: &Snapshotter) -> Self {
        Self(
            snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .map(|(key, _, _, value)| {
                    let (kind, key) = key.into_parts();
                    (kind, key, value)
                })
                .collect(),
        )
    }

    /// The values of the metric `name` with exactly `labels`.
    fn values<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a DebugValue> + 'a {
        self.0.iter().filter_map(move |(_, key, value)| {
            let mine: Vec<_> = key.labels().map(|l| (l.key(), l.value())).collect();
            (key.name() == name && mine == labels).then_some(value)
        })
    }

    /// The counter `name` with `labels`, 0 if absent.
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.values(name, labels)
            .map(|v| match v {
                DebugValue::Counter(n) => *n,
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .sum()
    }

    /// Every request outcome's count, in the order of [`outcome::ALL`].
    fn outcomes(&self) -> [u64; 7] {
        outcome::ALL.map(|o| self.counter(REQUESTS_TOTAL, &[(label::OUTCOME, o)]))
    }

    /// The store errors of `backend` and `op`.
    fn errors(&self, backend: &str, op: &str) -> u64 {
        self.counter(
            STORE_ERRORS_TOTAL,
            &[(label::BACKEND, backend), (label::OP, op)],
        )
    }

    /// How many samples the store latency histogram of `backend` and `op` has.
    fn timed(&self, backend: &str, op: &str) -> usize {
        self.values(
            STORE_DURATION_SECONDS,
            &[(label::BACKEND, backend), (label::OP, op)],
        )
        .map(|v| match v {
            DebugValue::Histogram(samples) => samples.len(),
            other => panic!("not a histogram: {other:?}"),
        })
        .sum()
    }

    /// How many series of `name` of this kind there are.
    fn series(&self, kind: MetricKind, name: &str) -> usize {
        self.0
            .iter()
            .filter(|(k, key, _)| *k == kind && key.name() == name)
            .count()
    }
}

/// One `POST /payments` with `key` (none if empty) and `body`, whose
/// handler answers 201 after `gate` (if any) lets it; the status sent.
async fn post(
    engine: &Idempotency,
    key: &str,
    body: &'static str,
    gate: Option<&tokio::sync::Notify>,
) -> u16 {
    post_answering(engine, key, body, gate, Duration::ZERO, 201).await
}

/// [`post`], the handler taking `delay` and answering `status`.
async fn post_answering(
    engine: &Idempotency,
    key: &str,
    body: &'static str,
    gate: Option<&tokio::sync::Notify>,
    delay: Duration,
    status: u16,
) -> u16 {
    let mut request = http::Request::post("/payments").header("content-type", "application/json");
    if !key.is_empty() {
        request = request.header("idempotency-key", key);
    }
    let (head, ()) = request.body(()).expect("request").into_parts();
    let pending = match engine.inspect(&head, || None) {
        Inspection::Pending(pending) => pending,
        Inspection::Reject(problem) => return problem.status(),
        Inspection::PassThrough => panic!("a POST is covered"),
    };
    let reply = engine
        .respond(
            pending,
            Full(Some(Bytes::from_static(body.as_bytes()))),
            |_| async move {
                if let Some(gate) = gate {
                    gate.notified().await;
                }
                tokio::time::sleep(delay).await;
                let (head, ()) = http::Response::builder()
                    .status(status)
                    .body(())
                    .expect("response")
                    .into_parts();
                Ok::<_, std::convert::Infallible>((head, Full(Some(Bytes::from_static(b"{}")))))
            },
        )
        .await
        .expect("infallible");
    match reply {
        Reply::Answer(answer) => answer.status(),
        Reply::Handler(head, _) => head.status.as_u16(),
    }
}

/// A body over the 64-byte limit of [`config`].
const TOO_LARGE: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

fn config() -> idempotency_core::IdempotencyConfigBuilder {
    IdempotencyConfig::builder().max_request_body(64)
}

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

/// Transactional mode (SQLite): executed once its transaction commits or
/// its answer is not stored; a transaction that times out is unavailable.
#[cfg(feature = "sqlite")]
#[test]
fn transactional_mode_counts_at_the_end_of_the_transaction() {
    let dir = std::env::temp_dir().join(format!(
        "core-metrics-{}-{:?}",
        std::process::id(),
        std::time::Instant::now()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("records.sqlite");
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let statuses = recorded(&recorder, async {
        let store = idempotency_core::store::sqlite::SqliteStore::connect(
            path.to_str().expect("utf-8 path"),
        )
        .await
        .expect("sqlite");
        let config = config()
            .transaction_timeout(Duration::from_millis(100))
            .build()
            .expect("config");
        let engine = Idempotency::transactional(store, config);
        let slow = Duration::from_millis(400);
        vec![
            post(&engine, "a", "{}", None).await,
            post(&engine, "a", "{}", None).await,
            post(&engine, "a", r#"{"n":2}"#, None).await,
            post_answering(&engine, "b", "{}", None, Duration::ZERO, 500).await,
            post_answering(&engine, "c", "{}", None, slow, 201).await,
        ]
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(statuses, [201, 201, 422, 500, 503]);
    // executed, replayed, conflict, mismatch, rejected, unavailable, unguarded
    assert_eq!(Seen::take(&snapshotter).outcomes(), [2, 1, 0, 1, 0, 1, 0]);
}
