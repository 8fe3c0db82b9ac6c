//! The PostgreSQL store (feature `postgres`): many instances share one view of
//! the records, and the records are as durable as the database.
//!
//! ```no_run
//! # async fn demo() -> Result<(), idempotency_core::StoreError> {
//! use std::time::Duration;
//! use idempotency_sqlx::postgres::PostgresStore;
//!
//! use idempotency_sqlx::postgres::PostgresOptions;
//!
//! // Migrated, and purging expired records every 60 s, in the background.
//! let store = PostgresStore::connect("postgres://postgres@127.0.0.1:5432/app").await?;
//! // Or: a larger pool, purging every 10 minutes.
//! let options = PostgresOptions::new()
//!     .max_connections(32)
//!     .purge_every(Duration::from_secs(600));
//! let busy = PostgresStore::connect_with("postgres://postgres@127.0.0.1:5432/app", options).await?;
//! # let _ = (store, busy);
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! The records live in the table `idempotency_records` of their own schema
//! (default [`DEFAULT_SCHEMA`], see [`PostgresOptions::schema`]), which also
//! holds this crate's `_sqlx_migrations` table, so the store's migrations
//! never mix with the application's. The migrations are embedded and run on
//! [`PostgresStore::connect`] (serialized by an advisory lock, so many
//! instances may start at once) or through [`PostgresStore::migrate`]. The
//! second adds the `watched` column (a constant default: no table rewrite);
//! a table from the first migrates in place. A history with migrations this
//! version does not know is refused with [`StoreError::Config`].
//!
//! # Guarantees
//!
//! - **Concurrency.** `claim` is one statement: a snapshot read of the row
//!   and an `INSERT ... ON CONFLICT (id) DO UPDATE` in one CTE. When the row
//!   is absent, expired, or in flight with its lease passed for the same
//!   request, the upsert decides on the *locked, latest* row version whether
//!   to take it, so of any number of concurrent claimers exactly one acquires
//!   and every other gets the winner's row in the same round trip. A replay
//!   or a conflict never reaches the upsert: it is answered from the snapshot
//!   without writing (no row lock, no transaction id, no WAL flush).
//!   `complete`, `release` and `extend` are single statements guarded by the
//!   token.
//! - **Round trips.** A fresh request is 2 statements (claim, complete), a
//!   replay 1, each one network round trip once the connection has prepared
//!   them. (sqlx's pool also checks a connection with a bare `Sync` when it
//!   returns to the pool, in the background, off the request's path.)
//! - **Waiting duplicates.** A duplicate that waits for a record in flight
//!   (`wait_for_in_flight`) is woken when it completes or is released, on
//!   whichever instance, instead of polling: [`Store::watch`](idempotency_core::Store::watch) makes sure this
//!   store's listener has run `LISTEN` on the schema's channel
//!   (`<schema>.idempotency_records`, shortened with a hash past 63 bytes),
//!   registers the waiter, then marks the row (`watched`, one `UPDATE`).
//!   `complete` and `release` notify (`pg_notify`, the record id in hex) in
//!   their own statement, and only for a marked row: the hot path sends no
//!   `NOTIFY` and so never takes its commit-time queue lock, and a fresh
//!   request stays at 2 statements with a waiter or without. A waiter that
//!   is woken claims again, so it sees the completion (the notification is
//!   delivered after its commit) or, after a release, takes the record
//!   itself or waits on for whoever did.
//! - **The listener.** One extra connection per store (a pool of its own, so
//!   it never takes one of the store's), opened by the first watch, held by a
//!   background task that ends when the store and all its clones are
//!   dropped. When its connection is lost it wakes every waiter (they claim
//!   again, since notifications may have been missed) and reconnects, backing
//!   off up to 5 s, waking them again once it listens again. While it is
//!   down, or cannot start (a watch then fails, and the next retries after
//!   1 s), a waiter misses its notification and is served by the engine's
//!   fallback poll (every 250 ms) instead: later, never wrong. The same goes
//!   during a rolling upgrade for completions by instances of a version
//!   that does not notify.
//! - **Time.** All times come from the database's `now()`.
//! - **Crashes.** Each statement commits on its own. A service instance that
//!   dies mid-request leaves an in-flight row: retries of the same request
//!   get 409 until its lease passes, then one of them takes it over.
//!   Committed records survive a database restart (with the server's default
//!   `synchronous_commit = on`).
//! - **Outages.** A call to an unreachable database fails with
//!   [`StoreError::Backend`] (the `sqlx` error as its source); the middleware
//!   answers 503 (fail-closed) or runs unguarded (fail-open). The pool opens
//!   new connections by itself once the database is back.
//! - **Pool exhaustion.** A call waits up to
//!   [`PostgresOptions::acquire_timeout`] (default 1 s, below the engine's
//!   2 s store timeout) for one of the pool's connections; when every one is
//!   in use it fails with [`StoreError::PoolExhausted`] ("pool exhausted (N
//!   connections)"), which says what to fix (the pool's size, or handlers
//!   that hold transactions long) where a timeout would blame the database.
//! - **Expiry.** Expired rows are ignored by every operation at once and
//!   deleted later, in batches (with `FOR UPDATE SKIP LOCKED`, so several
//!   instances may purge at once): by the store itself when it was made by
//!   [`PostgresStore::connect`] or [`PostgresStore::connect_with`] (every
//!   [`DEFAULT_PURGE_EVERY`](crate::DEFAULT_PURGE_EVERY), 60 s, in batches
//!   of [`DEFAULT_PURGE_BATCH`](crate::DEFAULT_PURGE_BATCH), 1000; a task
//!   that ends when the store and its clones are dropped; see
//!   [`PostgresOptions::purge_every`]), or by
//!   [`PostgresStore::purge_expired`] and [`PostgresStore::spawn_purger`]
//!   for a store made [`from_pool`](PostgresStore::from_pool).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use idempotency_core::{
    Begun, Claim, ClaimOutcome, LeaseToken, Listener, Listening, RecordId, StoreError, StoreFuture,
    Waiters, Watch, RECONNECT_MAX,
};
use sql_foundation::{millis, Dialect, Statement};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::Postgres;
use tokio::sync::watch;

