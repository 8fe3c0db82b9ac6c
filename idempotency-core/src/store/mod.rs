//! The store contract and its backends.
//!
//! A record is addressed by a [`RecordId`] and moves through these states:
//!
//! ```text
//! absent ──claim──▶ in-flight {token, fingerprint, lease_until}
//! in-flight ──complete(token)──▶ completed {fingerprint, outcome, expires_at}
//! in-flight ──release(token)──▶ absent
//! in-flight, lease passed, same fingerprint ──claim──▶ in-flight with a NEW token
//! completed or in-flight, past its ttl ──claim──▶ in-flight (a new request)
//! ```
//!
//! Every operation is one atomic step in the backend. `complete`, `release`
//! and `extend` change nothing unless the token matches, and say so with
//! [`TokenOutcome::Fenced`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::fingerprint::{Fingerprint, RecordId};
use crate::record::{ClaimOutcome, LeaseToken, StoredOutcome, TokenOutcome};

pub mod memory;

/// A boxed `Send` future, so that [`Store`] is object-safe (`Arc<dyn Store>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The arguments of [`Store::claim`].
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    /// The record.
    pub id: &'a RecordId,
    /// The fingerprint of the request that claims it.
    pub fingerprint: &'a Fingerprint,
    /// The token the claim will carry if it is acquired.
    pub token: LeaseToken,
    /// How long the claim holds without `extend`.
    pub lease: Duration,
    /// How long after its lease an abandoned in-flight record is kept (so a
    /// crashed request still answers 409/422 for a while and is then forgotten).
    pub ttl: Duration,
}

/// Where idempotency records live. One implementation serves both the tower
/// and the actix adapter, and the inbox's lease mode.
///
/// Implementations must make `claim` a single atomic step (never
/// read-then-write), take the time from one clock of their own (so instances
/// with skewed clocks agree), and keep the errors of their backend as the
/// `source()` of [`StoreError`].
pub trait Store: Send + Sync + 'static {
    /// Claims the record, atomically:
    /// - absent, or past its ttl: stores it in flight with `token`, returns `Acquired`;
    /// - in flight, lease passed, same fingerprint: takes it over with `token`, `Acquired`;
    /// - in flight otherwise: `InFlight`;
    /// - completed: `Completed`.
    fn claim<'a>(
        &'a self,
        req: ClaimRequest<'a>,
    ) -> BoxFuture<'a, Result<ClaimOutcome, StoreError>>;

    /// Stores the outcome and keeps it for `ttl`, if `token` still holds the claim.
    fn complete<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        outcome: Arc<StoredOutcome>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<TokenOutcome, StoreError>>;

    /// Deletes the in-flight record, if `token` still holds the claim, so a
    /// retry runs the handler again.
    fn release<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
    ) -> BoxFuture<'a, Result<TokenOutcome, StoreError>>;

    /// Pushes the lease to `lease` from now, if `token` still holds the claim.
    fn extend<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<TokenOutcome, StoreError>>;

    /// A short name for logs (`"memory"`, `"redis"`, …).
    fn backend(&self) -> &'static str;
}

impl<S: Store + ?Sized> Store for Arc<S> {
    fn claim<'a>(
        &'a self,
        req: ClaimRequest<'a>,
    ) -> BoxFuture<'a, Result<ClaimOutcome, StoreError>> {
        (**self).claim(req)
    }
    fn complete<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        outcome: Arc<StoredOutcome>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<TokenOutcome, StoreError>> {
        (**self).complete(id, token, outcome, ttl)
    }
    fn release<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
    ) -> BoxFuture<'a, Result<TokenOutcome, StoreError>> {
        (**self).release(id, token)
    }
    fn extend<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<TokenOutcome, StoreError>> {
        (**self).extend(id, token, lease)
    }
    fn backend(&self) -> &'static str {
        (**self).backend()
    }
}

/// Why a store operation failed. The backend's own error is kept as `source()`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend answered with an error or could not be reached.
    #[error("the {backend} store failed")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The call took longer than the configured store timeout.
    #[error("the {backend} store did not answer within {timeout:?}")]
    Timeout {
        /// Which backend.
        backend: &'static str,
        /// The timeout that passed.
        timeout: Duration,
    },
    /// The memory store holds `capacity` records, all of them in flight.
    #[error("the memory store is full: all {capacity} records are in flight")]
    Full {
        /// The store's capacity in records.
        capacity: usize,
    },
    /// A stored record could not be decoded. It is left untouched.
    #[error("a stored record is corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Wraps a backend error.
    pub fn backend(
        backend: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self::Backend {
            backend,
            source: source.into(),
        }
    }
}
