//! What differs between the databases an outbox lives on: the statements,
//! a relay's claim and marking, and how it waits for work. Everything else
//! (enqueue, the relay's loop, lag, retention) is written once over
//! [`OutboxDatabase`].

use std::future::Future;
use std::time::Duration;

use sql_foundation::Dialect;
use sqlx::Pool;

use crate::config::RelayConfig;
use crate::error::OutboxError;
use crate::event::Event;
use crate::publisher::Outgoing;
use crate::settle::Failure;

/// The column and the parameter of the `traceparent` in the inserts:
/// written only with the feature `trace` (without it, the statements are
/// those of before). The relays read the column in any case, so that a
/// relay built without the feature forwards what a producer stored.
#[cfg(feature = "trace")]
macro_rules! traceparent {
    (column) => {
        ", traceparent"
    };
    (value) => {
        ", $6"
    };
}
#[cfg(not(feature = "trace"))]
macro_rules! traceparent {
    (column) => {
        ""
    };
    (value) => {
        ""
    };
}

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "postgres")]
pub use postgres::{holds, migrate_postgres, place_hold, purged_through, raise_hold, release_hold};
#[cfg(feature = "sqlite")]
pub use sqlite::migrate_sqlite;

/// A database the outbox lives on: `sqlx::Postgres` (feature `postgres`)
/// or `sqlx::Sqlite` (feature `sqlite`). Sealed.
///
/// [`enqueue`](crate::enqueue) and the [`Relay`](crate::Relay) are written
/// once over it; what it holds is only what differs between the two: the
/// statements, one relay round's claim and marking (PostgreSQL claims in a
/// transaction held while the batch is published, with `FOR UPDATE SKIP
/// LOCKED` and advisory locks per key; SQLite reads, then marks in one
/// short write transaction), and how an idle relay waits (PostgreSQL:
/// `LISTEN outbox` with the poll interval as a fallback; SQLite: the poll
/// interval).
pub trait OutboxDatabase: Dialect + sealed::Sealed {
    /// The outbox's statements on this database.
    #[doc(hidden)]
    const SQL: &'static Statements;

    /// What a claim holds until its batch is marked: PostgreSQL's claiming
    /// transaction (its row and key locks), nothing on SQLite.
    #[doc(hidden)]
    type Claim: Send;

    /// What an idle relay waits on: PostgreSQL's listener, nothing on SQLite.
    #[doc(hidden)]
    type Wake: Send;

    /// Claims up to a batch of due events, in `seq` order, each key from its
    /// head; rows that are not events come back apart, to be marked dead.
    #[doc(hidden)]
    fn claim(
        pool: &Pool<Self>,
        cfg: &RelayConfig,
    ) -> impl Future<Output = Result<Claimed<Self::Claim>, OutboxError>> + Send;

    /// Marks `published` published and records `failures` (retry or dead),
    /// then lets go of the claim (commits). Both may be empty.
    #[doc(hidden)]
    fn mark(
        pool: &Pool<Self>,
        claim: Self::Claim,
        published: &[i64],
        failures: &[Failure],
    ) -> impl Future<Output = Result<(), OutboxError>> + Send;

    /// Starts what [`wait`](Self::wait) waits on.
    #[doc(hidden)]
    fn listen(pool: &Pool<Self>) -> impl Future<Output = Result<Self::Wake, OutboxError>> + Send;

    /// Waits for work: a notification, or `poll_interval` at the most.
    #[doc(hidden)]
    fn wait(wake: &mut Self::Wake, poll_interval: Duration) -> impl Future<Output = ()> + Send;
}

pub(crate) mod sealed {
    pub trait Sealed {}
}

/// The outbox's statements on one database.
#[doc(hidden)]
#[derive(Debug)]
pub struct Statements {
    /// `(id, destination, ordering key, headers as JSON, payload)`: inserts
    /// an event without an ordering key.
    pub(crate) insert: &'static str,
    /// The same, for an event with an ordering key.
    pub(crate) insert_keyed: &'static str,
    /// `(age in ms, batch)`: deletes up to `batch` events published more
    /// than `age` ago.
    pub(crate) purge: &'static str,
    /// `()` → `age` (seconds, float) of the oldest event neither published
    /// nor dead; no row when there is none.
    pub(crate) lag: &'static str,
}

/// What a relay claimed: the batch, the rows that are not events, and what
/// holds the claim until the batch is marked.
#[doc(hidden)]
pub struct Claimed<C> {
    pub(crate) claim: C,
    pub(crate) batch: Vec<Outgoing>,
    pub(crate) corrupt: Vec<Failure>,
}

/// The event of a row with the columns `seq`, `id`, `destination`,
/// `ordering_key`, `headers` (JSON text), `payload`, `attempts` (64-bit)
/// and `traceparent`, on its next attempt. A stored `traceparent` becomes
/// the header of that name, unless the event has one of its own.
pub(crate) fn outgoing<DB: Dialect>(row: &DB::Row) -> Result<Outgoing, OutboxError> {
    let mut event = Event::from_row(
        &DB::get::<String>(row, "id")?,
        DB::get(row, "destination")?,
        DB::get(row, "ordering_key")?,
        &DB::get::<String>(row, "headers")?,
        DB::get(row, "payload")?,
    )
    .map_err(OutboxError::Corrupt)?;
    if let Some(traceparent) = DB::get::<Option<String>>(row, "traceparent")? {
        event.add_traceparent(traceparent);
    }
    let attempts: i64 = DB::get(row, "attempts")?;
    Ok(Outgoing {
        seq: seq_of::<DB>(row)?,
        attempt: u32::try_from(attempts).unwrap_or(0).saturating_add(1),
        event,
    })
}

/// The `seq` column of a row.
pub(crate) fn seq_of<DB: Dialect>(row: &DB::Row) -> Result<i64, OutboxError> {
    Ok(DB::get(row, "seq")?)
}
