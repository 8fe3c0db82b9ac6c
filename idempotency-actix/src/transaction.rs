//! The actix-web extractor of transactional mode.

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use idempotency_core::{TxHandle, TxUnavailable};
use std::future::{ready, Ready};

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

impl<T: Send + 'static> FromRequest for Transaction<T> {
    type Error = NoTransaction;
    type Future = Ready<Result<Self, NoTransaction>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(Self::acquire(req.extensions().get::<TxHandle>()).map_err(NoTransaction))
    }
}

/// Why a handler got no [`Transaction`]: a 500 problem for the client, the
/// cause logged.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct NoTransaction(pub TxUnavailable);

impl ResponseError for NoTransaction {
    fn status_code(&self) -> actix_web::http::StatusCode {
        actix_web::http::StatusCode::INTERNAL_SERVER_ERROR
    }

    fn error_response(&self) -> HttpResponse {
        let answer = idempotency_core::Answer::from(self.0.problem());
        crate::service::response::<actix_web::body::BoxBody>(&answer).map_into_boxed_body()
    }
}
