//! Writing events inside the caller's transaction, and the embedded migrations.

use crate::error::OutboxError;
use crate::event::{Event, DEFAULT_MAX_EVENT_SIZE};

/// The PostgreSQL advisory lock class producers of one ordering key take.
#[cfg(feature = "postgres")]
pub(crate) const PRODUCER_LOCK_CLASS: i32 = 0x6f75_7401;
// The producer's SQL spells the class out.
#[cfg(feature = "postgres")]
const _: () = assert!(PRODUCER_LOCK_CLASS == 1_869_968_385);
/// The PostgreSQL advisory lock class a relay holds while publishing a key.
#[cfg(feature = "postgres")]
pub(crate) const RELAY_LOCK_CLASS: i32 = 0x6f75_7402;
/// The lock serialising concurrent runs of [`migrate_postgres`].
#[cfg(feature = "postgres")]
const MIGRATION_LOCK: i64 = 0x6f75_7462_6f78_0001;
/// The channel [`enqueue`] notifies and the relay listens on.
pub const CHANNEL: &str = "outbox";

mod sealed {
    pub trait Sealed {}
}

/// A database connection [`enqueue`] can write to: `sqlx::PgConnection`
/// (feature `postgres`) or `sqlx::SqliteConnection` (feature `sqlite`).
/// Sealed.
pub trait OutboxConnection: sealed::Sealed + Send {
    #[doc(hidden)]
    fn insert_event<'c>(
        &'c mut self,
        event: &'c Event,
    ) -> futures_util::future::BoxFuture<'c, Result<(), OutboxError>>;
}

/// Writes `event` to the outbox through `conn`, normally the transaction that
/// writes the business change: `outbox::enqueue(&mut *tx, &event)`. The event
/// exists if and only if that transaction commits. Refuses events larger than
/// [`DEFAULT_MAX_EVENT_SIZE`]; see [`enqueue_with_max_size`].
///
/// On PostgreSQL an event with an ordering key first takes a
/// transaction-scoped lock on its key, so producers of one key commit in the
/// order of their `seq` (a second producer of the key waits for the first to
/// commit or roll back). Every enqueue notifies the relays (`NOTIFY outbox`,
/// delivered at commit). Both are folded into the `INSERT`: one round trip.
///
/// # Errors
/// [`OutboxError::Event`] for an invalid event (nothing is written),
/// [`OutboxError::DuplicateId`], or [`OutboxError::Database`]. After a
/// database error the transaction is aborted on PostgreSQL: roll it back.
pub async fn enqueue<C>(conn: &mut C, event: &Event) -> Result<(), OutboxError>
where
    C: OutboxConnection + ?Sized,
{
    enqueue_with_max_size(conn, event, DEFAULT_MAX_EVENT_SIZE).await
}

/// [`enqueue`] with another size limit than [`DEFAULT_MAX_EVENT_SIZE`].
///
/// # Errors
/// As [`enqueue`]; [`EventError::TooLarge`](crate::EventError::TooLarge)
/// names `max_size`.
pub async fn enqueue_with_max_size<C>(
    conn: &mut C,
    event: &Event,
    max_size: usize,
) -> Result<(), OutboxError>
where
    C: OutboxConnection + ?Sized,
{
    event.validate(max_size)?;
    conn.insert_event(event).await
}

#[cfg(any(feature = "postgres", feature = "sqlite"))]
fn map_insert_error(event: &Event, e: sqlx::Error) -> OutboxError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            OutboxError::DuplicateId(event.id())
        }
        _ => OutboxError::Database(e),
    }
}

#[cfg(feature = "postgres")]
mod pg {
    use super::*;
    use sqlx::{PgConnection, PgPool};

    impl sealed::Sealed for PgConnection {}