use crate::store::{
    Purging, Queries, SqlBackend, SqlStore, CONNECT_TIMEOUT, DEFAULT_ACQUIRE_TIMEOUT,
};

const BACKEND: &str = "postgres";

/// The default schema of the records table.
pub const DEFAULT_SCHEMA: &str = "idempotency";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

fn backend(e: sqlx::Error) -> StoreError {
    crate::store::error(BACKEND, e)
}

/// A schema name that is not a plain SQL identifier.
#[derive(Debug, thiserror::Error)]
#[error("invalid schema name {0:?}: use 1 to 63 ASCII letters, digits and `_`, not starting with a digit")]
pub struct InvalidSchema(pub String);

/// How [`PostgresStore::connect_with`] connects.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    schema: String,
    max_connections: u32,
    acquire_timeout: Duration,
    migrate: bool,
    synchronous_commit: bool,
    purging: Purging,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            schema: DEFAULT_SCHEMA.to_owned(),
            max_connections: 10,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
            migrate: true,
            synchronous_commit: true,
            purging: Purging::default(),
        }
    }
}

impl PostgresOptions {
    /// Schema [`DEFAULT_SCHEMA`], at most 10 connections, each call waiting
    /// up to 1 s for one, migrate on connect, purge expired records every
    /// 60 s in batches of 1000.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a call waits for one of the pool's connections (default
    /// [`DEFAULT_ACQUIRE_TIMEOUT`], 1 s)
    /// before it fails with [`StoreError::PoolExhausted`] (every connection
    /// in use). Keep it below the engine's `store_timeout` (2 s by
    /// default): past that the engine gives up first and logs a timeout.
    /// Opening the first connection on connect may take up to 5 s.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// How often the store purges expired records in the background
    /// (default [`DEFAULT_PURGE_EVERY`](crate::DEFAULT_PURGE_EVERY), 60 s;
    /// the first round one interval after connecting). The task is the
    /// store's: it ends when the store and every clone of it are dropped.
    /// Several instances may purge one schema at once.
    pub fn purge_every(mut self, every: Duration) -> Self {
        self.purging.every = Some(every.max(Duration::from_millis(1)));
        self
    }

    /// How many expired records one purge statement deletes at most
    /// (default [`DEFAULT_PURGE_BATCH`](crate::DEFAULT_PURGE_BATCH), 1000);
    /// a round runs statements until one deletes fewer.
    pub fn purge_batch(mut self, batch: u32) -> Self {
        self.purging.batch = batch.max(1);
        self
    }

