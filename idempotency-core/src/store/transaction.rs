//! Transactional mode's side of a store (PostgreSQL, SQLite): the record is
//! written in the handler's own database transaction, so the effect and the
//! record commit together or not at all.
//!
//! Per covered request: one snapshot read (no transaction) answers replays;
//! otherwise [`TransactionalStore::begin`] opens a transaction, takes the
//! record's lock without waiting (a duplicate answers 409 at once), and puts
//! the record in flight in it. The handler gets the transaction through
//! the adapter's extractor; the engine then writes the response into the
//! record and commits, or rolls everything back.

use std::sync::Arc;
use std::time::Duration;

use super::{BoxFuture, Claim, StoreError};
use crate::engine::TxHandle;
use crate::fingerprint::{Fingerprint, RecordId};
use crate::record::{ClaimOutcome, LeaseToken, StoredOutcome};

/// A store that can keep its record in the handler's own transaction.
pub trait TransactionalStore: Send + Sync + 'static {
    /// The record as committed, read without a transaction; `None` when a
    /// claim with `fingerprint` could take it (absent, expired, or left in
    /// flight past its lease by the same request).
    fn snapshot<'a>(
        &'a self,
        id: &'a RecordId,
        fingerprint: &'a Fingerprint,
    ) -> BoxFuture<'a, Result<Option<ClaimOutcome>, StoreError>>;

    /// Opens a transaction on the store's pool, takes the record's lock
    /// without waiting, and claims the record in flight inside it.
    fn begin<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> BoxFuture<'a, Result<Begun, StoreError>>;

    /// A short name for logs.
    fn backend(&self) -> &'static str;
}

/// What [`TransactionalStore::begin`] found.
#[non_exhaustive]
pub enum Begun {
    /// The transaction, with the record in flight in it.
    Acquired(Box<dyn OpenTransaction>),
    /// Another request holds the record's lock: it is in flight.
    Locked,
    /// The record as it is now (it completed since the snapshot).
    Existing(ClaimOutcome),
}

impl std::fmt::Debug for Begun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Begun::Acquired(_) => f.write_str("Acquired"),
            Begun::Locked => f.write_str("Locked"),
            Begun::Existing(o) => f.debug_tuple("Existing").field(o).finish(),
        }
    }
}

/// A transaction that holds a record in flight.
pub trait OpenTransaction: Send {
    /// What the handler's extractor finds in the request's extensions.
    fn handle(&self) -> TxHandle;

    /// Writes `outcome` into the record (kept for `ttl`) and commits: the
    /// handler's effect and the record in one commit. Fails if the handler
    /// still holds the transaction after `bound`.
    fn commit(
        self: Box<Self>,
        outcome: StoredOutcome,
        ttl: Duration,
        bound: Duration,
    ) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Rolls back the effect and the record together.
    fn rollback(self: Box<Self>, bound: Duration) -> BoxFuture<'static, Result<(), StoreError>>;
}

/// The transaction of a covered request, shared between the handler's
/// extractor (while it runs) and the engine (which commits after it).
pub struct TxSlot<DB: sqlx::Database>(
    Arc<tokio::sync::Mutex<Option<sqlx::Transaction<'static, DB>>>>,
);

impl<DB: sqlx::Database> Clone for TxSlot<DB> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<DB: sqlx::Database> TxSlot<DB> {
    pub(crate) fn new(tx: sqlx::Transaction<'static, DB>) -> Self {
        Self(Arc::new(tokio::sync::Mutex::new(Some(tx))))
    }

    /// Takes the transaction back from the handler, waiting at most `bound`
    /// for it to let go.
    pub(crate) async fn take(
        &self,
        backend: &'static str,
        bound: Duration,
    ) -> Result<sqlx::Transaction<'static, DB>, StoreError> {
        let held = tokio::time::timeout(bound, self.0.lock())
            .await
            .map_err(|_| StoreError::Timeout {
                backend,
                timeout: bound,
            })?
            .take();
        held.ok_or_else(|| StoreError::backend(backend, "the transaction was already finished"))
    }
}

/// A database whose transactions the extractors hand out.
pub trait TxDatabase: sqlx::Database {
    /// This database's slot in `handle`, if it is one of this database's.
    fn slot(handle: &TxHandle) -> Option<&TxSlot<Self>>;
}

