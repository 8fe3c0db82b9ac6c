//! Transactional mode through the axum extractor (`Transaction<T>`), on
//! PostgreSQL and SQLite: the handler's effect (a row in a table of its own)
//! and the idempotency record commit together, or not at all.
//!
//! - a fresh request writes one row; its retry replays and writes nothing; a
//!   different body under the same key is 422;
//! - concurrent duplicates: one row, one 201, every other answer 409 with
//!   `Retry-After`, sent while the first is still in its handler; two
//!   engines over two pools (two instances) likewise (PostgreSQL);
//! - a 500 or a panic rolls back the effect and the record: the retry runs;
//! - the transaction bound: 503 `transaction-timeout`, rolled back;
//! - pool exhaustion: 503 `store-unavailable` within the store timeout;
//! - the extractor without a transaction: 500 `internal`, handler not run;
//! - on the wire (PostgreSQL, through a counting proxy): one COMMIT for a
//!   fresh request, none for a replay, and the statement round trips.
//!
//! `DATABASE_URL` is read at run time; the PostgreSQL tests print why they
//! skip and pass when it is unset. The SQLite tests use a temporary file and
//! always run.
#![cfg(all(feature = "axum", feature = "postgres", feature = "sqlite"))]

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use futures_util::FutureExt;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use idempotency_core::{Idempotency, IdempotencyConfig, MemoryStore};
use idempotency_sqlx::postgres::{PostgresOptions, PostgresStore};
use idempotency_tower::{IdempotencyLayer, Transaction};
use test_support::mode::{BUSY, FAIL, OK, PANIC, SLOW};
use test_support::{run_prefix, Answer, Fixture, FixtureDb, Probe};
use tower::ServiceExt;

// ------------------------------------------------------------- the handler

/// Inserts one row (the request body as its note) in the request's
/// transaction, then answers as the probe says.
async fn pay<D: FixtureDb>(
    State(probe): State<Arc<Probe>>,
    mut tx: Transaction<sqlx::Transaction<'static, D>>,
    body: Bytes,
) -> Response {
    let (status, body) = probe.run::<D>(&mut tx, &body).await;
    (StatusCode::from_u16(status).expect("a status"), body).into_response()
}

fn config() -> idempotency_core::IdempotencyConfigBuilder {
    IdempotencyConfig::builder()
        .lease(Duration::from_secs(10))
        .ttl(Duration::from_secs(120))
}

fn app<D: FixtureDb>(engine: Idempotency, probe: &Arc<Probe>) -> Router {
    Router::new()
        .route("/p", post(pay::<D>))
        .layer(IdempotencyLayer::new(engine))
        .with_state(Arc::clone(probe))
}

fn transactional<D: FixtureDb>(fixture: &Fixture<D>, config: IdempotencyConfig) -> Idempotency {
    Idempotency::transactional(fixture.store.clone(), config)
}

// -------------------------------------------------------------- the client

/// This run's prefix of every key (see [`run_prefix`]).
fn run() -> &'static str {
    run_prefix("tower")
}

/// A POST to `/p`; `key` is unique to its test (prefixed with [`run`]).
fn request(key: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri("/p")
        .header("idempotency-key", format!("{}-{key}", run()))
        .header("content-type", "text/plain")
        .body(Body::from(body.to_owned()))
        .expect("request")
}

/// Sends one request; `None` when the app panicked (caught where the
/// future is polled, as a server's connection task does).
async fn try_send(app: &Router, req: Request<Body>) -> Option<Answer> {
    let call = AssertUnwindSafe(app.clone().oneshot(req)).catch_unwind();
    let (head, body) = call.await.ok()?.expect("infallible").into_parts();
    let header = |name: &str| {
        head.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let body = body.collect().await.expect("body").to_bytes();
    Some(Answer::new(head.status.as_u16(), header, body))
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    try_send(app, req).await.expect("the app panicked")
}

/// Runs a generic test on both databases, each in a multi-thread runtime.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$name::<sqlx::Postgres>(concat!(stringify!($name), "::postgres")).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name::<sqlx::Sqlite>(concat!(stringify!($name), "::sqlite")).await
            }
        }
    )*};
}