    /// Whether the store purges expired records in the background (default
    /// `true`). Turn it off only when something else purges them (a
    /// [`PostgresStore::spawn_purger`] of your own, a cron job calling
    /// [`PostgresStore::purge_expired`]): expired records are ignored but
    /// never deleted otherwise, and the table grows without bound.
    pub fn purge_in_background(mut self, on: bool) -> Self {
        self.purging.every = if on {
            self.purging.every.or(Some(crate::DEFAULT_PURGE_EVERY))
        } else {
            None
        };
        self
    }

    /// The schema that holds the records table (created when missing).
    /// Services, or tests, that must not share records use different schemas.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The pool's size (default 10).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Whether to run the embedded migration on connect (default `true`).
    pub fn migrate_on_connect(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Whether the store's commits wait for the WAL flush (default `true`,
    /// PostgreSQL's `synchronous_commit`).
    ///
    /// A durable commit costs one disk flush: on a disk with a slow `fsync`
    /// that, not the round trip, dominates a fresh request (two commits).
    /// With `false` the store's sessions commit asynchronously: a crash of the
    /// *database server* (not of the service) may lose the last few hundred
    /// milliseconds of claims and completions (never corrupt them), and a
    /// retry of a lost one runs the handler again. Replays are unaffected
    /// (they write nothing).
    pub fn synchronous_commit(mut self, on: bool) -> Self {
        self.synchronous_commit = on;
        self
    }
}

/// What a PostgreSQL store keeps besides its pool and the shared statements.
#[doc(hidden)]
pub struct PgState {
    schema: Arc<str>,
    /// Mixed into the advisory lock key of a record: advisory locks are the
    /// database's, so stores in two schemas must not share them.
    lock_salt: i64,
    claim: String,
    lock_claim: String,
    /// A waiter marks the record in flight it waits for (`watched`).
    watch: String,
    notifier: Notifier,
}

/// The statements of a store in `schema`: the shared ones, and its own.
fn statements(schema: &str) -> (Queries, PgState) {
    {
        let t = format!("\"{schema}\".idempotency_records");
        let ms = "* interval '1 millisecond'";
        // Takeable: expired, or in flight with the lease passed for the same request.
        let take = "(r.expires_at <= now() OR (r.outcome IS NULL AND r.lease_until <= now() AND r.fingerprint = excluded.fingerprint))";
        let keep =
            |col: &str| format!("{col} = CASE WHEN {take} THEN excluded.{col} ELSE r.{col} END");
        let remaining = |lease_until: &str| {
            format!("GREATEST(0, CEIL(EXTRACT(EPOCH FROM ({lease_until} - now())) * 1000))::int8")
        };
        // The snapshot answers replays and conflicts without writing. The
        // upsert runs only when the snapshot shows the row absent or
        // takeable; it then decides on the locked latest version, and a
        // loser (a concurrent claimer won first) leaves the row unchanged and
        // gets it back, marked by a token that is not its own.
        // Transactional mode's claim (`$6`: the record's advisory lock key)
        // takes the record's lock without waiting first, and claims only
        // when it got it: one round trip for both. A first row with
        // `locked = false` means another transaction holds the record.
        let claim_with = |lock: &str, locked: &str, unlocked: &str| {
            format!(
                "WITH {lock}existing AS (
                    SELECT fingerprint, outcome, lease_until,
                           (expires_at <= now() OR (outcome IS NULL AND lease_until <= now() AND fingerprint = $2)) AS takeable
                    FROM {t} WHERE id = $1
                ), claimed AS (
                    INSERT INTO {t} AS r (id, fingerprint, token, lease_until, expires_at, outcome)
                    SELECT $1, $2, $3, now() + $4::int8 {ms}, now() + ($4::int8 + $5::int8) {ms}, NULL
                    WHERE {locked}NOT EXISTS (SELECT 1 FROM existing WHERE NOT takeable)
                    ON CONFLICT (id) DO UPDATE SET
                        {fingerprint}, {token}, {lease_until}, {expires_at},
                        outcome = CASE WHEN {take} THEN NULL ELSE r.outcome END
                    RETURNING r.token = $3 AS acquired, r.fingerprint, r.outcome, {claimed_remaining} AS remaining
                )
                SELECT {held_col}acquired, fingerprint, outcome, remaining FROM claimed
                UNION ALL
                SELECT {held_col}false, fingerprint, outcome, {existing_remaining} FROM existing WHERE {locked}NOT takeable
                {unlocked}",
                held_col = if lock.is_empty() { "" } else { "true AS locked, " },
                fingerprint = keep("fingerprint"),
                token = keep("token"),
                lease_until = keep("lease_until"),
                expires_at = keep("expires_at"),
                claimed_remaining = remaining("r.lease_until"),
                existing_remaining = remaining("lease_until"),
            )
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
        };
        // sqlx finds its prepared statement by hashing the SQL text on every
        // call: keep the text short.
        let claim = claim_with("", "", "");
        let lock_claim = claim_with(
            "lock AS MATERIALIZED (SELECT pg_try_advisory_xact_lock($6) AS locked), ",
            "(SELECT locked FROM lock) AND ",
            "UNION ALL SELECT false, false, NULL, NULL, NULL FROM lock WHERE NOT locked",
        );
        let held = "id = $1 AND token = $2 AND outcome IS NULL AND expires_at > now()";
        // Evaluated on the row completed or deleted, after its lock: a mark
        // committed before sends the notification at this statement's
        // commit; an unmarked row (the hot path) sends nothing.
        let notify = format!(
            "RETURNING CASE WHEN watched THEN pg_notify('{}', encode(id, 'hex')) END",
            channel(schema)
        );
        let salt = RecordId::from_parts(b"idempotency advisory lock", schema.as_bytes());
        let queries = Queries {
            snapshot: format!(
                "SELECT fingerprint, outcome, {remaining} AS remaining,
                    (expires_at <= now() OR (outcome IS NULL AND lease_until <= now() AND fingerprint = $2)) AS takeable
                 FROM {t} WHERE id = $1",
                remaining = remaining("lease_until"),
            )
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
            complete: format!(
                "UPDATE {t} SET outcome = $3, expires_at = now() + $4::int8 {ms} WHERE {held} {notify}"
            ),
            release: format!("DELETE FROM {t} WHERE {held} {notify}"),
            extend: format!(
                "UPDATE {t} SET lease_until = now() + $3::int8 {ms}, \
                 expires_at = now() + $3::int8 {ms} + (expires_at - lease_until) WHERE {held}"
            ),
            purge: format!(
                "DELETE FROM {t} WHERE id IN (
                    SELECT id FROM {t} WHERE expires_at <= now()
                    ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
            ),
        };
        let state = PgState {
            schema: Arc::from(schema),
            lock_salt: lock_key(&salt, 0),
            claim,
            lock_claim,
            // `NOT watched`: the waiters after the first write nothing.
            watch: format!(
                "UPDATE {t} SET watched = true \
                 WHERE id = $1 AND outcome IS NULL AND expires_at > now() AND NOT watched"
            ),
            notifier: Notifier::new(schema),
        };
        (queries, state)
    }
}

