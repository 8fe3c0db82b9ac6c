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
//! Read top-down, one module a step (`src/engine/`):
//!
//! 1. **head**: covered or not; a declared body over the limit;
//! 2. **key and scope** ([`IdempotencyKey`], [`Scope`]): the `Idempotency-Key`
//!    and the principal give the [`RecordId`];
//! 3. **fingerprint** ([`Fingerprint`]): method, path, query, content type
//!    and the body read up to its limit;
//! 4. **claim** ([`Decision`]): one atomic store call, bounded by the store
//!    timeout ([`Guarded`]);
//! 5. **run or replay** ([`Execution`]): the handler runs while its lease is
//!    extended, or the stored response is replayed ([`Replay`]), or a
//!    [`Problem`] refuses the request;
//! 6. **settle**: store the response, store it as not replayable, or release
//!    the claim, in both modes by one rule; [`DetachOnDrop`] finishes a
//!    request whose client went away.
//!
//! The adapters call [`Idempotency::inspect`] and [`Idempotency::respond`],
//! and only convert their framework's types.
//!
//! # Stores
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
//! [`TokenOutcome::Fenced`]. This crate holds the contract ([`Store`],
//! [`TransactionalStore`] for transactional mode, [`Store::watch`] for
//! waking waiting duplicates) and the in-process [`MemoryStore`]; the other
//! stores live in crates of their own:
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
//! (`conformance`, feature `test-util`), which a store outside this
//! workspace can run too, transactional mode and `watch` included. The
//! adapters' `connect(url)` (crate `idempotency-connect`) picks a store
//! from a URL.
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
//!   a [`TransactionalStore`]: PostgreSQL and SQLite) removes that window: the
//!   record commits in the handler's own transaction, one commit for both,
//!   and a crash before it rolls both back, so the retry runs at once.
//! - **Store outages.** Each store call times out (default 2 s). Fail-closed
//!   (default): the request gets 503 with `Retry-After` and the handler does
//!   not run. Fail-open: the handler runs unprotected and the outage is logged
//!   at `error`. If the store fails *after* the handler ran, `complete` is
//!   retried with backoff; if it still fails the client gets its response, the
//!   record stays in flight, retries get 409 until the lease passes, and then
//!   the handler runs again.
//! - **Nothing is lost or corrupted.** A record that cannot be decoded (or,
//!   encrypted, decrypted) is reported as an error and left untouched.
//! - **Waiting duplicates.** With
//!   [`wait_for_in_flight`](IdempotencyConfigBuilder::wait_for_in_flight), a
//!   duplicate of a request in flight waits, up to that bound, and replays
//!   its response (or runs, if the first was released). The memory, Redis
//!   (and Redis Cluster) and PostgreSQL stores wake it when the first
//!   completes or is released ([`Store::watch`]:
//!   in process, pub/sub, `LISTEN/NOTIFY`), at no cost while nobody waits;
//!   it claims again every 250 ms in case a notification was lost, so a
//!   lost listener only slows it down. A store without `watch` is polled
//!   every 25 ms. The bound passed, it gets 409.
//!
//! # Encryption at rest
//!
//! Stored responses hold what handlers answered (payment details, personal
//! data). With
//! [`encryption`](IdempotencyConfigBuilder::encryption) set, every store, in
//! both modes, holds them sealed with AES-256-GCM: a fresh random 96-bit
//! nonce per record, the record id as associated data (a sealed response
//! moved to another record does not decrypt), and the id of the key in each
//! record, so that keys rotate ([`EncryptionKeys`]: several keys, the last
//! one current; [`EncryptionKeys::from_key_file`] reads lines
//! `id:base64-of-32-bytes`). The engine wraps its store in [`Encrypted`],
//! which seals on the way in and opens on the way out; the sealed form is a
//! kind of the stored encoding ([`StoredOutcome::Sealed`]), which every store
//! persists as it persists any record. A record whose key is gone, or that
//! does not authenticate, is [`StoreError::Corrupt`] with a
//! [`DecryptError`]: 503 (fail-closed), never a replay. What it protects
//! and what not: [`EncryptionKeys`].
//!
//! ```
//! use idempotency_core::{EncryptionKeys, Idempotency, IdempotencyConfig, MemoryStore};
//!
//! let keys: EncryptionKeys = "k1:Sx7xzRqpmi+X1Ia0I2aElDXU7Nm7XcV6rJ4gwrEtkGg=".parse()?;
//! let config = IdempotencyConfig::builder().encryption(keys).build()?;
//! let engine = Idempotency::new(MemoryStore::new(), config);
//! # let _ = engine;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```
//!
//! # Metrics
//!
//! Every decision is counted through the [`metrics`](https://docs.rs/metrics)
//! facade: `idempotency_requests_total{outcome}` (`executed`, `replayed`,
//! `conflict`, `mismatch`, `rejected`, `unavailable`, `unguarded`), and each
//! store call in `idempotency_store_errors_total{backend,op}` and
//! `idempotency_store_duration_seconds{backend,op}`; the memory store's
//! evictions in `idempotency_memory_evictions_total{reason}`. Install the exporter
//! you use (the examples serve Prometheus text on `GET /metrics`, outside
//! the layer), then call [`metrics::describe`].
//! With no recorder installed it costs next to nothing. The names, labels
//! and what to alert on: [`metrics`].
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod clock;
mod config;
mod encryption;
mod engine;
mod fingerprint;
mod key;
pub mod metrics;
mod problem;
mod record;
mod store;
mod url;

#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod conformance;

pub use clock::{Clock, FakeClock, SystemClock, TokioClock};
pub use config::{
    default_store_response, ConfigError, FailureMode, IdempotencyConfig, IdempotencyConfigBuilder,
    DEFAULT_NEVER_REPLAYED, DEFAULT_REQUEST_BODY_TIMEOUT,
};
pub use encryption::{DecryptError, Encrypted, EncryptionKeyError, EncryptionKeys, SealedOutcome};
pub use engine::{
    Answer, AnswerHeaders, Chunks, Decision, DetachOnDrop, Execution, Handoff, Idempotency,
    Inspection, Pending, Replay, Reply, RequestFuture, RequestHead, ResponseBody, ResponseHead,
    ScopedEngine,
};
pub use fingerprint::{Fingerprint, FingerprintBuilder, RecordId, Scope};
pub use key::{parse_key, IdempotencyKey, KeyError, IDEMPOTENCY_KEY, MAX_KEY_LEN};
pub use problem::{Problem, ProblemHeaders, ProblemKind, PROBLEM_JSON};
pub use record::{
    ClaimOutcome, CorruptRecord, HeaderText, LeaseToken, ReplayHeaders, StoredOutcome,
    StoredResponse, TokenOutcome,
};
pub use store::{
    Begun, Bounded, BoxFuture, Claim, Guarded, Held, Hold, Listener, Listening, MemoryStore,
    MemoryStoreBuilder, OpenTransaction, Store, StoreError, StoreFuture, TransactionalStore,
    TxGuard, TxHandle, TxSlot, TxUnavailable, Waiters, Watch, DEFAULT_CAPACITY, DEFAULT_MAX_BYTES,
    RECONNECT_MAX,
};
pub use url::redact;

/// The response header that marks a replay.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
