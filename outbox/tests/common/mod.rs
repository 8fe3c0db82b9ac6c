//! Shared test helpers: service URLs, unique names, bounded waits, a private
//! PostgreSQL database per test, and an in-memory publisher.
#![allow(dead_code, unused_macros, unused_imports)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outbox::{Outgoing, PublishError, Publisher};

/// The URL in `var`, or `None` after printing why the test is skipped.
pub fn service_url(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipping {test}: {var} is not set");
            None
        }
    }
}

/// A name no other test (in this or a parallel process) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{nanos}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The upper bound of any wait in a test: a broken test fails, it never hangs.
pub const LIMIT: Duration = Duration::from_secs(60);

/// Runs `f` under [`LIMIT`].
pub async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {LIMIT:?}"),
    }
}

/// Waits until `check` holds, polling every 20 ms, under [`LIMIT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    bounded(what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// What a publisher saw: destination, ordering key, id, payload, headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub destination: String,
    pub key: Option<String>,
    pub id: outbox::Uuid,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub seq: i64,
    pub attempt: u32,
}

type Script = Arc<dyn Fn(&Outgoing) -> Option<PublishError> + Send + Sync>;

/// An in-memory broker: records what it confirms, in order; `script` decides
/// which events fail (and how); `delay` is how long each batch takes.
#[derive(Clone)]
pub struct MemoryPublisher {
    pub confirmed: Arc<Mutex<Vec<Seen>>>,
    pub attempts: Arc<Mutex<Vec<Seen>>>,
    script: Script,
    delay: Duration,
    pub batches: Arc<AtomicU32>,
}

impl MemoryPublisher {
    pub fn new() -> Self {
        Self::scripted(|_| None)
    }

    pub fn scripted(
        script: impl Fn(&Outgoing) -> Option<PublishError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            confirmed: Arc::default(),
            attempts: Arc::default(),
            script: Arc::new(script),
            delay: Duration::ZERO,
            batches: Arc::default(),
        }
    }

    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn confirmed(&self) -> Vec<Seen> {
        self.confirmed.lock().unwrap().clone()
    }

    pub fn attempts(&self) -> Vec<Seen> {
        self.attempts.lock().unwrap().clone()
    }
}

fn seen(o: &Outgoing) -> Seen {
    let e = o.event();
    Seen {
        destination: e.destination().to_owned(),
        key: e.ordering_key().map(str::to_owned),
        id: e.id(),
        payload: e.payload().to_vec(),
        headers: e.headers().to_vec(),
        seq: o.seq(),
        attempt: o.attempt(),
    }
}

impl Publisher for MemoryPublisher {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        batch
            .iter()
            .map(|o| {
                self.attempts.lock().unwrap().push(seen(o));
                match (self.script)(o) {
                    Some(e) => Err(e),
                    None => {
                        self.confirmed.lock().unwrap().push(seen(o));
                        Ok(())
                    }
                }
            })
            .collect()
    }
}

/// A private PostgreSQL database (created from `DATABASE_URL`), migrated.
#[cfg(feature = "postgres")]
pub struct PgEnv {
    pub pool: sqlx::PgPool,
    admin: sqlx::PgPool,
    name: String,
}

#[cfg(feature = "postgres")]
impl PgEnv {
    /// `None` (with the reason printed) when `DATABASE_URL` is unset.
    pub async fn new(test: &str) -> Option<Self> {
        let url = service_url("DATABASE_URL", test)?;
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .expect("PostgreSQL does not answer");
        let name = unique("outbox_t");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (url.as_str(), String::new()),
        };
        let root = &base[..base.rfind('/').expect("DATABASE_URL has no database")];
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&format!("{root}/{name}{query}"))
            .await
            .unwrap();
        outbox::migrate_postgres(&pool).await.unwrap();
        Some(Self { pool, admin, name })
    }

    /// Drops the database (a failed test leaves it behind, for a look).
    pub async fn finish(self) {
        self.pool.close().await;
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&self.admin)
        .await;
    }

    /// Enqueues `event` in its own committed transaction; returns its seq.
    pub async fn enqueue(&self, event: &outbox::Event) -> i64 {
        let mut tx = self.pool.begin().await.unwrap();
        outbox::enqueue(&mut *tx, event).await.unwrap();
        tx.commit().await.unwrap();
        self.seq(event.id()).await.expect("the event is stored")
    }

    pub async fn seq(&self, id: outbox::Uuid) -> Option<i64> {
        sqlx::query_scalar("SELECT seq FROM outbox.events WHERE id = $1::uuid")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .unwrap()
    }

    pub async fn count(&self, filter: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM outbox.events WHERE {filter}"
        ))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// attempts, dead, last_error, published of the event `id`.
    pub async fn state(&self, id: outbox::Uuid) -> (i32, bool, Option<String>, bool) {
        use sqlx::Row;
        let row = sqlx::query(
            "SELECT attempts, dead_at IS NOT NULL AS dead, last_error, published_at IS NOT NULL AS published \
             FROM outbox.events WHERE id = $1::uuid",
        )
        .bind(id.to_string())
        .fetch_one(&self.pool)
        .await
        .unwrap();
        (
            row.get("attempts"),
            row.get("dead"),
            row.get("last_error"),
            row.get("published"),
        )
    }
}

/// `n` events over `keys` keys, round-robin, payload `"<key>:<i>"`.
pub fn keyed_events(destination: &str, n: usize, keys: usize) -> Vec<outbox::Event> {
    (0..n)
        .map(|i| {
            let key = format!("key-{}", i % keys);
            outbox::Event::new(destination, format!("{key}:{i}").into_bytes())
                .with_ordering_key(key)
        })
        .collect()
}

/// Checks that, per key, the first sightings of the payloads `"<key>:<i>"`
/// come in increasing `i`, and that every one of `n` appears.
pub fn assert_per_key_order(payloads: &[Vec<u8>], n: usize) {
    use std::collections::{HashMap, HashSet};
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut seen = HashSet::new();
    for p in payloads {
        let s = String::from_utf8(p.clone()).unwrap();
        if !seen.insert(s.clone()) {
            continue; // a duplicate (at least once)
        }
        let (key, i) = s.split_once(':').unwrap();
        let i: i64 = i.parse().unwrap();
        if let Some(prev) = last.insert(key.to_owned(), i) {
            assert!(prev < i, "{key}: {i} came after {prev}");
        }
    }
    assert_eq!(seen.len(), n, "every event arrived");
}

/// The cuttable TCP proxy and the URL helpers every suite shares.
pub use test_support::{host_port, via, Proxy};
