//! The cases, one per row of DESIGN section 4 and per guarantee. Each builds
//! its own engine and backend, so cases are independent.

use crate::{
    config, failing_store, hanging_store, slow_claim_store, Adapter, Backend, SuiteRequest,
    SuiteResponse,
};
use idempotency_core::Claim;
use idempotency_core::{
    FailureMode, FakeClock, Fingerprint, Idempotency, IdempotencyKey, LeaseToken, MemoryStore,
    RecordId, Scope, Store, TokioClock,
};
use std::sync::Arc;
use std::time::Duration;

const PAYMENT: &str = r#"{"amount":100,"currency":"EUR"}"#;

async fn app<A: Adapter>(store: impl Store) -> (A, Arc<Backend>) {
    app_with::<A>(store, config()).await
}

async fn app_with<A: Adapter>(
    store: impl Store,
    config: idempotency_core::IdempotencyConfigBuilder,
) -> (A, Arc<Backend>) {
    let backend = Backend::new();
    let engine = Idempotency::new(store, config.build().expect("valid config"));
    (A::build(engine, Arc::clone(&backend)).await, backend)
}

/// Sends a duplicate while `started` slow handlers hold the gate; fails
/// (instead of hanging on the gate) if the duplicate runs the handler too.
async fn send_duplicate<A: Adapter>(
    app: &A,
    backend: &Backend,
    req: SuiteRequest,
    started: usize,
) -> SuiteResponse {
    tokio::select! {
        r = app.send(req) => r,
        () = backend.started(started + 1) => panic!("the duplicate ran the handler while the first held the claim"),
    }
}

/// Sends `req` until it gets something other than 409 (at most 100 times,
/// yielding in between): for a claim that a task of its own settles (a
/// release, a detached request's completion), which runs once the case
/// yields.
async fn retry_past_409<A: Adapter>(app: &A, req: &SuiteRequest) -> SuiteResponse {
    let mut res = app.send(req.clone()).await;
    for _ in 0..100 {
        if res.status != 409 {
            break;
        }
        tokio::task::yield_now().await;
        res = app.send(req.clone()).await;
    }
    res
}

fn assert_problem(res: &SuiteResponse, status: u16, type_suffix: &str) {
    assert_eq!(res.status, status, "body: {}", res.body_str());
    assert_eq!(res.header("content-type"), Some("application/problem+json"));
    let body = res.body_str();
    for member in ["\"type\":", "\"title\":", "\"status\":", "\"detail\":"] {
        assert!(body.contains(member), "problem lacks {member}: {body}");
    }
    assert!(
        body.contains(&format!(
            "\"type\":\"urn:idempotency:problem:{type_suffix}\""
        )),
        "unexpected type: {body}"
    );
    assert!(body.contains(&format!("\"status\":{status}")), "{body}");
    assert!(!res.is_replay());
}

pub async fn not_covered_methods_pass_through<A: Adapter>() {
    let (app, backend) = app::<A>(MemoryStore::new()).await;
    for method in ["GET", "PUT", "DELETE"] {
        let req = SuiteRequest::new(method, "/payments").header("idempotency-key", "k1");
        let a = app.send(req.clone()).await;
        let b = app.send(req).await;
        assert!(!a.is_replay() && !b.is_replay(), "{method}");
        if method != "GET" {
            assert_eq!((a.status, b.status), (201, 201), "{method} runs every time");
        }
    }
    assert_eq!(backend.executions(), 4, "PUT and DELETE ran twice each");
    // Without a key too.
    assert_eq!(
        app.send(SuiteRequest::new("GET", "/payments")).await.status,
        200
    );
}

pub async fn missing_key_is_400<A: Adapter>() {
    let (app, backend) = app::<A>(MemoryStore::new()).await;
    for method in ["POST", "PATCH"] {
        let res = app
            .send(
                SuiteRequest::post("/payments", "x", PAYMENT)
                    .without_header("idempotency-key")
                    .tap_method(method),
            )
            .await;
        assert_problem(&res, 400, "missing-key");
    }
    assert_eq!(backend.executions(), 0);
}

