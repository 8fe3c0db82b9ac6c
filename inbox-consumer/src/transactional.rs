//! Transactional mode: the inbox row and the business effect commit in one
//! database transaction (PostgreSQL or SQLite, through sqlx).
//!
//! Per delivery:
//! 1. `BEGIN`; insert `(consumer, message id)` into the inbox table, unless a
//!    dead mark or the attempt limit forbids it. A concurrent copy of the same
//!    message blocks here on the primary key until the first transaction ends.
//! 2. Nothing inserted: the message committed before (duplicate) or is dead.
//! 3. Inserted: the handler runs in the same transaction, then `COMMIT`.
//! 4. The handler failed: `ROLLBACK`, then count the failure in the attempts
//!    table in its own statement, so the count survives the rollback.

use std::time::Duration;

use idempotency_core::BoxFuture;
use sqlx::Transaction;

use crate::error::InboxError;
use crate::inbox::{run_guarded, Inbox};
use crate::message::InboxMessage;
use crate::outcome::{DeadReason, FailureKind, HandlerError, Outcome};

/// How long to suggest waiting before redelivery when the database failed.
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(1);

// The whole flow is the same SQL shape on both databases; only the statements
// and the integer width differ, so one macro writes it once for each.
macro_rules! transactional_mode {
    (
        db = $db:ty,
        mode = $mode:ident,
        pool = $pool:ty,
        int = $int:ty,
        sql = $sql:ident,
        retention = $retention:expr,
        begin = $begin:expr,
    ) => {
        impl Inbox<$mode> {
            /// Runs `handler` inside the transaction that records the message,
            /// unless the message was processed before or is dead.
            ///
            /// The handler gets the transaction (do the business effect with
            /// it, never commit it) and the message. Like a spawned task, the
            /// handler's future may borrow only the transaction and the
            /// message: move clones of anything else into it. Return
            /// [`HandlerError::transient`] to retry,
            /// [`HandlerError::permanent`] to dead-letter (an undecodable
            /// payload). Ack the message only after this returns
            /// [`Outcome::Processed`] or [`Outcome::Duplicate`] (see
            /// [`Outcome::disposition`]).
            pub async fn process<F>(&self, message: &InboxMessage, handler: F) -> Outcome
            where
                F: for<'t> FnOnce(
                    &'t mut Transaction<'static, $db>,
                    &'t InboxMessage,
                ) -> BoxFuture<'t, Result<(), HandlerError>>,
            {
                let key = match self.key_of(message) {
                    Ok(key) => key,
                    Err(reason) => return self.finish(None, Outcome::Dead { reason }),
                };
                let outcome = self.process_keyed(&key, message, handler).await;
                self.finish(Some(&key), outcome)
            }

            async fn process_keyed<F>(
                &self,
                key: &str,
                message: &InboxMessage,
                handler: F,
            ) -> Outcome
            where
                F: for<'t> FnOnce(
                    &'t mut Transaction<'static, $db>,
                    &'t InboxMessage,
                ) -> BoxFuture<'t, Result<(), HandlerError>>,
            {
                let consumer = self.consumer();
                let max = <$int>::try_from(self.config().max_attempts()).unwrap_or(<$int>::MAX);
                let unavailable = |e: sqlx::Error| Outcome::Unavailable {
                    error: InboxError::Database(e),
                    retry_after: UNAVAILABLE_RETRY,
                };
                let pool = &self.backend.pool;
                let begun = match $begin {
                    Some(statement) => pool.begin_with(statement).await,
                    None => pool.begin().await,
                };
                let mut tx = match begun {
                    Ok(tx) => tx,
                    Err(e) => return unavailable(e),
                };
                let inserted: Option<$int> = match sqlx::query_scalar($sql::CLAIM)
                    .bind(consumer)
                    .bind(key)
                    .bind(max)
                    .fetch_optional(&mut *tx)
                    .await
                {
                    Ok(row) => row,
                    Err(e) => return unavailable(e),
                };
                let Some(attempt) = inserted else {
                    let failures: Option<($int, bool)> = match sqlx::query_as($sql::FAILURES)
                        .bind(consumer)
                        .bind(key)
                        .fetch_optional(&mut *tx)
                        .await
                    {
                        Ok(row) => row,
                        Err(e) => return unavailable(e),
                    };
                    return match failures {
                        Some((n, dead)) if dead || n >= max => Outcome::Dead {
                            reason: DeadReason::AlreadyDead,
                        },
                        _ => Outcome::Duplicate,
                    };
                };
                let result = run_guarded(handler(&mut tx, message)).await;
                match result {
                    Ok(()) => match tx.commit().await {
                        Ok(()) => Outcome::Processed {
                            attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                        },
                        // Committed or not, a redelivery finds out: requeue.
                        Err(e) => unavailable(e),
                    },
                    Err(error) => {
                        if let Err(e) = tx.rollback().await {
                            tracing::warn!(consumer, message_id = key, error = %e, "inbox: rollback failed");
                        }
                        let counted: Result<$int, _> = sqlx::query_scalar($sql::FAIL)
                            .bind(consumer)
                            .bind(key)
                            .bind(error.kind() == FailureKind::Permanent)
                            .bind(error.to_string())
                            .fetch_one(&self.backend.pool)
                            .await;
                        let attempt = match counted {
                            Ok(n) => n,
                            Err(e) => {
                                // The handler's failure is what matters; the
                                // attempt it had when it started stands in.
                                tracing::error!(consumer, message_id = key, error = %e,
                                    "inbox: could not count a failed attempt");
                                attempt
                            }
                        };
                        self.failure_outcome(u32::try_from(attempt).unwrap_or(u32::MAX), error)
                    }
                }
            }

            /// Deletes this consumer's processed rows older than the
            /// retention, and its attempt counts untouched that long, in
            /// batches of `purge_batch` rows; returns how many rows went.
            ///
            /// Safe to run from several instances at once. It never deletes a
            /// message in flight: that row is not committed yet, so no purge
            /// can see it.
            ///
            /// # Errors
            /// [`InboxError::Database`]; rows deleted by earlier batches stay deleted.
            pub async fn purge(&self) -> Result<u64, InboxError> {
                self.purge_older_than(self.config().retention()).await
            }

            /// [`purge`](Self::purge) with another window.
            ///
            /// # Errors
            /// [`InboxError::Database`].
            pub async fn purge_older_than(&self, age: Duration) -> Result<u64, InboxError> {
                let batch = i64::from(self.shared.config.purge_batch);
                let mut total = 0;
                for statement in [$sql::PURGE_MESSAGES, $sql::PURGE_ATTEMPTS] {
                    loop {
                        let done = sqlx::query(statement)
                            .bind(self.consumer())
                            .bind($retention(age))
                            .bind(batch)
                            .execute(&self.backend.pool)
                            .await?
                            .rows_affected();
                        total += done;
                        if done < batch as u64 {
                            break;
                        }
                    }
                }
                if total > 0 {
                    tracing::info!(consumer = self.consumer(), rows = total, "inbox: purged");
                }
                Ok(total)
            }

            /// Attempts recorded for `message_id`: of a processed message, the
            /// attempt that succeeded; of a failing or dead one, the failures
            /// counted; `None` if the inbox knows nothing of it.
            ///
            /// # Errors
            /// [`InboxError::Database`].
            pub async fn attempts(&self, message_id: &str) -> Result<Option<u32>, InboxError> {
                let n: Option<$int> = sqlx::query_scalar($sql::ATTEMPTS)
                    .bind(self.consumer())
                    .bind(message_id)
                    .fetch_one(&self.backend.pool)
                    .await?;
                Ok(n.map(|n| u32::try_from(n).unwrap_or(0)))
            }

            /// Forgets the failures and dead mark of `message_id`, so a
            /// message replayed from the dead-letter queue (after a fix) is
            /// processed again. Returns whether there was anything to forget.
            ///
            /// # Errors
            /// [`InboxError::Database`].
            pub async fn revive(&self, message_id: &str) -> Result<bool, InboxError> {
                let done = sqlx::query($sql::REVIVE)
                    .bind(self.consumer())
                    .bind(message_id)
                    .execute(&self.backend.pool)
                    .await?
                    .rows_affected();
                Ok(done > 0)
            }

            /// The pool.
            pub fn pool(&self) -> &$pool {
                &self.backend.pool
            }
        }
    };
}

