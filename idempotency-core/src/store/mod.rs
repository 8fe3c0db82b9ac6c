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
//! | store | feature | instances it serves | survives a restart of the service | clock | use it for |
//! |---|---|---|---|---|---|
//! | [`MemoryStore`](memory::MemoryStore) | `memory` (default) | one process | no | the process's (injectable) | tests, one instance where a lost record after a restart is acceptable |
//! | [`SqliteStore`](sqlite::SqliteStore) | `sqlite` | the processes of one machine (one file, WAL) | yes (committed with `synchronous = FULL`) | SQLite's | one machine, durable, no server to run |
//! | [`RedisStore`](redis::RedisStore) | `redis` | any number, on any machines | as far as Redis persists (AOF/RDB) | Redis key expiry | many instances, lowest latency (1 round trip per replay, 2 per fresh request) |
//! | [`PostgresStore`](postgres::PostgresStore) | `postgres` | any number, on any machines | yes (the database's durability) | PostgreSQL `now()` | many instances, records as durable as your data; the same database as the effect |
//!
//! Every store keeps the same contract, checked by one conformance suite
//! (`idempotency_core::conformance`, feature `test-util`), which a
//! third-party store can run too. [`connect`] picks one from a URL.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::fingerprint::{Fingerprint, RecordId};
use crate::record::{ClaimOutcome, LeaseToken, StoredOutcome, TokenOutcome};

pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;

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

    /// How long this store lets any one call run before it fails it with
    /// [`StoreError::Timeout`] by itself, if it bounds its calls. When this
    /// is at most the engine's `store_timeout`, the engine arms no timer of
    /// its own around the call (a second timer per call costs a wake-up of
    /// the runtime's timer on a busy path). Default: `None` (the engine
    /// bounds every call).
    fn call_timeout(&self) -> Option<Duration> {
        None
    }

    /// Claims at once, without a future, if this store answers without
    /// waiting (the in-process store does); `None` means: call
    /// [`claim`](Self::claim). The engine tries it first, which spares a
    /// boxed future per call. Default: `None`.
    fn claim_ready(&self, req: ClaimRequest<'_>) -> Option<Result<ClaimOutcome, StoreError>> {
        let _ = req;
        None
    }

    /// As [`claim_ready`](Self::claim_ready), for [`complete`](Self::complete).
    fn complete_ready(
        &self,
        id: &RecordId,
        token: LeaseToken,
        outcome: &Arc<StoredOutcome>,
        ttl: Duration,
    ) -> Option<Result<TokenOutcome, StoreError>> {
        let _ = (id, token, outcome, ttl);
        None
    }
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
    fn call_timeout(&self) -> Option<Duration> {
        (**self).call_timeout()
    }
    fn claim_ready(&self, req: ClaimRequest<'_>) -> Option<Result<ClaimOutcome, StoreError>> {
        (**self).claim_ready(req)
    }
    fn complete_ready(
        &self,
        id: &RecordId,
        token: LeaseToken,
        outcome: &Arc<StoredOutcome>,
        ttl: Duration,
    ) -> Option<Result<TokenOutcome, StoreError>> {
        (**self).complete_ready(id, token, outcome, ttl)
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

/// Why [`connect`] could not build a store from a URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL names no store this crate knows.
    #[error("unknown store URL {url:?}: expected `memory`, `sqlite://PATH`, `redis://...` or `postgres://...`")]
    UnknownScheme {
        /// The URL, with any password removed.
        url: String,
    },
    /// The URL names a store whose cargo feature is not enabled.
    #[error("the store URL `{scheme}` needs the `{feature}` feature of idempotency-core")]
    FeatureDisabled {
        /// The URL's scheme (`redis`, `postgres`, `sqlite`).
        scheme: &'static str,
        /// The feature to enable.
        feature: &'static str,
    },
    /// The store could not connect (or migrate).
    #[error("could not connect the {backend} store")]
    Store {
        /// Which store.
        backend: &'static str,
        /// What failed.
        #[source]
        source: StoreError,
    },
}

