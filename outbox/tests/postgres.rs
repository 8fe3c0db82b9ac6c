//! The outbox and the relay on a real PostgreSQL (`DATABASE_URL`), through an
//! in-memory publisher. Each test has its own database.
#![cfg(feature = "postgres")]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{MemoryPublisher, PgEnv};
use outbox::{Event, EventError, OutboxError, PostgresRelay, PublishError, RelayConfig};

fn fast() -> outbox::RelayConfigBuilder {
    RelayConfig::builder()
        .poll_interval(Duration::from_millis(50))
        .outage_delay(Duration::from_millis(20))
        .retry_delay(Duration::from_millis(10), Duration::from_millis(40))
}

#[tokio::test]
async fn a_rolled_back_event_is_never_published_a_committed_one_once() {
    let Some(env) = PgEnv::new("a_rolled_back_event_is_never_published_a_committed_one_once").await
    else {
        return;
    };
    let gone = Event::new("payments", &b"rolled back"[..]);
    let mut tx = env.pool.begin().await.unwrap();
    outbox::enqueue(&mut *tx, &gone).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(env.seq(gone.id()).await, None);

    // Any connection works, not only a transaction.
    let kept = Event::new("payments", &b"{\"amount\":1}"[..])
        .with_ordering_key("acct-1")
        .with_header("content-type", "application/json")
        .with_header("x-trace", "t-1");
    let mut conn = env.pool.acquire().await.unwrap();
    outbox::enqueue(&mut *conn, &kept).await.unwrap();
    drop(conn);

    let publisher = MemoryPublisher::new();
    let relay = PostgresRelay::new(env.pool.clone(), publisher.clone(), fast().build().unwrap());
    let report = relay.run_once().await.unwrap();
    assert_eq!((report.claimed, report.published), (1, 1));
    assert_eq!(relay.run_once().await.unwrap().claimed, 0);
    let seen = publisher.confirmed();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].id, kept.id());
    assert_eq!(seen[0].payload, b"{\"amount\":1}");
    assert_eq!(seen[0].key.as_deref(), Some("acct-1"));
    assert_eq!(seen[0].headers, kept.headers());
    assert_eq!(seen[0].attempt, 1);
    let (attempts, dead, _, published) = env.state(kept.id()).await;
    assert_eq!((attempts, dead, published), (0, false, true));
    assert_eq!(relay.metrics().published, 1);
    env.finish().await;
}