on_both!(
    fresh_replay_and_mismatch,
    concurrent_duplicates_write_one_row,
    server_error_rolls_back,
    panic_rolls_back,
    transaction_timeout_rolls_back,
    pool_exhaustion_is_503_within_the_store_timeout,
    extractor_without_a_transaction_is_500,
    transient_4xx_rolls_back,
    too_large_response_commits_not_replayable,
    waiting_duplicates_get_the_replay,
);

// ----------------------------------------------------------------- 1

async fn fresh_replay_and_mismatch<D: FixtureDb>(test: &str) {
    let Some(fx) = D::open(test, 4).await else {
        return;
    };
    let probe = Probe::new(&fx.table);
    let app = app::<D>(transactional(&fx, config().build().unwrap()), &probe);

    let first = send(&app, request("k1", "amount=100")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert!(!first.replayed);
    assert_eq!(first.body, "paid amount=100 run 1");
    assert_eq!(fx.rows().await, 1);

    let retry = send(&app, request("k1", "amount=100")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(retry.replayed, "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.content_type, first.content_type);
    assert_eq!(
        (probe.runs(), fx.rows().await),
        (1, 1),
        "the retry wrote nothing"
    );

    let other = send(&app, request("k1", "amount=999")).await;
    other.assert_problem(422, "key-reused");
    assert_eq!((probe.runs(), fx.rows().await), (1, 1));
    fx.cleanup().await;
}

// ----------------------------------------------------------------- 2

async fn concurrent_duplicates_write_one_row<D: FixtureDb>(test: &str) {
    const N: usize = 16;
    let Some(fx) = D::open(test, 10).await else {
        return;
    };
    let probe = Probe::new(&fx.table);
    probe.set(OK, Duration::from_millis(300));
    let app = app::<D>(transactional(&fx, config().build().unwrap()), &probe);
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let (app, barrier) = (app.clone(), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                send(&app, request("dup", "amount=100")).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("task"));
    }
    let created: Vec<_> = answers
        .iter()
        .filter(|a| a.status == StatusCode::CREATED)
        .collect();
    let conflicts: Vec<_> = answers
        .iter()
        .filter(|a| a.status == StatusCode::CONFLICT)
        .collect();
    assert_eq!(
        (created.len(), conflicts.len()),
        (1, N - 1),
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    assert!(!created[0].replayed);
    for c in &conflicts {
        c.assert_problem(409, "in-flight");
        assert!(c.retry_after.is_some(), "409 without Retry-After: {c:?}");
    }
    assert_eq!((probe.runs(), fx.rows().await), (1, 1));

    // Every 409 came back while the first was still in its handler.
    let start = probe.started.lock().unwrap()[0];
    let end = probe.ended.lock().unwrap()[0];
    let latest = conflicts.iter().map(|c| c.at).max().unwrap();
    assert!(
        latest < end,
        "a 409 waited for the first to finish: last 409 at {:?} after the handler's start, its end at {:?}",
        latest.saturating_duration_since(start),
        end - start
    );
    eprintln!(
        "{test}: handler ran {:?}; last of {} 409s at {:?} after its start ({:?} before its end)",
        end - start,
        conflicts.len(),
        latest.saturating_duration_since(start),
        end - latest
    );

    let retry = send(&app, request("dup", "amount=100")).await;
    assert!(
        retry.status == StatusCode::CREATED && retry.replayed,
        "{retry:?}"
    );
    assert_eq!(retry.body, created[0].body);
    assert_eq!((probe.runs(), fx.rows().await), (1, 1));
    fx.cleanup().await;
}

// ----------------------------------------------------------------- 3

/// Two engines, each over its own pool on the same schema (two instances):
/// 24 concurrent duplicates split between them write one row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_write_one_row() {
    const N: usize = 24;
    let test = "two_instances_write_one_row";
    let Some(fx) = <sqlx::Postgres as FixtureDb>::open(test, 10).await else {
        return;
    };
    let url = test_support::service_url("DATABASE_URL", test).unwrap();
    let second =
        PostgresStore::connect_with(&url, PostgresOptions::new().schema(fx.store.schema()))
            .await
            .expect("second pool");
    let probe = Probe::new(&fx.table);
    probe.set(OK, Duration::from_millis(300));
    let apps = [
        app::<sqlx::Postgres>(transactional(&fx, config().build().unwrap()), &probe),
        app::<sqlx::Postgres>(
            Idempotency::transactional(second.clone(), config().build().unwrap()),
            &probe,
        ),
    ];
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (app, barrier) = (apps[i % 2].clone(), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                send(&app, request("two", "amount=100")).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("task"));
    }
    let fresh = answers
        .iter()
        .filter(|a| a.status == StatusCode::CREATED && !a.replayed)
        .count();
    let others_ok = answers
        .iter()
        .filter(|a| a.status == StatusCode::CONFLICT || a.replayed)
        .count();
    assert_eq!(
        (fresh, others_ok),
        (1, N - 1),
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    assert_eq!((probe.runs(), fx.rows().await), (1, 1));
    for app in &apps {
        let retry = send(app, request("two", "amount=100")).await;
        assert!(retry.replayed, "{retry:?}");
    }
    second.pool().close().await;
    fx.cleanup().await;
}

/// Two stores on two schemas of one database are independent: the same
/// key in flight in one must not refuse it in the other.
///
/// Fails today: the record's lock is `pg_try_advisory_xact_lock` on 64 bits
/// of the record id (scope + key) alone, and advisory locks are the whole
/// database's, so the second gets a false 409 for as long as the first runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_key_in_two_schemas_is_independent() {
    let test = "same_key_in_two_schemas_is_independent";
    let (Some(one), Some(two)) = (
        <sqlx::Postgres as FixtureDb>::open(test, 4).await,
        <sqlx::Postgres as FixtureDb>::open(test, 4).await,
    ) else {
        return;
    };
    let (p1, p2) = (Probe::new(&one.table), Probe::new(&two.table));
    p1.set(OK, Duration::from_millis(800));
    let app1 = app::<sqlx::Postgres>(transactional(&one, config().build().unwrap()), &p1);
    let app2 = app::<sqlx::Postgres>(transactional(&two, config().build().unwrap()), &p2);
    let first = tokio::spawn(async move { send(&app1, request("schemas", "amount=100")).await });
    p1.started(1).await;
    let other = send(&app2, request("schemas", "amount=100")).await;
    let first = first.await.expect("task");
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let rows = (one.rows().await, two.rows().await);
    one.cleanup().await;
    two.cleanup().await;
    assert_eq!(
        other.status,
        StatusCode::CREATED,
        "the other schema's store refused a key it has never seen: {:?} {}",
        other.status,
        String::from_utf8_lossy(&other.body)
    );
    assert_eq!(rows, (1, 1));
}

// ----------------------------------------------------------------- 4

async fn server_error_rolls_back<D: FixtureDb>(test: &str) {
    let Some(fx) = D::open(test, 4).await else {
        return;
    };
    let probe = Probe::new(&fx.table);
    let app = app::<D>(transactional(&fx, config().build().unwrap()), &probe);
    probe.set(FAIL, Duration::ZERO);
    let failed = send(&app, request("e", "amount=100")).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(failed.body, "failed");
    assert_eq!(
        (probe.runs(), fx.rows().await),
        (1, 0),
        "the insert was rolled back"
    );

    probe.set(OK, Duration::ZERO);
    let retry = send(&app, request("e", "amount=100")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(
        !retry.replayed,
        "the record was rolled back too: the retry runs"
    );
    assert_eq!((probe.runs(), fx.rows().await), (2, 1));
    let again = send(&app, request("e", "amount=100")).await;
    assert!(again.replayed && again.body == retry.body, "{again:?}");
    assert_eq!((probe.runs(), fx.rows().await), (2, 1));
    fx.cleanup().await;
}

async fn transient_4xx_rolls_back<D: FixtureDb>(test: &str) {
    let Some(fx) = D::open(test, 4).await else {
        return;
    };
    let probe = Probe::new(&fx.table);
    let app = app::<D>(transactional(&fx, config().build().unwrap()), &probe);
    probe.set(BUSY, Duration::ZERO);
    let busy = send(&app, request("busy", "amount=100")).await;
    assert_eq!(busy.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!((probe.runs(), fx.rows().await), (1, 0), "rolled back");
    probe.set(OK, Duration::ZERO);
    let retry = send(&app, request("busy", "amount=100")).await;
    assert!(
        retry.status == StatusCode::CREATED && !retry.replayed,
        "{retry:?}"
    );
    assert_eq!((probe.runs(), fx.rows().await), (2, 1));
    fx.cleanup().await;
}

async fn panic_rolls_back<D: FixtureDb>(test: &str) {
    let Some(fx) = D::open(test, 4).await else {
        return;
    };
    let probe = Probe::new(&fx.table);
    let app = app::<D>(transactional(&fx, config().build().unwrap()), &probe);
    probe.set(PANIC, Duration::ZERO);
    assert!(
        try_send(&app, request("p", "amount=100")).await.is_none(),
        "the handler's panic propagates"
    );
    assert_eq!(
        (probe.runs(), fx.rows().await),
        (1, 0),
        "the insert was rolled back"
    );

    probe.set(OK, Duration::ZERO);
    let retry = send(&app, request("p", "amount=100")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(!retry.replayed);
    assert_eq!((probe.runs(), fx.rows().await), (2, 1));
    fx.cleanup().await;
}

/// A response over the stored-response limit: the effect commits (the
/// client got its answer) with a record that cannot replay: 410.
async fn too_large_response_commits_not_replayable<D: FixtureDb>(test: &str) {
    let Some(fx) = D::open(test, 4).await else {
        return;
    };
    let probe = Probe::new(&fx.table);
    let config = config().max_stored_response(8).build().unwrap();
    let app = app::<D>(transactional(&fx, config), &probe);
    let first = send(&app, request("big", "amount=100")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert_eq!(first.body, "paid amount=100 run 1", "the full body");
    assert_eq!((probe.runs(), fx.rows().await), (1, 1));
    let retry = send(&app, request("big", "amount=100")).await;
    retry.assert_problem(410, "not-replayable");
    assert_eq!((probe.runs(), fx.rows().await), (1, 1));
    fx.cleanup().await;
}

/// With `wait_for_in_flight`, duplicates wait for the first and get its
/// replay instead of a 409.
async fn waiting_duplicates_get_the_replay<D: FixtureDb>(test: &str) {
    const N: usize = 8;
    let Some(fx) = D::open(test, 10).await else {
        return;
    };
    let probe = Probe::new(&fx.table);
    probe.set(OK, Duration::from_millis(300));
    let config = config()
        .wait_for_in_flight(Duration::from_secs(5))
        .build()
        .unwrap();
    let app = app::<D>(transactional(&fx, config), &probe);
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let (app, barrier) = (app.clone(), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                send(&app, request("wait", "amount=100")).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("task"));
    }
    let fresh: Vec<_> = answers.iter().filter(|a| !a.replayed).collect();
    assert_eq!(fresh.len(), 1, "{answers:?}");
    assert_eq!(fresh[0].status, StatusCode::CREATED);
    for a in &answers {
        assert!(
            a.status == StatusCode::CREATED && a.body == fresh[0].body,
            "{a:?}"
        );
    }
    assert_eq!((probe.runs(), fx.rows().await), (1, 1));
    fx.cleanup().await;
}

// ----------------------------------------------------------------- 5

async fn transaction_timeout_rolls_back<D: FixtureDb>(test: &str) {
    let Some(fx) = D::open(test, 4).await else {
        return;
    };
    let probe = Probe::new(&fx.table);
    let config = config()
        .transaction_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let app = app::<D>(transactional(&fx, config), &probe);
    probe.set(SLOW, Duration::ZERO);
    let sent = Instant::now();
    let timed_out = send(&app, request("t", "amount=100")).await;
    let took = sent.elapsed();
    timed_out.assert_problem(503, "transaction-timeout");
    assert!(timed_out.retry_after.is_some());
    assert!(took < Duration::from_secs(1), "503 after {took:?}");
    assert_eq!((probe.runs(), fx.rows().await), (1, 0), "rolled back");

    probe.set(OK, Duration::ZERO);
    let retry = send(&app, request("t", "amount=100")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(
        !retry.replayed,
        "the record was rolled back: the retry runs"
    );
    assert_eq!((probe.runs(), fx.rows().await), (2, 1));
    eprintln!("{test}: 503 transaction-timeout after {took:?}");
    fx.cleanup().await;
}

// ----------------------------------------------------------------- 6

async fn pool_exhaustion_is_503_within_the_store_timeout<D: FixtureDb>(test: &str) {
    let Some(fx) = D::open(test, 1).await else {
        return;
    };
    let probe = Probe::new(&fx.table);
    let config = config()
        .store_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let app = app::<D>(transactional(&fx, config), &probe);
    probe.set(OK, Duration::from_millis(1500));
    let a = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("pool-a", "amount=100")).await }
    });
    probe.started(1).await;
    let sent = Instant::now();
    let b = send(&app, request("pool-b", "amount=200")).await;
    let took = sent.elapsed();
    b.assert_problem(503, "store-unavailable");
    assert!(b.retry_after.is_some());
    assert!(took < Duration::from_secs(1), "503 after {took:?}");
    assert_eq!(probe.runs(), 1, "b's handler never ran");
    let a = a.await.expect("task");
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    assert_eq!((probe.runs(), fx.rows().await), (1, 1));
    eprintln!("{test}: 503 store-unavailable after {took:?}");
    fx.cleanup().await;
}

// ----------------------------------------------------------------- 7

async fn extractor_without_a_transaction_is_500<D: FixtureDb>(test: &str) {
    let probe = Probe::new("never_written");
    let check = |a: Answer, what: &str| {
        a.assert_problem(500, "internal");
        assert_eq!(probe.runs(), 0, "{test}: the handler ran ({what})");
    };
    // A route outside the layer.
    let outside = Router::new()
        .route("/p", post(pay::<D>))
        .with_state(Arc::clone(&probe));
    check(send(&outside, request("o", "x")).await, "outside the layer");
    // A layer whose engine is not transactional.
    let memory = Idempotency::new(MemoryStore::new(), config().build().unwrap());
    let app = app::<D>(memory, &probe);
    check(send(&app, request("m", "x")).await, "memory engine");
    check(send(&app, request("m", "x")).await, "memory engine, retry");
    // A method the layer does not cover (GET passes through).
    let get = Router::new()
        .route("/p", axum::routing::get(pay::<D>))
        .layer(IdempotencyLayer::new(Idempotency::new(
            MemoryStore::new(),
            config().build().unwrap(),
        )))
        .with_state(Arc::clone(&probe));
    let req = Request::get("/p").body(Body::empty()).unwrap();
    check(send(&get, req).await, "uncovered method");
}

/// A transactional engine of one database and a handler that asks for the
/// other's transaction: 500, nothing written, the record not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extractor_of_another_database_is_500() {
    let Some(fx) =
        <sqlx::Sqlite as FixtureDb>::open("extractor_of_another_database_is_500", 2).await
    else {
        return;
    };
    let probe = Probe::new(&fx.table);
    let app = app::<sqlx::Postgres>(transactional(&fx, config().build().unwrap()), &probe);
    for _ in 0..2 {
        let a = send(&app, request("x", "amount=1")).await;
        a.assert_problem(500, "internal");
    }
    assert_eq!((probe.runs(), fx.rows().await), (0, 0));
}

