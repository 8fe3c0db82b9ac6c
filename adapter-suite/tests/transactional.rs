//! The suite's cases that apply to transactional mode, through both
//! adapters, with a transactional SQLite engine (a temporary file per case).
//! The suite's backend never asks for the transaction: the record alone
//! commits in it, which is what these cases check at the HTTP level.
//!
//! Not here, because they need what this mode does not have: an injected
//! clock (`lease_takeover_after_a_crash`, `records_expire_after_ttl`: the
//! SQLite store reads the database's time), a lease heartbeat
//! (`slow_handler_keeps_its_claim`: the handler is bounded by the
//! transaction timeout instead), a `Store` wrapper (`FailingStore`,
//! `HangingStore`, `SlowClaimStore`, the full memory store: the engine
//! needs a `TransactionalStore`), or fail-open (no meaning when the store
//! is the handler's database). Paused time is not used either: sqlx's
//! SQLite worker thread would let it auto-advance past the store timeout.

use adapter_suite::actix_adapter::ActixAdapter;
use adapter_suite::tower_adapter::TowerAdapter;
use adapter_suite::{config, Adapter, Backend, SuiteRequest, SuiteResponse};
use idempotency_core::{Idempotency, IdempotencyConfigBuilder};
use idempotency_sqlx::sqlite::SqliteStore;
use std::sync::Arc;
use std::time::Duration;
use test_support::{Hooked, Op, TempDb};

const PAYMENT: &str = r#"{"amount":100,"currency":"EUR"}"#;

async fn app_with<A: Adapter>(config: IdempotencyConfigBuilder) -> (A, Arc<Backend>, TempDb) {
    let file = TempDb::new("suite_tx");
    let store = SqliteStore::connect(&file.url())
        .await
        .expect("open the SQLite file");
    let engine = Idempotency::transactional(store, config.build().expect("valid config"));
    assert!(engine.is_transactional());
    let backend = Backend::new();
    (A::build(engine, Arc::clone(&backend)).await, backend, file)
}

async fn app<A: Adapter>() -> (A, Arc<Backend>, TempDb) {
    app_with::<A>(config()).await
}

fn assert_problem(res: &SuiteResponse, status: u16, kind: &str) {
    assert_eq!(res.status, status, "body: {}", res.body_str());
    assert_eq!(res.header("content-type"), Some("application/problem+json"));
    assert!(
        res.body_str()
            .contains(&format!("\"type\":\"urn:idempotency:problem:{kind}\"")),
        "{}",
        res.body_str()
    );
    assert!(!res.is_replay());
}

/// Sends a duplicate while `started` slow handlers hold the gate; fails if
/// the duplicate runs the handler too.
async fn send_duplicate<A: Adapter>(
    app: &A,
    backend: &Backend,
    req: SuiteRequest,
    started: usize,
) -> SuiteResponse {
    tokio::select! {
        r = app.send(req) => r,
        () = backend.started(started + 1) => panic!("the duplicate ran the handler while the first held the record"),
    }
}

fn patch(req: SuiteRequest) -> SuiteRequest {
    SuiteRequest {
        method: "PATCH".into(),
        ..req
    }
}

async fn first_request_runs_once_and_retry_replays<A: Adapter>() {
    let (app, backend, _f) = app::<A>().await;
    let first = app
        .send(SuiteRequest::post("/payments", "pay-1", PAYMENT))
        .await;
    assert_eq!(first.status, 201);
    assert!(!first.is_replay());
    for _ in 0..3 {
        let retry = app
            .send(SuiteRequest::post("/payments", "pay-1", PAYMENT))
            .await;
        assert!(retry.status == 201 && retry.is_replay());
        assert_eq!(retry.body, first.body);
        assert_eq!(retry.header("location"), first.header("location"));
        assert_eq!(
            retry.header("content-length"),
            Some(first.body.len().to_string().as_str())
        );
    }
    assert_eq!(backend.executions(), 1);
    let p = patch(SuiteRequest::post("/payments", "patch-1", PAYMENT));
    assert!(!app.send(p.clone()).await.is_replay());
    assert!(app.send(p).await.is_replay());
    assert_eq!(backend.executions(), 2);
}

