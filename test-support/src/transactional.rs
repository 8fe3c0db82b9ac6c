//! The transactional-mode fixtures both adapters' tests use: a SQL store in
//! transactional mode with a table of the handler's own next to it, a
//! handler body that writes one row and then answers as the test says, and
//! what a client saw of the answer.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use idempotency_sqlx::{SqlBackend, SqlStore};
use sql_foundation::{On, Statement};

use crate::{service_url, unique, TempDb};

/// A store in transactional mode and the handler's table next to it.
pub struct Fixture<DB: SqlBackend> {
    /// The store.
    pub store: SqlStore<DB>,
    /// The handler's table, qualified as the handler writes it.
    pub table: String,
    _file: Option<TempDb>,
}

/// A database the fixtures open: PostgreSQL (`DATABASE_URL`, a schema of
/// its own) or SQLite (a temporary file).
pub trait FixtureDb: SqlBackend + Sized {
    /// A store with a pool of `pool` connections and an empty table
    /// `effects (id, note)`; `None` (after printing why) to skip.
    fn open(
        test: &str,
        pool: u32,
    ) -> impl std::future::Future<Output = Option<Fixture<Self>>> + Send;

    /// Drops what `open` made (the files go on drop).
    fn cleanup(fixture: Fixture<Self>) -> impl std::future::Future<Output = ()> + Send;
}

impl FixtureDb for sqlx::Postgres {
    async fn open(test: &str, pool: u32) -> Option<Fixture<Self>> {
        use idempotency_sqlx::postgres::{PostgresOptions, PostgresStore};
        let url = service_url("DATABASE_URL", test)?;
        let store = PostgresStore::connect_with(
            &url,
            PostgresOptions::new()
                .schema(unique("idem_tx"))
                .max_connections(pool),
        )
        .await
        .expect("connect to DATABASE_URL");
        Some(Fixture::on_postgres(store).await)
    }

    async fn cleanup(fixture: Fixture<Self>) {
        let drop = format!("DROP SCHEMA \"{}\" CASCADE", fixture.store.schema());
        let _ = Statement::<Self>::new(&drop)
            .execute(fixture.store.pool())
            .await;
    }
}

impl FixtureDb for sqlx::Sqlite {
    async fn open(test: &str, pool: u32) -> Option<Fixture<Self>> {
        use idempotency_sqlx::sqlite::{SqliteOptions, SqliteStore};
        let file = TempDb::new(&test.replace("::", "_"));
        let store =
            SqliteStore::connect_with(&file.url(), SqliteOptions::new().max_connections(pool))
                .await
                .expect("open the SQLite file");
        Some(
            Fixture::create(
                store,
                "effects".into(),
                Some(file),
                "id INTEGER PRIMARY KEY AUTOINCREMENT",
            )
            .await,
        )
    }

    async fn cleanup(fixture: Fixture<Self>) {
        fixture.store.pool().close().await;
    }
}

impl Fixture<sqlx::Postgres> {
    /// The handler's table in the schema of `store`, a store you connected.
    pub async fn on_postgres(store: SqlStore<sqlx::Postgres>) -> Self {
        let table = format!("\"{}\".effects", store.schema());
        Self::create(store, table, None, "id BIGSERIAL PRIMARY KEY").await
    }
}

impl<DB: FixtureDb> Fixture<DB> {
    async fn create(store: SqlStore<DB>, table: String, file: Option<TempDb>, id: &str) -> Self {
        let create = format!("CREATE TABLE {table} ({id}, note TEXT NOT NULL)");
        Statement::<DB>::new(&create)
            .execute(store.pool())
            .await
            .expect("create the handler's table");
        Self {
            store,
            table,
            _file: file,
        }
    }

    /// Committed rows in the handler's table.
    pub async fn rows(&self) -> i64 {
        let count = format!("SELECT count(*) AS n FROM {}", self.table);
        let row = Statement::<DB>::new(&count)
            .fetch_one(self.store.pool())
            .await
            .expect("count rows");
        DB::get(&row, "n").expect("a count")
    }

    /// Drops what `open` made.
    pub async fn cleanup(self) {
        DB::cleanup(self).await;
    }
}

/// What the handler does after its insert.
pub mod mode {
    /// Answers 201 after the probe's delay.
    pub const OK: u8 = 0;
    /// Answers 500.
    pub const FAIL: u8 = 1;
    /// Panics.
    pub const PANIC: u8 = 2;
    /// Answers 201 after 2 s.
    pub const SLOW: u8 = 3;
    /// Answers 429.
    pub const BUSY: u8 = 4;
}

