//! The [`IdempotencyMiddleware`].

use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use idempotency_core::{Idempotency, Scope};
use std::fmt;
use std::future::{ready, Ready};
use std::rc::Rc;
use std::sync::Arc;

use crate::body::ResponseBody;
use crate::service::IdempotencyService;

pub(crate) type ScopeFn = Arc<dyn Fn(&ServiceRequest) -> Option<Scope> + Send + Sync>;

/// Wraps an actix-web app, scope or resource with [`IdempotencyService`]:
/// covered requests (POST and PATCH by default) with an `Idempotency-Key`
/// run the handler once, and retries get the stored response.
///
/// `Clone + Send + Sync`, so it can be built once and moved into
/// `HttpServer::new`'s factory.
#[derive(Clone)]
pub struct IdempotencyMiddleware {
    pub(crate) engine: Idempotency,
    pub(crate) scope: Option<ScopeFn>,
}

impl IdempotencyMiddleware {
    /// A middleware driving `engine` (a store and a config from `idempotency-core`).
    pub fn new(engine: Idempotency) -> Self {
        Self {
            engine,
            scope: None,
        }
    }

    /// Derives the scope of a request: the authenticated principal or tenant,
    /// typically from a value an auth middleware put into the extensions.
    /// Records of different scopes never meet, so one client can neither read
    /// another client's responses nor block its keys. `None` falls back to
    /// the config's scope header, then to one global scope.
    ///
    /// ```
    /// # use actix_web::{dev::ServiceRequest, HttpMessage};
    /// # use idempotency_core::{Idempotency, MemoryStore, IdempotencyConfig, Scope};
    /// # use idempotency_actix::IdempotencyMiddleware;
    /// #[derive(Clone)]
    /// struct UserId(u64);
    ///
    /// let engine = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default());
    /// let middleware = IdempotencyMiddleware::new(engine).with_scope(|req: &ServiceRequest| {
    ///     req.extensions().get::<UserId>().map(|u| Scope::new(u.0.to_be_bytes()))
    /// });
    /// ```
    #[must_use]
    pub fn with_scope(
        mut self,
        scope: impl Fn(&ServiceRequest) -> Option<Scope> + Send + Sync + 'static,
    ) -> Self {
        self.scope = Some(Arc::new(scope));
        self
    }

    /// The engine.
    pub fn engine(&self) -> &Idempotency {
        &self.engine
    }
}

impl fmt::Debug for IdempotencyMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyMiddleware")
            .field("engine", &self.engine)
            .field("scope", &self.scope.as_ref().map(|_| "fn"))
            .finish()
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
