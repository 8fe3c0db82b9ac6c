//! Writing events inside the caller's transaction.

use crate::error::OutboxError;
use crate::event::{Event, DEFAULT_MAX_EVENT_SIZE};

/// The channel [`enqueue`] notifies and the relay listens on.
pub const CHANNEL: &str = "outbox";

mod sealed {
    pub trait Sealed {}
}

/// A database connection [`enqueue`] can write to: `sqlx::PgConnection`
/// (feature `postgres`) or `sqlx::SqliteConnection` (feature `sqlite`).
/// Sealed.
pub trait OutboxConnection: sealed::Sealed + Send {
    /// The database it connects to.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    #[doc(hidden)]
    type Database: crate::OutboxDatabase;

    /// Itself, as a connection of its database.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    #[doc(hidden)]
    fn connection(&mut self) -> &mut <Self::Database as sqlx::Database>::Connection;
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
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    insert::<C::Database>(conn.connection(), event).await?;
    #[cfg(not(any(feature = "postgres", feature = "sqlite")))]
    let _ = conn;
    Ok(())
}

/// The insert (on PostgreSQL with the key's lock and the notification in
/// its CTE): one statement, one round trip.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
async fn insert<DB: crate::OutboxDatabase>(
    conn: &mut DB::Connection,
    event: &Event,
) -> Result<(), OutboxError> {
    let sql = if event.ordering_key().is_some() {
        DB::SQL.insert_keyed
    } else {
        DB::SQL.insert
    };
    // On the stack: binding it allocates nothing more than the row's text.
    #[cfg(feature = "trace")]
    let traceparent = crate::trace::Traceparent::current();
    let statement = sql_foundation::Statement::<DB>::new(sql)
        .bind(event.id().to_string())
        .bind(event.destination())
        .bind(event.ordering_key())
        .bind(event.headers_json())
        .bind(event.payload().as_ref());
    #[cfg(feature = "trace")]
    let statement = statement.bind(traceparent.as_ref().map(crate::trace::Traceparent::as_str));
    statement
        .execute(sql_foundation::On::Conn(conn))
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                OutboxError::DuplicateId(event.id())
            }
            _ => OutboxError::Database(e),
        })?;
    Ok(())
}

/// `$conn` is a connection of `$db` that [`enqueue`] writes to.
macro_rules! outbox_connection {
    ($feature:literal, $conn:ty, $db:ty) => {
        #[cfg(feature = $feature)]
        impl sealed::Sealed for $conn {}

        #[cfg(feature = $feature)]
        impl OutboxConnection for $conn {
            type Database = $db;

            fn connection(&mut self) -> &mut $conn {
                self
            }
        }
    };
}

outbox_connection!("postgres", sqlx::PgConnection, sqlx::Postgres);
outbox_connection!("sqlite", sqlx::SqliteConnection, sqlx::Sqlite);
