//! The relay's metrics through the `metrics` facade, seen by `metrics-util`'s
//! `DebuggingRecorder`: `outbox_events_total{relay,outcome}` for every
//! outcome, `outbox_batches_total`, `outbox_database_errors_total` and
//! `outbox_purged_total`, counted exactly and equal to `Relay::metrics`,
//! registered at 0 when the relay is created; and the `outbox_lag_seconds`
//! gauge, set by `Relay::lag` and by the run loop, rising while events wait
//! and back to 0 once they are published. On PostgreSQL (`DATABASE_URL`, a
//! private database per test; skipped with the reason printed when unset)
//! and on SQLite (a temporary file; always runs), through the in-memory
//! publisher.
#![cfg(any(feature = "postgres", feature = "sqlite"))]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::MemoryPublisher;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use outbox::metrics::{
    label, outcome, BATCHES_TOTAL, DATABASE_ERRORS_TOTAL, EVENTS_TOTAL, LAG_SECONDS, PURGED_TOTAL,
};
use outbox::{Event, OutboxDatabase, PublishError, Relay, RelayConfig, RelayMetrics, Uuid};
use test_support::recorder::recorded;

/// An outbox on one database, for the scenarios below.
trait Outbox {
    type DB: OutboxDatabase;

    fn pool(&self) -> sqlx::Pool<Self::DB>;

    /// Enqueues `event` in its own committed transaction.
    async fn enqueue(&self, event: &Event);

    /// Makes the row of `id` unreadable (headers that are not pairs).
    async fn corrupt(&self, id: Uuid);
}

#[cfg(feature = "postgres")]
struct Pg(common::PgEnv);

#[cfg(feature = "postgres")]
impl Pg {
    /// `None` (with the reason printed) when `DATABASE_URL` is unset.
    async fn new(test: &str) -> Option<Self> {
        test_support::service_url("DATABASE_URL", test)?;
        Some(Self(
            common::PgEnv::new(test).await.expect("DATABASE_URL is set"),
        ))
    }
}

#[cfg(feature = "postgres")]
impl Outbox for Pg {
    type DB = sqlx::Postgres;

    fn pool(&self) -> sqlx::PgPool {
        self.0.pool.clone()
    }

    async fn enqueue(&self, event: &Event) {
        self.0.enqueue(event).await;
    }

    async fn corrupt(&self, id: Uuid) {
        sqlx::query(
            "UPDATE outbox.events SET headers = '{\"not\": \"pairs\"}' WHERE id = $1::uuid",
        )
        .bind(id.to_string())
        .execute(&self.0.pool)
        .await
        .unwrap();
    }
}

#[cfg(feature = "sqlite")]
struct Lite {
    pool: sqlx::SqlitePool,
    _file: test_support::TempDb,
}

#[cfg(feature = "sqlite")]
impl Lite {
    async fn new() -> Self {
        use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
        let file = test_support::TempDb::new("outbox_metrics");
        let options = SqliteConnectOptions::new()
            .filename(&file.path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(2));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .unwrap();
        outbox::migrate_sqlite(&pool).await.unwrap();
        Self { pool, _file: file }
    }
}

#[cfg(feature = "sqlite")]
impl Outbox for Lite {
    type DB = sqlx::Sqlite;

    fn pool(&self) -> sqlx::SqlitePool {
        self.pool.clone()
    }

    async fn enqueue(&self, event: &Event) {
        let mut tx = self.pool.begin().await.unwrap();
        outbox::enqueue(&mut *tx, event).await.unwrap();
        tx.commit().await.unwrap();
    }

    async fn corrupt(&self, id: Uuid) {
        sqlx::query("UPDATE outbox_events SET headers = '{\"not\": \"pairs\"}' WHERE id = ?")
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .unwrap();
    }
}

/// A series: its name and its labels.
type Series = (String, Vec<(String, String)>);

/// What the recorder saw. A snapshot resets the recorder's counters and
/// gauges: the counters are added up over every snapshot taken; a gauge is
/// what the last snapshot read (set since the one before, or 0).
struct Seen {
    snapshotter: Snapshotter,
    counters: HashMap<Series, u64>,
    gauges: HashMap<Series, f64>,
    units: HashMap<String, Option<metrics::Unit>>,
    described: Vec<String>,
}

impl Seen {
    fn new(recorder: &DebuggingRecorder) -> Self {
        Self {
            snapshotter: recorder.snapshotter(),
            counters: HashMap::new(),
            gauges: HashMap::new(),
            units: HashMap::new(),
            described: Vec::new(),
        }
    }