pub async fn invalid_keys_are_400<A: Adapter>() {
    let (app, backend) = app::<A>(MemoryStore::new()).await;
    let too_long = "k".repeat(256);
    let bad: Vec<Vec<u8>> = vec![
        too_long.into_bytes(),
        b"\"\"".to_vec(),
        b"\"unterminated".to_vec(),
        b"\"a\"b".to_vec(),
        b"\"a\";param=1".to_vec(),
        vec![b'k', 0x80, b'k'],
    ];
    for value in bad {
        let res = app
            .send(
                SuiteRequest::post("/payments", "x", PAYMENT)
                    .without_header("idempotency-key")
                    .header("idempotency-key", &value),
            )
            .await;
        assert_problem(&res, 400, "invalid-key");
    }
    let twice = SuiteRequest::post("/payments", "a", PAYMENT).header("idempotency-key", "b");
    assert_problem(&app.send(twice).await, 400, "invalid-key");
    let twice_same = SuiteRequest::post("/payments", "a", PAYMENT).header("idempotency-key", "a");
    assert_problem(&app.send(twice_same).await, 400, "invalid-key");
    assert_eq!(backend.executions(), 0);
    // 255 characters is still fine.
    let max = "m".repeat(255);
    assert_eq!(
        app.send(SuiteRequest::post("/payments", &max, PAYMENT))
            .await
            .status,
        201
    );
}

pub async fn quoted_and_bare_keys_are_the_same_key<A: Adapter>() {
    let (app, backend) = app::<A>(MemoryStore::new()).await;
    let first = app
        .send(SuiteRequest::post("/payments", "\"order-7\"", PAYMENT))
        .await;
    let retry = app
        .send(SuiteRequest::post("/payments", "order-7", PAYMENT))
        .await;
    assert_eq!(first.status, 201);
    assert!(retry.is_replay());
    assert_eq!(retry.body, first.body);
    assert_eq!(backend.executions(), 1);
}

pub async fn body_over_limit_is_413<A: Adapter>() {
    let (app, backend) = app_with::<A>(MemoryStore::new(), config().max_request_body(1024)).await;
    let big = "x".repeat(1025);
    let declared = SuiteRequest::post("/payments", "big-1", &big).header("content-length", "1025");
    assert_problem(&app.send(declared).await, 413, "body-too-large");
    // Without a Content-Length the limit is enforced while reading.
    let streamed = SuiteRequest::post("/payments", "big-2", &big);
    assert_problem(&app.send(streamed).await, 413, "body-too-large");
    assert_eq!(backend.executions(), 0);
    let fits = SuiteRequest::post("/payments", "fits", &"y".repeat(1024));
    assert_eq!(app.send(fits).await.status, 201);
}

pub async fn first_request_runs_once_and_retry_replays<A: Adapter>() {
    let (app, backend) = app::<A>(MemoryStore::new()).await;
    let first = app
        .send(SuiteRequest::post("/payments", "pay-1", PAYMENT))
        .await;
    assert_eq!(first.status, 201);
    assert!(!first.is_replay());
    for _ in 0..3 {
        let retry = app
            .send(SuiteRequest::post("/payments", "pay-1", PAYMENT))
            .await;
        assert_eq!(retry.status, 201);
        assert!(retry.is_replay());
        assert_eq!(retry.body, first.body);
        assert_eq!(retry.header("location"), first.header("location"));
        assert_eq!(retry.header("content-type"), Some("application/json"));
        assert_eq!(
            retry.header("content-length"),
            Some(first.body.len().to_string().as_str())
        );
    }
    assert_eq!(backend.executions(), 1);
    // PATCH is covered by default too.
    let patch = SuiteRequest::post("/payments", "patch-1", PAYMENT).tap_method("PATCH");
    assert!(!app.send(patch.clone()).await.is_replay());
    assert!(app.send(patch).await.is_replay());
    assert_eq!(backend.executions(), 2);
}

