//! Requests through an engine, as the tests make them.

use idempotency_core::{Decision, Idempotency, Inspection};

/// The engine's decision for a `POST /payments` with `key` and the body
/// `{"amount":1}`.
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
