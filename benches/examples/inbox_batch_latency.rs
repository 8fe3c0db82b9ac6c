//! The inbox's batch mode at a low, steady load (issue 23): messages
//! published to RabbitMQ or JetStream (`--broker rabbitmq|nats`) at `--rate`
//! per second for `--seconds`, consumed by the broker's
//! `Subscription::run_batch` through `Inbox::process_batch` into
//! PostgreSQL; the latency of each message from its publish to its batch's
//! commit, p50 / p99 / max, for one message per batch (the baseline) and for
//! batches of `--batch` (window `--window-ms`), in the same run.
//!
//! Two floors for batches of `--batch`, in the same run, beside the inbox:
//! the same publisher, subscription, batching and multi-row insert committed
//! in a transaction of its own without the inbox (`insert only`), and the
//! same without any database (`no database`: publish to the handler's
//! return). The inbox's p50 and p99 are printed as ratios to the first.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//! cargo run --release -p benches --example inbox_batch_latency -- --rate 1000 --seconds 5 --batch 100
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test NATS_URL=nats://127.0.0.1:4222 \
//! cargo run --release -p benches --example inbox_batch_latency -- --broker nats --rate 1000 --seconds 5 --batch 100
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use inbox_consumer::{nats, rabbitmq, Inbox, InboxConfig, InboxMessage, Outcome, PostgresInbox};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use sqlx::{PgPool, Postgres, Transaction};

/// What a batch does between its delivery and its return (the ack).
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// `Inbox::process_batch` with the multi-row insert as its handler.
    Inbox,
    /// The same insert in a transaction of its own, no inbox: the floor.
    InsertOnly,
    /// No database at all: the broker and the batching window.
    NoDatabase,
}

/// Where the messages go through, and its URL.
enum Broker {
    RabbitMq(String),
    Nats(String),
}

impl Broker {
    fn from_args() -> Self {
        let args: Vec<String> = std::env::args().collect();
        let name = args
            .iter()
            .position(|a| a == "--broker")
            .and_then(|i| args.get(i + 1))
            .map_or("rabbitmq", String::as_str);
        let url = |var: &str| std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set"));
        match name {
            "rabbitmq" => Broker::RabbitMq(url("AMQP_URL")),
            "nats" => Broker::Nats(url("NATS_URL")),
            other => panic!("--broker takes rabbitmq or nats, not {other:?}"),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Broker::RabbitMq(_) => "RabbitMQ",
            Broker::Nats(_) => "JetStream",
        }
    }
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number, not {v:?}"))
        })
}

fn now_nanos() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{}", std::process::id(), now_nanos())
}

#[tokio::main]
async fn main() {
    let db = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let broker = Broker::from_args();
    let (rate, seconds) = (arg("--rate", 1000), arg("--seconds", 5));
    let (batch, window) = (arg("--batch", 100), arg("--window-ms", 5));
    let pool = PgPool::connect(&db).await.expect("PostgreSQL answers");
    let table = unique("latency_ledger");
    sqlx::query(&format!(
        "CREATE TABLE {table} (message_id TEXT NOT NULL, published BIGINT NOT NULL)"
    ))
    .execute(&pool)
    .await
    .unwrap();
    println!(
        "{rate} msgs/s for {seconds} s, {} -> PostgreSQL, publish to commit:",
        broker.name()
    );
    let mut figures = Vec::new();
    for (size, mode, what) in [
        (1, Mode::Inbox, "inbox"),
        (batch, Mode::Inbox, "inbox"),
        (batch, Mode::InsertOnly, "insert only (floor)"),
        (batch, Mode::NoDatabase, "no database"),
    ] {
        let inbox = Inbox::postgres(
            pool.clone(),
            InboxConfig::builder(unique("latency")).build().unwrap(),
        )
        .await
        .unwrap();
        let mut latencies = run(&broker, &inbox, &table, rate, seconds, size, window, mode).await;
        latencies.sort_unstable();
        let at = |q: f64| {
            let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len());
            latencies[i - 1] as f64 / 1e6
        };
        println!(
            "  batch {size:>4} (window {window} ms), {what:<19}: {} messages, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            latencies.len(),
            at(0.50),
            at(0.99),
            at(1.0),
        );
        figures.push((at(0.50), at(0.99)));
        for sql in [
            "DELETE FROM inbox_consumer.messages WHERE consumer = $1",
            "DELETE FROM inbox_consumer.attempts WHERE consumer = $1",
        ] {
            sqlx::query(sql)
                .bind(inbox.consumer())
                .execute(&pool)
                .await
                .unwrap();
        }
    }
    let (inbox_p50, inbox_p99) = figures[1];
    for ((p50, p99), what) in [(figures[2], "insert only"), (figures[3], "no database")] {
        println!(
            "  batch {batch}: inbox / {what}: p50 {:.2}x, p99 {:.2}x",
            inbox_p50 / p50,
            inbox_p99 / p99,
        );
    }
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .unwrap();
}