pub async fn replay_drops_cookies_and_keeps_repeated_headers_in_order<A: Adapter>() {
    let (app, _) = app::<A>(MemoryStore::new()).await;
    let first = app
        .send(SuiteRequest::post("/payments", "hdr", PAYMENT))
        .await;
    assert_eq!(
        first.all("set-cookie").len(),
        2,
        "the first response keeps its cookies"
    );
    let retry = app
        .send(SuiteRequest::post("/payments", "hdr", PAYMENT))
        .await;
    assert!(retry.is_replay());
    assert!(
        retry.all("set-cookie").is_empty(),
        "cookies are never replayed"
    );
    assert_ne!(
        retry.header("date"),
        Some("Thu, 26 Nov 2026 12:00:00 GMT"),
        "the stored Date is not replayed"
    );
    assert_eq!(
        retry.all("link"),
        vec![
            "</payments?page=1>; rel=\"first\"",
            "</payments?page=2>; rel=\"next\""
        ]
    );
    assert_eq!(retry.all("idempotent-replayed"), vec!["true"]);
    assert_eq!(retry.all("content-length").len(), 1);
}

pub async fn different_request_same_key_is_422<A: Adapter>() {
    let (app, backend) = app::<A>(MemoryStore::new()).await;
    assert_eq!(
        app.send(SuiteRequest::post("/payments", "reuse", PAYMENT))
            .await
            .status,
        201
    );
    let variants = [
        SuiteRequest::post("/payments", "reuse", r#"{"amount":200,"currency":"EUR"}"#),
        SuiteRequest::post("/payments?x=1", "reuse", PAYMENT),
        SuiteRequest::post("/refunds", "reuse", PAYMENT),
        SuiteRequest::post("/payments", "reuse", PAYMENT).tap_method("PATCH"),
        SuiteRequest::post("/payments", "reuse", PAYMENT)
            .without_header("content-type")
            .header("content-type", "text/plain"),
    ];
    for v in variants {
        assert_problem(&app.send(v).await, 422, "key-reused");
    }
    // And while in flight.
    let slow = SuiteRequest::post("/slow", "reuse-in-flight", PAYMENT);
    let other = SuiteRequest::post("/slow", "reuse-in-flight", "{}");
    let first = app.send(slow.clone());
    let second = async {
        backend.started(1).await;
        let r = send_duplicate(&app, &backend, other, 1).await;
        backend.open_gate();
        r
    };
    let (first, second) = futures_util::future::join(first, second).await;
    assert_eq!(first.status, 201);
    assert_problem(&second, 422, "key-reused");
    assert_eq!(backend.executions(), 2, "one /payments, one /slow");
}

pub async fn in_flight_duplicate_is_409_with_retry_after<A: Adapter>() {
    let (app, backend) = app::<A>(MemoryStore::new()).await;
    let req = SuiteRequest::post("/slow", "busy", PAYMENT);
    let first = app.send(req.clone());
    let dup = async {
        backend.started(1).await;
        let r = send_duplicate(&app, &backend, req.clone(), 1).await;
        backend.open_gate();
        r
    };
    let (first, dup) = futures_util::future::join(first, dup).await;
    assert_eq!(first.status, 201);
    assert_problem(&dup, 409, "in-flight");
    let retry_after: u64 = dup
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    let after = app.send(req).await;
    assert!(after.is_replay());
    assert_eq!(after.body, first.body);
    assert_eq!(backend.executions(), 1);
}

pub async fn in_flight_duplicate_can_wait_for_the_first<A: Adapter>() {
    tokio::time::pause();
    let config = config().wait_for_in_flight(Duration::from_secs(10));
    let (app, backend) = app_with::<A>(MemoryStore::new(), config).await;
    let req = SuiteRequest::post("/slow", "wait", PAYMENT);
    let first = app.send(req.clone());
    let dup = async {
        backend.started(1).await;
        let opener = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            backend.open_gate();
        };
        let (dup, ()) =
            futures_util::future::join(send_duplicate(&app, &backend, req.clone(), 1), opener)
                .await;
        dup
    };
    let (first, dup) = futures_util::future::join(first, dup).await;
    assert_eq!(first.status, 201);
    assert!(
        dup.is_replay(),
        "the duplicate waited and got the stored response: {}",
        dup.body_str()
    );
    assert_eq!(dup.body, first.body);
    assert_eq!(backend.executions(), 1);
}

