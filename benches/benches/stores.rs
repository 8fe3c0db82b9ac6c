//! The shared stores against one raw round trip measured in the same run:
//! Redis against `PING`, PostgreSQL against `SELECT 1` (through the store's
//! own connection or pool). For each: the store's claim + complete (a fresh
//! request), its claim of a completed record (a replay), and the full request
//! through the tower layer on axum against the bare handler (1 KiB JSON).
//!
//! Targets: Redis fresh ≤ 2.1× PING and replay ≤ 1.1× (a Redis Cluster the
//! same, against a `GET` to one master); PostgreSQL fresh ≤
//! 2.5× SELECT 1 and replay ≤ 1.3×. For the layer the figure is what it adds
//! to the bare handler, divided by the raw round trip.
//!
//! `REDIS_URL`, `REDIS_CLUSTER_URL` and `DATABASE_URL` are read at run time; a backend whose
//! variable is unset is skipped with a note.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use benches::{handler, json_body, request, send};
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion};
use idempotency_core::{
    Claim, ClaimOutcome, Fingerprint, Idempotency, IdempotencyConfig, LeaseToken, RecordId, Store,
    StoredOutcome, StoredResponse,
};
use idempotency_redis::RedisConnection;
use idempotency_tower::IdempotencyLayer;

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

fn fingerprint() -> Fingerprint {
    Fingerprint::compute("POST", "/payments", None, Some(b"application/json"), b"{}")
}

async fn claim(store: &dyn Store, id: &RecordId) -> ClaimOutcome {
    store
        .claim(
            id,
            LeaseToken::random(),
            Claim {
                fingerprint: &fingerprint(),
                lease: Duration::from_secs(30),
                ttl: Duration::from_secs(600),
            },
        )
        .await
        .expect("claim")
}

async fn fresh(store: &dyn Store, n: u64, run: u128) {
    let id = RecordId::from_parts(&run.to_be_bytes(), &n.to_be_bytes());
    fresh_on(store, &id).await;
}

async fn fresh_on(store: &dyn Store, id: &RecordId) {
    let id = *id;
    let ClaimOutcome::Acquired(token) = claim(store, &id).await else {
        panic!("not acquired");
    };
    let _ = store
        .complete(&id, token, &outcome(), Duration::from_secs(600))
        .await
        .expect("complete");
}

