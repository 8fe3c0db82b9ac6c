//! The runtime on a real PostgreSQL (`DATABASE_URL`; skipped, saying so,
//! when it is unset): transitions in one transaction, replies through the
//! transactional inbox, timers, calls, workers racing, bad input, and a
//! worker process killed between a reply's arrival and its commit, and
//! between the commit and the ack.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use inbox_consumer::{Inbox, InboxConfig, InboxMessage, Outcome, PostgresInbox};
use saga::{
    reply_headers, CallOutcome, Command, OnTimeout, ReplyError, Saga, SagaConfig, Sagas, State,
    Step,
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use test_support::{bounded, eventually, service_url, unique};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    sku: String,
    payment: Option<String>,
}

/// The calls a test's "payments service" saw, by idempotency key.
#[derive(Default)]
struct Payments {
    calls: Mutex<HashMap<String, u32>>,
    /// Answer `Uncertain` this many times first.
    flaky: AtomicU32,
    /// Answer `Failed` (declined).
    decline: std::sync::atomic::AtomicBool,
}

impl Payments {
    fn call(&self, key: &str) -> CallOutcome<()> {
        *self
            .calls
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_default() += 1;
        if self.decline.load(Ordering::SeqCst) {
            return CallOutcome::Failed("declined".into());
        }
        let flaky = self.flaky.load(Ordering::SeqCst);
        if flaky > 0 {
            self.flaky.store(flaky - 1, Ordering::SeqCst);
            return CallOutcome::Uncertain("timed out".into());
        }
        CallOutcome::Done(())
    }

    fn calls(&self, key: &str) -> u32 {
        self.calls.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// An order saga of its own name (workers of other tests never take it):
/// reserve (message, 300 ms timeout, compensated by release), charge (a
/// call to `payments`).
fn order(name: &'static str, payments: &Arc<Payments>) -> Saga<Order> {
    let p = Arc::clone(payments);
    Saga::builder(name, 1)
        .step(
            Step::message("reserve", |o: &Order, _| {
                Command::json(
                    "inventory",
                    &serde_json::json!({"type": "reserve", "sku": o.sku}),
                )
            })
            .on_reply(|_, reply| {
                let v: serde_json::Value = reply.json()?;
                match v["type"].as_str() {
                    Some("reserved") => Ok(()),
                    Some("rejected") => Err(ReplyError::failed("out of stock")),
                    _ => Err(ReplyError::Undecodable(format!(
                        "not an inventory reply: {v}"
                    ))),
                }
            })
            .timeout(Duration::from_millis(300), OnTimeout::Compensate)
            .compensate(
                Step::message("release", |_: &Order, _| {
                    Command::json("inventory", &serde_json::json!({"type": "release"}))
                })
                .on_reply(|_, _| Ok(())),
            ),
        )
        .step(Step::call("charge", move |mut o: Order, ctx| {
            let p = Arc::clone(&p);
            async move {
                match p.call(&ctx.idempotency_key()) {
                    CallOutcome::Done(()) => {
                        o.payment = Some(format!("pay-{}", ctx.instance));
                        CallOutcome::Done(o)
                    }
                    CallOutcome::Failed(r) => CallOutcome::Failed(r),
                    CallOutcome::Uncertain(r) => CallOutcome::Uncertain(r),
                }
            }
        }))
        .call_retry(Duration::from_millis(20), Duration::from_millis(100))
        .build()
        .expect("definition")
}

struct Env {
    pool: PgPool,
    sagas: Sagas,
    inbox: PostgresInbox,
    payments: Arc<Payments>,
    name: &'static str,
    url: String,
}

async fn env(test: &str) -> Option<Env> {
    let url = service_url("DATABASE_URL", test)?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .expect("connect");
    outbox::migrate_postgres(&pool).await.expect("outbox");
    saga::migrate(&pool).await.expect("saga");
    let inbox = Inbox::postgres(
        pool.clone(),
        InboxConfig::builder(unique("orders")).build().unwrap(),
    )
    .await
    .expect("inbox");
    let payments = Arc::new(Payments::default());
    let name = leak(unique("order"));
    let sagas = Sagas::builder(pool.clone())
        .register(order(name, &payments))
        .config(SagaConfig {
            poll_interval: Duration::from_millis(20),
            call_lease: Duration::from_millis(500),
            ..SagaConfig::default()
        })
        .build();
    Some(Env {
        pool,
        sagas,
        inbox,
        payments,
        name,
        url,
    })
}

/// A test leaves nothing behind in the shared database, passed or failed:
/// its inbox rows, and its saga's instances and their history.
impl Drop for Env {
    fn drop(&mut self) {
        let (url, consumer, name) = (
            self.url.clone(),
            self.inbox.consumer().to_owned(),
            self.name,
        );
        // Drop runs inside the test's runtime, where nothing can be awaited:
        // a thread of its own with a runtime and a connection of its own.
        let cleaned = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                use sqlx::Connection as _;
                let mut conn = sqlx::PgConnection::connect(&url).await?;
                for sql in [
                    "DELETE FROM inbox_consumer.messages WHERE consumer = $1",
                    "DELETE FROM inbox_consumer.attempts WHERE consumer = $1",
                ] {
                    sqlx::query(sql).bind(&consumer).execute(&mut conn).await?;
                }
                sqlx::query(
                    "DELETE FROM saga.history WHERE instance_id IN \
                     (SELECT id FROM saga.instances WHERE name = $1)",
                )
                .bind(name)
                .execute(&mut conn)
                .await?;
                sqlx::query("DELETE FROM saga.instances WHERE name = $1")
                    .bind(name)
                    .execute(&mut conn)
                    .await?;
                conn.close().await
            })
        })
        .join();
        if let Ok(Err(e)) = cleaned {
            eprintln!("could not clean up after the test: {e}");
        }
    }
}