pub async fn waiting_for_the_first_is_bounded<A: Adapter>() {
    tokio::time::pause();
    let config = config().wait_for_in_flight(Duration::from_secs(1));
    let (app, backend) = app_with::<A>(MemoryStore::new(), config).await;
    let req = SuiteRequest::post("/slow", "bounded", PAYMENT);
    let first = app.send(req.clone());
    let dup = async {
        backend.started(1).await;
        let started = tokio::time::Instant::now();
        let dup = send_duplicate(&app, &backend, req.clone(), 1).await;
        let waited = started.elapsed();
        backend.open_gate();
        (dup, waited)
    };
    let (first, (dup, waited)) = futures_util::future::join(first, dup).await;
    assert_eq!(first.status, 201);
    assert_problem(&dup, 409, "in-flight");
    assert!(
        waited >= Duration::from_secs(1),
        "it waited the bound first: {waited:?}"
    );
    assert_eq!(backend.executions(), 1);
}

pub async fn sixty_four_concurrent_duplicates_run_once<A: Adapter>() {
    let (app, backend) = app::<A>(MemoryStore::new()).await;
    let req = SuiteRequest::post("/payments", "storm", PAYMENT);
    let all = futures_util::future::join_all((0..64).map(|_| app.send(req.clone()))).await;
    assert_eq!(backend.executions(), 1, "the handler ran exactly once");
    let originals: Vec<_> = all
        .iter()
        .filter(|r| r.status == 201 && !r.is_replay())
        .collect();
    assert_eq!(originals.len(), 1);
    for r in &all {
        match r.status {
            201 => assert_eq!(r.body, originals[0].body),
            409 => assert_problem(r, 409, "in-flight"),
            s => panic!("unexpected status {s}: {}", r.body_str()),
        }
    }
    assert!(app.send(req).await.is_replay());
}

pub async fn server_errors_and_transient_4xx_release_the_claim<A: Adapter>() {
    let (app, backend) = app::<A>(MemoryStore::new()).await;
    let flaky = SuiteRequest::post("/flaky", "flaky", PAYMENT);
    assert_eq!(app.send(flaky.clone()).await.status, 500);
    let second = app.send(flaky.clone()).await;
    assert_eq!(second.status, 201, "the retry ran the handler again");
    assert!(!second.is_replay());
    assert!(app.send(flaky).await.is_replay());
    assert_eq!(backend.executions_of("/flaky"), 2);
    for status in [408, 409, 425, 429, 500, 502, 503] {
        let path = format!("/status/{status}");
        let req = SuiteRequest::post(&path, &format!("s{status}"), PAYMENT);
        let a = app.send(req.clone()).await;
        let b = app.send(req).await;
        assert_eq!((a.status, b.status), (status, status));
        assert!(!b.is_replay(), "{status} is not stored");
        assert_eq!(
            backend.executions_of(&path),
            2,
            "{status} released the claim"
        );
    }
}

/// A handler that panics is like one that answered 5xx: nothing is stored,
/// the claim is released, and the retry runs the handler. The framework (or
/// a catch-panic layer) drops the request's future after the panic; that
/// future must not be handed off to finish in the background, as after a
/// client disconnect: it cannot be polled again (it would only panic again).
pub async fn a_handler_that_panics_releases_the_claim<A: Adapter>() {
    let (app, backend) = app::<A>(MemoryStore::new()).await;
    let req = SuiteRequest::post("/panic", "panics", PAYMENT);
    let panics = crate::panics_on_this_thread();
    let first = app.try_send(req.clone()).await;
    assert!(first.is_none(), "the handler's panic reaches the framework");
    assert_eq!(backend.executions_of("/panic"), 1);
    // The release runs in a task of its own: until it has, the claim is in
    // flight and a retry gets 409.
    let retry = retry_past_409(&app, &req).await;
    assert_eq!(retry.status, 201, "the retry ran: {}", retry.body_str());
    assert!(!retry.is_replay());
    assert_eq!(backend.executions_of("/panic"), 2);
    let replay = app.send(req).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, retry.body);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        crate::panics_on_this_thread() - panics,
        1,
        "only the handler panicked (a request future polled again after its panic panics too)"
    );
}

