//! Through a real RabbitMQ (`AMQP_URL`) into transactional mode on PostgreSQL
//! (`DATABASE_URL`). Each test has its own queue, consumer name and ledger table.
#![cfg(all(feature = "rabbitmq", feature = "postgres"))]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use inbox_consumer::{
    rabbitmq, BoxFuture, HandlerError, Inbox, InboxConfig, InboxMessage, Outcome, PostgresInbox,
};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sqlx::{PgPool, Postgres, Transaction};

struct Env {
    amqp: String,
    pool: PgPool,
    table: String,
    /// Drops the table and the test's inbox rows when the test ends.
    _clean: common::PgTable,
    queue: String,
}

async fn setup(test: &str) -> Option<Env> {
    let amqp = common::service_url("AMQP_URL", test)?;
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
    Some(Env {
        amqp,
        pool,
        table,
        _clean: clean,
        queue: common::unique("q"),
    })
}

async fn channel(url: &str) -> (Connection, Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ does not answer");
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(4, BasicQosOptions::default()).await.unwrap();
    (conn, ch)
}

/// Declares the queue, dead-lettering into `<queue>.dead`.
async fn declare(ch: &Channel, queue: &str) {
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
    ch.queue_declare(queue.into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
}

async fn cleanup(ch: &Channel, queue: &str) {
    for q in [queue.to_owned(), format!("{queue}.dead")] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

async fn publish(ch: &Channel, queue: &str, id: Option<&str>, body: &[u8]) {
    let mut props = BasicProperties::default();
    if let Some(id) = id {
        props = props.with_message_id(id.into());
    }
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
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

async fn effects(env: &Env, id: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM {} WHERE message_id = $1",
        env.table
    ))
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

fn config(consumer: &str, max: u32) -> InboxConfig {
    common::remember(consumer);
    InboxConfig::builder(consumer)
        .max_attempts(max)
        .build()
        .unwrap()
}

/// Consumes and settles deliveries until `settled` of them were acked or
/// dead-lettered (bounded by the test limit).
async fn work(
    ch: &Channel,
    queue: &str,
    inbox: &PostgresInbox,
    table: &str,
    fail: &Arc<AtomicU32>,
    settled: usize,
) {
    let tag = common::unique("tag");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut done = 0;
    common::bounded("consume", async {
        while done < settled {
            let delivery = consumer.next().await.expect("consumer ended").unwrap();
            let message = rabbitmq::message(&delivery);
            let outcome = inbox
                .process(&message, ledger(table.to_owned(), fail.clone()))
                .await;
            let d = rabbitmq::settle(&delivery, &outcome).await.unwrap();
            if !matches!(d, inbox_consumer::Disposition::Requeue { .. }) {
                done += 1;
            }
        }
    })
    .await;
    ch.basic_cancel(tag.as_str().into(), Default::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn the_same_id_published_five_times_gives_one_effect() {
    let Some(env) = setup("the_same_id_published_five_times_gives_one_effect").await else {
        return;
    };
    let (_conn, ch) = channel(&env.amqp).await;
    declare(&ch, &env.queue).await;
    for _ in 0..5 {
        publish(&ch, &env.queue, Some("pay-1"), &common::payment("a", 5)).await;
    }
    let inbox = Inbox::postgres(env.pool.clone(), config(&common::unique("ledger"), 5))
        .await
        .unwrap();
    work(&ch, &env.queue, &inbox, &env.table, &Arc::default(), 5).await;
    assert_eq!(effects(&env, "pay-1").await, 1);
    let m = inbox.metrics();
    assert_eq!((m.processed, m.duplicate), (1, 4));
    cleanup(&ch, &env.queue).await;
}

#[tokio::test]
async fn a_crash_between_commit_and_ack_is_acked_as_a_duplicate() {
    let Some(env) = setup("a_crash_between_commit_and_ack").await else {
        return;
    };
    let (_c, ch) = channel(&env.amqp).await;
    declare(&ch, &env.queue).await;
    publish(&ch, &env.queue, Some("pay-2"), &common::payment("a", 5)).await;
    let inbox = Inbox::postgres(env.pool.clone(), config(&common::unique("ledger"), 5))
        .await
        .unwrap();

    // First life: commit, then die before the ack.
    let (conn, ch1) = channel(&env.amqp).await;
    let mut consumer = ch1
        .basic_consume(
            env.queue.as_str().into(),
            "first".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = common::bounded("first delivery", consumer.next())
        .await
        .unwrap()
        .unwrap();
    let outcome = inbox
        .process(
            &rabbitmq::message(&delivery),
            ledger(env.table.clone(), Arc::default()),
        )
        .await;
    assert!(matches!(outcome, Outcome::Processed { .. }), "{outcome:?}");
    conn.close(320, "simulated crash".into()).await.unwrap();

    // Second life: the redelivery is a duplicate, acked.
    let (_c2, ch2) = channel(&env.amqp).await;
    let mut consumer = ch2
        .basic_consume(
            env.queue.as_str().into(),
            "second".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = common::bounded("redelivery", consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert!(delivery.redelivered);
    let outcome = inbox
        .process(
            &rabbitmq::message(&delivery),
            ledger(env.table.clone(), Arc::default()),
        )
        .await;
    assert!(matches!(outcome, Outcome::Duplicate), "{outcome:?}");
    assert_eq!(
        rabbitmq::settle(&delivery, &outcome).await.unwrap(),
        inbox_consumer::Disposition::Ack
    );
    assert_eq!(effects(&env, "pay-2").await, 1);
    cleanup(&ch, &env.queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_with_duplicates_give_one_effect_per_id() {
    let Some(env) = setup("two_consumers_with_duplicates").await else {
        return;
    };
    let (_c, ch) = channel(&env.amqp).await;
    declare(&ch, &env.queue).await;
    for round in 0..3 {
        for i in 0..10 {
            let _ = round;
            publish(
                &ch,
                &env.queue,
                Some(&format!("pay-{i}")),
                &common::payment("a", i),
            )
            .await;
        }
    }
    let name = common::consumer("ledger");
    let env = Arc::new(env);
    let total = Arc::new(AtomicU32::new(0));
    let workers = (0..2).map(|_| {
        let (env, name, total) = (env.clone(), name.clone(), total.clone());
        tokio::spawn(async move {
            let inbox = Inbox::postgres(env.pool.clone(), config(&name, 5))
                .await
                .unwrap();
            let (_conn, ch) = channel(&env.amqp).await;
            let mut consumer = ch
                .basic_consume(
                    env.queue.as_str().into(),
                    common::unique("w").as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            common::bounded("worker", async {
                while total.load(Ordering::SeqCst) < 30 {
                    let Ok(Some(delivery)) =
                        tokio::time::timeout(Duration::from_millis(300), consumer.next()).await
                    else {
                        continue;
                    };
                    let delivery = delivery.unwrap();
                    let outcome = inbox
                        .process(
                            &rabbitmq::message(&delivery),
                            ledger(env.table.clone(), Arc::default()),
                        )
                        .await;
                    rabbitmq::settle(&delivery, &outcome).await.unwrap();
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
        assert_eq!(effects(&env, &format!("pay-{i}")).await, 1, "pay-{i}");
    }
    cleanup(&ch, &env.queue).await;
}

#[tokio::test]
async fn a_handler_failing_twice_then_succeeding_gives_one_effect_and_three_attempts() {
    let Some(env) = setup("a_handler_failing_twice").await else {
        return;
    };
    let (_c, ch) = channel(&env.amqp).await;
    declare(&ch, &env.queue).await;
    publish(&ch, &env.queue, Some("pay-3"), &common::payment("a", 5)).await;
    let inbox = Inbox::postgres(env.pool.clone(), config(&common::unique("ledger"), 5))
        .await
        .unwrap();
    let fail = Arc::new(AtomicU32::new(2));
    work(&ch, &env.queue, &inbox, &env.table, &fail, 1).await;
    assert_eq!(effects(&env, "pay-3").await, 1);
    assert_eq!(inbox.attempts("pay-3").await.unwrap(), Some(3));
    assert_eq!(inbox.metrics().failed, 2);
    cleanup(&ch, &env.queue).await;
}

#[tokio::test]
async fn a_poison_message_goes_dead_and_the_messages_behind_it_process() {
    let Some(env) = setup("a_poison_message_goes_dead").await else {
        return;
    };
    let (_c, ch) = channel(&env.amqp).await;
    declare(&ch, &env.queue).await;
    // Transient failures forever (the shared counter never runs out).
    publish(&ch, &env.queue, Some("poison"), &common::payment("a", 1)).await;
    publish(&ch, &env.queue, None, &common::payment("a", 1)).await;
    publish(&ch, &env.queue, Some("undecodable"), b"{").await;
    for i in 0..3 {
        publish(
            &ch,
            &env.queue,
            Some(&format!("ok-{i}")),
            &common::payment("a", i),
        )
        .await;
    }
    let inbox = Inbox::postgres(env.pool.clone(), config(&common::unique("ledger"), 3))
        .await
        .unwrap();
    let poison_only = Arc::new(AtomicU32::new(0));
    // A handler that fails for "poison" only.
    let tag = common::unique("tag");
    let mut consumer = ch
        .basic_consume(
            env.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut settled = 0;
    common::bounded("consume", async {
        while settled < 6 {
            let delivery = consumer.next().await.unwrap().unwrap();
            let message = rabbitmq::message(&delivery);
            let fail = if message.id() == Some("poison") {
                Arc::new(AtomicU32::new(1))
            } else {
                poison_only.clone()
            };
            let outcome = inbox
                .process(&message, ledger(env.table.clone(), fail))
                .await;
            if !matches!(
                rabbitmq::settle(&delivery, &outcome).await.unwrap(),
                inbox_consumer::Disposition::Requeue { .. }
            ) {
                settled += 1;
            }
        }
    })
    .await;
    for i in 0..3 {
        assert_eq!(effects(&env, &format!("ok-{i}")).await, 1);
    }
    assert_eq!(effects(&env, "poison").await, 0);
    assert_eq!(inbox.metrics().dead, 3);
    assert_eq!(inbox.attempts("poison").await.unwrap(), Some(3));
    // Rejected without requeue, the three went to the dead-letter queue.
    let dead = format!("{}.dead", env.queue);
    let mut ids = Vec::new();
    common::bounded("dead letters", async {
        while ids.len() < 3 {
            match ch
                .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                Some(m) => ids.push(
                    m.delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|s| s.to_string()),
                ),
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    ids.sort();
    assert_eq!(
        ids,
        [
            None,
            Some("poison".to_owned()),
            Some("undecodable".to_owned())
        ]
    );
    cleanup(&ch, &env.queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_reconnects_after_a_cut_and_every_message_runs_once() {
    let Some(env) = setup("rabbitmq_the_subscription_reconnects").await else {
        return;
    };
    let (_conn, ch) = channel(&env.amqp).await;
    declare(&ch, &env.queue).await;
    for i in 0..30 {
        publish(
            &ch,
            &env.queue,
            Some(&format!("m{i}")),
            &common::payment("a", i),
        )
        .await;
    }
    let proxy = test_support::Proxy::start(test_support::host_port(&env.amqp, 5672)).await;
    let name = common::consumer("ledger");
    let inbox = Inbox::postgres(env.pool.clone(), config(&name, 5))
        .await
        .unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let running = {
        let subscription = rabbitmq::Subscription::new(
            test_support::via(&env.amqp, proxy.addr),
            env.queue.as_str(),
        )
        .consumer_tag(name.as_str())
        .prefetch(4)
        .backoff(Duration::from_millis(50), Duration::from_millis(400));
        let (inbox, table, stop) = (inbox.clone(), env.table.clone(), stop.clone());
        tokio::spawn(async move {
            subscription
                .run(
                    |message| {
                        let (inbox, table) = (inbox.clone(), table.clone());
                        async move {
                            // Slow enough for the cut to land mid-stream.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            inbox.process(&message, ledger(table, Arc::default())).await
                        }
                    },
                    async move { stop.notified().await },
                )
                .await
        })
    };
    let rows = || async {
        sqlx::query_scalar::<_, i64>(&format!("SELECT COUNT(*) FROM {}", env.table))
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    test_support::eventually("some ran before the cut", || async { rows().await >= 5 }).await;
    proxy.cut();
    for i in 30..40 {
        publish(
            &ch,
            &env.queue,
            Some(&format!("m{i}")),
            &common::payment("a", i),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();
    test_support::eventually("all ran after the cut", || async { rows().await >= 40 }).await;
    // The queue is empty once the redeliveries were acked as duplicates.
    test_support::eventually("the queue drained", || async {
        ch.queue_declare(
            env.queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
            == 0
    })
    .await;
    for i in 0..40 {
        assert_eq!(effects(&env, &format!("m{i}")).await, 1, "m{i}");
    }
    assert_eq!(rows().await, 40);

    stop.notify_one();
    common::bounded("the subscription stops", running)
        .await
        .unwrap()
        .unwrap();
    cleanup(&ch, &env.queue).await;
}
