//! What the metrics tests share: requests through an engine on a
//! `metrics-util` `DebuggingRecorder`, and what the recorder saw.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use idempotency_core::metrics::{
    label, outcome, REQUESTS_TOTAL, STORE_DURATION_SECONDS, STORE_ERRORS_TOTAL,
};
use idempotency_core::{Chunks, Idempotency, IdempotencyConfig, Inspection, Reply};
pub use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
pub use metrics_util::MetricKind;

/// A body held in memory.
pub struct Full(Option<Bytes>);

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
pub fn recorded<F: Future>(recorder: &DebuggingRecorder, f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    metrics::with_local_recorder(recorder, || rt.block_on(f))
}

/// One snapshot of a recorder (taking it resets the recorder's counters).
pub struct Seen(Vec<(MetricKind, metrics::Key, DebugValue)>);

impl Seen {
    pub fn take(snapshotter: &Snapshotter) -> Self {
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
    pub fn values<'a>(
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
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.values(name, labels)
            .map(|v| match v {
                DebugValue::Counter(n) => *n,
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .sum()
    }

    /// Every request outcome's count, in the order of [`outcome::ALL`].
    pub fn outcomes(&self) -> [u64; 7] {
        outcome::ALL.map(|o| self.counter(REQUESTS_TOTAL, &[(label::OUTCOME, o)]))
    }

    /// The store errors of `backend` and `op`.
    pub fn errors(&self, backend: &str, op: &str) -> u64 {
        self.counter(
            STORE_ERRORS_TOTAL,
            &[(label::BACKEND, backend), (label::OP, op)],
        )
    }

    /// How many samples the store latency histogram of `backend` and `op` has.
    pub fn timed(&self, backend: &str, op: &str) -> usize {
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
    pub fn series(&self, kind: MetricKind, name: &str) -> usize {
        self.0
            .iter()
            .filter(|(k, key, _)| *k == kind && key.name() == name)
            .count()
    }
}

/// One `POST /payments` with `key` (none if empty) and `body`, whose
/// handler answers 201 after `gate` (if any) lets it; the status sent.
pub async fn post(
    engine: &Idempotency,
    key: &str,
    body: &'static str,
    gate: Option<&tokio::sync::Notify>,
) -> u16 {
    post_answering(engine, key, body, gate, Duration::ZERO, 201).await
}

/// [`post`], the handler taking `delay` and answering `status`.
pub async fn post_answering(
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

/// The config the metrics tests start from: request bodies up to 64 bytes.
pub fn config() -> idempotency_core::IdempotencyConfigBuilder {
    IdempotencyConfig::builder().max_request_body(64)
}
