//! Inbox benchmarks (DESIGN section 9), each against a baseline in the same run:
//! - `inbox_pg`: transactional mode on PostgreSQL, in process — the same
//!   handler transaction with and without the inbox (target: ≥ 0.7×).
//! - `inbox_lease_redis`: lease mode on Redis — one raw Redis round trip vs a
//!   message through the inbox (the difference is the added cost).
//! - `inbox_rabbitmq_e2e`: consume through RabbitMQ into PostgreSQL, ack
//!   after the handler, with and without the inbox.
//!
//! - `inbox_pg_batch`: batch mode on PostgreSQL, in process: a batch
//!   through `process_each` (one insert per message) and `process_batch`
//!   (one insert for the batch), each against its floor, the same rows
//!   written with the same commits and no inbox at all.
//! - `inbox_rabbitmq_e2e_batch`, `inbox_nats_e2e_batch`: the same consumer
//!   (`Subscription::run_batch`, acked after the commit) from RabbitMQ and
//!   from JetStream into PostgreSQL: acking only (the broker's floor: no
//!   database), the batch's rows in one insert with no inbox (the issue's
//!   baseline) and through `process_batch`, one insert per message with no
//!   inbox and through `process_each`; and the floor of any inbox: the
//!   baseline's insert plus a plain insert of the batch's inbox rows into a
//!   copy of the inbox's table (same columns, primary key and index) in the
//!   same transaction, with no dedup, attempt check or outcome. Timed from the first batch in hand
//!   to the last batch committed; publishing is not timed.
//!
//! The batch sizes are `INBOX_BATCH_SIZES` (comma-separated, default
//! `100`), e.g. `INBOX_BATCH_SIZES=10,100,500` for the curve.
//!
//! Each group is skipped (with a printed reason) when its `DATABASE_URL`,
//! `REDIS_URL`, `AMQP_URL` or `NATS_URL` is unset.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::StreamExt;
use idempotency_redis::RedisStore;
use inbox_consumer::{rabbitmq, Inbox, InboxConfig, InboxMessage, PostgresInbox};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use sqlx::PgPool;

fn env(var: &str, group: &str) -> Option<String> {
    let v = std::env::var(var).ok().filter(|v| !v.is_empty());
    if v.is_none() {
        eprintln!("skipping {group}: {var} is not set");
    }
    v
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

const BODY: &[u8] = br#"{"account":"bench","amount":100}"#;

async fn ledger_table(pool: &PgPool) -> String {
    let table = unique("bench_ledger");
    sqlx::query(&format!(
        "CREATE TABLE {table} (account TEXT NOT NULL, amount BIGINT NOT NULL, message_id TEXT NOT NULL)"
    ))
    .execute(pool)
    .await
    .unwrap();
    table
}

/// Leaves nothing behind in the shared database: the ledger table and the
/// inbox rows of the consumer.
async fn clean_up(pool: &PgPool, table: &str, inbox: &PostgresInbox) {
    sqlx::query(&format!("DROP TABLE IF EXISTS {table}, {table}_rows"))
        .execute(pool)
        .await
        .unwrap();
    for sql in [
        "DELETE FROM inbox_consumer.messages WHERE consumer = $1",
        "DELETE FROM inbox_consumer.attempts WHERE consumer = $1",
    ] {
        sqlx::query(sql)
            .bind(inbox.consumer())
            .execute(pool)
            .await
            .unwrap();
    }
}

/// The handler's effect, the same with and without the inbox.
async fn insert(conn: &mut sqlx::PgConnection, table: &str, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO {table} (account, amount, message_id) VALUES ($1, $2, $3)"
    ))
    .bind("bench")
    .bind(100_i64)
    .bind(id)
    .execute(conn)
    .await
    .map(drop)
}

async fn with_inbox(inbox: &PostgresInbox, table: &Arc<str>, message: &InboxMessage) {
    let table = table.clone();
    let outcome = inbox
        .process(message, move |tx, m| {
            Box::pin(async move {
                insert(tx, &table, m.id().unwrap_or_default()).await?;
                Ok(())
            })
        })
        .await;
    assert_eq!(outcome.name(), "processed", "{outcome:?}");
}

