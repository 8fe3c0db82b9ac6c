//! The crate doc's quick starts, run: each function below is its doc block,
//! character for character (checked here).
//!
//! - "Quick start: PostgreSQL and RabbitMQ (transactional mode)" runs
//!   against the doc's own services (PostgreSQL
//!   `postgres://postgres@127.0.0.1:5432/test`, RabbitMQ
//!   `amqp://guest:guest@127.0.0.1:5672/%2f`) when `DATABASE_URL` and
//!   `AMQP_URL` are set: the test publishes one message twice to the queue
//!   `payments`, then a second message; once the second one's ledger row
//!   exists the shutdown resolves, and the first must have made one row.
//!   It deletes the ledger rows and the inbox rows of its message ids, and
//!   takes its messages back from the queue if any were left.
//! - "Quick start: any idempotency store (lease mode)" runs as is.

mod common;

/// The transactional quick start (between the markers), as a function.
#[cfg(all(feature = "postgres", feature = "rabbitmq"))]
#[rustfmt::skip]
async fn transactional_quick_start(shutdown: impl std::future::Future<Output = ()>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // quick start: begin transactional
    use inbox_consumer::{rabbitmq, HandlerError, Inbox, InboxConfig};

    let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?;
    // The handler's own table (the inbox creates its schema `inbox_consumer`).
    sqlx::query("CREATE TABLE IF NOT EXISTS ledger_entries (account TEXT NOT NULL, amount BIGINT NOT NULL, message_id TEXT NOT NULL)")
        .execute(&pool)
        .await?;
    let inbox = Inbox::postgres(pool, InboxConfig::builder("ledger").build()?).await?;

    let inbox = &inbox;
    // Owns its connection: reconnects and subscribes again after a loss.
    rabbitmq::Subscription::new("amqp://guest:guest@127.0.0.1:5672/%2f", "payments")
        .consumer_tag("ledger")
        .run(
            |message| async move {
                inbox
                    .process(&message, |tx, message| {
                        Box::pin(async move {
                            // The effect commits in the inbox's transaction, or not at all.
                            sqlx::query("INSERT INTO ledger_entries (account, amount, message_id) VALUES ($1, $2, $3)")
                                .bind("acct-1")
                                .bind(100_i64)
                                .bind(message.id())
                                .execute(&mut **tx)
                                .await?;
                            Ok::<_, HandlerError>(())
                        })
                    })
                    .await
            },
            // Until it resolves (Ctrl-C, SIGTERM); the delivery in hand is finished first.
            shutdown,
        )
        .await?;
    // quick start: end transactional
    Ok(())
}

/// The lease-mode quick start (between the markers), as a function.
#[rustfmt::skip]
async fn lease_quick_start() -> Result<(), Box<dyn std::error::Error>> {
    // quick start: begin lease
    use inbox_consumer::{Inbox, InboxConfig, InboxMessage};
    use idempotency_core::MemoryStore;

    let inbox = Inbox::lease(MemoryStore::new(), InboxConfig::builder("mailer").build()?);
    let message = InboxMessage::new(Some("msg-1".into()), &b"{}"[..]);
    for _ in 0..3 {
        inbox.process(&message, |_message| Box::pin(async { /* send the mail */ Ok(()) })).await;
    }
    assert_eq!(inbox.metrics().processed, 1);
    assert_eq!(inbox.metrics().duplicate, 2);
    // quick start: end lease
    Ok(())
}

/// The lines between the markers `// quick start: begin {name}` and
/// `// quick start: end {name}` of this file, unindented by 4.
fn function_body(source: &str, name: &str) -> String {
    test_support::quickstart::between_markers(
        source,
        &format!("// quick start: begin {name}"),
        &format!("// quick start: end {name}"),
    )
}

#[test]
fn the_quick_start_functions_are_the_doc_blocks() {
    for (heading, name) in [
        (
            "# Quick start: PostgreSQL and RabbitMQ (transactional mode)",
            "transactional",
        ),
        ("# Quick start: any idempotency store (lease mode)", "lease"),
    ] {
        let doc = test_support::quickstart::doc_block(include_str!("../src/lib.rs"), heading);
        let body = function_body(include_str!("quickstart.rs"), name);
        assert!(!doc.is_empty() && !body.is_empty(), "{name}: nothing found");
        assert!(
            doc == body,
            "the quick start \"{heading}\" in inbox-consumer/src/lib.rs differs from \
             {name}_quick_start in inbox-consumer/tests/quickstart.rs: edit both together\n\
             --- doc\n{doc}--- test\n{body}"
        );
    }
}