#[cfg(feature = "postgres")]
pub use self::pg::PgTransactional;

#[cfg(feature = "postgres")]
mod pg {
    use super::*;
    use sqlx::{PgPool, Postgres};

    /// Transactional mode on PostgreSQL. Tables live in schema
    /// `inbox_consumer` (with their own migration history), so they never
    /// mix with the application's.
    #[derive(Debug, Clone)]
    pub struct PgTransactional {
        pub(crate) pool: PgPool,
    }

    // Serializes concurrent first connects (CREATE SCHEMA races otherwise).
    const MIGRATION_LOCK: i64 = 0x696e_626f_785f_7067; // "inbox_pg"

    impl Inbox<PgTransactional> {
        /// An inbox on `pool`; creates or updates its tables first.
        ///
        /// # Errors
        /// [`InboxError::Database`] or [`InboxError::Migrate`].
        pub async fn postgres(
            pool: PgPool,
            config: crate::InboxConfig,
        ) -> Result<Self, InboxError> {
            migrate_postgres(&pool).await?;
            Ok(Self::postgres_unmigrated(pool, config))
        }

        /// An inbox on `pool` whose tables [`migrate_postgres`] created before.
        pub fn postgres_unmigrated(pool: PgPool, config: crate::InboxConfig) -> Self {
            Self::from_parts(PgTransactional { pool }, config)
        }
    }

