//! Transactional mode: the inbox row and the business effect commit in one
//! database transaction (PostgreSQL or SQLite, through sqlx). Written once
//! for both over `sql-foundation`'s [`Dialect`]; only the statements differ.
//!
//! Per delivery:
//! 1. `BEGIN`; insert `(consumer, message id)` into the inbox table, unless a
//!    dead mark or the attempt limit forbids it. A concurrent copy of the same
//!    message blocks here on the primary key until the first transaction ends.
//! 2. Nothing inserted: the message committed before (duplicate) or is dead.
//! 3. Inserted: the handler runs in the same transaction, then `COMMIT`.
//! 4. The handler failed: `ROLLBACK`, then count the failure in the attempts
//!    table in its own statement, so the count survives the rollback.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use idempotency_core::BoxFuture;
use sql_foundation::{millis, Dialect, Statement};
use sqlx::{Pool, Transaction};

use crate::error::InboxError;
use crate::inbox::{in_span, run_guarded, Inbox};
use crate::message::InboxMessage;
use crate::outcome::{DeadReason, FailureKind, HandlerError, Outcome};

/// How long to suggest waiting before redelivery when the database failed.
pub(crate) const UNAVAILABLE_RETRY: Duration = Duration::from_secs(1);

/// The outcome of a message whose inbox database failed: requeue.
pub(crate) fn unavailable(e: sqlx::Error) -> Outcome {
    Outcome::Unavailable {
        error: InboxError::Database(e),
        retry_after: UNAVAILABLE_RETRY,
    }
}

/// Transactional mode on a database: [`PostgresTransactional`] or
/// [`SqliteTransactional`]. Holds the pool; clones share it.
pub struct Transactional<DB: InboxDatabase> {
    pub(crate) pool: Pool<DB>,
    /// A batch of this inbox met an id already recorded, and no batch
    /// claimed with `ON CONFLICT` since found every id new: batches skip
    /// the plain insert (which would fail) until then. Shared by clones.
    pub(crate) seen_duplicates: Arc<AtomicBool>,
}

impl<DB: InboxDatabase> Transactional<DB> {
    pub(crate) fn new(pool: Pool<DB>) -> Self {
        Self {
            pool,
            seen_duplicates: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl<DB: InboxDatabase> Clone for Transactional<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            seen_duplicates: Arc::clone(&self.seen_duplicates),
        }
    }
}

impl<DB: InboxDatabase> std::fmt::Debug for Transactional<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transactional")
            .field("database", &DB::BACKEND)
            .finish_non_exhaustive()
    }
}

/// Transactional mode on PostgreSQL. Tables live in schema
/// `inbox_consumer` (with their own migration history), so they never mix
/// with the application's.
#[cfg(feature = "postgres")]
pub type PostgresTransactional = Transactional<sqlx::Postgres>;

/// Transactional mode on SQLite: one machine, one or several processes
/// sharing the file (give the pool WAL and a busy timeout). Each message
/// takes the write lock up front (`BEGIN IMMEDIATE`), so a concurrent copy
/// waits for the first to commit and then sees the duplicate.
#[cfg(feature = "sqlite")]
pub type SqliteTransactional = Transactional<sqlx::Sqlite>;

/// A database the inbox runs on: its statements. Sealed.
pub trait InboxDatabase: Dialect + sealed::Sealed {
    /// The inbox's statements on this database.
    #[doc(hidden)]
    const SQL: &'static Statements;
}

mod sealed {
    pub trait Sealed {}
}

