//! The enqueue path on SQLite (a temporary file; always runs).
#![cfg(feature = "sqlite")]

mod common;

use std::time::Duration;

use outbox::{Event, EventError, OutboxError};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};

async fn pool() -> SqlitePool {
    let path = std::env::temp_dir().join(format!("{}.db", common::unique("outbox")));
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(2));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    outbox::migrate_sqlite(&pool).await.unwrap();
    // Twice is fine.
    outbox::migrate_sqlite(&pool).await.unwrap();
    pool
}

#[tokio::test]
async fn sqlite_commit_keeps_the_event_and_rollback_leaves_none() {
    let pool = pool().await;
    let gone = Event::new("payments", &b"gone"[..]);
    let mut tx = pool.begin().await.unwrap();
    outbox::enqueue(&mut *tx, &gone).await.unwrap();
    tx.rollback().await.unwrap();

    let kept = Event::new("payments", &b"\x00kept"[..])
        .with_ordering_key("acct-1")
        .with_header("content-type", "application/octet-stream");
    let second = Event::new("payments", &b"second"[..]);
    let mut tx = pool.begin().await.unwrap();
    outbox::enqueue(&mut *tx, &kept).await.unwrap();
    outbox::enqueue(&mut *tx, &second).await.unwrap();
    tx.commit().await.unwrap();

    let rows = sqlx::query(
        "SELECT seq, id, destination, ordering_key, headers, payload, attempts, created_at, \
         available_at, published_at, dead_at, last_error FROM outbox_events ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    let r = &rows[0];
    assert_eq!(r.get::<String, _>("id"), kept.id().to_string());
    assert_eq!(r.get::<String, _>("destination"), "payments");
    assert_eq!(
        r.get::<Option<String>, _>("ordering_key").as_deref(),
        Some("acct-1")
    );
    assert_eq!(
        r.get::<String, _>("headers"),
        r#"[["content-type","application/octet-stream"]]"#
    );
    assert_eq!(r.get::<Vec<u8>, _>("payload"), b"\x00kept");
    assert_eq!(r.get::<i64, _>("attempts"), 0);
    assert!(r.get::<i64, _>("created_at") > 0);
    assert_eq!(
        r.get::<i64, _>("created_at"),
        r.get::<i64, _>("available_at")
    );
    assert_eq!(r.get::<Option<i64>, _>("published_at"), None);
    assert!(rows[0].get::<i64, _>("seq") < rows[1].get::<i64, _>("seq"));
    assert_eq!(rows[1].get::<Option<String>, _>("ordering_key"), None);
}

#[tokio::test]
async fn sqlite_typed_errors() {
    let pool = pool().await;
    let mut conn = pool.acquire().await.unwrap();
    let e = outbox::enqueue(&mut *conn, &Event::new("", &b"x"[..]))
        .await
        .unwrap_err();
    assert!(
        matches!(e, OutboxError::Event(EventError::EmptyDestination)),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "the event's destination is empty");
    let big = Event::new("q", vec![1u8; outbox::DEFAULT_MAX_EVENT_SIZE]).with_header("a", "b");
    let e = outbox::enqueue(&mut *conn, &big).await.unwrap_err();
    assert!(
        matches!(e, OutboxError::Event(EventError::TooLarge { .. })),
        "{e:?}"
    );
    let e = outbox::enqueue(
        &mut *conn,
        &Event::new("q", &b""[..]).with_header("x", "a\nb"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, OutboxError::Event(EventError::InvalidHeader { .. })),
        "{e:?}"
    );
    let ok = Event::new("q", &b"ok"[..]);
    outbox::enqueue(&mut *conn, &ok).await.unwrap();
    let e = outbox::enqueue(&mut *conn, &Event::new("q", &b"dup"[..]).with_id(ok.id()))
        .await
        .unwrap_err();
    assert!(
        matches!(e, OutboxError::DuplicateId(id) if id == ok.id()),
        "{e:?}"
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_events")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

fn fast() -> outbox::RelayConfigBuilder {
    outbox::RelayConfig::builder()
        .poll_interval(Duration::from_millis(20))
        .outage_delay(Duration::from_millis(20))
}

async fn enqueue(pool: &SqlitePool, events: &[Event]) {
    let mut tx = pool.begin().await.unwrap();
    for e in events {
        outbox::enqueue(&mut *tx, e).await.unwrap();
    }
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn sqlite_relay_publishes_once_in_order_and_retries_then_kills() {
    let pool = pool().await;
    let mut events = common::keyed_events("payments", 20, 2);
    events.push(Event::new("payments", &b"free"[..]).with_header("h", "v"));
    enqueue(&pool, &events).await;
    let poison = events[1].id(); // key-1's head
    let broker = common::MemoryPublisher::scripted(move |o| {
        (o.event().id() == poison).then(|| outbox::PublishError::rejected("nacked"))
    });
    let config = fast()
        .batch_size(8)
        .max_attempts(2)
        .retry_delay(Duration::from_millis(100), Duration::from_millis(100))
        .build()
        .unwrap();
    let relay = outbox::SqliteRelay::new(pool.clone(), broker.clone(), config);
    let r = relay.run_once().await.unwrap();
    assert_eq!((r.claimed, r.retried), (8, 1), "{r:?}");
    // key-1 waits behind its head in backoff; key-0 and the keyless one flow.
    loop {
        let r = relay.run_once().await.unwrap();
        if r.claimed == 0 {
            break;
        }
    }
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_events WHERE published_at IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(pending, 10, "key-1 waits");
    // The second attempt is the last: dead, reason kept; then key-1 flows.
    common::eventually("the poison dies", || async {
        relay.run_once().await.unwrap().dead == 1
    })
    .await;
    let row = sqlx::query("SELECT attempts, dead_at, last_error FROM outbox_events WHERE id = ?")
        .bind(poison.to_string())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(row.get::<i64, _>("attempts"), 2);
    assert!(row.get::<Option<i64>, _>("dead_at").is_some());
    assert_eq!(
        row.get::<Option<String>, _>("last_error").as_deref(),
        Some("the broker refused the event: nacked")
    );
    while relay.run_once().await.unwrap().claimed > 0 {}
    let marked: Vec<Vec<u8>> = {
        let rows = sqlx::query(
            "SELECT payload FROM outbox_events WHERE published_at IS NOT NULL \
             AND ordering_key IS NOT NULL ORDER BY published_at, seq",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        rows.iter().map(|r| r.get("payload")).collect()
    };
    common::assert_per_key_order(&marked, 19);
    let m = relay.metrics();
    assert_eq!((m.published, m.retried, m.dead), (20, 1, 1));
    assert_eq!(relay.lag().await.unwrap(), Some(Duration::ZERO));
    assert_eq!(relay.purge().await.unwrap(), 0);
    assert_eq!(relay.purge_older_than(Duration::ZERO).await.unwrap(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_relay_runs_until_shutdown() {
    let pool = pool().await;
    let broker = common::MemoryPublisher::new();
    let relay = outbox::SqliteRelay::new(pool.clone(), broker.clone(), fast().build().unwrap());
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let running = {
        let (relay, stop) = (relay.clone(), stop.clone());
        tokio::spawn(async move { relay.run(async move { stop.notified().await }).await })
    };
    enqueue(&pool, &common::keyed_events("payments", 100, 5)).await;
    common::eventually("all published", || async {
        broker.confirmed().len() == 100
    })
    .await;
    stop.notify_waiters();
    common::bounded("relay stops", running)
        .await
        .unwrap()
        .unwrap();
    let payloads: Vec<_> = broker.confirmed().into_iter().map(|s| s.payload).collect();
    common::assert_per_key_order(&payloads, 100);
}

/// A row that is not an event (its id is not a UUID) is marked dead with the
/// reason; the events behind it, of its key and keyless, are published.
#[tokio::test]
async fn sqlite_an_unreadable_row_dies_with_its_reason_and_blocks_nothing() {
    let pool = pool().await;
    let bad = Event::new("payments", &b"bad"[..]).with_ordering_key("k");
    let next = Event::new("payments", &b"next"[..]).with_ordering_key("k");
    let free = Event::new("payments", &b"free"[..]);
    enqueue(&pool, &[bad.clone(), next, free]).await;
    sqlx::query("UPDATE outbox_events SET id = 'not-a-uuid' WHERE id = ?")
        .bind(bad.id().to_string())
        .execute(&pool)
        .await
        .unwrap();
    let broker = common::MemoryPublisher::new();
    let relay = outbox::SqliteRelay::new(pool.clone(), broker.clone(), fast().build().unwrap());
    for _ in 0..3 {
        relay
            .run_once()
            .await
            .expect("an unreadable row fails no batch");
    }
    let mut published: Vec<Vec<u8>> = broker
        .confirmed()
        .iter()
        .map(|s| s.payload.clone())
        .collect();
    published.sort();
    assert_eq!(published, [b"free".to_vec(), b"next".to_vec()]);
    let row = sqlx::query(
        "SELECT dead_at IS NOT NULL AS dead, last_error FROM outbox_events WHERE id = 'not-a-uuid'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(row.get::<bool, _>("dead"));
    let error: Option<String> = row.get("last_error");
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("unreadable row")),
        "{error:?}"
    );
    assert_eq!(relay.run_once().await.unwrap().claimed, 0);
}

/// A stored `traceparent` (what `enqueue` writes with the feature `trace`)
/// reaches the broker as the header `traceparent`, whether or not this
/// relay was built with the feature; an event's own header of that name
/// wins; none is added when nothing was stored.
#[tokio::test]
async fn sqlite_relay_sends_the_stored_traceparent_as_a_header() {
    let pool = pool().await;
    let traced = Event::new("payments", &b"traced"[..]).with_header("h", "v");
    let own = Event::new("payments", &b"own"[..]).with_header("TraceParent", "the producer's");
    let plain = Event::new("payments", &b"plain"[..]);
    enqueue(&pool, &[traced.clone(), own.clone(), plain.clone()]).await;
    let stored = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    sqlx::query("UPDATE outbox_events SET traceparent = ? WHERE id IN (?, ?)")
        .bind(stored)
        .bind(traced.id().to_string())
        .bind(own.id().to_string())
        .execute(&pool)
        .await
        .unwrap();
    let broker = common::MemoryPublisher::new();
    let relay = outbox::SqliteRelay::new(pool.clone(), broker.clone(), fast().build().unwrap());
    assert_eq!(relay.run_once().await.unwrap().claimed, 3);
    let headers = |id: outbox::Uuid| {
        broker
            .confirmed()
            .into_iter()
            .find(|s| s.id == id)
            .expect("published")
            .headers
    };
    assert_eq!(
        headers(traced.id()),
        [
            ("h".to_owned(), "v".to_owned()),
            ("traceparent".to_owned(), stored.to_owned())
        ]
    );
    assert_eq!(
        headers(own.id()),
        [("TraceParent".to_owned(), "the producer's".to_owned())]
    );
    assert!(headers(plain.id()).is_empty());
}
