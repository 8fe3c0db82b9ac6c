//! The [`IdempotencyLayer`].

use http::request::Parts;
use idempotency_core::{Idempotency, Scope};
use std::fmt;
use std::sync::Arc;
use tower_layer::Layer;

use crate::service::IdempotencyService;

pub(crate) type ScopeFn = Arc<dyn Fn(&Parts) -> Option<Scope> + Send + Sync>;

/// Applies [`IdempotencyService`] to a service: covered requests (POST and
/// PATCH by default) with an `Idempotency-Key` run the handler once, and
/// retries get the stored response.
#[derive(Clone)]
pub struct IdempotencyLayer {
    pub(crate) engine: Idempotency,
    pub(crate) scope: Option<ScopeFn>,
}

impl IdempotencyLayer {
    /// A layer driving `engine` (a store and a config from `idempotency-core`).
    pub fn new(engine: Idempotency) -> Self {
        Self {
            engine,
            scope: None,
        }
    }

    /// Derives the scope of a request: the authenticated principal or tenant,
    /// typically from a value an auth layer put into the extensions. Records
    /// of different scopes never meet, so one client can neither read another
    /// client's responses nor block its keys. `None` falls back to the config's
    /// scope header, then to one global scope.
    ///
    /// ```
    /// # use idempotency_core::{Idempotency, MemoryStore, IdempotencyConfig, Scope};
    /// # use idempotency_tower::IdempotencyLayer;
    /// #[derive(Clone)]
    /// struct UserId(u64);
    ///
    /// let engine = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default());
    /// let layer = IdempotencyLayer::new(engine).with_scope(|parts| {
    ///     parts.extensions.get::<UserId>().map(|u| Scope::new(u.0.to_be_bytes()))
    /// });
    /// ```
    #[must_use]
    pub fn with_scope(
        mut self,
        scope: impl Fn(&Parts) -> Option<Scope> + Send + Sync + 'static,
    ) -> Self {
        self.scope = Some(Arc::new(scope));
        self
    }

    /// The engine.
    pub fn engine(&self) -> &Idempotency {
        &self.engine
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("engine", &self.engine)
            .field("scope", &self.scope.as_ref().map(|_| "fn"))
            .finish()
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