/// The channel of a schema's notifications: `<schema>.idempotency_records`,
/// shortened (with a hash of the schema) to PostgreSQL's 63-byte limit.
fn channel(schema: &str) -> String {
    const TABLE: &str = ".idempotency_records";
    if schema.len() + TABLE.len() <= 63 {
        return format!("{schema}{TABLE}");
    }
    let hash = RecordId::from_parts(b"idempotency channel", schema.as_bytes()).to_hex();
    // Schema names are ASCII: any byte index is a char boundary.
    let keep = 63 - TABLE.len() - 9;
    format!("{}~{}{TABLE}", &schema[..keep], &hash[..8])
}

/// The listener's own pool of one connection, closed when the store and its
/// clones are dropped: the listener's wait then ends with `PoolClosed`, and
/// the task with it.
struct ClosePool(PgPool);

impl Drop for ClosePool {
    fn drop(&mut self) {
        // Marks the pool closed at once (the future only waits for the
        // connection to be returned).
        drop(self.0.close());
    }
}

/// The tasks of this process that wait for a record of this store, and the
/// listener that wakes them. One per store, shared by its clones.
struct Notifier {
    listener: Listener,
    channel: Arc<str>,
}

impl Notifier {
    fn new(schema: &str) -> Self {
        Self {
            listener: Listener::new(),
            channel: Arc::from(channel(schema)),
        }
    }

    /// Starts the listener (its own pool of one connection) on `options`.
    fn start(
        &self,
        options: &PgConnectOptions,
    ) -> impl FnOnce(watch::Sender<Listening>, Waiters) -> ClosePool {
        let options = options.clone();
        let channel = Arc::clone(&self.channel);
        move |state, waiters| {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .idle_timeout(None)
                .max_lifetime(None)
                .test_before_acquire(false)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(options);
            tokio::spawn(listen(pool.clone(), channel, waiters, state));
            ClosePool(pool)
        }
    }
}

