//! Transactional mode through the actix extractor (`Transaction<DB>`), on
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

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::body::{to_bytes, MessageBody};
use actix_web::dev::{Service, ServiceResponse};
use actix_web::{test, web, App, HttpResponse};
use bytes::Bytes;
use futures_util::FutureExt;
use idempotency_actix::core::store::postgres::{PostgresOptions, PostgresStore};
use idempotency_actix::core::store::sqlite::{SqliteOptions, SqliteStore};
use idempotency_actix::core::store::transaction::{TransactionalStore, TxDatabase};
use idempotency_actix::core::{LeaseToken, Store};
use idempotency_actix::{
    Idempotency, IdempotencyConfig, IdempotencyMiddleware, MemoryStore, Transaction,
};

// ---------------------------------------------------------------- fixtures

fn database_url(test: &str) -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            eprintln!("skipping {test}: DATABASE_URL is not set (e.g. DATABASE_URL=postgres://postgres@127.0.0.1:5432/test)");
            None
        }
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &LeaseToken::random().to_hex()[..16])
}

/// A temporary SQLite file, removed with its WAL files on drop.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.0.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A store in transactional mode and the handler's table next to it.
struct Fixture<D: Db> {
    store: D::Store,
    table: String,
    _file: Option<TempFile>,
}

trait Db: TxDatabase + Sized {
    type Store: Store + TransactionalStore + Clone;
    /// A store and an empty table `effects (id, note)`; `None` to skip.
    fn open(test: &str) -> impl Future<Output = Option<Fixture<Self>>>;
    fn insert<'a>(
        conn: &'a mut Self::Connection,
        table: &'a str,
        note: &'a str,
    ) -> impl Future<Output = ()> + 'a;
    fn rows(fixture: &Fixture<Self>) -> impl Future<Output = i64> + '_;
    fn cleanup(fixture: Fixture<Self>) -> impl Future<Output = ()>;
}

impl Db for sqlx::Postgres {
    type Store = PostgresStore;

    async fn open(test: &str) -> Option<Fixture<Self>> {
        let url = database_url(test)?;
        let schema = unique("idem_tx_actix");
        let store = PostgresStore::connect_with(&url, PostgresOptions::new().schema(&schema))
            .await
            .expect("connect to DATABASE_URL");
        let table = format!("\"{schema}\".effects");
        sqlx::query(&format!(
            "CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, note TEXT NOT NULL)"
        ))
        .execute(store.pool())
        .await
        .expect("create the handler's table");
        Some(Fixture {
            store,
            table,
            _file: None,
        })
    }

    async fn insert(conn: &mut sqlx::PgConnection, table: &str, note: &str) {
        sqlx::query(&format!("INSERT INTO {table} (note) VALUES ($1)"))
            .bind(note)
            .execute(conn)
            .await
            .expect("the handler's insert");
    }

    async fn rows(fixture: &Fixture<Self>) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}", fixture.table))
            .fetch_one(fixture.store.pool())
            .await
            .expect("count rows")
    }

    async fn cleanup(fixture: Fixture<Self>) {
        let _ = sqlx::query(&format!(
            "DROP SCHEMA \"{}\" CASCADE",
            fixture.store.schema()
        ))
        .execute(fixture.store.pool())
        .await;
    }
}

impl Db for sqlx::Sqlite {
    type Store = SqliteStore;

    async fn open(test: &str) -> Option<Fixture<Self>> {
        let name = test.replace("::", "_");
        let file = TempFile(std::env::temp_dir().join(format!("{}.sqlite", unique(&name))));
        let store = SqliteStore::connect_with(
            &format!("sqlite://{}", file.0.display()),
            SqliteOptions::new(),
        )
        .await
        .expect("open the SQLite file");
        sqlx::query(
            "CREATE TABLE effects (id INTEGER PRIMARY KEY AUTOINCREMENT, note TEXT NOT NULL)",
        )
        .execute(store.pool())
        .await
        .expect("create the handler's table");
        Some(Fixture {
            store,
            table: "effects".into(),
            _file: Some(file),
        })
    }

    async fn insert(conn: &mut sqlx::SqliteConnection, table: &str, note: &str) {
        sqlx::query(&format!("INSERT INTO {table} (note) VALUES (?1)"))
            .bind(note)
            .execute(conn)
            .await
            .expect("the handler's insert");
    }

    async fn rows(fixture: &Fixture<Self>) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}", fixture.table))
            .fetch_one(fixture.store.pool())
            .await
            .expect("count rows")
    }

    async fn cleanup(fixture: Fixture<Self>) {
        fixture.store.pool().close().await;
    }
}

// ------------------------------------------------------------- the handler

const OK: u8 = 0;
const FAIL: u8 = 1;
const PANIC: u8 = 2;

struct Probe {
    table: String,
    mode: AtomicU8,
    delay_ms: AtomicU64,
    runs: AtomicUsize,
    started: Mutex<Vec<Instant>>,
    ended: Mutex<Vec<Instant>>,
}

impl Probe {
    fn new(table: &str) -> Arc<Self> {
        Arc::new(Self {
            table: table.to_owned(),
            mode: AtomicU8::new(OK),
            delay_ms: AtomicU64::new(0),
            runs: AtomicUsize::new(0),
            started: Mutex::default(),
            ended: Mutex::default(),
        })
    }