#[tokio::test]
async fn typed_errors_for_invalid_events_and_duplicate_ids() {
    let Some(env) = PgEnv::new("typed_errors_for_invalid_events_and_duplicate_ids").await else {
        return;
    };
    let mut tx = env.pool.begin().await.unwrap();
    let e = outbox::enqueue(&mut *tx, &Event::new("", &b"x"[..]))
        .await
        .unwrap_err();
    assert!(
        matches!(e, OutboxError::Event(EventError::EmptyDestination)),
        "{e:?}"
    );
    let big = Event::new("q", vec![0u8; outbox::DEFAULT_MAX_EVENT_SIZE + 1]);
    let e = outbox::enqueue(&mut *tx, &big).await.unwrap_err();
    assert!(
        matches!(e, OutboxError::Event(EventError::TooLarge { max, .. }) if max == outbox::DEFAULT_MAX_EVENT_SIZE),
        "{e:?}"
    );
    let e = outbox::enqueue_with_max_size(&mut *tx, &Event::new("q", vec![0u8; 100]), 50)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            OutboxError::Event(EventError::TooLarge { size: 101, max: 50 })
        ),
        "{e:?}"
    );
    let e = outbox::enqueue(
        &mut *tx,
        &Event::new("q", &b""[..]).with_header("bad name", "v"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, OutboxError::Event(EventError::InvalidHeader { .. })),
        "{e}"
    );
    // The refused events never touched the transaction: it is still usable.
    let ok = Event::new("q", &b"ok"[..]);
    outbox::enqueue(&mut *tx, &ok).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(env.count("true").await, 1);

    let mut tx = env.pool.begin().await.unwrap();
    let again = Event::new("q", &b"again"[..]).with_id(ok.id());
    let e = outbox::enqueue(&mut *tx, &again).await.unwrap_err();
    assert!(
        matches!(e, OutboxError::DuplicateId(id) if id == ok.id()),
        "{e:?}"
    );
    assert!(std::error::Error::source(&e).is_none());
    tx.rollback().await.unwrap();
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_of_one_key_commit_in_seq_order() {
    let Some(env) = PgEnv::new("producers_of_one_key_commit_in_seq_order").await else {
        return;
    };
    let mut first = env.pool.begin().await.unwrap();
    let a = Event::new("q", &b"a"[..]).with_ordering_key("k");
    outbox::enqueue(&mut *first, &a).await.unwrap();
    // A second producer of the key waits for the first to end...
    let pool = env.pool.clone();
    let b = Event::new("q", &b"b"[..]).with_ordering_key("k");
    let b_id = b.id();
    let done = Arc::new(AtomicBool::new(false));
    let second = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            outbox::enqueue(&mut *tx, &b).await.unwrap();
            done.store(true, Ordering::SeqCst);
            tx.commit().await.unwrap();
        })
    };
    // ...while a producer of another key does not.
    let other = Event::new("q", &b"c"[..]).with_ordering_key("other");
    common::bounded("another key", env.enqueue(&other)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !done.load(Ordering::SeqCst),
        "the second producer of k did not wait"
    );
    first.commit().await.unwrap();
    common::bounded("second producer", second).await.unwrap();
    let (sa, sb) = (env.seq(a.id()).await.unwrap(), env.seq(b_id).await.unwrap());
    assert!(sa < sb, "{sa} < {sb}");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_publish_1000_events_over_10_keys_once_and_in_order() {
    let Some(env) = PgEnv::new("two_relays_publish_1000_events_over_10_keys").await else {
        return;
    };
    const N: usize = 1000;
    // Keyless events too, to share the work by SKIP LOCKED.
    let mut tx = env.pool.begin().await.unwrap();
    for e in common::keyed_events("payments", N, 10) {
        outbox::enqueue(&mut *tx, &e).await.unwrap();
    }
    for i in 0..200 {
        outbox::enqueue(
            &mut *tx,
            &Event::new("audit", format!("free:{i}").into_bytes()),
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();

    // One broker, two relays (each with its own claim transactions).
    let broker = MemoryPublisher::new().with_delay(Duration::from_millis(2));
    let config = fast().batch_size(50).build().unwrap();
    let relays: Vec<_> = (0..2)
        .map(|_| PostgresRelay::new(env.pool.clone(), broker.clone(), config.clone()))
        .collect();
    let stop = Arc::new(tokio::sync::Notify::new());
    let started = Instant::now();
    let handles: Vec<_> = relays
        .iter()
        .map(|r| {
            let (r, stop) = (r.clone(), stop.clone());
            tokio::spawn(async move { r.run(async move { stop.notified().await }).await })
        })
        .collect();
    common::eventually("all published", || async {
        env.count("published_at IS NULL").await == 0
    })
    .await;
    let took = started.elapsed();
    stop.notify_waiters();
    for h in handles {
        common::bounded("relay stops", h).await.unwrap().unwrap();
    }
    let seen = broker.confirmed();
    let keyed: Vec<_> = seen
        .iter()
        .filter(|s| s.destination == "payments")
        .map(|s| s.payload.clone())
        .collect();
    common::assert_per_key_order(&keyed, N);
    assert_eq!(keyed.len(), N, "no duplicates without failures");
    assert_eq!(seen.len(), N + 200);
    let m: Vec<_> = relays.iter().map(PostgresRelay::metrics).collect();
    assert_eq!(m[0].published + m[1].published, (N + 200) as u64);
    eprintln!(
        "two relays: {} events in {took:?} ({:.0}/s); split {} / {}",
        N + 200,
        (N + 200) as f64 / took.as_secs_f64(),
        m[0].published,
        m[1].published
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_and_relays_keep_each_key_in_order() {
    let Some(env) = PgEnv::new("concurrent_producers_and_relays_keep_each_key_in_order").await
    else {
        return;
    };
    const N: usize = 400;
    let broker = MemoryPublisher::new();
    let config = fast().batch_size(7).build().unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let relays: Vec<_> = (0..3)
        .map(|_| {
            let relay = PostgresRelay::new(env.pool.clone(), broker.clone(), config.clone());
            let stop = stop.clone();
            tokio::spawn(async move { relay.run(async move { stop.notified().await }).await })
        })
        .collect();
    // Four producers, interleaving on the same keys; each event's payload
    // carries a per-key counter drawn inside the producer's transaction,
    // after enqueue took the key's lock.
    let counters: Arc<Vec<AtomicU32>> = Arc::new((0..5).map(|_| AtomicU32::new(0)).collect());
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let (pool, counters) = (env.pool.clone(), counters.clone());
            tokio::spawn(async move {
                for i in 0..N / 4 {
                    let k = (i + p) % 5;
                    let mut tx = pool.begin().await.unwrap();
                    // Take the key's lock first with a marker event, then
                    // draw the counter: the order the key's lock was granted.
                    let key = format!("key-{k}");
                    let id = outbox::Uuid::now_v7();
                    let n = {
                        // enqueue takes the lock; the counter is drawn after it.
                        let probe = Event::new("probe", Vec::new()).with_ordering_key(key.clone());
                        outbox::enqueue(&mut *tx, &probe).await.unwrap();
                        counters[k].fetch_add(1, Ordering::SeqCst)
                    };
                    let e = Event::new("payments", format!("{key}:{n}").into_bytes())
                        .with_ordering_key(key)
                        .with_id(id);
                    outbox::enqueue(&mut *tx, &e).await.unwrap();
                    tx.commit().await.unwrap();
                }
            })
        })
        .collect();
    for p in producers {
        common::bounded("producer", p).await.unwrap();
    }
    common::eventually("all published", || async {
        env.count("published_at IS NULL").await == 0
    })
    .await;
    stop.notify_waiters();
    for r in relays {
        common::bounded("relay stops", r).await.unwrap().unwrap();
    }
    let payloads: Vec<_> = broker
        .confirmed()
        .into_iter()
        .filter(|s| s.destination == "payments")
        .map(|s| s.payload)
        .collect();
    common::assert_per_key_order(&payloads, N);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_holds_events_and_publishing_resumes_without_a_restart() {
    let Some(env) = PgEnv::new("a_broker_outage_holds_events").await else {
        return;
    };
    let down = Arc::new(AtomicBool::new(true));
    let broker = {
        let down = down.clone();
        MemoryPublisher::scripted(move |_| {
            down.load(Ordering::SeqCst)
                .then(|| PublishError::unavailable("connection refused"))
        })
    };
    let relay = PostgresRelay::new(
        env.pool.clone(),
        broker.clone(),
        fast().max_attempts(2).build().unwrap(),
    );
    let stop = Arc::new(tokio::sync::Notify::new());
    let running = {
        let (relay, stop) = (relay.clone(), stop.clone());
        tokio::spawn(async move { relay.run(async move { stop.notified().await }).await })
    };
    let events = common::keyed_events("payments", 30, 3);
    for e in &events {
        env.enqueue(e).await;
    }
    // Many failed rounds, far more than max_attempts: none counts.
    common::eventually("the relay tried", || async {
        broker.attempts().len() >= 30 * 5
    })
    .await;
    assert_eq!(
        env.count("published_at IS NULL AND dead_at IS NULL AND attempts = 0")
            .await,
        30
    );
    assert!(broker.confirmed().is_empty());
    // One per key and round: a key stops at its first failure.
    assert!(
        relay.metrics().unavailable >= 3 * 5,
        "{:?}",
        relay.metrics()
    );
    assert!(relay.metrics().lag.is_some());
    down.store(false, Ordering::SeqCst);
    common::eventually("published after the outage", || async {
        env.count("published_at IS NULL").await == 0
    })
    .await;
    stop.notify_waiters();
    common::bounded("relay stops", running)
        .await
        .unwrap()
        .unwrap();
    let payloads: Vec<_> = broker.confirmed().into_iter().map(|s| s.payload).collect();
    common::assert_per_key_order(&payloads, 30);
    let m = relay.metrics();
    assert_eq!((m.published, m.dead, m.retried), (30, 0, 0));
    env.finish().await;
}

#[tokio::test]
async fn failures_retry_with_backoff_then_die_with_the_reason_kept() {
    let Some(env) = PgEnv::new("failures_retry_with_backoff_then_die").await else {
        return;
    };
    let poison = Event::new("payments", &b"poison"[..]).with_ordering_key("k");
    let behind = Event::new("payments", &b"behind"[..]).with_ordering_key("k");
    let free = Event::new("payments", &b"free"[..]).with_ordering_key("other");
    for e in [&poison, &behind, &free] {
        env.enqueue(e).await;
    }
    let poison_id = poison.id();
    let broker = MemoryPublisher::scripted(move |o| {
        (o.event().id() == poison_id)
            .then(|| PublishError::rejected(format!("nacked, attempt {}", o.attempt())))
    });
    let config = RelayConfig::builder()
        .max_attempts(3)
        .retry_delay(Duration::from_millis(200), Duration::from_secs(10))
        .build()
        .unwrap();
    let relay = PostgresRelay::new(env.pool.clone(), broker.clone(), config);

    let r = relay.run_once().await.unwrap();
    // The other key flows; the poison's key stops at it.
    assert_eq!(
        (r.claimed, r.published, r.retried, r.deferred),
        (3, 1, 1, 1),
        "{r:?}"
    );
    assert_eq!(
        env.state(poison.id()).await,
        (
            1,
            false,
            Some("the broker refused the event: nacked, attempt 1".into()),
            false
        )
    );
    assert_eq!(env.state(behind.id()).await.0, 0);
    // In backoff (200 ms): the key waits, `behind` is not taken past it.
    let r = relay.run_once().await.unwrap();
    assert_eq!(r.claimed, 0, "{r:?}");
    let waited = Instant::now();
    common::eventually("the second attempt", || async {
        relay.run_once().await.unwrap().claimed > 0
    })
    .await;
    assert!(
        waited.elapsed() >= Duration::from_millis(100),
        "{:?}",
        waited.elapsed()
    );
    assert_eq!(env.state(poison.id()).await.0, 2);
    // The third attempt comes after 400 ms and is the last.
    common::eventually("the third attempt", || async {
        relay.run_once().await.unwrap().dead == 1
    })
    .await;
    let (attempts, dead, error, published) = env.state(poison.id()).await;
    assert_eq!((attempts, dead, published), (3, true, false));
    assert_eq!(
        error.as_deref(),
        Some("the broker refused the event: nacked, attempt 3")
    );
    // Dead, it is skipped: its key goes on.
    let r = relay.run_once().await.unwrap();
    assert_eq!((r.claimed, r.published), (1, 1), "{r:?}");
    // `behind` was marked published only after the poison died. (The broker
    // saw copies of it before: batches are pipelined; see max_per_key.)
    let (dead_at, published_at): (f64, f64) = sqlx::query_as(
        "SELECT (SELECT EXTRACT(EPOCH FROM dead_at)::float8 FROM outbox.events WHERE id = $1::uuid), \
                (SELECT EXTRACT(EPOCH FROM published_at)::float8 FROM outbox.events WHERE id = $2::uuid)",
    )
    .bind(poison.id().to_string())
    .bind(behind.id().to_string())
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(dead_at <= published_at, "{dead_at} <= {published_at}");
    let free_copies = broker
        .confirmed()
        .iter()
        .filter(|s| s.payload == b"free")
        .count();
    assert_eq!(free_copies, 1);
    let attempts: Vec<_> = broker
        .attempts()
        .into_iter()
        .filter(|s| s.id == poison_id)
        .map(|s| s.attempt)
        .collect();
    assert_eq!(attempts, [1, 2, 3]);
    let m = relay.metrics();
    assert_eq!((m.published, m.retried, m.dead), (2, 2, 1));
    assert_eq!(relay.run_once().await.unwrap().claimed, 0);
    env.finish().await;
}

#[tokio::test]
async fn a_permanent_failure_dies_at_once_and_max_per_key_limits_a_batch() {
    let Some(env) = PgEnv::new("a_permanent_failure_dies_at_once").await else {
        return;
    };
    let bad = Event::new("nowhere", &b"x"[..]);
    env.enqueue(&bad).await;
    for e in common::keyed_events("payments", 6, 2) {
        env.enqueue(&e).await;
    }
    let broker = MemoryPublisher::scripted(|o| {
        (o.event().destination() == "nowhere").then(|| PublishError::permanent("no route"))
    });
    let relay = PostgresRelay::new(
        env.pool.clone(),
        broker.clone(),
        fast().max_per_key(1).build().unwrap(),
    );
    let r = relay.run_once().await.unwrap();
    assert_eq!((r.claimed, r.dead, r.published), (3, 1, 2), "{r:?}");
    assert!(env.state(bad.id()).await.1);
    for _ in 0..2 {
        assert_eq!(relay.run_once().await.unwrap().published, 2);
    }
    assert_eq!(relay.run_once().await.unwrap().claimed, 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_wakes_an_idle_relay_before_its_poll() {
    let Some(env) = PgEnv::new("a_notification_wakes_an_idle_relay").await else {
        return;
    };
    let broker = MemoryPublisher::new();
    let config = RelayConfig::builder()
        .poll_interval(Duration::from_secs(30))
        .build()
        .unwrap();
    let relay = PostgresRelay::new(env.pool.clone(), broker.clone(), config);
    let stop = Arc::new(tokio::sync::Notify::new());
    let running = {
        let (relay, stop) = (relay.clone(), stop.clone());
        tokio::spawn(async move { relay.run(async move { stop.notified().await }).await })
    };
    // Let it go idle (LISTEN, then wait).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..3 {
        let sent = Instant::now();
        env.enqueue(&Event::new("q", vec![i])).await;
        tokio::time::timeout(Duration::from_secs(5), async {
            while broker.confirmed().len() <= usize::from(i) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the notification did not wake the relay");
        eprintln!("enqueue to publish: {:?}", sent.elapsed());
    }
    stop.notify_waiters();
    common::bounded("relay stops", running)
        .await
        .unwrap()
        .unwrap();
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_batch_in_hand() {
    let Some(env) = PgEnv::new("shutdown_finishes_the_batch_in_hand").await else {
        return;
    };
    for i in 0..5u8 {
        env.enqueue(&Event::new("q", vec![i])).await;
    }
    let broker = MemoryPublisher::new().with_delay(Duration::from_millis(500));
    let relay = PostgresRelay::new(env.pool.clone(), broker.clone(), fast().build().unwrap());
    let batches = broker.batches.clone();
    let shutdown = async move {
        // Resolves while the first batch is at the broker.
        while batches.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    common::bounded("run", relay.run(shutdown)).await.unwrap();
    assert_eq!(broker.confirmed().len(), 5);
    assert_eq!(env.count("published_at IS NULL").await, 0);
    assert_eq!(broker.batches.load(Ordering::SeqCst), 1);
    env.finish().await;
}

#[tokio::test]
async fn purge_deletes_old_published_events_only_and_lag_is_measured() {
    let Some(env) = PgEnv::new("purge_deletes_old_published_events_only").await else {
        return;
    };
    for i in 0..5u8 {
        env.enqueue(&Event::new("q", vec![i])).await;
    }
    let broker = MemoryPublisher::new();
    let relay = PostgresRelay::new(
        env.pool.clone(),
        broker,
        fast().purge_batch(2).build().unwrap(),
    );
    assert_eq!(relay.run_once().await.unwrap().published, 5);
    let waiting = Event::new("q", &b"waiting"[..]);
    env.enqueue(&waiting).await;
    sqlx::query(
        "UPDATE outbox.events SET created_at = now() - interval '3 seconds' WHERE id = $1::uuid",
    )
    .bind(waiting.id().to_string())
    .execute(&env.pool)
    .await
    .unwrap();
    let lag = relay.lag().await.unwrap().unwrap();
    assert!(
        lag >= Duration::from_secs(3) && lag < Duration::from_secs(60),
        "{lag:?}"
    );
    sqlx::query("UPDATE outbox.events SET published_at = now() - interval '8 days' WHERE published_at IS NOT NULL AND payload IN ('\\x00'::bytea, '\\x01'::bytea, '\\x02'::bytea)")
        .execute(&env.pool)
        .await
        .unwrap();
    assert_eq!(relay.purge().await.unwrap(), 3);
    assert_eq!(relay.purge().await.unwrap(), 0);
    assert_eq!(env.count("true").await, 3);
    assert!(env.seq(waiting.id()).await.is_some());
    assert_eq!(relay.purge_older_than(Duration::ZERO).await.unwrap(), 2);
    assert_eq!(env.count("true").await, 1);
    assert_eq!(relay.metrics().purged, 5);
    relay.run_once().await.unwrap();
    assert_eq!(relay.lag().await.unwrap(), Some(Duration::ZERO));
    env.finish().await;
}

#[tokio::test]
async fn with_one_event_per_key_in_flight_the_order_holds_across_failures() {
    let Some(env) = PgEnv::new("with_one_event_per_key_in_flight").await else {
        return;
    };
    let events = common::keyed_events("payments", 6, 2);
    for e in &events {
        env.enqueue(e).await;
    }
    let head = events[0].id();
    let failures = Arc::new(AtomicU32::new(2));
    let broker = {
        let failures = failures.clone();
        MemoryPublisher::scripted(move |o| {
            (o.event().id() == head
                && failures
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok())
            .then(|| PublishError::rejected("nacked"))
        })
    };
    let relay = PostgresRelay::new(
        env.pool.clone(),
        broker.clone(),
        fast().max_per_key(1).build().unwrap(),
    );
    common::eventually("all published", || async {
        relay.run_once().await.unwrap();
        env.count("published_at IS NULL").await == 0
    })
    .await;
    let attempts: Vec<_> = broker
        .attempts()
        .into_iter()
        .filter(|s| s.key.as_deref() == Some("key-0"))
        .map(|s| String::from_utf8(s.payload).unwrap())
        .collect();
    assert_eq!(
        attempts,
        ["key-0:0", "key-0:0", "key-0:0", "key-0:2", "key-0:4"]
    );
    assert_eq!(relay.metrics().retried, 2);
    env.finish().await;
}

#[tokio::test]
async fn a_key_beyond_the_scan_window_is_not_starved_by_a_blocked_key() {
    let Some(env) = PgEnv::new("a_key_beyond_the_scan_window_is_not_starved").await else {
        return;
    };
    // batch_size 1: the head scan looks at the oldest 10 keyed events.
    let blocked = common::keyed_events("payments", 15, 1);
    for e in &blocked {
        env.enqueue(e).await;
    }
    let head = blocked[0].id();
    let late = Event::new("payments", &b"late"[..]).with_ordering_key("late");
    env.enqueue(&late).await;
    let broker = MemoryPublisher::scripted(move |o| {
        (o.event().id() == head).then(|| PublishError::rejected("nacked"))
    });
    let config = RelayConfig::builder()
        .batch_size(1)
        .retry_delay(Duration::from_secs(60), Duration::from_secs(60))
        .build()
        .unwrap();
    let relay = PostgresRelay::new(env.pool.clone(), broker.clone(), config);
    assert_eq!(relay.run_once().await.unwrap().retried, 1);
    let r = relay.run_once().await.unwrap();
    assert_eq!((r.claimed, r.published), (1, 1), "{r:?}");
    assert_eq!(broker.confirmed()[0].payload, b"late");
    assert_eq!(relay.run_once().await.unwrap().claimed, 0);
    env.finish().await;
}

/// A row that is not an event (written around `enqueue`: headers that are
/// not a list of pairs) is marked dead with the reason, once; the events
/// around it, keyed (the same key after it) and keyless, are published, and
/// the relay is not stuck on it.
#[tokio::test]
async fn an_unreadable_row_dies_with_its_reason_and_blocks_nothing() {
    let Some(env) = PgEnv::new("an_unreadable_row_dies").await else {
        return;
    };
    let keyed_bad = Event::new("payments", &b"bad"[..]).with_ordering_key("k");
    let keyed_next = Event::new("payments", &b"next"[..]).with_ordering_key("k");
    let keyless_bad = Event::new("payments", &b"bad2"[..]);
    let keyless_ok = Event::new("payments", &b"ok"[..]);
    for e in [&keyed_bad, &keyed_next, &keyless_bad, &keyless_ok] {
        env.enqueue(e).await;
    }
    for bad in [&keyed_bad, &keyless_bad] {
        sqlx::query(
            "UPDATE outbox.events SET headers = '{\"not\": \"pairs\"}' WHERE id = $1::uuid",
        )
        .bind(bad.id().to_string())
        .execute(&env.pool)
        .await
        .unwrap();
    }
    let broker = MemoryPublisher::new();
    let relay = PostgresRelay::new(env.pool.clone(), broker.clone(), fast().build().unwrap());
    for _ in 0..4 {
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
    assert_eq!(published, [b"next".to_vec(), b"ok".to_vec()]);
    for bad in [&keyed_bad, &keyless_bad] {
        let (attempts, dead, error, was_published) = env.state(bad.id()).await;
        assert!(dead && !was_published, "{attempts} {error:?}");
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("unreadable row")),
            "{error:?}"
        );
    }
    assert_eq!(relay.run_once().await.unwrap().claimed, 0);
    env.finish().await;
}
