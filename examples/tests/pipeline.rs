//! The transactional outbox end to end, on the real binaries: payments-axum
//! or payments-actix (`--transactional --outbox`) → outbox-relay → RabbitMQ
//! or NATS JetStream → inbox-rabbitmq or inbox-nats → `ledger_entries`.
//!
//! Tests read `DATABASE_URL`, `AMQP_URL` and `NATS_URL` at run time and skip,
//! saying why, when one they need is unset. Each test has a PostgreSQL
//! database of its own (payments, outbox, inbox and ledger), and its own
//! queue, stream and consumer names, so tests run in parallel with anything.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const AXUM: &str = env!("CARGO_BIN_EXE_payments-axum");
const ACTIX: &str = env!("CARGO_BIN_EXE_payments-actix");
const RELAY: &str = env!("CARGO_BIN_EXE_outbox-relay");
const INBOX_RABBITMQ: &str = env!("CARGO_BIN_EXE_inbox-rabbitmq");
const INBOX_NATS: &str = env!("CARGO_BIN_EXE_inbox-nats");

/// How long a binary may take to be ready, or to fail at startup.
const STARTUP: Duration = Duration::from_secs(30);

/// The longest any one HTTP exchange may take.
const EXCHANGE: Duration = Duration::from_secs(10);

// ------------------------------------------------- the event per payment

