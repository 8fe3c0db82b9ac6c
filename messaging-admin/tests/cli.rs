//! The `messaging-admin` binary against a real PostgreSQL (`DATABASE_URL`)
//! and RabbitMQ (`AMQP_URL`); each test skips, saying so, when one is
//! unset. Each test has its own database and queue.
//!
//! - an outbox event dies (a relay with one attempt and a queue that does
//!   not exist), is listed and shown, retried once the queue exists, and
//!   published once;
//! - an inbox message dies (its handler fails), is retried after the fix,
//!   and runs once through the inbox: a redelivery stays a duplicate;
//! - a `failed` saga is retried after the fix and ends `compensated`;
//! - two consoles retrying one group at once publish each event once, and
//!   no token or a wrong one is a 401 that changes nothing;
//! - bad input: an unknown id, a filter that matches nothing, a database
//!   without the tables, usage errors (exit 2).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{admin, admin_json, count, enqueue, Broker, Console, TOKEN};
use inbox_consumer::{HandlerError, Inbox, InboxConfig, InboxMessage, Outcome, PostgresInbox};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use test_support::{eventually, PgDatabase};

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_outbox_event_is_listed_retried_and_published_once() {
    let Some(b) = Broker::new("admin_outbox").await else {
        return;
    };
    let url = b.db.url.clone();
    let ids = enqueue(&b.db.pool, &b.queue, 1).await;
    let id = ids[0].as_str();
    let relay = b.relay().await;
    eventually("the event dies (its queue does not exist)", || async {
        count(
            &b.db.pool,
            "SELECT count(*) FROM outbox.events WHERE dead_at IS NOT NULL",
        )
        .await
            == 1
    })
    .await;

    let listed = admin_json(&url, &["outbox", "list", "--json"]).await;
    let listed = listed.as_array().expect("an array");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], id);
    assert_eq!(listed[0]["destination"], b.queue.as_str());
    assert_eq!(listed[0]["attempts"], 1);
    assert!(listed[0]["reason"].as_str().is_some_and(|r| !r.is_empty()));
    let text = admin(&url, &["outbox", "list"]).await;
    assert!(text.stdout.contains(id), "{text:?}");

    let shown = admin_json(&url, &["outbox", "show", id, "--json"]).await;
    assert_eq!(shown["payload"], r#"{"account":"acct-0","amount":0}"#);
    assert_eq!(shown["state"], "dead");
    assert!(
        shown["headers"].to_string().contains("content-type"),
        "{shown}"
    );

    let groups = admin_json(&url, &["outbox", "groups", "--json"]).await;
    assert_eq!(groups[0]["count"], 1);
    assert_eq!(groups[0]["scope"], b.queue.as_str());

    // The destination exists now: retried, the relay publishes it once.
    b.declare().await;
    let run = admin(&url, &["outbox", "retry", id]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("retried 1"), "{run:?}");
    eventually("the relay publishes the retried event", || async {
        count(
            &b.db.pool,
            "SELECT count(*) FROM outbox.events WHERE published_at IS NOT NULL",
        )
        .await
            == 1
    })
    .await;
    // Asked again: it is published, nothing to retry (exit 1, said why).
    let again = admin(&url, &["outbox", "retry", id]).await;
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stdout.contains("it is published"), "{again:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.drain().await, vec![id.to_owned()], "published once");

    // The audit: one row naming the event, by ops@test, via the CLI.
    let audit: (String, String, String) = sqlx::query_as(
        "SELECT actor, via, action FROM messaging_admin.audit WHERE items @> ARRAY[$1]",
    )
    .bind(id)
    .fetch_one(&b.db.pool)
    .await
    .expect("one audit row names the event");
    assert_eq!(audit, ("ops@test".into(), "cli".into(), "retry".into()));
    let shown = admin_json(&url, &["outbox", "show", id, "--json"]).await;
    assert_eq!(shown["state"], "published");
    assert_eq!(shown["audit"].as_array().map(Vec::len), Some(1), "{shown}");

    relay.stop().await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_said_plainly_with_exit_status_1_or_2() {
    let Some(db) = PgDatabase::create("admin_badinput").await else {
        return;
    };
    let url = db.url.clone();
    // No tables yet: each area says what is missing.
    for area in ["outbox", "inbox", "saga", "idempotency"] {
        let run = admin(&url, &[area, "list"]).await;
        assert_eq!(run.code, 1, "{area}: {run:?}");
        assert!(
            run.stderr.contains("is not in this database"),
            "{area}: {run:?}"
        );
        assert!(!run.stderr.contains("Error {"), "no Debug dump: {run:?}");
    }
    // PostgreSQL refusing: said as the network said it, once, without the
    // password.
    let run = admin("postgres://ops:hunter2@127.0.0.1:1/x", &["outbox", "list"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("cannot connect to PostgreSQL"),
        "{run:?}"
    );
    assert_eq!(run.stderr.matches("refused").count(), 1, "{run:?}");
    assert!(!run.stderr.contains("hunter2"), "{run:?}");
    // A usage error writes nothing, not even the audit's table.
    for args in [
        &["outbox", "retry", "not-a-uuid"][..],
        &["saga", "retry", "--state", "sleeping"],
    ] {
        let run = admin(&url, args).await;
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
    }
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'messaging_admin'"
        )
        .await,
        0
    );
    outbox::migrate_postgres(&db.pool).await.expect("outbox");
    let unknown = uuid::Uuid::now_v7().to_string();
    let run = admin(&url, &["outbox", "show", &unknown]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains(&format!("no outbox event {unknown}")),
        "{run:?}"
    );
    let run = admin(&url, &["outbox", "retry", &unknown]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout.contains(&format!("no outbox event {unknown}")),
        "{run:?}"
    );
    // A filter that matches nothing is said, and is not a failure.
    let run = admin(
        &url,
        &[
            "outbox",
            "retry",
            "--state",
            "dead",
            "--destination",
            "nowhere",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("nothing to retry"), "{run:?}");
    let run = admin(&url, &["outbox", "list", "--destination", "nowhere"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("no dead outbox events"), "{run:?}");
    // Usage errors: exit 2.
    for args in [
        &["outbox", "retry"][..],
        &["outbox", "retry", "not-a-uuid"],
        &["outbox", "list", "--state", "sleeping"],
        &["outbox", "list", "--consumer", "ledger"],
        &["outbox", "resume", &unknown],
        &["idempotency", "retry", "--state", "in-flight"],
        &["outbox", "frobnicate"],
    ] {
        let run = admin(&url, args).await;
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(!run.stderr.trim().is_empty(), "{args:?}: {run:?}");
    }
    // Nothing was changed by any of it; the retries that took nothing
    // wrote their audit rows (who tried what), with no items.
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox.events").await,
        0
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM messaging_admin.audit WHERE cardinality(items) > 0"
        )
        .await,
        0
    );
    db.finish().await;
}

