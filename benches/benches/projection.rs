//! A projection fed from the outbox table, against the same writes with no
//! projection machinery, in one run, on PostgreSQL (a database of its own,
//! created and dropped):
//!
//! - `outbox_tail`: [`Projector::run`] (one partition, batches of 100)
//!   applies 2 000 payments already in the outbox to per-currency totals:
//!   per batch a transaction with the partition's lock, the scan, the
//!   applies, the marks, the watermark and the hold, and the commit.
//! - `bare`: the same 2 000 applies (the same `apply` code), read from the
//!   outbox in `seq` order in batches of 100, each batch in one transaction,
//!   with nothing else: no lock, no marks, no watermark.
//!
//! Each iteration applies all 2 000 to fresh tables (a new version for the
//! tail, a new schema with the same `setup` for the bare loop; made outside
//! the timing).
//! Target: the tail at ≥ 0.8× the bare loop's events per second.
//!
//! The broker sources (`broker/rabbitmq`, `broker/nats`, each when its
//! `AMQP_URL` / `NATS_URL` is set): 2 000 payments already in a fresh queue
//! or stream, consumed with `Subscription::batch(size, 5 ms)` and
//! `run_batch`:
//! - `projector`: [`Projector::apply_batch`] through the transactional
//!   inbox (the version's consumer): per batch one transaction that records
//!   every message in the inbox, applies the new ones and commits once;
//! - `bare`: the same subscription and batches, the same applies in one
//!   transaction per batch, no inbox.
//!
//! For batches of 100 and of 1 (one transaction per message), timed from
//! the first batch in hand to the last commit, in interleaved pairs; the
//! medians and their ratio are printed. Target ≥ 0.8×.
//!
//! Then the lag under a steady load: producers commit
//! `PROJECTION_LAG_RATE` payments a second (default 1 000), one per
//! transaction, for 5 s while the tail runs; from each event's
//! `created_at` (its transaction's start) to its apply, p50, p99 and max are
//! printed, beside the floor in the same run: the producers' own latency
//! from `BEGIN` to the end of `COMMIT`.
//!
//! `DATABASE_URL` is read at run time; the bench is skipped when it is
//! unset.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput};
use projection::{ApplyError, Event, Projection, Projector, ProjectorConfig, Version};
use serde::Deserialize;
use sqlx::{PgConnection, PgPool, Row};

const GROUP: &str = "projection";
/// Payments applied per iteration.
const EVENTS: u64 = 2_000;
const BATCH: i64 = 100;

/// Per-currency totals of payments; records each apply's delay from the
/// event's `created_at` when asked.
#[derive(Default)]
struct PaymentTotals {
    delays: Option<Arc<Mutex<Vec<Duration>>>>,
}

#[derive(Deserialize)]
struct Payment {
    amount: i64,
    currency: String,
}

impl Projection for PaymentTotals {
    async fn setup(&self, conn: &mut PgConnection, version: &Version) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {} (currency TEXT PRIMARY KEY, total BIGINT NOT NULL, count BIGINT NOT NULL)",
            version.table("totals")
        ))
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        version: &Version,
        event: &Event,
    ) -> Result<(), ApplyError> {
        let p: Payment = event.json()?;
        sqlx::query(&format!(
            "INSERT INTO {} AS t (currency, total, count) VALUES ($1, $2, 1) \
             ON CONFLICT (currency) DO UPDATE SET total = t.total + $2, count = t.count + 1",
            version.table("totals")
        ))
        .bind(&p.currency)
        .bind(p.amount)
        .execute(conn)
        .await?;
        if let (Some(delays), Some(created)) = (&self.delays, event.created_at()) {
            let delay = SystemTime::now()
                .duration_since(created)
                .unwrap_or_default();
            delays.lock().unwrap().push(delay);
        }
        Ok(())
    }
}

async fn enqueue(pool: &PgPool, n: u64) {
    for chunk in 0..n / 50 {
        let mut tx = pool.begin().await.expect("begin");
        for i in 0..50 {
            let k = chunk * 50 + i;
            let currency = ["EUR", "USD", "GBP"][usize::try_from(k % 3).unwrap()];
            let payload = serde_json::json!({
                "account": format!("acct-{}", k % 20),
                "amount": 1 + k % 100,
                "currency": currency,
            });
            let event = outbox::Event::new("payments", payload.to_string().into_bytes())
                .with_ordering_key(format!("acct-{}", k % 20));
            outbox::enqueue(&mut *tx, &event).await.expect("enqueue");
        }
        tx.commit().await.expect("commit");
    }
}

