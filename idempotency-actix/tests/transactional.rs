//! Transactional mode through the actix extractor (`Transaction<T>`), on
//! SQLite and PostgreSQL: the handler's effect (a row in a table of its own)
//! and the idempotency record commit together, or not at all.
//!
//! - a fresh request writes one row; its retry replays and writes nothing; a
//!   different body under the same key is 422;
//! - 16 concurrent duplicates (one thread, `join_all`): one row, one 201,
//!   every other answer 409 with `Retry-After`, sent while the first is still
//!   in its handler;
//! - a 500 or a panic rolls back the effect and the record: the retry runs;
//! - the extractor without a transaction: 500 `internal`, handler not run.
//!
//! `DATABASE_URL` is read at run time; the PostgreSQL tests print why they
//! skip and pass when it is unset. The SQLite tests use a temporary file and
//! always run.
#![cfg(all(feature = "postgres", feature = "sqlite"))]

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::{to_bytes, MessageBody};
use actix_web::dev::{Service, ServiceResponse};
use actix_web::{test, web, App, HttpResponse};
use bytes::Bytes;
use futures_util::FutureExt;
use idempotency_actix::{
    Idempotency, IdempotencyConfig, IdempotencyMiddleware, MemoryStore, Transaction,
};
use test_support::mode::{FAIL, OK, PANIC};
use test_support::{run_prefix, Answer, Fixture, FixtureDb, Probe};

// ------------------------------------------------------------- the handler

/// Inserts one row (the body as its note) in the request's transaction,
/// then answers as the probe says.
async fn pay<D: FixtureDb>(
    probe: web::Data<Arc<Probe>>,
    mut tx: Transaction<sqlx::Transaction<'static, D>>,
    body: Bytes,
) -> HttpResponse {
    let (status, body) = probe.run::<D>(&mut tx, &body).await;
    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).expect("a status")).body(body)
}

fn config() -> IdempotencyConfig {
    IdempotencyConfig::builder()
        .lease(Duration::from_secs(10))
        .ttl(Duration::from_secs(120))
        .build()
        .expect("config")
}

fn transactional<D: FixtureDb>(fixture: &Fixture<D>) -> Idempotency {
    Idempotency::transactional(fixture.store.clone(), config())
}

/// The app: `/p` behind the middleware driven by `engine`.
macro_rules! app {
    ($db:ty, $engine:expr, $probe:expr) => {
        test::init_service(
            App::new()
                .app_data(web::Data::new(Arc::clone($probe)))
                .wrap(IdempotencyMiddleware::new($engine))
                .route("/p", web::post().to(pay::<$db>)),
        )
        .await
    };
}

// -------------------------------------------------------------- the client

/// This run's prefix of every key (see [`run_prefix`]).
fn run() -> &'static str {
    run_prefix("actix")
}

/// A POST to `/p`; `key` is unique to its test (prefixed with [`run`]).
fn request(key: &str, body: &'static str) -> actix_http::Request {
    test::TestRequest::post()
        .uri("/p")
        .insert_header(("idempotency-key", format!("{}-{key}", run())))
        .insert_header(("content-type", "text/plain"))
        .set_payload(body)
        .to_request()
}

/// One request; `None` when the app panicked (caught where the service's
/// future is polled, as actix's dispatcher does).
async fn try_call<S, B>(app: &S, req: actix_http::Request) -> Option<Answer>
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let res = AssertUnwindSafe(app.call(req))
        .catch_unwind()
        .await
        .ok()?
        .expect("the app answers");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let body = to_bytes(res.into_body()).await.ok().expect("body reads");
    Some(Answer::new(status, header, body))
}

async fn call<S, B>(app: &S, req: actix_http::Request) -> Answer
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    try_call(app, req).await.expect("the app panicked")
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[actix_web::test]
            async fn postgres() {
                super::$name::<sqlx::Postgres>(concat!(stringify!($name), "::postgres")).await
            }
            #[actix_web::test]
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
    extractor_without_a_transaction_is_500,
);

// ------------------------------------------------------------------ tests

async fn fresh_replay_and_mismatch<D: FixtureDb>(test: &str) {
    let Some(fx) = D::open(test, 10).await else {
        return;
    };
    let probe = Probe::new(&fx.table);
    let app = app!(D, transactional(&fx), &probe);
    let first = call(&app, request("k1", "amount=100")).await;
    assert_eq!(first.status, 201, "{first:?}");
    assert!(!first.replayed);
    assert_eq!(first.body, "paid amount=100 run 1");
    assert_eq!(fx.rows().await, 1);

    let retry = call(&app, request("k1", "amount=100")).await;
    assert!(retry.status == 201 && retry.replayed, "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(
        (probe.runs(), fx.rows().await),
        (1, 1),
        "the retry wrote nothing"
    );

    let other = call(&app, request("k1", "amount=999")).await;
    other.assert_problem(422, "key-reused");
    assert_eq!((probe.runs(), fx.rows().await), (1, 1));
    fx.cleanup().await;
}