/// The handler's shared state: what to do, and what it did when.
pub struct Probe {
    /// The table the handler writes.
    pub table: String,
    mode: AtomicU8,
    /// How long an `OK` run sleeps after its insert.
    delay_ms: AtomicU64,
    runs: AtomicUsize,
    /// When each run started.
    pub started: Mutex<Vec<Instant>>,
    /// When each run ended.
    pub ended: Mutex<Vec<Instant>>,
    started_signal: tokio::sync::Notify,
}

impl Probe {
    /// A probe for a handler writing `table`, in mode `OK` with no delay.
    pub fn new(table: &str) -> Arc<Self> {
        Arc::new(Self {
            table: table.to_owned(),
            mode: AtomicU8::new(mode::OK),
            delay_ms: AtomicU64::new(0),
            runs: AtomicUsize::new(0),
            started: Mutex::default(),
            ended: Mutex::default(),
            started_signal: tokio::sync::Notify::new(),
        })
    }

    /// What the next runs do.
    pub fn set(&self, mode: u8, delay: Duration) {
        self.mode.store(mode, Ordering::SeqCst);
        self.delay_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }

    /// How many runs started.
    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// Waits until `n` runs have started.
    pub async fn started(&self, n: usize) {
        loop {
            let notified = self.started_signal.notified();
            if self.started.lock().unwrap().len() >= n {
                return;
            }
            notified.await;
        }
    }

    /// The handler's body: inserts one row (the request body as its note)
    /// through `conn`, the request's transaction, then answers as the mode
    /// says: a status and a body.
    ///
    /// # Panics
    /// In mode `PANIC`, after the insert.
    pub async fn run<DB: SqlBackend>(
        &self,
        conn: &mut DB::Connection,
        body: &[u8],
    ) -> (u16, String) {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        self.started.lock().unwrap().push(Instant::now());
        self.started_signal.notify_waiters();
        let note = String::from_utf8_lossy(body).into_owned();
        let insert = format!("INSERT INTO {} (note) VALUES ($1)", self.table);
        Statement::<DB>::new(&insert)
            .bind(note.as_str())
            .execute(On::Conn(conn))
            .await
            .expect("the handler's insert");
        let answer = match self.mode.load(Ordering::SeqCst) {
            mode::FAIL => (500, "failed".to_owned()),
            mode::PANIC => panic!("the test handler panics after its insert"),
            mode::BUSY => (429, "busy".to_owned()),
            mode::SLOW => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                (201, format!("slow run {run}"))
            }
            _ => {
                let delay = self.delay_ms.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(delay)).await;
                (201, format!("paid {note} run {run}"))
            }
        };
        self.ended.lock().unwrap().push(Instant::now());
        answer
    }
}

/// This test binary's prefix of every key (`{adapter}_{random}`):
/// PostgreSQL's advisory locks are shared by the whole database, whatever
/// the schema, so another test binary running at the same time must not
/// use the same keys.
pub fn run_prefix(adapter: &str) -> &'static str {
    static RUN: OnceLock<String> = OnceLock::new();
    RUN.get_or_init(|| unique(adapter))
}

/// What a client saw of an answer.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: u16,
    /// Whether it carried `Idempotent-Replayed: true`.
    pub replayed: bool,
    /// Its `Retry-After`.
    pub retry_after: Option<String>,
    /// Its `Content-Type`.
    pub content_type: Option<String>,
    /// Its body.
    pub body: Bytes,
    /// When the response (head and body) was in.
    pub at: Instant,
}

impl Answer {
    /// The answer of `status` with `header`'s values and `body`, received now.
    pub fn new(status: u16, header: impl Fn(&str) -> Option<String>, body: Bytes) -> Self {
        Self {
            status,
            replayed: header("idempotent-replayed").as_deref() == Some("true"),
            retry_after: header("retry-after"),
            content_type: header("content-type"),
            body,
            at: Instant::now(),
        }
    }

    /// Its problem `type`.
    ///
    /// # Panics
    /// When the body is not JSON.
    pub fn problem_type(&self) -> String {
        let json: serde_json::Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {:?}", self.body));
        json["type"].as_str().unwrap_or_default().to_owned()
    }

    /// Asserts a problem+json answer of `status` and `kind`.
    ///
    /// # Panics
    /// When it is not one.
    pub fn assert_problem(&self, status: u16, kind: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.content_type.as_deref(),
            Some("application/problem+json"),
            "{self:?}"
        );
        assert_eq!(
            self.problem_type(),
            format!("urn:idempotency:problem:{kind}")
        );
    }
}