    /// Takes a snapshot.
    fn take(&mut self) {
        self.gauges.clear();
        for (key, unit, description, value) in self.snapshotter.snapshot().into_vec() {
            let key = key.key();
            let series = (
                key.name().to_owned(),
                key.labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect(),
            );
            self.units.insert(key.name().to_owned(), unit);
            if description.is_some() && !self.described.iter().any(|n| n == key.name()) {
                self.described.push(key.name().to_owned());
            }
            match value {
                DebugValue::Counter(n) => *self.counters.entry(series).or_default() += n,
                DebugValue::Gauge(v) => {
                    self.gauges.insert(series, v.into_inner());
                }
                DebugValue::Histogram(_) => {}
            }
        }
    }

    fn labels(relay: &str, outcome: Option<&str>) -> Vec<(String, String)> {
        let mut labels = vec![(label::RELAY.to_owned(), relay.to_owned())];
        if let Some(o) = outcome {
            labels.push((label::OUTCOME.to_owned(), o.to_owned()));
        }
        labels
    }

    /// The counter `name` of `relay` (and `outcome`), `None` if never registered.
    fn counter(&self, name: &str, relay: &str, outcome: Option<&str>) -> Option<u64> {
        self.counters
            .get(&(name.to_owned(), Self::labels(relay, outcome)))
            .copied()
    }

    /// The lag gauge of `relay` in the last snapshot.
    fn lag(&self, relay: &str) -> Option<f64> {
        self.gauges
            .get(&(LAG_SECONDS.to_owned(), Self::labels(relay, None)))
            .copied()
    }

    /// Every count of `relay`, in the shape of `RelayMetrics` (0 if absent).
    fn totals(&self, relay: &str) -> [u64; 8] {
        let c = |name, o| self.counter(name, relay, o).unwrap_or(0);
        [
            c(EVENTS_TOTAL, Some(outcome::PUBLISHED)),
            c(EVENTS_TOTAL, Some(outcome::RETRIED)),
            c(EVENTS_TOTAL, Some(outcome::DEAD)),
            c(EVENTS_TOTAL, Some(outcome::UNAVAILABLE)),
            c(EVENTS_TOTAL, Some(outcome::DEFERRED)),
            c(BATCHES_TOTAL, None),
            c(DATABASE_ERRORS_TOTAL, None),
            c(PURGED_TOTAL, None),
        ]
    }
}

/// `RelayMetrics`' counts, in the order of [`Seen::totals`].
fn counts(m: &RelayMetrics) -> [u64; 8] {
    [
        m.published,
        m.retried,
        m.dead,
        m.unavailable,
        m.deferred,
        m.batches,
        m.database_errors,
        m.purged,
    ]
}

/// Sets `relay`'s lag gauge to a value no measure gives, through the same
/// recorder, so that reading 0 afterwards proves the relay set it.
fn poke_lag(relay: &str) {
    metrics::gauge!(LAG_SECONDS, label::RELAY => relay.to_owned()).set(1e9);
}