/// `process` with a handler that writes a ledger row (failing while the
/// table is missing).
async fn ledger(inbox: &PostgresInbox, m: &InboxMessage) -> Outcome {
    inbox
        .process(m, |tx, m| {
            Box::pin(async move {
                sqlx::query("INSERT INTO ledger (message_id) VALUES ($1)")
                    .bind(m.id())
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| HandlerError::transient(format!("the ledger: {e}")))?;
                Ok::<_, HandlerError>(())
            })
        })
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_inbox_message_is_retried_through_the_inbox_once() {
    let Some(db) = PgDatabase::create("admin_inbox").await else {
        return;
    };
    let url = db.url.clone();
    let config = InboxConfig::builder("ledger")
        .max_attempts(1)
        .build()
        .expect("config");
    let inbox = Arc::new(
        Inbox::postgres(db.pool.clone(), config)
            .await
            .expect("inbox"),
    );
    let message = InboxMessage::new(Some("pay-1".into()), &br#"{"amount":5}"#[..])
        .with_header("content-type", "application/json");
    let outcome = ledger(&inbox, &message).await;
    assert!(matches!(outcome, Outcome::Dead { .. }), "{outcome:?}");

    let listed = admin_json(&url, &["inbox", "list", "--json"]).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["consumer"], "ledger");
    assert_eq!(listed[0]["message_id"], "pay-1");
    assert_eq!(listed[0]["attempts"], 1);
    assert!(listed[0]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("ledger")));
    let shown = admin_json(&url, &["inbox", "show", "pay-1", "--json"]).await;
    assert_eq!(shown["payload"], r#"{"amount":5}"#);

    // The fix, then the retry; the consumer's replays run it through the
    // inbox with its own handler.
    sqlx::query("CREATE TABLE ledger (message_id TEXT NOT NULL)")
        .execute(&db.pool)
        .await
        .expect("create the ledger");
    let run = admin(&url, &["inbox", "retry", "pay-1", "--consumer", "ledger"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let replays = {
        let inbox = Arc::clone(&inbox);
        tokio::spawn(async move {
            let handler = |m: InboxMessage| {
                let inbox = Arc::clone(&inbox);
                async move { ledger(&inbox, &m).await }
            };
            inbox
                .run_replays(handler, Duration::from_millis(50), async {
                    let _ = stopped.await;
                })
                .await;
        })
    };
    eventually("the replay writes the ledger row", || async {
        count(&db.pool, "SELECT count(*) FROM ledger").await == 1
    })
    .await;
    // The broker's redelivery is a duplicate; a second retry finds nothing.
    assert!(matches!(ledger(&inbox, &message).await, Outcome::Duplicate));
    let again = admin(&url, &["inbox", "retry", "pay-1"]).await;
    assert_eq!(again.code, 1, "{again:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(count(&db.pool, "SELECT count(*) FROM ledger").await, 1);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM messaging_admin.audit WHERE area = 'inbox' \
             AND action = 'retry' AND items = ARRAY['pay-1']"
        )
        .await,
        1
    );
    let _ = stop.send(());
    let _ = test_support::bounded("the replays stop", replays).await;
    drop(inbox);
    db.finish().await;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Booking {
    n: u32,
}

/// `book` (undone by `unbook`, which fails while `broken`), then `pay`,
/// which is declined: the saga compensates, and fails while broken.
fn booking(
    name: &'static str,
    broken: &Arc<AtomicBool>,
    unbooked: &Arc<AtomicU32>,
) -> saga::Saga<Booking> {
    let (broken, unbooked) = (Arc::clone(broken), Arc::clone(unbooked));
    let book = saga::Step::local("book", |_: &mut Booking, _, _| Box::pin(async { Ok(()) }))
        .compensate(saga::Step::local("unbook", move |_: &mut Booking, _, _| {
            let (broken, unbooked) = (Arc::clone(&broken), Arc::clone(&unbooked));
            Box::pin(async move {
                if broken.load(Ordering::SeqCst) {
                    return Err("the booking service is down".to_owned());
                }
                unbooked.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        }));
    let pay = saga::Step::call("pay", |_: Booking, _| async {
        saga::CallOutcome::Failed("declined".into())
    });
    saga::Saga::builder(name, 1)
        .step(book)
        .step(pay)
        .compensation_retry(Duration::from_millis(10), Duration::from_millis(20), 2)
        .build()
        .expect("definition")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_saga_is_retried_and_compensates() {
    let Some(db) = PgDatabase::create("admin_saga").await else {
        return;
    };
    let url = db.url.clone();
    outbox::migrate_postgres(&db.pool).await.expect("outbox");
    saga::migrate(&db.pool).await.expect("saga");
    let (broken, unbooked) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU32::new(0)));
    let sagas = saga::Sagas::builder(db.pool.clone())
        .register(booking("booking", &broken, &unbooked))
        .build();
    let mut tx = db.pool.begin().await.expect("begin");
    sagas
        .start(&mut tx, "booking", "order-1", &Booking { n: 1 })
        .await
        .expect("start");
    tx.commit().await.expect("commit");
    let state = |want: saga::State| {
        let sagas = &sagas;
        async move {
            sagas.run_due().await.expect("round");
            sagas
                .instance("order-1")
                .await
                .expect("read")
                .expect("instance")
                .state
                == want
        }
    };
    eventually("the saga fails", || state(saga::State::Failed)).await;

    let listed = admin_json(&url, &["saga", "list", "--json"]).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["id"], "order-1");
    assert_eq!(listed[0]["name"], "booking");
    assert_eq!(listed[0]["state"], "failed");
    assert!(listed[0]["step"].is_string(), "{listed}");
    let shown = admin_json(&url, &["saga", "show", "order-1", "--json"]).await;
    assert!(
        shown["history"].as_array().is_some_and(|h| !h.is_empty()),
        "{shown}"
    );

    broken.store(false, Ordering::SeqCst);
    let run = admin(
        &url,
        &["saga", "retry", "--state", "failed", "--name", "booking"],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("retried 1"), "{run:?}");
    eventually("the saga compensates", || state(saga::State::Compensated)).await;
    assert_eq!(unbooked.load(Ordering::SeqCst), 1);
    // Again: nothing failed is left.
    let again = admin(&url, &["saga", "retry", "order-1"]).await;
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stdout.contains("it is compensated"), "{again:?}");
    let history = sagas.history("order-1").await.expect("history");
    assert!(history
        .iter()
        .any(|h| h.event == "retried" && h.detail.as_deref() == Some("by ops@test")));
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM messaging_admin.audit WHERE area = 'saga' \
             AND items = ARRAY['order-1']"
        )
        .await,
        1
    );
    drop(sagas);
    db.finish().await;
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let res = req.send().await.expect("the console answers");
    let status = res.status().as_u16();
    let text = res.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn two_consoles_retrying_one_group_publish_each_event_once() {
    let Some(b) = Broker::new("admin_consoles").await else {
        return;
    };
    const N: usize = 40;
    let ids = enqueue(&b.db.pool, &b.queue, N).await;
    let relay = b.relay().await;
    eventually("the events die", || async {
        count(
            &b.db.pool,
            "SELECT count(*) FROM outbox.events WHERE dead_at IS NOT NULL",
        )
        .await
            == N as i64
    })
    .await;
    let (one, two) = (
        Console::start(&b.db.url).await,
        Console::start(&b.db.url).await,
    );
    let client = reqwest::Client::new();
    let groups_url = format!("{}/api/outbox/groups", one.base);
    let groups = client
        .get(&groups_url)
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .expect("groups");
    assert_eq!(groups.status().as_u16(), 200);
    let groups: Value = serde_json::from_str(&groups.text().await.expect("body")).expect("json");
    assert_eq!(groups[0]["count"], N);
    let body = serde_json::json!({ "filter": groups[0]["filter"] }).to_string();

    // No token, a wrong one, another scheme: 401, whatever the path, and
    // nothing changes.
    let retry = |c: &Console| format!("{}/api/outbox/retry", c.base);
    for (token, path) in [
        (None, retry(&one)),
        (Some("alice-0123456789abcdeX"), retry(&one)),
        (Some(""), retry(&two)),
        (None, format!("{}/api/no/such/path", two.base)),
        (
            Some("wrong-wrong-wrong-wrong"),
            format!("{}/api/outbox/discard", two.base),
        ),
    ] {
        let (status, answer) = post(&client, &path, token, &body).await;
        assert_eq!(status, 401, "{token:?} {path}: {answer}");
    }
    let basic = client
        .get(format!("{}/api/whoami", one.base))
        .header("authorization", format!("Basic {TOKEN}"))
        .send()
        .await
        .expect("whoami");
    assert_eq!(basic.status().as_u16(), 401);
    assert_eq!(
        count(
            &b.db.pool,
            "SELECT count(*) FROM outbox.events WHERE dead_at IS NOT NULL"
        )
        .await,
        N as i64,
        "a 401 changed nothing"
    );
    assert_eq!(
        count(
            &b.db.pool,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'messaging_admin'"
        )
        .await,
        0,
        "a 401 ran nothing, not even the audit's migration"
    );

    // The queue exists; both consoles retry the group at once.
    b.declare().await;
    let (retry_one, retry_two) = (retry(&one), retry(&two));
    let (a, c) = tokio::join!(
        post(&client, &retry_one, Some(TOKEN), &body),
        post(&client, &retry_two, Some(TOKEN), &body)
    );
    assert_eq!((a.0, c.0), (200, 200), "{a:?} {c:?}");
    let changed = |r: &Value| -> Vec<String> {
        r["changed"]
            .as_array()
            .expect("changed")
            .iter()
            .map(|v| v.as_str().expect("id").to_owned())
            .collect()
    };
    let mut both = changed(&a.1);
    both.extend(changed(&c.1));
    both.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(both, expected, "each event retried by one console");
    eventually("the relay publishes them", || async {
        count(
            &b.db.pool,
            "SELECT count(*) FROM outbox.events WHERE published_at IS NOT NULL",
        )
        .await
            == N as i64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut published = b.drain().await;
    published.sort();
    assert_eq!(published, expected, "each event published once");
    // Audited by alice via the console, each event in one row.
    assert_eq!(
        count(
            &b.db.pool,
            "SELECT count(*) FROM messaging_admin.audit a, unnest(a.items) i \
             WHERE a.actor = 'alice' AND a.via = 'console' AND a.action = 'retry'"
        )
        .await,
        N as i64
    );
    // Once more, from the first console: nothing is dead.
    let (status, again) = post(&client, &retry_one, Some(TOKEN), &body).await;
    assert_eq!(status, 200);
    assert_eq!(changed(&again), Vec::<String>::new());

    one.stop().await;
    two.stop().await;
    relay.stop().await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_of_thousands_runs_in_audited_batches_once_each_from_two_processes() {
    let Some(db) = PgDatabase::create("admin_batches").await else {
        return;
    };
    let url = db.url.clone();
    outbox::migrate_postgres(&db.pool).await.expect("outbox");
    const N: usize = 2_400;
    enqueue(&db.pool, "payments", N).await;
    // Dead, as a relay leaves them (no relay runs here: they stay waiting
    // once retried).
    sqlx::query("UPDATE outbox.events SET dead_at = now(), attempts = 1, last_error = 'no route'")
        .execute(&db.pool)
        .await
        .expect("dead");
    let args = [
        "outbox",
        "retry",
        "--state",
        "dead",
        "--destination",
        "payments",
        "--json",
    ];
    let (a, b) = tokio::join!(admin_json(&url, &args), admin_json(&url, &args));
    let ids = |r: &Value| -> Vec<String> {
        r["changed"]
            .as_array()
            .expect("changed")
            .iter()
            .map(|v| v.as_str().expect("id").to_owned())
            .collect()
    };
    let (ia, ib) = (ids(&a), ids(&b));
    assert_eq!(
        ia.len() + ib.len(),
        N,
        "each event retried by one: {} + {}",
        ia.len(),
        ib.len()
    );
    let mut all: Vec<&String> = ia.iter().chain(&ib).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), N, "no event retried twice");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox.events WHERE dead_at IS NULL AND attempts = 0"
        )
        .await,
        N as i64
    );
    // At most 500 items a batch, one audit row each, each event in one row.
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT action_id::text, cardinality(items) FROM messaging_admin.audit \
         WHERE cardinality(items) > 0",
    )
    .fetch_all(&db.pool)
    .await
    .expect("audit");
    assert!(rows.len() >= N / 500, "{rows:?}");
    assert!(rows.iter().all(|(_, n)| *n <= 500), "{rows:?}");
    assert_eq!(rows.iter().map(|(_, n)| *n as usize).sum::<usize>(), N);
    let batches = a["batches"].as_u64().unwrap_or(0) + b["batches"].as_u64().unwrap_or(0);
    assert!(batches as usize >= N / 500, "{a} {b}");
    // Once more: nothing is dead, said so.
    let run = admin(&url, &args[..6]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("nothing to retry"), "{run:?}");
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_record_in_flight_past_its_lease_is_listed_and_discarded() {
    let Some(db) = PgDatabase::create("admin_records").await else {
        return;
    };
    let url = db.url.clone();
    // The SQL store's table (idempotency-sqlx's migrations), with one
    // record in flight past its lease and one still leased.
    for statement in [
        "CREATE SCHEMA idempotency",
        "CREATE TABLE idempotency.idempotency_records (id BYTEA PRIMARY KEY, \
         fingerprint BYTEA NOT NULL, token BYTEA NOT NULL, lease_until TIMESTAMPTZ NOT NULL, \
         expires_at TIMESTAMPTZ NOT NULL, outcome BYTEA, watched BOOLEAN NOT NULL DEFAULT false)",
        "INSERT INTO idempotency.idempotency_records VALUES \
         (decode(repeat('ab', 32), 'hex'), '\\x01', '\\x02', now() - interval '1 minute', \
          now() + interval '1 day', NULL, false), \
         (decode(repeat('cd', 32), 'hex'), '\\x01', '\\x02', now() + interval '1 minute', \
          now() + interval '1 day', NULL, false)",
    ] {
        sqlx::query(statement)
            .execute(&db.pool)
            .await
            .expect(statement);
    }
    let stuck = "ab".repeat(32);
    let leased = "cd".repeat(32);
    let listed = admin_json(&url, &["idempotency", "list", "--json"]).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["id"], stuck.as_str());
    assert_eq!(listed[0]["state"], "in-flight");
    // One still within its lease is left alone (its request may be running).
    let run = admin(&url, &["idempotency", "discard", &leased]).await;
    assert_eq!(run.code, 1, "{run:?}");
    let run = admin(&url, &["idempotency", "discard", &stuck]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM idempotency.idempotency_records"
        )
        .await,
        1
    );
    let run = admin(&url, &["idempotency", "show", &stuck]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("no idempotency record"), "{run:?}");
    db.finish().await;
}

/// The console bounds how long a client may take to send its headers: a
/// connection that sends half of them and then nothing is closed after
/// `http_serve::HEADER_READ_TIMEOUT` (5 s), and cannot pin the console's
/// sockets; a whole request still gets its answer.
#[tokio::test(flavor = "multi_thread")]
async fn the_console_closes_a_connection_that_never_finishes_its_headers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(db) = PgDatabase::create("admin_slow_headers").await else {
        return;
    };
    let console = Console::start(&db.url).await;
    let addr = console.base.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /api/outbox/list HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), slow.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the half-sent request still held its connection after {:?}",
        started.elapsed()
    );
    let answer = reqwest::Client::new()
        .get(format!("{}/api/outbox/list", console.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_ne!(answer.status(), reqwest::StatusCode::UNAUTHORIZED);
    console.stop().await;
    db.finish().await;
}