#[tokio::test(flavor = "multi_thread")]
async fn outbox_one_event_per_payment_and_none_on_replay_axum() {
    one_event_per_payment(AXUM).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_one_event_per_payment_and_none_on_replay_actix() {
    one_event_per_payment(ACTIX).await;
}

async fn one_event_per_payment(binary: &'static str) {
    let Some(db) = Db::new(&format!("outbox_one_event_{}", name(binary))).await else {
        return;
    };
    let server = Proc::server(binary, &db.url, &[]).await;
    let request = PaymentRequest::new(1);
    let first = request.send(server.addr()).await.expect("the first");
    assert_eq!(first.status, 201, "{}: {}", name(binary), first.text());
    let id = first.json()["id"].as_str().expect("an id").to_owned();
    assert_eq!(db.count("SELECT count(*) FROM payments").await, 1);
    let events: Vec<(String, String, Vec<u8>)> =
        sqlx::query_as("SELECT id::text, destination, payload FROM outbox.events ORDER BY seq")
            .fetch_all(&db.pool)
            .await
            .expect("the outbox");
    assert_eq!(events.len(), 1, "{}: one event", name(binary));
    let (event_id, destination, payload) = &events[0];
    assert_eq!(destination, "payments");
    let event_id = outbox::Uuid::parse_str(event_id).expect("a UUID");
    assert_eq!(event_id.get_version_num(), 7, "a UUID v7: {event_id}");
    let payload: serde_json::Value = serde_json::from_slice(payload).expect("JSON");
    assert_eq!(
        payload,
        serde_json::json!({"account": id, "amount": request.amount, "currency": "PIPE", "reference": null}),
        "the inbox examples' message, with the currency and the reference"
    );

    let replay = request.send(server.addr()).await.expect("the replay");
    assert_eq!(replay.status, 201, "{}", replay.text());
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(db.count("SELECT count(*) FROM outbox.events").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM payments").await, 1);
    drop(server);
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_needs_transactional() {
    for binary in [AXUM, ACTIX] {
        for extra in [&[][..], &["--store", "sqlite:///tmp/unused.sqlite"][..]] {
            let (code, stderr) = run_to_exit(
                binary,
                &[&["--listen", "127.0.0.1:0", "--outbox"][..], extra].concat(),
            )
            .await;
            let name = name(binary);
            assert_eq!(code, Some(2), "{name}: exit code; {stderr}");
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
            assert!(stderr.starts_with(&format!("{name}: ")), "{stderr}");
            assert!(
                stderr.contains("--outbox needs --transactional"),
                "{stderr}"
            );
        }
        let help = command(binary)
            .arg("--help")
            .stderr(Stdio::null())
            .stdout(Stdio::piped())
            .output()
            .await
            .expect("--help");
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(help.contains("--outbox"), "{help}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_on_sqlite_migrates_and_enqueues_in_the_transaction() {
    for binary in [AXUM, ACTIX] {
        let dir = std::env::temp_dir().join(format!("examples-pipeline-{}", unique()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("payments.sqlite");
        let store = format!("sqlite://{}", file.display());
        let server = Proc::start(
            binary,
            &[
                "--listen",
                "127.0.0.1:0",
                "--transactional",
                "--outbox",
                "--store",
                &store,
            ],
            "serving",
        )
        .await;
        let request = PaymentRequest::new(1);
        let first = request.send(server.addr()).await.expect("the first");
        assert_eq!(first.status, 201, "{}", first.text());
        let replay = request.send(server.addr()).await.expect("the replay");
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
        let id = first.json()["id"].as_str().expect("an id").to_owned();
        let pool = sqlx::SqlitePool::connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&file)
                .busy_timeout(Duration::from_secs(5)),
        )
        .await
        .expect("open the file");
        let payloads: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT payload FROM outbox_events WHERE destination = 'payments'")
                .fetch_all(&pool)
                .await
                .expect("the outbox table");
        assert_eq!(payloads.len(), 1, "{}", name(binary));
        let payload: serde_json::Value = serde_json::from_slice(&payloads[0]).expect("JSON");
        assert_eq!(payload["account"], id.as_str());
        pool.close().await;
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

// ------------------------------------------------------- the pipeline

#[tokio::test(flavor = "multi_thread")]
async fn pipeline_rabbitmq_20_payments_one_ledger_row_each() {
    let test = "pipeline_rabbitmq_20";
    let Some(amqp) = service_url("AMQP_URL", test) else {
        return;
    };
    let Some(db) = Db::new(test).await else {
        return;
    };
    let started = Instant::now();
    let queue = format!("pipeline_q_{}", unique_name());
    let consumer = format!("ledger_{}", unique_name());
    let relay_args = relay_rabbitmq(&db.url, &amqp, &queue);
    let inbox_args = inbox_rabbitmq(&db.url, &amqp, &queue, &consumer);
    let server = Proc::server(AXUM, &db.url, &[]).await;
    let _relay = Proc::start(RELAY, &strs(&relay_args), "relaying to").await;
    let _inbox = Proc::start(INBOX_RABBITMQ, &strs(&inbox_args), "consuming").await;

    let mut ids = HashSet::new();
    for i in 0..20 {
        let answer = PaymentRequest::new(i)
            .send(server.addr())
            .await
            .expect("a payment");
        assert_eq!(answer.status, 201, "{}", answer.text());
        ids.insert(answer.json()["id"].as_str().expect("an id").to_owned());
    }
    assert_eq!(ids.len(), 20);
    db.drained(20, Duration::from_secs(30)).await;
    let accounts: HashSet<String> = sqlx::query_scalar("SELECT account FROM ledger_entries")
        .fetch_all(&db.pool)
        .await
        .expect("the ledger")
        .into_iter()
        .collect();
    assert_eq!(accounts, ids, "the ledger's accounts are the payment ids");
    delete_queue(&amqp, &queue).await;
    db.finish().await;
    println!("{test}: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn pipeline_nats_20_payments_one_ledger_row_each_actix() {
    let test = "pipeline_nats_20";
    let Some(nats) = service_url("NATS_URL", test) else {
        return;
    };
    let Some(db) = Db::new(test).await else {
        return;
    };
    let started = Instant::now();
    let stream = format!("PIPELINE_{}", unique_name()).to_uppercase();
    let subject = format!("pipeline.{}.created", unique_name());
    let consumer = format!("ledger_{}", unique_name());
    let relay_args = [
        "--database",
        &db.url,
        "--broker",
        "nats",
        "--nats",
        &nats,
        "--stream",
        &stream,
        "--subject",
        &subject,
        "--poll-interval",
        "100ms",
    ];
    let inbox_args = [
        "--database",
        &db.url,
        "--nats",
        &nats,
        "--stream",
        &stream,
        "--subject",
        &subject,
        "--consumer",
        &consumer,
    ];
    let server = Proc::server(ACTIX, &db.url, &[]).await;
    let _relay = Proc::start(RELAY, &relay_args, "relaying to").await;
    let _inbox = Proc::start(INBOX_NATS, &inbox_args, "consuming").await;
    let mut ids = HashSet::new();
    for i in 0..20 {
        let request = PaymentRequest::new(i);
        let answer = request.send(server.addr()).await.expect("a payment");
        assert_eq!(answer.status, 201, "{}", answer.text());
        // A replay enqueues nothing.
        let replay = request.send(server.addr()).await.expect("a replay");
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
        ids.insert(answer.json()["id"].as_str().expect("an id").to_owned());
    }
    db.drained(20, Duration::from_secs(30)).await;
    assert_eq!(db.count("SELECT count(*) FROM outbox.events").await, 20);
    delete_stream(&nats, &stream).await;
    db.finish().await;
    println!("{test}: {:?}", started.elapsed());
}

// ------------------------------------------------------------ the chaos

/// 300 payments, each sent 1 to 3 times (same key, concurrently), through
/// payments-axum, two relays and two competing consumers, while the server,
/// one relay and one consumer are SIGKILLed and restarted 3 times each.
/// After the drain: every payment has exactly one ledger row, and every
/// ledger row its payment.
#[tokio::test(flavor = "multi_thread")]
async fn pipeline_chaos_300_payments_kills_and_restarts_exactly_one_ledger_row_each() {
    pipeline_chaos("pipeline_chaos", Broker::RabbitMq, &[]).await;
}

/// The same chaos with consumers that commit batches of up to 100
/// messages (`--batch 100`): a consumer killed between a batch's commit and
/// its ack leaves duplicates only, one killed before the commit none of it.
#[tokio::test(flavor = "multi_thread")]
async fn pipeline_chaos_with_batch_100_consumers_exactly_one_ledger_row_each() {
    pipeline_chaos(
        "pipeline_chaos_batch",
        Broker::RabbitMq,
        &["--batch", "100"],
    )
    .await;
}

/// The same chaos through NATS JetStream (outbox-relay `--broker nats`,
/// inbox-nats), with consumers that commit batches of up to 100 messages.
#[tokio::test(flavor = "multi_thread")]
async fn pipeline_chaos_nats_with_batch_100_consumers_exactly_one_ledger_row_each() {
    pipeline_chaos(
        "pipeline_chaos_nats_batch",
        Broker::Nats,
        &["--batch", "100"],
    )
    .await;
}

/// The broker of a chaos run: its relays and consumers.
#[derive(Clone, Copy)]
enum Broker {
    RabbitMq,
    Nats,
}

async fn pipeline_chaos(test: &str, broker: Broker, inbox_extra: &[&str]) {
    const PAYMENTS: u32 = 300;
    const WORKERS: u32 = 12;
    const KILLS: u32 = 3;
    let var = match broker {
        Broker::RabbitMq => "AMQP_URL",
        Broker::Nats => "NATS_URL",
    };
    let Some(broker_url) = service_url(var, test) else {
        return;
    };
    let Some(db) = Db::new(test).await else {
        return;
    };
    let started = Instant::now();
    // The queue, or the stream (upper case) with its subject.
    let queue = format!("chaos_q_{}", unique_name());
    let stream = queue.to_uppercase();
    let subject = format!("chaos.{}.created", unique_name());
    let consumer = format!("ledger_{}", unique_name());
    let (relay_args, mut inbox_args, inbox_binary) = match broker {
        Broker::RabbitMq => (
            relay_rabbitmq(&db.url, &broker_url, &queue),
            inbox_rabbitmq(&db.url, &broker_url, &queue, &consumer),
            INBOX_RABBITMQ,
        ),
        Broker::Nats => (
            relay_nats(&db.url, &broker_url, &stream, &subject),
            inbox_nats(&db.url, &broker_url, &stream, &subject, &consumer),
            INBOX_NATS,
        ),
    };
    inbox_args.extend(inbox_extra.iter().map(|s| (*s).to_owned()));
    let server_args = server_args(&db.url, &["--handler-delay", "5ms"]);

    let server = Proc::start(AXUM, &strs(&server_args), "serving").await;
    let addr = Arc::new(Mutex::new(server.addr()));
    let relay_a = Proc::start(RELAY, &strs(&relay_args), "relaying to").await;
    let relay_b = Proc::start(RELAY, &strs(&relay_args), "relaying to").await;
    let inbox_a = Proc::start(inbox_binary, &strs(&inbox_args), "consuming").await;
    let inbox_b = Proc::start(inbox_binary, &strs(&inbox_args), "consuming").await;

    // The traffic: WORKERS tasks share the payments; each payment is sent
    // 1-3 times at once, every copy retried until it gets its 201.
    let next = Arc::new(AtomicU32::new(0));
    let retries = Arc::new(AtomicU32::new(0));
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (next, retries, addr) = (next.clone(), retries.clone(), addr.clone());
        workers.push(tokio::spawn(async move {
            let mut created = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= PAYMENTS {
                    return created;
                }
                let request = PaymentRequest::new(i);
                let copies = 1 + rand::random::<u32>() % 3;
                let sends: Vec<_> = (0..copies)
                    .map(|_| {
                        let (request, addr, retries) =
                            (request.clone(), addr.clone(), retries.clone());
                        tokio::spawn(async move {
                            request.send_until_created(&addr, &retries, deadline).await
                        })
                    })
                    .collect();
                let mut ids = HashSet::new();
                for send in sends {
                    ids.insert(send.await.expect("a send task"));
                }
                assert_eq!(
                    ids.len(),
                    1,
                    "payment {i}: copies got different ids: {ids:?}"
                );
                created.push(ids.into_iter().next().expect("an id"));
                tokio::time::sleep(Duration::from_millis(
                    80 + u64::from(rand::random::<u32>() % 60),
                ))
                .await;
            }
        }));
    }

    // The chaos: each of the three is killed and restarted KILLS times,
    // staggered, while the traffic runs.
    let chaos_server = {
        let addr = addr.clone();
        let args = server_args.clone();
        tokio::spawn(async move {
            let mut server = server;
            let mut kills = Vec::new();
            for _ in 0..KILLS {
                tokio::time::sleep(jitter(300, 300)).await;
                server.kill().await;
                kills.push(started.elapsed());
                tokio::time::sleep(Duration::from_millis(100)).await;
                server = Proc::start(AXUM, &strs(&args), "serving").await;
                *addr.lock().unwrap() = server.addr();
            }
            (server, kills)
        })
    };
    let chaos_relay = {
        let args = relay_args.clone();
        tokio::spawn(async move {
            let mut relay = relay_a;
            let mut kills = Vec::new();
            tokio::time::sleep(Duration::from_millis(200)).await;
            for _ in 0..KILLS {
                tokio::time::sleep(jitter(300, 300)).await;
                relay.kill().await;
                kills.push(started.elapsed());
                tokio::time::sleep(Duration::from_millis(100)).await;
                relay = Proc::start(RELAY, &strs(&args), "relaying to").await;
            }
            (relay, kills)
        })
    };
    let chaos_inbox = {
        let args = inbox_args.clone();
        tokio::spawn(async move {
            let mut inbox = inbox_a;
            let mut kills = Vec::new();
            tokio::time::sleep(Duration::from_millis(400)).await;
            for _ in 0..KILLS {
                tokio::time::sleep(jitter(300, 300)).await;
                inbox.kill().await;
                kills.push(started.elapsed());
                tokio::time::sleep(Duration::from_millis(100)).await;
                inbox = Proc::start(inbox_binary, &strs(&args), "consuming").await;
            }
            (inbox, kills)
        })
    };

    let mut ids = HashSet::new();
    for worker in workers {
        ids.extend(worker.await.expect("a worker"));
    }
    let traffic = started.elapsed();
    let (_server, server_kills) = chaos_server.await.expect("the server's chaos");
    let (_relay_a, relay_kills) = chaos_relay.await.expect("the relay's chaos");
    let (_inbox_a, inbox_kills) = chaos_inbox.await.expect("the consumer's chaos");
    for (what, kills) in [
        ("server", &server_kills),
        ("relay", &relay_kills),
        ("consumer", &inbox_kills),
    ] {
        assert_eq!(kills.len(), KILLS as usize);
        assert!(
            kills[0] < traffic,
            "the {what} was first killed after the traffic: {kills:?}, traffic {traffic:?}"
        );
    }
    let chaos = started.elapsed();
    assert_eq!(ids.len(), PAYMENTS as usize, "one id per payment");

    // Messages pulled by a killed inbox-nats come back after the JetStream
    // consumer's ack_wait (30 s, the default), RabbitMQ's at once.
    let drain = match broker {
        Broker::RabbitMq => Duration::from_secs(30),
        Broker::Nats => Duration::from_secs(30 + 30),
    };
    db.drained(i64::from(PAYMENTS), drain).await;
    let payments: HashSet<String> = sqlx::query_scalar("SELECT id FROM payments")
        .fetch_all(&db.pool)
        .await
        .expect("the payments")
        .into_iter()
        .collect();
    assert_eq!(
        payments, ids,
        "the table holds exactly the payments answered"
    );
    let republished = db
        .count("SELECT count(*) FROM outbox.events WHERE attempts > 0")
        .await;
    drop((relay_b, inbox_b));
    match broker {
        Broker::RabbitMq => delete_queue(&broker_url, &queue).await,
        Broker::Nats => delete_stream(&broker_url, &stream).await,
    }
    db.finish().await;
    println!(
        "{test}: traffic {traffic:?} ({} client retries), chaos done {chaos:?}, \
         drained and checked {:?}; events with failed attempts {republished}; \
         kills: server {server_kills:?}, relay {relay_kills:?}, consumer {inbox_kills:?}",
        retries.load(Ordering::SeqCst),
        started.elapsed(),
    );
}

fn jitter(base_ms: u64, spread_ms: u64) -> Duration {
    Duration::from_millis(base_ms + rand::random::<u64>() % spread_ms)
}

fn server_args(url: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--transactional",
        "--outbox",
        "--store",
        url,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

fn relay_rabbitmq(url: &str, amqp: &str, queue: &str) -> Vec<String> {
    [
        "--database",
        url,
        "--broker",
        "rabbitmq",
        "--amqp",
        amqp,
        "--queue",
        queue,
        "--poll-interval",
        "100ms",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn inbox_rabbitmq(url: &str, amqp: &str, queue: &str, consumer: &str) -> Vec<String> {
    [
        "--database",
        url,
        "--amqp",
        amqp,
        "--queue",
        queue,
        "--consumer",
        consumer,
        "--handler-delay",
        "2ms",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn relay_nats(url: &str, nats: &str, stream: &str, subject: &str) -> Vec<String> {
    [
        "--database",
        url,
        "--broker",
        "nats",
        "--nats",
        nats,
        "--stream",
        stream,
        "--subject",
        subject,
        "--poll-interval",
        "100ms",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn inbox_nats(url: &str, nats: &str, stream: &str, subject: &str, consumer: &str) -> Vec<String> {
    [
        "--database",
        url,
        "--nats",
        nats,
        "--stream",
        stream,
        "--subject",
        subject,
        "--consumer",
        consumer,
        "--handler-delay",
        "2ms",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

async fn delete_queue(amqp: &str, queue: &str) {
    use lapin::options::QueueDeleteOptions;
    let Ok(conn) = lapin::Connection::connect(amqp, lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "bye".into()).await;
}

async fn delete_stream(nats: &str, stream: &str) {
    if let Ok(client) = async_nats::connect(nats).await {
        let _ = async_nats::jetstream::new(client)
            .delete_stream(stream)
            .await;
    }
}

// --------------------------------------------------------- the database

/// A PostgreSQL database of the test's own, created from `DATABASE_URL`.
struct Db {
    url: String,
    pool: PgPool,
    admin: PgPool,
    name: String,
}

impl Db {
    /// `None` (saying why) when `DATABASE_URL` is unset.
    async fn new(test: &str) -> Option<Self> {
        let base = service_url("DATABASE_URL", test)?;
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&base)
            .await
            .expect("DATABASE_URL is set but PostgreSQL does not answer");
        let name = format!("pipeline_{}", unique_name());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("CREATE DATABASE");
        let (root, query) = match base.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (base.as_str(), String::new()),
        };
        let root = &root[..root.rfind('/').expect("DATABASE_URL names no database")];
        let url = format!("{root}/{name}{query}");
        let pool = PgPool::connect(&url).await.expect("the test's database");
        Some(Self {
            url,
            pool,
            admin,
            name,
        })
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Waits (up to `limit`) until the outbox is published and the ledger has
    /// a row for each of the `payments` payments, then a little longer for
    /// stray copies; then checks: each payment exactly one ledger row, each
    /// ledger row its payment, no dead event.
    async fn drained(&self, payments: i64, limit: Duration) {
        let deadline = Instant::now() + limit;
        let covered = "SELECT count(*) FROM payments p \
                       WHERE EXISTS (SELECT 1 FROM ledger_entries l WHERE l.account = p.id)";
        loop {
            let ledger_exists = self
                .count("SELECT count(*) FROM pg_tables WHERE tablename = 'ledger_entries'")
                .await
                == 1;
            if ledger_exists {
                let waiting = self
                    .count("SELECT count(*) FROM outbox.events WHERE published_at IS NULL")
                    .await;
                if waiting == 0 && self.count(covered).await == payments {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "not drained after {limit:?}: {} of {payments} payments in the ledger, \
                 {} events unpublished",
                if ledger_exists {
                    self.count(covered).await
                } else {
                    0
                },
                self.count("SELECT count(*) FROM outbox.events WHERE published_at IS NULL")
                    .await,
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Copies still on their way would land now.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(self.count("SELECT count(*) FROM payments").await, payments);
        let per_payment: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
            "SELECT p.id, (SELECT count(*) FROM ledger_entries l WHERE l.account = p.id) \
             FROM payments p",
        )
        .fetch_all(&self.pool)
        .await
        .expect("ledger rows per payment")
        .into_iter()
        .collect();
        let wrong: Vec<_> = per_payment.iter().filter(|(_, n)| **n != 1).collect();
        assert!(
            wrong.is_empty(),
            "payments without exactly one ledger row: {wrong:?}"
        );
        assert_eq!(
            self.count(
                "SELECT count(*) FROM ledger_entries l \
                 WHERE NOT EXISTS (SELECT 1 FROM payments p WHERE p.id = l.account)"
            )
            .await,
            0,
            "ledger rows without their payment"
        );
        assert_eq!(
            self.count("SELECT count(*) FROM ledger_entries").await,
            payments
        );
        assert_eq!(
            self.count("SELECT count(*) FROM outbox.events WHERE dead_at IS NOT NULL")
                .await,
            0,
            "dead events"
        );
    }

    /// Drops the database (a failed test leaves it behind, for a look).
    async fn finish(self) {
        self.pool.close().await;
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&self.admin)
        .await;
    }
}

/// The URL in `var`, or `None` after printing why the test is skipped.
fn service_url(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            println!("skipping {test}: {var} is not set");
            None
        }
    }
}

// -------------------------------------------------------------- requests

/// One payment request, sent as often as needed: the same key, scope and
/// body each time.
#[derive(Clone)]
struct PaymentRequest {
    key: String,
    scope: String,
    amount: i64,
}

impl PaymentRequest {
    fn new(i: u32) -> Self {
        let n = unique();
        Self {
            key: format!("key-{n}"),
            scope: format!("Bearer pipeline-{n}"),
            amount: 1000 + i64::from(i),
        }
    }

    fn send(&self, addr: SocketAddr) -> impl std::future::Future<Output = std::io::Result<Answer>> {
        let body = serde_json::json!({"amount": self.amount, "currency": "PIPE"}).to_string();
        let headers = vec![
            ("Idempotency-Key".to_owned(), self.key.clone()),
            ("Authorization".to_owned(), self.scope.clone()),
            ("Content-Type".to_owned(), "application/json".to_owned()),
        ];
        async move { exchange(addr, "POST", "/payments", &headers, &body).await }
    }

    /// Sends until a 201 (retrying connection errors, 5xx and 409 at the
    /// current address), before `deadline`; the payment's id.
    async fn send_until_created(
        &self,
        addr: &Mutex<SocketAddr>,
        retries: &AtomicU32,
        deadline: Instant,
    ) -> String {
        let mut last = String::new();
        loop {
            assert!(
                Instant::now() < deadline,
                "no 201 before the deadline; last: {last}"
            );
            let at = *addr.lock().unwrap();
            match self.send(at).await {
                Ok(a) if a.status == 201 => {
                    return a.json()["id"].as_str().expect("an id").to_owned();
                }
                Ok(a) if a.status == 409 || a.status >= 500 => {
                    last = format!("{} {}", a.status, a.text());
                }
                Ok(a) => panic!("unexpected {}: {}", a.status, a.text()),
                Err(e) => last = e.to_string(),
            }
            retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(jitter(20, 30)).await;
        }
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// One HTTP/1.1 exchange on its own connection; an error when the server
/// closes it (or dies) before a complete head.
async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &str,
) -> std::io::Result<Answer> {
    let talk = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(EXCHANGE, talk)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no complete head")
        })?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Answer {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

// ------------------------------------------------------------- processes

/// A running binary; killed (SIGKILL) on drop.
struct Proc {
    child: Child,
    addr: Option<SocketAddr>,
}

fn command(binary: &str) -> Command {
    let mut cmd = Command::new(binary);
    cmd.env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

impl Proc {
    /// payments-axum or payments-actix with `--transactional --outbox` on
    /// `url`, on a free port.
    async fn server(binary: &'static str, url: &str, extra: &[&str]) -> Self {
        Self::start(binary, &strs(&server_args(url, extra)), "serving").await
    }

    /// Starts `binary` with `args`; returns once its log has a line with
    /// `ready` (a server's has its address).
    async fn start(binary: &str, args: &[&str], ready: &str) -> Self {
        let mut child = command(binary).args(args).spawn().expect("the binary runs");
        let log = Arc::new(Mutex::new(String::new()));
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let writer = Arc::clone(&log);
        // Drains stderr until the binary exits, so it never blocks on a
        // full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = writer.lock().unwrap_or_else(|p| p.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        let deadline = Instant::now() + STARTUP;
        loop {
            let line = log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .lines()
                .find(|l| l.contains(ready))
                .map(str::to_owned);
            if let Some(line) = line {
                return Self {
                    child,
                    addr: listen_addr(&line),
                };
            }
            let exited = child.try_wait().expect("wait");
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "{} {args:?} was not ready ({exited:?}); stderr:\n{}",
                    name(binary),
                    log.lock().unwrap_or_else(|p| p.into_inner())
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn addr(&self) -> SocketAddr {
        self.addr.expect("a server's address")
    }

    /// SIGKILL (no shutdown of any kind), and the exit reaped.
    async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }
}

/// Runs `binary`, which must exit within [`STARTUP`]: its exit code and
/// stderr.
async fn run_to_exit(binary: &str, args: &[&str]) -> (Option<i32>, String) {
    let child = command(binary).args(args).spawn().expect("the binary runs");
    let out = tokio::time::timeout(STARTUP, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{binary} {args:?} did not exit (it serves?)"))
        .expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The address in `listen=127.0.0.1:1234` (axum) or `listen=[127.0.0.1:1234]`
/// (actix).
fn listen_addr(line: &str) -> Option<SocketAddr> {
    let value = line.split("listen=").nth(1)?.split_whitespace().next()?;
    value
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .next()?
        .trim()
        .parse()
        .ok()
}

fn name(binary: &str) -> &str {
    binary.rsplit(['/', '\\']).next().unwrap_or(binary)
}

/// Unique across the tests of this run and across runs.
fn unique() -> String {
    format!("{}-{:016x}", std::process::id(), rand::random::<u64>())
}

/// [`unique`] as an SQL identifier / queue name part.
fn unique_name() -> String {
    format!(
        "{}_{:012x}",
        std::process::id(),
        rand::random::<u64>() >> 16
    )
}
