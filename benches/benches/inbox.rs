//! Inbox benchmarks (DESIGN section 9), each against a baseline in the same run:
//! - `inbox_pg`: transactional mode on PostgreSQL, in process — the same
//!   handler transaction with and without the inbox (target: ≥ 0.7×).
//! - `inbox_lease_redis`: lease mode on Redis — one raw Redis round trip vs a
//!   message through the inbox (the difference is the added cost).
//! - `inbox_rabbitmq_e2e`: consume through RabbitMQ into PostgreSQL, ack
//!   after the handler, with and without the inbox.
//!
//! Each group is skipped (with a printed reason) when its `DATABASE_URL`,
//! `REDIS_URL` or `AMQP_URL` is unset.

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
    targets = inbox_pg, inbox_lease_redis, inbox_rabbitmq_e2e
}
criterion_main!(benches);
