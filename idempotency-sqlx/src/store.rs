//! The store both databases share: the [`Store`] and [`TransactionalStore`]
//! impls, written once over [`SqlBackend`]. What differs (the claim, opening
//! a transactional claim, waking waiters) is the backend's.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use idempotency_core::{
    Begun, BoxFuture, Claim, ClaimOutcome, CorruptRecord, Fingerprint, LeaseToken, OpenTransaction,
    RecordId, Store, StoreError, StoreFuture, StoredOutcome, TokenOutcome, TransactionalStore,
    TxHandle, TxSlot, Watch,
};
use sql_foundation::{millis, Dialect, Statement};
use sqlx::{Pool, Transaction};

/// A database the stores run on: PostgreSQL (feature `postgres`) or SQLite
/// (feature `sqlite`). Sealed; its items are the store's internals.
pub trait SqlBackend: Dialect + sealed::Sealed {
    /// What a store of this database keeps besides its pool and statements.
    #[doc(hidden)]
    type State: Send + Sync + 'static;

    /// [`Store::claim`].
    #[doc(hidden)]
    fn claim<'a>(
        store: &'a SqlStore<Self>,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send + 'a;

    /// [`TransactionalStore::begin`].
    #[doc(hidden)]
    fn begin<'a>(
        store: &'a SqlStore<Self>,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> impl Future<Output = Result<Begun, StoreError>> + Send + 'a;

    /// [`Store::watch`]; by default the store cannot notify.
    #[doc(hidden)]
    fn watch<'a>(
        store: &'a SqlStore<Self>,
        id: &'a RecordId,
    ) -> StoreFuture<'a, Result<Option<Watch>, StoreError>> {
        let _ = (store, id);
        StoreFuture::ready(Ok(None))
    }
}

pub(crate) mod sealed {
    pub trait Sealed {}
}

/// The statements both databases have, each bound the same way.
pub(crate) struct Queries {
    /// `(id, fingerprint)` → `fingerprint, outcome, remaining, takeable`.
    pub(crate) snapshot: String,
    /// `(id, token, outcome, ttl ms)`, fenced by the token.
    pub(crate) complete: String,
    /// `(id, token)`, fenced.
    pub(crate) release: String,
    /// `(id, token, lease ms)`, fenced.
    pub(crate) extend: String,
    /// `(batch)`: deletes up to a batch of expired records.
    pub(crate) purge: String,
}

/// How often a store made by `connect` or `connect_with` purges expired
/// records in the background, by default: every 60 s.
///
/// Expired records are ignored by every operation at once; purging only
/// gives their space back. Once a minute keeps a table at about one
/// minute's worth of expired rows beyond its ttl, and costs an idle
/// service one indexed `DELETE` a minute.
pub const DEFAULT_PURGE_EVERY: Duration = Duration::from_secs(60);

/// How many expired records one purge statement deletes at most, by
/// default: 1000. A round deletes batches until one comes back short, so
/// each statement holds its row locks briefly however much expired.
pub const DEFAULT_PURGE_BATCH: u32 = 1000;

/// How long a store call waits for one of the pool's connections, by
/// default: 1 s.
///
/// Below the engine's default store timeout (2 s), so that a pool whose
/// connections are all in use is reported as exhausted
/// ([`StoreError::PoolExhausted`]: "pool exhausted (N connections)") rather
/// than as a store that did not answer. Keep it below your `store_timeout`.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long `connect` keeps trying to open the first connection (a
/// database that is still starting refuses it for a while).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the pool's first connection, trying for up to `within`: the
/// pool's own acquire timeout is kept short for requests (see
/// [`DEFAULT_ACQUIRE_TIMEOUT`]), which a database that is still starting
/// may take longer than.
pub(crate) async fn first_connection<DB: sqlx::Database>(
    pool: &Pool<DB>,
    within: Duration,
) -> Result<(), sqlx::Error> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match pool.acquire().await {
            Ok(_) => return Ok(()),
            Err(sqlx::Error::PoolTimedOut) if tokio::time::Instant::now() < deadline => {}
            Err(e) => return Err(e),
        }
    }
}

/// The background purge of a store made by `connect_with`: how often and
/// in batches of how many (`None`: no purge).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Purging {
    pub(crate) every: Option<Duration>,
    pub(crate) batch: u32,
}

impl Default for Purging {
    fn default() -> Self {
        Self {
            every: Some(DEFAULT_PURGE_EVERY),
            batch: DEFAULT_PURGE_BATCH,
        }
    }
}

/// The purge task a store started for itself, aborted when the store and
/// every clone of it are dropped.
struct Purger(tokio::task::AbortHandle);