/// The commands the saga enqueued for instance `id`, oldest first, as the
/// service's inbox would receive them.
async fn commands(pool: &PgPool, id: &str) -> Vec<InboxMessage> {
    let rows: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT id::text, headers::text, payload FROM outbox.events \
         WHERE ordering_key = $1 ORDER BY seq",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .expect("outbox rows");
    rows.into_iter()
        .map(|(event, headers, payload)| {
            let headers: Vec<(String, String)> = serde_json::from_str(&headers).unwrap();
            headers
                .into_iter()
                .fold(InboxMessage::new(Some(event), payload), |m, (n, v)| {
                    m.with_header(n, v)
                })
        })
        .collect()
}

/// The reply of the service to `command`: its correlation headers, a new id.
fn reply_to(command: &InboxMessage, body: &str) -> InboxMessage {
    reply_headers(command).into_iter().fold(
        InboxMessage::new(Some(unique("reply")), body.as_bytes().to_vec()),
        |m, (n, v)| m.with_header(n, v),
    )
}

async fn start(env: &Env, id: &str) {
    let mut tx = env.pool.begin().await.unwrap();
    let data = Order {
        sku: "sku-1".into(),
        payment: None,
    };
    env.sagas
        .start(&mut tx, env.name, id, &data)
        .await
        .expect("start");
    tx.commit().await.unwrap();
}

async fn state(env: &Env, id: &str) -> State {
    env.sagas
        .instance(id)
        .await
        .unwrap()
        .expect("instance")
        .state
}

