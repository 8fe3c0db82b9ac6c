//! The SQLite store (feature `sqlite`): the embedded, durable store for one
//! machine. Records survive restarts; several processes on the machine may
//! share the file.
//!
//! ```no_run
//! # async fn demo() -> Result<(), idempotency_core::StoreError> {
//! use idempotency_sqlx::sqlite::SqliteStore;
//!
//! // Migrated, and purging expired records every 60 s, in the background.
//! let store = SqliteStore::connect("sqlite://idempotency.db").await?;
//! # let _ = store;
//! # Ok(())
//! # }
//! ```
//!
//! The file is created when missing, put in WAL mode, and migrated on
//! [`SqliteStore::connect`] (or through [`SqliteStore::migrate`]). Several
//! processes may open a new file at once: the ones that find it locked while
//! another puts it in WAL mode or migrates it retry, within the busy timeout. Give the
//! store a file of its own: its `_sqlx_migrations` table would confuse an
//! application's own sqlx migrations.
//!
//! # Guarantees
//!
//! - **Concurrency.** A claim first reads the row (readers never block in WAL
//!   mode) and answers replays and conflicts from it. Only when the row is
//!   absent or takeable does it run one `INSERT ... ON CONFLICT (id) DO
//!   UPDATE ... WHERE <takeable>`, which SQLite executes under its single
//!   writer lock: that statement alone decides who acquires, so of any number
//!   of concurrent claimers, from one process or several sharing the file,
//!   exactly one acquires. A claimer whose upsert changed nothing lost a race
//!   and reads again. `complete`, `release` and `extend` are single statements
//!   guarded by the token. Writers wait for each other up to the busy timeout
//!   (default 5 s), then fail with [`StoreError::Backend`].
//! - **Time.** Leases and expiry use SQLite's clock (`unixepoch('subsec')`),
//!   one clock for every process on the machine.
//! - **Crashes.** Each statement commits on its own (WAL, `synchronous =
//!   FULL`): a committed record survives a crash of the process or of the
//!   machine. A process that dies mid-request leaves an in-flight row that
//!   retries of the same request take over once its lease passes.
//! - **Outages.** There is no server to lose; a full disk or a locked file
//!   fails the call with [`StoreError::Backend`]. A pool whose connections
//!   are all in use for [`SqliteOptions::acquire_timeout`] (default 1 s)
//!   fails it with [`StoreError::PoolExhausted`].
//! - **Expiry.** Expired rows are ignored at once and deleted in the
//!   background by a store made by [`SqliteStore::connect`] or
//!   [`SqliteStore::connect_with`] (every 60 s, in batches of 1000; see
//!   [`SqliteOptions::purge_every`]; the task ends when the store and its
//!   clones are dropped), or through [`SqliteStore::purge_expired`] and
//!   [`SqliteStore::spawn_purger`] for a store made
//!   [`from_pool`](SqliteStore::from_pool).
//! - **Scope.** One machine: do not put the file on a network file system,
//!   and use Redis or PostgreSQL for instances on several machines.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use idempotency_core::{Begun, Claim, ClaimOutcome, LeaseToken, RecordId, StoreError};
use sql_foundation::{millis, Dialect, Statement};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Sqlite;

use crate::store::{Purging, Queries, SqlBackend, SqlStore, DEFAULT_ACQUIRE_TIMEOUT};

const BACKEND: &str = "sqlite";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// SQLite's clock in ms; stable within one statement.
const NOW: &str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";

/// How many times a claim that keeps losing races reads and retries before
/// it gives up.
const CLAIM_ATTEMPTS: usize = 16;

fn backend(e: sqlx::Error) -> StoreError {
    crate::store::error(BACKEND, e)
}

/// A claim lost the race for a row 16 times in a row (the
/// row kept changing between the read and the write).
#[derive(Debug, thiserror::Error)]
#[error("the claim lost the race for its row {0} times in a row")]
pub struct Contended(pub usize);

/// How [`SqliteStore::connect_with`] opens the file.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    max_connections: u32,
    acquire_timeout: Duration,
    busy_timeout: Duration,
    migrate: bool,
    purging: Purging,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            max_connections: 4,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
            busy_timeout: Duration::from_secs(5),
            migrate: true,
            purging: Purging::default(),
        }
    }
}

impl SqliteOptions {
    /// At most 4 connections, each call waiting up to 1 s for one, a 5 s
    /// busy timeout, migrate on connect, purge expired records every 60 s
    /// in batches of 1000.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a call waits for one of the pool's connections (default
    /// [`DEFAULT_ACQUIRE_TIMEOUT`], 1 s)
    /// before it fails with [`StoreError::PoolExhausted`] (every connection
    /// in use). Keep it below the engine's `store_timeout` (2 s by
    /// default).
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// How often the store purges expired records in the background
    /// (default [`DEFAULT_PURGE_EVERY`](crate::DEFAULT_PURGE_EVERY), 60 s;
    /// the first round one interval after opening). The task is the
    /// store's: it ends when the store and every clone of it are dropped.
    pub fn purge_every(mut self, every: Duration) -> Self {
        self.purging.every = Some(every.max(Duration::from_millis(1)));
        self
    }

