//! Transactional mode on PostgreSQL against the same handler without the
//! middleware and against today's two-commit mode, measured in one run and
//! interleaved. The handler inserts one row (1 KiB JSON request):
//!
//! - `bare`: no middleware; the handler runs its own `BEGIN; INSERT; COMMIT`
//!   on the pool.
//! - `transactional`: `Idempotency::transactional`; the handler inserts
//!   through the `Transaction<PostgresTransaction>` extractor and the middleware commits
//!   the row and the record together (fresh key each time).
//! - `two_commit`: `Idempotency::new`; the handler runs its own transaction
//!   as `bare` does, between the store's claim and complete (fresh key).
//!
//! And the replay of a completed key in transactional mode against a
//! primary-key `SELECT` of one row on the same pool.
//!
//! Targets: transactional fresh ≤ 1.5× bare and ≤ 0.7× two_commit; replay
//! ≤ 1.2× pk_select. To say what the floor allows, the run also times one
//! round trip (`SELECT 1`), an empty `BEGIN; COMMIT` (no WAL flush) and a
//! one-row insert transaction (`BEGIN; INSERT; COMMIT`, one WAL flush).
//!
//! `DATABASE_URL` is read at run time; the bench is skipped when it is
//! unset. The records live in the schema `bench_tx`, the rows in the table
//! `bench_tx_payments`; both are emptied at the start.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use benches::{handler, json_body, request};
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion};
use http_body_util::BodyExt;
use idempotency_core::{Begun, TransactionalStore, TxGuard};
use idempotency_core::{
    Claim, ClaimOutcome, Fingerprint, Idempotency, IdempotencyConfig, LeaseToken, RecordId, Store,
    StoredOutcome, StoredResponse,
};
use idempotency_sqlx::postgres::{PostgresOptions, PostgresStore};
use idempotency_sqlx::PostgresTransaction;
use idempotency_tower::{IdempotencyLayer, Transaction};
use sqlx::PgPool;
use tower::ServiceExt;

const GROUP: &str = "transactional";
const TABLE: &str = "bench_tx_payments";
const INSERT: &str =
    "INSERT INTO bench_tx_payments (idempotency_key, amount, note) VALUES ($1, $2, $3)";
const PK_SELECT: &str =
    "SELECT id, idempotency_key, amount, note FROM bench_tx_payments WHERE id = $1";