#[tokio::test]
async fn the_lease_quick_start_runs() {
    lease_quick_start().await.expect("the lease quick start");
}

#[cfg(all(feature = "postgres", feature = "rabbitmq"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transactional_quick_start_makes_one_ledger_row_for_a_message_delivered_twice() {
    use std::time::Duration;

    use lapin::options::{
        BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
        QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    const TEST: &str =
        "the_transactional_quick_start_makes_one_ledger_row_for_a_message_delivered_twice";
    let Some(db) = common::service_url("DATABASE_URL", TEST) else {
        return;
    };
    let Some(amqp) = common::service_url("AMQP_URL", TEST) else {
        return;
    };
    let pool = sqlx::PgPool::connect(&db).await.expect("PostgreSQL");
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
    // `payments` is the quick start's queue: our messages are told apart by
    // their ids, unique to this run.
    let twice = common::unique("quickstart_twice");
    let last = common::unique("quickstart_last");
    for id in [&twice, &twice, &last] {
        ch.basic_publish(
            "".into(),
            "payments".into(),
            BasicPublishOptions::default(),
            br#"{"amount":100}"#,
            BasicProperties::default().with_message_id(id.as_str().into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    let rows = |id: String| {
        let pool = pool.clone();
        async move {
            // The table may not exist before the quick start made it.
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM ledger_entries WHERE message_id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap_or(0)
        }
    };
    // Deliveries are handled one at a time, in order: once the last
    // message's row exists, both copies of the first were handled.
    let shutdown = {
        let last = last.clone();
        async move {
            let wait = async {
                while rows(last.clone()).await == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            // A broken quick start fails the test below, it never hangs.
            let _ = tokio::time::timeout(test_support::LIMIT, wait).await;
        }
    };
    let ran = common::bounded("the quick start", transactional_quick_start(shutdown)).await;

    let (twice_rows, last_rows) = (rows(twice.clone()).await, rows(last.clone()).await);
    let inbox_rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM inbox_consumer.messages \
         WHERE consumer = 'ledger' AND message_id = ANY($1)",
    )
    .bind([twice.as_str(), last.as_str()].as_slice())
    .fetch_one(&pool)
    .await
    .unwrap_or(0);
    // Clean up before asserting: our messages left in the queue (none if
    // all went well; the others' go back), our ledger and inbox rows.
    let mut left = 0;
    let mut others = Vec::new();
    while let Some(got) = ch
        .basic_get("payments".into(), BasicGetOptions { no_ack: false })
        .await
        .expect("basic.get on payments")
    {
        let id = got.delivery.properties.message_id().clone();
        if id.is_some_and(|id| [&twice, &last].contains(&&id.as_str().to_owned())) {
            left += 1;
            let _ = got.delivery.acker.ack(BasicAckOptions::default()).await;
        } else {
            others.push(got);
        }
    }
    for got in &others {
        let _ = got
            .delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await;
    }
    let ids = [twice.as_str(), last.as_str()];
    let _ = sqlx::query("DELETE FROM ledger_entries WHERE message_id = ANY($1)")
        .bind(ids.as_slice())
        .execute(&pool)
        .await;
    for table in ["messages", "attempts"] {
        sqlx::query(&format!(
            "DELETE FROM inbox_consumer.{table} WHERE consumer = 'ledger' AND message_id = ANY($1)"
        ))
        .bind(ids.as_slice())
        .execute(&pool)
        .await
        .unwrap();
    }
    let _ = conn.close(200, "done".into()).await;

    ran.expect("the quick start failed");
    assert_eq!(last_rows, 1, "the last message made one ledger row");
    assert_eq!(
        twice_rows, 1,
        "the message delivered twice made one ledger row"
    );
    assert_eq!(inbox_rows, 2, "the inbox remembers both ids");
    assert_eq!(left, 0, "all three deliveries were consumed");
}