pub async fn client_errors_are_stored_and_replayed<A: Adapter>() {
    let (app, backend) = app::<A>(MemoryStore::new()).await;
    for status in [400, 404, 410, 422] {
        let path = format!("/status/{status}");
        let req = SuiteRequest::post(&path, &format!("c{status}"), PAYMENT);
        assert_eq!(app.send(req.clone()).await.status, status);
        let again = app.send(req).await;
        assert_eq!(again.status, status);
        assert!(again.is_replay(), "{status} is stored");
        assert_eq!(backend.executions_of(&path), 1);
    }
}

pub async fn response_over_storable_limit_reaches_client_and_is_never_rerun<A: Adapter>() {
    let (app, backend) =
        app_with::<A>(MemoryStore::new(), config().max_stored_response(4096)).await;
    let req = SuiteRequest::post("/big/10000", "huge", PAYMENT);
    let first = app.send(req.clone()).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body.len(), 10_000, "the client gets the whole body");
    assert!(first
        .body
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (i % 251) as u8));
    let retry = app.send(req).await;
    assert_problem(&retry, 410, "not-replayable");
    assert_eq!(backend.executions(), 1, "never re-run");
    // Just under the limit is stored.
    let ok = SuiteRequest::post("/big/4096", "fits", PAYMENT);
    assert_eq!(app.send(ok.clone()).await.body.len(), 4096);
    assert!(app.send(ok).await.is_replay());
}

pub async fn client_disconnect_still_completes<A: Adapter>() {
    let (app, backend) = app::<A>(MemoryStore::new()).await;
    let req = SuiteRequest::post("/slow", "gone", PAYMENT);
    {
        let send = app.send(req.clone());
        futures_util::pin_mut!(send);
        // Drive the request until the handler runs, then drop it: the client hung up.
        tokio::select! {
            _ = &mut send => panic!("the handler is gated; the request cannot finish"),
            () = backend.started(1) => {}
        }
    }
    backend.open_gate();
    backend.finished(1).await;
    // Give the detached task its turn to store the response.
    let retry = retry_past_409(&app, &req).await;
    assert_eq!(retry.status, 201, "{}", retry.body_str());
    assert!(
        retry.is_replay(),
        "the abandoned request's response was stored"
    );
    assert_eq!(backend.executions(), 1);
}

/// The client goes away while its claim is on the wire (the store may have
/// recorded it already): the request still runs to its end, so the retry
/// replays instead of getting 409 until the lease passes.
pub async fn client_disconnect_during_the_claim_still_completes<A: Adapter>() {
    let store = slow_claim_store(Duration::from_millis(50));
    let (app, backend) = app::<A>(store).await;
    let req = SuiteRequest::post("/payments", "gone-early", PAYMENT);
    {
        let send = app.send(req.clone());
        futures_util::pin_mut!(send);
        // Drive the request into its claim, then drop it: the client hung up.
        assert!(
            tokio::time::timeout(Duration::from_millis(10), &mut send)
                .await
                .is_err(),
            "the claim takes 50 ms; the request cannot have finished"
        );
        assert_eq!(backend.executions(), 0, "dropped during the claim");
    }
    // The detached request claims, runs the handler and stores its response.
    let mut retry = app.send(req.clone()).await;
    for _ in 0..100 {
        if retry.status != 409 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        retry = app.send(req.clone()).await;
    }
    assert_eq!(retry.status, 201, "{}", retry.body_str());
    assert!(
        retry.is_replay(),
        "the abandoned request's response was stored"
    );
    assert_eq!(backend.executions(), 1);
}

fn record_of(scope: &str, key: &str) -> RecordId {
    RecordId::new(
        &Scope::new(scope),
        &IdempotencyKey::parse(key.as_bytes()).expect("key"),
    )
}

