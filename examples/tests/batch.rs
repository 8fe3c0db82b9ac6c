//! `inbox-rabbitmq --batch N` and `inbox-nats --batch N` against real
//! brokers and PostgreSQL: the binary is killed with SIGKILL in the middle
//! of the stream (some ids published twice), started again, and every
//! message's row is in `ledger_entries` exactly once. (The exact windows,
//! before and after a batch's commit, are pinned down by
//! `inbox-consumer/tests/batch_brokers.rs`.) `--help` documents the flag.
//!
//! Tests read `DATABASE_URL`, `AMQP_URL` and `NATS_URL`, and skip, saying
//! why, when one is unset; each gets a PostgreSQL database of its own.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use test_support::{eventually, service_url, unique, PgDatabase};

const INBOX_RABBITMQ: &str = env!("CARGO_BIN_EXE_inbox-rabbitmq");
const INBOX_NATS: &str = env!("CARGO_BIN_EXE_inbox-nats");

/// How long a binary may take to be ready (its log says so).
const STARTUP: Duration = Duration::from_secs(30);

/// Messages published, distinct ids.
const MESSAGES: u32 = 300;
/// Of those, the first ones are published a second time.
const TWICE: u32 = 50;

fn body(i: u32) -> String {
    format!(r#"{{"account":"acct-{}","amount":{}}}"#, i % 7, i + 1)
}

#[test]
fn help_documents_batch() {
    for binary in [INBOX_RABBITMQ, INBOX_NATS] {
        let out = std::process::Command::new(binary)
            .arg("--help")
            .output()
            .expect("the binary runs");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{help}");
        for words in [
            "--batch <N>",
            "[default: 1]",
            "--batch-window",
            "committed once",
        ] {
            assert!(help.contains(words), "{binary}: no {words:?} in:\n{help}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn inbox_rabbitmq_with_batch_killed_mid_stream_applies_each_message_once() {
    let test = "inbox_rabbitmq_with_batch_killed_mid_stream";
    let Some(amqp) = service_url("AMQP_URL", test) else {
        return;
    };
    let Some(db) = PgDatabase::create(test).await else {
        return;
    };
    let queue = unique("batch_q");
    let conn = Connection::connect(&amqp, ConnectionProperties::default())
        .await
        .expect("RabbitMQ does not answer");
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    for i in (0..MESSAGES).chain(0..TWICE) {
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            body(i).as_bytes(),
            BasicProperties::default().with_message_id(format!("m{i}").into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let consumer = unique("ledger");
    let args = [
        "--database",
        &db.url,
        "--amqp",
        &amqp,
        "--queue",
        &queue,
        "--consumer",
        &consumer,
        "--batch",
        "25",
        "--handler-delay",
        "1ms",
    ];
    killed_mid_stream_then_restarted(&db, INBOX_RABBITMQ, &args).await;
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn inbox_nats_with_batch_killed_mid_stream_applies_each_message_once() {
    let test = "inbox_nats_with_batch_killed_mid_stream";
    let Some(nats) = service_url("NATS_URL", test) else {
        return;
    };
    let Some(db) = PgDatabase::create(test).await else {
        return;
    };
    let js = jetstream::new(
        async_nats::connect(&nats)
            .await
            .expect("NATS does not answer"),
    );
    let stream = unique("BATCH").to_uppercase();
    let subjects = format!("{stream}.>");
    // A short duplicate window, so that the ids published twice are stored
    // twice; the binary uses the stream as it is.
    js.create_stream(jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![subjects.clone()],
        duplicate_window: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .unwrap();
    let consumer = unique("ledger");
    // The durable consumer, made here with a short ack wait so that what the
    // killed process held is redelivered within the test (the binary uses
    // it as it is).
    js.get_stream(&stream)
        .await
        .unwrap()
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(consumer.clone()),
            ack_wait: Duration::from_secs(2),
            ..Default::default()
        })
        .await
        .unwrap();
    let publish = |range: std::ops::Range<u32>| {
        let (js, subject) = (js.clone(), format!("{stream}.pay"));
        async move {
            for i in range {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("m{i}").as_str());
                js.publish_with_headers(subject.clone(), headers, body(i).into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }
    };
    publish(0..MESSAGES).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish(0..TWICE).await;
    let args = [
        "--database",
        &db.url,
        "--nats",
        &nats,
        "--stream",
        &stream,
        "--subject",
        &subjects,
        "--consumer",
        &consumer,
        "--batch",
        "25",
        "--handler-delay",
        "1ms",
    ];
    killed_mid_stream_then_restarted(&db, INBOX_NATS, &args).await;
    let _ = js.delete_stream(&stream).await;
    db.finish().await;
}

/// Starts `binary` with `args`, kills it with SIGKILL once some batches
/// committed, starts it again, and checks one row per message id.
async fn killed_mid_stream_then_restarted(db: &PgDatabase, binary: &'static str, args: &[&str]) {
    let rows = || db.count("SELECT count(*) FROM ledger_entries");
    let distinct = || db.count("SELECT count(DISTINCT message_id) FROM ledger_entries");
    let mut first = Proc::spawn(binary, args);
    first.wait_for("consuming", STARTUP).await;
    assert!(first.log().contains("batches"), "{}", first.log());
    eventually("some batches committed", || async { rows().await >= 50 }).await;
    first.kill().await;
    let at_the_kill = rows().await;
    assert!(
        at_the_kill < i64::from(MESSAGES),
        "killed too late to mean anything: {at_the_kill} rows"
    );
    let second = Proc::spawn(binary, args);
    second.wait_for("consuming", STARTUP).await;
    eventually("every message ran after the restart", || async {
        distinct().await == i64::from(MESSAGES)
    })
    .await;
    // Let the redeliveries of what the first process held arrive: each a
    // duplicate, acked, never a second row.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rows().await, i64::from(MESSAGES), "one row per message");
    drop(second);
}

/// A running binary, its stderr collected; killed on drop.
struct Proc {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(binary: &'static str, args: &[&str]) -> Self {
        let mut child = Command::new(binary)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary runs");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let collected = Arc::clone(&log);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = collected.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Self { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    async fn wait_for(&self, what: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().contains(what) {
            assert!(
                Instant::now() < deadline,
                "no {what:?} within {within:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no shutdown, no close, no ack.
    async fn kill(&mut self) {
        self.child.start_kill().expect("kill");
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("the killed binary exits")
            .expect("wait");
        assert!(!status.success(), "{status:?}");
    }
}
