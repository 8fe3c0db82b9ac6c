//! The tower and actix adapters give the same statuses, headers and bodies
//! for one script of requests covering every kind of answer.
//!
//! Normalisation, and nothing else:
//! - the order of *different* header names is ignored: actix-web's
//!   `HeaderMap` is a hash map and keeps no order across names (the order of
//!   repeated values of one name is compared, as are all values);
//! - actix writes `Content-Length` on the wire from the body's size, where
//!   axum puts it in the header map: the actix adapter adds it the way
//!   actix's HTTP/1 encoder does (only when absent, so a wrong one set by the
//!   middleware still shows).
//! - a `HEAD` answer's body is dropped, as both servers do on the wire:
//!   axum drops it in its router, actix in its HTTP/1 encoder, which the
//!   in-process test service skips (its status and headers, `Content-Length`
//!   included, are compared as they are).
//!
//! `compared_headers()` already leaves out framework defaults such as `date`.

use adapter_suite::actix_adapter::ActixAdapter;
use adapter_suite::tower_adapter::TowerAdapter;
use adapter_suite::{config, failing_store, Adapter, Backend, SuiteRequest, SuiteResponse};
use idempotency_core::{FailureMode, Idempotency, IdempotencyConfigBuilder, MemoryStore, Store};
use std::sync::Arc;

const PAYMENT: &str = r#"{"amount":100,"currency":"EUR"}"#;

