//! What a reader of the outbox table in commit order relies on, on a real
//! PostgreSQL (`DATABASE_URL`; each test has its own database): each event
//! records its transaction's id, and the retention holds keep the history a
//! reader still needs, or say that it is gone.
#![cfg(feature = "postgres")]

mod common;

use std::time::Duration;

use common::{MemoryPublisher, PgEnv};
use outbox::{Event, OutboxError, PostgresRelay, RelayConfig};

fn relay(env: &PgEnv) -> PostgresRelay<MemoryPublisher> {
    PostgresRelay::new(
        env.pool.clone(),
        MemoryPublisher::new(),
        RelayConfig::builder().purge_batch(2).build().unwrap(),
    )
}

/// Enqueues `n` events and publishes them; returns their seqs.
async fn published(env: &PgEnv, relay: &PostgresRelay<MemoryPublisher>, n: u8) -> Vec<i64> {
    let mut seqs = Vec::new();
    for i in 0..n {
        seqs.push(env.enqueue(&Event::new("q", vec![i])).await);
    }
    relay.run_once().await.unwrap();
    assert_eq!(env.count("published_at IS NULL").await, 0);
    seqs
}

#[tokio::test]
async fn each_event_records_the_id_of_its_transaction() {
    let Some(env) = PgEnv::new("each_event_records_the_id_of_its_transaction").await else {
        return;
    };
    let keyless = Event::new("q", &b"a"[..]);
    let keyed = Event::new("q", &b"b"[..]).with_ordering_key("k");
    let mut tx = env.pool.begin().await.unwrap();
    outbox::enqueue(&mut *tx, &keyless).await.unwrap();
    outbox::enqueue(&mut *tx, &keyed).await.unwrap();
    let mine: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let recorded: Vec<String> =
        sqlx::query_scalar("SELECT txid::text FROM outbox.events ORDER BY seq")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(recorded, vec![mine.clone(), mine]);
    env.finish().await;
}

#[tokio::test]
async fn the_purge_keeps_what_a_hold_holds_and_records_what_it_deleted() {
    let Some(env) = PgEnv::new("the_purge_keeps_what_a_hold_holds").await else {
        return;
    };
    let relay = relay(&env);
    let mut conn = env.pool.acquire().await.unwrap();
    assert_eq!(outbox::purged_through(&mut conn).await.unwrap(), 0);
    let seqs = published(&env, &relay, 6).await;
    outbox::place_hold(&mut conn, "reader", seqs[3])
        .await
        .unwrap();
    outbox::place_hold(&mut conn, "later", seqs[5])
        .await
        .unwrap();
    assert_eq!(
        outbox::holds(&mut conn).await.unwrap(),
        vec![
            ("reader".to_owned(), seqs[3]),
            ("later".to_owned(), seqs[5])
        ]
    );
    // Only below the lowest hold, in batches of 2.
    assert_eq!(relay.purge_older_than(Duration::ZERO).await.unwrap(), 3);
    assert_eq!(env.count("true").await, 3);
    assert_eq!(outbox::purged_through(&mut conn).await.unwrap(), seqs[2]);
    // Raised: a hold never goes down.
    assert!(outbox::raise_hold(&mut conn, "reader", seqs[4])
        .await
        .unwrap());
    assert!(outbox::raise_hold(&mut conn, "reader", seqs[0])
        .await
        .unwrap());
    assert!(!outbox::raise_hold(&mut conn, "nobody", seqs[0])
        .await
        .unwrap());
    assert_eq!(relay.purge_older_than(Duration::ZERO).await.unwrap(), 1);
    assert_eq!(outbox::purged_through(&mut conn).await.unwrap(), seqs[3]);
    // A history that is gone is refused, naming what is missing.
    let err = outbox::place_hold(&mut conn, "rebuild", seqs[1])
        .await
        .unwrap_err();
    match &err {
        OutboxError::HistoryPurged {
            hold,
            from_seq,
            purged_through,
        } => assert_eq!(
            (hold.as_str(), *from_seq, *purged_through),
            ("rebuild", seqs[1], seqs[3])
        ),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("purged"), "{err}");
    outbox::place_hold(&mut conn, "rebuild", seqs[4])
        .await
        .unwrap();
    // Released: the rest goes.
    for hold in ["reader", "later", "rebuild"] {
        assert!(outbox::release_hold(&mut conn, hold).await.unwrap());
    }
    assert_eq!(relay.purge_older_than(Duration::ZERO).await.unwrap(), 2);
    assert_eq!(outbox::purged_through(&mut conn).await.unwrap(), seqs[5]);
    drop(conn);
    env.finish().await;
}

/// A purge that starts while a hold is being placed waits for it and keeps
/// what it holds: the purge reads the holds after the purge lock, with a
/// snapshot of its own. (Read with the statement's snapshot, taken before
/// the hold committed, it would delete the held events.)
#[tokio::test]
async fn a_purge_racing_a_hold_placement_sees_the_hold() {
    let Some(env) = PgEnv::new("a_purge_racing_a_hold_placement_sees_the_hold").await else {
        return;
    };
    let relay = relay(&env);
    let seqs = published(&env, &relay, 4).await;
    let mut tx = env.pool.begin().await.unwrap();
    outbox::place_hold(&mut tx, "reader", seqs[0])
        .await
        .unwrap();
    let purge = tokio::spawn({
        let relay = relay.clone();
        async move { relay.purge_older_than(Duration::ZERO).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!purge.is_finished(), "the purge waits for the purge lock");
    tx.commit().await.unwrap();
    let purged = common::bounded("the purge", purge).await.unwrap().unwrap();
    assert_eq!(purged, 0);
    assert_eq!(env.count("true").await, 4);
    env.finish().await;
}

/// The migration's starting point, on a table that had events before it:
/// what is missing below the highest seq drawn may have been purged.
#[tokio::test]
async fn the_highest_purged_seq_starts_from_the_gaps() {
    let Some(env) = PgEnv::new("the_highest_purged_seq_starts_from_the_gaps").await else {
        return;
    };
    let pool = &env.pool;
    for i in 0..5u8 {
        env.enqueue(&Event::new("q", vec![i])).await;
    }
    sqlx::query("DELETE FROM outbox.events WHERE seq IN (2, 3)")
        .execute(pool)
        .await
        .unwrap();
    // Run the migration's statement again, on a fresh row.
    sqlx::query("DELETE FROM outbox.purged")
        .execute(pool)
        .await
        .unwrap();
    let migration = include_str!("../migrations/postgres/20261215000001_txid_and_holds.sql");
    let start = migration
        .split(';')
        .find(|s| s.contains("INSERT INTO purged"))
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET search_path = outbox")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query(start).execute(&mut *conn).await.unwrap();
    assert_eq!(outbox::purged_through(&mut conn).await.unwrap(), 3);
    // A drawn seq above the highest row counts too.
    sqlx::query("SELECT nextval('outbox.events_seq_seq')")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM outbox.purged")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query(start).execute(&mut *conn).await.unwrap();
    assert_eq!(outbox::purged_through(&mut conn).await.unwrap(), 6);
    sqlx::query("RESET search_path")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    env.finish().await;
}
