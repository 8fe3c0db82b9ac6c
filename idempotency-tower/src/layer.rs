//! The [`IdempotencyLayer`].

use http::request::Parts;
use idempotency_core::{Idempotency, Scope, ScopedEngine};
use tower_layer::Layer;

use crate::service::IdempotencyService;

/// Applies [`IdempotencyService`] to a service: covered requests (POST and
/// PATCH by default) with an `Idempotency-Key` run the handler once, and
/// retries get the stored response.
#[derive(Clone, Debug)]
pub struct IdempotencyLayer {
    pub(crate) engine: ScopedEngine<Parts>,
}

impl IdempotencyLayer {
    /// A layer driving `engine` (a store and a config from `idempotency-core`).
    pub fn new(engine: Idempotency) -> Self {
        Self {
            engine: ScopedEngine::new(engine),
        }
    }

    /// Derives the scope of a request from its head, typically from a value
    /// an auth layer put into the extensions (see [`ScopedEngine::with_scope`]).
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
    #[must_use]
    pub fn with_scope(
        self,
        scope: impl Fn(&Parts) -> Option<Scope> + Send + Sync + 'static,
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

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            layer: self.clone(),
        }
    }
}
