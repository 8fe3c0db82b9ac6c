//! Why an operation failed, said so that an operator knows what to do.

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The request itself is wrong (a state an area does not have, a filter
    /// it does not take, an id that cannot be one): exit status 2.
    #[error("{0}")]
    Usage(String),
    /// No item has this id.
    #[error("no {what} {id}")]
    NotFound {
        /// What was looked for ("outbox event", "inbox message", ...).
        what: &'static str,
        /// The id given.
        id: String,
    },
    /// An inbox message id that several consumers hold: name one.
    #[error("the message id {id} is known to several consumers ({consumers}): give --consumer")]
    Ambiguous {
        /// The message id.
        id: String,
        /// The consumers, comma-separated.
        consumers: String,
    },
    /// The area's tables are not in this database (or are older than this
    /// tool).
    #[error("{area}: {table} is not in this database ({cause}); is --database the service's database? The service creates its tables when it starts (a newer version adds the columns this tool reads)")]
    MissingTables {
        /// The area.
        area: &'static str,
        /// The table or schema looked for.
        table: &'static str,
        /// PostgreSQL's message.
        cause: String,
    },
    /// The token file cannot be used.
    #[error("the token file {path}: {reason}")]
    TokenFile {
        /// Its path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// PostgreSQL cannot be reached (within the connect timeout).
    #[error("cannot connect to PostgreSQL at {at} (--database)")]
    Connect {
        /// The URL, without its password.
        at: String,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// The database failed.
    #[error("the database failed")]
    Database(#[source] sqlx::Error),
    /// A saga operation failed.
    #[error("the saga operation failed")]
    Saga(#[from] saga::SagaError),
}

impl AdminError {
    /// Whether it is the request's fault (exit status 2), not the system's.
    pub fn is_usage(&self) -> bool {
        matches!(self, AdminError::Usage(_))
    }

    /// The error of `e`, raised while working on `area` (whose main table
    /// is `table`): a missing schema, table, column or function is
    /// [`AdminError::MissingTables`].
    pub(crate) fn from_sql(area: &'static str, table: &'static str, e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            // undefined table, schema, column, function
            if matches!(
                db.code().as_deref(),
                Some("42P01" | "3F000" | "42703" | "42883")
            ) {
                return AdminError::MissingTables {
                    area,
                    table,
                    cause: db.message().to_owned(),
                };
            }
        }
        AdminError::Database(e)
    }
}

impl From<sqlx::Error> for AdminError {
    fn from(e: sqlx::Error) -> Self {
        AdminError::Database(e)
    }
}
