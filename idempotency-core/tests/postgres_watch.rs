//! The PostgreSQL store wakes duplicates that wait for a record in flight
//! (`wait_for_in_flight`) through `LISTEN`/`NOTIFY`: a waiter marks the row,
//! and only a marked row's completion or release notifies. Reads
//! `DATABASE_URL` at run time; skips (saying why) when it is unset.
#![cfg(feature = "postgres")]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use idempotency_core::store::postgres::{PostgresOptions, PostgresStore};
use idempotency_core::store::Watch;
use idempotency_core::{
    Claim, ClaimOutcome, Decision, Fingerprint, Idempotency, IdempotencyConfig, Inspection,
    LeaseToken, RecordId, Store, StoreError, StoredOutcome, StoredResponse, TokenOutcome,
};
use sqlx::postgres::PgListener;

/// Long enough for a notification on a loaded machine; a watch that has
/// none never resolves (the fallback poll is the engine's, not the watch's).
const NOTIFIED_WITHIN: Duration = Duration::from_secs(5);
/// How long a watch that must stay quiet is given to resolve anyway.
const QUIET_FOR: Duration = Duration::from_millis(500);

async fn connect(url: &str, schema: &str) -> PostgresStore {
    PostgresStore::connect_with(url, PostgresOptions::new().schema(schema))
        .await
        .expect("connect")
}

/// Two instances (their own pools) on one fresh schema.
async fn instances(test: &str) -> Option<(String, String, PostgresStore, PostgresStore)> {
    let url = common::service_url("DATABASE_URL", test)?;
    let schema = common::unique("idem_watch");
    let a = connect(&url, &schema).await;
    let b = connect(&url, &schema).await;
    Some((url, schema, a, b))
}

async fn drop_schema(store: &PostgresStore) {
    sqlx::query(&format!("DROP SCHEMA \"{}\" CASCADE", store.schema()))
        .execute(store.pool())
        .await
        .expect("drop schema");
}

/// The channel the store notifies on (see the module docs).
fn channel(schema: &str) -> String {
    format!("{schema}.idempotency_records")
}

fn fp() -> Fingerprint {
    Fingerprint::compute("POST", "/watch", None, None, b"body")
}

fn id() -> RecordId {
    RecordId::from_parts(b"watch", &rand::random::<[u8; 16]>())
}

fn claim_args(fp: &Fingerprint) -> Claim<'_> {
    Claim {
        fingerprint: fp,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(60),
    }
}

async fn acquire(store: &PostgresStore, id: &RecordId) -> LeaseToken {
    let fp = fp();
    let token = LeaseToken::random();
    match store
        .claim(id, token, claim_args(&fp))
        .await
        .expect("claim")
    {
        ClaimOutcome::Acquired(t) => t,
        other => panic!("not acquired: {other:?}"),
    }
}

fn response() -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![],
        body: bytes::Bytes::from_static(b"{\"id\":1}"),
    }
}

async fn watch(store: &PostgresStore, id: &RecordId) -> Watch {
    store
        .watch(id)
        .await
        .expect("watch")
        .expect("the PostgreSQL store notifies")
}

async fn resolves(watch: Watch) -> bool {
    tokio::time::timeout(NOTIFIED_WITHIN, watch).await.is_ok()
}

async fn stays_quiet(watch: &mut Watch) -> bool {
    tokio::time::timeout(QUIET_FOR, watch).await.is_err()
}

/// A watch on a record in flight resolves when its holder, on another
/// instance, completes it, and when it releases it; a watch on another
/// record in flight stays quiet meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resolves_on_completion_and_on_release_of_its_record_only() {
    let Some((_, _, holder, waiter)) = instances("a_watch_resolves_on_completion").await else {
        return;
    };
    let (done, released, other) = (id(), id(), id());
    let done_token = acquire(&holder, &done).await;
    let released_token = acquire(&holder, &released).await;
    let _other_token = acquire(&holder, &other).await;
    let mut on_other = watch(&waiter, &other).await;

    let on_done = watch(&waiter, &done).await;
    let outcome = StoredOutcome::response(response());
    assert_eq!(
        holder
            .complete(&done, done_token, &outcome, Duration::from_secs(60))
            .await
            .expect("complete"),
        TokenOutcome::Applied
    );
    assert!(resolves(on_done).await, "the completion woke its watch");

    let on_released = watch(&waiter, &released).await;
    assert_eq!(
        holder
            .release(&released, released_token)
            .await
            .expect("release"),
        TokenOutcome::Applied
    );
    assert!(resolves(on_released).await, "the release woke its watch");

    assert!(
        stays_quiet(&mut on_other).await,
        "another record's completion and release left this watch alone"
    );
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
    drop_schema(&holder).await;
}

