//! What the engine hands the adapter for the handler: the body it read,
//! and in transactional mode the request's transaction.

use bytes::Bytes;

/// The handle of a covered request's transaction (transactional mode),
/// which the adapter puts into the request's extensions for the handler's
/// extractor. Without the `postgres` and `sqlite` features there is none.
#[derive(Clone)]
#[non_exhaustive]
pub enum TxHandle {
    /// A PostgreSQL transaction.
    #[cfg(feature = "postgres")]
    Postgres(crate::store::transaction::TxSlot<sqlx::Postgres>),
    /// A SQLite transaction.
    #[cfg(feature = "sqlite")]
    Sqlite(crate::store::transaction::TxSlot<sqlx::Sqlite>),
}

impl std::fmt::Debug for TxHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TxHandle")
    }
}

/// The request as the handler gets it.
#[derive(Debug)]
pub struct Handoff {
    pub(super) body: Bytes,
    pub(super) transaction: Option<TxHandle>,
}

impl Handoff {
    /// The body that was read (and fingerprinted), and the transaction to
    /// put into the request's extensions, if any.
    pub fn into_parts(self) -> (Bytes, Option<TxHandle>) {
        (self.body, self.transaction)
    }
}