/// Benches one backend: `raw` (one round trip), `store` fresh/replay and
/// `http` bare/layer.
fn bench_backend<R, F>(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    group_name: &str,
    raw_name: &str,
    raw: R,
    store: Arc<dyn Store>,
) where
    R: Fn() -> F,
    F: std::future::Future<Output = ()>,
{
    let run: u128 = rand_run();
    let counter = AtomicU64::new(0);
    let replayed = RecordId::from_parts(&run.to_be_bytes(), b"replayed");
    rt.block_on(async {
        let ClaimOutcome::Acquired(token) = claim(&*store, &replayed).await else {
            panic!("not acquired");
        };
        let _ = store
            .complete(&replayed, token, &outcome(), Duration::from_secs(600))
            .await
            .expect("complete");
    });
    let body = json_body();
    let bare = Router::new().route("/payments", post(handler));
    let config = IdempotencyConfig::builder()
        .ttl(Duration::from_secs(600))
        .build()
        .expect("config");
    let layered = Router::new()
        .route("/payments", post(handler))
        .layer(IdempotencyLayer::new(Idempotency::from_arc(
            Arc::clone(&store),
            config,
        )));
    let replay_key = format!("replayed-{run:x}");
    rt.block_on(send(&layered, request(&replay_key, &body)));

    let mut group = c.benchmark_group(group_name);
    group.bench_function(BenchmarkId::new("raw", raw_name), |b| {
        b.to_async(rt).iter(&raw)
    });
    group.bench_function(BenchmarkId::new("store", "fresh"), |b| {
        b.to_async(rt)
            .iter(|| fresh(&*store, counter.fetch_add(1, Ordering::Relaxed), run))
    });
    group.bench_function(BenchmarkId::new("store", "replay"), |b| {
        b.to_async(rt).iter(|| async {
            std::hint::black_box(claim(&*store, &replayed).await);
        })
    });
    group.bench_function(BenchmarkId::new("http", "bare"), |b| {
        b.to_async(rt).iter(|| {
            let key = format!("k-{run:x}-{}", counter.fetch_add(1, Ordering::Relaxed));
            send(&bare, request(&key, &body))
        })
    });
    group.bench_function(BenchmarkId::new("http", "layer-fresh"), |b| {
        b.to_async(rt).iter(|| {
            let key = format!("k-{run:x}-{}", counter.fetch_add(1, Ordering::Relaxed));
            send(&layered, request(&key, &body))
        })
    });
    group.bench_function(BenchmarkId::new("http", "layer-replay"), |b| {
        b.to_async(rt)
            .iter(|| send(&layered, request(&replay_key, &body)))
    });
    group.finish();

    // The same comparisons, interleaved with the raw round trip so that load
    // from other processes on the machine hits both sides alike.
    let n = 1000;
    let next_key = || format!("k-{run:x}-{}", counter.fetch_add(1, Ordering::Relaxed));
    let (raw_a, fresh_t) = interleaved(rt, n, &raw, || {
        fresh(&*store, counter.fetch_add(1, Ordering::Relaxed), run)
    });
    let (raw_b, replay_t) = interleaved(rt, n, &raw, || async {
        std::hint::black_box(claim(&*store, &replayed).await);
    });
    let (bare_a, layer_fresh) = interleaved(
        rt,
        n,
        || send(&bare, request(&next_key(), &body)),
        || send(&layered, request(&next_key(), &body)),
    );
    let (bare_b, layer_replay) = interleaved(
        rt,
        n,
        || send(&bare, request(&next_key(), &body)),
        || send(&layered, request(&replay_key, &body)),
    );
    let raw_t = (raw_a + raw_b) / 2.0;
    let us = |ns: f64| ns / 1000.0;
    println!("\n== {group_name}, interleaved medians of {n} ==");
    println!("raw {raw_name}: {:.1} µs / {:.1} µs", us(raw_a), us(raw_b));
    println!(
        "store fresh (claim+complete): {:.1} µs = {:.2}× {raw_name}",
        us(fresh_t),
        fresh_t / raw_a
    );
    println!(
        "store replay (claim): {:.1} µs = {:.2}× {raw_name}",
        us(replay_t),
        replay_t / raw_b
    );
    println!(
        "http fresh: bare {:.1} µs, layer {:.1} µs, adds {:.1} µs = {:.2}× {raw_name}",
        us(bare_a),
        us(layer_fresh),
        us(layer_fresh - bare_a),
        (layer_fresh - bare_a) / raw_t
    );
    println!(
        "http replay: bare {:.1} µs, layer {:.1} µs, adds {:.1} µs = {:.2}× {raw_name}",
        us(bare_b),
        us(layer_replay),
        us(layer_replay - bare_b),
        (layer_replay - bare_b) / raw_t
    );
}

/// The claim by script (`scripted`, as on Redis before 7): fresh and replay
/// interleaved with `raw`, printed as ratios like the native claim's above.
fn native_vs_script<R, F>(
    rt: &tokio::runtime::Runtime,
    raw: &R,
    scripted: &idempotency_redis::RedisStore,
) where
    R: Fn() -> F,
    F: std::future::Future<Output = ()>,
{
    let run = rand_run();
    let counter = AtomicU64::new(0);
    let replayed = RecordId::from_parts(&run.to_be_bytes(), b"replayed");
    rt.block_on(fresh_on(scripted, &replayed));
    let n = 1000;
    let (raw_a, fresh_t) = interleaved(rt, n, raw, || {
        fresh(scripted, counter.fetch_add(1, Ordering::Relaxed), run)
    });
    let (raw_b, replay_t) = interleaved(rt, n, raw, || async {
        std::hint::black_box(claim(scripted, &replayed).await);
    });
    println!("\n== redis, claims by script (Redis before 7), interleaved medians of {n} ==");
    println!(
        "store fresh (claim+complete): {:.1} µs = {:.2}× ping ({:.1} µs)",
        fresh_t / 1000.0,
        fresh_t / raw_a,
        raw_a / 1000.0
    );
    println!(
        "store replay (claim): {:.1} µs = {:.2}× ping ({:.1} µs)",
        replay_t / 1000.0,
        replay_t / raw_b,
        raw_b / 1000.0
    );
}