/// The listener task: `LISTEN`s on the store's channel and wakes the
/// waiters of each record notified. After a lost connection it reconnects
/// (backing off up to [`RECONNECT_MAX`]) and wakes every waiter, since
/// notifications sent meanwhile are lost. Ends when the pool is closed (the
/// store and its clones are dropped), or when its first connection fails.
async fn listen(
    pool: PgPool,
    channel: Arc<str>,
    waiters: Waiters,
    state: watch::Sender<Listening>,
) {
    let connect = || async {
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(&channel).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    let mut listener = match connect().await {
        Ok(listener) => listener,
        Err(e) => {
            if !pool.is_closed() {
                tracing::warn!(
                    backend = BACKEND,
                    error = &e as &dyn std::error::Error,
                    "the idempotency listener could not LISTEN; waiting duplicates poll"
                );
            }
            state.send_replace(Listening::Failed(Arc::from(e.to_string())));
            return;
        }
    };
    state.send_replace(Listening::Up);
    let mut pause = Duration::from_millis(100);
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => match RecordId::from_hex(notification.payload().as_bytes()) {
                Some(id) => waiters.wake(&id),
                None => tracing::debug!(
                    backend = BACKEND,
                    payload = notification.payload(),
                    "ignoring a notification that names no record"
                ),
            },
            // Lost and already reconnected (LISTEN again) by sqlx.
            Ok(None) => waiters.wake_all(),
            Err(_) if pool.is_closed() => return,
            Err(e) => {
                tracing::warn!(
                    backend = BACKEND,
                    error = &e as &dyn std::error::Error,
                    "the idempotency listener lost its connection; reconnecting"
                );
                state.send_replace(Listening::Down);
                waiters.wake_all();
                // A fresh listener: the old one's connection may be broken
                // in a way sqlx does not detect. It returns its connection
                // as it drops.
                drop(listener);
                listener = loop {
                    if pool
                        .close_event()
                        .do_until(tokio::time::sleep(pause))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    pause = (pause * 2).min(RECONNECT_MAX);
                    match connect().await {
                        Ok(listener) => break listener,
                        Err(_) if pool.is_closed() => return,
                        Err(e) => tracing::debug!(
                            backend = BACKEND,
                            error = &e as &dyn std::error::Error,
                            "the idempotency listener could not reconnect yet"
                        ),
                    }
                };
                pause = Duration::from_millis(100);
                state.send_replace(Listening::Up);
                // Whatever completed while it was down.
                waiters.wake_all();
            }
        }
    }
}

/// A store in PostgreSQL. Cheap to clone: clones share the pool.
pub type PostgresStore = SqlStore<Postgres>;

