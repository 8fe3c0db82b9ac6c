//! The `Retry-After` of a 409 for a request in flight: a short hint by
//! default (1 s), configurable, never more than the lease.

use std::time::Duration;

use idempotency_core::{Decision, Idempotency, IdempotencyConfig, Inspection, MemoryStore};

/// Claims `key` with one engine, then asks again: the second is in flight.
async fn in_flight_retry_after(config: IdempotencyConfig) -> Option<u64> {
    let engine = Idempotency::new(MemoryStore::new(), config);
    let decide = || async {
        let (parts, ()) = http::Request::post("/payments")
            .header("idempotency-key", "k")
            .body(())
            .expect("request")
            .into_parts();
        let Inspection::Pending(pending) = engine.inspect(&parts, || None) else {
            panic!("not covered");
        };
        engine.decide(pending, b"{}").await
    };
    let Decision::Execute(first) = decide().await else {
        panic!("the first is not executed");
    };
    let Decision::Reject(problem) = decide().await else {
        panic!("the duplicate is not refused");
    };
    assert_eq!(problem.status(), 409);
    first.release().await;
    problem.retry_after_secs()
}

#[tokio::test]
async fn the_default_hint_is_one_second_not_the_lease() {
    let config = IdempotencyConfig::builder().build().expect("config");
    assert_eq!(in_flight_retry_after(config).await, Some(1));
}

#[tokio::test]
async fn the_hint_is_configurable_and_never_more_than_the_lease() {
    let five = IdempotencyConfig::builder()
        .in_flight_retry_after(Duration::from_secs(5))
        .build()
        .expect("config");
    assert_eq!(in_flight_retry_after(five).await, Some(5));
    let capped = IdempotencyConfig::builder()
        .in_flight_retry_after(Duration::from_secs(60))
        .lease(Duration::from_secs(3))
        .build()
        .expect("config");
    assert_eq!(in_flight_retry_after(capped).await, Some(3));
}