/// A projector of a version no iteration used, registered (outside the
/// timing).
async fn fresh_projector(pool: &PgPool, name: &str, version: u32) -> Projector<PaymentTotals> {
    let p = Projector::builder(pool.clone(), name, PaymentTotals::default())
        .version(version)
        .destinations(["payments"])
        .config(ProjectorConfig {
            poll_interval: Duration::from_millis(100),
            ..ProjectorConfig::default()
        })
        .build()
        .expect("projector");
    p.register().await.expect("register");
    p
}

/// Runs the tail until it applied `n` events.
async fn tail_until(p: &Projector<PaymentTotals>, n: u64) {
    let done = async {
        while p.metrics().applied < n {
            // Not more often: the poll competes with the tail for the
            // runtime's two threads, which the bare loop does not have.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    p.run(done).await.expect("run");
}

/// Fresh tables for the bare loop: a version's schema and `setup`, as the
/// tail gets (outside the timing), so both pay the same first use of a
/// table.
async fn fresh_tables(pool: &PgPool, version: u32) -> Version {
    let v = Version::new("bench_bare", version);
    let mut conn = pool.acquire().await.expect("conn");
    sqlx::query(&format!("CREATE SCHEMA {}", v.schema()))
        .execute(&mut *conn)
        .await
        .expect("schema");
    PaymentTotals::default()
        .setup(&mut conn, &v)
        .await
        .expect("setup");
    v
}

/// The same applies with no machinery: batches in `seq` order, one
/// transaction each.
async fn bare(pool: &PgPool, totals: &PaymentTotals, version: &Version) {
    let mut after = 0_i64;
    loop {
        let rows = sqlx::query(
            "SELECT seq, id::text AS id, payload FROM outbox.events \
             WHERE seq > $1 AND destination = ANY($2) ORDER BY seq LIMIT $3",
        )
        .bind(after)
        .bind(["payments"].as_slice())
        .bind(BATCH)
        .fetch_all(pool)
        .await
        .expect("read");
        if rows.is_empty() {
            return;
        }
        let mut tx = pool.begin().await.expect("begin");
        for row in &rows {
            after = row.get("seq");
            let event = Event::new(row.get::<String, _>("id"), row.get::<Vec<u8>, _>("payload"));
            totals.apply(&mut tx, version, &event).await.expect("apply");
        }
        tx.commit().await.expect("commit");
    }
}

fn main() {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        eprintln!("projection bench skipped: DATABASE_URL is not set");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let db = format!("projection_bench_{}", std::process::id());
    let (admin, pool, bench_url) = rt.block_on(async {
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .expect("DATABASE_URL");
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&admin)
            .await
            .expect("create the bench database");
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (url.as_str(), String::new()),
        };
        let bench_url = format!(
            "{}/{db}{query}",
            &base[..base.rfind('/').expect("a database")]
        );
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&bench_url)
            .await
            .expect("the bench database");
        projection::migrate(&pool).await.expect("migrate");
        enqueue(&pool, EVENTS).await;
        (admin, pool, bench_url)
    });
    let _ = bench_url;

    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .measurement_time(Duration::from_secs(15))
        .warm_up_time(Duration::from_secs(2));
    let mut group = c.benchmark_group(GROUP);
    group.throughput(Throughput::Elements(EVENTS));
    let mut version = 0;
    group.bench_function("outbox_tail", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let pool = pool.clone();
            version += u32::try_from(iters).unwrap();
            let last = version;
            async move {
                let mut total = Duration::ZERO;
                for v in (last + 1 - u32::try_from(iters).unwrap())..=last {
                    let p = fresh_projector(&pool, "bench_totals", v).await;
                    let start = Instant::now();
                    tail_until(&p, EVENTS).await;
                    total += start.elapsed();
                }
                total
            }
        });
    });
    let mut bare_version = 0;
    group.bench_function("bare", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let pool = pool.clone();
            bare_version += u32::try_from(iters).unwrap();
            let last = bare_version;
            async move {
                let mut total = Duration::ZERO;
                for v in (last + 1 - u32::try_from(iters).unwrap())..=last {
                    let v = fresh_tables(&pool, v).await;
                    let start = Instant::now();
                    bare(&pool, &PaymentTotals::default(), &v).await;
                    total += start.elapsed();
                }
                total
            }
        });
    });
    group.finish();

    rt.block_on(interleaved(&pool, bare_version, version));
    rt.block_on(brokers(&pool, bare_version + PAIRS as u32 + 1));
    rt.block_on(steady_lag(&pool));
    c.final_summary();
    rt.block_on(async {
        pool.close().await;
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&admin)
            .await;
    });
}