#[cfg(feature = "postgres")]
impl TxDatabase for sqlx::Postgres {
    #[allow(unreachable_patterns)]
    fn slot(handle: &TxHandle) -> Option<&TxSlot<Self>> {
        match handle {
            TxHandle::Postgres(slot) => Some(slot),
            _ => None,
        }
    }
}

#[cfg(feature = "sqlite")]
impl TxDatabase for sqlx::Sqlite {
    #[allow(unreachable_patterns)]
    fn slot(handle: &TxHandle) -> Option<&TxSlot<Self>> {
        match handle {
            TxHandle::Sqlite(slot) => Some(slot),
            _ => None,
        }
    }
}

/// The handler's hold on its request's transaction: derefs to the
/// connection, so handler code reads like sqlx code
/// (`query(..).execute(&mut *tx)`). It never commits; the engine does,
/// after the handler returns.
pub struct TxGuard<DB: sqlx::Database>(
    tokio::sync::OwnedMappedMutexGuard<
        Option<sqlx::Transaction<'static, DB>>,
        sqlx::Transaction<'static, DB>,
    >,
);

impl<DB: sqlx::Database> std::ops::Deref for TxGuard<DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        &self.0
    }
}

impl<DB: sqlx::Database> std::ops::DerefMut for TxGuard<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.0
    }
}

/// Why a handler could not get its request's transaction.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TxUnavailable {
    /// The request is not covered by an engine in transactional mode: the
    /// route is outside the middleware, the method is not covered, or the
    /// engine's store has no transactional mode.
    #[error("this request has no idempotency transaction: its route is not covered by a middleware in transactional mode")]
    NotCovered,
    /// The request's transaction is of another database.
    #[error("this request's idempotency transaction is of another database")]
    OtherDatabase,
    /// The transaction was already taken (a second extractor on one request).
    #[error("this request's idempotency transaction is already in use")]
    InUse,
}

/// The transaction of the request whose extensions hold `handle`, for its
/// handler. Adapters' extractors call this.
///
/// # Errors
/// [`TxUnavailable`] says why there is none.
pub fn acquire<DB: TxDatabase>(handle: Option<&TxHandle>) -> Result<TxGuard<DB>, TxUnavailable> {
    let handle = handle.ok_or(TxUnavailable::NotCovered)?;
    let slot = DB::slot(handle).ok_or(TxUnavailable::OtherDatabase)?;
    let guard = Arc::clone(&slot.0)
        .try_lock_owned()
        .map_err(|_| TxUnavailable::InUse)?;
    tokio::sync::OwnedMutexGuard::try_map(guard, Option::as_mut)
        .map(TxGuard)
        .map_err(|_| TxUnavailable::InUse)
}

impl TxUnavailable {
    /// The 500 problem a handler's extractor answers with (the cause is
    /// logged at `error`: it is a wiring mistake, not the client's).
    pub fn problem(&self) -> crate::Problem {
        tracing::error!(error = %self, "idempotency: the handler asked for a transaction it cannot have");
        crate::Problem::new(
            crate::ProblemKind::Internal,
            "The request could not be processed.",
        )
    }
}

/// Defines an adapter's extractor type: a newtype over [`TxGuard`] that
/// derefs to the connection, so both adapters' extractors are the same
/// type shape without repeating it.
#[doc(hidden)]
#[macro_export]
macro_rules! transaction_extractor {
    ($(#[$attr:meta])* pub struct $name:ident;) => {
        $(#[$attr])*
        pub struct $name<DB: $crate::store::transaction::TxDatabase>(
            $crate::store::transaction::TxGuard<DB>,
        );

        impl<DB: $crate::store::transaction::TxDatabase> ::std::ops::Deref for $name<DB> {
            type Target = DB::Connection;
            fn deref(&self) -> &DB::Connection {
                &self.0
            }
        }

        impl<DB: $crate::store::transaction::TxDatabase> ::std::ops::DerefMut for $name<DB> {
            fn deref_mut(&mut self) -> &mut DB::Connection {
                &mut self.0
            }
        }

        impl<DB: $crate::store::transaction::TxDatabase> $name<DB> {
            /// The transaction of the request whose extensions hold `handle`.
            fn acquire(
                handle: Option<&$crate::TxHandle>,
            ) -> Result<Self, $crate::store::transaction::TxUnavailable> {
                $crate::store::transaction::acquire(handle).map(Self)
            }
        }
    };
}