async fn replay_drops_cookies_and_keeps_repeated_headers_in_order<A: Adapter>() {
    let (app, _, _f) = app::<A>().await;
    let first = app
        .send(SuiteRequest::post("/payments", "hdr", PAYMENT))
        .await;
    assert_eq!(first.all("set-cookie").len(), 2);
    let retry = app
        .send(SuiteRequest::post("/payments", "hdr", PAYMENT))
        .await;
    assert!(retry.is_replay());
    assert!(
        retry.all("set-cookie").is_empty(),
        "cookies are never replayed"
    );
    assert_eq!(
        retry.all("link"),
        vec![
            "</payments?page=1>; rel=\"first\"",
            "</payments?page=2>; rel=\"next\""
        ]
    );
    assert_eq!(retry.all("idempotent-replayed"), vec!["true"]);
}

async fn different_request_same_key_is_422<A: Adapter>() {
    let (app, backend, _f) = app::<A>().await;
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
        patch(SuiteRequest::post("/payments", "reuse", PAYMENT)),
    ];
    for v in variants {
        assert_problem(&app.send(v).await, 422, "key-reused");
    }
    assert_eq!(backend.executions(), 1);
}

/// In transactional mode a duplicate of a request in flight cannot see its
/// record (uncommitted): it is refused by the lock, so a different body
/// under the same key in flight gets 409, not 422 (it gets 422 once the
/// first has committed).
async fn in_flight_duplicate_is_409_with_retry_after<A: Adapter>() {
    let (app, backend, _f) = app::<A>().await;
    let req = SuiteRequest::post("/slow", "busy", PAYMENT);
    let other = SuiteRequest::post("/slow", "busy", "{}");
    let first = app.send(req.clone());
    let dups = async {
        backend.started(1).await;
        let same = send_duplicate(&app, &backend, req.clone(), 1).await;
        let different = send_duplicate(&app, &backend, other.clone(), 1).await;
        backend.open_gate();
        (same, different)
    };
    let (first, (same, different)) = futures_util::future::join(first, dups).await;
    assert_eq!(first.status, 201);
    assert_problem(&same, 409, "in-flight");
    let retry_after: u64 = same
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    assert_problem(&different, 409, "in-flight");
    let after = app.send(req).await;
    assert!(after.is_replay());
    assert_eq!(after.body, first.body);
    assert_problem(&app.send(other).await, 422, "key-reused");
    assert_eq!(backend.executions(), 1);
}

async fn in_flight_duplicate_can_wait_for_the_first<A: Adapter>() {
    let config = config().wait_for_in_flight(Duration::from_secs(10));
    let (app, backend, _f) = app_with::<A>(config).await;
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
    assert!(dup.is_replay(), "the duplicate waited: {}", dup.body_str());
    assert_eq!(dup.body, first.body);
    assert_eq!(backend.executions(), 1);
}

async fn waiting_for_the_first_is_bounded<A: Adapter>() {
    let config = config().wait_for_in_flight(Duration::from_millis(300));
    let (app, backend, _f) = app_with::<A>(config).await;
    let req = SuiteRequest::post("/slow", "bounded", PAYMENT);
    let first = app.send(req.clone());
    let dup = async {
        backend.started(1).await;
        let started = std::time::Instant::now();
        let dup = send_duplicate(&app, &backend, req.clone(), 1).await;
        let waited = started.elapsed();
        backend.open_gate();
        (dup, waited)
    };
    let (first, (dup, waited)) = futures_util::future::join(first, dup).await;
    assert_eq!(first.status, 201);
    assert_problem(&dup, 409, "in-flight");
    assert!(
        waited >= Duration::from_millis(300),
        "it waited the bound: {waited:?}"
    );
    assert_eq!(backend.executions(), 1);
}