/// Connects the store named by `url`:
///
/// - `memory`: a [`MemoryStore`](memory::MemoryStore) of the default capacity;
/// - `sqlite://PATH` (relative), `sqlite:///PATH` (absolute): a
///   [`SqliteStore`](sqlite::SqliteStore) (feature `sqlite`), the file created
///   and migrated when needed;
/// - `redis://...`, `rediss://...`: a [`RedisStore`](redis::RedisStore)
///   (feature `redis`), scripts loaded;
/// - `postgres://...`, `postgresql://...`: a
///   [`PostgresStore`](postgres::PostgresStore) (feature `postgres`), schema
///   `idempotency`, migrated.
///
/// # Errors
/// [`ConnectError::UnknownScheme`], [`ConnectError::FeatureDisabled`] when the
/// scheme's feature is off, and [`ConnectError::Store`] when the store cannot
/// connect.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, ConnectError> {
    let url = url.trim();
    let scheme = match url.split_once(':') {
        _ if url == "memory" || url == "memory://" => "memory",
        Some(("sqlite", _)) => "sqlite",
        Some(("redis" | "rediss", _)) => "redis",
        Some(("postgres" | "postgresql", _)) => "postgres",
        _ => return Err(ConnectError::UnknownScheme { url: redact(url) }),
    };
    let store: Arc<dyn Store> =
        match scheme {
            #[cfg(feature = "sqlite")]
            "sqlite" => Arc::new(sqlite::SqliteStore::connect(url).await.map_err(|source| {
                ConnectError::Store {
                    backend: "sqlite",
                    source,
                }
            })?),
            #[cfg(feature = "redis")]
            "redis" => Arc::new(redis::RedisStore::connect(url).await.map_err(|source| {
                ConnectError::Store {
                    backend: "redis",
                    source,
                }
            })?),
            #[cfg(feature = "postgres")]
            "postgres" => Arc::new(postgres::PostgresStore::connect(url).await.map_err(
                |source| ConnectError::Store {
                    backend: "postgres",
                    source,
                },
            )?),
            "memory" => Arc::new(memory::MemoryStore::new()),
            other => {
                return Err(ConnectError::FeatureDisabled {
                    scheme: other,
                    feature: other,
                })
            }
        };
    Ok(store)
}

/// The URL without the password between `:` and `@`, for error messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// The purge loop shared by the SQL stores: every `every`, purge in batches
/// until a batch comes back short.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) fn spawn_purger<F, Fut>(
    backend: &'static str,
    every: Duration,
    batch: u32,
    purge: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<u64, StoreError>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut total = 0u64;
            loop {
                match purge().await {
                    Ok(n) => {
                        total += n;
                        if n < u64::from(batch.max(1)) {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(backend, error = &e as &dyn std::error::Error, cause = ?std::error::Error::source(&e), "purging expired idempotency records failed; retrying on the next tick");
                        break;
                    }
                }
            }
            if total > 0 {
                tracing::debug!(
                    backend,
                    purged = total,
                    "purged expired idempotency records"
                );
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_error_messages() {
        assert_eq!(
            redact("foo://user:secret@host:1/db"),
            "foo://user:***@host:1/db"
        );
        assert_eq!(redact("foo://host/db"), "foo://host/db");
        assert_eq!(redact("nonsense"), "nonsense");
    }

    #[tokio::test]
    async fn unknown_schemes_are_typed_errors() {
        for url in ["", "mysql://u:pw@h/db", "file:/x", "memoryx"] {
            let err = connect(url).await.err().expect(url);
            assert!(matches!(err, ConnectError::UnknownScheme { .. }), "{url}");
            assert!(!err.to_string().contains("pw@"), "{err}");
        }
        let memory = connect("memory").await.expect("memory");
        assert_eq!(memory.backend(), "memory");
    }

    #[cfg(not(feature = "redis"))]
    #[tokio::test]
    async fn a_disabled_feature_is_named() {
        let err = connect("redis://127.0.0.1").await.err().expect("redis");
        assert!(
            matches!(
                err,
                ConnectError::FeatureDisabled {
                    feature: "redis",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("`redis` feature"), "{err}");
    }

    #[cfg(not(feature = "postgres"))]
    #[tokio::test]
    async fn a_disabled_postgres_feature_is_named() {
        let err = connect("postgres://h/db").await.err().expect("postgres");
        assert!(matches!(
            err,
            ConnectError::FeatureDisabled {
                feature: "postgres",
                ..
            }
        ));
    }

    #[cfg(not(feature = "sqlite"))]
    #[tokio::test]
    async fn a_disabled_sqlite_feature_is_named() {
        let err = connect("sqlite://x.db").await.err().expect("sqlite");
        assert!(matches!(
            err,
            ConnectError::FeatureDisabled {
                feature: "sqlite",
                ..
            }
        ));
    }
}
