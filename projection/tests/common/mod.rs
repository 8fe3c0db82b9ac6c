//! What the projection tests share: a private database per test, a payment
//! totals projection that also records how often each event was applied and
//! whether each key's events came in order, and the totals computed from the
//! outbox's own rows.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox::{Outgoing, PublishError, Publisher};
use projection::{ApplyError, Event, Projection, ProjectorConfig, Version};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};
use test_support::{service_url, unique};

/// A private PostgreSQL database (created from `DATABASE_URL`), migrated:
/// the outbox, its holds and its purge are the test's alone.
pub struct Db {
    pub pool: PgPool,
    pub url: String,
    admin: PgPool,
    name: String,
}

impl Db {
    /// `None` (with the reason printed) when `DATABASE_URL` is unset.
    pub async fn new(test: &str) -> Option<Self> {
        let url = service_url("DATABASE_URL", test)?;
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .expect("PostgreSQL does not answer");
        let name = unique("projection_t");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
        let url = database_url(&url, &name);
        let pool = Self::pool(&url, 16).await;
        projection::migrate(&pool).await.expect("migrate");
        Some(Self {
            pool,
            url,
            admin,
            name,
        })
    }

    /// Another pool on the test's database (a second process, say).
    pub async fn pool(url: &str, size: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(size)
            .connect(url)
            .await
            .expect("the test database")
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
}

/// `url` with its database replaced by `name`.
pub fn database_url(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let root = &base[..base.rfind('/').expect("DATABASE_URL has no database")];
    format!("{root}/{name}{query}")
}

/// A payment event's payload; `n` numbers the events of one account.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Payment {
    pub account: String,
    pub amount: i64,
    pub currency: String,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub poison: bool,
}

impl Payment {
    pub fn new(account: &str, amount: i64, currency: &str) -> Self {
        Self {
            account: account.to_owned(),
            amount,
            currency: currency.to_owned(),
            n: None,
            poison: false,
        }
    }

    pub fn event(&self) -> outbox::Event {
        outbox::Event::new("payments", serde_json::to_vec(self).unwrap())
            .with_ordering_key(self.account.clone())
    }
}

/// Per-currency totals, plus what the tests check: `seen` (how many times
/// each event was applied) and `accounts` (each account's last `n`, and how
/// often an event came out of order).
#[derive(Default, Clone)]
pub struct Totals {
    /// When set: the apply of the payment with this amount writes the file
    /// and never returns (a process to kill mid-apply).
    pub hang: Option<(i64, PathBuf)>,
    /// Apply slowly (ms), so a build takes a while.
    pub delay_ms: u64,
    /// Counts the applies that started.
    pub started: Arc<std::sync::atomic::AtomicU64>,
    pub hung: Arc<AtomicBool>,
}