/// Interleaved pairs of the outbox tail and the bare loop.
const PAIRS: usize = 12;

/// Events per second of a leg of `EVENTS`.
#[allow(clippy::cast_precision_loss)] // 2 000 events
fn rate(took: Duration) -> f64 {
    EVENTS as f64 / took.as_secs_f64()
}

fn median(rates: &mut [f64]) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// The two paths run alternately (the order flipped every pair), so a
/// machine whose load changes during the run weighs on both alike: the
/// median events per second of each, and their ratio.
async fn interleaved(pool: &PgPool, mut bare_version: u32, mut version: u32) {
    let totals = PaymentTotals::default();
    let mut tail_rates = Vec::new();
    let mut bare_rates = Vec::new();
    for pair in 0..PAIRS {
        for leg in 0..2 {
            if (pair + leg) % 2 == 0 {
                version += 1;
                let p = fresh_projector(pool, "bench_totals", version).await;
                let start = Instant::now();
                tail_until(&p, EVENTS).await;
                tail_rates.push(rate(start.elapsed()));
            } else {
                bare_version += 1;
                let v = fresh_tables(pool, bare_version).await;
                let start = Instant::now();
                bare(pool, &totals, &v).await;
                bare_rates.push(rate(start.elapsed()));
            }
        }
    }
    let (tail, bare) = (median(&mut tail_rates), median(&mut bare_rates));
    println!(
        "{GROUP}/interleaved: {PAIRS} pairs of 2 000 events; median outbox_tail {tail:.0} events/s, \
         bare {bare:.0} events/s: {:.2}x",
        tail / bare
    );
}