/// The inbox's statements on one database; every integer they return is
/// 64-bit, every age is in milliseconds.
#[doc(hidden)]
#[derive(Debug)]
pub struct Statements {
    /// `(consumer, id, max attempts)` → `attempts` when inserted.
    claim: &'static str,
    /// `(consumer, JSON array of distinct ids, max attempts)` → one row
    /// `message_id, attempts` per id inserted: the batch's dedup in one
    /// statement.
    pub(crate) claim_batch: &'static str,
    /// `(consumer, JSON array of distinct ids, max attempts)` → one row
    /// `message_id, failures, dead` per id that has failures counted:
    /// inserts the batch's rows with a plain insert (no `ON CONFLICT`, no
    /// `RETURNING` of every row), so an id already recorded fails the
    /// whole statement with a unique violation, and the batch is claimed
    /// again with `claim_batch`. Every id not returned, and every id
    /// returned that is neither dead nor out of attempts, was inserted.
    /// `None` where the database has no cheaper form than `claim_batch`.
    pub(crate) claim_fresh_batch: Option<&'static str>,
    /// `(consumer, id)` → `failures, dead`.
    failures: &'static str,
    /// `(consumer, JSON array of ids)` → `message_id, failures, dead` of
    /// those with attempts counted.
    pub(crate) failures_batch: &'static str,
    /// `(consumer, id, dead, error, max attempts, payload, headers as JSON)`
    /// → `failures`: counts a failure, keeps the payload and the headers,
    /// and marks the message dead when the failure is permanent or the
    /// attempts are used up.
    fail: &'static str,
    /// `(consumer, age ms, batch)`: deletes a batch of processed rows.
    purge_messages: &'static str,
    /// `(consumer, age ms, batch)`: deletes a batch of attempt counts.
    purge_attempts: &'static str,
    /// `(consumer, id)` → `attempts`.
    attempts: &'static str,
    /// `(consumer, id)`: forgets the failures and the dead mark.
    revive: &'static str,
    /// `(consumer, limit)` → `message_id, payload, headers` (JSON text) of
    /// the messages an operator asked to replay that are due.
    pub(crate) replays: &'static str,
    /// `(consumer, id)`: the replay asked for is done.
    pub(crate) replayed: &'static str,
    /// `(consumer, id, delay ms)`: the replay failed; again after the delay.
    pub(crate) replay_later: &'static str,
}

impl<DB: InboxDatabase> Inbox<Transactional<DB>> {
    /// Runs `handler` inside the transaction that records the message,
    /// unless the message was processed before or is dead.
    ///
    /// The handler gets the transaction (do the business effect with it,
    /// never commit it) and the message. Like a spawned task, the handler's
    /// future may borrow only the transaction and the message: move clones
    /// of anything else into it. Return [`HandlerError::transient`] to
    /// retry, [`HandlerError::permanent`] to dead-letter (an undecodable
    /// payload). Ack the message only after this returns
    /// [`Outcome::Processed`] or [`Outcome::Duplicate`] (see
    /// [`Outcome::disposition`]).
    pub async fn process<F>(&self, message: &InboxMessage, handler: F) -> Outcome
    where
        F: for<'t> FnOnce(
            &'t mut Transaction<'static, DB>,
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

