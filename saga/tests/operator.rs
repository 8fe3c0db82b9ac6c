//! The operator functions on a real PostgreSQL (`DATABASE_URL`; skipped,
//! saying so, when it is unset): a `failed` instance retried after the fix
//! ends `compensated`; a compensation forced on a running instance that
//! waits on a step without a compensation undoes the steps below; each
//! function changes an instance once, whatever state it finds.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use saga::{operator, CallOutcome, Command, Saga, SagaConfig, Sagas, State, Step};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use test_support::{eventually, service_url, unique};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Booking {
    n: u32,
}

/// What the saga's steps did, seen by the test.
#[derive(Default)]
struct World {
    /// `unbook` fails while set.
    broken: AtomicBool,
    booked: AtomicU32,
    unbooked: AtomicU32,
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// `book` (local; compensated by `unbook`, local, failing while the world
/// is broken), then `pay` (a call, declined when `decline`) or `wait` (a
/// message whose reply never comes, with no compensation).
fn booking(name: &'static str, world: &Arc<World>, then_wait: bool) -> Saga<Booking> {
    let (w1, w2) = (Arc::clone(world), Arc::clone(world));
    let book = Step::local("book", move |_: &mut Booking, _, _| {
        let w = Arc::clone(&w1);
        Box::pin(async move {
            w.booked.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    })
    .compensate(Step::local("unbook", move |_: &mut Booking, _, _| {
        let w = Arc::clone(&w2);
        Box::pin(async move {
            if w.broken.load(Ordering::SeqCst) {
                return Err("the booking service is down".to_owned());
            }
            w.unbooked.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }));
    let second = if then_wait {
        Step::message("wait", |_: &Booking, _| Command::new("nowhere", "ping"))
            .on_reply(|_, _| Ok(()))
    } else {
        Step::call("pay", |_: Booking, _| async move {
            CallOutcome::Failed("declined".into())
        })
    };
    Saga::builder(name, 1)
        .step(book)
        .step(second)
        .step_timeout(Duration::from_secs(3600))
        .compensation_retry(Duration::from_millis(10), Duration::from_millis(20), 2)
        .build()
        .expect("definition")
}

async fn setup(
    test: &str,
    world: &Arc<World>,
    then_wait: bool,
) -> Option<(PgPool, Sagas, &'static str)> {
    let url = service_url("DATABASE_URL", test)?;
    let pool = PgPool::connect(&url).await.expect("connect");
    outbox::migrate_postgres(&pool).await.expect("outbox");
    saga::migrate(&pool).await.expect("saga");
    let name = leak(unique("booking"));
    let sagas = Sagas::builder(pool.clone())
        .register(booking(name, world, then_wait))
        .config(SagaConfig {
            poll_interval: Duration::from_millis(20),
            ..SagaConfig::default()
        })
        .build();
    Some((pool, sagas, name))
}

async fn state(sagas: &Sagas, id: &str) -> State {
    sagas.instance(id).await.unwrap().expect("instance").state
}

async fn run_until(sagas: &Sagas, id: &str, want: State) {
    eventually(&format!("instance {id} {}", want.as_str()), || async {
        sagas.run_due().await.expect("round");
        state(sagas, id).await == want
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_instance_retried_after_the_fix_ends_compensated() {
    let world = Arc::new(World::default());
    world.broken.store(true, Ordering::SeqCst);
    let Some((pool, sagas, name)) = setup("operator_retry", &world, false).await else {
        return;
    };
    let id = unique("b");
    let mut tx = pool.begin().await.unwrap();
    sagas
        .start(&mut tx, name, &id, &Booking { n: 1 })
        .await
        .unwrap();
    tx.commit().await.unwrap();
    run_until(&sagas, &id, State::Failed).await;
    assert_eq!(world.unbooked.load(Ordering::SeqCst), 0);

    // Retrying is refused while nothing is due: no worker round changes it.
    sagas.run_due().await.unwrap();
    assert_eq!(state(&sagas, &id).await, State::Failed);

    world.broken.store(false, Ordering::SeqCst);
    let mut conn = pool.acquire().await.unwrap();
    let ids = vec![id.clone(), "no-such-instance".to_owned()];
    let changed = operator::retry_step(&mut conn, &ids, "ops@test")
        .await
        .unwrap();
    assert_eq!(changed, vec![id.clone()]);
    // Asked again before a worker ran: it is compensating now, and a retry
    // of a compensating instance only makes it due again.
    assert_eq!(state(&sagas, &id).await, State::Compensating);
    run_until(&sagas, &id, State::Compensated).await;
    assert_eq!(world.unbooked.load(Ordering::SeqCst), 1);

    // Ended: nothing to retry, resume or compensate, once or twice.
    for _ in 0..2 {
        assert!(operator::retry_step(&mut conn, &ids, "ops@test")
            .await
            .unwrap()
            .is_empty());
        assert!(operator::resume(&mut conn, &ids, "ops@test")
            .await
            .unwrap()
            .is_empty());
        assert!(operator::compensate(&mut conn, &ids, "ops@test")
            .await
            .unwrap()
            .is_empty());
    }
    let history = sagas.history(&id).await.unwrap();
    assert!(history
        .iter()
        .any(|h| h.event == "retried" && h.detail.as_deref() == Some("by ops@test")));

    // Discarded once: gone with its history.
    assert_eq!(
        operator::discard(&mut conn, &ids).await.unwrap(),
        vec![id.clone()]
    );
    assert!(operator::discard(&mut conn, &ids).await.unwrap().is_empty());
    assert!(sagas.instance(&id).await.unwrap().is_none());
    assert!(sagas.history(&id).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forced_compensation_passes_over_a_step_without_one() {
    let world = Arc::new(World::default());
    let Some((pool, sagas, name)) = setup("operator_compensate", &world, true).await else {
        return;
    };
    let id = unique("b");
    let mut tx = pool.begin().await.unwrap();
    sagas
        .start(&mut tx, name, &id, &Booking { n: 2 })
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // Booked, then waiting for a reply that never comes (a 1 h timeout).
    let view = sagas.instance(&id).await.unwrap().unwrap();
    assert_eq!((view.state, view.waiting), (State::Running, true));
    assert_eq!(view.step.as_deref(), Some("wait"));

    let mut conn = pool.acquire().await.unwrap();
    let ids = vec![id.clone()];
    // Discarding a running instance is refused.
    assert!(operator::discard(&mut conn, &ids).await.unwrap().is_empty());
    assert_eq!(
        operator::compensate(&mut conn, &ids, "ops@test")
            .await
            .unwrap(),
        ids
    );
    // A second request finds it compensating already: nothing changes.
    assert!(operator::compensate(&mut conn, &ids, "ops@test")
        .await
        .unwrap()
        .is_empty());
    run_until(&sagas, &id, State::Compensated).await;
    assert_eq!(world.booked.load(Ordering::SeqCst), 1);
    assert_eq!(world.unbooked.load(Ordering::SeqCst), 1);
    let view = sagas.instance(&id).await.unwrap().unwrap();
    assert_eq!(
        view.failure.as_deref(),
        Some("compensation forced by ops@test")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_fires_a_waiting_instances_timer_now() {
    let world = Arc::new(World::default());
    let Some((pool, sagas, name)) = setup("operator_resume", &world, true).await else {
        return;
    };
    let id = unique("b");
    let mut tx = pool.begin().await.unwrap();
    sagas
        .start(&mut tx, name, &id, &Booking { n: 3 })
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let ids = vec![id.clone()];
    assert_eq!(
        operator::resume(&mut conn, &ids, "ops@test").await.unwrap(),
        ids
    );
    // Its wait timed out now: the step compensates, as its definition says.
    run_until(&sagas, &id, State::Compensated).await;
    let history = sagas.history(&id).await.unwrap();
    assert!(history.iter().any(|h| h.event == "timed out"));
    assert_eq!(world.unbooked.load(Ordering::SeqCst), 1);
}