    /// How many expired records one purge statement deletes at most
    /// (default [`DEFAULT_PURGE_BATCH`](crate::DEFAULT_PURGE_BATCH), 1000).
    pub fn purge_batch(mut self, batch: u32) -> Self {
        self.purging.batch = batch.max(1);
        self
    }

    /// Whether the store purges expired records in the background (default
    /// `true`). Off, expired records are ignored but never deleted unless
    /// something else calls [`SqliteStore::purge_expired`].
    pub fn purge_in_background(mut self, on: bool) -> Self {
        self.purging.every = if on {
            self.purging.every.or(Some(crate::DEFAULT_PURGE_EVERY))
        } else {
            None
        };
        self
    }

    /// The pool's size (default 4). Reads run in parallel; writes take
    /// turns under SQLite's writer lock.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long a writer waits for the lock held by another (default 5 s).
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Whether to run the embedded migration on connect (default `true`).
    pub fn migrate_on_connect(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }
}

/// What a SQLite store keeps besides its pool and the shared statements.
#[doc(hidden)]
pub struct LiteState {
    /// `(id, fingerprint, token, lease ms, ttl ms)`: claims the row if it is
    /// absent or takeable; returns a row when it did.
    upsert: String,
    /// Records held in flight by this process's transactions (transactional
    /// mode): a duplicate answers 409 at once instead of waiting for the file.
    in_flight: Arc<std::sync::Mutex<std::collections::HashSet<RecordId>>>,
}

/// The store's statements: the shared ones, and its own.
fn statements() -> (Queries, LiteState) {
    let t = "idempotency_records";
    let held = format!("id = ?1 AND token = ?2 AND outcome IS NULL AND expires_at > {NOW}");
    let queries = Queries {
        snapshot: format!(
            "SELECT fingerprint, outcome, MAX(0, lease_until - {NOW}) AS remaining,
                (expires_at <= {NOW} OR (outcome IS NULL AND lease_until <= {NOW} AND fingerprint = ?2)) AS takeable
             FROM {t} WHERE id = ?1"
        ),
        complete: format!("UPDATE {t} SET outcome = ?3, expires_at = {NOW} + ?4 WHERE {held}"),
        release: format!("DELETE FROM {t} WHERE {held}"),
        extend: format!(
            "UPDATE {t} SET lease_until = {NOW} + ?3, expires_at = {NOW} + ?3 + (expires_at - lease_until)
             WHERE {held}"
        ),
        purge: format!(
            "DELETE FROM {t} WHERE id IN (
                SELECT id FROM {t} WHERE expires_at <= {NOW} ORDER BY expires_at LIMIT ?1)"
        ),
    };
    let state = LiteState {
        upsert: format!(
            "INSERT INTO {t} (id, fingerprint, token, lease_until, expires_at, outcome)
             VALUES (?1, ?2, ?3, {NOW} + ?4, {NOW} + ?4 + ?5, NULL)
             ON CONFLICT (id) DO UPDATE SET
                fingerprint = excluded.fingerprint, token = excluded.token,
                lease_until = excluded.lease_until, expires_at = excluded.expires_at,
                outcome = NULL
             WHERE {t}.expires_at <= {NOW}
                OR ({t}.outcome IS NULL AND {t}.lease_until <= {NOW} AND {t}.fingerprint = excluded.fingerprint)
             RETURNING 1"
        ),
        in_flight: Arc::default(),
    };
    (queries, state)
}

/// A store in a SQLite file. Cheap to clone: clones share the pool.
pub type SqliteStore = SqlStore<Sqlite>;