// ----------------------------------------------------------------- 8

/// Through a proxy that reads the PostgreSQL frontend protocol
/// (`test_support::CountingProxy`): a fresh request is ONE commit (the handler's insert
/// and the record together), a replay none and no transaction at all, one
/// statement round trip (the snapshot read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_commit_per_fresh_request_none_per_replay() {
    use sqlx::postgres::PgConnectOptions;
    use std::str::FromStr;
    let test = "one_commit_per_fresh_request_none_per_replay";
    let Some(url) = test_support::service_url("DATABASE_URL", test) else {
        return;
    };
    let options = PgConnectOptions::from_str(&url).expect("DATABASE_URL");
    let proxy = test_support::CountingProxy::start(
        format!("{}:{}", options.get_host(), options.get_port()),
        true,
    )
    .await;
    // Plain text, so that the proxy can read it (the proxy URL carries no password).
    let proxied = format!(
        "postgres://{}@127.0.0.1:{}/{}?sslmode=disable",
        options.get_username(),
        proxy.port,
        options.get_database().unwrap_or("postgres"),
    );
    let schema = test_support::unique("idem_tx_wire");
    // One connection: every statement below goes over it, prepared once.
    let store = PostgresStore::connect_with(
        &proxied,
        PostgresOptions::new().schema(&schema).max_connections(1),
    )
    .await
    .expect("connect through the proxy");
    let fx = Fixture::on_postgres(store.clone()).await;
    let probe = Probe::new(&fx.table);
    let app = app::<sqlx::Postgres>(transactional(&fx, config().build().unwrap()), &probe);
    let settle = || tokio::time::sleep(Duration::from_millis(100));

    // Warm up: the connection prepares every statement once.
    assert_eq!(
        send(&app, request("warm", "w")).await.status,
        StatusCode::CREATED
    );
    assert!(send(&app, request("warm", "w")).await.replayed);
    settle().await;

    let mut printed = false;
    for i in 0..3 {
        let key = format!("wire-{i}");
        let before = proxy.counts.wire();
        let fresh = send(&app, request(&key, "amount=100")).await;
        assert_eq!(fresh.status, StatusCode::CREATED, "{fresh:?}");
        settle().await;
        let mid = proxy.counts.wire();
        let replay = send(&app, request(&key, "amount=100")).await;
        assert!(replay.replayed, "{replay:?}");
        settle().await;
        let after = proxy.counts.wire();
        let (f, r) = (mid.since(&before), after.since(&mid));
        if !printed {
            eprintln!("{test}: fresh request on the wire: {f:?}");
            eprintln!("{test}: replay on the wire: {r:?}");
            printed = true;
        }
        assert_eq!(f.simple("COMMIT"), 1, "fresh: one COMMIT: {f:?}");
        assert_eq!(f.simple("BEGIN"), 1, "fresh: one BEGIN: {f:?}");
        assert_eq!(f.simple("ROLLBACK"), 0, "fresh: {f:?}");
        assert_eq!(f.parses, 0, "fresh: nothing prepared again: {f:?}");
        // The snapshot read, BEGIN, the lock with the claim, the handler's
        // insert, the response into the record, COMMIT.
        assert_eq!(
            (f.statement_flights, f.executes),
            (6, 4),
            "fresh: six statement round trips: {f:?}"
        );
        assert_eq!(r.simple("COMMIT"), 0, "replay: no COMMIT: {r:?}");
        assert_eq!(r.simple("BEGIN"), 0, "replay: no BEGIN: {r:?}");
        assert_eq!(r.queries.len(), 0, "replay: no simple query: {r:?}");
        assert_eq!(
            (r.statement_flights, r.executes),
            (1, 1),
            "replay: one statement round trip: {r:?}"
        );
    }
    assert_eq!(probe.runs(), 4);
    assert_eq!(fx.rows().await, 4);
    fx.cleanup().await;
}