fn inbox_pg(c: &mut Criterion) {
    let Some(url) = env("DATABASE_URL", "inbox_pg") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (pool, table, inbox) = rt.block_on(async {
        let pool = PgPool::connect(&url).await.unwrap();
        let table: Arc<str> = ledger_table(&pool).await.into();
        let inbox = Inbox::postgres(
            pool.clone(),
            InboxConfig::builder(unique("bench")).build().unwrap(),
        )
        .await
        .unwrap();
        (pool, table, inbox)
    });
    let n = AtomicU64::new(0);
    let mut g = c.benchmark_group("inbox_pg");
    g.throughput(Throughput::Elements(1));
    g.bench_function("handler_tx_without_inbox", |b| {
        b.to_async(&rt).iter(|| async {
            let id = format!("m{}", n.fetch_add(1, Ordering::Relaxed));
            let mut tx = pool.begin().await.unwrap();
            insert(&mut tx, &table, &id).await.unwrap();
            tx.commit().await.unwrap();
        })
    });
    g.bench_function("handler_tx_with_inbox", |b| {
        b.to_async(&rt).iter(|| async {
            let id = format!("m{}", n.fetch_add(1, Ordering::Relaxed));
            with_inbox(&inbox, &table, &InboxMessage::new(Some(id), BODY)).await;
        })
    });
    g.bench_function("duplicate_with_inbox", |b| {
        let dup = InboxMessage::new(Some(unique("dup")), BODY);
        rt.block_on(with_inbox(&inbox, &table, &dup));
        b.to_async(&rt).iter(|| async {
            let o = inbox
                .process(&dup, |_tx, _m| Box::pin(async { Ok(()) }))
                .await;
            assert_eq!(o.name(), "duplicate");
        })
    });
    g.finish();
    rt.block_on(clean_up(&pool, &table, &inbox));
}

fn inbox_lease_redis(c: &mut Criterion) {
    let Some(url) = env("REDIS_URL", "inbox_lease_redis") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (store, mut conn) = rt.block_on(async {
        let store = RedisStore::connect(&url)
            .await
            .unwrap()
            .with_prefix(format!("{}:", unique("bench")));
        let conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        (store, conn)
    });
    let inbox = Inbox::lease(
        store.clone(),
        InboxConfig::builder(unique("bench")).build().unwrap(),
    );
    let n = AtomicU64::new(0);
    let mut g = c.benchmark_group("inbox_lease_redis");
    g.throughput(Throughput::Elements(1));
    g.bench_function("one_raw_redis_round_trip", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = conn.clone();
            async move {
                let _: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
            }
        })
    });
    g.bench_function("raw_store_claim_then_complete", |b| {
        use idempotency_core::{
            Claim, ClaimOutcome, Fingerprint, LeaseToken, RecordId, Store, StoredOutcome,
        };
        // What the inbox writes: a mark, under the record id as fingerprint.
        let done = StoredOutcome::Mark(1);
        b.to_async(&rt).iter(|| async {
            let id = RecordId::from_parts(
                b"raw",
                format!("r{}", n.fetch_add(1, Ordering::Relaxed)).as_bytes(),
            );
            let fingerprint = Fingerprint::from_bytes(*id.as_bytes());
            let claim = Claim {
                fingerprint: &fingerprint,
                lease: Duration::from_secs(30),
                ttl: Duration::from_secs(60),
            };
            let ClaimOutcome::Acquired(t) =
                store.claim(&id, LeaseToken::random(), claim).await.unwrap()
            else {
                panic!()
            };
            let _ = store
                .complete(&id, t, &done, Duration::from_secs(60))
                .await
                .unwrap();
        })
    });
    g.bench_function("message_through_lease_inbox", |b| {
        b.to_async(&rt).iter(|| async {
            let m = InboxMessage::new(
                Some(format!("m{}", n.fetch_add(1, Ordering::Relaxed))),
                BODY,
            );
            let o = inbox.process(&m, |_m| Box::pin(async { Ok(()) })).await;
            assert_eq!(o.name(), "processed");
        })
    });
    g.finish();
    let _ = &mut conn;
}

