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
//!
//! # Choosing a store
//!
//! | store | crate | instances it serves | survives a restart of the service | clock | use it for |
//! |---|---|---|---|---|---|
//! | [`MemoryStore`] | this one | one process | no | the process's (injectable) | tests, one instance where a lost record after a restart is acceptable |
//! | `SqliteStore` | `idempotency-sqlx` (feature `sqlite`) | the processes of one machine (one file, WAL) | yes (committed with `synchronous = FULL`) | SQLite's | one machine, durable, no server to run |
//! | `RedisStore` | `idempotency-redis` | any number, on any machines | as far as Redis persists (AOF/RDB) | Redis key expiry | many instances, lowest latency (1 round trip per replay, 2 per fresh request) |
//! | `RedisStore` on a Redis Cluster (`redis+cluster://`) | `idempotency-redis` | any number, on any machines | as far as Redis persists; a failover can lose the last writes the master acknowledged before they reached its replica (a retry may then run the handler again) | Redis key expiry | Redis that scales out and survives the loss of a master (503 until a replica is promoted, then recovers without a restart); the same round trips |
//! | `PostgresStore` | `idempotency-sqlx` (feature `postgres`) | any number, on any machines | yes (the database's durability) | PostgreSQL `now()` | many instances, records as durable as your data; the same database as the effect |
//!
//! Every store keeps the same contract, checked by one conformance suite
//! (`idempotency_core::conformance`, feature `test-util`), which a
//! third-party store can run too, transactional mode included. The
//! adapters' `connect(url)` (crate `idempotency-connect`) picks a store from
//! a URL.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::fingerprint::{Fingerprint, RecordId};
use crate::record::{ClaimOutcome, LeaseToken, StoredOutcome, TokenOutcome};

mod guarded;
pub(crate) mod memory;
pub(crate) mod notify;
pub(crate) mod transaction;

pub use guarded::{Bounded, Guarded, Held, Hold};
pub use memory::{MemoryStore, MemoryStoreBuilder, DEFAULT_CAPACITY, DEFAULT_MAX_BYTES};
pub use notify::{Listener, Listening, Waiters, Watch, RECONNECT_MAX};
pub use transaction::{
    Begun, OpenTransaction, TransactionalStore, TxGuard, TxHandle, TxSlot, TxUnavailable,
};

/// A boxed `Send` future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The future a [`Store`] method returns: either an answer the store already
/// has (an in-process store answers at once, with no allocation), or a boxed
/// future.
///
/// ```
/// # use idempotency_core::StoreFuture;
/// let ready: StoreFuture<'_, u8> = StoreFuture::ready(1);
/// let later: StoreFuture<'_, u8> = StoreFuture::new(async { 1 });
/// # let _ = (ready, later);
/// ```
#[must_use = "futures do nothing unless polled"]
pub struct StoreFuture<'a, T>(Kind<'a, T>);

enum Kind<'a, T> {
    Ready(Option<T>),
    Boxed {
        future: BoxFuture<'a, T>,
        bound: Option<Duration>,
    },
}

impl<'a, T> StoreFuture<'a, T> {
    /// An answer the store already has.
    pub fn ready(value: T) -> Self {
        Self(Kind::Ready(Some(value)))
    }

    /// The store's work, boxed.
    pub fn new(future: impl Future<Output = T> + Send + 'a) -> Self {
        Self(Kind::Boxed {
            future: Box::pin(future),
            bound: None,
        })
    }

    /// The store's work, which fails by itself with [`StoreError::Timeout`]
    /// once `bound` has passed (the Redis store bounds every command). When
    /// `bound` is within the caller's store timeout, [`Guarded`] arms no timer
    /// of its own. A store that does not bound its calls uses [`new`](Self::new).
    pub fn bounded(future: impl Future<Output = T> + Send + 'a, bound: Duration) -> Self {
        Self(Kind::Boxed {
            future: Box::pin(future),
            bound: Some(bound),
        })
    }