    /// Creates or updates the inbox's tables in schema `inbox_consumer`.
    /// Safe to call from several instances at once.
    ///
    /// # Errors
    /// [`InboxError::Database`] or [`InboxError::Migrate`].
    pub async fn migrate_postgres(pool: &PgPool) -> Result<(), InboxError> {
        let mut conn = pool.acquire().await?;
        let result = async {
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *conn)
                .await?;
            let migrated = async {
                sqlx::query("CREATE SCHEMA IF NOT EXISTS inbox_consumer")
                    .execute(&mut *conn)
                    .await?;
                // The migrator's bookkeeping table follows the search path.
                sqlx::query("SET search_path TO inbox_consumer")
                    .execute(&mut *conn)
                    .await?;
                // `run_direct`: `run` makes this future not `Send` in generic contexts.
                sqlx::migrate!("./migrations/postgres")
                    .run_direct(&mut *conn)
                    .await?;
                sqlx::query("RESET search_path").execute(&mut *conn).await?;
                Ok::<_, InboxError>(())
            }
            .await;
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *conn)
                .await?;
            migrated
        }
        .await;
        if result.is_err() {
            // Its search path or lock may be left behind: do not pool it.
            let _ = conn.close().await;
        }
        result
    }

    pub(super) mod sql {
        pub const CLAIM: &str = "\
            INSERT INTO inbox_consumer.messages (consumer, message_id, attempts) \
            SELECT $1, $2, 1 + COALESCE(a.failures, 0) \
            FROM (SELECT 1) AS one \
            LEFT JOIN inbox_consumer.attempts a ON a.consumer = $1 AND a.message_id = $2 \
            WHERE a.consumer IS NULL OR (NOT a.dead AND a.failures < $3) \
            ON CONFLICT (consumer, message_id) DO NOTHING \
            RETURNING attempts";
        pub const FAILURES: &str = "\
            SELECT failures, dead FROM inbox_consumer.attempts \
            WHERE consumer = $1 AND message_id = $2";
        pub const FAIL: &str = "\
            INSERT INTO inbox_consumer.attempts (consumer, message_id, failures, dead, last_error) \
            VALUES ($1, $2, 1, $3, $4) \
            ON CONFLICT (consumer, message_id) DO UPDATE SET \
              failures = attempts.failures + 1, \
              dead = attempts.dead OR EXCLUDED.dead, \
              last_error = EXCLUDED.last_error, \
              updated_at = now() \
            RETURNING failures";
        // SKIP LOCKED: instances purging at once take disjoint batches.
        pub const PURGE_MESSAGES: &str = "\
            WITH doomed AS ( \
              SELECT ctid FROM inbox_consumer.messages \
              WHERE consumer = $1 AND processed_at < now() - make_interval(secs => $2) \
              LIMIT $3 FOR UPDATE SKIP LOCKED) \
            DELETE FROM inbox_consumer.messages WHERE ctid IN (SELECT ctid FROM doomed)";
        pub const PURGE_ATTEMPTS: &str = "\
            WITH doomed AS ( \
              SELECT ctid FROM inbox_consumer.attempts \
              WHERE consumer = $1 AND updated_at < now() - make_interval(secs => $2) \
              LIMIT $3 FOR UPDATE SKIP LOCKED) \
            DELETE FROM inbox_consumer.attempts WHERE ctid IN (SELECT ctid FROM doomed)";
        pub const ATTEMPTS: &str = "\
            SELECT COALESCE( \
              (SELECT attempts FROM inbox_consumer.messages WHERE consumer = $1 AND message_id = $2), \
              (SELECT failures FROM inbox_consumer.attempts WHERE consumer = $1 AND message_id = $2))";
        pub const REVIVE: &str = "\
            DELETE FROM inbox_consumer.attempts WHERE consumer = $1 AND message_id = $2";
    }

    fn retention_secs(age: Duration) -> f64 {
        age.as_secs_f64()
    }

    transactional_mode! {
        db = Postgres,
        mode = PgTransactional,
        pool = PgPool,
        int = i32,
        sql = sql,
        retention = retention_secs,
        begin = None::<&'static str>,
    }

    pub use migrate_postgres as migrate;
}

#[cfg(feature = "postgres")]
pub use self::pg::migrate as migrate_postgres;

#[cfg(feature = "sqlite")]
pub use self::lite::SqliteTransactional;