async fn work_until(env: &Env, id: &str, want: State) {
    bounded(&format!("instance {id} to reach {want:?}"), async {
        while state(env, id).await != want {
            env.sagas.run_due().await.expect("a round");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_start_leaves_nothing() {
    let Some(env) = env("a_rolled_back_start_leaves_nothing").await else {
        return;
    };
    let id = unique("ord");
    let mut tx = env.pool.begin().await.unwrap();
    let data = Order {
        sku: "sku-1".into(),
        payment: None,
    };
    env.sagas
        .start(&mut tx, env.name, &id, &data)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(env.sagas.instance(&id).await.unwrap().is_none());
    assert!(commands(&env.pool, &id).await.is_empty(), "no command left");
    // A started one: its first command is in the outbox, in the same commit.
    start(&env, &id).await;
    let sent = commands(&env.pool, &id).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].header("saga-action"), Some("reserve"));
    assert_eq!(sent[0].header("saga-phase"), Some("forward"));
    assert!(matches!(
        {
            let mut tx = env.pool.begin().await.unwrap();
            env.sagas.start(&mut tx, env.name, &id, &data).await
        },
        Err(saga::SagaError::Duplicate(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_and_a_call_complete_it_each_once() {
    let Some(env) = env("a_reply_and_a_call_complete_it_each_once").await else {
        return;
    };
    env.payments.flaky.store(2, Ordering::SeqCst);
    let id = unique("ord");
    start(&env, &id).await;
    let reserve = commands(&env.pool, &id).await.remove(0);
    let reply = reply_to(&reserve, r#"{"type":"reserved"}"#);
    assert!(matches!(
        env.sagas.process_reply(&env.inbox, &reply).await,
        Outcome::Processed { .. }
    ));
    // Redelivered: the inbox drops it.
    assert!(matches!(
        env.sagas.process_reply(&env.inbox, &reply).await,
        Outcome::Duplicate
    ));
    work_until(&env, &id, State::Completed).await;
    let view = env.sagas.instance(&id).await.unwrap().unwrap();
    assert_eq!(view.data["payment"], format!("pay-{id}"));
    let key = format!("{}-{id}-charge", env.name);
    assert_eq!(
        env.payments.calls(&key),
        3,
        "two uncertain answers, then done, one key"
    );
    let events: Vec<String> = env
        .sagas
        .history(&id)
        .await
        .unwrap()
        .into_iter()
        .map(|h| format!("{} {}", h.event, h.step.unwrap_or_default()))
        .collect();
    assert_eq!(
        events.iter().filter(|e| *e == "done reserve").count(),
        1,
        "{events:?}"
    );
    assert_eq!(events.last().map(String::as_str), Some("completed "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_compensates_and_the_late_reply_changes_nothing() {
    let Some(env) = env("a_timeout_compensates_and_the_late_reply_changes_nothing").await else {
        return;
    };
    let id = unique("ord");
    start(&env, &id).await;
    let reserve = commands(&env.pool, &id).await.remove(0);
    tokio::time::sleep(Duration::from_millis(350)).await;
    work_until(&env, &id, State::Compensating).await;
    let late = reply_to(&reserve, r#"{"type":"reserved"}"#);
    assert!(matches!(
        env.sagas.process_reply(&env.inbox, &late).await,
        Outcome::Processed { .. }
    ));
    assert_eq!(
        state(&env, &id).await,
        State::Compensating,
        "the late reply changed nothing"
    );
    let release = commands(&env.pool, &id).await.remove(1);
    assert_eq!(release.header("saga-action"), Some("release"));
    env.sagas
        .process_reply(&env.inbox, &reply_to(&release, r#"{"type":"released"}"#))
        .await;
    assert_eq!(state(&env, &id).await, State::Compensated);
    assert_eq!(env.payments.calls(&format!("{}-{id}-charge", env.name)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replies_are_acknowledged_or_dead_lettered_and_change_nothing() {
    let Some(env) = env("bad_replies_are_acknowledged_or_dead_lettered").await else {
        return;
    };
    let id = unique("ord");
    start(&env, &id).await;
    let reserve = commands(&env.pool, &id).await.remove(0);
    // No saga headers: dead.
    let stray = InboxMessage::new(Some(unique("m")), &b"{}"[..]);
    assert!(matches!(
        env.sagas.process_reply(&env.inbox, &stray).await,
        Outcome::Dead { .. }
    ));
    // A reply the step cannot read: dead, and the instance still waits.
    let garbled = reply_to(&reserve, r#"{"type":"teleported"}"#);
    assert!(matches!(
        env.sagas.process_reply(&env.inbox, &garbled).await,
        Outcome::Dead { .. }
    ));
    // A reply for an unknown instance, or a step it does not wait for: acknowledged.
    let mut unknown = InboxMessage::new(Some(unique("m")), &br#"{"type":"reserved"}"#[..]);
    for (n, v) in [
        ("saga-id", "nobody"),
        ("saga-action", "reserve"),
        ("saga-phase", "forward"),
    ] {
        unknown = unknown.with_header(n, v);
    }
    assert!(matches!(
        env.sagas.process_reply(&env.inbox, &unknown).await,
        Outcome::Processed { .. }
    ));
    let mut wrong_step = InboxMessage::new(Some(unique("m")), &br#"{"type":"reserved"}"#[..]);
    for (n, v) in [
        ("saga-id", id.as_str()),
        ("saga-action", "charge"),
        ("saga-phase", "forward"),
    ] {
        wrong_step = wrong_step.with_header(n, v);
    }
    assert!(matches!(
        env.sagas.process_reply(&env.inbox, &wrong_step).await,
        Outcome::Processed { .. }
    ));
    let view = env.sagas.instance(&id).await.unwrap().unwrap();
    assert_eq!(
        (view.state, view.step.as_deref(), view.waiting),
        (State::Running, Some("reserve"), true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_that_does_not_decode_fails_the_instance() {
    let Some(env) = env("data_that_does_not_decode_fails_the_instance").await else {
        return;
    };
    let id = unique("ord");
    start(&env, &id).await;
    sqlx::query("UPDATE saga.instances SET data = '{\"nope\": 1}', due_at = now() WHERE id = $1")
        .bind(&id)
        .execute(&env.pool)
        .await
        .unwrap();
    env.sagas.run_due().await.unwrap();
    let view = env.sagas.instance(&id).await.unwrap().unwrap();
    assert_eq!(view.state, State::Failed);
    assert!(view.failure.unwrap().contains("does not decode"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_this_process_lacks_is_left_alone() {
    let Some(env) = env("a_version_this_process_lacks_is_left_alone").await else {
        return;
    };
    let id = unique("ord");
    start(&env, &id).await;
    sqlx::query("UPDATE saga.instances SET version = 2, due_at = now() WHERE id = $1")
        .bind(&id)
        .execute(&env.pool)
        .await
        .unwrap();
    let round = env.sagas.run_due().await.unwrap();
    assert_eq!(round.claimed, 0, "not taken");
    let view = env.sagas.instance(&id).await.unwrap().unwrap();
    assert_eq!((view.state, view.version), (State::Running, 2), "untouched");
    // Its reply is not applied with the wrong version's steps: retried later.
    let reserve = commands(&env.pool, &id).await.remove(0);
    let outcome = env
        .sagas
        .process_reply(&env.inbox, &reply_to(&reserve, r#"{"type":"reserved"}"#))
        .await;
    assert!(matches!(outcome, Outcome::Failed { .. }), "{outcome:?}");
    assert!(env.sagas.instance(&id).await.unwrap().unwrap().waiting);
}

/// Four workers race over 40 instances whose charge is due: each call is
/// made once per attempt (no instance is taken twice), every instance
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_workers_take_each_instance_once() {
    let Some(env) = env("racing_workers_take_each_instance_once").await else {
        return;
    };
    let ids: Vec<String> = (0..40).map(|_| unique("ord")).collect();
    for id in &ids {
        start(&env, id).await;
        let reserve = commands(&env.pool, id).await.remove(0);
        env.sagas
            .process_reply(&env.inbox, &reply_to(&reserve, r#"{"type":"reserved"}"#))
            .await;
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let sagas = env.sagas.clone();
            let mut stopped = stopped.clone();
            tokio::spawn(async move {
                sagas
                    .run(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    })
                    .await;
            })
        })
        .collect();
    eventually("every instance completed", || async {
        let mut done = true;
        for id in &ids {
            done &= state(&env, id).await == State::Completed;
        }
        done
    })
    .await;
    stop.send_replace(true);
    for w in workers {
        w.await.unwrap();
    }
    for id in &ids {
        assert_eq!(
            env.payments.calls(&format!("{}-{id}-charge", env.name)),
            1,
            "{id}"
        );
    }
}

/// A worker process (this test binary, re-run) handles a reply and is
/// SIGKILLed before its commit, then (another instance) after its commit
/// and before the ack: either way the transition happens exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_around_its_commit_transitions_once() {
    let Some(env) = env("a_worker_killed_around_its_commit_transitions_once").await else {
        return;
    };
    for when in ["before-commit", "after-commit"] {
        let id = unique("ord");
        start(&env, &id).await;
        let reserve = commands(&env.pool, &id).await.remove(0);
        let reply = reply_to(&reserve, r#"{"type":"reserved"}"#);
        let ready = std::env::temp_dir().join(unique("saga-crash"));
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--nocapture", "--include-ignored"])
            .env("SAGA_CRASH_WHEN", when)
            .env("SAGA_CRASH_NAME", env.name)
            .env("SAGA_CRASH_INBOX", env.inbox.consumer())
            .env("SAGA_CRASH_READY", &ready)
            .env(
                "SAGA_CRASH_REPLY",
                serde_json::to_string(&(reply.id(), reply.headers())).unwrap(),
            )
            .spawn()
            .expect("the child");
        bounded("the child to reach its point", async {
            while !ready.exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        let _ = std::fs::remove_file(&ready);
        let after_crash = env.sagas.instance(&id).await.unwrap().unwrap();
        // The redelivery, now in this process.
        let outcome = env.sagas.process_reply(&env.inbox, &reply).await;
        match when {
            "before-commit" => {
                assert!(after_crash.waiting, "the killed transaction rolled back");
                assert!(matches!(outcome, Outcome::Processed { .. }), "{outcome:?}");
            }
            _ => {
                assert!(!after_crash.waiting, "the transition committed");
                assert!(matches!(outcome, Outcome::Duplicate), "{outcome:?}");
            }
        }
        let done: usize = env
            .sagas
            .history(&id)
            .await
            .unwrap()
            .iter()
            .filter(|h| h.event == "done" && h.step.as_deref() == Some("reserve"))
            .count();
        assert_eq!(done, 1, "{when}: the reserve transition happened once");
    }
}

/// The child of [`a_worker_killed_around_its_commit_transitions_once`]:
/// handles the reply, then waits to be killed before or after its commit.
#[tokio::test]
#[ignore = "run by a_worker_killed_around_its_commit_transitions_once as a child process"]
async fn crash_child() {
    let Ok(when) = std::env::var("SAGA_CRASH_WHEN") else {
        return;
    };
    let url = std::env::var("DATABASE_URL").unwrap();
    let pool = PgPool::connect(&url).await.unwrap();
    let name = leak(std::env::var("SAGA_CRASH_NAME").unwrap());
    let sagas = Sagas::builder(pool.clone())
        .register(order(name, &Arc::new(Payments::default())))
        .build();
    let inbox = Inbox::postgres(
        pool,
        InboxConfig::builder(std::env::var("SAGA_CRASH_INBOX").unwrap())
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let (id, headers): (Option<String>, Vec<(String, String)>) =
        serde_json::from_str(&std::env::var("SAGA_CRASH_REPLY").unwrap()).unwrap();
    let reply = headers.into_iter().fold(
        InboxMessage::new(id, &br#"{"type":"reserved"}"#[..]),
        |m, (n, v)| m.with_header(n, v),
    );
    let ready = std::env::var("SAGA_CRASH_READY").unwrap();
    if when == "before-commit" {
        let sagas2 = sagas.clone();
        let ready2 = ready.clone();
        inbox
            .process(&reply, move |tx, m| {
                Box::pin(async move {
                    sagas2.handle_reply(tx, m).await?;
                    std::fs::write(&ready2, b"ready").unwrap();
                    // Killed here, the transaction open.
                    std::future::pending::<()>().await;
                    Ok(())
                })
            })
            .await;
    } else {
        let outcome = sagas.process_reply(&inbox, &reply).await;
        assert!(matches!(outcome, Outcome::Processed { .. }));
        std::fs::write(&ready, b"ready").unwrap();
        // Killed here: committed, never acked.
        std::future::pending::<()>().await;
    }
}

/// A transition that keeps failing (here its command is larger than the
/// outbox takes) leaves its instance due, and rolls back each time; the
/// workers try it again every poll interval, not back to back: a worker
/// that moved nothing on in a round pauses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_that_keeps_failing_is_tried_each_poll_interval_not_in_a_loop() {
    let Some(env) = env("a_transition_that_keeps_failing").await else {
        return;
    };
    let tries = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&tries);
    let name = leak(unique("spin"));
    let saga = Saga::builder(name, 1)
        .step(
            Step::message("send", move |_: &Order, ctx| {
                if ctx.attempt < 2 {
                    return Command::new("nowhere", &b"{}"[..]);
                }
                // The retry's command: over the outbox's size limit.
                counted.fetch_add(1, Ordering::SeqCst);
                Command::new("nowhere", vec![b'x'; outbox::DEFAULT_MAX_EVENT_SIZE + 1])
            })
            .on_reply(|_, _| Ok(()))
            .timeout(Duration::from_millis(50), OnTimeout::Retry { attempts: 5 }),
        )
        .build()
        .expect("definition");
    let poll = Duration::from_millis(100);
    let sagas = Sagas::builder(env.pool.clone())
        .register(saga)
        .config(SagaConfig {
            poll_interval: poll,
            ..SagaConfig::default()
        })
        .build();
    let id = unique("spin");
    let mut tx = env.pool.begin().await.unwrap();
    let data = Order {
        sku: "sku-1".into(),
        payment: None,
    };
    sagas.start(&mut tx, name, &id, &data).await.expect("start");
    tx.commit().await.unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;

    let round = sagas.run_due().await.expect("a round");
    assert_eq!(
        round.claimed, 0,
        "a transition that rolled back moved nothing on"
    );
    assert_eq!(tries.load(Ordering::SeqCst), 1, "it was tried");
    let ran = Duration::from_secs(1);
    bounded("the worker", sagas.run(tokio::time::sleep(ran))).await;
    let tries = tries.load(Ordering::SeqCst);
    let most = 3 + (ran.as_millis() / poll.as_millis()) as u32;
    assert!(
        tries <= most,
        "tried {tries} times in {ran:?} with a {poll:?} poll interval (at most {most} expected): \
         the worker loops without pausing"
    );
    assert_eq!(
        sagas.instance(&id).await.unwrap().unwrap().state,
        State::Running,
        "still due, unchanged"
    );
}
