//! What the engine hands the adapter for the handler: the body it read,
//! and in transactional mode the request's transaction.

use bytes::Bytes;

use crate::store::TxHandle;

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
