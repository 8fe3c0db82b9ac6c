//! The [`IdempotencyMiddleware`].

use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use std::future::{ready, Ready};
use std::rc::Rc;

use crate::body::ResponseBody;
use crate::service::IdempotencyService;

idempotency_core::scoped_middleware! {
    /// Wraps an actix-web app, scope or resource with [`IdempotencyService`]:
    /// covered requests (POST and PATCH by default) with an `Idempotency-Key`
    /// run the handler once, and retries get the stored response.
    ///
    /// `Clone + Send + Sync`, so it can be built once and moved into
    /// `HttpServer::new`'s factory. The scope of a request (the
    /// authenticated principal or tenant) typically comes from a value an
    /// auth middleware put into the extensions:
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
    pub struct IdempotencyMiddleware for ServiceRequest;
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
