//! The outbox's errors.

use crate::config::ConfigError;
use crate::event::EventError;

/// Why an outbox operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The event was refused before it reached the database.
    #[error(transparent)]
    Event(#[from] EventError),
    /// A relay config is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An event with this id is in the outbox already.
    #[error("an event with id {0} is in the outbox already")]
    DuplicateId(uuid::Uuid),
    /// The outbox's database failed.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    #[error("the outbox database failed")]
    Database(#[source] sqlx::Error),
    /// The outbox's embedded migrations failed.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    #[error("the outbox migrations failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored row could not be read back as an event.
    #[error("a stored event is unreadable: {0}")]
    Corrupt(String),
    /// A retention hold asked for a history the purge has deleted part of.
    #[error(
        "the outbox history from seq {from_seq} is incomplete: events up to seq \
         {purged_through} may have been purged (hold `{hold}` not placed)"
    )]
    HistoryPurged {
        /// The hold's name.
        hold: String,
        /// The first `seq` it asked to keep.
        from_seq: i64,
        /// The highest `seq` the purge may have deleted.
        purged_through: i64,
    },
}

#[cfg(any(feature = "postgres", feature = "sqlite"))]
impl From<sqlx::Error> for OutboxError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

#[cfg(any(feature = "postgres", feature = "sqlite"))]
impl OutboxError {
    /// A migration's error: [`OutboxError::Migrate`] for the migrator's own,
    /// [`OutboxError::Database`] for any other.
    pub(crate) fn from_migration(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Migrate(m) => Self::Migrate(*m),
            e => Self::Database(e),
        }
    }
}