impl Drop for Purger {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An idempotency store in a SQL database: [`PostgresStore`](crate::postgres::PostgresStore)
/// or [`SqliteStore`](crate::sqlite::SqliteStore). Cheap to clone: clones share the
/// pool, and the purge task of a store made by `connect` or `connect_with`,
/// which ends when the last clone is dropped.
pub struct SqlStore<DB: SqlBackend> {
    pub(crate) pool: Pool<DB>,
    pub(crate) queries: Arc<Queries>,
    pub(crate) state: Arc<DB::State>,
    purger: Option<Arc<Purger>>,
}

impl<DB: SqlBackend> Clone for SqlStore<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            queries: Arc::clone(&self.queries),
            state: Arc::clone(&self.state),
            purger: self.purger.clone(),
        }
    }
}

impl<DB: SqlBackend> std::fmt::Debug for SqlStore<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("database", &DB::BACKEND)
            .field("pool_size", &self.pool.size())
            .field("purging", &self.purger.is_some())
            .finish_non_exhaustive()
    }
}

/// How a sqlx error of `backend` maps onto [`StoreError`]: a missing or
/// mistyped column or a migration history this version does not know is a
/// configuration problem, a value that does not decode is a corrupt record,
/// anything else is the database failing.
pub(crate) fn error(backend: &'static str, e: sqlx::Error) -> StoreError {
    use sqlx::migrate::MigrateError;
    match e {
        sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => StoreError::config(backend, e),
        sqlx::Error::Migrate(m)
            if matches!(
                *m,
                MigrateError::VersionMissing(_)
                    | MigrateError::VersionMismatch(_)
                    | MigrateError::VersionTooOld(..)
                    | MigrateError::VersionTooNew(..)
                    | MigrateError::Dirty(_)
            ) =>
        {
            StoreError::config(backend, sqlx::Error::Migrate(m))
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::corrupt(backend, e)
        }
        e => StoreError::backend(backend, e),
    }
}

/// The answer of a claim that found a record, from the values a SQL store
/// keeps in its row: the fingerprint, the encoded outcome (`None`: in
/// flight) and, read only then, the milliseconds left of the lease.
///
/// # Errors
/// [`StoreError::Corrupt`] of `backend` when the fingerprint is not 32
/// bytes or the outcome does not decode; `remaining`'s own error.
pub(crate) fn from_columns(
    backend: &'static str,
    fingerprint: Vec<u8>,
    outcome: Option<Vec<u8>>,
    remaining: impl FnOnce() -> Result<i64, StoreError>,
) -> Result<ClaimOutcome, StoreError> {
    let fingerprint = <[u8; 32]>::try_from(fingerprint)
        .map(Fingerprint::from_bytes)
        .map_err(|_| {
            StoreError::corrupt(
                backend,
                CorruptRecord::new("the fingerprint is not 32 bytes"),
            )
        })?;
    match outcome {
        Some(bytes) => Ok(ClaimOutcome::Completed {
            fingerprint,
            outcome: StoredOutcome::decode(bytes::Bytes::from(bytes))
                .map_err(|e| StoreError::corrupt(backend, e))?,
        }),
        None => Ok(ClaimOutcome::InFlight {
            fingerprint,
            lease_remaining: Duration::from_millis(u64::try_from(remaining()?).unwrap_or(0)),
        }),
    }
}

impl<DB: SqlBackend> SqlStore<DB> {
    pub(crate) fn new(pool: Pool<DB>, queries: Queries, state: DB::State) -> Self {
        Self {
            pool,
            queries: Arc::new(queries),
            state: Arc::new(state),
            purger: None,
        }
    }

    /// This store, purging in the background as `purging` says: its first
    /// round one interval from now, its task owned by the store (and its
    /// clones), so it ends with them.
    pub(crate) fn purging(mut self, purging: Purging) -> Self {
        if let Some(every) = purging.every {
            let every = every.max(Duration::from_millis(1));
            let first = tokio::time::Instant::now() + every;
            let task = tokio::spawn(purge_rounds(
                self.pool.clone(),
                Arc::clone(&self.queries),
                first,
                every,
                purging.batch,
            ));
            self.purger = Some(Arc::new(Purger(task.abort_handle())));
        }
        self
    }

    /// Whether this store purges expired records in the background (it was
    /// made by `connect` or `connect_with` with purging on).
    pub fn purges_in_background(&self) -> bool {
        self.purger.is_some()
    }

