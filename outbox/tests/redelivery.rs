//! A relay that dies between the broker's confirmation and its mark: the
//! next relay publishes the event again (at least once), and the consumer's
//! inbox drops the copy, so the effect happens once. Real RabbitMQ
//! (`AMQP_URL`) and PostgreSQL (`DATABASE_URL`); the crash is placed
//! deterministically by a publisher that wraps the real one.
#![cfg(all(feature = "rabbitmq", feature = "postgres"))]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::PgEnv;
use futures_util::StreamExt;
use inbox_consumer::{rabbitmq, HandlerError, Inbox, InboxConfig, Outcome};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use outbox::rabbitmq::RabbitMqPublisher;
use outbox::{Event, Outgoing, PostgresRelay, PublishError, Publisher, RelayConfig};
use tokio::sync::mpsc;

/// The real publisher; while `crash` is set, once the broker has confirmed
/// a whole batch it reports the confirmed ids and never returns, as a relay
/// process that dies before its mark commits.
struct CrashAfterConfirm {
    inner: RabbitMqPublisher,
    crash: AtomicBool,
    confirmed: mpsc::UnboundedSender<Vec<outbox::Uuid>>,
}

impl Publisher for CrashAfterConfirm {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        let results = self.inner.publish(batch).await;
        if self.crash.load(Ordering::SeqCst) && results.iter().all(Result::is_ok) {
            let ids = batch.iter().map(|o| o.event().id()).collect();
            let _ = self.confirmed.send(ids);
            std::future::pending::<()>().await;
        }
        results
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_killed_after_the_confirm_republishes_and_the_inbox_drops_the_copy() {
    let test = "a_relay_killed_after_the_confirm_republishes";
    let Some(amqp) = common::service_url("AMQP_URL", test) else {
        return;
    };
    let Some(env) = PgEnv::new(test).await else {
        return;
    };
    let queue = common::unique("outbox_redelivery_q");
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

    // The consumer side: a ledger whose rows only the inbox keeps single.
    sqlx::query(
        "CREATE TABLE ledger_entries (account TEXT NOT NULL, amount BIGINT NOT NULL, \
         message_id TEXT NOT NULL)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let inbox = Inbox::postgres(
        env.pool.clone(),
        InboxConfig::builder(common::unique("ledger"))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();

    let event = Event::new(
        queue.as_str(),
        &br#"{"account":"pay_redelivered","amount":4200}"#[..],
    );
    env.enqueue(&event).await;
    let config = RelayConfig::builder()
        .poll_interval(Duration::from_millis(50))
        .outage_delay(Duration::from_millis(50))
        .build()
        .unwrap();

    // Relay 1, on a pool of its own (its "process"): publishes, the broker
    // confirms, and it dies before the mark.
    let own_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with((*env.pool.connect_options()).clone())
        .await
        .unwrap();
    let (tx, mut confirmed) = mpsc::unbounded_channel();
    let doomed = PostgresRelay::new(
        own_pool.clone(),
        CrashAfterConfirm {
            inner: RabbitMqPublisher::connect(amqp.as_str()).await.unwrap(),
            crash: AtomicBool::new(true),
            confirmed: tx,
        },
        config.clone(),
    );
    let running = tokio::spawn(async move { doomed.run_once().await });
    let ids = common::bounded("the broker's confirm", confirmed.recv())
        .await
        .expect("a confirmed batch");
    assert_eq!(ids, vec![event.id()]);
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    // The process is gone: its connections close, its transaction rolls back.
    common::bounded("closing the dead relay's pool", own_pool.close()).await;
    let (attempts, dead, _, published) = env.state(event.id()).await;
    assert_eq!(
        (attempts, dead, published),
        (0, false, false),
        "the crash left the event waiting"
    );

    // Relay 2 publishes it again.
    let survivor = PostgresRelay::new(
        env.pool.clone(),
        RabbitMqPublisher::connect(amqp.as_str()).await.unwrap(),
        config,
    );
    common::bounded("the republish", async {
        loop {
            let report = survivor.run_once().await.unwrap();
            if report.published == 1 {
                break;
            }
            assert_eq!(report.claimed, 0, "{report:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(env.state(event.id()).await.3, "marked published");

    // The consumer gets both copies: the first is processed, the copy is a
    // duplicate; one ledger row.
    let mut deliveries = ch
        .basic_consume(
            queue.as_str().into(),
            "redelivery-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let delivery = common::bounded("a delivery", deliveries.next())
            .await
            .expect("the consumer is open")
            .expect("a delivery");
        let message = rabbitmq::message(&delivery);
        assert_eq!(message.id(), Some(event.id().to_string().as_str()));
        let outcome = inbox
            .process(&message, |tx, message| {
                Box::pin(async move {
                    let entry: serde_json::Value = serde_json::from_slice(message.payload())
                        .map_err(HandlerError::permanent)?;
                    sqlx::query(
                        "INSERT INTO ledger_entries (account, amount, message_id) \
                         VALUES ($1, $2, $3)",
                    )
                    .bind(entry["account"].as_str())
                    .bind(entry["amount"].as_i64())
                    .bind(message.id())
                    .execute(&mut **tx)
                    .await?;
                    Ok(())
                })
            })
            .await;
        rabbitmq::settle(&delivery, &outcome).await.unwrap();
        outcomes.push(outcome);
    }
    assert!(
        matches!(
            outcomes.as_slice(),
            [Outcome::Processed { attempt: 1 }, Outcome::Duplicate]
        ),
        "{outcomes:?}"
    );
    let rows: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT account, amount, message_id FROM ledger_entries")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![("pay_redelivered".to_owned(), 4200, event.id().to_string())]
    );
    let metrics = inbox.metrics();
    assert_eq!((metrics.processed, metrics.duplicate), (1, 1));
    // Nothing else is on its way.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ch2 = conn.create_channel().await.unwrap();
    let left = ch2
        .basic_get(queue.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap();
    assert!(left.is_none(), "a third copy");

    let _ = ch2
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    drop(inbox);
    env.finish().await;
}