/// What no Redis store can go below, interleaved with `raw` (`PING`): two
/// `PING`s in a row (any fresh request needs two round trips), and the
/// native claim's and a completion's commands sent plainly, without the
/// completion's script: `SET NX GET PX` with `PTTL`, then `SET PX` of an
/// outcome of the same size.
fn redis_floor<R, F>(rt: &tokio::runtime::Runtime, raw: &R, conn: &RedisConnection)
where
    R: Fn() -> F,
    F: std::future::Future<Output = ()>,
{
    let run = rand_run();
    let counter = AtomicU64::new(0);
    let n = 1000;
    let record = vec![b'i'; 60];
    let done = {
        let mut done = vec![b'c'; 33];
        done.extend_from_slice(&outcome().encode());
        done
    };
    let (raw_a, two_pings) = interleaved(rt, n, raw, || async {
        raw().await;
        raw().await;
    });
    let (raw_b, plain) = interleaved(rt, n, raw, || {
        let key = format!(
            "floor-{run:x}-{{{}}}",
            counter.fetch_add(1, Ordering::Relaxed)
        );
        let (record, done) = (record.clone(), done.clone());
        let mut conn = conn.clone();
        async move {
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(&key)
                .arg(record)
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(600_000)
                .cmd("PTTL")
                .arg(&key);
            let _: Vec<redis::Value> = pipe.query_async(&mut conn).await.expect("set nx get");
            let _: redis::Value = redis::cmd("SET")
                .arg(&key)
                .arg(done)
                .arg("PX")
                .arg(600_000)
                .query_async(&mut conn)
                .await
                .expect("set");
        }
    });
    println!("\n== redis, the floor of a fresh request, interleaved medians of {n} ==");
    println!(
        "two PINGs in a row: {:.2}× ping ({:.1} µs)",
        two_pings / raw_a,
        raw_a / 1000.0
    );
    println!(
        "the claim's and a completion's commands, no script: {:.2}× ping ({:.1} µs)",
        plain / raw_b,
        raw_b / 1000.0
    );
}

/// Medians of `a` and `b` measured interleaved (a, b, a, b, ...), so that
/// load from other processes on the machine hits both alike.
fn interleaved<FA, FB, A, B>(rt: &tokio::runtime::Runtime, n: usize, a: FA, b: FB) -> (f64, f64)
where
    FA: Fn() -> A,
    FB: Fn() -> B,
    A: std::future::Future<Output = ()>,
    B: std::future::Future<Output = ()>,
{
    let mut ta = Vec::with_capacity(n);
    let mut tb = Vec::with_capacity(n);
    rt.block_on(async {
        for _ in 0..n {
            let t = std::time::Instant::now();
            a().await;
            ta.push(t.elapsed().as_nanos() as f64);
            let t = std::time::Instant::now();
            b().await;
            tb.push(t.elapsed().as_nanos() as f64);
        }
    });
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(&mut ta), median(&mut tb))
}