async fn decide(engine: &Idempotency, key: &str) -> Decision {
    let (parts, ()) = http::Request::post("/payments")
        .header("idempotency-key", key)
        .body(())
        .expect("request")
        .into_parts();
    let Inspection::Pending(pending) = engine.inspect(&parts, || None) else {
        panic!("not covered");
    };
    engine.decide(pending, b"{\"amount\":1}").await
}

const WAITERS: u64 = 16;
const HANDLER: Duration = Duration::from_millis(600);

/// 16 duplicates on another instance wait for a request whose handler takes
/// 600 ms: all get its replay, each woken by the completion, and each claims
/// a handful of times (polling every 25 ms would be about 24 claims each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_duplicates_are_woken_not_polling() {
    let Some((_, _, first_store, waiters_store)) =
        instances("waiting_duplicates_are_woken_not_polling").await
    else {
        return;
    };
    let config = || {
        IdempotencyConfig::builder()
            .wait_for_in_flight(Duration::from_secs(5))
            .build()
            .expect("config")
    };
    let first_engine = Idempotency::new(first_store.clone(), config());
    let counting = Arc::new(common::Counting::new(waiters_store.clone()));
    let engine = Idempotency::new(Arc::clone(&counting), config());
    // A running service's listener is up already: start it, so that the
    // waiters' fallback ticks (every 250 ms from their first claim) fall
    // well away from the completion at 600 ms.
    drop(watch(&waiters_store, &id()).await);
    let key = common::unique("k");
    let Decision::Execute(first) = decide(&first_engine, &key).await else {
        panic!("the first is not executed");
    };
    let started = tokio::time::Instant::now();
    let waiters: Vec<_> = (0..WAITERS)
        .map(|_| {
            let (engine, key) = (engine.clone(), key.clone());
            tokio::spawn(async move { decide(&engine, &key).await })
        })
        .collect();
    tokio::time::sleep_until(started + HANDLER).await;
    first.complete(response()).await;
    for waiter in waiters {
        match waiter.await.expect("waiter") {
            Decision::Replay(replay) => assert_eq!(*replay, response()),
            other => panic!("a waiter did not get the replay: {other:?}"),
        }
    }
    let claims = counting.claims.load(Ordering::SeqCst);
    let watches = counting.watches.load(Ordering::SeqCst);
    let woken = counting.woken.load(Ordering::SeqCst);
    eprintln!(
        "{WAITERS} waiters over {HANDLER:?}: {claims} claims ({:.1} each), {watches} watches, {woken} woken",
        claims as f64 / WAITERS as f64
    );
    // Notified: the first claim, one after the watch began and one after the
    // wake-up, plus one per 250 ms fallback tick (the watch is kept across
    // ticks): 5 here. Polling would be about 24.
    assert!(
        claims <= 9 * WAITERS,
        "{claims} claims for {WAITERS} waiters: they polled"
    );
    assert!(watches >= WAITERS, "every waiter watched: {watches}");
    // A waiter's last watch is woken by the completion's notification;
    // under the fallback poll alone every watch is dropped unresolved. (A
    // waiter whose fallback tick came between the commit and the
    // notification's arrival would claim without being woken: rare.)
    assert!(
        woken >= WAITERS / 2,
        "{woken} of {WAITERS} waiters were woken by the completion"
    );
    drop_schema(&first_store).await;
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
    drop_schema(&store).await;
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
    drop_schema(&holder).await;
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
    drop_schema(&admin).await;
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
    sqlx::query(&format!(
        "INSERT INTO {t} VALUES ($1, $2, $3, now() + interval '30 s', now() + interval '90 s', NULL)"
    ))
    .bind(old.as_bytes().as_slice())
    .bind(fp.as_bytes().as_slice())
    .bind(old_token.to_bytes().to_vec())
    .execute(store.pool())
    .await
    .expect("an old row");
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
    assert!(
        matches!(
            err,
            StoreError::Config {
                backend: "postgres",
                ..
            }
        ),
        "{err:?}"
    );
    drop_schema(&store).await;
}