pub async fn lease_takeover_after_a_crash<A: Adapter>() {
    let clock = FakeClock::new();
    let store = MemoryStore::with_clock(100, clock.clone());
    let (app, backend) =
        app_with::<A>(store.clone(), config().lease(Duration::from_secs(30))).await;
    // Another instance claimed this request and died: its claim is never completed.
    let fp = Fingerprint::compute(
        "POST",
        "/payments",
        None,
        Some(b"application/json"),
        PAYMENT.as_bytes(),
    );
    let crashed = store
        .claim(
            &record_of("", "crash"),
            LeaseToken::random(),
            Claim {
                fingerprint: &fp,
                lease: Duration::from_secs(30),
                ttl: Duration::from_secs(3600),
            },
        )
        .await
        .expect("claim");
    assert!(matches!(
        crashed,
        idempotency_core::ClaimOutcome::Acquired(_)
    ));
    let req = SuiteRequest::post("/payments", "crash", PAYMENT);
    assert_problem(&app.send(req.clone()).await, 409, "in-flight");
    clock.advance(Duration::from_secs(31));
    let taken = app.send(req.clone()).await;
    assert_eq!(taken.status, 201);
    assert!(!taken.is_replay(), "the retry took the claim over and ran");
    assert!(app.send(req).await.is_replay());
    assert_eq!(backend.executions(), 1);
}

pub async fn records_expire_after_ttl<A: Adapter>() {
    let clock = FakeClock::new();
    let store = MemoryStore::with_clock(100, clock.clone());
    let (app, backend) = app_with::<A>(store, config().ttl(Duration::from_secs(60))).await;
    let req = SuiteRequest::post("/payments", "ttl", PAYMENT);
    app.send(req.clone()).await;
    clock.advance(Duration::from_secs(59));
    assert!(app.send(req.clone()).await.is_replay());
    clock.advance(Duration::from_secs(2));
    let fresh = app.send(req).await;
    assert!(!fresh.is_replay(), "after the ttl the key is new again");
    assert_eq!(backend.executions(), 2);
}

pub async fn scopes_never_meet<A: Adapter>() {
    let (app, backend) = app::<A>(MemoryStore::new()).await;
    let alice = SuiteRequest::post("/payments", "shared-key", PAYMENT)
        .header("authorization", "Bearer alice");
    let bob = SuiteRequest::post(
        "/payments",
        "shared-key",
        r#"{"amount":5,"currency":"USD"}"#,
    )
    .header("authorization", "Bearer bob");
    let a = app.send(alice.clone()).await;
    let b = app.send(bob.clone()).await;
    assert_eq!((a.status, b.status), (201, 201), "no 422 across scopes");
    assert!(!b.is_replay(), "bob never gets alice's response");
    assert_ne!(a.body, b.body);
    assert_eq!(app.send(alice).await.body, a.body);
    assert_eq!(app.send(bob).await.body, b.body);
    assert_eq!(backend.executions(), 2);
}

pub async fn slow_handler_keeps_its_claim<A: Adapter>() {
    tokio::time::pause();
    let store = MemoryStore::with_clock(100, TokioClock::new());
    let (app, backend) = app_with::<A>(store, config().lease(Duration::from_secs(2))).await;
    let req = SuiteRequest::post("/slow", "slow", PAYMENT);
    let first = app.send(req.clone());
    let later = async {
        backend.started(1).await;
        // Five leases pass while the handler runs; the heartbeat extends it.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let dup = send_duplicate(&app, &backend, req.clone(), 1).await;
        backend.open_gate();
        dup
    };
    let (first, dup) = futures_util::future::join(first, later).await;
    assert_problem(&dup, 409, "in-flight");
    assert_eq!(first.status, 201);
    assert!(app.send(req).await.is_replay());
    assert_eq!(backend.executions(), 1);
}

pub async fn store_outage_fails_closed<A: Adapter>() {
    let (app, backend) = app::<A>(failing_store()).await;
    let res = app
        .send(SuiteRequest::post("/payments", "down", PAYMENT))
        .await;
    assert_problem(&res, 503, "store-unavailable");
    assert!(res.header("retry-after").is_some());
    assert!(
        !res.body_str().contains("refused"),
        "store errors are never shown to the client"
    );
    assert_eq!(backend.executions(), 0);
    assert_eq!(
        app.send(SuiteRequest::new("GET", "/payments")).await.status,
        200,
        "uncovered requests still work"
    );
}

pub async fn store_timeout_fails_closed<A: Adapter>() {
    tokio::time::pause();
    let (app, backend) = app_with::<A>(
        hanging_store(),
        config().store_timeout(Duration::from_millis(500)),
    )
    .await;
    let res = app
        .send(SuiteRequest::post("/payments", "slow-store", PAYMENT))
        .await;
    assert_problem(&res, 503, "store-unavailable");
    assert_eq!(backend.executions(), 0);
}