fn inbox_rabbitmq_e2e(c: &mut Criterion) {
    let (Some(amqp), Some(db)) = (
        env("AMQP_URL", "inbox_rabbitmq_e2e"),
        env("DATABASE_URL", "inbox_rabbitmq_e2e"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (pool, table, inbox, conn) = rt.block_on(async {
        let pool = PgPool::connect(&db).await.unwrap();
        let table: Arc<str> = ledger_table(&pool).await.into();
        let inbox = Inbox::postgres(
            pool.clone(),
            InboxConfig::builder(unique("bench")).build().unwrap(),
        )
        .await
        .unwrap();
        let conn = lapin::Connection::connect(&amqp, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        (pool, table, inbox, conn)
    });
    let n = Arc::new(AtomicU64::new(0));
    let mut g = c.benchmark_group("inbox_rabbitmq_e2e");
    g.throughput(Throughput::Elements(1));
    for with in [false, true] {
        let name = if with { "with_inbox" } else { "without_inbox" };
        g.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (conn, pool, table, inbox, n) =
                    (&conn, &pool, table.clone(), &inbox, n.clone());
                async move {
                    let ch = conn.create_channel().await.unwrap();
                    ch.basic_qos(64, BasicQosOptions::default()).await.unwrap();
                    let queue = unique("bench_q");
                    ch.queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .unwrap();
                    // Publishing is not timed: only consuming, processing and acking.
                    for _ in 0..iters {
                        let id = format!("e{}", n.fetch_add(1, Ordering::Relaxed));
                        ch.basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions::default(),
                            BODY,
                            BasicProperties::default().with_message_id(id.as_str().into()),
                        )
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                    }
                    let mut consumer = ch
                        .basic_consume(
                            queue.as_str().into(),
                            "bench".into(),
                            BasicConsumeOptions::default(),
                            FieldTable::default(),
                        )
                        .await
                        .unwrap();
                    let start = Instant::now();
                    for _ in 0..iters {
                        let delivery =
                            tokio::time::timeout(Duration::from_secs(30), consumer.next())
                                .await
                                .unwrap()
                                .unwrap()
                                .unwrap();
                        let message = rabbitmq::message(&delivery);
                        if with {
                            with_inbox(inbox, &table, &message).await;
                            rabbitmq::settle(&delivery, &inbox_consumer::Outcome::Duplicate)
                                .await
                                .unwrap();
                        } else {
                            let mut tx = pool.begin().await.unwrap();
                            insert(&mut tx, &table, message.id().unwrap())
                                .await
                                .unwrap();
                            tx.commit().await.unwrap();
                            delivery.ack(BasicAckOptions::default()).await.unwrap();
                        }
                    }
                    let elapsed = start.elapsed();
                    let _ = ch
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                    let _ = ch.close(200, "done".into()).await;
                    elapsed
                }
            })
        });
    }
    g.finish();
    rt.block_on(clean_up(&pool, &table, &inbox));
}

/// The batch sizes of the batch groups: `INBOX_BATCH_SIZES`, default 100.
fn batch_sizes() -> Vec<usize> {
    let sizes = std::env::var("INBOX_BATCH_SIZES").unwrap_or_else(|_| "100".into());
    sizes
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .unwrap_or_else(|| panic!("INBOX_BATCH_SIZES: {s:?} is not a batch size"))
        })
        .collect()
}

/// `size` messages with fresh ids.
fn batch_of(n: &AtomicU64, size: usize) -> Vec<InboxMessage> {
    (0..size)
        .map(|_| {
            let id = format!("b{}", n.fetch_add(1, Ordering::Relaxed));
            InboxMessage::new(Some(id), BODY)
        })
        .collect()
}

/// The batch's rows in one statement, the same with and without the inbox.
async fn insert_all(
    conn: &mut sqlx::PgConnection,
    table: &str,
    ids: Vec<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO {table} (account, amount, message_id) SELECT 'bench', 100, unnest($1::text[])"
    ))
    .bind(ids)
    .execute(conn)
    .await
    .map(drop)
}