type Step = (&'static str, SuiteResponse);

async fn build<A: Adapter>(
    store: impl Store,
    config: IdempotencyConfigBuilder,
) -> (A, Arc<Backend>) {
    let backend = Backend::new();
    let engine = Idempotency::new(store, config.build().expect("valid config"));
    (A::build(engine, Arc::clone(&backend)).await, backend)
}

/// The script: every row of DESIGN section 4, through one adapter.
async fn script<A: Adapter>() -> Vec<Step> {
    let (app, backend) = build::<A>(
        MemoryStore::new(),
        config().max_request_body(1024).max_stored_response(4096),
    )
    .await;
    let mut steps: Vec<Step> = Vec::new();
    let pay = SuiteRequest::post("/payments", "p-1", PAYMENT);
    steps.push(("first", app.send(pay.clone()).await));
    steps.push(("replay", app.send(pay.clone()).await));
    steps.push((
        "replay, quoted key",
        app.send(SuiteRequest::post("/payments", "\"p-1\"", PAYMENT))
            .await,
    ));
    steps.push((
        "422 body",
        app.send(SuiteRequest::post("/payments", "p-1", "{}")).await,
    ));
    steps.push((
        "422 path",
        app.send(SuiteRequest::post("/refunds", "p-1", PAYMENT))
            .await,
    ));
    steps.push((
        "400 missing key",
        app.send(pay.clone().without_header("idempotency-key"))
            .await,
    ));
    steps.push((
        "400 invalid key",
        app.send(
            pay.clone()
                .without_header("idempotency-key")
                .header("idempotency-key", "\"unterminated"),
        )
        .await,
    ));
    steps.push((
        "400 two keys",
        app.send(pay.clone().header("idempotency-key", "p-2")).await,
    ));
    let big = "x".repeat(1025);
    steps.push((
        "413 declared",
        app.send(SuiteRequest::post("/payments", "big-1", &big).header("content-length", "1025"))
            .await,
    ));
    steps.push((
        "413 streamed",
        app.send(SuiteRequest::post("/payments", "big-2", &big))
            .await,
    ));
    let failing = SuiteRequest::post("/status/500", "s-500", PAYMENT);
    steps.push(("500", app.send(failing.clone()).await));
    steps.push(("500 released, runs again", app.send(failing).await));
    let flaky = SuiteRequest::post("/flaky", "flaky", PAYMENT);
    steps.push(("flaky 500", app.send(flaky.clone()).await));
    steps.push(("flaky retry 201", app.send(flaky.clone()).await));
    steps.push(("flaky replay", app.send(flaky).await));
    let client_error = SuiteRequest::post("/status/404", "s-404", PAYMENT);
    steps.push(("404", app.send(client_error.clone()).await));
    steps.push(("404 replay", app.send(client_error).await));
    let large = SuiteRequest::post("/big/10000", "large", PAYMENT);
    steps.push(("large response", app.send(large.clone()).await));
    steps.push(("410 not replayable", app.send(large).await));
    let fits = SuiteRequest::post("/big/4096", "fits", PAYMENT);
    steps.push(("stored at the limit", app.send(fits.clone()).await));
    steps.push(("replay at the limit", app.send(fits).await));
    // 409 while the first is in flight, then its replay.
    let slow = SuiteRequest::post("/slow", "slow", PAYMENT);
    let first = app.send(slow.clone());
    let dup = async {
        backend.started(1).await;
        let r = app.send(slow.clone()).await;
        backend.open_gate();
        r
    };
    let (first, dup) = futures_util::future::join(first, dup).await;
    steps.push(("slow first", first));
    steps.push(("409 in flight", dup));
    steps.push(("slow replay", app.send(slow).await));
    steps.push((
        "GET passes through",
        app.send(SuiteRequest::new("GET", "/payments")).await,
    ));
    steps.push((
        "HEAD passes through",
        on_the_wire(
            "HEAD",
            app.send(SuiteRequest::new("HEAD", "/payments").header("idempotency-key", "p-1"))
                .await,
        ),
    ));
    steps.push((
        "PUT passes through",
        app.send(SuiteRequest::new("PUT", "/payments").header("idempotency-key", "p-1"))
            .await,
    ));
    let (down, _) = build::<A>(failing_store(), config()).await;
    steps.push((
        "503 outage",
        down.send(SuiteRequest::post("/payments", "down", PAYMENT))
            .await,
    ));
    let (open, _) = build::<A>(failing_store(), config().failure_mode(FailureMode::Open)).await;
    steps.push((
        "fail-open",
        open.send(SuiteRequest::post("/payments", "open", PAYMENT))
            .await,
    ));
    steps
}

/// The response as an HTTP/1 server sends it for `method`: no body to `HEAD`.
fn on_the_wire(method: &str, mut res: SuiteResponse) -> SuiteResponse {
    if method == "HEAD" {
        res.body = Default::default();
    }
    res
}

fn normalised(res: &SuiteResponse) -> Vec<(String, Vec<u8>)> {
    let mut headers = res.compared_headers();
    // Stable: repeated values of one name keep their order.
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    headers
}

#[actix_web::test]
async fn tower_and_actix_answer_alike() {
    let tower = script::<TowerAdapter>().await;
    let actix = script::<ActixAdapter>().await;
    assert_eq!(tower.len(), actix.len());
    let mut differences = Vec::new();
    for ((label, t), (_, a)) in tower.iter().zip(&actix) {
        if t.status != a.status {
            differences.push(format!(
                "{label}: status tower {} actix {}",
                t.status, a.status
            ));
        }
        if normalised(t) != normalised(a) {
            differences.push(format!(
                "{label}: headers\n  tower {:?}\n  actix {:?}",
                printable(&normalised(t)),
                printable(&normalised(a))
            ));
        }
        if t.body != a.body {
            differences.push(format!(
                "{label}: body\n  tower {}\n  actix {}",
                t.body_str(),
                a.body_str()
            ));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    // The script did cover what it claims to.
    let statuses: Vec<u16> = tower.iter().map(|(_, r)| r.status).collect();
    for s in [200, 201, 400, 404, 409, 410, 413, 422, 500, 503] {
        assert!(statuses.contains(&s), "the script never saw {s}");
    }
    assert!(tower.iter().filter(|(_, r)| r.is_replay()).count() >= 5);
    // HEAD answers as GET does, without the body, on both.
    for steps in [&tower, &actix] {
        let step = |label: &str| {
            steps
                .iter()
                .find(|(l, _)| *l == label)
                .map(|(_, r)| r)
                .expect(label)
        };
        let (get, head) = (step("GET passes through"), step("HEAD passes through"));
        assert_eq!(head.status, get.status);
        assert_eq!(head.compared_headers(), get.compared_headers());
        assert!(head.body.is_empty() && !get.body.is_empty());
    }
}

fn printable(headers: &[(String, Vec<u8>)]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
        .collect()
}
