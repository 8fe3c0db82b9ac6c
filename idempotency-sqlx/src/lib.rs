//! The PostgreSQL and SQLite stores of idempotent HTTP APIs
//! ([`idempotency_core`]), with the transactional mode: the idempotency
//! record commits in the handler's own database transaction.
//!
//! | store | feature | instances it serves | survives a restart |
//! |---|---|---|---|
//! | [`PostgresStore`](postgres::PostgresStore) | `postgres` | any number, on any machines | yes (the database's durability) |
//! | [`SqliteStore`](sqlite::SqliteStore) | `sqlite` | the processes of one machine (one file, WAL) | yes (`synchronous = FULL`) |
//!
//! Both are one type, [`SqlStore`], written once over the
//! `sql-foundation` crate; each module says how its database keeps the
//! contract.
//!
//! # Quick start
//!
//! ```no_run
//! # #[cfg(all(feature = "postgres", feature = "sqlite"))]
//! # async fn demo() -> Result<(), idempotency_core::StoreError> {
//! use idempotency_core::{Idempotency, IdempotencyConfig};
//! use idempotency_sqlx::postgres::PostgresStore;
//! use idempotency_sqlx::sqlite::SqliteStore;
//!
//! // Many instances, one database (migrated on connect, expired records
//! // purged in the background every 60 s by a task the store owns):
//! let store = PostgresStore::connect("postgres://postgres@127.0.0.1:5432/app").await?;
//! assert!(store.purges_in_background());
//! // Transactional mode: the handler's effect and the record commit together.
//! let engine = Idempotency::transactional(store, IdempotencyConfig::default());
//! # let _ = engine;
//!
//! // One machine, no server:
//! let local = SqliteStore::connect("sqlite://idempotency.db").await?;
//! # let _ = local;
//! # Ok(())
//! # }
//! ```
//!
//! A handler in transactional mode takes its transaction with the
//! adapter's extractor (`idempotency_tower::Transaction`,
//! `idempotency_actix::Transaction`) of a [`PostgresTransaction`] or a
//! [`SqliteTransaction`], writes its effect through it and never commits it.
//!
//! # Guarantees
//!
//! - **Concurrency.** A claim is decided by one statement (PostgreSQL) or
//!   under SQLite's one writer lock, so of any number of concurrent
//!   claimers exactly one acquires; `complete`, `release` and `extend` are
//!   single statements fenced by the claim's token. In transactional mode a
//!   duplicate never waits on a row lock: PostgreSQL tries the record's
//!   advisory lock without waiting, SQLite keeps this process's records in
//!   flight in memory.
//! - **Crashes.** Each statement commits on its own; in transactional mode
//!   the record commits with the handler's effect, or neither does.
//! - **Outages.** A call to an unreachable database fails with
//!   [`StoreError::Backend`](idempotency_core::StoreError::Backend), the
//!   sqlx error as its source; the pool reconnects by itself. A pool whose
//!   connections are all in use for the acquire timeout
//!   ([`DEFAULT_ACQUIRE_TIMEOUT`], 1 s) fails the call with
//!   [`StoreError::PoolExhausted`](idempotency_core::StoreError::PoolExhausted):
//!   "pool exhausted (N connections)", not a timeout.
//! - **Expiry.** A store made by `connect` or `connect_with` purges its
//!   expired records in the background (every [`DEFAULT_PURGE_EVERY`], in
//!   batches of [`DEFAULT_PURGE_BATCH`]), in a task it owns, which ends
//!   when the store and every clone of it are dropped; the options set the
//!   interval and the batch, or turn it off. A store made from a pool you
//!   built does not: call `spawn_purger`.
//!
//! The details per database: [`postgres`] and [`sqlite`].
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub mod sqlite;
mod store;

pub use store::{
    SqlBackend, SqlStore, DEFAULT_ACQUIRE_TIMEOUT, DEFAULT_PURGE_BATCH, DEFAULT_PURGE_EVERY,
};

/// The transaction a PostgreSQL store hands a handler in transactional mode
/// (the adapters' `Transaction<PostgresTransaction>` extractor derefs to its
/// connection).
#[cfg(feature = "postgres")]
pub type PostgresTransaction = sqlx::Transaction<'static, sqlx::Postgres>;

/// The transaction a SQLite store hands a handler in transactional mode.
#[cfg(feature = "sqlite")]
pub type SqliteTransaction = sqlx::Transaction<'static, sqlx::Sqlite>;

/// Entry points for the fuzz targets (`fuzz/`): the decoder of stored rows.
/// Not part of the API.
#[doc(hidden)]
pub mod __fuzz {
    use idempotency_core::{ClaimOutcome, StoreError};

    /// The SQL stores' decoding of a row with these `fingerprint`,
    /// `outcome` and `remaining` columns, past sqlx's typed reads of them.
    pub fn sql_existing(
        fingerprint: Vec<u8>,
        outcome: Option<Vec<u8>>,
        remaining: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        crate::store::from_columns("sql", fingerprint, outcome, || Ok(remaining))
    }
}