    async fn process_keyed<F>(&self, key: &str, message: &InboxMessage, handler: F) -> Outcome
    where
        F: for<'t> FnOnce(
            &'t mut Transaction<'static, DB>,
            &'t InboxMessage,
        ) -> BoxFuture<'t, Result<(), HandlerError>>,
    {
        let (mut tx, attempt) = match self.claim_one(key).await {
            Ok(claimed) => claimed,
            Err(outcome) => return outcome,
        };
        let handled = in_span(self.consumer(), key, message, handler(&mut tx, message));
        let result = run_guarded(handled).await;
        self.conclude_one(key, message, tx, attempt, result).await
    }

    /// Begins the message's transaction and inserts its inbox row: the
    /// transaction and the attempt, or the outcome when it is not to run
    /// (a duplicate, dead, or the database failed).
    pub(crate) async fn claim_one(
        &self,
        key: &str,
    ) -> Result<(Transaction<'static, DB>, i64), Outcome> {
        let max = i64::from(self.config().max_attempts());
        let mut tx = DB::begin_write(&self.backend.pool)
            .await
            .map_err(unavailable)?;
        let inserted = Statement::<DB>::new(DB::SQL.claim)
            .bind(self.consumer())
            .bind(key)
            .bind(max)
            .fetch_optional(&mut tx)
            .await
            .and_then(|row| row.map(|row| DB::get::<i64>(&row, "attempts")).transpose());
        match inserted {
            Ok(Some(attempt)) => Ok((tx, attempt)),
            Ok(None) => Err(self.not_inserted(&mut tx, key, max).await),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Ends a claimed message's transaction by the handler's `result`:
    /// commits it, or rolls it back and counts the failure.
    pub(crate) async fn conclude_one(
        &self,
        key: &str,
        message: &InboxMessage,
        tx: Transaction<'static, DB>,
        attempt: i64,
        result: Result<(), HandlerError>,
    ) -> Outcome {
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
                    tracing::warn!(consumer = self.consumer(), message_id = key, error = %e, "inbox: rollback failed");
                }
                let attempt = self
                    .count_failure(key, message, &error)
                    .await
                    .unwrap_or(attempt);
                self.failure_outcome(u32::try_from(attempt).unwrap_or(u32::MAX), error)
            }
        }
    }

    /// Why the inbox row was not inserted: the message is dead (marked, or
    /// out of attempts) or a duplicate.
    async fn not_inserted(
        &self,
        tx: &mut Transaction<'static, DB>,
        key: &str,
        max: i64,
    ) -> Outcome {
        let failures = Statement::<DB>::new(DB::SQL.failures)
            .bind(self.consumer())
            .bind(key)
            .fetch_optional(tx)
            .await
            .and_then(|row| {
                row.map(|row| {
                    Ok((
                        DB::get::<i64>(&row, "failures")?,
                        DB::get::<bool>(&row, "dead")?,
                    ))
                })
                .transpose()
            });
        match failures {
            Ok(Some((n, dead))) if dead || n >= max => Outcome::Dead {
                reason: DeadReason::AlreadyDead,
            },
            Ok(_) => Outcome::Duplicate,
            Err(e) => Outcome::Unavailable {
                error: InboxError::Database(e),
                retry_after: UNAVAILABLE_RETRY,
            },
        }
    }

    /// Counts a failed attempt in its own statement (the handler's
    /// transaction rolled back), keeping the message's payload and headers
    /// for a replay once it is dead; the failures so far, `None` when the
    /// count itself failed (logged).
    async fn count_failure(
        &self,
        key: &str,
        message: &InboxMessage,
        error: &HandlerError,
    ) -> Option<i64> {
        let headers = serde_json::to_string(message.headers()).unwrap_or_else(|_| "[]".into());
        let counted = Statement::<DB>::new(DB::SQL.fail)
            .bind(self.consumer())
            .bind(key)
            .bind(error.kind() == FailureKind::Permanent)
            .bind(error.to_string())
            .bind(i64::from(self.config().max_attempts()))
            .bind(message.payload().as_ref())
            .bind(headers)
            .fetch_one(&self.backend.pool)
            .await
            .and_then(|row| DB::get::<i64>(&row, "failures"));
        match counted {
            Ok(n) => Some(n),
            Err(e) => {
                // The handler's failure is what matters; the attempt it had
                // when it started stands in.
                tracing::error!(consumer = self.consumer(), message_id = key, error = %e,
                    "inbox: could not count a failed attempt");
                None
            }
        }
    }

    /// Deletes this consumer's processed rows older than the retention, and
    /// its attempt counts untouched that long, in batches of `purge_batch`
    /// rows; returns how many rows went.
    ///
    /// Safe to run from several instances at once. It never deletes a
    /// message in flight: that row is not committed yet, so no purge can
    /// see it.
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
        for statement in [DB::SQL.purge_messages, DB::SQL.purge_attempts] {
            loop {
                let done = Statement::<DB>::new(statement)
                    .bind(self.consumer())
                    .bind(millis(age))
                    .bind(batch)
                    .execute(&self.backend.pool)
                    .await?;
                total += done;
                if done < batch.unsigned_abs() {
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
        let row = Statement::<DB>::new(DB::SQL.attempts)
            .bind(self.consumer())
            .bind(message_id)
            .fetch_one(&self.backend.pool)
            .await?;
        let n: Option<i64> = DB::get(&row, "attempts")?;
        Ok(n.map(|n| u32::try_from(n).unwrap_or(0)))
    }

    /// Forgets the failures and dead mark of `message_id`, so a message
    /// replayed from the dead-letter queue (after a fix) is processed
    /// again. Returns whether there was anything to forget.
    ///
    /// # Errors
    /// [`InboxError::Database`].
    pub async fn revive(&self, message_id: &str) -> Result<bool, InboxError> {
        let done = Statement::<DB>::new(DB::SQL.revive)
            .bind(self.consumer())
            .bind(message_id)
            .execute(&self.backend.pool)
            .await?;
        Ok(done > 0)
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.backend.pool
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use sqlx::{PgPool, Postgres};

    static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

    /// The schema of the inbox's tables.
    const SCHEMA: &str = "inbox_consumer";

    impl super::sealed::Sealed for Postgres {}

    impl InboxDatabase for Postgres {
        const SQL: &'static Statements = &Statements {
            claim: "\
                INSERT INTO inbox_consumer.messages (consumer, message_id, attempts) \
                SELECT $1, $2, 1 + COALESCE(a.failures, 0) \
                FROM (SELECT 1) AS one \
                LEFT JOIN inbox_consumer.attempts a ON a.consumer = $1 AND a.message_id = $2 \
                WHERE a.consumer IS NULL OR (NOT a.dead AND a.failures < $3) \
                ON CONFLICT (consumer, message_id) DO NOTHING \
                RETURNING attempts::int8 AS attempts",
            // In the ids' order, so that two batches sharing ids take their
            // row locks in the same order and cannot deadlock.
            claim_batch: "\
                INSERT INTO inbox_consumer.messages (consumer, message_id, attempts) \
                SELECT $1, ids.id, 1 + COALESCE(a.failures, 0) \
                FROM json_array_elements_text($2::text::json) AS ids(id) \
                LEFT JOIN inbox_consumer.attempts a ON a.consumer = $1 AND a.message_id = ids.id \
                WHERE a.consumer IS NULL OR (NOT a.dead AND a.failures < $3) \
                ORDER BY ids.id \
                ON CONFLICT (consumer, message_id) DO NOTHING \
                RETURNING message_id, attempts::int8 AS attempts",
            // The ids with failures counted are looked up once and returned
            // (normally none); the others are inserted with attempt 1.
            claim_fresh_batch: Some("\
                WITH ids AS ( \
                  SELECT ids.id, a.failures, a.dead \
                  FROM json_array_elements_text($2::text::json) AS ids(id) \
                  LEFT JOIN inbox_consumer.attempts a \
                    ON a.consumer = $1 AND a.message_id = ids.id), \
                inserted AS ( \
                  INSERT INTO inbox_consumer.messages (consumer, message_id, attempts) \
                  SELECT $1, id, 1 + COALESCE(failures, 0) FROM ids \
                  WHERE failures IS NULL OR (NOT dead AND failures < $3) \
                  ORDER BY id) \
                SELECT id AS message_id, failures::int8 AS failures, dead FROM ids \
                WHERE failures IS NOT NULL"),
            failures: "\
                SELECT failures::int8 AS failures, dead FROM inbox_consumer.attempts \
                WHERE consumer = $1 AND message_id = $2",
            failures_batch: "\
                SELECT message_id, failures::int8 AS failures, dead FROM inbox_consumer.attempts \
                WHERE consumer = $1 \
                  AND message_id IN (SELECT json_array_elements_text($2::text::json))",
            fail: "\
                INSERT INTO inbox_consumer.attempts \
                  (consumer, message_id, failures, dead, last_error, payload, headers) \
                VALUES ($1, $2, 1, $3 OR $5 <= 1, $4, $6, $7::text::jsonb) \
                ON CONFLICT (consumer, message_id) DO UPDATE SET \
                  failures = attempts.failures + 1, \
                  dead = attempts.dead OR EXCLUDED.dead OR attempts.failures + 1 >= $5, \
                  last_error = EXCLUDED.last_error, \
                  payload = EXCLUDED.payload, \
                  headers = EXCLUDED.headers, \
                  updated_at = now() \
                RETURNING failures::int8 AS failures",
            // SKIP LOCKED: instances purging at once take disjoint batches.
            purge_messages: "\
                WITH doomed AS ( \
                  SELECT ctid FROM inbox_consumer.messages \
                  WHERE consumer = $1 AND processed_at < now() - $2::int8 * interval '1 millisecond' \
                  LIMIT $3 FOR UPDATE SKIP LOCKED) \
                DELETE FROM inbox_consumer.messages WHERE ctid IN (SELECT ctid FROM doomed)",
            purge_attempts: "\
                WITH doomed AS ( \
                  SELECT ctid FROM inbox_consumer.attempts \
                  WHERE consumer = $1 AND updated_at < now() - $2::int8 * interval '1 millisecond' \
                  LIMIT $3 FOR UPDATE SKIP LOCKED) \
                DELETE FROM inbox_consumer.attempts WHERE ctid IN (SELECT ctid FROM doomed)",
            attempts: "\
                SELECT COALESCE( \
                  (SELECT attempts FROM inbox_consumer.messages WHERE consumer = $1 AND message_id = $2), \
                  (SELECT failures FROM inbox_consumer.attempts WHERE consumer = $1 AND message_id = $2))::int8 \
                  AS attempts",
            revive: "\
                DELETE FROM inbox_consumer.attempts WHERE consumer = $1 AND message_id = $2",
            replays: "\
                SELECT message_id, payload, headers::text AS headers FROM inbox_consumer.attempts \
                WHERE consumer = $1 AND replay_at <= now() AND NOT dead AND payload IS NOT NULL \
                ORDER BY replay_at LIMIT $2",
            replayed: "\
                UPDATE inbox_consumer.attempts SET replay_at = NULL \
                WHERE consumer = $1 AND message_id = $2",
            replay_later: "\
                UPDATE inbox_consumer.attempts \
                SET replay_at = now() + $3::int8 * interval '1 millisecond' \
                WHERE consumer = $1 AND message_id = $2 AND replay_at IS NOT NULL",
        };
    }

    impl Inbox<PostgresTransactional> {
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
            Self::from_parts(Transactional::new(pool), config)
        }
    }

    /// Creates or updates the inbox's tables in schema `inbox_consumer`.
    /// Safe to call from several instances at once.
    ///
    /// # Errors
    /// [`InboxError::Database`] or [`InboxError::Migrate`].
    pub async fn migrate_postgres(pool: &PgPool) -> Result<(), InboxError> {
        sql_foundation::migrate_postgres(pool, SCHEMA, &MIGRATOR)
            .await
            .map_err(InboxError::from_migration)
    }
}