type Response = (
    http::StatusCode,
    [(http::HeaderName, &'static str); 2],
    Bytes,
);

fn outcome() -> StoredOutcome {
    StoredOutcome::response(StoredResponse {
        status: 201,
        headers: vec![
            (
                "content-type".into(),
                Bytes::from_static(b"application/json"),
            ),
            ("location".into(), Bytes::from_static(b"/payments/pay_1")),
        ],
        body: Bytes::from(vec![b'x'; 64]),
    })
}

fn claim(fingerprint: &Fingerprint) -> Claim<'_> {
    Claim {
        fingerprint,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(600),
    }
}

fn key_of(headers: &http::HeaderMap) -> String {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The one row the handler writes.
async fn insert<'c>(conn: impl sqlx::PgExecutor<'c>, key: String, body: &Bytes) {
    sqlx::query(INSERT)
        .bind(key)
        .bind(100_i64)
        .bind(&body[..64])
        .execute(conn)
        .await
        .expect("insert");
}

/// `bare` and `two_commit`: the handler begins and commits its own
/// transaction.
async fn own_transaction(
    State(pool): State<PgPool>,
    headers: http::HeaderMap,
    body: Bytes,
) -> Response {
    let mut tx = pool.begin().await.expect("begin");
    insert(&mut *tx, key_of(&headers), &body).await;
    tx.commit().await.expect("commit");
    handler(body).await
}

/// `transactional`: the handler writes through the request's transaction;
/// the middleware commits it.
async fn in_transaction(
    mut tx: Transaction<PostgresTransaction>,
    headers: http::HeaderMap,
    body: Bytes,
) -> Response {
    insert(&mut *tx, key_of(&headers), &body).await;
    drop(tx);
    handler(body).await
}

/// Sends one request in process, reads the whole response and checks that
/// it is the handler's 201 (fresh or replayed), so that a refusal (409,
/// 503) cannot pass for a fast request.
async fn send(router: &Router, req: http::Request<axum::body::Body>) {
    let res = router.clone().oneshot(req).await.expect("infallible");
    let status = res.status();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(
        status,
        http::StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    std::hint::black_box(body);
}

type Job<'a> = Box<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + 'a>> + 'a>;

fn job<'a, F, Fut>(f: F) -> Job<'a>
where
    F: Fn() -> Fut + 'a,
    Fut: Future<Output = ()> + 'a,
{
    Box::new(move || Box::pin(f()))
}

/// Medians, in nanoseconds, of `jobs` measured interleaved: `n` rounds that
/// each run every job once (starting with a different one each round), so
/// that load from other processes on the machine hits all of them alike.
fn interleaved(rt: &tokio::runtime::Runtime, n: usize, jobs: &[Job<'_>]) -> Vec<f64> {
    let mut times = vec![Vec::with_capacity(n); jobs.len()];
    rt.block_on(async {
        for round in 0..n {
            for i in 0..jobs.len() {
                let j = (round + i) % jobs.len();
                let t = std::time::Instant::now();
                jobs[j]().await;
                times[j].push(t.elapsed().as_nanos() as f64);
            }
        }
    });
    times
        .into_iter()
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect()
}

fn rand_run() -> u64 {
    u64::from_be_bytes(LeaseToken::random().to_bytes()[..8].try_into().expect("8"))
}

async fn setup(url: &str) -> (PostgresStore, PgPool) {
    let store = PostgresStore::connect_with(url, PostgresOptions::new().schema("bench_tx"))
        .await
        .expect("postgres");
    let pool = store.pool().clone();
    for sql in [
        format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
             idempotency_key TEXT NOT NULL, amount BIGINT NOT NULL, note BYTEA NOT NULL)"
        ),
        format!("TRUNCATE {TABLE}"),
        "TRUNCATE bench_tx.idempotency_records".to_owned(),
    ] {
        sqlx::query(&sql).execute(&pool).await.expect("bench table");
    }
    (store, pool)
}

fn bench(c: &mut Criterion, rt: &tokio::runtime::Runtime, url: &str) {
    let (store, pool) = rt.block_on(setup(url));
    let config = || {
        IdempotencyConfig::builder()
            .ttl(Duration::from_secs(600))
            .build()
            .expect("config")
    };
    let bare = Router::new()
        .route("/payments", post(own_transaction))
        .with_state(pool.clone());
    let transactional = Router::new()
        .route("/payments", post(in_transaction))
        .layer(IdempotencyLayer::new(Idempotency::transactional(
            store.clone(),
            config(),
        )));
    let two_commit = Router::new()
        .route("/payments", post(own_transaction))
        .with_state(pool.clone())
        .layer(IdempotencyLayer::new(Idempotency::new(
            store.clone(),
            config(),
        )));

    let run = rand_run();
    let counter = AtomicU64::new(0);
    let next_key = || format!("k-{run:x}-{}", counter.fetch_add(1, Ordering::Relaxed));
    let body = json_body();
    let replay_key = format!("replayed-{run:x}");
    let row_id: i64 = rt.block_on(async {
        send(&transactional, request(&replay_key, &body)).await;
        sqlx::query_scalar(&format!(
            "SELECT id FROM {TABLE} WHERE idempotency_key = $1"
        ))
        .bind(&replay_key)
        .fetch_one(&pool)
        .await
        .expect("the replayed request's row")
    });

    let select1 = || async {
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&pool)
            .await
            .expect("select 1");
        std::hint::black_box(one);
    };
    let begin_commit = || async {
        let tx = pool.begin().await.expect("begin");
        tx.commit().await.expect("commit");
    };
    let begin_select_commit = || async {
        let mut tx = pool.begin().await.expect("begin");
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut *tx)
            .await
            .expect("select 1");
        std::hint::black_box(one);
        tx.commit().await.expect("commit");
    };
    let insert_tx = || async {
        let mut tx = pool.begin().await.expect("begin");
        insert(&mut *tx, next_key(), &body).await;
        tx.commit().await.expect("commit");
    };
    let pk_select = || async {
        let row = sqlx::query(PK_SELECT)
            .bind(row_id)
            .fetch_one(&pool)
            .await
            .expect("pk select");
        std::hint::black_box(row);
    };

    // The statements of each mode through the store's own API, without HTTP
    // or the engine: what the SQL alone costs.
    let fp = Fingerprint::compute("POST", "/payments", None, Some(b"application/json"), b"{}");
    let next_id = || {
        RecordId::from_parts(
            &run.to_be_bytes(),
            &counter.fetch_add(1, Ordering::Relaxed).to_be_bytes(),
        )
    };
    // snapshot; BEGIN; lock; claim; INSERT; complete; COMMIT
    let sql_transactional = || async {
        let id = next_id();
        let found = TransactionalStore::snapshot(&store, &id, &fp)
            .await
            .expect("snapshot");
        assert!(found.is_none());
        let begun = TransactionalStore::begin(&store, &id, LeaseToken::random(), claim(&fp))
            .await
            .expect("begin");
        let Begun::Acquired(open) = begun else {
            panic!("not acquired: {begun:?}");
        };
        {
            let mut tx =
                TxGuard::<PostgresTransaction>::acquire(Some(&open.handle())).expect("transaction");
            insert(&mut *tx, next_key(), &body).await;
        }
        open.commit(outcome(), Duration::from_secs(600), Duration::from_secs(5))
            .await
            .expect("commit");
    };
    // claim; BEGIN; INSERT; COMMIT; complete
    let sql_two_commit = || async {
        let id = next_id();
        let ClaimOutcome::Acquired(token) =
            Store::claim(&store, &id, LeaseToken::random(), claim(&fp))
                .await
                .expect("claim")
        else {
            panic!("not acquired");
        };
        insert_tx().await;
        let _ = Store::complete(&store, &id, token, &outcome(), Duration::from_secs(600))
            .await
            .expect("complete");
    };

    let mut group = c.benchmark_group(GROUP);
    group.bench_function(BenchmarkId::new("raw", "select1"), |b| {
        b.to_async(rt).iter(select1)
    });
    group.bench_function(BenchmarkId::new("raw", "begin_commit"), |b| {
        b.to_async(rt).iter(begin_commit)
    });
    group.bench_function(BenchmarkId::new("raw", "insert_tx"), |b| {
        b.to_async(rt).iter(insert_tx)
    });
    for (name, router) in [
        ("bare", &bare),
        ("transactional", &transactional),
        ("two_commit", &two_commit),
    ] {
        group.bench_function(BenchmarkId::new("fresh", name), |b| {
            b.to_async(rt)
                .iter(|| send(router, request(&next_key(), &body)))
        });
    }
    group.bench_function(BenchmarkId::new("replay", "pk_select"), |b| {
        b.to_async(rt).iter(pk_select)
    });
    group.bench_function(BenchmarkId::new("replay", "transactional"), |b| {
        b.to_async(rt)
            .iter(|| send(&transactional, request(&replay_key, &body)))
    });
    group.finish();

    // The same, interleaved: the three fresh paths with the floor's pieces,
    // then the replay with its baseline.
    let n = 1000;
    let fresh = interleaved(
        rt,
        n,
        &[
            job(|| send(&bare, request(&next_key(), &body))),
            job(|| send(&transactional, request(&next_key(), &body))),
            job(|| send(&two_commit, request(&next_key(), &body))),
            job(select1),
            job(begin_commit),
            job(begin_select_commit),
            job(insert_tx),
            job(sql_transactional),
            job(sql_two_commit),
        ],
    );
    let [bare_t, tx_t, two_t, rt_t, bc_t, bsc_t, ins_t, sql_tx_t, sql_two_t] = fresh[..] else {
        unreachable!()
    };
    let replay = interleaved(
        rt,
        2 * n,
        &[
            job(|| send(&transactional, request(&replay_key, &body))),
            job(pk_select),
            job(select1),
        ],
    );
    let [replay_t, pk_t, rt2_t] = replay[..] else {
        unreachable!()
    };

    let us = |ns: f64| ns / 1000.0;
    let verdict = |ratio: f64, target: f64| if ratio <= target { "ok" } else { "OVER TARGET" };
    println!(
        "\n== {GROUP}: interleaved medians of {n} (replay: {}) ==",
        2 * n
    );
    println!(
        "round trip (SELECT 1): {:.1} µs / {:.1} µs",
        us(rt_t),
        us(rt2_t)
    );
    println!("empty BEGIN; COMMIT: {:.1} µs", us(bc_t));
    println!(
        "BEGIN; SELECT 1; COMMIT (3 round trips, no WAL flush): {:.1} µs",
        us(bsc_t)
    );
    println!(
        "BEGIN; INSERT; COMMIT (3 round trips, one WAL flush, no HTTP): {:.1} µs; \
         the insert and its commit's flush add {:.1} µs",
        us(ins_t),
        us(ins_t - bsc_t)
    );
    println!(
        "SQL alone (store API, no HTTP): transactional (6 round trips, 1 flush) {:.1} µs = {:.2}× \
         the insert transaction, two_commit (5 round trips, 3 flushes) {:.1} µs = {:.2}×; \
         transactional = {:.2}× two_commit",
        us(sql_tx_t),
        sql_tx_t / ins_t,
        us(sql_two_t),
        sql_two_t / ins_t,
        sql_tx_t / sql_two_t
    );
    println!("fresh bare: {:.1} µs", us(bare_t));
    println!("fresh two_commit: {:.1} µs", us(two_t));
    for (what, ratio, target) in [
        ("bare", tx_t / bare_t, 1.5),
        ("two_commit", tx_t / two_t, 0.7),
    ] {
        println!(
            "fresh transactional: {:.1} µs = {ratio:.2}× {what} (target ≤ {target}×: {})",
            us(tx_t),
            verdict(ratio, target)
        );
    }
    println!(
        "fresh transactional adds {:.1} µs to bare = {:.1} round trips",
        us(tx_t - bare_t),
        (tx_t - bare_t) / rt_t
    );
    let ratio = replay_t / pk_t;
    println!(
        "replay transactional: {:.1} µs = {ratio:.2}× pk_select {:.1} µs (target ≤ 1.2×: {})",
        us(replay_t),
        us(pk_t),
        verdict(ratio, 1.2)
    );
}

fn report() {
    benches::print_ratio(
        GROUP,
        ("fresh", "bare"),
        &[
            ("fresh", "transactional"),
            ("fresh", "two_commit"),
            ("raw", "insert_tx"),
            ("raw", "begin_commit"),
            ("raw", "select1"),
        ],
    );
    benches::print_ratio(
        GROUP,
        ("fresh", "two_commit"),
        &[("fresh", "transactional")],
    );
    benches::print_ratio(
        GROUP,
        ("replay", "pk_select"),
        &[("replay", "transactional"), ("raw", "select1")],
    );
}

fn main() {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        println!("skipping the transactional benches: DATABASE_URL is not set");
        return;
    };
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    bench(&mut c, &rt, &url);
    c.final_summary();
    report();
}
