//! The inbox's own errors (its database or store), as opposed to the handler's.

use crate::config::ConfigError;

/// Why the inbox itself failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError {
    /// The config is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The inbox's database failed.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    #[error("the inbox database failed")]
    Database(#[from] sqlx::Error),
    /// The inbox's database failed for a whole batch
    /// ([`process_batch`](crate::Inbox::process_batch)): every message of
    /// the batch carries this error, and shares its cause.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    #[error("the inbox database failed (a batch of {messages} messages)")]
    Batch {
        /// How many messages the batch had.
        messages: usize,
        /// The database's error.
        #[source]
        source: std::sync::Arc<sqlx::Error>,
    },
    /// The inbox's embedded migrations failed.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    #[error("the inbox migrations failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The lease-mode store failed.
    #[error("the inbox store failed")]
    Store(#[from] idempotency_core::StoreError),
}

impl InboxError {
    /// A migration's error: the migrator's own, or the database's.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(crate) fn from_migration(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Migrate(m) => InboxError::Migrate(*m),
            e => InboxError::Database(e),
        }
    }
}

/// The error and its causes, joined by `: ` (for one log field).
#[cfg(any(feature = "rabbitmq", feature = "nats"))]
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = e.source();
    }
    out
}