fn all_processed(messages: &[InboxMessage]) -> Vec<inbox_consumer::Outcome> {
    messages
        .iter()
        .map(|_| inbox_consumer::Outcome::Processed { attempt: 1 })
        .collect()
}

fn assert_processed(outcomes: &[inbox_consumer::Outcome]) {
    assert!(
        outcomes.iter().all(|o| o.name() == "processed"),
        "{outcomes:?}"
    );
}

/// How a batch is written: not at all (the broker's floor), the batch's
/// rows in one insert or one insert per message, with no inbox (one
/// transaction per batch) or through the inbox.
#[derive(Clone, Copy)]
enum Write {
    AckOnly,
    OneWithoutInbox,
    OnePlusRowsWithoutInbox,
    OneWithInbox,
    EachWithoutInbox,
    EachWithInbox,
}

impl Write {
    const ALL: [Write; 6] = [
        Write::AckOnly,
        Write::OneWithoutInbox,
        Write::OnePlusRowsWithoutInbox,
        Write::OneWithInbox,
        Write::EachWithoutInbox,
        Write::EachWithInbox,
    ];

    fn name(self) -> &'static str {
        match self {
            Write::AckOnly => "ack_only_no_database",
            Write::OneWithoutInbox => "one_insert_without_inbox",
            Write::OnePlusRowsWithoutInbox => "one_insert_plus_inbox_rows_floor",
            Write::OneWithInbox => "one_insert_with_inbox_process_batch",
            Write::EachWithoutInbox => "insert_each_without_inbox",
            Write::EachWithInbox => "insert_each_with_inbox_process_each",
        }
    }

    /// Writes `messages`; their outcomes (all processed, or a panic).
    async fn write(
        self,
        inbox: &PostgresInbox,
        pool: &PgPool,
        table: &Arc<str>,
        messages: &[InboxMessage],
    ) -> Vec<inbox_consumer::Outcome> {
        let outcomes = match self {
            Write::AckOnly => all_processed(messages),
            Write::OneWithoutInbox => {
                let mut tx = pool.begin().await.unwrap();
                let ids = messages.iter().map(|m| m.id().unwrap()).collect();
                insert_all(&mut tx, table, ids).await.unwrap();
                tx.commit().await.unwrap();
                all_processed(messages)
            }
            Write::OnePlusRowsWithoutInbox => {
                let mut tx = pool.begin().await.unwrap();
                let ids: Vec<&str> = messages.iter().map(|m| m.id().unwrap()).collect();
                sqlx::query(&format!(
                    "INSERT INTO {table}_rows (consumer, message_id, attempts) \
                     SELECT $1, unnest($2::text[]), 1"
                ))
                .bind(inbox.consumer())
                .bind(&ids)
                .execute(&mut *tx)
                .await
                .unwrap();
                insert_all(&mut tx, table, ids).await.unwrap();
                tx.commit().await.unwrap();
                all_processed(messages)
            }
            Write::EachWithoutInbox => {
                let mut tx = pool.begin().await.unwrap();
                for m in messages {
                    insert(&mut tx, table, m.id().unwrap()).await.unwrap();
                }
                tx.commit().await.unwrap();
                all_processed(messages)
            }
            Write::OneWithInbox => {
                let table = table.clone();
                inbox
                    .process_batch(messages, move |tx, new| {
                        let table = table.clone();
                        Box::pin(async move {
                            let ids = new.iter().map(|m| m.id().unwrap_or_default()).collect();
                            insert_all(tx, &table, ids).await?;
                            Ok(())
                        })
                    })
                    .await
            }
            Write::EachWithInbox => {
                let table = table.clone();
                inbox
                    .process_each(messages, move |tx, m| {
                        let table = table.clone();
                        Box::pin(async move {
                            insert(tx, &table, m.id().unwrap_or_default()).await?;
                            Ok(())
                        })
                    })
                    .await
            }
        };
        assert_processed(&outcomes);
        outcomes
    }
}

