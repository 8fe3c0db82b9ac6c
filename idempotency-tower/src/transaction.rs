//! The axum extractor of transactional mode.

use axum_core::extract::FromRequestParts;
use axum_core::response::{IntoResponse, Response};
use http::request::Parts;
use idempotency_core::{TxHandle, TxUnavailable};

idempotency_core::transaction_extractor! {
    /// The transaction of a covered request in transactional mode, for its
    /// handler: write the effect through it (`query(..).execute(&mut *tx)`)
    /// and never commit it; the middleware commits it with the idempotency
    /// record after the handler returns, or rolls both back.
    ///
    /// `T` is the store's transaction type: `stores::PostgresTransaction` or
    /// `stores::SqliteTransaction` (features `postgres`, `sqlite`), or a
    /// third-party store's. It derefs to what `T` derefs to (a sqlx
    /// transaction: its connection).
    ///
    /// On a request without one (a route outside the middleware, a method it
    /// does not cover, an engine that is not transactional) the handler does
    /// not run: the client gets a 500 problem and the cause is logged.
    pub struct Transaction;
}

impl<S: Send + Sync, T: Send + 'static> FromRequestParts<S> for Transaction<T> {
    type Rejection = NoTransaction;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, NoTransaction> {
        Self::acquire(parts.extensions.get::<TxHandle>()).map_err(NoTransaction)
    }
}

/// Why a handler got no [`Transaction`]: a 500 problem for the client, the
/// cause logged.
#[derive(Debug)]
pub struct NoTransaction(pub TxUnavailable);

impl IntoResponse for NoTransaction {
    fn into_response(self) -> Response {
        let answer = idempotency_core::Answer::from(self.0.problem());
        crate::service::answer::<axum_core::body::Body>(&answer).map(axum_core::body::Body::new)
    }
}