/// Publishes some events, retries one until it dies behind which another of
/// its key is deferred twice, kills one at once, finds one unavailable once,
/// marks an unreadable row dead, purges, then fails three times on a closed
/// pool: every count exact, in the facade and in `Relay::metrics`; the lag
/// gauge set by `Relay::lag`, above the age of the waiting events, then 0.
async fn every_count_exact<O: Outbox>(outbox: &O, seen: &mut Seen) {
    let name = test_support::unique("relay");
    let ok: Vec<_> = (0..3).map(|i| Event::new("payments", vec![i])).collect();
    let poison = Event::new("payments", &b"poison"[..]).with_ordering_key("k");
    let behind = Event::new("payments", &b"behind"[..]).with_ordering_key("k");
    let permanent = Event::new("nowhere", &b"permanent"[..]);
    let flaky = Event::new("payments", &b"flaky"[..]);
    let unreadable = Event::new("payments", &b"unreadable"[..]);
    let (poison_id, permanent_id, flaky_id) = (poison.id(), permanent.id(), flaky.id());
    let flaked = AtomicBool::new(false);
    let broker = MemoryPublisher::scripted(move |o| {
        let id = o.event().id();
        if id == poison_id {
            Some(PublishError::rejected("nacked"))
        } else if id == permanent_id {
            Some(PublishError::permanent("no route"))
        } else if id == flaky_id && !flaked.swap(true, Ordering::SeqCst) {
            Some(PublishError::unavailable("connection lost"))
        } else {
            None
        }
    });
    let config = RelayConfig::builder()
        .max_attempts(2)
        // Long enough for the rounds between the poison's two attempts.
        .retry_delay(Duration::from_secs(1), Duration::from_secs(1))
        .build()
        .unwrap();
    let relay = Relay::named(outbox.pool(), broker.clone(), config, name.clone());
    assert_eq!(relay.name(), name);

    // Registered at 0 on creation; the gauge waits for its first measure.
    seen.take();
    assert_eq!(seen.totals(&name), [0; 8]);
    for o in outcome::ALL {
        assert_eq!(seen.counter(EVENTS_TOTAL, &name, Some(o)), Some(0), "{o}");
    }
    for metric in [BATCHES_TOTAL, DATABASE_ERRORS_TOTAL, PURGED_TOTAL] {
        assert_eq!(seen.counter(metric, &name, None), Some(0), "{metric}");
    }
    assert_eq!(seen.lag(&name), None);
    assert_eq!(relay.metrics().lag, None);

    for e in ok
        .iter()
        .chain([&poison, &behind, &permanent, &flaky, &unreadable])
    {
        outbox.enqueue(e).await;
    }
    outbox.corrupt(unreadable.id()).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let lag = relay.lag().await.unwrap().unwrap();
    assert!(lag >= Duration::from_millis(150), "{lag:?}");
    seen.take();
    let gauge = seen.lag(&name).expect("the lag gauge is set by a measure");
    assert!(
        (gauge - lag.as_secs_f64()).abs() < 0.002,
        "{gauge} vs {lag:?}"
    );
    assert_eq!(
        relay.metrics().lag,
        Some(Duration::from_millis(lag.as_millis() as u64))
    );

    // Round 1: the three, the poison refused (behind it, its key's next one
    // deferred), the permanent one dead, the flaky one unavailable; the
    // unreadable row dead, outside the report.
    let r = relay.run_once().await.unwrap();
    assert_eq!(
        (
            r.claimed,
            r.published,
            r.retried,
            r.dead,
            r.unavailable,
            r.deferred
        ),
        (7, 3, 1, 1, 1, 1),
        "{r:?}"
    );
    // Round 2: the flaky one again (an outage is no attempt, no backoff);
    // the poison's key waits for its retry.
    let r = relay.run_once().await.unwrap();
    assert_eq!((r.claimed, r.published), (1, 1), "{r:?}");
    // A round that claims nothing counts no batch.
    assert_eq!(relay.run_once().await.unwrap().claimed, 0);
    // The poison's second and last attempt: dead; its key's next one deferred again.
    let mut r = relay.run_once().await.unwrap();
    while r.claimed == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        r = relay.run_once().await.unwrap();
    }
    assert_eq!(
        (r.claimed, r.dead, r.deferred, r.published),
        (2, 1, 1, 0),
        "{r:?}"
    );
    let r = relay.run_once().await.unwrap();
    assert_eq!((r.claimed, r.published), (1, 1), "{r:?}");
    assert_eq!(relay.run_once().await.unwrap().claimed, 0);
    // The deferred copies of `behind` reached the (pipelined) broker too.
    let confirmed = broker.confirmed();
    let copies = |id| confirmed.iter().filter(|s| s.id == id).count();
    assert_eq!((confirmed.len(), copies(behind.id())), (7, 3));

    // Nothing waits: the lag is 0, over the poked value.
    poke_lag(&name);
    assert_eq!(relay.lag().await.unwrap(), Some(Duration::ZERO));
    seen.take();
    assert_eq!(seen.lag(&name), Some(0.0));
    assert_eq!(relay.metrics().lag, Some(Duration::ZERO));

    assert_eq!(relay.purge_older_than(Duration::ZERO).await.unwrap(), 5);

    // The database gone: a round, a measure and a purge fail, counted once each.
    outbox.pool().close().await;
    relay.run_once().await.unwrap_err();
    poke_lag(&name);
    relay.lag().await.unwrap_err();
    relay.purge().await.unwrap_err();
    seen.take();
    assert_eq!(seen.lag(&name), Some(1e9), "a failed measure sets no lag");
    assert_eq!(relay.metrics().lag, Some(Duration::ZERO));

    // published, retried, dead, unavailable, deferred, batches, database errors, purged
    let expected = [5, 1, 3, 1, 2, 4, 3, 5];
    assert_eq!(seen.totals(&name), expected);
    assert_eq!(
        counts(&relay.metrics()),
        expected,
        "the facade and Relay::metrics agree"
    );
}

