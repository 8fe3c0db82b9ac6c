//! Step 1: the request head. Is the request covered? Its key, its scope,
//! and from them the record it addresses; the first half of its fingerprint.

use crate::config::IdempotencyConfig;
use crate::fingerprint::{FingerprintBuilder, RecordId, Scope};
use crate::key::{parse_key_ref, KeyError, IDEMPOTENCY_KEY};
use crate::problem::{Problem, ProblemKind};

use super::Idempotency;

/// What the engine needs to know of a request head, whatever the framework.
pub trait RequestHead {
    /// The method, uppercase as on the wire.
    fn method(&self) -> &str;
    /// The path, without the query.
    fn path(&self) -> &str;
    /// The query string, without `?`, if the URI has one.
    fn query(&self) -> Option<&str>;
    /// Every value of the header `name` (given in lowercase), in order.
    fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a;
}

/// Built at compile time: `from_static` checks its input when run.
const IDEMPOTENCY_KEY_NAME: http::HeaderName = http::HeaderName::from_static(IDEMPOTENCY_KEY);

impl RequestHead for http::request::Parts {
    fn method(&self) -> &str {
        self.method.as_str()
    }
    fn path(&self) -> &str {
        self.uri.path()
    }
    fn query(&self) -> Option<&str> {
        self.uri.query()
    }
    fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        // The names the engine asks for, without parsing them again.
        let values = match name {
            IDEMPOTENCY_KEY => self.headers.get_all(IDEMPOTENCY_KEY_NAME),
            "content-type" => self.headers.get_all(http::header::CONTENT_TYPE),
            "content-length" => self.headers.get_all(http::header::CONTENT_LENGTH),
            _ => self.headers.get_all(name),
        };
        values.iter().map(http::HeaderValue::as_bytes)
    }
}

/// The result of [`Idempotency::inspect`].
#[derive(Debug)]
pub enum Inspection {
    /// Not covered (method, or no key while keys are optional): run the handler untouched.
    PassThrough,
    /// Refuse without running the handler.
    Reject(Problem),
    /// Covered: hand it to [`Idempotency::respond`] with its body.
    Pending(Pending),
}

/// A covered request whose head was accepted, waiting for its body.
#[derive(Debug)]
pub struct Pending {
    pub(super) id: RecordId,
    pub(super) fingerprint: FingerprintBuilder,
    pub(super) span: tracing::Span,
    /// Transactional mode: `METHOD /path`, for the log line of a rollback
    /// (the span, a `debug` one, is often disabled).
    pub(super) route: Option<Box<str>>,
}

impl Pending {
    /// The request's span; adapters run the rest of the request inside it.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }
}

impl Idempotency {
    /// Looks at the head. `scope` is asked only for covered requests; `None`
    /// falls back to the configured scope header, then the global scope.
    pub fn inspect<H: RequestHead + ?Sized>(
        &self,
        head: &H,
        scope: impl FnOnce() -> Option<Scope>,
    ) -> Inspection {
        let config = self.config();
        let method = head.method();
        if !config.covers(method) {
            return Inspection::PassThrough;
        }
        let key = match parse_key_ref(head.header_values(IDEMPOTENCY_KEY)) {
            Ok(Some(key)) => key,
            Ok(None) if !config.require_key => return Inspection::PassThrough,
            Ok(None) => return reject_key(&KeyError::Missing),
            Err(e) => return reject_key(&e),
        };
        if declared_length(head).is_some_and(|n| n > config.max_request_body as u64) {
            return Inspection::Reject(self.refuse_body_too_large());
        }
        let scope = match scope() {
            Some(scope) => scope,
            None => match scope_from_header(config, head) {
                Ok(scope) => scope.unwrap_or(Scope::GLOBAL),
                Err(name) => return reject_ambiguous_scope(name),
            },
        };
        let id = RecordId::from_parts(scope.as_bytes(), key.as_bytes());
        let content_type = head.header_values("content-type").next();
        let span = tracing::debug_span!("idempotency", method, path = head.path(), record = ?id);
        let route = self
            .is_transactional()
            .then(|| format!("{method} {}", head.path()).into_boxed_str());
        Inspection::Pending(Pending {
            id,
            fingerprint: FingerprintBuilder::new(method, head.path(), head.query(), content_type),
            span,
            route,
        })
    }
}

fn reject_key(e: &KeyError) -> Inspection {
    tracing::debug!(decision = "rejected", reason = %e, "idempotency");
    crate::metrics::request(crate::metrics::Outcome::Rejected);
    Inspection::Reject(Problem::from_key_error(e))
}

