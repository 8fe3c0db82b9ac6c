//! The [`IdempotencyMiddleware`].

use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use idempotency_core::{Idempotency, Scope, ScopedEngine};
use std::future::{ready, Ready};
use std::rc::Rc;

use crate::body::ResponseBody;
use crate::service::IdempotencyService;

/// Wraps an actix-web app, scope or resource with [`IdempotencyService`]:
/// covered requests (POST and PATCH by default) with an `Idempotency-Key`
/// run the handler once, and retries get the stored response.
///
/// `Clone + Send + Sync`, so it can be built once and moved into
/// `HttpServer::new`'s factory.
#[derive(Clone, Debug)]
pub struct IdempotencyMiddleware {
    pub(crate) engine: ScopedEngine<ServiceRequest>,
}

impl IdempotencyMiddleware {
    /// A middleware driving `engine` (a store and a config from `idempotency-core`).
    pub fn new(engine: Idempotency) -> Self {
        Self {
            engine: ScopedEngine::new(engine),
        }
    }

    /// Derives the scope of a request, typically from a value an auth
    /// middleware put into the extensions (see [`ScopedEngine::with_scope`]).
    ///
    /// ```
    /// # use actix_web::{dev::ServiceRequest, HttpMessage};
    /// # use idempotency_actix::{Idempotency, IdempotencyMiddleware, MemoryStore, Scope};
    /// #[derive(Clone)]
    /// struct UserId(u64);
    ///
    /// let engine = Idempotency::new(MemoryStore::new(), Default::default());
    /// let middleware = IdempotencyMiddleware::new(engine).with_scope(|req: &ServiceRequest| {
    ///     req.extensions().get::<UserId>().map(|u| Scope::new(u.0.to_be_bytes()))
    /// });
    /// ```
    #[must_use]
    pub fn with_scope(
        self,
        scope: impl Fn(&ServiceRequest) -> Option<Scope> + Send + Sync + 'static,
    ) -> Self {
        Self {
            engine: self.engine.with_scope(scope),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Idempotency {
        self.engine.engine()
    }
}

impl<S, B> Transform<S, ServiceRequest> for IdempotencyMiddleware
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<ResponseBody<B>>;
    type Error = actix_web::Error;
    type Transform = IdempotencyService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(IdempotencyService {
            inner: Rc::new(service),
            middleware: self.clone(),
        }))
    }
}