/// The pool, a fresh ledger table, a fresh copy of the inbox's table (the
/// floor's) and an inbox with a fresh consumer name. The inbox's tables are
/// vacuumed first: the rows earlier runs deleted would otherwise weigh on
/// its inserts and not on the floor's where autovacuum is off.
async fn batch_setup(url: &str) -> (PgPool, Arc<str>, PostgresInbox) {
    let pool = PgPool::connect(url).await.unwrap();
    let table: Arc<str> = ledger_table(&pool).await.into();
    let inbox = Inbox::postgres(
        pool.clone(),
        InboxConfig::builder(unique("bench")).build().unwrap(),
    )
    .await
    .unwrap();
    for sql in [
        format!("CREATE TABLE {table}_rows (LIKE inbox_consumer.messages INCLUDING ALL)"),
        "VACUUM inbox_consumer.messages, inbox_consumer.attempts".to_owned(),
    ] {
        sqlx::query(&sql).execute(&pool).await.unwrap();
    }
    (pool, table, inbox)
}

fn inbox_pg_batch(c: &mut Criterion) {
    let Some(url) = env("DATABASE_URL", "inbox_pg_batch") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (pool, table, inbox) = rt.block_on(batch_setup(&url));
    let n = AtomicU64::new(0);
    let mut g = c.benchmark_group("inbox_pg_batch");
    for size in batch_sizes() {
        g.throughput(Throughput::Elements(size as u64));
        for write in &Write::ALL[1..] {
            g.bench_function(format!("batch_{size}_{}", write.name()), |b| {
                b.to_async(&rt).iter(|| async {
                    let batch = batch_of(&n, size);
                    write.write(&inbox, &pool, &table, &batch).await;
                })
            });
        }
    }
    g.finish();
    rt.block_on(clean_up(&pool, &table, &inbox));
}

/// The span of a batch consumer's run: from the first batch in hand to the
/// commit of the batch that completes `iters` messages, when `stop` is
/// notified.
struct Clock {
    done: AtomicU64,
    first: std::sync::Mutex<Option<Instant>>,
    last: std::sync::Mutex<Option<Instant>>,
    stop: tokio::sync::Notify,
    iters: u64,
}

impl Clock {
    fn new(iters: u64) -> Self {
        Self {
            done: AtomicU64::new(0),
            first: std::sync::Mutex::new(None),
            last: std::sync::Mutex::new(None),
            stop: tokio::sync::Notify::new(),
            iters,
        }
    }

    /// A batch of `messages`, written as `write` says.
    async fn batch(
        &self,
        write: Write,
        inbox: &PostgresInbox,
        pool: &PgPool,
        table: &Arc<str>,
        messages: Vec<InboxMessage>,
    ) -> Vec<inbox_consumer::Outcome> {
        self.first.lock().unwrap().get_or_insert_with(Instant::now);
        let outcomes = write.write(inbox, pool, table, &messages).await;
        let n = messages.len() as u64;
        if self.done.fetch_add(n, Ordering::SeqCst) + n >= self.iters {
            self.last.lock().unwrap().get_or_insert_with(Instant::now);
            // A permit: the subscription stops after settling this batch.
            self.stop.notify_one();
        }
        outcomes
    }

    fn elapsed(&self) -> Duration {
        let first = self.first.lock().unwrap().expect("a batch arrived");
        let last = self.last.lock().unwrap().expect("every message processed");
        last - first
    }
}

