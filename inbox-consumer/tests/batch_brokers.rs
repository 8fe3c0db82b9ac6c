//! Batch mode through real brokers (`AMQP_URL`, `NATS_URL`) into
//! PostgreSQL (`DATABASE_URL`), with `Subscription::run_batch` and
//! `Inbox::process_each` / `process_batch`:
//! - a batch holding the same id twice runs it once and acks both copies;
//! - a poison message in a batch is dead after its attempts while the
//!   others apply once (on RabbitMQ: the batch's one `multiple` ack must
//!   not cover it);
//! - a consumer process killed with SIGKILL after a batch's commit and
//!   before its ack, or before its commit: after a restart every effect is
//!   there exactly once (duplicates only, or the whole batch again).
//!
//! The killed consumer is this test binary run again as a child
//! (`batch_child`, which does nothing unless `INBOX_BATCH_CHILD` is set).
#![cfg(all(feature = "postgres", any(feature = "rabbitmq", feature = "nats")))]

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use inbox_consumer::{
    BoxFuture, HandlerError, Inbox, InboxConfig, InboxMessage, Outcome, PostgresInbox,
};
use sqlx::{PgPool, Postgres, Transaction};
use tokio::io::{AsyncBufReadExt, BufReader};

type Tx = Transaction<'static, Postgres>;

/// The environment variable that makes `batch_child` a consumer.
const CHILD: &str = "INBOX_BATCH_CHILD";

/// One message's effect: an id starting with `poison` fails (transient),
/// else one row.
fn effect(
    table: &str,
) -> impl for<'t> FnMut(&'t mut Tx, &'t InboxMessage) -> BoxFuture<'t, Result<(), HandlerError>>
       + Send
       + Clone {
    let table = table.to_owned();
    move |tx, m| {
        let table = table.clone();
        Box::pin(async move { insert(&table, tx, m).await })
    }
}

async fn insert(table: &str, tx: &mut Tx, m: &InboxMessage) -> Result<(), HandlerError> {
    let p: common::Payment =
        serde_json::from_slice(m.payload()).map_err(HandlerError::permanent)?;
    let id = m.id().unwrap_or_default();
    if id.starts_with("poison") {
        return Err(HandlerError::transient("poisoned"));
    }
    sqlx::query(&format!(
        "INSERT INTO {table} (account, amount, message_id) VALUES ($1, $2, $3)"
    ))
    .bind(p.account)
    .bind(p.amount)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A ledger table that is dropped, with the test's inbox rows, when the
/// test ends.
async fn ledger(pool: &PgPool, url: &str) -> common::PgTable {
    let columns = "account TEXT NOT NULL, amount BIGINT NOT NULL, message_id TEXT NOT NULL";
    common::PgTable::create(pool, url, columns).await
}

async fn rows(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn effects(pool: &PgPool, table: &str, id: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} WHERE message_id = $1"
    ))
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

fn config(consumer: &str, max: u32) -> InboxConfig {
    common::remember(consumer);
    InboxConfig::builder(consumer)
        .max_attempts(max)
        .retry_delay(Duration::from_millis(10), Duration::from_millis(50))
        .build()
        .unwrap()
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

/// The sizes of the batches a process function was given.
#[derive(Clone, Default)]
struct Sizes(Arc<Mutex<Vec<usize>>>);

impl Sizes {
    fn push(&self, n: usize) {
        self.0.lock().unwrap().push(n);
    }

    fn all(&self) -> Vec<usize> {
        self.0.lock().unwrap().clone()
    }
}

/// Where the child consumer crashes: after its `n`th batch committed (and
/// before the ack), or inside it before the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    AfterCommit,
    BeforeCommit,
}

/// What the child is told, one field a line: broker, broker URL, database
/// URL, queue or stream, table, consumer, crash, batch.
struct ChildSpec {
    broker: String,
    url: String,
    db: String,
    source: String,
    table: String,
    consumer: String,
    crash: Crash,
    batch: usize,
}

impl ChildSpec {
    fn encode(&self) -> String {
        let crash = match self.crash {
            Crash::AfterCommit => "after-commit",
            Crash::BeforeCommit => "before-commit",
        };
        [
            self.broker.as_str(),
            &self.url,
            &self.db,
            &self.source,
            &self.table,
            &self.consumer,
            crash,
            &self.batch.to_string(),
        ]
        .join("\n")
    }