async fn concurrent_duplicates_write_one_row<D: FixtureDb>(test: &str) {
    const N: usize = 16;
    let Some(fx) = D::open(test, 10).await else {
        return;
    };
    let probe = Probe::new(&fx.table);
    probe.set(OK, Duration::from_millis(300));
    let app = app!(D, transactional(&fx), &probe);
    // actix's test service is !Send: all on this thread, interleaved.
    let answers =
        futures_util::future::join_all((0..N).map(|_| call(&app, request("dup", "amount=100"))))
            .await;
    let created: Vec<_> = answers.iter().filter(|a| a.status == 201).collect();
    let conflicts: Vec<_> = answers.iter().filter(|a| a.status == 409).collect();
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
    let start = probe.started.lock().unwrap()[0];
    let end = probe.ended.lock().unwrap()[0];
    let latest = conflicts.iter().map(|c| c.at).max().unwrap();
    assert!(
        latest < end,
        "a 409 waited for the first: last at {:?} after the handler's start, its end at {:?}",
        latest.saturating_duration_since(start),
        end - start
    );
    eprintln!(
        "{test}: handler ran {:?}; last of {} 409s at {:?} after its start",
        end - start,
        conflicts.len(),
        latest.saturating_duration_since(start)
    );
    let retry = call(&app, request("dup", "amount=100")).await;
    assert!(retry.status == 201 && retry.replayed, "{retry:?}");
    assert_eq!(retry.body, created[0].body);
    assert_eq!((probe.runs(), fx.rows().await), (1, 1));
    fx.cleanup().await;
}

async fn server_error_rolls_back<D: FixtureDb>(test: &str) {
    let Some(fx) = D::open(test, 10).await else {
        return;
    };
    let probe = Probe::new(&fx.table);
    let app = app!(D, transactional(&fx), &probe);
    probe.set(FAIL, Duration::ZERO);
    let failed = call(&app, request("e", "amount=100")).await;
    assert_eq!((failed.status, &failed.body[..]), (500, &b"failed"[..]));
    assert_eq!((probe.runs(), fx.rows().await), (1, 0), "rolled back");
    probe.set(OK, Duration::ZERO);
    let retry = call(&app, request("e", "amount=100")).await;
    assert!(retry.status == 201 && !retry.replayed, "{retry:?}");
    assert_eq!((probe.runs(), fx.rows().await), (2, 1));
    let again = call(&app, request("e", "amount=100")).await;
    assert!(again.replayed && again.body == retry.body, "{again:?}");
    assert_eq!((probe.runs(), fx.rows().await), (2, 1));
    fx.cleanup().await;
}

async fn panic_rolls_back<D: FixtureDb>(test: &str) {
    let Some(fx) = D::open(test, 10).await else {
        return;
    };
    let probe = Probe::new(&fx.table);
    let app = app!(D, transactional(&fx), &probe);
    probe.set(PANIC, Duration::ZERO);
    assert!(
        try_call(&app, request("p", "amount=100")).await.is_none(),
        "the handler's panic propagates"
    );
    assert_eq!((probe.runs(), fx.rows().await), (1, 0), "rolled back");
    probe.set(OK, Duration::ZERO);
    let retry = call(&app, request("p", "amount=100")).await;
    assert!(retry.status == 201 && !retry.replayed, "{retry:?}");
    assert_eq!((probe.runs(), fx.rows().await), (2, 1));
    fx.cleanup().await;
}

async fn extractor_without_a_transaction_is_500<D: FixtureDb>(test: &str) {
    let probe = Probe::new("never_written");
    let check = |a: Answer, what: &str| {
        a.assert_problem(500, "internal");
        assert_eq!(probe.runs(), 0, "{test}: the handler ran ({what})");
    };
    let outside = test::init_service(
        App::new()
            .app_data(web::Data::new(Arc::clone(&probe)))
            .route("/p", web::post().to(pay::<D>)),
    )
    .await;
    check(
        call(&outside, request("o", "x")).await,
        "outside the middleware",
    );
    let memory = app!(D, Idempotency::new(MemoryStore::new(), config()), &probe);
    check(call(&memory, request("m", "x")).await, "memory engine");
    check(
        call(&memory, request("m", "x")).await,
        "memory engine, retry",
    );
}