pub async fn store_outage_fail_open_runs_handler<A: Adapter>() {
    let (app, backend) =
        app_with::<A>(failing_store(), config().failure_mode(FailureMode::Open)).await;
    let res = app
        .send(SuiteRequest::post("/payments", "open", PAYMENT))
        .await;
    assert_eq!(res.status, 201);
    assert!(!res.is_replay());
    assert_eq!(backend.executions(), 1);
}

pub async fn full_memory_store_is_503<A: Adapter>() {
    let store = MemoryStore::with_capacity(1);
    let (app, backend) = app::<A>(store).await;
    // One request holds the only slot in flight.
    let first = app.send(SuiteRequest::post("/slow", "slot", PAYMENT));
    let second = async {
        backend.started(1).await;
        let r = app
            .send(SuiteRequest::post("/payments", "other", PAYMENT))
            .await;
        backend.open_gate();
        r
    };
    let (first, second) = futures_util::future::join(first, second).await;
    assert_eq!(first.status, 201);
    assert_problem(&second, 503, "store-unavailable");
    // Completed records are evicted to make room.
    assert_eq!(
        app.send(SuiteRequest::post("/payments", "third", PAYMENT))
            .await
            .status,
        201
    );
}

/// A client that stops sending its body (a chunked body that never ends,
/// or fewer bytes than its `Content-Length`) gets 408 within the engine's
/// bound, and the handler never runs; its connection is to be closed.
pub async fn a_body_that_never_ends_is_408<A: Adapter>() {
    tokio::time::pause();
    let bound = Duration::from_secs(5);
    let (app, backend) =
        app_with::<A>(MemoryStore::new(), config().request_body_timeout(bound)).await;
    let chunked = SuiteRequest::post("/payments", "stalled", r#"{"amount":"#).stalled();
    let short = SuiteRequest::post("/payments", "short", r#"{"amount":1"#)
        .header("content-length", "100")
        .stalled();
    for req in [chunked, short] {
        let started = tokio::time::Instant::now();
        let res = app.send(req.clone()).await;
        let waited = started.elapsed();
        assert_problem(&res, 408, "request-timeout");
        assert_eq!(res.header("connection"), Some("close"), "{:?}", res.headers);
        assert!(
            waited >= bound && waited < bound + Duration::from_secs(1),
            "answered after {waited:?}, the bound is {bound:?}"
        );
        // Nothing was claimed: the same key with a whole body runs.
        let whole = SuiteRequest {
            stall: false,
            ..req
        }
        .without_header("content-length")
        .body(PAYMENT);
        assert_eq!(app.send(whole).await.status, 201);
    }
    assert_eq!(backend.executions(), 2, "only the whole requests ran");
}

/// `Authorization: a` and `Authorization: b` name no one scope: which one
/// the engine picked would decide whose records the request reads.
pub async fn a_repeated_scope_header_is_400<A: Adapter>() {
    let (app, backend) = app::<A>(MemoryStore::new()).await;
    let twice = SuiteRequest::post("/payments", "scope-twice", PAYMENT)
        .header("authorization", "Bearer alice")
        .header("authorization", "Bearer bob");
    let res = app.send(twice).await;
    assert_problem(&res, 400, "ambiguous-scope");
    assert!(
        res.body_str().contains("authorization"),
        "{}",
        res.body_str()
    );
    assert_eq!(backend.executions(), 0);
    let same_twice = SuiteRequest::post("/payments", "scope-twice", PAYMENT)
        .header("authorization", "Bearer alice")
        .header("authorization", "Bearer alice");
    assert_problem(&app.send(same_twice).await, 400, "ambiguous-scope");
    let once = SuiteRequest::post("/payments", "scope-twice", PAYMENT)
        .header("authorization", "Bearer alice");
    assert_eq!(app.send(once).await.status, 201);
    assert_eq!(backend.executions(), 1);
}

trait TapMethod {
    fn tap_method(self, method: &str) -> Self;
}

impl TapMethod for SuiteRequest {
    fn tap_method(mut self, method: &str) -> Self {
        method.clone_into(&mut self.method);
        self
    }
}