    impl OutboxConnection for PgConnection {
        fn insert_event<'c>(
            &'c mut self,
            event: &'c Event,
        ) -> futures_util::future::BoxFuture<'c, Result<(), OutboxError>> {
            Box::pin(async move {
                // The lock (keyed events only) and the notification ride in
                // the INSERT's CTE; the row is produced from it, so the lock
                // is held before `seq` is drawn.
                let sql = if event.ordering_key().is_some() {
                    // 1869968385 = PRODUCER_LOCK_CLASS (checked by a test).
                    "WITH gate AS (SELECT pg_advisory_xact_lock(1869968385, hashtext($3)), \
                     pg_notify('outbox', '')) \
                     INSERT INTO outbox.events (id, destination, ordering_key, headers, payload) \
                     SELECT $1::uuid, $2, $3, $4::jsonb, $5 FROM gate"
                } else {
                    "WITH gate AS (SELECT pg_notify('outbox', '')) \
                     INSERT INTO outbox.events (id, destination, ordering_key, headers, payload) \
                     SELECT $1::uuid, $2, $3, $4::jsonb, $5 FROM gate"
                };
                sqlx::query(sql)
                    .bind(event.id().to_string())
                    .bind(event.destination())
                    .bind(event.ordering_key())
                    .bind(event.headers_json())
                    .bind(event.payload().as_ref())
                    .execute(&mut *self)
                    .await
                    .map_err(|e| map_insert_error(event, e))?;
                Ok(())
            })
        }
    }

    /// Creates or updates the outbox table, `outbox.events`, in its own
    /// schema `outbox`, with its own migration history
    /// (`outbox._sqlx_migrations`), so it never mixes with the application's
    /// migrations. Safe to call from several instances at once.
    ///
    /// # Errors
    /// [`OutboxError::Database`] or [`OutboxError::Migrate`].
    pub async fn migrate_postgres(pool: &PgPool) -> Result<(), OutboxError> {
        let mut conn = pool.acquire().await?;
        let result = async {
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *conn)
                .await?;
            let migrated = async {
                sqlx::query("CREATE SCHEMA IF NOT EXISTS outbox")
                    .execute(&mut *conn)
                    .await?;
                // The migrator's bookkeeping table follows the search path.
                sqlx::query("SET search_path TO outbox")
                    .execute(&mut *conn)
                    .await?;
                sqlx::migrate!("./migrations/postgres")
                    .run_direct(&mut *conn)
                    .await?;
                sqlx::query("RESET search_path").execute(&mut *conn).await?;
                Ok::<_, OutboxError>(())
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
            conn.detach();
        }
        result
    }
}

#[cfg(feature = "postgres")]
pub use pg::migrate_postgres;

#[cfg(feature = "sqlite")]
mod lite {
    use super::*;
    use sqlx::{SqliteConnection, SqlitePool};

    impl sealed::Sealed for SqliteConnection {}

    impl OutboxConnection for SqliteConnection {
        fn insert_event<'c>(
            &'c mut self,
            event: &'c Event,
        ) -> futures_util::future::BoxFuture<'c, Result<(), OutboxError>> {
            Box::pin(async move {
                let now = crate::unix_millis();
                sqlx::query(
                    "INSERT INTO outbox_events \
                     (id, destination, ordering_key, headers, payload, created_at, available_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(event.id().to_string())
                .bind(event.destination())
                .bind(event.ordering_key())
                .bind(event.headers_json())
                .bind(event.payload().as_ref())
                .bind(now)
                .bind(now)
                .execute(&mut *self)
                .await
                .map_err(|e| map_insert_error(event, e))?;
                Ok(())
            })
        }
    }

    /// Creates or updates the SQLite outbox table `outbox_events`. Its
    /// migration versions are dated far from a hand-numbered sequence and it
    /// ignores versions it does not know, so it shares `_sqlx_migrations`
    /// with the application's own migrator.
    ///
    /// # Errors
    /// [`OutboxError::Database`] or [`OutboxError::Migrate`].
    pub async fn migrate_sqlite(pool: &SqlitePool) -> Result<(), OutboxError> {
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        migrator.set_ignore_missing(true);
        migrator.run(pool).await?;
        Ok(())
    }
}

#[cfg(feature = "sqlite")]
pub use lite::migrate_sqlite;