/// The 400 for a scope header given more than once: which value names the
/// principal is a guess, and a wrong guess reads or blocks another's records.
fn reject_ambiguous_scope(header: &str) -> Inspection {
    tracing::debug!(
        decision = "rejected",
        reason = "scope header repeated",
        header,
        "idempotency"
    );
    crate::metrics::request(crate::metrics::Outcome::Rejected);
    Inspection::Reject(Problem::new(
        ProblemKind::AmbiguousScope,
        format!(
            "The request carries the {header} header more than once, so it is not clear whom it belongs to. Send it once."
        ),
    ))
}

fn declared_length<H: RequestHead + ?Sized>(head: &H) -> Option<u64> {
    let value = head.header_values("content-length").next()?;
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// The scope from the configured scope header: `Ok(None)` without one,
/// `Err(name)` when the header is there more than once.
fn scope_from_header<'c, H: RequestHead + ?Sized>(
    config: &'c IdempotencyConfig,
    head: &H,
) -> Result<Option<Scope>, &'c str> {
    let Some(name) = config.scope_header.as_deref() else {
        return Ok(None);
    };
    let mut values = head.header_values(name);
    let first = values.next();
    if values.next().is_some() {
        return Err(name);
    }
    Ok(first.map(Scope::new))
}

/// How an adapter derives a request's scope from its framework's request.
type ScopeFn<R> = dyn Fn(&R) -> Option<Scope> + Send + Sync;

/// An engine, and how to derive the scope of a request of type `R` (the
/// authenticated principal or tenant): what an adapter's layer or
/// middleware holds. Cheap to clone.
pub struct ScopedEngine<R: ?Sized> {
    engine: Idempotency,
    scope: Option<std::sync::Arc<ScopeFn<R>>>,
}

impl<R: ?Sized> Clone for ScopedEngine<R> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            scope: self.scope.clone(),
        }
    }
}

impl<R: ?Sized> ScopedEngine<R> {
    /// `engine`, with the scope from the config's scope header (or the
    /// global scope).
    pub fn new(engine: Idempotency) -> Self {
        Self {
            engine,
            scope: None,
        }
    }

    /// Derives the scope from the request. Records of different scopes
    /// never meet, so one client can neither read another client's
    /// responses nor block its keys. `None` falls back to the config's
    /// scope header, then to one global scope.
    pub fn with_scope(
        mut self,
        scope: impl Fn(&R) -> Option<Scope> + Send + Sync + 'static,
    ) -> Self {
        self.scope = Some(std::sync::Arc::new(scope));
        self
    }

    /// The engine.
    pub fn engine(&self) -> &Idempotency {
        &self.engine
    }

    /// [`Idempotency::inspect`] with this scope.
    pub fn inspect<H: RequestHead + ?Sized>(&self, head: &H, request: &R) -> Inspection {
        self.engine
            .inspect(head, || self.scope.as_ref().and_then(|f| f(request)))
    }
}

impl<R: ?Sized> std::fmt::Debug for ScopedEngine<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopedEngine")
            .field("engine", &self.engine)
            .field("scope", &self.scope.as_ref().map(|_| "fn"))
            .finish()
    }
}

/// Defines an adapter's layer or middleware type: a newtype over
/// [`ScopedEngine`] with the builder every adapter offers (`new`,
/// `with_scope`, `engine`), so the adapters do not repeat it.
#[doc(hidden)]
#[macro_export]
macro_rules! scoped_middleware {
    ($(#[$attr:meta])* pub struct $name:ident for $request:ty;) => {
        $(#[$attr])*
        #[derive(Clone, Debug)]
        pub struct $name {
            pub(crate) engine: $crate::ScopedEngine<$request>,
        }

        impl $name {
            /// Drives `engine` (a store and a config from `idempotency-core`).
            pub fn new(engine: $crate::Idempotency) -> Self {
                Self { engine: $crate::ScopedEngine::new(engine) }
            }

            /// Derives the scope of a request, typically from a value an
            /// auth layer put into its extensions: see
            /// [`ScopedEngine::with_scope`]($crate::ScopedEngine::with_scope).
            #[must_use]
            pub fn with_scope(
                self,
                scope: impl Fn(&$request) -> Option<$crate::Scope> + Send + Sync + 'static,
            ) -> Self {
                Self { engine: self.engine.with_scope(scope) }
            }

            /// The engine.
            pub fn engine(&self) -> &$crate::Idempotency {
                self.engine.engine()
            }
        }
    };
}
