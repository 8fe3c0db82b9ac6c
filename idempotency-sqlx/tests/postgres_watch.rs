//! The PostgreSQL store wakes duplicates that wait for a record in flight
//! (`wait_for_in_flight`) through `LISTEN`/`NOTIFY`: a waiter marks the row,
//! and only a marked row's completion or release notifies. What every
//! notifying store does (a watch resolves on its record's completion and
//! release only, on another instance; waiting duplicates are woken instead
//! of polling) is in the conformance suite's watch cases (`conformance.rs`);
//! here, what only PostgreSQL does. Reads `DATABASE_URL` at run time; skips
//! (saying why) when it is unset.
#![cfg(feature = "postgres")]

mod pg;

use std::time::Duration;

use idempotency_core::{LeaseToken, Store, StoredOutcome, TokenOutcome};
use idempotency_sqlx::postgres::PostgresStore;
use sqlx::postgres::PgListener;
use test_support::watching::{
    acquire, fp, id, resolves, response, watch, NOTIFIED_WITHIN, QUIET_FOR,
};

/// Two instances (their own pools) on one fresh schema.
async fn instances(test: &str) -> Option<(String, String, PostgresStore, PostgresStore)> {
    let url = test_support::service_url("DATABASE_URL", test)?;
    let schema = test_support::unique("idem_watch");
    let a = pg::connect(&url, &schema).await;
    let b = pg::connect(&url, &schema).await;
    Some((url, schema, a, b))
}

/// The channel the store notifies on (see the module docs).
fn channel(schema: &str) -> String {
    format!("{schema}.idempotency_records")
}

/// A watch on a record in flight resolves when its holder completes it,
/// also when the holder is the same instance (the conformance suite's watch
/// case settles the records on another instance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resolves_on_completion_on_the_same_instance() {
    let Some((_, _, _, waiter)) = instances("a_watch_resolves_on_completion").await else {
        return;
    };
    let outcome = StoredOutcome::response(response());
    // The same instance's own completion wakes its own waiters too.
    let own = id();
    let token = acquire(&waiter, &own).await;
    let on_own = watch(&waiter, &own).await;
    assert_eq!(
        waiter
            .complete(&own, token, &outcome, Duration::from_secs(60))
            .await
            .expect("complete"),
        TokenOutcome::Applied
    );
    assert!(resolves(on_own).await, "the same instance's completion");
    pg::drop_schema(&waiter).await;
}

/// Claim + complete and claim + release with nobody waiting send no
/// notification (no NOTIFY, no commit-time queue lock on the hot path); the
/// same with a waiter sends exactly one, naming the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hot_path_sends_no_notification() {
    let Some((url, schema, store, _)) = instances("the_hot_path_sends_no_notification").await
    else {
        return;
    };
    let mut listener = PgListener::connect(&url).await.expect("listener");
    listener.listen(&channel(&schema)).await.expect("LISTEN");
    let outcome = StoredOutcome::response(response());
    for _ in 0..10 {
        let done = id();
        let token = acquire(&store, &done).await;
        assert_eq!(
            store
                .complete(&done, token, &outcome, Duration::from_secs(60))
                .await
                .expect("complete"),
            TokenOutcome::Applied
        );
        let released = id();
        let token = acquire(&store, &released).await;
        assert_eq!(
            store.release(&released, token).await.expect("release"),
            TokenOutcome::Applied
        );
    }
    // A completion that lost its token (fenced) sends nothing either.
    let fenced = id();
    let _token = acquire(&store, &fenced).await;
    assert_eq!(
        store
            .complete(
                &fenced,
                LeaseToken::random(),
                &outcome,
                Duration::from_secs(60)
            )
            .await
            .expect("fenced complete"),
        TokenOutcome::Fenced
    );
    assert!(
        tokio::time::timeout(QUIET_FOR, listener.recv())
            .await
            .is_err(),
        "a request nobody waited for notified"
    );

    // The control: a waiter on the record, then its completion.
    let watched = id();
    let token = acquire(&store, &watched).await;
    let _watch = watch(&store, &watched).await;
    let _second_watch = watch(&store, &watched).await;
    assert_eq!(
        store
            .complete(&watched, token, &outcome, Duration::from_secs(60))
            .await
            .expect("complete"),
        TokenOutcome::Applied
    );
    let notification = tokio::time::timeout(NOTIFIED_WITHIN, listener.recv())
        .await
        .expect("a watched completion notified")
        .expect("recv");
    assert_eq!(notification.payload(), watched.to_hex());
    assert!(
        tokio::time::timeout(QUIET_FOR, listener.recv())
            .await
            .is_err(),
        "one notification per completion, however many watch"
    );
    pg::drop_schema(&store).await;
}