    /// `f` applied to the answer: at once to an answer the store already
    /// has, else after the store's work, which keeps its bound.
    pub(crate) fn map<U>(self, f: impl FnOnce(T) -> U + Send + 'a) -> StoreFuture<'a, U>
    where
        T: 'a,
    {
        match self.0 {
            Kind::Ready(Some(value)) => StoreFuture::ready(f(value)),
            // Already polled to its end: so is the mapped one.
            Kind::Ready(None) => StoreFuture(Kind::Ready(None)),
            Kind::Boxed { future, bound } => StoreFuture(Kind::Boxed {
                future: Box::pin(async move { f(future.await) }),
                bound,
            }),
        }
    }

    /// The answer, if the store already had it.
    pub(crate) fn into_ready(self) -> Result<T, Self> {
        match self.0 {
            Kind::Ready(Some(value)) => Ok(value),
            kind => Err(Self(kind)),
        }
    }

    /// How long the store lets this call run before failing it itself.
    pub(crate) fn bound(&self) -> Option<Duration> {
        match &self.0 {
            Kind::Ready(_) => Some(Duration::ZERO),
            Kind::Boxed { bound, .. } => *bound,
        }
    }
}

// The value is never pinned: it is moved out when ready.
impl<T> Unpin for StoreFuture<'_, T> {}

impl<T> Future for StoreFuture<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match &mut self.get_mut().0 {
            Kind::Ready(value) => match value.take() {
                Some(value) => Poll::Ready(value),
                None => panic!("StoreFuture polled after completion"),
            },
            Kind::Boxed { future, .. } => future.as_mut().poll(cx),
        }
    }
}

impl<T> std::fmt::Debug for StoreFuture<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.0 {
            Kind::Ready(_) => "ready",
            Kind::Boxed { .. } => "boxed",
        };
        f.debug_tuple("StoreFuture").field(&kind).finish()
    }
}

/// What a [`Store::claim`] asks for besides the record and the token.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// The fingerprint of the request that claims the record.
    pub fingerprint: &'a Fingerprint,
    /// How long the claim holds without [`Store::extend`].
    pub lease: Duration,
    /// How long after its lease an abandoned in-flight record is kept (so a
    /// crashed request still answers 409/422 for a while and is then forgotten).
    pub ttl: Duration,
}