    fn decode(text: &str) -> Self {
        let f: Vec<&str> = text.split('\n').collect();
        Self {
            broker: f[0].into(),
            url: f[1].into(),
            db: f[2].into(),
            source: f[3].into(),
            table: f[4].into(),
            consumer: f[5].into(),
            crash: if f[6] == "after-commit" {
                Crash::AfterCommit
            } else {
                Crash::BeforeCommit
            },
            batch: f[7].parse().unwrap(),
        }
    }
}

/// The batch the child crashes in (its first batches commit and are acked).
const CRASH_IN_BATCH: usize = 3;

/// Runs this test binary's `batch_child` as a consumer told `spec`, waits
/// until it reaches its crash point, kills it with SIGKILL, and returns
/// the ids of the batch it crashed in.
async fn run_child_until_its_crash(spec: &ChildSpec) -> Vec<String> {
    let exe = std::env::current_exe().unwrap();
    let mut child = tokio::process::Command::new(exe)
        .args(["batch_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, spec.encode())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the test binary runs again");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ids = common::bounded("the child reaches its crash point", async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the child ended before its crash point");
            // (After libtest's `test batch_child ... `, on the same line.)
            if let Some((_, ids)) = line.split_once("CRASH POINT ") {
                break ids.split(',').map(str::to_owned).collect::<Vec<_>>();
            }
        }
    })
    .await;
    // SIGKILL: no destructor, no close, no ack.
    child.start_kill().unwrap();
    let status = common::bounded("the child dies", child.wait())
        .await
        .unwrap();
    assert!(!status.success(), "{status:?}");
    ids
}

/// The child's process function for one batch: the inbox, then the crash
/// when this is batch `CRASH_IN_BATCH`.
async fn child_batch(
    inbox: &PostgresInbox,
    spec: &ChildSpec,
    n: usize,
    messages: Vec<InboxMessage>,
) -> Vec<Outcome> {
    let ids: Vec<String> = messages
        .iter()
        .map(|m| m.id().unwrap_or_default().to_owned())
        .collect();
    let crash_here = n == CRASH_IN_BATCH;
    let table = spec.table.clone();
    let before = crash_here && spec.crash == Crash::BeforeCommit;
    let announce = ids.join(",");
    let outcomes = inbox
        .process_batch(&messages, move |tx, new| {
            let (table, announce) = (table.clone(), announce.clone());
            Box::pin(async move {
                for m in new {
                    insert(&table, tx, m).await?;
                }
                if before {
                    // Every row inserted, nothing committed.
                    println!("CRASH POINT {announce}");
                    std::future::pending::<()>().await;
                }
                Ok(())
            })
        })
        .await;
    if crash_here {
        // Committed, not acked.
        assert!(
            outcomes.iter().all(|o| o.name() == "processed"),
            "{outcomes:?}"
        );
        println!("CRASH POINT {}", ids.join(","));
        std::future::pending::<()>().await;
    }
    outcomes
}

/// The consumer killed by `run_child_until_its_crash`: nothing unless
/// `INBOX_BATCH_CHILD` is set.
#[tokio::test]
async fn batch_child() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let spec = ChildSpec::decode(&spec);
    let pool = PgPool::connect(&spec.db).await.unwrap();
    let inbox = Inbox::postgres(pool, config(&spec.consumer, 5))
        .await
        .unwrap();
    let (inbox, spec) = (&inbox, &spec);
    let mut n = 0;
    let process = move |messages: Vec<InboxMessage>| {
        n += 1;
        child_batch(inbox, spec, n, messages)
    };
    let never = std::future::pending::<()>();
    match spec.broker.as_str() {
        #[cfg(feature = "rabbitmq")]
        "rabbitmq" => rabbitmq::subscription(&spec.url, &spec.source, spec.batch)
            .run_batch(process, never)
            .await
            .unwrap(),
        #[cfg(feature = "nats")]
        "nats" => {
            let client = async_nats::connect(&spec.url).await.unwrap();
            nats::subscription(client, &spec.source, &spec.consumer, spec.batch)
                .run_batch(process, never)
                .await
                .unwrap()
        }
        other => panic!("no broker {other}"),
    }
}