#[cfg(feature = "postgres")]
pub use self::postgres::migrate_postgres;

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use sqlx::{Sqlite, SqlitePool};

    static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

    impl super::sealed::Sealed for Sqlite {}

    // SQLite's own clock, in Unix milliseconds.
    macro_rules! now_ms {
        () => {
            "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
        };
    }

    impl InboxDatabase for Sqlite {
        const SQL: &'static Statements = &Statements {
            claim: concat!(
                "INSERT INTO inbox_consumer_messages (consumer, message_id, attempts, processed_at) \
                 SELECT $1, $2, 1 + COALESCE((SELECT failures FROM inbox_consumer_attempts \
                     WHERE consumer = $1 AND message_id = $2), 0), ",
                now_ms!(),
                " WHERE NOT EXISTS (SELECT 1 FROM inbox_consumer_attempts \
                     WHERE consumer = $1 AND message_id = $2 AND (dead OR failures >= $3)) \
                 ON CONFLICT (consumer, message_id) DO NOTHING \
                 RETURNING attempts"
            ),
            // `WHERE` before `ON CONFLICT`: SQLite's parser needs it to tell
            // the upsert from a join's `ON`.
            claim_batch: concat!(
                "INSERT INTO inbox_consumer_messages (consumer, message_id, attempts, processed_at) \
                 SELECT $1, ids.value, 1 + COALESCE(a.failures, 0), ",
                now_ms!(),
                " FROM json_each($2) AS ids \
                 LEFT JOIN inbox_consumer_attempts a ON a.consumer = $1 AND a.message_id = ids.value \
                 WHERE a.consumer IS NULL OR (NOT a.dead AND a.failures < $3) \
                 ON CONFLICT (consumer, message_id) DO NOTHING \
                 RETURNING message_id, attempts"
            ),
            // SQLite has no insert inside `WITH`; one writer at a time
            // anyway.
            claim_fresh_batch: None,
            failures: "\
                SELECT failures, dead FROM inbox_consumer_attempts \
                WHERE consumer = $1 AND message_id = $2",
            failures_batch: "\
                SELECT message_id, failures, dead FROM inbox_consumer_attempts \
                WHERE consumer = $1 AND message_id IN (SELECT value FROM json_each($2))",
            fail: concat!(
                "INSERT INTO inbox_consumer_attempts \
                   (consumer, message_id, failures, dead, last_error, updated_at, payload, headers) \
                 VALUES ($1, $2, 1, $3 OR $5 <= 1, $4, ",
                now_ms!(),
                ", $6, $7) ON CONFLICT (consumer, message_id) DO UPDATE SET \
                   failures = failures + 1, \
                   dead = dead OR excluded.dead OR failures + 1 >= $5, \
                   last_error = excluded.last_error, \
                   payload = excluded.payload, \
                   headers = excluded.headers, \
                   updated_at = excluded.updated_at \
                 RETURNING failures"
            ),
            purge_messages: concat!(
                "DELETE FROM inbox_consumer_messages WHERE rowid IN ( \
                   SELECT rowid FROM inbox_consumer_messages \
                   WHERE consumer = $1 AND processed_at < ",
                now_ms!(),
                " - $2 LIMIT $3)"
            ),
            purge_attempts: concat!(
                "DELETE FROM inbox_consumer_attempts WHERE rowid IN ( \
                   SELECT rowid FROM inbox_consumer_attempts \
                   WHERE consumer = $1 AND updated_at < ",
                now_ms!(),
                " - $2 LIMIT $3)"
            ),
            attempts: "\
                SELECT COALESCE( \
                  (SELECT attempts FROM inbox_consumer_messages WHERE consumer = $1 AND message_id = $2), \
                  (SELECT failures FROM inbox_consumer_attempts WHERE consumer = $1 AND message_id = $2)) \
                  AS attempts",
            revive: "\
                DELETE FROM inbox_consumer_attempts WHERE consumer = $1 AND message_id = $2",
            replays: concat!(
                "SELECT message_id, payload, headers FROM inbox_consumer_attempts \
                 WHERE consumer = $1 AND replay_at <= ",
                now_ms!(),
                " AND NOT dead AND payload IS NOT NULL ORDER BY replay_at LIMIT $2"
            ),
            replayed: "\
                UPDATE inbox_consumer_attempts SET replay_at = NULL \
                WHERE consumer = $1 AND message_id = $2",
            replay_later: concat!(
                "UPDATE inbox_consumer_attempts SET replay_at = ",
                now_ms!(),
                " + $3 WHERE consumer = $1 AND message_id = $2 AND replay_at IS NOT NULL"
            ),
        };
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
            migrate_sqlite(&pool).await?;
            Ok(Self::from_parts(Transactional::new(pool), config))
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
    pub async fn migrate_sqlite(pool: &SqlitePool) -> Result<(), InboxError> {
        sql_foundation::migrate_sqlite(pool, &MIGRATOR)
            .await
            .map_err(InboxError::from_migration)
    }
}

#[cfg(feature = "sqlite")]
pub use self::sqlite::migrate_sqlite;