fn inbox_rabbitmq_e2e_batch(c: &mut Criterion) {
    let (Some(amqp), Some(db)) = (
        env("AMQP_URL", "inbox_rabbitmq_e2e_batch"),
        env("DATABASE_URL", "inbox_rabbitmq_e2e_batch"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ((pool, table, inbox), conn) = rt.block_on(async {
        let conn = lapin::Connection::connect(&amqp, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        (batch_setup(&db).await, conn)
    });
    let n = AtomicU64::new(0);
    let mut g = c.benchmark_group("inbox_rabbitmq_e2e_batch");
    g.throughput(Throughput::Elements(1));
    for size in batch_sizes() {
        for write in Write::ALL {
            g.bench_function(format!("batch_{size}_{}", write.name()), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (amqp, conn, pool, table, inbox, n) =
                        (&amqp, &conn, &pool, &table, &inbox, &n);
                    async move {
                        let ch = conn.create_channel().await.unwrap();
                        let queue = unique("bench_q");
                        ch.queue_declare(
                            queue.as_str().into(),
                            QueueDeclareOptions::default(),
                            FieldTable::default(),
                        )
                        .await
                        .unwrap();
                        // Publishing is not timed.
                        for _ in 0..iters {
                            let id = format!("e{}", n.fetch_add(1, Ordering::Relaxed));
                            ch.basic_publish(
                                "".into(),
                                queue.as_str().into(),
                                BasicPublishOptions::default(),
                                BODY,
                                BasicProperties::default().with_message_id(id.as_str().into()),
                            )
                            .await
                            .unwrap()
                            .await
                            .unwrap();
                        }
                        let clock = Clock::new(iters);
                        let clock = &clock;
                        rabbitmq::Subscription::new(amqp.as_str(), queue.as_str())
                            .batch(size, Duration::from_millis(5))
                            .run_batch(
                                |messages| clock.batch(write, inbox, pool, table, messages),
                                clock.stop.notified(),
                            )
                            .await
                            .unwrap();
                        let _ = ch
                            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                            .await;
                        let _ = ch.close(200, "done".into()).await;
                        clock.elapsed()
                    }
                })
            });
        }
    }
    g.finish();
    rt.block_on(clean_up(&pool, &table, &inbox));
}

fn inbox_nats_e2e_batch(c: &mut Criterion) {
    let (Some(nats), Some(db)) = (
        env("NATS_URL", "inbox_nats_e2e_batch"),
        env("DATABASE_URL", "inbox_nats_e2e_batch"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ((pool, table, inbox), js) = rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(&nats).await.unwrap());
        (batch_setup(&db).await, js)
    });
    let n = AtomicU64::new(0);
    let mut g = c.benchmark_group("inbox_nats_e2e_batch");
    g.throughput(Throughput::Elements(1));
    for size in batch_sizes() {
        for write in Write::ALL {
            g.bench_function(format!("batch_{size}_{}", write.name()), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (js, pool, table, inbox, n) = (&js, &pool, &table, &inbox, &n);
                    async move {
                        let stream = unique("BENCH").to_uppercase();
                        js.create_stream(async_nats::jetstream::stream::Config {
                            name: stream.clone(),
                            subjects: vec![format!("{stream}.>")],
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                        // Publishing is not timed. The acks are awaited 256 at a
                        // time: async-nats holds a publish back while too many
                        // acks are pending, so awaiting them all at the end
                        // would wait for ever.
                        let mut acks: Vec<async_nats::jetstream::context::PublishAckFuture> =
                            Vec::with_capacity(256);
                        for _ in 0..iters {
                            if acks.len() == 256 {
                                for ack in acks.drain(..) {
                                    ack.await.unwrap();
                                }
                            }
                            let mut headers = async_nats::HeaderMap::new();
                            let id = format!("j{}", n.fetch_add(1, Ordering::Relaxed));
                            headers.insert("Nats-Msg-Id", id.as_str());
                            acks.push(
                                js.publish_with_headers(
                                    format!("{stream}.pay"),
                                    headers,
                                    BODY.into(),
                                )
                                .await
                                .unwrap(),
                            );
                        }
                        for ack in acks {
                            ack.await.unwrap();
                        }
                        let clock = Clock::new(iters);
                        let clock = &clock;
                        inbox_consumer::nats::Subscription::new(
                            js.clone(),
                            stream.as_str(),
                            "bench",
                        )
                        .batch(size, Duration::from_millis(5))
                        .run_batch(
                            |messages| clock.batch(write, inbox, pool, table, messages),
                            clock.stop.notified(),
                        )
                        .await
                        .unwrap();
                        let _ = js.delete_stream(&stream).await;
                        clock.elapsed()
                    }
                })
            });
        }
    }
    g.finish();
    rt.block_on(clean_up(&pool, &table, &inbox));
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = inbox_pg, inbox_lease_redis, inbox_rabbitmq_e2e, inbox_pg_batch,
        inbox_rabbitmq_e2e_batch, inbox_nats_e2e_batch
}
criterion_main!(benches);
