//! A saga transition against a bare transaction that makes the same writes,
//! measured in one run and interleaved, on PostgreSQL:
//!
//! - `transition`: a reply through the transactional inbox
//!   (`Sagas::process_reply`): the inbox row, the instance locked and
//!   updated, two history rows, the next step's command enqueued in the
//!   outbox, the timer set: one commit.
//! - `bare`: the same writes by hand in one transaction: `INSERT` of an
//!   inbox row, `SELECT ... FOR UPDATE` and `UPDATE` of an instance row,
//!   an `INSERT` of two history rows, `outbox::enqueue`, `COMMIT`.
//!
//! Target: transition ≤ 1.3× bare. Then transitions per second with 4
//! tasks at once (each on instances of its own), against the bare
//! transaction at the same concurrency: `transitions_4` and `bare_4`
//! time 64 transitions (16 per task).
//!
//! `DATABASE_URL` is read at run time; the bench is skipped when it is
//! unset.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::Criterion;
use inbox_consumer::{Inbox, InboxConfig, InboxMessage, PostgresInbox};
use saga::{Command, Saga, Sagas, Step};
use sqlx::PgPool;

const GROUP: &str = "saga";
/// Message steps in the bench saga: an instance takes this many replies.
const STEPS: usize = 400;
/// Instances replied to round-robin (several, so that no row is hot).
const INSTANCES: usize = 64;

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A chain of message steps `s0 ... s{STEPS-1}`: every reply sends the next
/// command.
fn chain() -> Saga<serde_json::Value> {
    let mut b = Saga::builder("bench_chain", 1);
    for i in 0..STEPS {
        let name = leak(format!("s{i}"));
        b = b.step(
            Step::message(name, |_: &serde_json::Value, _| {
                Command::new("bench_saga_commands", &b"{\"type\":\"next\"}"[..])
            })
            .on_reply(|_, _| Ok(())),
        );
    }
    b.build().expect("the bench definition")
}

/// The instances being driven and the step each waits for.
struct Driver {
    sagas: Sagas,
    inbox: PostgresInbox,
    pool: PgPool,
    /// (instance, step it waits for)
    instances: Mutex<Vec<(String, usize)>>,
    next: AtomicUsize,
    run: String,
}

impl Driver {
    async fn start(&self, n: usize) -> Vec<(String, usize)> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let id = format!("{}-{}", self.run, self.next.fetch_add(1, Ordering::Relaxed));
            let mut tx = self.pool.begin().await.expect("begin");
            self.sagas
                .start(&mut tx, "bench_chain", &id, &serde_json::json!({}))
                .await
                .expect("start");
            tx.commit().await.expect("commit");
            out.push((id, 0));
        }
        out
    }

    /// One transition: the reply to the step instance `slot` waits for.
    async fn transition(&self, slot: usize) {
        let (id, step) = {
            let mut instances = self.instances.lock().unwrap();
            let entry = &mut instances[slot % INSTANCES];
            let now = entry.clone();
            entry.1 += 1;
            now
        };
        let id = if step + 1 >= STEPS {
            // Worn out: a fresh instance takes the slot.
            let fresh = self.start(1).await.remove(0);
            self.instances.lock().unwrap()[slot % INSTANCES] = (fresh.0.clone(), 1);
            fresh.0
        } else {
            id
        };
        let step = if step + 1 >= STEPS { 0 } else { step };
        let reply = InboxMessage::new(Some(format!("{id}-r{step}")), &b"{\"type\":\"done\"}"[..])
            .with_header("saga-id", id.clone())
            .with_header("saga-action", format!("s{step}"))
            .with_header("saga-phase", "forward");
        let outcome = self.sagas.process_reply(&self.inbox, &reply).await;
        assert!(
            matches!(outcome, inbox_consumer::Outcome::Processed { .. }),
            "{outcome:?}"
        );
    }

    /// The same writes by hand.
    async fn bare(&self, n: usize) {
        let id = format!("{}-bare-{}", self.run, n % INSTANCES);
        let mut tx = self.pool.begin().await.expect("begin");
        sqlx::query(
            "INSERT INTO inbox_consumer.messages (consumer, message_id, attempts) VALUES ($1, $2, 1)",
        )
        .bind(self.inbox.consumer())
        .bind(format!("{id}-b{}", self.next.fetch_add(1, Ordering::Relaxed)))
        .execute(&mut *tx)
        .await
        .expect("inbox row");
        let _: (String, String) =
            sqlx::query_as("SELECT id, data::text FROM saga.instances WHERE id = $1 FOR UPDATE")
                .bind(&id)
                .fetch_one(&mut *tx)
                .await
                .expect("lock");
        sqlx::query(
            "UPDATE saga.instances SET step = step + 1, waiting = true, attempt = 1, \
             due_at = now() + interval '30 seconds', data = $2::jsonb, updated_at = now() WHERE id = $1",
        )
        .bind(&id)
        .bind("{}")
        .execute(&mut *tx)
        .await
        .expect("update");
        sqlx::query(
            "INSERT INTO saga.history (instance_id, event, step, detail) \
             SELECT $1, e, s, d FROM unnest($2::text[], $3::text[], $4::text[]) AS h(e, s, d)",
        )
        .bind(&id)
        .bind(vec!["done", "sent"])
        .bind(vec![Some("s0"), Some("s1")])
        .bind(vec![None::<String>, Some("attempt 1".into())])
        .execute(&mut *tx)
        .await
        .expect("history");
        let event = outbox::Event::new("bench_saga_commands", &b"{\"type\":\"next\"}"[..])
            .with_ordering_key(id.clone())
            .with_header("saga-id", id.clone())
            .with_header("saga-action", "s1");
        outbox::enqueue(&mut *tx, &event).await.expect("enqueue");
        tx.commit().await.expect("commit");
    }
}

