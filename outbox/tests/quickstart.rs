//! The crate doc's quick start ("Quick start: PostgreSQL and RabbitMQ"),
//! run: [`quick_start`] is the doc block, character for character (checked
//! here), run against the doc's own services (PostgreSQL
//! `postgres://postgres@127.0.0.1:5432/test`, RabbitMQ
//! `amqp://guest:guest@127.0.0.1:5672/%2f`) when `DATABASE_URL` and
//! `AMQP_URL` are set, twice (as a user trying it would). Each run's
//! shutdown resolves once its event is in the queue `payments`; the test
//! then checks each event reached the queue once, and deletes the payments
//! and events the runs made and takes their messages (other messages of
//! `payments` go back to the queue).
#![cfg(all(feature = "postgres", feature = "rabbitmq"))]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use sqlx::PgPool;

/// The doc block (between the markers), as a function.
#[rustfmt::skip]
async fn quick_start(shutdown: impl std::future::Future<Output = ()>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // quick start: begin
    use outbox::{rabbitmq::RabbitMqPublisher, Event, PostgresRelay, RelayConfig};

    let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?;
    outbox::migrate_postgres(&pool).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS outbox_quickstart_payments (id TEXT PRIMARY KEY, amount BIGINT NOT NULL)")
        .execute(&pool)
        .await?;

    // The producer: the change and its event commit together, or not at all.
    let id = outbox::Uuid::now_v7().to_string();
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO outbox_quickstart_payments (id, amount) VALUES ($1, $2)")
        .bind(&id)
        .bind(100_i64)
        .execute(&mut *tx)
        .await?;
    let event = Event::new("payments", format!(r#"{{"id":"{id}","amount":100}}"#))
        .with_ordering_key("acct-1")
        .with_header("content-type", "application/json");
    outbox::enqueue(&mut *tx, &event).await?;
    tx.commit().await?;

    // The relay (any number of them, anywhere): destination `payments` goes to
    // the durable queue `payments`, message_id = the event id.
    let publisher = RabbitMqPublisher::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
    let relay = PostgresRelay::new(pool, publisher, RelayConfig::default());
    // Until `shutdown` resolves (SIGTERM, say); then it finishes the batch in hand.
    relay.run(shutdown).await?;
    // quick start: end
    Ok(())
}

#[test]
fn the_quick_start_function_is_the_doc_block() {
    let doc = test_support::quickstart::doc_block(
        include_str!("../src/lib.rs"),
        "# Quick start: PostgreSQL and RabbitMQ",
    );
    let body = test_support::quickstart::between_markers(
        include_str!("quickstart.rs"),
        "// quick start: begin",
        "// quick start: end",
    );
    assert!(!doc.is_empty() && !body.is_empty());
    assert!(
        doc == body,
        "the quick start in outbox/src/lib.rs differs from quick_start in \
         outbox/tests/quickstart.rs: edit both together\n--- doc\n{doc}--- test\n{body}"
    );
}

/// The messages taken from `payments`: the ones of this test (acked) and the
/// others (held unacked, put back at the end).
#[derive(Default)]
struct Taken {
    ours: Vec<BasicGetMessage>,
    others: Vec<BasicGetMessage>,
}

/// Takes every message now in `payments`; ours carry `payload`.
async fn sweep(ch: &Channel, payload: &[u8], taken: &mut Taken) {
    while let Some(got) = ch
        .basic_get("payments".into(), BasicGetOptions { no_ack: false })
        .await
        .expect("basic.get on payments")
    {
        if got.delivery.data == payload {
            got.delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
            taken.ours.push(got);
        } else {
            taken.others.push(got);
        }
    }
}

/// One run of the quick start: its outcome, the payment it made and what it
/// put in the queue (with the others' messages taken meanwhile).
struct Run {
    ran: Result<(), String>,
    id: Option<String>,
    taken: Taken,
}

/// Runs the quick start until its event is in `payments`, then takes what
/// else comes (a second copy would).
async fn run(pool: &PgPool, ch: &Channel) -> Run {
    let before: Vec<String> = sqlx::query_scalar("SELECT id FROM outbox_quickstart_payments")
        .fetch_all(pool)
        .await
        .unwrap();
    let seen: Arc<Mutex<(Option<String>, Taken)>> = Arc::default();
    let shutdown = {
        let (pool, ch, seen) = (pool.clone(), ch.clone(), seen.clone());
        async move {
            let wait = async {
                // The payment the quick start made: the id it generated.
                let id = loop {
                    let new: Option<String> = sqlx::query_scalar(
                        "SELECT id FROM outbox_quickstart_payments WHERE NOT (id = ANY($1))",
                    )
                    .bind(&before)
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
                    if let Some(id) = new {
                        break id;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                let payload = format!(r#"{{"id":"{id}","amount":100}}"#);
                seen.lock().unwrap().0 = Some(id);
                let mut taken = Taken::default();
                while taken.ours.is_empty() {
                    sweep(&ch, payload.as_bytes(), &mut taken).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                seen.lock().unwrap().1 = taken;
            };
            // A broken quick start fails the test, it never hangs.
            let _ = tokio::time::timeout(common::LIMIT, wait).await;
        }
    };
    let ran = common::bounded("the quick start", quick_start(shutdown))
        .await
        .map_err(|e| e.to_string());
    let (id, mut taken) = std::mem::take(&mut *seen.lock().unwrap());
    if let Some(id) = &id {
        // A second copy would come now, if any.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let payload = format!(r#"{{"id":"{id}","amount":100}}"#);
        sweep(ch, payload.as_bytes(), &mut taken).await;
    }
    Run { ran, id, taken }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_runs_twice_and_publishes_each_event_once() {
    const TEST: &str = "the_quick_start_runs_twice_and_publishes_each_event_once";
    let Some(db) = common::service_url("DATABASE_URL", TEST) else {
        return;
    };
    let Some(amqp) = common::service_url("AMQP_URL", TEST) else {
        return;
    };
    let pool = PgPool::connect(&db).await.expect("PostgreSQL");
    sqlx::query("CREATE TABLE IF NOT EXISTS outbox_quickstart_payments (id TEXT PRIMARY KEY, amount BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let conn = Connection::connect(&amqp, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "payments".into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();

    // Twice, as a user trying it would: the second run must work too.
    let mut runs = vec![run(&pool, &ch).await];
    runs.push(run(&pool, &ch).await);

    // What each run left in the database.
    let mut found = Vec::new();
    for r in &runs {
        let Some(id) = &r.id else { continue };
        let payload = format!(r#"{{"id":"{id}","amount":100}}"#);
        let events: Vec<(String, bool)> = sqlx::query_as(
            "SELECT id::text, published_at IS NOT NULL FROM outbox.events \
             WHERE destination = 'payments' AND payload = $1",
        )
        .bind(payload.as_bytes())
        .fetch_all(&pool)
        .await
        .unwrap();
        let payments: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox_quickstart_payments WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        found.push((events, payments));
    }

    // Clean up before asserting: the payments, their events, the others'
    // messages (back to the queue).
    for got in runs.iter().flat_map(|r| &r.taken.others) {
        let _ = got
            .delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await;
    }
    for id in runs.iter().filter_map(|r| r.id.as_ref()) {
        let payload = format!(r#"{{"id":"{id}","amount":100}}"#);
        sqlx::query("DELETE FROM outbox_quickstart_payments WHERE id = $1")
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("DELETE FROM outbox.events WHERE destination = 'payments' AND payload = $1")
            .bind(payload.as_bytes())
            .execute(&pool)
            .await
            .unwrap();
    }
    let _ = conn.close(200, "done".into()).await;

    for (n, r) in runs.iter().enumerate() {
        let n = n + 1;
        if let Err(e) = &r.ran {
            panic!("run {n} of the quick start failed: {e}");
        }
        assert!(r.id.is_some(), "run {n} inserted no payment");
    }
    assert_ne!(runs[0].id, runs[1].id, "each run its own payment");
    for (r, (events, payments)) in runs.iter().zip(&found) {
        assert_eq!(*payments, 1, "one payment row");
        assert_eq!(events.len(), 1, "one event enqueued: {events:?}");
        assert!(events[0].1, "the event is marked published");
        assert_eq!(r.taken.ours.len(), 1, "the event reached the queue once");
        let message_id = r.taken.ours[0].delivery.properties.message_id().clone();
        assert_eq!(
            message_id.map(|s| s.as_str().to_owned()),
            Some(events[0].0.clone()),
            "message_id = the event id"
        );
    }
}