/// Where idempotency records live. One implementation serves both the tower
/// and the actix adapter, and the inbox's lease mode.
///
/// Every method takes the record and the token first. Implementations must
/// make each method a single atomic step (never read-then-write), take the
/// time from one clock of their own (so instances with skewed clocks agree),
/// and keep the errors of their backend as the `source()` of [`StoreError`].
/// Callers bound every call by a timeout and keep claims alive with
/// [`Guarded`]; a store needs neither.
///
/// A whole store, run through the conformance suite (feature `test-util`):
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use std::time::{Duration, Instant};
/// use idempotency_core::{Claim, Store, StoreError, StoreFuture};
/// use idempotency_core::{ClaimOutcome, LeaseToken, RecordId, StoredOutcome, TokenOutcome};
///
/// enum State { InFlight(LeaseToken, Instant), Completed(StoredOutcome) }
/// struct Entry { fingerprint: idempotency_core::Fingerprint, state: State, expires: Instant }
///
/// /// One mutex over a map: every method is one locked step.
/// #[derive(Default)]
/// struct MapStore(Mutex<HashMap<RecordId, Entry>>);
///
/// impl MapStore {
///     fn fenced(&self, id: &RecordId, token: LeaseToken, change: impl FnOnce(&mut HashMap<RecordId, Entry>, Instant)) -> TokenOutcome {
///         let mut map = self.0.lock().unwrap();
///         let now = Instant::now();
///         match map.get(id) {
///             // The holder keeps its token until a takeover or the record's
///             // expiry (lease + ttl), as every backend does.
///             Some(Entry { state: State::InFlight(held, _), expires, .. }) if *held == token && *expires > now => {
///                 change(&mut map, now);
///                 TokenOutcome::Applied
///             }
///             _ => TokenOutcome::Fenced,
///         }
///     }
/// }
///
/// impl Store for MapStore {
///     fn claim<'a>(&'a self, id: &'a RecordId, token: LeaseToken, claim: Claim<'a>) -> StoreFuture<'a, Result<ClaimOutcome, StoreError>> {
///         let mut map = self.0.lock().unwrap();
///         let now = Instant::now();
///         let outcome = match map.get(id) {
///             Some(e) if e.expires > now => match &e.state {
///                 State::Completed(outcome) => ClaimOutcome::Completed { fingerprint: e.fingerprint, outcome: outcome.clone() },
///                 State::InFlight(_, lease_until) if *lease_until > now || e.fingerprint != *claim.fingerprint => {
///                     ClaimOutcome::InFlight { fingerprint: e.fingerprint, lease_remaining: lease_until.saturating_duration_since(now) }
///                 }
///                 State::InFlight(..) => ClaimOutcome::Acquired(token), // a takeover
///             },
///             _ => ClaimOutcome::Acquired(token),
///         };
///         if let ClaimOutcome::Acquired(_) = outcome {
///             let lease_until = now + claim.lease;
///             map.insert(*id, Entry { fingerprint: *claim.fingerprint, state: State::InFlight(token, lease_until), expires: lease_until + claim.ttl });
///         }
///         StoreFuture::ready(Ok(outcome))
///     }
///
///     fn complete<'a>(&'a self, id: &'a RecordId, token: LeaseToken, outcome: &'a StoredOutcome, ttl: Duration) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
///         StoreFuture::ready(Ok(self.fenced(id, token, |map, now| {
///             let e = map.get_mut(id).unwrap();
///             (e.state, e.expires) = (State::Completed(outcome.clone()), now + ttl);
///         })))
///     }
///
///     fn release<'a>(&'a self, id: &'a RecordId, token: LeaseToken) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
///         StoreFuture::ready(Ok(self.fenced(id, token, |map, _| { map.remove(id); })))
///     }
///
///     fn extend<'a>(&'a self, id: &'a RecordId, token: LeaseToken, lease: Duration) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
///         StoreFuture::ready(Ok(self.fenced(id, token, |map, now| {
///             let e = map.get_mut(id).unwrap();
///             let ttl = e.expires.saturating_duration_since(match e.state { State::InFlight(_, l) => l, _ => now });
///             e.state = State::InFlight(token, now + lease);
///             e.expires = now + lease + ttl;
///         })))
///     }
///
///     fn backend(&self) -> &'static str { "map" }
/// }
///
/// # #[cfg(feature = "test-util")]
/// # #[tokio::main(flavor = "multi_thread")] async fn main() {
/// idempotency_core::conformance::Conformance::new(MapStore::default()).run_all().await;
/// # }
/// # #[cfg(not(feature = "test-util"))] fn main() {}
/// ```
pub trait Store: Send + Sync + 'static {
    /// Claims the record for `token`, atomically:
    /// - absent, or past its ttl: stores it in flight, returns `Acquired`;
    /// - in flight, lease passed, same fingerprint: takes it over, `Acquired`;
    /// - in flight otherwise: `InFlight`;
    /// - completed: `Completed`.
    fn claim<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> StoreFuture<'a, Result<ClaimOutcome, StoreError>>;

    /// Stores the outcome and keeps it for `ttl`, if `token` still holds the claim.
    fn complete<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        outcome: &'a StoredOutcome,
        ttl: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>>;

    /// Deletes the in-flight record, if `token` still holds the claim, so a
    /// retry runs the handler again.
    fn release<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>>;

    /// Pushes the lease to `lease` from now, if `token` still holds the claim.
    fn extend<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>>;

    /// A short name for logs (`"memory"`, `"redis"`, …).
    fn backend(&self) -> &'static str;

    /// Starts watching a record in flight, for a duplicate that waits for it
    /// (`wait_for_in_flight`): the [`Watch`] resolves once the record may
    /// have completed or been released, after which the waiter claims again.
    /// The watch must be registered by the time this future returns, so a
    /// completion from then on wakes it.
    ///
    /// `Ok(None)` (the default) means the store cannot notify: waiters poll.
    /// A store that notifies need not be perfect: a watch that misses its
    /// wake-up only waits for the waiter's fallback poll.
    fn watch<'a>(&'a self, id: &'a RecordId) -> StoreFuture<'a, Result<Option<Watch>, StoreError>> {
        let _ = id;
        StoreFuture::ready(Ok(None))
    }
}

