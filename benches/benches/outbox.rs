//! The transactional outbox, each figure against a baseline of the same run.
//!
//! 1. **Enqueue** (criterion, then interleaved): a one-`INSERT` business
//!    transaction with one event enqueued (keyless, and with an ordering
//!    key), against the same transaction without it. The floor: the same
//!    transaction with a second plain `INSERT` instead of the event.
//!    Target ≤ 1.1×.
//! 2. **Relay throughput** (no criterion): N events are enqueued (untimed),
//!    then one or two relays (`Relay::run`) drain them to the broker with
//!    confirmations; events/s from the start of the relays to the last
//!    commit. Baselines, measured before and after each batch size: the
//!    broker's raw rate through the same client (lapin with confirms, async-
//!    nats with `PubAck`s, the same message, pipelined in batches of the
//!    batch size), the outbox's `Publisher` alone (no database), and the relay
//!    against a publisher that confirms at once (the database's ceiling).
//!    Targets ≥ 10 000/s to NATS JetStream, ≥ 5 000/s to RabbitMQ.
//! 3. **Latency** from commit to broker confirmation at a steady rate with
//!    `NOTIFY` wake-ups: p50 and p99, against the broker's own one-message
//!    publish-and-confirm latency at the same rate. Target p99 ≤ 50 ms.
//!
//! `DATABASE_URL`, `AMQP_URL`, `NATS_URL` are read at run time; a part or a
//! broker is skipped, with a line, when its variable is unset. Everything
//! lives in a database `bench_outbox_<rand>` (dropped at the end), a durable
//! queue and a JetStream stream of unique names (deleted at the end).
//!
//! Knobs: `OUTBOX_BENCH_PARTS` (default `enqueue,throughput,latency`),
//! `OUTBOX_BENCH_N` (events per throughput run, default 20000),
//! `OUTBOX_BENCH_BATCH` (batch sizes, default `100,500,1000`),
//! `OUTBOX_BENCH_RATE` (events/s, default 500), `OUTBOX_BENCH_SECS`
//! (latency run, default 10), `OUTBOX_BENCH_LAT_BATCH` (the latency relay's
//! batch size, default 100).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::HeaderMap;
use criterion::{BenchmarkId, Criterion};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation};
use outbox::nats::NatsPublisher;
use outbox::rabbitmq::RabbitMqPublisher;
use outbox::{Event, Outgoing, PostgresRelay, PublishError, Publisher, RelayConfig, Uuid};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

const GROUP: &str = "outbox_enqueue";
const TABLE: &str = "bench_outbox_payments";
const INSERT: &str = "INSERT INTO bench_outbox_payments (ref, amount, note) VALUES ($1, $2, $3)";
/// The event payload: 128 bytes of JSON.
const PAYLOAD_LEN: usize = 128;
const KEYS: usize = 10;

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
}

fn env_num<T: std::str::FromStr>(var: &str, default: T) -> T {
    env(var).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn payload(i: usize) -> Vec<u8> {
    let mut s = format!(
        "{{\"account\":\"acct-{}\",\"amount\":{i},\"note\":\"",
        i % KEYS
    );
    while s.len() < PAYLOAD_LEN - 2 {
        s.push('x');
    }
    s.push_str("\"}");
    s.into_bytes()
}

fn event(dest: &str, i: usize, keyed: bool) -> Event {
    let e = Event::new(dest, payload(i)).with_header("content-type", "application/json");
    if keyed {
        e.with_ordering_key(format!("acct-{}", i % KEYS))
    } else {
        e
    }
}

fn rand_tag() -> String {
    let id = Uuid::now_v7().simple().to_string();
    id[id.len() - 10..].to_owned()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------- database

/// A private database with the outbox and the business table.
struct Db {
    admin: PgPool,
    pool: PgPool,
    name: String,
}

impl Db {
    async fn create(url: &str) -> Self {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .expect("PostgreSQL does not answer");
        let name = format!("bench_outbox_{}", rand_tag());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("create database");
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (url, String::new()),
        };
        let root = &base[..base.rfind('/').expect("DATABASE_URL has no database")];
        let pool = PgPoolOptions::new()
            .max_connections(12)
            .connect(&format!("{root}/{name}{query}"))
            .await
            .expect("connect to the bench database");
        outbox::migrate_postgres(&pool).await.expect("migrate");
        sqlx::query(&format!(
            "CREATE TABLE {TABLE} (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
             ref TEXT NOT NULL, amount BIGINT NOT NULL, note BYTEA NOT NULL)"
        ))
        .execute(&pool)
        .await
        .expect("business table");
        Self { admin, pool, name }
    }

    async fn reset(&self) {
        sqlx::query("TRUNCATE outbox.events")
            .execute(&self.pool)
            .await
            .expect("truncate");
    }

    async fn pending(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox.events WHERE published_at IS NULL")
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    async fn destroy(self) {
        self.pool.close().await;
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&self.admin)
        .await;
    }
}

