//! What a projection is: its tables, and how an event changes them.

use std::future::Future;

use sqlx::PgConnection;

use crate::{Event, Version};

/// Why `apply` failed: [`ApplyError::transient`] (retried, then parked
/// after the attempts) or [`ApplyError::permanent`] (parked at once, e.g.
/// a payload that does not decode). A `sqlx::Error` converts to a
/// transient one, so `?` works on queries. (The inbox's handler error:
/// one type for both sources.)
pub type ApplyError = inbox_consumer::HandlerError;

/// A read model: tables of its own, changed by events.
///
/// Both methods get the database connection of a transaction the projector
/// holds and commits: write through it, never commit or roll it back. Each
/// version has a schema of its own ([`Version::schema`], created before
/// [`setup`](Self::setup)); write only to [`Version::table`]s, so a new
/// version builds while the old one serves.
///
/// Implement the methods as `async fn`; their futures must be `Send`.
pub trait Projection: Send + Sync + 'static {
    /// Creates the tables of `version` (in `version.schema()`). Runs once
    /// per version, in the transaction that registers it.
    fn setup(
        &self,
        conn: &mut PgConnection,
        version: &Version,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Applies `event` to the tables of `version`, through `conn`. Its
    /// change commits with the projector's record that the event is applied
    /// (the outbox tail's mark, or the inbox's row), or not at all.
    ///
    /// An error rolls the transaction back and counts an attempt; after
    /// [`max_attempts`](crate::ProjectorConfig::max_attempts) (or at once
    /// for a [permanent](ApplyError::permanent) error) the event is parked
    /// with the error as its reason, and the events behind it are applied.
    /// A panic counts as a failed attempt.
    fn apply(
        &self,
        conn: &mut PgConnection,
        version: &Version,
        event: &Event,
    ) -> impl Future<Output = Result<(), ApplyError>> + Send;
}
