//! Transactional mode's side of a store: the record is written in the
//! handler's own database transaction, so the effect and the record commit
//! together or not at all.
//!
//! Per covered request: one snapshot read (no transaction) answers replays;
//! otherwise [`TransactionalStore::begin`] opens a transaction, takes the
//! record's lock without waiting (a duplicate answers 409 at once), and puts
//! the record in flight in it. The handler gets the transaction through
//! the adapter's extractor; the engine then writes the response into the
//! record and commits, or rolls everything back.
//!
//! Nothing here knows a database. A store puts its transaction into a
//! [`TxSlot`], hands the engine a [`TxHandle`] to it, and takes it back to
//! commit; the handler's extractor finds the slot through the handle
//! ([`TxGuard::acquire`]). The SQL stores (`idempotency-sqlx`) do exactly
//! this, and so can a store outside the workspace: the conformance suite's
//! transactional cases (feature `test-util`) check one.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use super::{BoxFuture, Claim, StoreError};
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

    /// Opens a transaction, takes the record's lock without waiting, and
    /// claims the record in flight inside it.
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

/// The handle of a covered request's transaction, which the adapter puts
/// into the request's extensions for the handler's extractor. Opaque: it
/// holds whatever [`TxSlot`] the store made, and only a [`TxGuard`] of the
/// same transaction type can take it.
#[derive(Clone)]
pub struct TxHandle(Arc<dyn Any + Send + Sync>);

impl TxHandle {
    /// A handle to `slot` (it shares the slot: no copy, no allocation).
    pub fn new<T: Send + 'static>(slot: &TxSlot<T>) -> Self {
        Self(Arc::clone(&slot.0) as Arc<dyn Any + Send + Sync>)
    }

    fn slot<T: Send + 'static>(&self) -> Option<Shared<T>> {
        Arc::clone(&self.0).downcast().ok()
    }
}

impl std::fmt::Debug for TxHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TxHandle")
    }
}

type Shared<T> = Arc<tokio::sync::Mutex<Option<T>>>;

/// The transaction of a covered request, shared between the handler's
/// extractor (while it runs) and the store (which commits after it).
pub struct TxSlot<T>(Shared<T>);

impl<T> Clone for TxSlot<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T: Send + 'static> TxSlot<T> {
    /// A slot holding `tx`.
    pub fn new(tx: T) -> Self {
        Self(Arc::new(tokio::sync::Mutex::new(Some(tx))))
    }

    /// Takes the transaction back from the handler, waiting at most `bound`
    /// for it to let go.
    ///
    /// # Errors
    /// [`StoreError::Timeout`] of `backend` when the handler still holds it
    /// after `bound`; [`StoreError::Backend`] when it was taken already.
    pub async fn take(&self, backend: &'static str, bound: Duration) -> Result<T, StoreError> {
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

/// The handler's hold on its request's transaction. It derefs to what the
/// transaction derefs to (a sqlx transaction: its connection), so handler
/// code reads like sqlx code (`query(..).execute(&mut *tx)`). It never
/// commits; the engine does, after the handler returns.
pub struct TxGuard<T>(tokio::sync::OwnedMappedMutexGuard<Option<T>, T>);

impl<T: Send + 'static> TxGuard<T> {
    /// The transaction of the request whose extensions hold `handle`.
    /// Adapters' extractors call this.
    ///
    /// # Errors
    /// [`TxUnavailable`] says why there is none.
    pub fn acquire(handle: Option<&TxHandle>) -> Result<Self, TxUnavailable> {
        let handle = handle.ok_or(TxUnavailable::NotCovered)?;
        let slot = handle.slot::<T>().ok_or(TxUnavailable::OtherDatabase)?;
        let guard = slot.try_lock_owned().map_err(|_| TxUnavailable::InUse)?;
        tokio::sync::OwnedMutexGuard::try_map(guard, Option::as_mut)
            .map(Self)
            .map_err(|_| TxUnavailable::InUse)
    }

    /// The transaction itself.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: std::ops::Deref> std::ops::Deref for TxGuard<T> {
    type Target = T::Target;
    fn deref(&self) -> &T::Target {
        &self.0
    }
}

impl<T: std::ops::DerefMut> std::ops::DerefMut for TxGuard<T> {
    fn deref_mut(&mut self) -> &mut T::Target {
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
    /// The request's transaction is of another type (another database).
    #[error("this request's idempotency transaction is of another database")]
    OtherDatabase,
    /// The transaction was already taken (a second extractor on one request).
    #[error("this request's idempotency transaction is already in use")]
    InUse,
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
/// derefs like it, so both adapters' extractors are the same type shape
/// without repeating it.
#[doc(hidden)]
#[macro_export]
macro_rules! transaction_extractor {
    ($(#[$attr:meta])* pub struct $name:ident;) => {
        $(#[$attr])*
        pub struct $name<T>($crate::TxGuard<T>);

        impl<T: ::std::ops::Deref> ::std::ops::Deref for $name<T> {
            type Target = T::Target;
            fn deref(&self) -> &T::Target {
                &self.0
            }
        }

        impl<T: ::std::ops::DerefMut> ::std::ops::DerefMut for $name<T> {
            fn deref_mut(&mut self) -> &mut T::Target {
                &mut self.0
            }
        }

        impl<T: Send + 'static> $name<T> {
            /// The transaction of the request whose extensions hold `handle`.
            fn acquire(handle: Option<&$crate::TxHandle>) -> Result<Self, $crate::TxUnavailable> {
                $crate::TxGuard::acquire(handle).map(Self)
            }

            /// The transaction itself (a `sqlx::Transaction`, or a
            /// third-party store's own type).
            pub fn get_mut(&mut self) -> &mut T {
                self.0.get_mut()
            }
        }
    };
}

impl<S: TransactionalStore + ?Sized> TransactionalStore for Arc<S> {
    fn snapshot<'a>(
        &'a self,
        id: &'a RecordId,
        fingerprint: &'a Fingerprint,
    ) -> BoxFuture<'a, Result<Option<ClaimOutcome>, StoreError>> {
        (**self).snapshot(id, fingerprint)
    }

    fn begin<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> BoxFuture<'a, Result<Begun, StoreError>> {
        (**self).begin(id, token, claim)
    }

    fn backend(&self) -> &'static str {
        (**self).backend()
    }
}