impl SqlStore<Sqlite> {
    /// Opens (creating when missing) the file named by `url`:
    /// `sqlite://PATH` (relative), `sqlite:///ABSOLUTE/PATH`, or a bare path,
    /// with [`SqliteOptions::default`], runs the migration, and starts
    /// purging expired records every 60 s (a task of the store's, ended
    /// when the store and its clones are dropped).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the file cannot be opened or migrated.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, SqliteOptions::default()).await
    }

    /// Opens `url` with `options`.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn connect_with(url: &str, options: SqliteOptions) -> Result<Self, StoreError> {
        let connect = if url.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url).map_err(backend)?
        } else {
            SqliteConnectOptions::new().filename(url)
        }
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(options.busy_timeout);
        // Several processes opening a new file at once race to put it in WAL
        // mode, which needs the file to themselves; SQLite answers the
        // losers "database is locked" at once, without its busy handler.
        // Retry those for as long as the busy timeout.
        let deadline = tokio::time::Instant::now() + options.busy_timeout;
        let mut attempt = 0u32;
        let pool = loop {
            let pool = SqlitePoolOptions::new()
                .max_connections(options.max_connections)
                .test_before_acquire(false)
                .acquire_timeout(options.acquire_timeout)
                .connect_lazy_with(connect.clone());
            match crate::store::first_connection(&pool, crate::store::CONNECT_TIMEOUT).await {
                Ok(()) => break pool,
                Err(e)
                    if sql_foundation::is_locked(&e) && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10 << attempt.min(4))).await;
                    attempt += 1;
                }
                Err(e) => return Err(backend(e)),
            }
        };
        let store = Self::from_pool(pool);
        if options.migrate {
            store.migrate().await?;
        }
        Ok(store.purging(options.purging))
    }

    /// A store over a pool you opened (set WAL and a busy timeout on it).
    /// Call [`migrate`](Self::migrate) unless the table exists. It does not
    /// purge by itself: call [`spawn_purger`](Self::spawn_purger) (or
    /// [`purge_expired`](Self::purge_expired) on a schedule of yours).
    pub fn from_pool(pool: SqlitePool) -> Self {
        let (queries, state) = statements();
        Self::new(pool, queries, state)
    }

    /// Runs the embedded migration. Several processes opening a new file at
    /// once may collide here; the loser retries.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the migration fails.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sql_foundation::migrate_sqlite(&self.pool, &MIGRATOR)
            .await
            .map_err(backend)
    }
}

impl crate::store::sealed::Sealed for Sqlite {}

impl SqlBackend for Sqlite {
    type State = LiteState;

    /// A read (readers never block in WAL mode) answers replays and
    /// conflicts; only an absent or takeable row goes on to the upsert,
    /// which SQLite runs under its one writer lock. An upsert that changed
    /// nothing lost a race: read again.
    async fn claim<'a>(
        store: &'a SqliteStore,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> Result<ClaimOutcome, StoreError> {
        for _ in 0..CLAIM_ATTEMPTS {
            if let Some(existing) = store
                .snapshot_on(&store.pool, id, claim.fingerprint)
                .await?
            {
                return Ok(existing);
            }
            if upsert(store, &store.pool, id, token, claim).await? {
                return Ok(ClaimOutcome::Acquired(token));
            }
            // Someone changed the row between the read and the upsert.
        }
        Err(StoreError::backend(BACKEND, Contended(CLAIM_ATTEMPTS)))
    }

    /// The lock: this process's own set of records in flight (409 at once);
    /// other processes on the same file wait for SQLite's write lock
    /// (`BEGIN IMMEDIATE`, within the busy timeout) and then see the
    /// record as it was committed.
    async fn begin<'a>(
        store: &'a SqliteStore,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> Result<Begun, StoreError> {
        let Some(lock) = InFlight::try_new(&store.state.in_flight, *id) else {
            return Ok(Begun::Locked);
        };
        let mut tx = Sqlite::begin_write(&store.pool).await.map_err(backend)?;
        if let Some(existing) = store.snapshot_on(&mut tx, id, claim.fingerprint).await? {
            return Ok(Begun::Existing(existing));
        }
        // The write lock is this transaction's: nothing changes the row
        // between the read and the upsert.
        upsert(store, &mut tx, id, token, claim).await?;
        Ok(store.open(tx, id, token, Some(Box::new(lock))))
    }
}

/// Claims the row if it is absent or takeable; whether it did.
async fn upsert<'c>(
    store: &SqliteStore,
    on: impl Into<sql_foundation::On<'c, Sqlite>>,
    id: &RecordId,
    token: LeaseToken,
    claim: Claim<'_>,
) -> Result<bool, StoreError> {
    let row = Statement::<Sqlite>::new(&store.state.upsert)
        .bind(id.as_bytes().as_slice())
        .bind(claim.fingerprint.as_bytes().as_slice())
        .bind(token.to_bytes().to_vec())
        .bind(millis(claim.lease))
        .bind(millis(claim.ttl))
        .fetch_optional(on)
        .await
        .map_err(backend)?;
    Ok(row.is_some())
}

/// A record held in flight by one of this process's transactions, until
/// dropped.
struct InFlight {
    set: Arc<std::sync::Mutex<std::collections::HashSet<RecordId>>>,
    id: RecordId,
}

impl InFlight {
    fn try_new(
        set: &Arc<std::sync::Mutex<std::collections::HashSet<RecordId>>>,
        id: RecordId,
    ) -> Option<Self> {
        let mut held = set.lock().unwrap_or_else(|p| p.into_inner());
        held.insert(id).then(|| Self {
            set: Arc::clone(set),
            id,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut held = self.set.lock().unwrap_or_else(|p| p.into_inner());
        held.remove(&self.id);
    }
}
