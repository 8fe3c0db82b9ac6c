//! An operator's retries through the example binaries, on a real
//! PostgreSQL (`DATABASE_URL`) and RabbitMQ (`AMQP_URL`); skipped, saying
//! so, when one is unset. `outbox-relay --max-attempts 1` lets an event
//! to a queue that does not exist die; `inbox-rabbitmq --max-attempts 1`
//! lets a message whose ledger row is refused die. Each is retried with
//! `messaging_admin` (what `messaging-admin ... retry` runs) after the fix,
//! and takes the normal path: the relay publishes the event, the consumer
//! replays the message through its inbox; one ledger row in the end.

use std::process::Stdio;
use std::time::Duration;

use messaging_admin::{Action, Actor, Admin, Area, Target};
use test_support::{eventually, service_url, unique, PgDatabase};
use tokio::process::{Child, Command};

fn start(binary: &str, args: &[&str]) -> Child {
    Command::new(binary)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary runs")
}

async fn count(db: &PgDatabase, sql: &str) -> i64 {
    db.count(sql).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_event_and_a_dead_message_retried_by_an_operator_make_one_ledger_row() {
    let test = "operator_retries";
    let Some(amqp) = service_url("AMQP_URL", test) else {
        return;
    };
    let Some(db) = PgDatabase::create(test).await else {
        return;
    };
    outbox::migrate_postgres(&db.pool).await.expect("outbox");
    // The event's destination: a queue nobody declared yet.
    let queue = unique("operator_q");
    let event = outbox::Event::new(queue.clone(), &br#"{"account":"acct-1","amount":-5}"#[..]);
    let mut tx = db.pool.begin().await.expect("begin");
    outbox::enqueue(&mut *tx, &event).await.expect("enqueue");
    tx.commit().await.expect("commit");
    let relay_queue = unique("operator_relay");
    let _relay = start(
        env!("CARGO_BIN_EXE_outbox-relay"),
        &[
            "--database",
            &db.url,
            "--broker",
            "rabbitmq",
            "--amqp",
            &amqp,
            "--queue",
            &relay_queue,
            "--max-attempts",
            "1",
            "--retry-delay",
            "10ms",
            "--poll-interval",
            "100ms",
        ],
    );
    eventually("the event dies (its queue does not exist)", || async {
        count(
            &db,
            "SELECT count(*) FROM outbox.events WHERE dead_at IS NOT NULL",
        )
        .await
            == 1
    })
    .await;

    // The ledger refuses negative amounts for now.
    sqlx::query(
        "CREATE TABLE ledger_entries (account TEXT NOT NULL, amount BIGINT NOT NULL \
         CONSTRAINT no_refunds_yet CHECK (amount > 0), message_id TEXT NOT NULL)",
    )
    .execute(&db.pool)
    .await
    .expect("the ledger");
    // The consumer declares the queue: the destination exists now.
    let _consumer = start(
        env!("CARGO_BIN_EXE_inbox-rabbitmq"),
        &[
            "--database",
            &db.url,
            "--amqp",
            &amqp,
            "--queue",
            &queue,
            "--consumer",
            "ledger",
            "--max-attempts",
            "1",
            "--retry-delay",
            "10ms",
            "--replay-interval",
            "100ms",
        ],
    );
    let admin = Admin::connect(&db.url, "idempotency").await.expect("admin");
    let ops = Actor {
        name: "ops@test".into(),
        via: "cli",
    };
    let id = event.id().to_string();
    // Once the consumer has declared its queue, the retry: the relay
    // publishes the event, once.
    let conn = lapin::Connection::connect(&amqp, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    eventually("the consumer declares its queue", || async {
        // A passive declare of a missing queue closes its channel: a new one each time.
        let Ok(ch) = conn.create_channel().await else {
            return false;
        };
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..lapin::options::QueueDeclareOptions::default()
        };
        ch.queue_declare(
            queue.as_str().into(),
            passive,
            lapin::types::FieldTable::default(),
        )
        .await
        .is_ok()
    })
    .await;
    let report = admin
        .act(
            &ops,
            Area::Outbox,
            Action::Retry,
            &Target::Ids {
                ids: vec![id.clone()],
                consumer: None,
            },
        )
        .await
        .expect("retry");
    assert_eq!(report.changed, vec![id.clone()]);
    eventually("the relay publishes the retried event", || async {
        count(
            &db,
            "SELECT count(*) FROM outbox.events WHERE published_at IS NOT NULL",
        )
        .await
            == 1
    })
    .await;

    // The consumer got it, the ledger refused it: dead in the inbox, payload kept.
    eventually("the message dies in the inbox", || async {
        count(
            &db,
            "SELECT count(*) FROM inbox_consumer.attempts WHERE dead AND payload IS NOT NULL",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(count(&db, "SELECT count(*) FROM ledger_entries").await, 0);

    // The fix, then the retry: the consumer replays it through its inbox.
    sqlx::query("ALTER TABLE ledger_entries DROP CONSTRAINT no_refunds_yet")
        .execute(&db.pool)
        .await
        .expect("the fix");
    let report = admin
        .act(
            &ops,
            Area::Inbox,
            Action::Retry,
            &Target::Ids {
                ids: vec![id.clone()],
                consumer: Some("ledger".into()),
            },
        )
        .await
        .expect("retry");
    assert_eq!(report.changed, vec![id.clone()]);
    eventually("the replay writes the ledger row", || async {
        count(&db, "SELECT count(*) FROM ledger_entries").await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&db, "SELECT count(*) FROM ledger_entries").await, 1);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM messaging_admin.audit WHERE cardinality(items) > 0"
        )
        .await,
        2,
        "one audited retry each"
    );
    drop((_relay, _consumer));
    {
        if let Ok(ch) = conn.create_channel().await {
            for q in [&queue, &relay_queue] {
                let _ = ch
                    .queue_delete(
                        q.as_str().into(),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await;
            }
        }
    }
    db.finish().await;
}