    /// Says so when `e` is a pool that could not lend a connection because
    /// every one of them was in use ([`StoreError::PoolExhausted`]); sqlx
    /// reports it as `PoolTimedOut`, as it does a database that refuses
    /// new connections, so the pool's state tells the two apart.
    pub(crate) fn on_pool(&self, e: StoreError) -> StoreError {
        let timed_out = matches!(
            &e,
            StoreError::Backend { source, .. }
                if matches!(source.downcast_ref::<sqlx::Error>(), Some(sqlx::Error::PoolTimedOut))
        );
        let connections = self.pool.options().get_max_connections();
        if timed_out && self.pool.size() >= connections && self.pool.num_idle() == 0 {
            return StoreError::PoolExhausted {
                backend: DB::BACKEND,
                connections,
            };
        }
        e
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// Deletes up to `batch` expired records; returns how many. Several
    /// instances may purge at once. Call it until it returns less than
    /// `batch` to purge all.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn purge_expired(&self, batch: u32) -> Result<u64, StoreError> {
        purge_batch(&self.pool, &self.queries, batch)
            .await
            .map_err(|e| self.on_pool(e))
    }

    /// Purges expired records every `every`, in batches of `batch`, until
    /// the returned handle is aborted (or the runtime stops). Failures are
    /// logged at `warn` and retried on the next tick.
    ///
    /// A store made by `connect` or `connect_with` already purges by
    /// itself (see `PostgresOptions::purge_every`,
    /// `SqliteOptions::purge_every`); this is for a store made from a pool
    /// ([`from_pool`](crate::postgres::PostgresStore::from_pool)), or a
    /// schedule of your own.
    pub fn spawn_purger(&self, every: Duration, batch: u32) -> tokio::task::JoinHandle<()> {
        let every = every.max(Duration::from_millis(1));
        tokio::spawn(purge_rounds(
            self.pool.clone(),
            Arc::clone(&self.queries),
            tokio::time::Instant::now(),
            every,
            batch,
        ))
    }

    pub(crate) fn error(e: sqlx::Error) -> StoreError {
        error(DB::BACKEND, e)
    }

    /// `call`'s error, with an exhausted pool said so ([`on_pool`](Self::on_pool)).
    async fn on<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        call.await.map_err(|e| self.on_pool(e))
    }

    /// The answer of a claim that did not acquire, from its row's
    /// `fingerprint`, `outcome` (completed) and `remaining` (in flight)
    /// columns.
    pub(crate) fn existing(row: &DB::Row) -> Result<ClaimOutcome, StoreError> {
        let fingerprint: Vec<u8> = DB::get(row, "fingerprint").map_err(Self::error)?;
        let outcome: Option<Vec<u8>> = DB::get(row, "outcome").map_err(Self::error)?;
        from_columns(DB::BACKEND, fingerprint, outcome, || {
            DB::get(row, "remaining").map_err(Self::error)
        })
    }

    /// The record as committed when a claim with `fingerprint` could not
    /// take it; `None` when it could (absent, or its row `takeable`).
    pub(crate) async fn snapshot_on<'c>(
        &self,
        on: impl Into<sql_foundation::On<'c, DB>>,
        id: &RecordId,
        fingerprint: &Fingerprint,
    ) -> Result<Option<ClaimOutcome>, StoreError> {
        let row = Statement::<DB>::new(&self.queries.snapshot)
            .bind(id.as_bytes().as_slice())
            .bind(fingerprint.as_bytes().as_slice())
            .fetch_optional(on)
            .await
            .map_err(Self::error)?;
        match row {
            Some(row) if !DB::get::<bool>(&row, "takeable").map_err(Self::error)? => {
                Self::existing(&row).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Runs one of the fenced statements: applied when it changed the row.
    async fn fenced(&self, statement: Statement<'_, DB>) -> Result<TokenOutcome, StoreError> {
        let changed = statement
            .execute(&self.pool)
            .await
            .map_err(|e| self.on_pool(Self::error(e)))?;
        Ok(if changed == 1 {
            TokenOutcome::Applied
        } else {
            TokenOutcome::Fenced
        })
    }

    /// The transaction `tx`, holding the record in flight, as the engine
    /// takes it; `lock` is dropped when it ends.
    pub(crate) fn open(
        &self,
        tx: Transaction<'static, DB>,
        id: &RecordId,
        token: LeaseToken,
        lock: Option<Box<dyn Send>>,
    ) -> Begun {
        Begun::Acquired(Box::new(SqlOpen {
            slot: TxSlot::new(tx),
            id: *id,
            token,
            queries: Arc::clone(&self.queries),
            _lock: lock,
        }))
    }
}

impl<DB: SqlBackend> Store for SqlStore<DB> {
    fn claim<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> StoreFuture<'a, Result<ClaimOutcome, StoreError>> {
        StoreFuture::new(self.on(DB::claim(self, id, token, claim)))
    }

    fn complete<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        outcome: &'a StoredOutcome,
        ttl: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        StoreFuture::new(async move {
            let statement = Statement::new(&self.queries.complete)
                .bind(id.as_bytes().as_slice())
                .bind(token.to_bytes().to_vec())
                .bind(outcome.encode())
                .bind(millis(ttl));
            self.fenced(statement).await
        })
    }

    fn release<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        StoreFuture::new(async move {
            let statement = Statement::new(&self.queries.release)
                .bind(id.as_bytes().as_slice())
                .bind(token.to_bytes().to_vec());
            self.fenced(statement).await
        })
    }

    fn extend<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        StoreFuture::new(async move {
            let statement = Statement::new(&self.queries.extend)
                .bind(id.as_bytes().as_slice())
                .bind(token.to_bytes().to_vec())
                .bind(millis(lease));
            self.fenced(statement).await
        })
    }

    fn backend(&self) -> &'static str {
        DB::BACKEND
    }

    fn watch<'a>(&'a self, id: &'a RecordId) -> StoreFuture<'a, Result<Option<Watch>, StoreError>> {
        DB::watch(self, id)
    }
}

