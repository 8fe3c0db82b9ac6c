//! What the workspace's SQL parts share: the idempotency stores
//! (`idempotency-sqlx`), the inbox (`inbox-consumer`) and the outbox
//! (`outbox`) are each written once for PostgreSQL and SQLite on top of
//! this crate.
//!
//! - [`Statement`] and [`Dialect`]: one statement, bound and run the same way
//!   on both databases, so the code around it is generic over
//!   `DB: Dialect` instead of written twice (or by a macro).
//! - [`migrate_postgres`] and [`migrate_sqlite`]: embedded migrations, run
//!   the same way by every part, with one behaviour on error.
//! - [`millis`]: durations as SQL milliseconds, capped.
//!
//! # Quick start
//!
//! ```no_run
//! # #[cfg(feature = "sqlite")]
//! # async fn demo() -> Result<(), sqlx::Error> {
//! use sql_foundation::{Dialect, Statement};
//!
//! /// Written once; runs on PostgreSQL and SQLite.
//! async fn mark<DB: Dialect>(pool: &sqlx::Pool<DB>, id: &str) -> Result<bool, sqlx::Error> {
//!     let mut tx = DB::begin_write(pool).await?;
//!     let changed = Statement::new("UPDATE jobs SET done = TRUE WHERE id = $1 AND NOT done")
//!         .bind(id)
//!         .execute(&mut tx)
//!         .await?;
//!     tx.commit().await?;
//!     Ok(changed == 1)
//! }
//!
//! let pool = sqlx::SqlitePool::connect("sqlite://jobs.db").await?;
//! mark(&pool, "job-1").await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//!
//! - **Concurrency.** [`migrate_postgres`] serializes instances that start
//!   at once with an advisory lock per schema; [`migrate_sqlite`] retries
//!   while another process holds the file. [`Dialect::begin_write`] takes
//!   SQLite's write lock up front, so two writers wait for each other
//!   instead of failing.
//! - **Crashes.** A migration runs in the migrator's transaction: a crash
//!   leaves the schema as it was before it, and the next start runs it
//!   again.
//! - **Outages.** Every error is sqlx's, with its cause; a PostgreSQL
//!   connection that failed during a migration is closed, never pooled.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod dialect;
mod migrate;

pub use dialect::{Binds, BoxFuture, Decodes, Dialect, On, Statement};
#[cfg(feature = "postgres")]
pub use migrate::migrate_postgres;
#[cfg(feature = "sqlite")]
pub use migrate::{is_locked, migrate_sqlite};
pub use migrate::{valid_identifier, InvalidIdentifier};

use std::time::Duration;

/// Durations are capped at about 31 years.
const MAX_MILLIS: u64 = 1_000_000_000_000;

/// `d` in whole milliseconds for SQL arithmetic, capped at about 31 years
/// (so a "forever" never overflows a timestamp).
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis().min(u128::from(MAX_MILLIS))).unwrap_or(i64::MAX)
}
