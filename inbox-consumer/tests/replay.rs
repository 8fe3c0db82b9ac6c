//! Replays of dead messages on PostgreSQL (`DATABASE_URL`; skipped, saying
//! so, when unset): a dead message keeps its payload and headers; a replay
//! an operator asks for (what `messaging-admin inbox retry` writes) goes
//! through the inbox with the consumer's handler, once; a replay of a
//! message processed meanwhile is a duplicate.
#![cfg(feature = "postgres")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use inbox_consumer::{HandlerError, Inbox, InboxConfig, InboxMessage, Outcome, PostgresInbox};
use sqlx::PgPool;
use test_support::{bounded, service_url, unique};

/// What `messaging-admin inbox retry` does to a dead message.
async fn ask_replay(pool: &PgPool, consumer: &str, id: &str) -> u64 {
    sqlx::query(
        "UPDATE inbox_consumer.attempts SET dead = false, failures = 0, replay_at = now(), \
         updated_at = now() WHERE consumer = $1 AND message_id = $2 AND dead",
    )
    .bind(consumer)
    .bind(id)
    .execute(pool)
    .await
    .unwrap()
    .rows_affected()
}

async fn process(
    inbox: &PostgresInbox,
    table: &str,
    broken: &AtomicBool,
    m: &InboxMessage,
) -> Outcome {
    let broken = broken.load(Ordering::SeqCst);
    let sql = format!("INSERT INTO {table} (message_id, trace) VALUES ($1, $2)");
    inbox
        .process(m, move |tx, m| {
            Box::pin(async move {
                if broken {
                    return Err(HandlerError::transient("the ledger is closed"));
                }
                sqlx::query(&sql)
                    .bind(m.id())
                    .bind(m.header("traceparent"))
                    .execute(&mut **tx)
                    .await?;
                Ok::<_, HandlerError>(())
            })
        })
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_message_replayed_runs_once_through_the_inbox() {
    let Some(url) = service_url(
        "DATABASE_URL",
        "a_dead_message_replayed_runs_once_through_the_inbox",
    ) else {
        return;
    };
    let pool = PgPool::connect(&url).await.unwrap();
    let table = unique("replayed");
    sqlx::query(&format!(
        "CREATE TABLE {table} (message_id TEXT NOT NULL, trace TEXT)"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let consumer = unique("replays");
    let config = InboxConfig::builder(consumer.clone())
        .max_attempts(2)
        .build()
        .unwrap();
    let inbox = Inbox::postgres(pool.clone(), config).await.unwrap();
    let broken = Arc::new(AtomicBool::new(true));
    let message = InboxMessage::new(Some("m-1".into()), &b"{\"amount\":5}"[..]).with_header(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );

    assert!(matches!(
        process(&inbox, &table, &broken, &message).await,
        Outcome::Failed { .. }
    ));
    assert!(matches!(
        process(&inbox, &table, &broken, &message).await,
        Outcome::Dead { .. }
    ));
    let (dead, payload, headers): (bool, Vec<u8>, String) = sqlx::query_as(
        "SELECT dead, payload, headers::text FROM inbox_consumer.attempts \
         WHERE consumer = $1 AND message_id = 'm-1'",
    )
    .bind(&consumer)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        dead,
        "the dead mark is written when the attempts are used up"
    );
    assert_eq!(payload, b"{\"amount\":5}");
    assert!(headers.contains("traceparent"));
    // Nothing to replay until an operator asks.
    assert!(inbox.replays(10).await.unwrap().is_empty());

    broken.store(false, Ordering::SeqCst);
    assert_eq!(ask_replay(&pool, &consumer, "m-1").await, 1);
    assert_eq!(ask_replay(&pool, &consumer, "m-1").await, 0, "asked once");
    let (inbox2, table2, broken2) = (inbox.clone(), table.clone(), Arc::clone(&broken));
    let runner = tokio::spawn(async move {
        let (inbox, table, broken) = (&inbox2, &table2, &broken2);
        inbox
            .run_replays(
                |m| async move { process(inbox, table, broken, &m).await },
                Duration::from_millis(20),
                tokio::time::sleep(Duration::from_millis(600)),
            )
            .await;
    });
    bounded("the replay runner", runner).await.unwrap();
    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as(&format!("SELECT message_id, trace FROM {table}"))
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 1, "replayed once: {rows:?}");
    assert!(
        rows[0].1.as_deref().unwrap().starts_with("00-0af7"),
        "its headers came back"
    );
    assert!(
        inbox.replays(10).await.unwrap().is_empty(),
        "the request is done"
    );

    // A redelivery from the broker now is a duplicate.
    assert!(matches!(
        process(&inbox, &table, &broken, &message).await,
        Outcome::Duplicate
    ));
    // So is a replay asked for after it was processed (written by hand:
    // the message is not dead any more, so the admin would not ask).
    sqlx::query("UPDATE inbox_consumer.attempts SET replay_at = now() WHERE consumer = $1")
        .bind(&consumer)
        .execute(&pool)
        .await
        .unwrap();
    let replays = inbox.replays(10).await.unwrap();
    assert_eq!(replays.len(), 1);
    let outcome = process(&inbox, &table, &broken, &replays[0]).await;
    assert!(matches!(outcome, Outcome::Duplicate));
    inbox.replayed("m-1", &outcome).await.unwrap();
    assert!(inbox.replays(10).await.unwrap().is_empty());
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .unwrap();
    // Nothing left behind in the shared database.
    for sql in [
        "DELETE FROM inbox_consumer.messages WHERE consumer = $1",
        "DELETE FROM inbox_consumer.attempts WHERE consumer = $1",
    ] {
        sqlx::query(sql)
            .bind(&consumer)
            .execute(&pool)
            .await
            .unwrap();
    }
}