/// The lag under a steady load: `PROJECTION_LAG_RATE` payments a second
/// (default 1 000) for 5 s, one per transaction, while the tail runs (its
/// own version, caught up first); beside it, the producers' own latency
/// from `BEGIN` to the end of `COMMIT` (the floor: an event is not even
/// visible before it).
async fn steady_lag(pool: &PgPool) {
    const SECONDS: u64 = 5;
    let rate: u64 = std::env::var("PROJECTION_LAG_RATE")
        .ok()
        .map_or(1_000, |r| {
            r.parse().expect("PROJECTION_LAG_RATE: payments per second")
        });
    let commits = Arc::new(Mutex::new(Vec::new()));
    let delays = Arc::new(Mutex::new(Vec::new()));
    let p = Projector::builder(
        pool.clone(),
        "bench_lag",
        PaymentTotals {
            delays: Some(delays.clone()),
        },
    )
    .destinations(["payments"])
    .build()
    .expect("projector");
    p.register().await.expect("register");
    let already = u64::try_from(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox.events")
            .fetch_one(pool)
            .await
            .expect("count"),
    )
    .unwrap();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let tail = {
        let p = p.clone();
        tokio::spawn(async move {
            p.run(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
        })
    };
    while p.metrics().applied < already {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    delays.lock().unwrap().clear();
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(SECONDS) {
        ticker.tick().await;
        let (pool, commits) = (pool.clone(), commits.clone());
        tokio::spawn(async move {
            let began = Instant::now();
            let payload = serde_json::json!({"account": format!("acct-{}", sent % 20), "amount": 1, "currency": "EUR"});
            let event = outbox::Event::new("payments", payload.to_string().into_bytes())
                .with_ordering_key(format!("acct-{}", sent % 20));
            let mut tx = pool.begin().await.expect("begin");
            outbox::enqueue(&mut *tx, &event).await.expect("enqueue");
            tx.commit().await.expect("commit");
            commits.lock().unwrap().push(began.elapsed());
        });
        sent += 1;
    }
    let want = already + sent;
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.metrics().applied < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.send(true).expect("stop");
    tail.await.expect("tail").expect("run");
    let mut d = delays.lock().unwrap().clone();
    let mut c = commits.lock().unwrap().clone();
    d.sort();
    c.sort();
    let at = |v: &[Duration], q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "{GROUP}/steady_lag: {sent} payments at {rate}/s over {SECONDS} s, {} applied; \
         created_at to applied: p50 {:?}, p99 {:?}, max {:?}; floor, the producers' BEGIN to COMMIT: \
         p50 {:?}, p99 {:?}, max {:?}",
        d.len(),
        at(&d, 0.5),
        at(&d, 0.99),
        d.last().copied().unwrap_or_default(),
        at(&c, 0.5),
        at(&c, 0.99),
        c.last().copied().unwrap_or_default()
    );
}

/// The broker the messages come from.
enum Broker {
    RabbitMq(String),
    Nats(async_nats::jetstream::Context),
}

impl Broker {
    fn name(&self) -> &'static str {
        match self {
            Broker::RabbitMq(_) => "rabbitmq",
            Broker::Nats(_) => "nats",
        }
    }

    /// A fresh queue or stream holding `EVENTS` payments with unique ids
    /// (published outside the timing); its name.
    async fn fill(&self, leg: &str) -> String {
        let name = format!("PROJ_BENCH_{}_{leg}", std::process::id()).to_uppercase();
        let bodies = (0..EVENTS).map(|k| {
            let currency = ["EUR", "USD", "GBP"][usize::try_from(k % 3).unwrap()];
            let body = serde_json::json!({"account": format!("acct-{}", k % 20), "amount": 1 + k % 100, "currency": currency});
            (format!("{name}-{k}"), body.to_string())
        });
        match self {
            Broker::RabbitMq(url) => {
                use lapin::options::{
                    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
                };
                let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
                    .await
                    .expect("RabbitMQ answers");
                let ch = conn.create_channel().await.expect("channel");
                ch.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .expect("confirms");
                ch.queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions::default(),
                    lapin::types::FieldTable::default(),
                )
                .await
                .expect("queue");
                let mut confirms = Vec::with_capacity(EVENTS as usize);
                for (id, body) in bodies {
                    confirms.push(
                        ch.basic_publish(
                            "".into(),
                            name.as_str().into(),
                            BasicPublishOptions::default(),
                            body.as_bytes(),
                            lapin::BasicProperties::default().with_message_id(id.as_str().into()),
                        )
                        .await
                        .expect("publish"),
                    );
                }
                for confirm in confirms {
                    confirm.await.expect("confirmed");
                }
                let _ = conn.close(200, "filled".into()).await;
            }
            Broker::Nats(js) => {
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![format!("{name}.>")],
                    ..Default::default()
                })
                .await
                .expect("stream");
                let mut acks = Vec::with_capacity(256);
                for (id, body) in bodies {
                    if acks.len() == 256 {
                        for ack in acks.drain(..) {
                            let ack: async_nats::jetstream::context::PublishAckFuture = ack;
                            ack.await.expect("stored");
                        }
                    }
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", id.as_str());
                    acks.push(
                        js.publish_with_headers(format!("{name}.payments"), headers, body.into())
                            .await
                            .expect("publish"),
                    );
                }
                for ack in acks {
                    ack.await.expect("stored");
                }
            }
        }
        name
    }

    /// Consumes `name` in batches of `size` with `handle` until it returned
    /// `EVENTS` outcomes; from the first batch in hand to the last return.
    async fn drain<F, Fut>(&self, name: &str, size: usize, mut handle: F) -> Duration
    where
        F: FnMut(Vec<inbox_consumer::InboxMessage>) -> Fut,
        Fut: std::future::Future<Output = Vec<inbox_consumer::Outcome>>,
    {
        let first = Mutex::new(None::<Instant>);
        let done = Mutex::new(0_u64);
        let stop = tokio::sync::Notify::new();
        let (first_ref, done_ref, stop_ref) = (&first, &done, &stop);
        let timed = |messages: Vec<inbox_consumer::InboxMessage>| {
            first_ref.lock().unwrap().get_or_insert_with(Instant::now);
            let n = messages.len() as u64;
            let handled = handle(messages);
            async move {
                let outcomes = handled.await;
                assert!(
                    outcomes.iter().all(|o| o.name() == "processed"),
                    "{outcomes:?}"
                );
                let mut d = done_ref.lock().unwrap();
                *d += n;
                if *d >= EVENTS {
                    stop_ref.notify_one();
                }
                outcomes
            }
        };
        let window = Duration::from_millis(5);
        match self {
            Broker::RabbitMq(url) => {
                inbox_consumer::rabbitmq::Subscription::new(url.as_str(), name)
                    .batch(size, window)
                    .run_batch(timed, stop.notified())
                    .await
                    .expect("consume")
            }
            Broker::Nats(js) => inbox_consumer::nats::Subscription::new(js.clone(), name, "bench")
                .batch(size, window)
                .run_batch(timed, stop.notified())
                .await
                .expect("consume"),
        }
        let started = first.lock().unwrap().expect("a batch");
        started.elapsed()
    }

    async fn remove(&self, name: &str) {
        match self {
            Broker::RabbitMq(url) => {
                if let Ok(conn) =
                    lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await
                {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch
                            .queue_delete(
                                name.into(),
                                lapin::options::QueueDeleteOptions::default(),
                            )
                            .await;
                    }
                    let _ = conn.close(200, "done".into()).await;
                }
            }
            Broker::Nats(js) => {
                let _ = js.delete_stream(name).await;
            }
        }
    }
}

