//! The [`IdempotencyLayer`].

use http::request::Parts;
use tower_layer::Layer;

use crate::service::IdempotencyService;

idempotency_core::scoped_middleware! {
    /// Applies [`IdempotencyService`] to a service: covered requests (POST and
    /// PATCH by default) with an `Idempotency-Key` run the handler once, and
    /// retries get the stored response.
    ///
    /// The scope of a request (the authenticated principal or tenant) comes
    /// from its head, typically from a value an auth layer put into the
    /// extensions:
    ///
    /// ```
    /// # use idempotency_tower::{Idempotency, IdempotencyLayer, MemoryStore, Scope};
    /// #[derive(Clone)]
    /// struct UserId(u64);
    ///
    /// let engine = Idempotency::new(MemoryStore::new(), Default::default());
    /// let layer = IdempotencyLayer::new(engine).with_scope(|parts| {
    ///     parts.extensions.get::<UserId>().map(|u| Scope::new(u.0.to_be_bytes()))
    /// });
    /// ```
    pub struct IdempotencyLayer for Parts;
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            layer: self.clone(),
        }
    }
}
