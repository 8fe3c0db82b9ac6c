//! The projector's errors.

use crate::config::ConfigError;

/// Why a projector failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The projector's configuration is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The projector's own database work failed (not the projection's
    /// `apply`, whose failures are attempts).
    #[error("the projection database failed")]
    Database(#[source] sqlx::Error),
    /// The embedded migrations failed.
    #[error("the projection migrations failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The outbox (its migrations, or a retention hold) failed.
    #[error("the outbox failed")]
    Outbox(#[source] outbox::OutboxError),
    /// The inbox (its migrations) failed.
    #[error("the inbox failed")]
    Inbox(#[source] inbox_consumer::InboxError),
    /// The projection's [`setup`](crate::Projection::setup) failed; the
    /// version was not registered.
    #[error("the setup of {version} failed")]
    Setup {
        /// The version, as `<name> version <n>`.
        version: String,
        /// Its error.
        #[source]
        source: sqlx::Error,
    },
    /// The history a new version builds from is no longer complete: the
    /// outbox purged events it would need. Nothing was registered: no
    /// partial model is built. Keep the outbox's events longer (a
    /// retention hold from an older version, a longer retention), or start
    /// the version from now ([`Start::Now`](crate::Start::Now)) knowing it
    /// will not see the events before.
    #[error(
        "{projection} version {version} cannot build from the outbox's history: it needs \
         every event from seq {needed_from}, and the outbox purged events up to seq \
         {purged_through}"
    )]
    HistoryPurged {
        /// The projection.
        projection: String,
        /// The version.
        version: u32,
        /// The first `seq` it needs.
        needed_from: i64,
        /// The highest `seq` the outbox may have purged.
        purged_through: i64,
    },
    /// The version was registered with another number of partitions (or
    /// another source): a version's partitions are fixed; a change needs a
    /// new version.
    #[error(
        "{projection} version {version} was registered with {registered}; this projector \
         has {configured}: start a new version to change it"
    )]
    Registered {
        /// The projection.
        projection: String,
        /// The version.
        version: u32,
        /// What it was registered with (`4 partitions`, `source outbox`).
        registered: String,
        /// What this projector has.
        configured: String,
    },
    /// The version is the one served: it cannot be dropped.
    #[error("{projection} version {version} is the version served")]
    Served {
        /// The projection.
        projection: String,
        /// The version.
        version: u32,
    },
    /// The method is for the other source ([`Source`](crate::Source)).
    #[error("{method} is for a projector with source {expected:?}")]
    WrongSource {
        /// The method.
        method: &'static str,
        /// The source it needs.
        expected: crate::Source,
    },
}

impl From<sqlx::Error> for ProjectionError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

impl ProjectionError {
    /// A migration's error.
    pub(crate) fn from_migration(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Migrate(m) => Self::Migrate(*m),
            e => Self::Database(e),
        }
    }
}
