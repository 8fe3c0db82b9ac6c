//! The core of idempotent HTTP APIs: key parsing, scopes, fingerprints,
//! policy, the record state machine, the store trait and its backends, and
//! the problem responses. The adapters (`idempotency-tower`,
//! `idempotency-actix`) only translate their framework's types and drive
//! [`Idempotency`], so both behave the same by construction.
//!
//! # Quick start
//!
//! Most users never call this crate directly: they pick a store and a config
//! here and hand both to an adapter.
//!
//! ```
//! use std::time::Duration;
//! use idempotency_core::{Idempotency, IdempotencyConfig, MemoryStore};
//!
//! let config = IdempotencyConfig::builder()
//!     .ttl(Duration::from_secs(24 * 3600))
//!     .lease(Duration::from_secs(30))
//!     .scope_header("authorization")
//!     .build()?;
//! let engine = Idempotency::new(MemoryStore::new(), config);
//! # let _ = engine;
//! # Ok::<_, idempotency_core::ConfigError>(())
//! ```
//!
//! # The request flow
//!
//! Read top-down, one module a step:
//!
//! 1. **head** ([`engine::head`]): covered or not; a declared body over the limit;
//! 2. **key and scope** ([`key`], [`fingerprint::Scope`]): the `Idempotency-Key`
//!    and the principal give the [`RecordId`];
//! 3. **fingerprint** ([`fingerprint`], [`engine::body`]): method, path,
//!    query, content type and the body read up to its limit;
//! 4. **claim** ([`engine::decide`], [`store`]): one atomic store call,
//!    bounded by the store timeout ([`store::Guarded`]);
//! 5. **run or replay** ([`engine::run`], [`engine::decide`]): the handler
//!    runs while its lease is extended, or the stored response is replayed,
//!    or a problem ([`problem`]) refuses the request;
//! 6. **settle** ([`engine::settle`]): store the response, store it as not
//!    replayable, or release the claim; [`engine::detach`] finishes a
//!    request whose client went away.
//!
//! The adapters call [`Idempotency::inspect`] and [`Idempotency::respond`],
//! and only convert their framework's types.
//!
//! # Guarantees
//!
//! - **Concurrency.** `claim` is one atomic step in every store, so of any
//!   number of concurrent requests with the same scope and key exactly one
//!   runs the handler; the others get 409 (same request) or 422 (different
//!   request) while it runs, and the stored response after.
//! - **Fencing.** Every claim carries a random 128-bit token. `complete`,
//!   `release` and `extend` change nothing unless the token still holds the
//!   claim, so a request whose lease was taken over can never overwrite the
//!   newer holder's record.
//! - **Crashes.** A claim that is never completed (the process died) holds for
//!   its lease (default 30 s), then the next retry of the *same* request takes
//!   it over and runs the handler. A running handler extends its lease every
//!   half lease. So a crash *during* the handler means the handler may run
//!   again on retry. **Transactional mode** ([`Idempotency::transactional`],
//!   PostgreSQL and SQLite, [`store::transaction`]) removes that window: the
//!   record commits in the handler's own transaction, one commit for both,
//!   and a crash before it rolls both back, so the retry runs at once.
//! - **Store outages.** Each store call times out (default 2 s). Fail-closed
//!   (default): the request gets 503 with `Retry-After` and the handler does
//!   not run. Fail-open: the handler runs unprotected and the outage is logged
//!   at `error`. If the store fails *after* the handler ran, `complete` is
//!   retried with backoff; if it still fails the client gets its response, the
//!   record stays in flight, retries get 409 until the lease passes, and then
//!   the handler runs again.
//! - **Nothing is lost or corrupted.** A record that cannot be decoded is
//!   reported as an error and left untouched.
//! - **Waiting duplicates.** With
//!   [`wait_for_in_flight`](IdempotencyConfigBuilder::wait_for_in_flight), a
//!   duplicate of a request in flight waits, up to that bound, and replays
//!   its response (or runs, if the first was released). The memory, Redis
//!   (and Redis Cluster) and PostgreSQL stores wake it when the first
//!   completes or is released ([`store::Store::watch`]:
//!   in process, pub/sub, `LISTEN/NOTIFY`), at no cost while nobody waits;
//!   it claims again every 250 ms in case a notification was lost, so a
//!   lost listener only slows it down. A store without `watch` is polled
//!   every 25 ms. The bound passed, it gets 409.
//!
//! # Metrics
//!
//! Every decision is counted through the [`metrics`](https://docs.rs/metrics)
//! facade: `idempotency_requests_total{outcome}` (`executed`, `replayed`,
//! `conflict`, `mismatch`, `rejected`, `unavailable`, `unguarded`), and each
//! store call in `idempotency_store_errors_total{backend,op}` and
//! `idempotency_store_duration_seconds{backend,op}`. Install the exporter
//! you use (the examples serve Prometheus text on `GET /metrics`, outside
//! the layer), then call [`metrics::describe`].
//! With no recorder installed it costs next to nothing. The names, labels
//! and what to alert on: [`metrics`].
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod clock;
pub mod config;
pub mod engine;
pub mod fingerprint;
pub mod key;
pub mod metrics;
pub mod problem;
pub mod record;
pub mod store;

#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod conformance;

pub use clock::{Clock, FakeClock, SystemClock, TokioClock};
pub use config::{ConfigError, FailureMode, IdempotencyConfig, IdempotencyConfigBuilder};
pub use engine::{
    Answer, AnswerHeaders, Chunks, Decision, DetachOnDrop, Execution, Handoff, Idempotency,
    Inspection, Pending, Replay, Reply, RequestFuture, RequestHead, ResponseBody, ResponseHead,
    ScopedEngine, TxHandle,
};
pub use fingerprint::{Fingerprint, RecordId, Scope};
pub use key::{IdempotencyKey, KeyError};
pub use problem::{Problem, ProblemHeaders, ProblemKind};
pub use record::{
    ClaimOutcome, CorruptRecord, HeaderText, LeaseToken, ReplayHeaders, StoredOutcome,
    StoredResponse, TokenOutcome,
};
pub use store::memory::MemoryStore;
pub use store::{BoxFuture, Claim, Guarded, Store, StoreError, StoreFuture};

/// The response header that marks a replay.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Entry points for the fuzz targets (`fuzz/`): the decoders of stored bytes
/// that are private to their store. Not part of the API.
#[doc(hidden)]
pub mod __fuzz {
    use crate::{ClaimOutcome, StoreError};

    /// The SQL stores' decoding of a row (`store::sql::existing`) with these
    /// `fingerprint`, `outcome` and `remaining` columns, past sqlx's typed
    /// reads of them.
    pub fn sql_existing(
        fingerprint: Vec<u8>,
        outcome: Option<Vec<u8>>,
        remaining: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        crate::record::from_columns("sql", fingerprint, outcome, || Ok(remaining))
    }

    /// The Redis store's decoders of a claim's replies: the claim script's,
    /// and the native claim's (`SET ... NX GET`, then `PTTL`).
    #[cfg(feature = "redis")]
    pub use crate::store::redis::__fuzz::{
        claim_reply as redis_claim_reply, native_reply as redis_native_reply,
    };
    /// The reply type they decode.
    #[cfg(feature = "redis")]
    pub use redis::Value as RedisValue;
}