/// Publishes `rate * seconds` messages at a steady rate while one
/// subscription consumes them in batches of `size`; each message's
/// nanoseconds from its publish to its batch's commit (to the handler's
/// return with [`Mode::NoDatabase`]).
#[allow(clippy::too_many_arguments)]
async fn run(
    broker: &Broker,
    inbox: &PostgresInbox,
    table: &str,
    rate: u64,
    seconds: u64,
    size: u64,
    window_ms: u64,
    mode: Mode,
) -> Vec<u64> {
    let total = rate * seconds;
    let name = unique("latency_q").to_uppercase();
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let stop = Arc::new(tokio::sync::Notify::new());
    let (size, window) = (size as usize, Duration::from_millis(window_ms));
    let publisher = match broker {
        Broker::RabbitMq(url) => {
            let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
                .await
                .expect("RabbitMQ answers");
            let ch = conn.create_channel().await.unwrap();
            ch.queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
            Publisher::RabbitMq(conn, ch)
        }
        Broker::Nats(url) => {
            let js =
                async_nats::jetstream::new(async_nats::connect(url).await.expect("NATS answers"));
            js.create_stream(async_nats::jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![format!("{name}.>")],
                ..Default::default()
            })
            .await
            .unwrap();
            Publisher::Nats(js)
        }
    };
    let consumer = {
        let (inbox, table) = (inbox.clone(), Arc::<str>::from(table));
        let (latencies, stop, name) = (latencies.clone(), stop.clone(), name.clone());
        let subscription = match (broker, &publisher) {
            (Broker::RabbitMq(url), _) => {
                Subscription::RabbitMq(rabbitmq::Subscription::new(url.as_str(), name.as_str()))
            }
            (_, Publisher::Nats(js)) => Subscription::Nats(Box::new(nats::Subscription::new(
                js.clone(),
                name.as_str(),
                "latency",
            ))),
            (Broker::Nats(_), Publisher::RabbitMq(..)) => unreachable!("one broker per run"),
        };
        tokio::spawn(async move {
            let (inbox, latencies) = (&inbox, &latencies);
            let pool = inbox.pool().clone();
            let pool = &pool;
            let table = &table;
            let handle = |messages: Vec<InboxMessage>| async move {
                let table = table.clone();
                let processed = || {
                    messages
                        .iter()
                        .map(|_| Outcome::Processed { attempt: 1 })
                        .collect()
                };
                let outcomes = match mode {
                    Mode::Inbox => {
                        inbox
                            .process_batch(&messages, move |tx, new| {
                                let table = table.clone();
                                Box::pin(async move {
                                    insert(tx, &table, new).await?;
                                    Ok(())
                                })
                            })
                            .await
                    }
                    Mode::InsertOnly => {
                        let mut tx = pool.begin().await.expect("a transaction");
                        let all: Vec<&InboxMessage> = messages.iter().collect();
                        insert(&mut tx, &table, &all).await.expect("the insert");
                        tx.commit().await.expect("the commit");
                        processed()
                    }
                    Mode::NoDatabase => processed(),
                };
                let committed = now_nanos();
                let mut seen = latencies.lock().unwrap();
                for m in &messages {
                    let published: u64 = std::str::from_utf8(m.payload())
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(committed);
                    seen.push(committed.saturating_sub(published));
                }
                outcomes
            };
            match subscription {
                Subscription::RabbitMq(s) => s
                    .batch(size, window)
                    .run_batch(handle, stop.notified())
                    .await
                    .expect("the subscription starts"),
                Subscription::Nats(s) => s
                    .batch(size, window)
                    .run_batch(handle, stop.notified())
                    .await
                    .expect("the subscription starts"),
            }
        })
    };
    // Let the subscription start before the clock does.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = tokio::time::Instant::now();
    let mut acks = tokio::task::JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_nanos(i * 1_000_000_000 / rate)).await;
        let (stamp, id) = (now_nanos().to_string(), format!("m{i}"));
        match &publisher {
            Publisher::RabbitMq(_, ch) => {
                ch.basic_publish(
                    "".into(),
                    name.as_str().into(),
                    BasicPublishOptions::default(),
                    stamp.as_bytes(),
                    BasicProperties::default().with_message_id(id.as_str().into()),
                )
                .await
                .unwrap();
            }
            Publisher::Nats(js) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", id.as_str());
                let ack = js
                    .publish_with_headers(format!("{name}.m"), headers, stamp.into())
                    .await
                    .unwrap();
                // The stream's ack is awaited beside the clock, not in it.
                acks.spawn(async move { ack.await.expect("the stream stores it") });
            }
        }
    }
    while let Some(ack) = acks.join_next().await {
        ack.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while latencies.lock().unwrap().len() < total as usize {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every message was committed within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.notify_one();
    consumer.await.unwrap();
    match publisher {
        Publisher::RabbitMq(conn, ch) => {
            let _ = ch
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = conn.close(200, "done".into()).await;
        }
        Publisher::Nats(js) => {
            let _ = js.delete_stream(&name).await;
        }
    }
    Arc::try_unwrap(latencies).unwrap().into_inner().unwrap()
}

/// The publishing side of a run.
enum Publisher {
    RabbitMq(lapin::Connection, lapin::Channel),
    Nats(async_nats::jetstream::Context),
}

/// The consuming side of a run.
enum Subscription {
    RabbitMq(rabbitmq::Subscription),
    Nats(Box<nats::Subscription>),
}

/// The batch's effect: one multi-row insert of the messages' ids and
/// publish times.
async fn insert(
    tx: &mut Transaction<'static, Postgres>,
    table: &str,
    messages: &[&InboxMessage],
) -> Result<(), sqlx::Error> {
    let ids: Vec<&str> = messages
        .iter()
        .map(|m| m.id().unwrap_or_default())
        .collect();
    let published: Vec<i64> = messages
        .iter()
        .map(|m| {
            std::str::from_utf8(m.payload())
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        })
        .collect();
    sqlx::query(&format!(
        "INSERT INTO {table} (message_id, published) \
         SELECT * FROM unnest($1::text[], $2::bigint[])"
    ))
    .bind(ids)
    .bind(published)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
