//! Through a real NATS JetStream (`NATS_URL`) into transactional mode on
//! PostgreSQL (`DATABASE_URL`). Each test has its own stream, consumer and table.
#![cfg(all(feature = "nats", feature = "postgres"))]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures_util::StreamExt;
use inbox_consumer::{
    nats, BoxFuture, Disposition, HandlerError, Inbox, InboxConfig, InboxMessage, Outcome,
    PostgresInbox,
};
use sqlx::{PgPool, Postgres, Transaction};

struct Env {
    url: String,
    pool: PgPool,
    table: String,
    /// Drops the table and the test's inbox rows when the test ends.
    _clean: common::PgTable,
    stream: String,
    js: jetstream::Context,
}

async fn setup(test: &str) -> Option<Env> {
    let url = common::service_url("NATS_URL", test)?;
    let db = common::service_url("DATABASE_URL", test)?;
    let pool = PgPool::connect(&db)
        .await
        .expect("PostgreSQL does not answer");
    let clean = common::PgTable::create(
        &pool,
        &db,
        "account TEXT NOT NULL, amount BIGINT NOT NULL, message_id TEXT NOT NULL",
    )
    .await;
    let table = clean.to_string();
    let client = async_nats::connect(&url)
        .await
        .expect("NATS does not answer");
    let js = jetstream::new(client);
    let stream = common::unique("S").to_uppercase();
    let env = Env {
        url,
        pool,
        table,
        _clean: clean,
        stream,
        js,
    };
    // A short duplicate window of its own, so the consumer's dedup is what counts.
    env.js.create_stream(env.stream_config()).await.unwrap();
    Some(env)
}