impl Projection for Totals {
    async fn setup(&self, conn: &mut PgConnection, v: &Version) -> Result<(), sqlx::Error> {
        for ddl in [
            format!(
                "CREATE TABLE {} (currency TEXT PRIMARY KEY, total BIGINT NOT NULL, count BIGINT NOT NULL)",
                v.table("totals")
            ),
            format!(
                "CREATE TABLE {} (event_id TEXT PRIMARY KEY, times INT NOT NULL)",
                v.table("seen")
            ),
            format!(
                "CREATE TABLE {} (account TEXT PRIMARY KEY, last BIGINT NOT NULL, out_of_order INT NOT NULL)",
                v.table("accounts")
            ),
        ] {
            sqlx::query(&ddl).execute(&mut *conn).await?;
        }
        Ok(())
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        v: &Version,
        event: &Event,
    ) -> Result<(), ApplyError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let p: Payment = event.json()?;
        if p.poison {
            return Err(ApplyError::transient("poison: this payment always fails"));
        }
        if self.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.delay_ms)).await;
        }
        sqlx::query(&format!(
            "INSERT INTO {} AS t (currency, total, count) VALUES ($1, $2, 1) \
             ON CONFLICT (currency) DO UPDATE SET total = t.total + $2, count = t.count + 1",
            v.table("totals")
        ))
        .bind(&p.currency)
        .bind(p.amount)
        .execute(&mut *conn)
        .await?;
        sqlx::query(&format!(
            "INSERT INTO {} AS s (event_id, times) VALUES ($1, 1) \
             ON CONFLICT (event_id) DO UPDATE SET times = s.times + 1",
            v.table("seen")
        ))
        .bind(event.id())
        .execute(&mut *conn)
        .await?;
        if let Some(n) = p.n {
            sqlx::query(&format!(
                "INSERT INTO {} AS a (account, last, out_of_order) \
                   VALUES ($1, $2, CASE WHEN $2 = 1 THEN 0 ELSE 1 END) \
                 ON CONFLICT (account) DO UPDATE SET last = $2, \
                   out_of_order = a.out_of_order + CASE WHEN a.last + 1 = $2 THEN 0 ELSE 1 END",
                v.table("accounts")
            ))
            .bind(&p.account)
            .bind(n)
            .execute(&mut *conn)
            .await?;
        }
        if let Some((amount, ready)) = &self.hang {
            if *amount == p.amount {
                self.hung.store(true, Ordering::SeqCst);
                std::fs::write(ready, b"ready").unwrap();
                // Killed here, the transaction open.
                std::future::pending::<()>().await;
            }
        }
        Ok(())
    }
}

/// A config for tests: short waits.
pub fn fast() -> ProjectorConfig {
    ProjectorConfig {
        poll_interval: Duration::from_millis(200),
        outage_delay: Duration::from_millis(50),
        lag_interval: Duration::from_millis(50),
        retry_delay: Duration::from_millis(10),
        max_retry_delay: Duration::from_millis(40),
        served_ttl: Duration::from_millis(50),
        ..ProjectorConfig::default()
    }
}

/// Enqueues `p` in its own committed transaction; returns its seq.
pub async fn enqueue(pool: &PgPool, p: &Payment) -> i64 {
    let event = p.event();
    let mut tx = pool.begin().await.unwrap();
    outbox::enqueue(&mut *tx, &event).await.unwrap();
    tx.commit().await.unwrap();
    seq_of(pool, &event).await
}

pub async fn seq_of(pool: &PgPool, event: &outbox::Event) -> i64 {
    sqlx::query_scalar("SELECT seq FROM outbox.events WHERE id = $1::uuid")
        .bind(event.id().to_string())
        .fetch_one(pool)
        .await
        .unwrap()
}

pub type Sums = BTreeMap<String, (i64, i64)>;

/// Per-currency `(total, count)` of the payments committed to the outbox
/// (poison ones left out): what the model must hold.
pub async fn source_totals(pool: &PgPool) -> Sums {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT p->>'currency', sum((p->>'amount')::int8)::int8, count(*) \
         FROM (SELECT convert_from(payload, 'UTF8')::jsonb AS p FROM outbox.events \
               WHERE destination = 'payments') e \
         WHERE NOT COALESCE((p->>'poison')::bool, false) GROUP BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(c, t, n)| (c, (t, n))).collect()
}

/// The model's per-currency `(total, count)` in version `v`.
pub async fn model_totals(pool: &PgPool, v: &Version) -> Sums {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT currency, total, count FROM {}",
        v.table("totals")
    ))
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(c, t, n)| (c, (t, n))).collect()
}

/// `(events applied, the most times one was applied)` in version `v`.
pub async fn seen(pool: &PgPool, v: &Version) -> (i64, i32) {
    sqlx::query_as(&format!(
        "SELECT count(*), COALESCE(max(times), 0) FROM {}",
        v.table("seen")
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// `(accounts, events out of order)` in version `v`.
pub async fn order(pool: &PgPool, v: &Version) -> (i64, i64) {
    sqlx::query_as(&format!(
        "SELECT count(*), COALESCE(sum(out_of_order), 0)::int8 FROM {}",
        v.table("accounts")
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A publisher that confirms everything (for a relay that purges).
pub struct Confirming;

impl Publisher for Confirming {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        batch.iter().map(|_| Ok(())).collect()
    }
}