/// The least any fresh path of two statements can cost on this database:
/// a bare `INSERT` of a row shaped like a record, then an `UPDATE` that
/// stores a response in it (two commits, as durable as the pool's sessions),
/// on a scratch table with the same columns and indexes. Measured interleaved
/// with the store's claim + complete.
fn write_floor(rt: &tokio::runtime::Runtime, pool: &sqlx::PgPool, store: &dyn Store, what: &str) {
    let run = rand_run();
    let table = format!("bench_floor_{:x}", run as u64);
    rt.block_on(async {
        for sql in [
            format!(
                "CREATE TABLE {table} (id BYTEA PRIMARY KEY, fingerprint BYTEA NOT NULL, \
                 token BYTEA NOT NULL, lease_until TIMESTAMPTZ NOT NULL, \
                 expires_at TIMESTAMPTZ NOT NULL, outcome BYTEA)"
            ),
            format!("CREATE INDEX ON {table} (expires_at)"),
        ] {
            sqlx::query(&sql).execute(pool).await.expect("floor table");
        }
    });
    let insert = format!(
        "INSERT INTO {table} (id, fingerprint, token, lease_until, expires_at, outcome) \
         VALUES ($1, $2, $3, now() + interval '30 seconds', now() + interval '630 seconds', NULL)"
    );
    let update = format!(
        "UPDATE {table} SET outcome = $2, expires_at = now() + interval '600 seconds' WHERE id = $1"
    );
    let counter = AtomicU64::new(0);
    let encoded = outcome().encode();
    let (floor, fresh_t) = interleaved(
        rt,
        1000,
        || async {
            let id = RecordId::from_parts(
                &run.to_be_bytes(),
                &counter.fetch_add(1, Ordering::Relaxed).to_be_bytes(),
            );
            sqlx::query(&insert)
                .bind(id.as_bytes().as_slice())
                .bind(fingerprint().as_bytes().as_slice())
                .bind(LeaseToken::random().to_bytes().to_vec())
                .execute(pool)
                .await
                .expect("floor insert");
            sqlx::query(&update)
                .bind(id.as_bytes().as_slice())
                .bind(encoded.as_slice())
                .execute(pool)
                .await
                .expect("floor update");
        },
        || fresh(store, counter.fetch_add(1, Ordering::Relaxed), run),
    );
    rt.block_on(async {
        sqlx::query(&format!("DROP TABLE {table}"))
            .execute(pool)
            .await
            .expect("drop floor table");
    });
    println!(
        "\n== postgres ({what}): store fresh {:.1} µs vs the bare two-write floor {:.1} µs = {:.2}× ==",
        fresh_t / 1000.0,
        floor / 1000.0,
        fresh_t / floor
    );
}

fn rand_run() -> u128 {
    u128::from_be_bytes(LeaseToken::random().to_bytes())
}

