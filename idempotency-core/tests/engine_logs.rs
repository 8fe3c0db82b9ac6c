//! What the engine logs when a request fails for a reason the operator must
//! see: a transactional handler that answered 5xx (its transaction rolled
//! back), and a store whose pool is exhausted. In a test binary of its own,
//! every test under its own subscriber (see `eviction_log.rs` for why).

use bytes::Bytes;
use idempotency_core::conformance::{Hook, Hooked, Op};
use idempotency_core::{
    Chunks, Idempotency, IdempotencyConfig, Inspection, MemoryStore, Reply, StoreError,
};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use test_support::StagedStore;

/// Every event at `warn` or above, as `LEVEL message field=value ...`.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push_str(&format!(" {}={value}", field.name()));
    }
    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.0.push_str(&format!(" {}={value}", field.name()));
    }
}

impl tracing::Subscriber for Lines {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let level = *event.metadata().level();
        if level <= tracing::Level::WARN {
            let mut line = level.to_string();
            event.record(&mut Fields(&mut line));
            self.0.lock().unwrap().push(line);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

impl Lines {
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

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

/// `POST /payments` with `key`; the handler answers `status`. The status sent.
async fn post(engine: &Idempotency, key: &str, status: u16) -> u16 {
    let (head, ()) = http::Request::post("/payments")
        .header("idempotency-key", key)
        .body(())
        .expect("request")
        .into_parts();
    let Inspection::Pending(pending) = engine.inspect(&head, || None) else {
        panic!("a POST with a key is covered")
    };
    let reply = engine
        .respond(
            pending,
            Full(Some(Bytes::from_static(b"{}"))),
            |_| async move {
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

#[tokio::test]
async fn a_transactional_handler_that_answers_5xx_is_logged_as_rolled_back() {
    let lines = Lines::default();
    let _guard = tracing::subscriber::set_default(lines.clone());
    let engine = Idempotency::transactional(StagedStore::new(), IdempotencyConfig::default());
    assert_eq!(post(&engine, "fails", 500).await, 500);
    let all = lines.all();
    let rolled_back: Vec<_> = all.iter().filter(|l| l.contains("rolled back")).collect();
    assert_eq!(rolled_back.len(), 1, "one line: {all:#?}");
    let line = rolled_back[0];
    assert!(line.starts_with("WARN"), "{line}");
    assert!(line.contains("status=500"), "{line}");
    assert!(line.contains("route=POST /payments"), "{line}");
    // A stored answer commits, and says nothing at warn.
    assert_eq!(post(&engine, "fine", 201).await, 201);
    assert_eq!(lines.all().len(), all.len(), "{:#?}", lines.all());
}

#[tokio::test]
async fn an_exhausted_pool_is_named_in_the_engine_log_line() {
    let lines = Lines::default();
    let _guard = tracing::subscriber::set_default(lines.clone());
    let store = Hooked::with_hook(MemoryStore::new(), |op| match op {
        Op::Claim => Hook::Fail(Arc::new(|| StoreError::PoolExhausted {
            backend: "postgres",
            connections: 10,
        })),
        _ => Hook::Forward,
    });
    let engine = Idempotency::new(store, IdempotencyConfig::default());
    assert_eq!(post(&engine, "no-connection", 201).await, 503);
    let all = lines.all();
    assert!(
        all.iter().any(|l| l.starts_with("ERROR")
            && l.contains("pool exhausted (10 connections)")
            && !l.contains("did not answer")),
        "{all:#?}"
    );
}
