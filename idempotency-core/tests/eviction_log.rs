//! The memory store's eviction warnings, in a test binary of their own.
//!
//! The warning is counted by a subscriber set for this thread only, and
//! tracing caches per call site whether anyone listens. Beside other tests
//! that evict on other threads, with no subscriber, the call site could be
//! registered by one of them while this subscriber is being set, and be
//! cached as unheard: the count read 0 in 1 run of 8. Alone in its process,
//! the call site is registered by this test, under its subscriber.

use bytes::Bytes;
use idempotency_core::{
    Claim, ClaimOutcome, FakeClock, Fingerprint, LeaseToken, MemoryStore, RecordId, Store,
    StoredOutcome, StoredResponse, TokenOutcome,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Counts `warn` events (a minimal tracing subscriber).
#[derive(Clone, Default)]
struct Warnings(Arc<AtomicU64>);

impl tracing::Subscriber for Warnings {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::WARN {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

async fn claim_and_complete(store: &MemoryStore, n: u8) {
    let id = RecordId::from_parts(b"scope", &[n]);
    let hour = Duration::from_secs(3600);
    let fingerprint = Fingerprint::from_bytes([7; 32]);
    let claim = store.claim(
        &id,
        LeaseToken::random(),
        Claim {
            fingerprint: &fingerprint,
            lease: Duration::from_secs(30),
            ttl: hour,
        },
    );
    let Ok(ClaimOutcome::Acquired(token)) = claim.await else {
        panic!("claim {n} not acquired")
    };
    let outcome = StoredOutcome::response(StoredResponse {
        status: 201,
        headers: vec![],
        body: Bytes::from_static(b"ok"),
    });
    let done = store.complete(&id, token, &outcome, hour).await;
    assert_eq!(done.expect("complete"), TokenOutcome::Applied);
}

#[tokio::test]
async fn a_store_that_stays_full_logs_evictions_at_powers_of_two() {
    let warnings = Warnings::default();
    let _guard = tracing::subscriber::set_default(warnings.clone());
    let store = MemoryStore::with_clock(1, FakeClock::new());
    for n in 0..20 {
        claim_and_complete(&store, n).await;
    }
    assert_eq!(
        store.evictions(),
        19,
        "every claim after the first evicted one"
    );
    assert_eq!(
        warnings.0.load(Ordering::Relaxed),
        5,
        "logged at evictions 1, 2, 4, 8 and 16 only"
    );
}