    fn set(&self, mode: u8, delay: Duration) {
        self.mode.store(mode, Ordering::SeqCst);
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

/// Inserts one row (the body as its note) in the request's transaction,
/// then answers as the probe says.
async fn pay<D: Db>(
    probe: web::Data<Arc<Probe>>,
    mut tx: Transaction<D>,
    body: Bytes,
) -> HttpResponse {
    let run = probe.runs.fetch_add(1, Ordering::SeqCst) + 1;
    probe.started.lock().unwrap().push(Instant::now());
    let note = String::from_utf8_lossy(&body).into_owned();
    D::insert(&mut tx, &probe.table, &note).await;
    let answer = match probe.mode.load(Ordering::SeqCst) {
        FAIL => HttpResponse::InternalServerError().body("failed"),
        PANIC => panic!("the test handler panics after its insert"),
        _ => {
            let delay = probe.delay_ms.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            HttpResponse::Created().body(format!("paid {note} run {run}"))
        }
    };
    probe.ended.lock().unwrap().push(Instant::now());
    answer
}

fn config() -> IdempotencyConfig {
    IdempotencyConfig::builder()
        .lease(Duration::from_secs(10))
        .ttl(Duration::from_secs(120))
        .build()
        .expect("config")
}

fn transactional<D: Db>(fixture: &Fixture<D>) -> Idempotency {
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

/// This run's prefix of every key: PostgreSQL's advisory locks are shared
/// by the whole database, whatever the schema, so another test binary
/// running at the same time must not use the same keys.
fn run() -> &'static str {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUN.get_or_init(|| unique("actix"))
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

#[derive(Debug)]
struct Answer {
    status: u16,
    replayed: bool,
    retry_after: Option<String>,
    content_type: Option<String>,
    body: Bytes,
    at: Instant,
}

impl Answer {
    fn assert_problem(&self, status: u16, kind: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.content_type.as_deref(),
            Some("application/problem+json"),
            "{self:?}"
        );
        let json: serde_json::Value =
            serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {self:?}"));
        assert_eq!(
            json["type"].as_str(),
            Some(format!("urn:idempotency:problem:{kind}").as_str())
        );
    }
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
    let header = |name: &str| {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (status, replayed) = (
        res.status().as_u16(),
        header("idempotent-replayed").as_deref() == Some("true"),
    );
    let (retry_after, content_type) = (header("retry-after"), header("content-type"));
    let body = to_bytes(res.into_body()).await.ok().expect("body reads");
    Some(Answer {
        status,
        replayed,
        retry_after,
        content_type,
        body,
        at: Instant::now(),
    })
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

async fn fresh_replay_and_mismatch<D: Db>(test: &str) {
    let Some(fx) = D::open(test).await else {
        return;
    };
    let probe = Probe::new(&fx.table);
    let app = app!(D, transactional(&fx), &probe);
    let first = call(&app, request("k1", "amount=100")).await;
    assert_eq!(first.status, 201, "{first:?}");
    assert!(!first.replayed);
    assert_eq!(first.body, "paid amount=100 run 1");
    assert_eq!(D::rows(&fx).await, 1);

    let retry = call(&app, request("k1", "amount=100")).await;
    assert!(retry.status == 201 && retry.replayed, "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(
        (probe.runs(), D::rows(&fx).await),
        (1, 1),
        "the retry wrote nothing"
    );

    let other = call(&app, request("k1", "amount=999")).await;
    other.assert_problem(422, "key-reused");
    assert_eq!((probe.runs(), D::rows(&fx).await), (1, 1));
    D::cleanup(fx).await;
}

async fn concurrent_duplicates_write_one_row<D: Db>(test: &str) {
    const N: usize = 16;
    let Some(fx) = D::open(test).await else {
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
    assert_eq!((probe.runs(), D::rows(&fx).await), (1, 1));
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
    assert_eq!((probe.runs(), D::rows(&fx).await), (1, 1));
    D::cleanup(fx).await;
}

async fn server_error_rolls_back<D: Db>(test: &str) {
    let Some(fx) = D::open(test).await else {
        return;
    };
    let probe = Probe::new(&fx.table);
    let app = app!(D, transactional(&fx), &probe);
    probe.set(FAIL, Duration::ZERO);
    let failed = call(&app, request("e", "amount=100")).await;
    assert_eq!((failed.status, &failed.body[..]), (500, &b"failed"[..]));
    assert_eq!((probe.runs(), D::rows(&fx).await), (1, 0), "rolled back");
    probe.set(OK, Duration::ZERO);
    let retry = call(&app, request("e", "amount=100")).await;
    assert!(retry.status == 201 && !retry.replayed, "{retry:?}");
    assert_eq!((probe.runs(), D::rows(&fx).await), (2, 1));
    let again = call(&app, request("e", "amount=100")).await;
    assert!(again.replayed && again.body == retry.body, "{again:?}");
    assert_eq!((probe.runs(), D::rows(&fx).await), (2, 1));
    D::cleanup(fx).await;
}

async fn panic_rolls_back<D: Db>(test: &str) {
    let Some(fx) = D::open(test).await else {
        return;
    };
    let probe = Probe::new(&fx.table);
    let app = app!(D, transactional(&fx), &probe);
    probe.set(PANIC, Duration::ZERO);
    assert!(
        try_call(&app, request("p", "amount=100")).await.is_none(),
        "the handler's panic propagates"
    );
    assert_eq!((probe.runs(), D::rows(&fx).await), (1, 0), "rolled back");
    probe.set(OK, Duration::ZERO);
    let retry = call(&app, request("p", "amount=100")).await;
    assert!(retry.status == 201 && !retry.replayed, "{retry:?}");
    assert_eq!((probe.runs(), D::rows(&fx).await), (2, 1));
    D::cleanup(fx).await;
}

async fn extractor_without_a_transaction_is_500<D: Db>(test: &str) {
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