/// `n` events in transactions of 1000 (untimed set-up of a throughput run).
async fn fill(pool: &PgPool, dest: &str, n: usize, keyed: bool) {
    let mut i = 0;
    while i < n {
        let mut tx = pool.begin().await.expect("begin");
        for _ in 0..1000.min(n - i) {
            outbox::enqueue(&mut *tx, &event(dest, i, keyed))
                .await
                .expect("enqueue");
            i += 1;
        }
        tx.commit().await.expect("commit");
    }
    sqlx::query("ANALYZE outbox.events")
        .execute(pool)
        .await
        .expect("analyze");
}

// ---------------------------------------------------------------- part 1

type Job<'a> = Box<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + 'a>> + 'a>;

fn job<'a, F, Fut>(f: F) -> Job<'a>
where
    F: Fn() -> Fut + 'a,
    Fut: Future<Output = ()> + 'a,
{
    Box::new(move || Box::pin(f()))
}

/// Medians (ns) of `jobs` measured interleaved, rotating the first.
fn interleaved(rt: &tokio::runtime::Runtime, n: usize, jobs: &[Job<'_>]) -> Vec<f64> {
    let mut times = vec![Vec::with_capacity(n); jobs.len()];
    rt.block_on(async {
        for round in 0..n {
            for i in 0..jobs.len() {
                let j = (round + i) % jobs.len();
                let t = Instant::now();
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

async fn insert_row(conn: &mut sqlx::PgConnection, i: u64) {
    sqlx::query(INSERT)
        .bind(format!("pay-{i}"))
        .bind(100_i64)
        .bind(&[b'x'; 64][..])
        .execute(conn)
        .await
        .expect("insert");
}

fn bench_enqueue(c: &mut Criterion, rt: &tokio::runtime::Runtime, db: &Db) {
    rt.block_on(db.reset());
    let pool = &db.pool;
    let counter = AtomicU64::new(0);
    let next = || counter.fetch_add(1, Ordering::Relaxed);
    let dest = "payments";
    let insert_tx = || async {
        let mut tx = pool.begin().await.expect("begin");
        insert_row(&mut tx, next()).await;
        tx.commit().await.expect("commit");
    };
    let insert_insert_tx = || async {
        let mut tx = pool.begin().await.expect("begin");
        insert_row(&mut tx, next()).await;
        insert_row(&mut tx, next()).await;
        tx.commit().await.expect("commit");
    };
    let enqueue_tx = |keyed: bool| {
        let next = &next;
        move || async move {
            let i = next();
            let mut tx = pool.begin().await.expect("begin");
            insert_row(&mut tx, i).await;
            outbox::enqueue(&mut *tx, &event(dest, i as usize, keyed))
                .await
                .expect("enqueue");
            tx.commit().await.expect("commit");
        }
    };
    // The event's row written by hand, without the CTE's pg_notify: what
    // the row and its indexes cost alone.
    let row_no_notify_tx = || async {
        let i = next();
        let e = event(dest, i as usize, false);
        let mut tx = pool.begin().await.expect("begin");
        insert_row(&mut tx, i).await;
        sqlx::query(
            "INSERT INTO outbox.events (id, destination, ordering_key, headers, payload) \
             VALUES ($1::uuid, $2, $3, $4::jsonb, $5)",
        )
        .bind(e.id().to_string())
        .bind(e.destination())
        .bind(e.ordering_key())
        .bind(r#"[["content-type","application/json"]]"#)
        .bind(e.payload().as_ref())
        .execute(&mut *tx)
        .await
        .expect("outbox row");
        tx.commit().await.expect("commit");
    };
    let select1 = || async {
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(pool)
            .await
            .expect("select 1");
        std::hint::black_box(one);
    };

    let mut group = c.benchmark_group(GROUP);
    group.bench_function(BenchmarkId::new("tx", "insert"), |b| {
        b.to_async(rt).iter(insert_tx)
    });
    group.bench_function(BenchmarkId::new("tx", "insert_enqueue"), |b| {
        b.to_async(rt).iter(enqueue_tx(false))
    });
    group.bench_function(BenchmarkId::new("tx", "insert_enqueue_keyed"), |b| {
        b.to_async(rt).iter(enqueue_tx(true))
    });
    group.bench_function(BenchmarkId::new("tx", "insert_insert"), |b| {
        b.to_async(rt).iter(insert_insert_tx)
    });
    group.bench_function(BenchmarkId::new("tx", "insert_row_no_notify"), |b| {
        b.to_async(rt).iter(row_no_notify_tx)
    });
    group.finish();

    let n = env_num("OUTBOX_BENCH_ROUNDS", 2000);
    let m = interleaved(
        rt,
        n,
        &[
            job(insert_tx),
            job(enqueue_tx(false)),
            job(enqueue_tx(true)),
            job(insert_insert_tx),
            job(row_no_notify_tx),
            job(select1),
        ],
    );
    let [base, keyless, keyed, two, row, rtt] = m[..] else {
        unreachable!()
    };
    let us = |ns: f64| ns / 1000.0;
    let verdict = |r: f64| if r <= 1.1 { "ok" } else { "OVER TARGET" };
    println!("\n== {GROUP}: interleaved medians of {n} ==");
    println!("round trip (SELECT 1): {:.1} µs", us(rtt));
    println!(
        "BEGIN; INSERT; COMMIT (baseline): {:.1} µs = {:.1} round trips",
        us(base),
        base / rtt
    );
    for (what, t) in [
        ("+ enqueue keyless", keyless),
        ("+ enqueue keyed", keyed),
        ("+ a second plain INSERT (floor)", two),
        ("+ the outbox row by hand, no pg_notify", row),
    ] {
        println!(
            "BEGIN; INSERT; {what}; COMMIT: {:.1} µs = {:.3}× baseline (+{:.1} µs, target ≤ 1.1×: {})",
            us(t),
            t / base,
            us(t - base),
            verdict(t / base)
        );
    }
    println!(
        "| transaction | median µs | × baseline |\n|---|---|---|\n\
         | BEGIN; INSERT; COMMIT | {:.1} | 1.00 |\n\
         | + enqueue (keyless) | {:.1} | {:.3} |\n\
         | + enqueue (ordering key) | {:.1} | {:.3} |\n\
         | + second plain INSERT (floor) | {:.1} | {:.3} |\n\
         | + the outbox row by hand, without pg_notify | {:.1} | {:.3} |\n\
         | SELECT 1 (one round trip) | {:.1} | {:.3} |",
        us(base),
        us(keyless),
        keyless / base,
        us(keyed),
        keyed / base,
        us(two),
        two / base,
        us(row),
        row / base,
        us(rtt),
        rtt / base
    );
}

fn report_enqueue() {
    benches::print_ratio(
        GROUP,
        ("tx", "insert"),
        &[
            ("tx", "insert_enqueue"),
            ("tx", "insert_enqueue_keyed"),
            ("tx", "insert_insert"),
            ("tx", "insert_row_no_notify"),
        ],
    );
}

// ---------------------------------------------------------------- publishers

/// Wraps a publisher: the time spent in `publish` (all batches), the batches,
/// and optionally when each event's confirmation came back.
struct Timed<P> {
    inner: P,
    busy_ns: AtomicU64,
    batches: AtomicU64,
    confirms: Option<Arc<Mutex<HashMap<Uuid, Instant>>>>,
}

impl<P> Timed<P> {
    fn new(inner: P) -> Self {
        Self {
            inner,
            busy_ns: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            confirms: None,
        }
    }
}

impl<P: Publisher> Publisher for Timed<P> {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        let t = Instant::now();
        let r = self.inner.publish(batch).await;
        let now = Instant::now();
        self.busy_ns
            .fetch_add((now - t).as_nanos() as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = &self.confirms {
            let mut c = c.lock().expect("confirms");
            for (o, r) in batch.iter().zip(&r) {
                if r.is_ok() {
                    c.entry(o.event().id()).or_insert(now);
                }
            }
        }
        r
    }
}

/// Confirms everything at once: the relay's database work alone.
struct Instant0;

impl Publisher for Instant0 {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        vec![Ok(()); batch.len()]
    }
}

/// The broker under test: how to make the outbox's publisher, and the raw
/// client's pipelined publish with confirms.
#[derive(Clone)]
enum Broker {
    Rabbit {
        url: String,
        channel: lapin::Channel,
        _conn: Arc<lapin::Connection>,
    },
    Nats {
        js: jetstream::Context,
    },
    Null,
}

impl Broker {
    fn name(&self) -> &'static str {
        match self {
            Broker::Rabbit { .. } => "RabbitMQ",
            Broker::Nats { .. } => "NATS JetStream",
            Broker::Null => "none (instant confirm)",
        }
    }

    async fn rabbit(url: &str, queue: &str) -> Self {
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .expect("RabbitMQ does not answer");
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare");
        Broker::Rabbit {
            url: url.to_owned(),
            channel,
            _conn: Arc::new(conn),
        }
    }

    async fn nats(url: &str, stream: &str, dest: &str) -> Self {
        let client = async_nats::connect(url)
            .await
            .expect("NATS does not answer");
        let js = jetstream::new(client);
        js.create_stream(jetstream::stream::Config {
            name: stream.to_owned(),
            subjects: vec![format!("{dest}.>")],
            ..Default::default()
        })
        .await
        .expect("create stream");
        Broker::Nats { js }
    }

    /// A fresh outbox publisher (its own connection, for RabbitMQ).
    async fn publisher(&self) -> AnyPublisher {
        match self {
            Broker::Rabbit { url, .. } => AnyPublisher::Rabbit(
                RabbitMqPublisher::connect(url.as_str())
                    .await
                    .expect("connect"),
            ),
            Broker::Nats { js } => AnyPublisher::Nats(NatsPublisher::new(js.clone(), |d| {
                Some(format!("{d}.created"))
            })),
            Broker::Null => AnyPublisher::Null(Instant0),
        }
    }

    async fn purge(&self, queue: &str, stream: &str) {
        match self {
            Broker::Rabbit { channel, .. } => {
                channel
                    .queue_purge(queue.into(), QueuePurgeOptions::default())
                    .await
                    .expect("purge");
            }
            Broker::Nats { js } => {
                js.get_stream(stream)
                    .await
                    .expect("stream")
                    .purge()
                    .await
                    .expect("purge");
            }
            Broker::Null => {}
        }
    }

    /// Publishes `events` through the raw client, pipelined in batches of
    /// `batch`, every confirmation awaited; panics on a refusal.
    async fn raw(&self, events: &[Event], batch: usize) {
        match self {
            Broker::Rabbit { channel, .. } => {
                for chunk in events.chunks(batch) {
                    let mut pending = Vec::with_capacity(chunk.len());
                    for e in chunk {
                        let mut headers = FieldTable::default();
                        for (k, v) in e.headers() {
                            headers.insert(
                                k.as_str().into(),
                                AMQPValue::LongString(v.as_str().into()),
                            );
                        }
                        let props = BasicProperties::default()
                            .with_message_id(e.id().to_string().into())
                            .with_delivery_mode(2)
                            .with_headers(headers);
                        pending.push(
                            channel
                                .basic_publish(
                                    "".into(),
                                    e.destination().into(),
                                    BasicPublishOptions {
                                        mandatory: true,
                                        ..BasicPublishOptions::default()
                                    },
                                    e.payload(),
                                    props,
                                )
                                .await
                                .expect("publish"),
                        );
                    }
                    for p in pending {
                        assert!(matches!(p.await, Ok(Confirmation::Ack(None))));
                    }
                }
            }
            Broker::Nats { js } => {
                for chunk in events.chunks(batch) {
                    let mut pending = Vec::with_capacity(chunk.len());
                    for e in chunk {
                        let mut headers = HeaderMap::new();
                        for (k, v) in e.headers() {
                            headers.insert(k.as_str(), v.as_str());
                        }
                        headers.insert("Nats-Msg-Id", e.id().to_string().as_str());
                        let msg = PublishMessage::build()
                            .payload(e.payload().clone())
                            .headers(headers);
                        pending.push(
                            js.send_publish(format!("{}.created", e.destination()), msg)
                                .await
                                .expect("publish"),
                        );
                    }
                    for p in pending {
                        p.await.expect("puback");
                    }
                }
            }
            Broker::Null => {}
        }
    }

    async fn cleanup(&self, queue: &str, stream: &str) {
        match self {
            Broker::Rabbit { channel, .. } => {
                let _ = channel
                    .queue_delete(queue.into(), QueueDeleteOptions::default())
                    .await;
            }
            Broker::Nats { js } => {
                let _ = js.delete_stream(stream).await;
            }
            Broker::Null => {}
        }
    }
}

enum AnyPublisher {
    Rabbit(RabbitMqPublisher),
    Nats(NatsPublisher),
    Null(Instant0),
}

impl Publisher for AnyPublisher {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        match self {
            AnyPublisher::Rabbit(p) => p.publish(batch).await,
            AnyPublisher::Nats(p) => p.publish(batch).await,
            AnyPublisher::Null(p) => p.publish(batch).await,
        }
    }
}

// ---------------------------------------------------------------- part 2

struct RunStats {
    rate: f64,
    secs: f64,
    publish_share: f64,
    batches: u64,
}

fn config(batch: u32) -> RelayConfig {
    RelayConfig::builder()
        .batch_size(batch)
        .build()
        .expect("config")
}

/// Runs `relays` relays until `n` events are published; the rate from their
/// start to the commit of the last.
async fn drain(db: &Db, broker: &Broker, relays: usize, n: usize, batch: u32) -> RunStats {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut handles = Vec::new();
    let mut all = Vec::new();
    let mut pubs = Vec::new();
    for _ in 0..relays {
        pubs.push(Arc::new(Timed::new(broker.publisher().await)));
    }
    let started = Instant::now();
    for p in pubs {
        let relay = PostgresRelay::new(db.pool.clone(), p, config(batch));
        all.push(relay.clone());
        let mut stopped = stopped.clone();
        handles.push(tokio::spawn(async move {
            relay
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
                .expect("relay");
        }));
    }
    let limit = Instant::now() + Duration::from_secs(300);
    loop {
        let done: u64 = all.iter().map(|r| r.metrics().published).sum();
        if done >= n as u64 {
            break;
        }
        assert!(Instant::now() < limit, "the relays did not drain in time");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    for h in handles {
        h.await.expect("relay task");
    }
    let busy: u64 = all
        .iter()
        .map(|r| r.publisher().busy_ns.load(Ordering::Relaxed))
        .sum();
    let batches: u64 = all.iter().map(|r| r.metrics().batches).sum();
    assert_eq!(db.pending().await, 0, "events left behind");
    RunStats {
        rate: n as f64 / secs,
        secs,
        publish_share: busy as f64 / 1e9 / secs / relays as f64,
        batches,
    }
}

/// The raw client's rate, and the outbox publisher's alone, in events/s.
async fn baselines(broker: &Broker, dest: &str, n: usize, batch: usize) -> (f64, f64) {
    let events: Vec<Event> = (0..n).map(|i| event(dest, i, false)).collect();
    let t = Instant::now();
    broker.raw(&events, batch).await;
    let raw = n as f64 / t.elapsed().as_secs_f64();
    let publisher = broker.publisher().await;
    let outgoing: Vec<Outgoing> = (0..n)
        .map(|i| Outgoing::new(i as i64 + 1, 1, event(dest, i, false)))
        .collect();
    let t = Instant::now();
    for chunk in outgoing.chunks(batch) {
        let r = publisher.publish(chunk).await;
        assert!(r.iter().all(Result::is_ok), "a refusal: {r:?}");
    }
    let alone = n as f64 / t.elapsed().as_secs_f64();
    (raw, alone)
}

async fn throughput(db: &Db, brokers: &[(Broker, String, String, String)]) {
    let n: usize = env_num("OUTBOX_BENCH_N", 20_000);
    let batches: Vec<u32> = env("OUTBOX_BENCH_BATCH")
        .unwrap_or_else(|| "100,500,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut table = vec![
        "| broker | batch_size | events | relays | events/s | × raw client | × publisher alone | in publish | batches |".to_owned(),
        "|---|---|---|---|---|---|---|---|---|".to_owned(),
    ];
    let mut best: HashMap<&'static str, (f64, String)> = HashMap::new();
    for (broker, dest, queue, stream) in brokers {
        for &batch in &batches {
            let (raw1, alone1) = if matches!(broker, Broker::Null) {
                (f64::NAN, f64::NAN)
            } else {
                broker.purge(queue, stream).await;
                baselines(broker, dest, n, batch as usize).await
            };
            let mut runs = Vec::new();
            for keyed in [false, true] {
                for relays in [1, 2] {
                    db.reset().await;
                    broker.purge(queue, stream).await;
                    fill(&db.pool, dest, n, keyed).await;
                    let s = drain(db, broker, relays, n, batch).await;
                    runs.push((keyed, relays, s));
                }
            }
            let (raw2, alone2) = if matches!(broker, Broker::Null) {
                (f64::NAN, f64::NAN)
            } else {
                broker.purge(queue, stream).await;
                baselines(broker, dest, n, batch as usize).await
            };
            let raw = (raw1 + raw2) / 2.0;
            let alone = (alone1 + alone2) / 2.0;
            println!(
                "{} batch {batch}: raw client {raw1:.0}/s then {raw2:.0}/s, publisher alone {alone1:.0}/s then {alone2:.0}/s",
                broker.name()
            );
            for (keyed, relays, s) in runs {
                let mode = if keyed { "10 keys" } else { "keyless" };
                println!(
                    "{} batch {batch} {mode} {relays} relay(s): {:.0} events/s ({:.2} s, {} batches, {:.0}% of relay time in publish) = {:.2}× raw, {:.2}× publisher",
                    broker.name(),
                    s.rate,
                    s.secs,
                    s.batches,
                    s.publish_share * 100.0,
                    s.rate / raw,
                    s.rate / alone
                );
                table.push(format!(
                    "| {} | {batch} | {mode} | {relays} | {:.0} | {:.2} | {:.2} | {:.0}% | {} |",
                    broker.name(),
                    s.rate,
                    s.rate / raw,
                    s.rate / alone,
                    s.publish_share * 100.0,
                    s.batches
                ));
                let e = best.entry(broker.name()).or_insert((0.0, String::new()));
                if s.rate > e.0 {
                    *e = (s.rate, format!("batch {batch}, {mode}, {relays} relay(s)"));
                }
            }
            if !raw.is_nan() {
                table.push(format!(
                    "| {} | {batch} | baseline | – | raw {raw:.0}, publisher {alone:.0} | 1 | – | – | – |",
                    broker.name()
                ));
            }
        }
    }
    println!("\n== outbox relay throughput, {n} events per run ==");
    for l in &table {
        println!("{l}");
    }
    for (b, (rate, how)) in &best {
        println!("best to {b}: {rate:.0} events/s ({how})");
    }
}

// ---------------------------------------------------------------- part 3

fn dist(mut v: Vec<f64>) -> (f64, f64, f64, usize) {
    v.sort_by(f64::total_cmp);
    (
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v.last().copied().unwrap_or(f64::NAN),
        v.len(),
    )
}

/// One event per transaction at `rate`/s for `secs`; the time from the
/// `COMMIT` being sent to the relay's publisher getting the confirmation.
async fn latency_run(
    db: &Db,
    broker: &Broker,
    dest: &str,
    keyed: bool,
    rate: f64,
    secs: f64,
) -> (f64, f64, f64, usize) {
    db.reset().await;
    let confirms = Arc::new(Mutex::new(HashMap::new()));
    let mut p = Timed::new(broker.publisher().await);
    p.confirms = Some(confirms.clone());
    let batch = env_num("OUTBOX_BENCH_LAT_BATCH", 100);
    let relay = PostgresRelay::new(db.pool.clone(), p, config(batch));
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let r = relay.clone();
    let handle = tokio::spawn(async move {
        r.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await
        .expect("relay");
    });
    // Let it start listening.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let commits: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let total = (rate * secs) as usize;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut producers = Vec::with_capacity(total);
    for i in 0..total {
        tick.tick().await;
        let (pool, commits, dest) = (db.pool.clone(), commits.clone(), dest.to_owned());
        producers.push(tokio::spawn(async move {
            let e = event(&dest, i, keyed);
            let mut tx = pool.begin().await.expect("begin");
            insert_row(&mut tx, i as u64).await;
            outbox::enqueue(&mut *tx, &e).await.expect("enqueue");
            let t = Instant::now();
            tx.commit().await.expect("commit");
            commits.lock().expect("commits").insert(e.id(), t);
        }));
    }
    for p in producers {
        p.await.expect("producer");
    }
    let limit = Instant::now() + Duration::from_secs(60);
    while relay.metrics().published < total as u64 {
        assert!(Instant::now() < limit, "the relay did not catch up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = stop.send(true);
    handle.await.expect("relay task");
    let commits = commits.lock().expect("commits");
    let confirms = confirms.lock().expect("confirms");
    let lat: Vec<f64> = commits
        .iter()
        .map(|(id, t)| {
            let c = confirms.get(id).expect("confirmed");
            c.saturating_duration_since(*t).as_secs_f64() * 1000.0
        })
        .collect();
    dist(lat)
}

/// The broker's own latency: one message published and its confirmation
/// awaited, at `rate`/s for `secs`, through the raw client.
async fn broker_latency(
    broker: &Broker,
    dest: &str,
    rate: f64,
    secs: f64,
) -> (f64, f64, f64, usize) {
    let total = (rate * secs) as usize;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut lat = Vec::with_capacity(total);
    for i in 0..total {
        tick.tick().await;
        let e = [event(dest, i, false)];
        let t = Instant::now();
        broker.raw(&e, 1).await;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    dist(lat)
}

async fn latency(db: &Db, brokers: &[(Broker, String, String, String)]) {
    let rate: f64 = env_num("OUTBOX_BENCH_RATE", 500.0);
    let secs: f64 = env_num("OUTBOX_BENCH_SECS", 10.0);
    let mut table = vec![
        "| broker | what | p50 ms | p99 ms | max ms | events |".to_owned(),
        "|---|---|---|---|---|---|".to_owned(),
    ];
    for (broker, dest, queue, stream) in brokers {
        if matches!(broker, Broker::Null) {
            continue;
        }
        broker.purge(queue, stream).await;
        let base = broker_latency(broker, dest, rate, secs.min(5.0)).await;
        let mut rows = vec![("raw publish + confirm (baseline)".to_owned(), base)];
        for keyed in [false, true] {
            broker.purge(queue, stream).await;
            let r = latency_run(db, broker, dest, keyed, rate, secs).await;
            let what = if keyed {
                "commit → confirm, 10 keys"
            } else {
                "commit → confirm, keyless"
            };
            rows.push((what.to_owned(), r));
        }
        let base_after = broker_latency(broker, dest, rate, secs.min(5.0)).await;
        rows.push(("raw publish + confirm (after)".to_owned(), base_after));
        for (what, (p50, p99, max, n)) in rows {
            let verdict = if what.starts_with("commit") {
                format!(
                    " (+{:.2} / +{:.2} ms over the broker; p99 target ≤ 50 ms: {})",
                    p50 - base.0,
                    p99 - base.1,
                    if p99 <= 50.0 { "ok" } else { "OVER TARGET" }
                )
            } else {
                String::new()
            };
            println!(
                "{} {what}: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms, {n} events{verdict}",
                broker.name()
            );
            table.push(format!(
                "| {} | {what} | {p50:.2} | {p99:.2} | {max:.2} | {n} |",
                broker.name()
            ));
        }
    }
    println!("\n== outbox latency at {rate}/s for {secs} s ==");
    for l in &table {
        println!("{l}");
    }
}

// ---------------------------------------------------------------- main

fn main() {
    let Some(url) = env("DATABASE_URL") else {
        println!("skipping the outbox benches: DATABASE_URL is not set");
        return;
    };
    let parts = env("OUTBOX_BENCH_PARTS").unwrap_or_else(|| "enqueue,throughput,latency".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    if parts.contains("enqueue") {
        let db = rt.block_on(Db::create(&url));
        println!("bench database {}", db.name);
        let mut c = Criterion::default()
            .measurement_time(Duration::from_secs(3))
            .warm_up_time(Duration::from_secs(1))
            .configure_from_args();
        bench_enqueue(&mut c, &rt, &db);
        c.final_summary();
        report_enqueue();
        rt.block_on(db.destroy());
    }
    drop(rt);
    if parts.contains("throughput") || parts.contains("latency") {
        // The relays, producers and clients share the machine's two cores.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let db = Db::create(&url).await;
            println!("bench database {}", db.name);
            let tag = rand_tag();
            let dest = format!("bench_outbox_{tag}");
            let stream = format!("BENCH_OUTBOX_{}", tag.to_uppercase());
            let mut brokers = Vec::new();
            match env("NATS_URL") {
                Some(u) => brokers.push(Broker::nats(&u, &stream, &dest).await),
                None => println!("skipping NATS: NATS_URL is not set"),
            }
            match env("AMQP_URL") {
                Some(u) => brokers.push(Broker::rabbit(&u, &dest).await),
                None => println!("skipping RabbitMQ: AMQP_URL is not set"),
            }
            brokers.push(Broker::Null);
            let brokers: Vec<_> = brokers
                .into_iter()
                .map(|b| (b, dest.clone(), dest.clone(), stream.clone()))
                .collect();
            if parts.contains("throughput") {
                throughput(&db, &brokers).await;
            }
            if parts.contains("latency") {
                latency(&db, &brokers).await;
            }
            for (b, _, q, s) in &brokers {
                b.cleanup(q, s).await;
            }
            db.destroy().await;
        });
    }
}