impl Env {
    async fn consumer(&self, js: &jetstream::Context, name: &str) -> PullConsumer {
        js.get_stream(&self.stream)
            .await
            .unwrap()
            .get_or_create_consumer(
                name,
                jetstream::consumer::pull::Config {
                    durable_name: Some(name.to_owned()),
                    ack_wait: Duration::from_secs(1),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
    }

    async fn publish(&self, id: Option<&str>, body: Vec<u8>) {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = id {
            headers.insert(nats::MSG_ID_HEADER, id);
        }
        self.js
            .publish_with_headers(format!("{}.pay", self.stream), headers, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn stored(&self) -> u64 {
        self.js
            .get_stream(&self.stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    }

    async fn effects(&self, id: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM {} WHERE message_id = $1",
            self.table
        ))
        .bind(id)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// Every effect's message id, in insertion order.
    async fn ids(&self) -> Vec<String> {
        sqlx::query_scalar(&format!(
            "SELECT message_id FROM {} ORDER BY ctid",
            self.table
        ))
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// The stream's settings: those of `setup`.
    fn stream_config(&self) -> jetstream::stream::Config {
        jetstream::stream::Config {
            name: self.stream.clone(),
            subjects: vec![format!("{}.>", self.stream)],
            duplicate_window: Duration::from_millis(100),
            ..Default::default()
        }
    }

    async fn cleanup(&self) {
        let _ = self.js.delete_stream(&self.stream).await;
    }
}

fn ledger(
    table: String,
    fail: Arc<AtomicU32>,
) -> impl for<'t> FnOnce(
    &'t mut Transaction<'static, Postgres>,
    &'t InboxMessage,
) -> BoxFuture<'t, Result<(), HandlerError>> {
    move |tx, message| {
        Box::pin(async move {
            let p: common::Payment =
                serde_json::from_slice(message.payload()).map_err(HandlerError::permanent)?;
            if fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(HandlerError::transient("scripted failure"));
            }
            sqlx::query(&format!(
                "INSERT INTO {table} (account, amount, message_id) VALUES ($1, $2, $3)"
            ))
            .bind(p.account)
            .bind(p.amount)
            .bind(message.id().unwrap_or_default().to_owned())
            .execute(&mut **tx)
            .await?;
            Ok(())
        })
    }
}

fn config(consumer: &str, max: u32) -> InboxConfig {
    common::remember(consumer);
    InboxConfig::builder(consumer)
        .max_attempts(max)
        .retry_delay(Duration::from_millis(10), Duration::from_millis(50))
        .build()
        .unwrap()
}

/// Consumes until `settled` messages were acked or termed.
async fn work(
    consumer: &PullConsumer,
    inbox: &PostgresInbox,
    table: &str,
    fail: impl Fn(&InboxMessage) -> Arc<AtomicU32>,
    settled: usize,
) {
    let mut messages = consumer.messages().await.unwrap();
    let mut done = 0;
    common::bounded("consume", async {
        while done < settled {
            let msg = messages.next().await.expect("messages ended").unwrap();
            let message = nats::message(&msg);
            let outcome = inbox
                .process(&message, ledger(table.to_owned(), fail(&message)))
                .await;
            if !matches!(
                nats::settle(&msg, &outcome).await.unwrap(),
                Disposition::Requeue { .. }
            ) {
                done += 1;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn the_same_id_published_five_times_gives_one_effect() {
    let Some(env) = setup("nats_the_same_id_published_five_times").await else {
        return;
    };
    for _ in 0..5 {
        env.publish(Some("pay-1"), common::payment("a", 5)).await;
        // Past the stream's own duplicate window, so all five are stored.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(env.stored().await, 5);
    let name = common::consumer("ledger");
    let inbox = Inbox::postgres(env.pool.clone(), config(&name, 5))
        .await
        .unwrap();
    let consumer = env.consumer(&env.js, &name).await;
    work(&consumer, &inbox, &env.table, |_| Arc::default(), 5).await;
    assert_eq!(env.effects("pay-1").await, 1);
    let m = inbox.metrics();
    assert_eq!((m.processed, m.duplicate), (1, 4));
    env.cleanup().await;
}

#[tokio::test]
async fn without_nats_msg_id_the_key_is_the_stream_sequence_and_when_it_was_stored() {
    let Some(env) = setup("nats_without_nats_msg_id").await else {
        return;
    };
    let before = std::time::SystemTime::now();
    env.publish(None, common::payment("a", 5)).await;
    let name = common::consumer("ledger");
    let inbox = Inbox::postgres(env.pool.clone(), config(&name, 5))
        .await
        .unwrap();
    let consumer = env.consumer(&env.js, &name).await;
    work(&consumer, &inbox, &env.table, |_| Arc::default(), 1).await;
    let ids = env.ids().await;
    assert_eq!(ids.len(), 1, "{ids:?}");
    let stored = ids[0]
        .strip_prefix(&format!("{}/1@", env.stream))
        .unwrap_or_else(|| panic!("not <stream>/1@<stored>: {}", ids[0]));
    let stored: u128 = stored.parse().expect("nanoseconds");
    let before = before
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    // The server's clock is this machine's: stored within a minute of the publish.
    assert!(
        stored.abs_diff(before) < 60_000_000_000,
        "{stored} vs {before}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_crash_between_commit_and_ack_is_acked_as_a_duplicate() {
    let Some(env) = setup("nats_a_crash_between_commit_and_ack").await else {
        return;
    };
    env.publish(Some("pay-2"), common::payment("a", 5)).await;
    let name = common::consumer("ledger");
    let inbox = Inbox::postgres(env.pool.clone(), config(&name, 5))
        .await
        .unwrap();
    {
        // First life: its own connection; commit, then die before the ack.
        let client = async_nats::connect(&env.url).await.unwrap();
        let js = jetstream::new(client.clone());
        let consumer = env.consumer(&js, &name).await;
        let mut messages = consumer.messages().await.unwrap();
        let msg = common::bounded("first delivery", messages.next())
            .await
            .unwrap()
            .unwrap();
        let outcome = inbox
            .process(
                &nats::message(&msg),
                ledger(env.table.clone(), Arc::default()),
            )
            .await;
        assert!(matches!(outcome, Outcome::Processed { .. }), "{outcome:?}");
        drop(messages);
        drop(client);
    }
    // Second life: redelivered after the ack wait, a duplicate, acked.
    let consumer = env.consumer(&env.js, &name).await;
    let mut messages = consumer.messages().await.unwrap();
    let msg = common::bounded("redelivery", messages.next())
        .await
        .unwrap()
        .unwrap();
    let message = nats::message(&msg);
    assert!(message.is_redelivered());
    let outcome = inbox
        .process(&message, ledger(env.table.clone(), Arc::default()))
        .await;
    assert!(matches!(outcome, Outcome::Duplicate), "{outcome:?}");
    assert_eq!(
        nats::settle(&msg, &outcome).await.unwrap(),
        Disposition::Ack
    );
    assert_eq!(env.effects("pay-2").await, 1);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_with_duplicates_give_one_effect_per_id() {
    let Some(env) = setup("nats_two_consumers_with_duplicates").await else {
        return;
    };
    for _ in 0..3 {
        for i in 0..10 {
            env.publish(Some(&format!("pay-{i}")), common::payment("a", i))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(env.stored().await, 30);
    let name = common::consumer("ledger");
    let env = Arc::new(env);
    let total = Arc::new(AtomicU32::new(0));
    let workers = (0..2).map(|_| {
        let (env, name, total) = (env.clone(), name.clone(), total.clone());
        tokio::spawn(async move {
            let inbox = Inbox::postgres(env.pool.clone(), config(&name, 5))
                .await
                .unwrap();
            let client = async_nats::connect(&env.url).await.unwrap();
            let consumer = env.consumer(&jetstream::new(client), &name).await;
            let mut messages = consumer.messages().await.unwrap();
            common::bounded("worker", async {
                while total.load(Ordering::SeqCst) < 30 {
                    let Ok(Some(msg)) =
                        tokio::time::timeout(Duration::from_millis(300), messages.next()).await
                    else {
                        continue;
                    };
                    let msg = msg.unwrap();
                    let outcome = inbox
                        .process(
                            &nats::message(&msg),
                            ledger(env.table.clone(), Arc::default()),
                        )
                        .await;
                    nats::settle(&msg, &outcome).await.unwrap();
                    if matches!(outcome, Outcome::Processed { .. } | Outcome::Duplicate) {
                        total.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
            .await;
            inbox.metrics()
        })
    });
    let metrics = futures_util::future::join_all(workers).await;
    let processed: u64 = metrics.iter().map(|m| m.as_ref().unwrap().processed).sum();
    assert_eq!(processed, 10);
    for i in 0..10 {
        assert_eq!(env.effects(&format!("pay-{i}")).await, 1, "pay-{i}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_handler_failing_twice_then_succeeding_gives_one_effect_and_three_attempts() {
    let Some(env) = setup("nats_a_handler_failing_twice").await else {
        return;
    };
    env.publish(Some("pay-3"), common::payment("a", 5)).await;
    let name = common::consumer("ledger");
    let inbox = Inbox::postgres(env.pool.clone(), config(&name, 5))
        .await
        .unwrap();
    let consumer = env.consumer(&env.js, &name).await;
    let fail = Arc::new(AtomicU32::new(2));
    work(&consumer, &inbox, &env.table, move |_| fail.clone(), 1).await;
    assert_eq!(env.effects("pay-3").await, 1);
    assert_eq!(inbox.attempts("pay-3").await.unwrap(), Some(3));
    assert_eq!(inbox.metrics().failed, 2);
    env.cleanup().await;
}

#[tokio::test]
async fn a_poison_message_is_termed_and_the_messages_behind_it_process() {
    let Some(env) = setup("nats_a_poison_message").await else {
        return;
    };
    env.publish(Some("poison"), common::payment("a", 1)).await;
    env.publish(Some("undecodable"), b"{".to_vec()).await;
    for i in 0..3 {
        env.publish(Some(&format!("ok-{i}")), common::payment("a", i))
            .await;
    }
    let name = common::consumer("ledger");
    let inbox = Inbox::postgres(env.pool.clone(), config(&name, 3))
        .await
        .unwrap();
    let consumer = env.consumer(&env.js, &name).await;
    let poison =
        |m: &InboxMessage| Arc::new(AtomicU32::new(if m.id() == Some("poison") { 1 } else { 0 }));
    work(&consumer, &inbox, &env.table, poison, 5).await;
    for i in 0..3 {
        assert_eq!(env.effects(&format!("ok-{i}")).await, 1);
    }
    assert_eq!(env.effects("poison").await, 0);
    assert_eq!(inbox.metrics().dead, 2);
    assert_eq!(inbox.attempts("poison").await.unwrap(), Some(3));
    env.cleanup().await;
}

/// A [`Subscription`] of `name` on the env's stream (created when missing),
/// running in a task until `stop` is notified; quick to reopen.
fn subscribe(
    env: &Env,
    js: jetstream::Context,
    name: &str,
    inbox: &PostgresInbox,
    stop: &Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<Result<(), nats::ConsumeError>> {
    let subscription = nats::Subscription::new(js, &env.stream, name)
        .consumer_config(jetstream::consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            ack_wait: Duration::from_secs(1),
            ..Default::default()
        })
        .create_stream_when_missing(env.stream_config())
        .backoff(Duration::from_millis(50), Duration::from_millis(500));
    let (inbox, table, stop) = (inbox.clone(), env.table.clone(), stop.clone());
    tokio::spawn(async move {
        subscription
            .run(
                |message| {
                    let (inbox, table) = (inbox.clone(), table.clone());
                    async move { inbox.process(&message, ledger(table, Arc::default())).await }
                },
                async move { stop.notified().await },
            )
            .await
    })
}

async fn rows(env: &Env) -> i64 {
    sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {}", env.table))
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_less_message_of_a_recreated_stream_runs_though_its_sequence_repeats() {
    let Some(env) = setup("nats_an_id_less_message_of_a_recreated_stream").await else {
        return;
    };
    let name = common::consumer("ledger");
    let inbox = Inbox::postgres(env.pool.clone(), config(&name, 5))
        .await
        .unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let running = subscribe(&env, env.js.clone(), &name, &inbox, &stop);
    env.publish(None, common::payment("a", 1)).await;
    test_support::eventually("the first message ran", || async { rows(&env).await == 1 }).await;

    // Deleted and created again: its sequence starts at 1 again, and the
    // running subscription has to open a new consumer on it.
    env.js.delete_stream(&env.stream).await.unwrap();
    env.js
        .get_or_create_stream(env.stream_config())
        .await
        .unwrap();
    env.publish(None, common::payment("b", 2)).await;
    test_support::eventually("the second message ran", || async { rows(&env).await == 2 }).await;
    let ids = env.ids().await;
    let prefix = format!("{}/1@", env.stream);
    assert!(ids.iter().all(|id| id.starts_with(&prefix)), "{ids:?}");
    assert_ne!(ids[0], ids[1], "one key for two messages");
    assert_eq!(inbox.metrics().duplicate, 0);

    stop.notify_one();
    common::bounded("the subscription stops", running)
        .await
        .unwrap()
        .unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_outlives_a_cut_connection_and_every_message_runs_once() {
    let Some(env) = setup("nats_the_subscription_outlives_a_cut").await else {
        return;
    };
    let proxy = test_support::Proxy::start(test_support::host_port(&env.url, 4222)).await;
    let client = async_nats::ConnectOptions::new()
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(test_support::via(&env.url, proxy.addr))
        .await
        .unwrap();
    let name = common::consumer("ledger");
    let inbox = Inbox::postgres(env.pool.clone(), config(&name, 5))
        .await
        .unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let running = subscribe(&env, jetstream::new(client), &name, &inbox, &stop);
    for i in 0..20 {
        env.publish(Some(&format!("m{i}")), common::payment("a", i))
            .await;
    }
    test_support::eventually("some ran before the cut", || async {
        rows(&env).await >= 5
    })
    .await;
    proxy.cut();
    for i in 20..30 {
        env.publish(Some(&format!("m{i}")), common::payment("a", i))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();
    test_support::eventually("all ran after the cut", || async { rows(&env).await >= 30 }).await;
    // Redeliveries of the ones whose ack was lost come after the ack wait.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ids = env.ids().await;
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!((ids.len(), distinct.len()), (30, 30), "{ids:?}");

    stop.notify_one();
    common::bounded("the subscription stops", running)
        .await
        .unwrap()
        .unwrap();
    env.cleanup().await;
}