async fn sixty_four_concurrent_duplicates_run_once<A: Adapter>() {
    let (app, backend, _f) = app::<A>().await;
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

async fn server_errors_and_transient_4xx_release_the_claim<A: Adapter>() {
    let (app, backend, _f) = app::<A>().await;
    let flaky = SuiteRequest::post("/flaky", "flaky", PAYMENT);
    assert_eq!(app.send(flaky.clone()).await.status, 500);
    let second = app.send(flaky.clone()).await;
    assert!(second.status == 201 && !second.is_replay(), "the retry ran");
    assert!(app.send(flaky).await.is_replay());
    assert_eq!(backend.executions_of("/flaky"), 2);
    for status in [408, 409, 425, 429, 500, 502, 503] {
        let path = format!("/status/{status}");
        let req = SuiteRequest::post(&path, &format!("s{status}"), PAYMENT);
        let a = app.send(req.clone()).await;
        let b = app.send(req).await;
        assert_eq!((a.status, b.status), (status, status));
        assert!(!b.is_replay(), "{status} is not stored");
        assert_eq!(backend.executions_of(&path), 2, "{status} rolled back");
    }
}

/// The rollback of a panicked request is the transaction's drop: the
/// retry runs at once (no 409 window, unlike the claim's release task).
async fn a_handler_that_panics_releases_the_claim<A: Adapter>() {
    let (app, backend, _f) = app::<A>().await;
    let req = SuiteRequest::post("/panic", "panics", PAYMENT);
    let panics = adapter_suite::panics_on_this_thread();
    assert!(app.try_send(req.clone()).await.is_none());
    assert_eq!(backend.executions_of("/panic"), 1);
    let retry = app.send(req.clone()).await;
    assert_eq!(retry.status, 201, "the retry ran: {}", retry.body_str());
    assert!(!retry.is_replay());
    assert_eq!(backend.executions_of("/panic"), 2);
    let replay = app.send(req).await;
    assert!(replay.is_replay() && replay.body == retry.body);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        adapter_suite::panics_on_this_thread() - panics,
        1,
        "only the handler panicked"
    );
}

async fn client_errors_are_stored_and_replayed<A: Adapter>() {
    let (app, backend, _f) = app::<A>().await;
    for status in [400, 404, 410, 422] {
        let path = format!("/status/{status}");
        let req = SuiteRequest::post(&path, &format!("c{status}"), PAYMENT);
        assert_eq!(app.send(req.clone()).await.status, status);
        let again = app.send(req).await;
        assert!(
            again.status == status && again.is_replay(),
            "{status} is stored"
        );
        assert_eq!(backend.executions_of(&path), 1);
    }
}

async fn response_over_storable_limit_reaches_client_and_is_never_rerun<A: Adapter>() {
    let (app, backend, _f) = app_with::<A>(config().max_stored_response(4096)).await;
    let req = SuiteRequest::post("/big/10000", "huge", PAYMENT);
    let first = app.send(req.clone()).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body.len(), 10_000, "the client gets the whole body");
    assert!(first
        .body
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (i % 251) as u8));
    assert_problem(&app.send(req).await, 410, "not-replayable");
    assert_eq!(backend.executions(), 1, "never re-run");
    let ok = SuiteRequest::post("/big/4096", "fits", PAYMENT);
    assert_eq!(app.send(ok.clone()).await.body.len(), 4096);
    assert!(app.send(ok).await.is_replay());
}

async fn client_disconnect_still_completes<A: Adapter>() {
    let (app, backend, _f) = app::<A>().await;
    let req = SuiteRequest::post("/slow", "gone", PAYMENT);
    {
        let send = app.send(req.clone());
        futures_util::pin_mut!(send);
        tokio::select! {
            _ = &mut send => panic!("the handler is gated; the request cannot finish"),
            () = backend.started(1) => {}
        }
    }
    backend.open_gate();
    backend.finished(1).await;
    // The detached rest commits in a task of its own: 409 until it has.
    let mut retry = app.send(req.clone()).await;
    for _ in 0..200 {
        if retry.status != 409 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        retry = app.send(req.clone()).await;
    }
    assert_eq!(retry.status, 201, "{}", retry.body_str());
    assert!(
        retry.is_replay(),
        "the abandoned request committed its response"
    );
    assert_eq!(backend.executions(), 1);
}