/// The run loop measures the lag by itself: the gauge rises while the
/// broker is down and the events wait, and is 0 once they are published;
/// the counts of the run agree with `Relay::metrics`; `describe` gives the
/// gauge its unit and every metric its help.
async fn the_run_loop_moves_the_lag<O: Outbox>(outbox: &O, seen: &mut Seen) {
    outbox::metrics::describe();
    let name = test_support::unique("relay");
    let down = Arc::new(AtomicBool::new(true));
    let broker = {
        let down = down.clone();
        MemoryPublisher::scripted(move |_| {
            down.load(Ordering::SeqCst)
                .then(|| PublishError::unavailable("down"))
        })
    };
    let config = RelayConfig::builder()
        .poll_interval(Duration::from_millis(50))
        .outage_delay(Duration::from_millis(20))
        .build()
        .unwrap();
    let relay = Relay::named(outbox.pool(), broker.clone(), config, name.clone());
    for i in 0..3u8 {
        outbox.enqueue(&Event::new("payments", vec![i])).await;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = relay.run(async {
        let _ = stopped.await;
    });
    let watch = async {
        let mut first = 0.0;
        test_support::eventually("the lag gauge passes 0.3 s", || {
            seen.take();
            first = seen.lag(&name).unwrap_or(0.0);
            std::future::ready(first >= 0.3)
        })
        .await;
        test_support::eventually("the lag gauge rises", || {
            seen.take();
            std::future::ready(seen.lag(&name).unwrap_or(0.0) > first)
        })
        .await;
        assert!(broker.confirmed().is_empty());
        down.store(false, Ordering::SeqCst);
        test_support::eventually("published after the outage", || {
            std::future::ready(broker.confirmed().len() == 3)
        })
        .await;
        // The idle relay measures at least every poll interval.
        loop {
            poke_lag(&name);
            tokio::time::sleep(Duration::from_millis(150)).await;
            seen.take();
            if seen.lag(&name) == Some(0.0) {
                break;
            }
        }
        stop.send(()).unwrap();
    };
    let (ran, ()) = test_support::bounded("the run", async { tokio::join!(run, watch) }).await;
    ran.unwrap();
    seen.take();
    let m = relay.metrics();
    assert_eq!(seen.totals(&name), counts(&m));
    assert_eq!(
        (m.published, m.retried, m.dead, m.database_errors),
        (3, 0, 0, 0)
    );
    assert!(m.unavailable >= 3, "{m:?}");
    assert!(m.batches > m.unavailable / 3, "{m:?}");
    assert_eq!(m.lag, Some(Duration::ZERO));
    assert_eq!(seen.units[LAG_SECONDS], Some(metrics::Unit::Seconds));
    for metric in [
        EVENTS_TOTAL,
        LAG_SECONDS,
        BATCHES_TOTAL,
        DATABASE_ERRORS_TOTAL,
        PURGED_TOTAL,
    ] {
        assert!(seen.described.iter().any(|n| n == metric), "{metric}");
    }
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_every_count_exact() {
    let recorder = DebuggingRecorder::new();
    let mut seen = Seen::new(&recorder);
    recorded(&recorder, async {
        let Some(pg) = Pg::new("postgres_every_count_exact").await else {
            return;
        };
        every_count_exact(&pg, &mut seen).await;
        pg.0.finish().await;
    });
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_the_run_loop_moves_the_lag() {
    let recorder = DebuggingRecorder::new();
    let mut seen = Seen::new(&recorder);
    recorded(&recorder, async {
        let Some(pg) = Pg::new("postgres_the_run_loop_moves_the_lag").await else {
            return;
        };
        the_run_loop_moves_the_lag(&pg, &mut seen).await;
        pg.0.finish().await;
    });
}

#[cfg(feature = "sqlite")]
#[test]
fn sqlite_every_count_exact() {
    let recorder = DebuggingRecorder::new();
    let mut seen = Seen::new(&recorder);
    recorded(&recorder, async {
        every_count_exact(&Lite::new().await, &mut seen).await;
    });
}

#[cfg(feature = "sqlite")]
#[test]
fn sqlite_the_run_loop_moves_the_lag() {
    let recorder = DebuggingRecorder::new();
    let mut seen = Seen::new(&recorder);
    recorded(&recorder, async {
        the_run_loop_moves_the_lag(&Lite::new().await, &mut seen).await;
    });
}