/// The crash tests, for either broker: publishes `n` messages, runs the
/// child until it crashes in its third batch, checks that batch's effects
/// (there after a crash after the commit, absent after one before), then
/// consumes in this process (`restart`) until every message ran, and
/// checks every effect once and what the restarted inbox saw: the crashed
/// batch as duplicates only, or processed whole.
async fn after_a_crash<P, PFut, R, RFut>(
    pool: &PgPool,
    table: &str,
    spec: &ChildSpec,
    n: usize,
    publish: P,
    restart: R,
    exact_duplicates: bool,
) where
    P: FnOnce(Vec<String>) -> PFut,
    PFut: std::future::Future<Output = ()>,
    R: FnOnce(PostgresInbox, Arc<tokio::sync::Notify>) -> RFut,
    RFut: std::future::Future<Output = ()> + Send + 'static,
{
    let all = ids("m", n);
    publish(all.clone()).await;
    let crashed_in = run_child_until_its_crash(spec).await;
    assert!(!crashed_in.is_empty());
    let at_the_crash = rows(pool, table).await;
    for id in &crashed_in {
        let expected = i64::from(spec.crash == Crash::AfterCommit);
        assert_eq!(
            effects(pool, table, id).await,
            expected,
            "{id} at the crash"
        );
    }
    // The second life.
    let inbox = Inbox::postgres(pool.clone(), config(&spec.consumer, 5))
        .await
        .unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let running = tokio::spawn(restart(inbox.clone(), stop.clone()));
    test_support::eventually("every message ran after the restart", || async {
        rows(pool, table).await >= n as i64
    })
    .await;
    let m = inbox.metrics();
    let redelivered_duplicates = match spec.crash {
        Crash::AfterCommit => crashed_in.len() as u64,
        Crash::BeforeCommit => 0,
    };
    test_support::eventually("the batch crashed in is settled again", || async {
        let m = inbox.metrics();
        m.processed + m.duplicate >= n as u64 - at_the_crash as u64 + redelivered_duplicates
    })
    .await;
    // Let any stray redelivery arrive before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.notify_one();
    common::bounded("the consumer stops", running)
        .await
        .unwrap();
    for id in &all {
        assert_eq!(effects(pool, table, id).await, 1, "{id}");
    }
    assert_eq!(rows(pool, table).await, n as i64, "one row per message");
    let after = inbox.metrics();
    assert_eq!(after.processed, n as u64 - at_the_crash as u64, "{m:?}");
    // After the commit: the crashed batch comes back as duplicates only.
    // Before it: nothing of it was applied, it all ran again. (JetStream
    // also redelivers what a busy consumer did not ack within the ack
    // wait: more duplicates, never another effect.)
    if exact_duplicates {
        assert_eq!(after.duplicate, redelivered_duplicates, "{after:?}");
    } else {
        assert!(after.duplicate >= redelivered_duplicates, "{after:?}");
    }
}

#[cfg(feature = "rabbitmq")]
mod rabbitmq {
    use super::*;