impl SqlStore<Postgres> {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/database`)
    /// with [`PostgresOptions::default`], runs the migration, and starts
    /// purging expired records every 60 s (a task of the store's, ended
    /// when the store and its clones are dropped).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the URL is invalid, the database cannot
    /// be reached or the migration fails.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// Connects to `url` with `options`.
    ///
    /// # Errors
    /// As [`connect`](Self::connect); also [`InvalidSchema`] (as the source)
    /// when the schema name is not a plain identifier.
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let mut connect = PgConnectOptions::from_str(url).map_err(backend)?;
        if !options.synchronous_commit {
            connect = connect.options([("synchronous_commit", "off")]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            // The pool already checks each connection when it is returned;
            // a second check on acquire would cost a round trip per call.
            .test_before_acquire(false)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect);
        crate::store::first_connection(&pool, CONNECT_TIMEOUT)
            .await
            .map_err(backend)?;
        let store = Self::from_pool(pool, &options.schema)?;
        if options.migrate {
            store.migrate().await?;
        }
        Ok(store.purging(options.purging))
    }

    /// A store over a pool you built, its table in `schema`. Nothing is sent
    /// yet: call [`migrate`](Self::migrate) unless the table exists. It does
    /// not purge by itself: call [`spawn_purger`](Self::spawn_purger) (or
    /// [`purge_expired`](Self::purge_expired) on a schedule of yours).
    ///
    /// # Errors
    /// [`StoreError::Config`] with [`InvalidSchema`] as its source.
    pub fn from_pool(pool: PgPool, schema: &str) -> Result<Self, StoreError> {
        if !sql_foundation::valid_identifier(schema) {
            return Err(StoreError::config(
                BACKEND,
                InvalidSchema(schema.to_owned()),
            ));
        }
        let (queries, state) = statements(schema);
        Ok(Self::new(pool, queries, state))
    }

    /// Creates the schema when missing and runs the embedded migrations in
    /// it. Safe to run from many instances at once.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails;
    /// [`StoreError::Config`] when the schema's migration history has
    /// migrations this version does not know (a newer version ran there).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sql_foundation::migrate_postgres(&self.pool, &self.state.schema, &MIGRATOR)
            .await
            .map_err(backend)
    }

    /// The schema that holds the records table.
    pub fn schema(&self) -> &str {
        &self.state.schema
    }

    /// [`Store::watch`](idempotency_core::Store::watch): the listener up
    /// (started on the first watch), the waiter registered, then the record
    /// marked, so that its completion or release from then on notifies.
    async fn watch_now(&self, id: &RecordId) -> Result<Option<Watch>, StoreError> {
        let notifier = &self.state.notifier;
        let start = notifier.start(self.pool.connect_options().as_ref());
        match notifier.listener.ready(start).await {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(why) => {
                return Err(StoreError::backend(
                    BACKEND,
                    format!("cannot LISTEN for waiting duplicates: {why}"),
                ))
            }
        }
        let watch = notifier.listener.waiters.watch(id);
        Statement::<Postgres>::new(&self.state.watch)
            .bind(id.as_bytes().as_slice())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(Some(watch))
    }
}

/// The key of a record's transaction-scoped advisory lock: 64 bits of its
/// id mixed with `salt`, the store's schema (another record that shares
/// them only ever gets a false 409).
fn lock_key(id: &RecordId, salt: i64) -> i64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&id.as_bytes()[..8]);
    i64::from_be_bytes(first) ^ salt
}

impl crate::store::sealed::Sealed for Postgres {}

impl SqlBackend for Postgres {
    type State = PgState;

    /// One statement: the snapshot and the upsert in one CTE (see the
    /// module's guarantees).
    async fn claim<'a>(
        store: &'a PostgresStore,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> Result<ClaimOutcome, StoreError> {
        let row = Statement::<Postgres>::new(&store.state.claim)
            .bind(id.as_bytes().as_slice())
            .bind(claim.fingerprint.as_bytes().as_slice())
            .bind(token.to_bytes().to_vec())
            .bind(millis(claim.lease))
            .bind(millis(claim.ttl))
            .fetch_one(&store.pool)
            .await
            .map_err(backend)?;
        if Postgres::get::<bool>(&row, "acquired").map_err(backend)? {
            return Ok(ClaimOutcome::Acquired(token));
        }
        PostgresStore::existing(&row)
    }

    /// The record's advisory lock tried without waiting, and the claim, in
    /// one statement of a new transaction.
    async fn begin<'a>(
        store: &'a PostgresStore,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> Result<Begun, StoreError> {
        let mut tx = Postgres::begin_write(&store.pool).await.map_err(backend)?;
        let row = Statement::<Postgres>::new(&store.state.lock_claim)
            .bind(id.as_bytes().as_slice())
            .bind(claim.fingerprint.as_bytes().as_slice())
            .bind(token.to_bytes().to_vec())
            .bind(millis(claim.lease))
            .bind(millis(claim.ttl))
            .bind(lock_key(id, store.state.lock_salt))
            .fetch_one(&mut tx)
            .await
            .map_err(backend)?;
        if !Postgres::get::<bool>(&row, "locked").map_err(backend)? {
            return Ok(Begun::Locked);
        }
        if !Postgres::get::<bool>(&row, "acquired").map_err(backend)? {
            return PostgresStore::existing(&row).map(Begun::Existing);
        }
        Ok(store.open(tx, id, token, None))
    }

    fn watch<'a>(
        store: &'a PostgresStore,
        id: &'a RecordId,
    ) -> StoreFuture<'a, Result<Option<Watch>, StoreError>> {
        StoreFuture::new(async move { store.watch_now(id).await.map_err(|e| store.on_pool(e)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_fit_in_63_bytes_and_stay_distinct() {
        assert_eq!(channel("idempotency"), "idempotency.idempotency_records");
        let (a, b) = ("a".repeat(63), format!("{}b", "a".repeat(62)));
        for schema in [&a, &b, &"x".repeat(43), &"x".repeat(44)] {
            let c = channel(schema);
            assert!(c.len() <= 63, "{c}");
            assert!(c.ends_with(".idempotency_records"), "{c}");
        }
        assert_eq!(channel(&"x".repeat(43)).len(), 63);
        assert_ne!(channel(&a), channel(&b));
    }
}