/// The pid of the listener's session of `schema`, once it has listened.
async fn listener_pid(store: &PostgresStore, schema: &str) -> Option<i32> {
    // sqlx sends `LISTEN "..."` first, `LISTEN "...";` when it reconnects.
    sqlx::query_scalar::<_, i32>(
        "SELECT pid FROM pg_stat_activity WHERE rtrim(query, ';') = $1 AND pid <> pg_backend_pid()",
    )
    .bind(format!("LISTEN \"{}\"", channel(schema)))
    .fetch_optional(store.pool())
    .await
    .expect("pg_stat_activity")
}

/// When the listener's connection is killed, its waiters are woken at once
/// (they may have missed a notification), and it reconnects: a later
/// completion notifies again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listener_wakes_its_waiters_and_comes_back() {
    let Some((_, schema, holder, waiter)) = instances("a_lost_listener_wakes_its_waiters").await
    else {
        return;
    };
    let id = id();
    let token = acquire(&holder, &id).await;
    let on_id = watch(&waiter, &id).await;
    let pid = listener_pid(&holder, &schema).await.expect("the listener");
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(holder.pool())
        .await
        .expect("terminate");
    assert!(resolves(on_id).await, "the lost connection woke the waiter");
    // Back: a new session LISTENs, and a completion notifies again.
    let deadline = tokio::time::Instant::now() + NOTIFIED_WITHIN;
    loop {
        match listener_pid(&holder, &schema).await {
            Some(new) if new != pid => break,
            _ => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the listener did not come back"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let on_id = watch(&waiter, &id).await;
    assert_eq!(
        holder
            .complete(
                &id,
                token,
                &StoredOutcome::response(response()),
                Duration::from_secs(60),
            )
            .await
            .expect("complete"),
        TokenOutcome::Applied
    );
    assert!(resolves(on_id).await, "notified after the reconnection");
    pg::drop_schema(&holder).await;
}

/// The listener starts on the first watch only, and ends (its session
/// closes) once the store and all its clones are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_starts_on_the_first_watch_and_ends_with_the_store() {
    let Some((_, schema, store, admin)) = instances("the_listener_starts_on_the_first_watch").await
    else {
        return;
    };
    let id = id();
    let _token = acquire(&store, &id).await;
    assert_eq!(
        listener_pid(&admin, &schema).await,
        None,
        "no listener before a watch"
    );
    let clone = store.clone();
    let watch = watch(&clone, &id).await;
    assert!(listener_pid(&admin, &schema).await.is_some(), "listening");
    drop(watch);
    drop(store);
    assert!(
        listener_pid(&admin, &schema).await.is_some(),
        "a clone keeps it"
    );
    drop(clone);
    let deadline = tokio::time::Instant::now() + NOTIFIED_WITHIN;
    while listener_pid(&admin, &schema).await.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener outlived its store"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pg::drop_schema(&admin).await;
}

/// A table made by the first migration (no `watched` column) migrates
/// cleanly, its rows unmarked; a migration history from a newer version is
/// still refused as a configuration error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_table_migrates_and_a_newer_history_is_refused() {
    let Some((_, schema, store, _)) = instances("an_old_table_migrates").await else {
        return;
    };
    let t = format!("\"{schema}\".idempotency_records");
    // Back to the first migration's table, with a row in flight.
    for sql in [
        format!("ALTER TABLE {t} DROP COLUMN watched"),
        format!("DELETE FROM \"{schema}\"._sqlx_migrations WHERE version = 2"),
    ] {
        sqlx::query(&sql)
            .execute(store.pool())
            .await
            .expect("downgrade");
    }
    let (old, old_token) = (id(), LeaseToken::random());
    let fp = fp();
    // An old row.
    pg::insert_in_flight(
        &store,
        &old,
        &fp,
        old_token,
        "now() + interval '30 s'",
        "now() + interval '90 s'",
    )
    .await;
    store.migrate().await.expect("migrate the old table");
    let watched: bool = sqlx::query_scalar(&format!("SELECT watched FROM {t} WHERE id = $1"))
        .bind(old.as_bytes().as_slice())
        .fetch_one(store.pool())
        .await
        .expect("the new column");
    assert!(!watched, "old rows are unmarked");
    // The old row can be watched like any other.
    let on_old = watch(&store, &old).await;
    assert_eq!(
        store.release(&old, old_token).await.expect("release"),
        TokenOutcome::Applied
    );
    assert!(resolves(on_old).await, "the old row, marked, notified");

    sqlx::query(&format!(
        "INSERT INTO \"{schema}\"._sqlx_migrations (version, description, success, checksum, execution_time) VALUES (99, 'from the future', true, '\\x00', 0)"
    ))
    .execute(store.pool())
    .await
    .expect("a newer history");
    let err = store.migrate().await.expect_err("an unknown migration");
    assert!(pg::is_config(&err), "{err:?}");
    pg::drop_schema(&store).await;
}