#[cfg(feature = "sqlite")]
pub use self::lite::migrate as migrate_sqlite;

#[cfg(feature = "sqlite")]
mod lite {
    use super::*;
    use sqlx::{Sqlite, SqlitePool};

    /// Transactional mode on SQLite: one machine, one or several processes
    /// sharing the file (give the pool WAL and a busy timeout). Each message
    /// takes the write lock up front (`BEGIN IMMEDIATE`), so a concurrent
    /// copy waits for the first to commit and then sees the duplicate.
    #[derive(Debug, Clone)]
    pub struct SqliteTransactional {
        pub(crate) pool: SqlitePool,
    }

    impl Inbox<SqliteTransactional> {
        /// An inbox on `pool`; creates or updates its tables first.
        ///
        /// # Errors
        /// [`InboxError::Database`] or [`InboxError::Migrate`].
        pub async fn sqlite(
            pool: SqlitePool,
            config: crate::InboxConfig,
        ) -> Result<Self, InboxError> {
            migrate(&pool).await?;
            Ok(Self::from_parts(SqliteTransactional { pool }, config))
        }
    }

    /// Creates or updates the inbox's tables (`inbox_consumer_*`).
    ///
    /// Its migration versions are dated far from a hand-numbered sequence and
    /// it ignores versions it does not know, so it shares `_sqlx_migrations`
    /// with the application's own migrator.
    ///
    /// # Errors
    /// [`InboxError::Database`] or [`InboxError::Migrate`].
    pub async fn migrate(pool: &SqlitePool) -> Result<(), InboxError> {
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        migrator.set_ignore_missing(true);
        migrator.run(pool).await?;
        Ok(())
    }

    // SQLite's own clock, in Unix milliseconds.
    macro_rules! now_ms {
        () => {
            "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
        };
    }

    pub(super) mod sql {
        pub const CLAIM: &str = concat!(
            "INSERT INTO inbox_consumer_messages (consumer, message_id, attempts, processed_at) \
             SELECT ?1, ?2, 1 + COALESCE((SELECT failures FROM inbox_consumer_attempts \
                 WHERE consumer = ?1 AND message_id = ?2), 0), ",
            now_ms!(),
            " WHERE NOT EXISTS (SELECT 1 FROM inbox_consumer_attempts \
                 WHERE consumer = ?1 AND message_id = ?2 AND (dead OR failures >= ?3)) \
             ON CONFLICT (consumer, message_id) DO NOTHING \
             RETURNING attempts"
        );
        pub const FAILURES: &str = "\
            SELECT failures, dead FROM inbox_consumer_attempts \
            WHERE consumer = ?1 AND message_id = ?2";
        pub const FAIL: &str = concat!(
            "INSERT INTO inbox_consumer_attempts \
               (consumer, message_id, failures, dead, last_error, updated_at) \
             VALUES (?1, ?2, 1, ?3, ?4, ",
            now_ms!(),
            ") ON CONFLICT (consumer, message_id) DO UPDATE SET \
               failures = failures + 1, \
               dead = dead OR excluded.dead, \
               last_error = excluded.last_error, \
               updated_at = excluded.updated_at \
             RETURNING failures"
        );
        pub const PURGE_MESSAGES: &str = concat!(
            "DELETE FROM inbox_consumer_messages WHERE rowid IN ( \
               SELECT rowid FROM inbox_consumer_messages \
               WHERE consumer = ?1 AND processed_at < ",
            now_ms!(),
            " - ?2 LIMIT ?3)"
        );
        pub const PURGE_ATTEMPTS: &str = concat!(
            "DELETE FROM inbox_consumer_attempts WHERE rowid IN ( \
               SELECT rowid FROM inbox_consumer_attempts \
               WHERE consumer = ?1 AND updated_at < ",
            now_ms!(),
            " - ?2 LIMIT ?3)"
        );
        pub const ATTEMPTS: &str = "\
            SELECT COALESCE( \
              (SELECT attempts FROM inbox_consumer_messages WHERE consumer = ?1 AND message_id = ?2), \
              (SELECT failures FROM inbox_consumer_attempts WHERE consumer = ?1 AND message_id = ?2))";
        pub const REVIVE: &str = "\
            DELETE FROM inbox_consumer_attempts WHERE consumer = ?1 AND message_id = ?2";
    }

    fn retention_millis(age: Duration) -> i64 {
        i64::try_from(age.as_millis()).unwrap_or(i64::MAX)
    }

    transactional_mode! {
        db = Sqlite,
        mode = SqliteTransactional,
        pool = SqlitePool,
        int = i64,
        sql = sql,
        retention = retention_millis,
        begin = Some("BEGIN IMMEDIATE"),
    }
}
