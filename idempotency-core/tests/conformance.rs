//! The store conformance suite against the memory store, and against a
//! transactional store written outside the backends' crates
//! (`test_support::StagedStore`, core's public API only). The other
//! backends run it in their own crates' tests.
#![cfg(feature = "test-util")]

use idempotency_core::conformance::{Conformance, TransactionalConformance};
use idempotency_core::{FakeClock, MemoryStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_conforms_on_a_fake_clock() {
    let clock = FakeClock::new();
    Conformance::with_fake_clock(MemoryStore::with_clock(10_000, clock.clone()), clock)
        .run_all()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_conforms_on_the_system_clock() {
    Conformance::new(MemoryStore::new()).run_all().await;
}

/// A transactional store outside the backends' crates passes the same
/// cases, the transactional ones included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_staged_store_conforms_in_both_modes() {
    Conformance::new(test_support::StagedStore::new())
        .run_all()
        .await;
    TransactionalConformance::<test_support::Staged>::new(test_support::StagedStore::new())
        .run_all()
        .await;
}
