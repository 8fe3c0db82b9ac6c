//! The memory store's byte bound, through the engine: many requests whose
//! stored 4xx carries a large body (as a 400 that echoes a 1 MB field)
//! leave the store's bytes within its bound, and every eviction is counted
//! in `idempotency_memory_evictions_total`. The store's own count of its
//! bytes is checked, not the process's RSS.

use bytes::Bytes;
use idempotency_core::metrics::{eviction_reason, label, MEMORY_EVICTIONS_TOTAL};
use idempotency_core::{Chunks, Idempotency, IdempotencyConfig, Inspection, MemoryStore, Reply};
use std::pin::Pin;
use std::task::{Context, Poll};
use test_support::recorder::{recorded, DebuggingRecorder, Seen};

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

/// A `POST /payments` with `key`, whose handler answers 400 with `body`.
async fn post(engine: &Idempotency, key: &str, body: Bytes) -> u16 {
    let (head, ()) = http::Request::post("/payments")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(())
        .expect("request")
        .into_parts();
    let Inspection::Pending(pending) = engine.inspect(&head, || None) else {
        panic!("a POST with a key is covered")
    };
    let reply = engine
        .respond(pending, Full(Some(Bytes::from_static(b"{}"))), |_| async {
            let (head, ()) = http::Response::builder()
                .status(400)
                .header("content-type", "application/problem+json")
                .body(())
                .expect("response")
                .into_parts();
            Ok::<_, std::convert::Infallible>((head, Full(Some(body))))
        })
        .await
        .expect("infallible");
    match reply {
        Reply::Answer(answer) => answer.status(),
        Reply::Handler(head, _) => head.status.as_u16(),
    }
}

#[test]
fn large_stored_responses_stay_within_the_default_byte_bound_and_evictions_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let store = recorded(&recorder, async {
        // Built under the recorder: its counters are series from the start.
        let store = MemoryStore::new();
        let seen = Seen::take(&snapshotter);
        for reason in eviction_reason::ALL {
            let series = seen
                .values(MEMORY_EVICTIONS_TOTAL, &[(label::REASON, reason)])
                .count();
            assert_eq!(series, 1, "{reason} is registered at 0");
        }
        let engine = Idempotency::new(store.clone(), IdempotencyConfig::default());
        // 200 responses of 1 MB (the storable limit is 1 MiB): 200 MB
        // without the bound.
        for n in 0..200 {
            let body = Bytes::from(vec![b'x'; 1_000_000]);
            assert_eq!(post(&engine, &format!("big-{n}"), body).await, 400);
            assert!(
                store.bytes() <= store.max_bytes(),
                "{} bytes held after {n} responses",
                store.bytes()
            );
        }
        // The newest is replayed; the first was evicted and runs again.
        let replay = post(&engine, "big-199", Bytes::from_static(b"not run")).await;
        assert_eq!(replay, 400);
        store
    });
    assert_eq!(store.max_bytes(), 64 << 20, "the default bound");
    assert!(
        store.bytes() > 60 << 20,
        "it fills its bound: {}",
        store.bytes()
    );
    assert_eq!(store.len(), 67, "64 MiB hold 67 responses of 1 MB");
    assert_eq!(store.evictions(), 200 - 67);
    let seen = Seen::take(&snapshotter);
    let counted = |reason| seen.counter(MEMORY_EVICTIONS_TOTAL, &[(label::REASON, reason)]);
    assert_eq!(counted(eviction_reason::BYTES), store.evictions());
    assert_eq!(counted(eviction_reason::CAPACITY), 0);
}

#[test]
fn capacity_evictions_are_counted_under_their_own_reason() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let store = recorded(&recorder, async {
        let store = MemoryStore::with_capacity(3);
        let engine = Idempotency::new(store.clone(), IdempotencyConfig::default());
        for n in 0..10 {
            assert_eq!(
                post(&engine, &format!("k-{n}"), Bytes::from_static(b"{}")).await,
                400
            );
        }
        store
    });
    assert_eq!(store.evictions(), 7);
    let seen = Seen::take(&snapshotter);
    let counted = |reason| seen.counter(MEMORY_EVICTIONS_TOTAL, &[(label::REASON, reason)]);
    assert_eq!(counted(eviction_reason::CAPACITY), 7);
    assert_eq!(counted(eviction_reason::BYTES), 0);
}