fn report(group: &str, raw_name: &str, fresh_target: f64, replay_target: f64) {
    let m = |f: &str, p: &str| benches::median_ns(group, f, p);
    let (Some(raw), Some(fresh), Some(replay), Some(bare), Some(lf), Some(lr)) = (
        m("raw", raw_name),
        m("store", "fresh"),
        m("store", "replay"),
        m("http", "bare"),
        m("http", "layer-fresh"),
        m("http", "layer-replay"),
    ) else {
        println!("{group}: not measured in this run");
        return;
    };
    let verdict = |ratio: f64, target: f64| if ratio <= target { "ok" } else { "OVER TARGET" };
    let us = |ns: f64| ns / 1000.0;
    println!(
        "\n== {group}: one raw round trip ({raw_name}) = {:.1} µs ==",
        us(raw)
    );
    for (what, v, target) in [
        ("store claim+complete (fresh)", fresh, fresh_target),
        ("store claim (replay)", replay, replay_target),
    ] {
        let r = v / raw;
        println!(
            "{what}: {:.1} µs = {r:.2}× {raw_name} (target ≤ {target}×: {})",
            us(v),
            verdict(r, target)
        );
    }
    println!("http bare handler: {:.1} µs", us(bare));
    for (what, v, target) in [
        ("http layer, fresh", lf, fresh_target),
        ("http layer, replay", lr, replay_target),
    ] {
        let added = v - bare;
        let r = added / raw;
        println!(
            "{what}: {:.1} µs, adds {:.1} µs = {r:.2}× {raw_name} (target ≤ {target}×: {})",
            us(v),
            us(added),
            verdict(r, target)
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");

    let mut ran = Vec::new();
    match std::env::var("REDIS_URL") {
        Ok(url) => {
            ran.push("redis");
            use idempotency_redis::RedisStore;
            let store = rt
                .block_on(RedisStore::connect(&url))
                .expect("redis")
                .with_prefix(format!("bench-{:x}:", rand_run()));
            let conn = store.connection().clone();
            let raw = move || {
                let mut conn = conn.clone();
                async move {
                    let pong: String = redis::cmd("PING")
                        .query_async(&mut conn)
                        .await
                        .expect("ping");
                    std::hint::black_box(pong);
                }
            };
            let scripted = store.clone().with_scripted_claims();
            bench_backend(&mut c, &rt, "redis", "ping", raw.clone(), Arc::new(store));
            // The claim by script (Redis before 7) against the native one, in
            // the same run and against the same PING.
            native_vs_script(&rt, &raw, &scripted);
            redis_floor(&rt, &raw, scripted.connection());
        }
        Err(_) => println!("skipping the redis benches: REDIS_URL is not set"),
    }

    match std::env::var("REDIS_CLUSTER_URL") {
        Ok(url) => {
            ran.push("redis-cluster");
            use idempotency_redis::RedisStore;
            let store = rt
                .block_on(RedisStore::connect(&url))
                .expect("redis cluster")
                .with_prefix(format!("bench-{:x}:", rand_run()));
            // One round trip to one master: `PING` would go to every master.
            let conn = store.connection().clone();
            let key = format!("bench-raw-{:x}", rand_run());
            let raw = move || {
                let (mut conn, key) = (conn.clone(), key.clone());
                async move {
                    let got: Option<String> = redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut conn)
                        .await
                        .expect("get");
                    std::hint::black_box(got);
                }
            };
            bench_backend(&mut c, &rt, "redis-cluster", "get", raw, Arc::new(store));
        }
        Err(_) => println!("skipping the redis cluster benches: REDIS_CLUSTER_URL is not set"),
    }

    match std::env::var("DATABASE_URL") {
        Ok(url) => {
            ran.push("postgres");
            use idempotency_sqlx::postgres::PostgresStore;
            let store = rt.block_on(PostgresStore::connect(&url)).expect("postgres");
            let pool = store.pool().clone();
            let raw = move || {
                let pool = pool.clone();
                async move {
                    let one: i32 = sqlx::query_scalar("SELECT 1")
                        .fetch_one(&pool)
                        .await
                        .expect("select 1");
                    std::hint::black_box(one);
                }
            };
            let floor_pool = store.pool().clone();
            let store = Arc::new(store);
            bench_backend(&mut c, &rt, "postgres", "select1", raw, store.clone());
            write_floor(&rt, &floor_pool, &*store, "durable commits");

            // The same with asynchronous commit: no WAL flush per commit.
            use idempotency_sqlx::postgres::PostgresOptions;
            ran.push("postgres-async-commit");
            let store = rt
                .block_on(PostgresStore::connect_with(
                    &url,
                    PostgresOptions::new().synchronous_commit(false),
                ))
                .expect("postgres");
            let pool = store.pool().clone();
            let raw = move || {
                let pool = pool.clone();
                async move {
                    let one: i32 = sqlx::query_scalar("SELECT 1")
                        .fetch_one(&pool)
                        .await
                        .expect("select 1");
                    std::hint::black_box(one);
                }
            };
            let floor_pool = store.pool().clone();
            let store = Arc::new(store);
            bench_backend(
                &mut c,
                &rt,
                "postgres-async-commit",
                "select1",
                raw,
                store.clone(),
            );
            write_floor(&rt, &floor_pool, &*store, "synchronous_commit = off");
        }
        Err(_) => println!("skipping the postgres benches: DATABASE_URL is not set"),
    }

    c.final_summary();
    if ran.contains(&"redis") {
        report("redis", "ping", 2.1, 1.1);
    }
    if ran.contains(&"redis-cluster") {
        report("redis-cluster", "get", 2.1, 1.1);
    }
    if ran.contains(&"postgres") {
        report("postgres", "select1", 2.5, 1.3);
        report("postgres-async-commit", "select1", 2.5, 1.3);
    }
}