    use inbox_consumer::rabbitmq::Subscription;
    use lapin::options::{
        BasicGetOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

    pub(super) fn subscription(url: &str, queue: &str, batch: usize) -> Subscription {
        Subscription::new(url, queue)
            .prefetch(1)
            .batch(batch, Duration::from_millis(50))
            .backoff(Duration::from_millis(50), Duration::from_millis(200))
    }

    struct Env {
        amqp: String,
        db: String,
        pool: PgPool,
        table: String,
        _clean: common::PgTable,
        queue: String,
        conn: Connection,
        ch: Channel,
    }

    async fn setup(test: &str) -> Option<Env> {
        let amqp = common::service_url("AMQP_URL", test)?;
        let db = common::service_url("DATABASE_URL", test)?;
        let pool = PgPool::connect(&db).await.expect("PostgreSQL answers");
        let clean = ledger(&pool, &db).await;
        let table = clean.to_string();
        let conn = Connection::connect(&amqp, ConnectionProperties::default())
            .await
            .expect("RabbitMQ answers");
        let ch = conn.create_channel().await.unwrap();
        let queue = common::unique("batch_q");
        // Dead-lettering into `<queue>.dead`.
        let dead = format!("{queue}.dead");
        ch.queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(dead.as_str().into()),
        );
        ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args)
            .await
            .unwrap();
        Some(Env {
            amqp,
            db,
            pool,
            table,
            _clean: clean,
            queue,
            conn,
            ch,
        })
    }

    impl Env {
        async fn publish(&self, ids: &[String]) {
            for (i, id) in ids.iter().enumerate() {
                self.ch
                    .basic_publish(
                        "".into(),
                        self.queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &common::payment("acct", i as i64),
                        BasicProperties::default().with_message_id(id.as_str().into()),
                    )
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }

        async fn ready(&self, queue: &str) -> u32 {
            self.ch
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap()
                .message_count()
        }

        /// Runs a batch subscription in this process until `stop`.
        fn consume(
            &self,
            inbox: PostgresInbox,
            batch: usize,
            sizes: Sizes,
            stop: Arc<tokio::sync::Notify>,
        ) -> impl std::future::Future<Output = ()> + Send + 'static {
            let subscription = subscription(&self.amqp, &self.queue, batch);
            let table = self.table.clone();
            async move {
                let (inbox, table, sizes) = (&inbox, &table, &sizes);
                subscription
                    .run_batch(
                        |messages| async move {
                            sizes.push(messages.len());
                            inbox.process_each(&messages, effect(table)).await
                        },
                        async move { stop.notified().await },
                    )
                    .await
                    .unwrap();
            }
        }

        async fn cleanup(self) {
            for q in [self.queue.clone(), format!("{}.dead", self.queue)] {
                let _ = self
                    .ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = self.conn.close(200, "bye".into()).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_holding_one_id_twice_runs_it_once_and_acks_both_copies() {
        let Some(env) = setup("rabbitmq_a_batch_holding_one_id_twice").await else {
            return;
        };
        let published: Vec<String> = ["a", "b", "a", "c"].map(String::from).to_vec();
        env.publish(&published).await;
        let inbox = Inbox::postgres(env.pool.clone(), config(&common::unique("ledger"), 5))
            .await
            .unwrap();
        let (sizes, stop) = (Sizes::default(), Arc::new(tokio::sync::Notify::new()));
        let running = tokio::spawn(env.consume(inbox.clone(), 10, sizes.clone(), stop.clone()));
        test_support::eventually("the four settled", || async {
            let m = inbox.metrics();
            m.processed + m.duplicate == 4
        })
        .await;
        stop.notify_one();
        common::bounded("the subscription stops", running)
            .await
            .unwrap();
        assert_eq!(sizes.all(), [4], "one batch of four");
        let m = inbox.metrics();
        assert_eq!((m.processed, m.duplicate), (3, 1));
        for id in ["a", "b", "c"] {
            assert_eq!(effects(&env.pool, &env.table, id).await, 1, "{id}");
        }
        // Both copies of `a` were acked: nothing came back when the
        // subscription's connection closed.
        assert_eq!(env.ready(&env.queue).await, 0);
        env.cleanup().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_poison_message_in_a_batch_dies_after_its_attempts_and_the_others_apply_once() {
        let Some(env) = setup("rabbitmq_a_poison_message_in_a_batch").await else {
            return;
        };
        let mut published = ids("ok", 10);
        published.insert(5, "poison".into());
        env.publish(&published).await;
        let inbox = Inbox::postgres(env.pool.clone(), config(&common::unique("ledger"), 3))
            .await
            .unwrap();
        let (sizes, stop) = (Sizes::default(), Arc::new(tokio::sync::Notify::new()));
        let running = tokio::spawn(env.consume(inbox.clone(), 20, sizes.clone(), stop.clone()));
        // The poison is requeued (nack) twice, then rejected into the
        // dead-letter queue; had the batch's `multiple` ack covered it,
        // it would have been acked and never come back.
        let dead = format!("{}.dead", env.queue);
        test_support::eventually("the poison is dead-lettered", || async {
            env.ready(&dead).await == 1
        })
        .await;
        stop.notify_one();
        common::bounded("the subscription stops", running)
            .await
            .unwrap();
        assert_eq!(sizes.all()[0], 11, "the first batch held them all");
        for id in ids("ok", 10) {
            assert_eq!(effects(&env.pool, &env.table, &id).await, 1, "{id}");
            assert_eq!(inbox.attempts(&id).await.unwrap(), Some(1), "{id}");
        }
        assert_eq!(effects(&env.pool, &env.table, "poison").await, 0);
        assert_eq!(inbox.attempts("poison").await.unwrap(), Some(3));
        let m = inbox.metrics();
        assert_eq!((m.processed, m.failed, m.dead), (10, 2, 1));
        assert_eq!(env.ready(&env.queue).await, 0);
        let got = env
            .ch
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("the dead letter");
        assert_eq!(
            got.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str()),
            Some("poison")
        );
        env.cleanup().await;
    }

    async fn sigkill(test: &str, crash: Crash) {
        let Some(env) = setup(test).await else {
            return;
        };
        let spec = ChildSpec {
            broker: "rabbitmq".into(),
            url: env.amqp.clone(),
            db: env.db.clone(),
            source: env.queue.clone(),
            table: env.table.clone(),
            consumer: common::consumer("ledger"),
            crash,
            batch: 10,
        };
        let env = Arc::new(env);
        let publishing = env.clone();
        let consuming = env.clone();
        after_a_crash(
            &env.pool,
            &env.table,
            &spec,
            60,
            |ids| async move { publishing.publish(&ids).await },
            move |inbox, stop| consuming.consume(inbox, 10, Sizes::default(), stop),
            true,
        )
        .await;
        assert_eq!(env.ready(&env.queue).await, 0);
        if let Ok(env) = Arc::try_unwrap(env) {
            env.cleanup().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sigkill_between_a_batchs_commit_and_its_ack_redelivers_duplicates_only() {
        sigkill("rabbitmq_a_sigkill_after_the_commit", Crash::AfterCommit).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sigkill_before_a_batchs_commit_applies_none_of_it_and_redelivers_it_whole() {
        sigkill("rabbitmq_a_sigkill_before_the_commit", Crash::BeforeCommit).await;
    }
}

#[cfg(feature = "nats")]
mod nats {
    use super::*;

    use async_nats::jetstream::{self, consumer::pull};
    use inbox_consumer::nats::{Subscription, MSG_ID_HEADER};

    /// The durable consumer `name` on `stream`, redelivering unacked
    /// messages after 2 s.
    pub(super) fn subscription(
        client: async_nats::Client,
        stream: &str,
        name: &str,
        batch: usize,
    ) -> Subscription {
        Subscription::new(jetstream::new(client), stream, name)
            .consumer_config(pull::Config {
                durable_name: Some(name.to_owned()),
                ack_wait: Duration::from_secs(2),
                ..Default::default()
            })
            .batch(batch, Duration::from_millis(50))
    }

    struct Env {
        url: String,
        db: String,
        pool: PgPool,
        table: String,
        _clean: common::PgTable,
        stream: String,
        js: jetstream::Context,
        client: async_nats::Client,
    }

    async fn setup(test: &str) -> Option<Env> {
        let url = common::service_url("NATS_URL", test)?;
        let db = common::service_url("DATABASE_URL", test)?;
        let pool = PgPool::connect(&db).await.expect("PostgreSQL answers");
        let clean = ledger(&pool, &db).await;
        let table = clean.to_string();
        let client = async_nats::connect(&url).await.expect("NATS answers");
        let js = jetstream::new(client.clone());
        let stream = common::unique("BATCH").to_uppercase();
        // A short duplicate window of its own, so that a republished id is
        // stored again and the consumer's dedup is what counts.
        js.create_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{stream}.>")],
            duplicate_window: Duration::from_millis(100),
            ..Default::default()
        })
        .await
        .unwrap();
        Some(Env {
            url,
            db,
            pool,
            table,
            _clean: clean,
            stream,
            js,
            client,
        })
    }

    impl Env {
        async fn publish(&self, ids: &[String]) {
            for (i, id) in ids.iter().enumerate() {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(MSG_ID_HEADER, id.as_str());
                self.js
                    .publish_with_headers(
                        format!("{}.pay", self.stream),
                        headers,
                        common::payment("acct", i as i64).into(),
                    )
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }

        /// Messages delivered and not acked yet, and not delivered yet.
        async fn outstanding(&self, consumer: &str) -> (usize, u64) {
            let mut c: jetstream::consumer::PullConsumer = self
                .js
                .get_stream(&self.stream)
                .await
                .unwrap()
                .get_consumer(consumer)
                .await
                .unwrap();
            let info = c.info().await.unwrap();
            (info.num_ack_pending, info.num_pending)
        }

        fn consume(
            &self,
            inbox: PostgresInbox,
            batch: usize,
            sizes: Sizes,
            stop: Arc<tokio::sync::Notify>,
        ) -> impl std::future::Future<Output = ()> + Send + 'static {
            let subscription =
                subscription(self.client.clone(), &self.stream, inbox.consumer(), batch);
            let table = self.table.clone();
            async move {
                let (inbox, table, sizes) = (&inbox, &table, &sizes);
                subscription
                    .run_batch(
                        |messages| async move {
                            sizes.push(messages.len());
                            inbox.process_each(&messages, effect(table)).await
                        },
                        async move { stop.notified().await },
                    )
                    .await
                    .unwrap();
            }
        }

        async fn cleanup(&self) {
            let _ = self.js.delete_stream(&self.stream).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_holding_one_id_twice_runs_it_once_and_acks_both_copies() {
        let Some(env) = setup("nats_a_batch_holding_one_id_twice").await else {
            return;
        };
        env.publish(&["a".into(), "b".into()]).await;
        // Past the stream's duplicate window: `a` is stored twice.
        tokio::time::sleep(Duration::from_millis(200)).await;
        env.publish(&["a".into(), "c".into()]).await;
        let name = common::consumer("ledger");
        let inbox = Inbox::postgres(env.pool.clone(), config(&name, 5))
            .await
            .unwrap();
        let (sizes, stop) = (Sizes::default(), Arc::new(tokio::sync::Notify::new()));
        let running = tokio::spawn(env.consume(inbox.clone(), 10, sizes.clone(), stop.clone()));
        test_support::eventually("the four settled", || async {
            let m = inbox.metrics();
            m.processed + m.duplicate == 4
        })
        .await;
        test_support::eventually("all four acked", || async {
            env.outstanding(&name).await == (0, 0)
        })
        .await;
        stop.notify_one();
        common::bounded("the subscription stops", running)
            .await
            .unwrap();
        assert_eq!(sizes.all(), [4], "one batch of four");
        let m = inbox.metrics();
        assert_eq!((m.processed, m.duplicate), (3, 1));
        for id in ["a", "b", "c"] {
            assert_eq!(effects(&env.pool, &env.table, id).await, 1, "{id}");
        }
        env.cleanup().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_poison_message_in_a_batch_dies_after_its_attempts_and_the_others_apply_once() {
        let Some(env) = setup("nats_a_poison_message_in_a_batch").await else {
            return;
        };
        let mut published = ids("ok", 10);
        published.insert(5, "poison".into());
        env.publish(&published).await;
        let name = common::consumer("ledger");
        let inbox = Inbox::postgres(env.pool.clone(), config(&name, 3))
            .await
            .unwrap();
        let (sizes, stop) = (Sizes::default(), Arc::new(tokio::sync::Notify::new()));
        let running = tokio::spawn(env.consume(inbox.clone(), 20, sizes.clone(), stop.clone()));
        test_support::eventually("the poison is dead", || async { inbox.metrics().dead == 1 })
            .await;
        test_support::eventually("nothing outstanding", || async {
            env.outstanding(&name).await == (0, 0)
        })
        .await;
        stop.notify_one();
        common::bounded("the subscription stops", running)
            .await
            .unwrap();
        assert_eq!(sizes.all()[0], 11, "the first batch held them all");
        for id in ids("ok", 10) {
            assert_eq!(effects(&env.pool, &env.table, &id).await, 1, "{id}");
            assert_eq!(inbox.attempts(&id).await.unwrap(), Some(1), "{id}");
        }
        assert_eq!(effects(&env.pool, &env.table, "poison").await, 0);
        assert_eq!(inbox.attempts("poison").await.unwrap(), Some(3));
        let m = inbox.metrics();
        assert_eq!((m.processed, m.failed, m.dead), (10, 2, 1));
        env.cleanup().await;
    }

    async fn sigkill(test: &str, crash: Crash) {
        let Some(env) = setup(test).await else {
            return;
        };
        let consumer = common::consumer("ledger");
        let spec = ChildSpec {
            broker: "nats".into(),
            url: env.url.clone(),
            db: env.db.clone(),
            source: env.stream.clone(),
            table: env.table.clone(),
            consumer: consumer.clone(),
            crash,
            batch: 10,
        };
        let env = Arc::new(env);
        let publishing = env.clone();
        let consuming = env.clone();
        after_a_crash(
            &env.pool,
            &env.table,
            &spec,
            60,
            |ids| async move { publishing.publish(&ids).await },
            move |inbox, stop| consuming.consume(inbox, 10, Sizes::default(), stop),
            false,
        )
        .await;
        assert_eq!(env.outstanding(&consumer).await, (0, 0));
        env.cleanup().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sigkill_between_a_batchs_commit_and_its_acks_redelivers_duplicates_only() {
        sigkill("nats_a_sigkill_after_the_commit", Crash::AfterCommit).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sigkill_before_a_batchs_commit_applies_none_of_it_and_redelivers_it_whole() {
        sigkill("nats_a_sigkill_before_the_commit", Crash::BeforeCommit).await;
    }
}