async fn scopes_never_meet<A: Adapter>() {
    let (app, backend, _f) = app::<A>().await;
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
    assert!(!b.is_replay());
    assert_ne!(a.body, b.body);
    assert_eq!(app.send(alice).await.body, a.body);
    assert_eq!(app.send(bob).await.body, b.body);
    assert_eq!(backend.executions(), 2);
}

/// Duplicates that wait for a transaction of this process are woken when it
/// commits, not polled: over the 600 ms the first holds its transaction,
/// each tries to begin about 3 times (at once, once more after it starts
/// watching, and after the wake-up), where polling every 25 ms would try
/// about 24 times.
async fn waiting_duplicates_wake_when_the_transaction_of_this_process_ends<A: Adapter>() {
    const DUPLICATES: usize = 8;
    let file = TempDb::new("suite_tx_wake");
    let store = Arc::new(Hooked::new(
        SqliteStore::connect(&file.url())
            .await
            .expect("open the SQLite file"),
    ));
    let config = config()
        .wait_for_in_flight(Duration::from_secs(10))
        .build()
        .expect("config");
    let backend = Backend::new();
    let app = A::build(
        Idempotency::transactional(Arc::clone(&store), config),
        Arc::clone(&backend),
    )
    .await;
    let req = SuiteRequest::post("/slow", "wake", PAYMENT);
    let first = app.send(req.clone());
    let duplicates = async {
        backend.started(1).await;
        let opener = async {
            tokio::time::sleep(Duration::from_millis(600)).await;
            backend.open_gate();
        };
        let all = futures_util::future::join_all((0..DUPLICATES).map(|_| app.send(req.clone())));
        futures_util::future::join(all, opener).await.0
    };
    let (first, duplicates) = futures_util::future::join(first, duplicates).await;
    assert_eq!(first.status, 201);
    for dup in &duplicates {
        assert!(dup.is_replay(), "a duplicate waited: {}", dup.body_str());
        assert_eq!(dup.body, first.body);
    }
    assert_eq!(backend.executions(), 1);
    let begins = usize::try_from(store.calls(Op::Begin)).expect("a count");
    assert!(
        begins <= 1 + 5 * DUPLICATES,
        "{begins} begins for {DUPLICATES} waiting duplicates: they polled"
    );
    drop(file);
}

macro_rules! cases {
    ($adapter:ty, #[$rt:meta], $($case:ident),* $(,)?) => {$(
        #[$rt]
        async fn $case() {
            let limit = Duration::from_secs(30);
            if tokio::time::timeout(limit, super::$case::<$adapter>()).await.is_err() {
                panic!("{} did not finish within {limit:?}", stringify!($case));
            }
        }
    )*};
}

macro_rules! suite {
    ($adapter:ty, #[$rt:meta]) => {
        use super::*;
        cases!($adapter, #[$rt],
            first_request_runs_once_and_retry_replays,
            replay_drops_cookies_and_keeps_repeated_headers_in_order,
            different_request_same_key_is_422,
            in_flight_duplicate_is_409_with_retry_after,
            in_flight_duplicate_can_wait_for_the_first,
            waiting_for_the_first_is_bounded,
            sixty_four_concurrent_duplicates_run_once,
            server_errors_and_transient_4xx_release_the_claim,
            a_handler_that_panics_releases_the_claim,
            client_errors_are_stored_and_replayed,
            response_over_storable_limit_reaches_client_and_is_never_rerun,
            client_disconnect_still_completes,
            scopes_never_meet,
            waiting_duplicates_wake_when_the_transaction_of_this_process_ends,
        );
    };
}

mod tower {
    suite!(TowerAdapter, #[tokio::test]);
}

mod actix {
    suite!(ActixAdapter, #[actix_web::test]);
}