impl<S: Store + ?Sized> Store for Arc<S> {
    fn claim<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> StoreFuture<'a, Result<ClaimOutcome, StoreError>> {
        (**self).claim(id, token, claim)
    }
    fn complete<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        outcome: &'a StoredOutcome,
        ttl: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        (**self).complete(id, token, outcome, ttl)
    }
    fn release<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        (**self).release(id, token)
    }
    fn extend<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        (**self).extend(id, token, lease)
    }
    fn backend(&self) -> &'static str {
        (**self).backend()
    }
    fn watch<'a>(&'a self, id: &'a RecordId) -> StoreFuture<'a, Result<Option<Watch>, StoreError>> {
        (**self).watch(id)
    }
}

/// A boxed error with its own `source()` chain.
type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

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
        source: Cause,
    },
    /// The call took longer than the store timeout.
    #[error("the {backend} store did not answer within {timeout:?}")]
    Timeout {
        /// Which backend.
        backend: &'static str,
        /// The timeout that passed.
        timeout: Duration,
    },
    /// The store's connection pool could not lend a connection in time:
    /// all `connections` were in use. The database itself may be healthy;
    /// the pool is too small for the load (or connections are held too
    /// long, as transactional mode does for a whole handler).
    #[error("the {backend} store could not get a connection: pool exhausted ({connections} connection{})", if *.connections == 1 { "" } else { "s" })]
    PoolExhausted {
        /// Which backend.
        backend: &'static str,
        /// The pool's size: every one of them was in use.
        connections: u32,
    },
    /// The memory store holds `capacity` records, all of them in flight.
    #[error("the memory store is full: all {capacity} records are in flight")]
    Full {
        /// The store's capacity in records.
        capacity: usize,
    },
    /// A stored record could not be decoded. It is left untouched.
    #[error("a record in the {backend} store is corrupt")]
    Corrupt {
        /// Which backend.
        backend: &'static str,
        /// What is wrong with it (often a [`CorruptRecord`](crate::record::CorruptRecord)).
        #[source]
        source: Cause,
    },
    /// The store is set up wrongly: a schema it cannot use, a name it
    /// refuses. Retrying does not help; fix the configuration.
    #[error("the {backend} store is misconfigured")]
    Config {
        /// Which backend.
        backend: &'static str,
        /// What is wrong.
        #[source]
        source: Cause,
    },
}

impl StoreError {
    /// Wraps a backend error.
    pub fn backend(backend: &'static str, source: impl Into<Cause>) -> Self {
        Self::Backend {
            backend,
            source: source.into(),
        }
    }

    /// A record of `backend` that cannot be decoded, and why.
    pub fn corrupt(backend: &'static str, source: impl Into<Cause>) -> Self {
        Self::Corrupt {
            backend,
            source: source.into(),
        }
    }

    /// A configuration of `backend` that cannot work, and why.
    pub fn config(backend: &'static str, source: impl Into<Cause>) -> Self {
        Self::Config {
            backend,
            source: source.into(),
        }
    }
}