/// The broker sources against the same applies with no inbox, in
/// interleaved pairs per broker and batch size.
async fn brokers(pool: &PgPool, mut bare_version: u32) {
    let mut available = Vec::new();
    match std::env::var("AMQP_URL") {
        Ok(url) if !url.is_empty() => available.push(Broker::RabbitMq(url)),
        _ => eprintln!("{GROUP}/broker/rabbitmq skipped: AMQP_URL is not set"),
    }
    match std::env::var("NATS_URL") {
        Ok(url) if !url.is_empty() => available.push(Broker::Nats(async_nats::jetstream::new(
            async_nats::connect(&url).await.expect("NATS answers"),
        ))),
        _ => eprintln!("{GROUP}/broker/nats skipped: NATS_URL is not set"),
    }
    let totals = PaymentTotals::default();
    let mut version = 0;
    for broker in &available {
        for (size, pairs) in [(100_usize, 6_usize), (1, 2)] {
            let mut with = Vec::new();
            let mut without = Vec::new();
            for pair in 0..pairs {
                for leg in 0..2 {
                    if (pair + leg) % 2 == 0 {
                        version += 1;
                        let p = Projector::builder(
                            pool.clone(),
                            format!("bench_{}_{size}", broker.name()),
                            PaymentTotals::default(),
                        )
                        .version(version)
                        .source(projection::Source::Inbox)
                        .build()
                        .expect("projector");
                        let inbox = p.inbox().await.expect("inbox");
                        let name = broker.fill(&format!("p{version}")).await;
                        let (p, inbox) = (&p, &inbox);
                        let took = broker
                            .drain(&name, size, |messages| async move {
                                p.apply_batch(inbox, &messages).await
                            })
                            .await;
                        with.push(rate(took));
                        broker.remove(&name).await;
                    } else {
                        bare_version += 1;
                        let v = fresh_tables(pool, bare_version).await;
                        let name = broker.fill(&format!("b{bare_version}")).await;
                        let (v, totals) = (&v, &totals);
                        let took = broker
                            .drain(&name, size, |messages| async move {
                                let mut tx = pool.begin().await.expect("begin");
                                for m in &messages {
                                    let event =
                                        Event::new(m.id().unwrap_or_default(), m.payload().clone());
                                    totals.apply(&mut tx, v, &event).await.expect("apply");
                                }
                                tx.commit().await.expect("commit");
                                messages
                                    .iter()
                                    .map(|_| inbox_consumer::Outcome::Processed { attempt: 1 })
                                    .collect()
                            })
                            .await;
                        without.push(rate(took));
                        broker.remove(&name).await;
                    }
                }
            }
            let (with, without) = (median(&mut with), median(&mut without));
            println!(
                "{GROUP}/broker/{}: batches of {size}, {pairs} pairs of 2 000 events; median projector {with:.0} events/s, \
                 bare {without:.0} events/s: {:.2}x",
                broker.name(),
                with / without
            );
        }
    }
}