fn main() {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        eprintln!("saga bench skipped: DATABASE_URL is not set");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let driver = rt.block_on(async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("DATABASE_URL");
        outbox::migrate_postgres(&pool).await.expect("outbox");
        saga::migrate(&pool).await.expect("saga");
        let run = format!("bench-{:x}", std::process::id());
        let inbox = Inbox::postgres(
            pool.clone(),
            InboxConfig::builder(run.clone()).build().unwrap(),
        )
        .await
        .expect("inbox");
        let sagas = Sagas::builder(pool.clone()).register(chain()).build();
        let driver = Driver {
            sagas,
            inbox,
            pool: pool.clone(),
            instances: Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
            run,
        };
        let started = driver.start(INSTANCES).await;
        *driver.instances.lock().unwrap() = started;
        // The bare path's own instances, to lock and update.
        for i in 0..INSTANCES {
            let id = format!("{}-bare-{i}", driver.run);
            sqlx::query(
                "INSERT INTO saga.instances (id, name, version, state, step, data) \
                 VALUES ($1, 'bench_bare', 1, 'running', 0, '{}')",
            )
            .bind(&id)
            .execute(&pool)
            .await
            .expect("bare instance");
        }
        Arc::new(driver)
    });
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(2));
    let mut group = c.benchmark_group(GROUP);
    let slot = AtomicUsize::new(0);
    group.bench_function("transition", |b| {
        b.to_async(&rt)
            .iter(|| driver.transition(slot.fetch_add(1, Ordering::Relaxed)));
    });
    group.bench_function("bare", |b| {
        b.to_async(&rt)
            .iter(|| driver.bare(slot.fetch_add(1, Ordering::Relaxed)));
    });
    // 64 at a time, 4 tasks of 16: per iteration, 64 transitions.
    group.bench_function("transitions_4", |b| {
        b.to_async(&rt).iter(|| {
            let driver = Arc::clone(&driver);
            let base = slot.fetch_add(64, Ordering::Relaxed);
            async move {
                let tasks: Vec<_> = (0..4)
                    .map(|t| {
                        let driver = Arc::clone(&driver);
                        tokio::spawn(async move {
                            // Each task on instances of its own (slots t, t+4, ...).
                            for k in 0..16 {
                                driver
                                    .transition(t + 4 * ((base / 4 + k) % (INSTANCES / 4)))
                                    .await;
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("task");
                }
            }
        });
    });
    group.bench_function("bare_4", |b| {
        b.to_async(&rt).iter(|| {
            let driver = Arc::clone(&driver);
            let base = slot.fetch_add(64, Ordering::Relaxed);
            async move {
                let tasks: Vec<_> = (0..4)
                    .map(|t| {
                        let driver = Arc::clone(&driver);
                        tokio::spawn(async move {
                            for k in 0..16 {
                                driver
                                    .bare(t + 4 * ((base / 4 + k) % (INSTANCES / 4)))
                                    .await;
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("task");
                }
            }
        });
    });
    group.finish();
    c.final_summary();
}