impl<DB: SqlBackend> TransactionalStore for SqlStore<DB> {
    fn snapshot<'a>(
        &'a self,
        id: &'a RecordId,
        fingerprint: &'a Fingerprint,
    ) -> BoxFuture<'a, Result<Option<ClaimOutcome>, StoreError>> {
        Box::pin(self.on(self.snapshot_on(&self.pool, id, fingerprint)))
    }

    fn begin<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> BoxFuture<'a, Result<Begun, StoreError>> {
        Box::pin(self.on(DB::begin(self, id, token, claim)))
    }

    fn backend(&self) -> &'static str {
        DB::BACKEND
    }
}

/// Deletes up to `batch` expired records on `pool`; how many.
async fn purge_batch<DB: SqlBackend>(
    pool: &Pool<DB>,
    queries: &Queries,
    batch: u32,
) -> Result<u64, StoreError> {
    Statement::<DB>::new(&queries.purge)
        .bind(i64::from(batch.max(1)))
        .execute(pool)
        .await
        .map_err(|e| error(DB::BACKEND, e))
}

/// Purges expired records from `first` on, every `every`, each round in
/// batches of `batch` until one comes back short. It holds the pool and the
/// statements, never the store, so that dropping the store ends it.
async fn purge_rounds<DB: SqlBackend>(
    pool: Pool<DB>,
    queries: Arc<Queries>,
    first: tokio::time::Instant,
    every: Duration,
    batch: u32,
) {
    let mut tick = tokio::time::interval_at(first, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut total = 0u64;
        loop {
            match purge_batch(&pool, &queries, batch).await {
                Ok(n) => {
                    total += n;
                    if n < u64::from(batch.max(1)) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(backend = DB::BACKEND, error = &e as &dyn std::error::Error, cause = ?std::error::Error::source(&e), "purging expired idempotency records failed; retrying on the next tick");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::debug!(
                backend = DB::BACKEND,
                purged = total,
                "purged expired idempotency records"
            );
        }
    }
}

/// A transaction of a SQL store holding a record in flight: its slot (shared
/// with the handler), the record and token, and the `complete` statement.
/// `_lock` is dropped when the transaction ends (SQLite's in-process lock).
struct SqlOpen<DB: Dialect> {
    slot: TxSlot<Transaction<'static, DB>>,
    id: RecordId,
    token: LeaseToken,
    queries: Arc<Queries>,
    _lock: Option<Box<dyn Send>>,
}

impl<DB: Dialect> OpenTransaction for SqlOpen<DB> {
    fn handle(&self) -> TxHandle {
        TxHandle::new(&self.slot)
    }

    fn commit(
        self: Box<Self>,
        outcome: StoredOutcome,
        ttl: Duration,
        bound: Duration,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(async move {
            let backend = |e| error(DB::BACKEND, e);
            let mut tx = self.slot.take(DB::BACKEND, bound).await?;
            let changed = Statement::<DB>::new(&self.queries.complete)
                .bind(self.id.as_bytes().as_slice())
                .bind(self.token.to_bytes().to_vec())
                .bind(outcome.encode())
                .bind(millis(ttl))
                .execute(&mut tx)
                .await
                .map_err(backend)?;
            if changed != 1 {
                // Only this transaction could have changed the record.
                return Err(StoreError::backend(
                    DB::BACKEND,
                    "the record left in flight by this transaction was not there to complete",
                ));
            }
            tx.commit().await.map_err(backend)
        })
    }

    fn rollback(self: Box<Self>, bound: Duration) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(async move {
            let tx = self.slot.take(DB::BACKEND, bound).await?;
            tx.rollback().await.map_err(|e| error(DB::BACKEND, e))
        })
    }
}
