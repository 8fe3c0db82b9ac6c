//! The decision what to do with a request, shared by every adapter.
//!
//! An adapter drives it in four steps:
//! 1. [`Idempotency::inspect`] the request head: pass through, refuse, or go on;
//! 2. read the body (up to [`Pending::body_limit`]) and [`Idempotency::decide`];
//! 3. on [`Decision::Execute`], run the handler inside [`Execution::run`]
//!    (which keeps the lease alive), even if the client goes away;
//! 4. [`Execution::complete`] with the captured response, or
//!    [`Execution::release`] when [`Execution::should_store`] says no.

use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use crate::config::{FailureMode, IdempotencyConfig};
use crate::fingerprint::{Fingerprint, FingerprintBuilder, RecordId, Scope};
use crate::key::{parse_key, KeyError, IDEMPOTENCY_KEY};
use crate::problem::{Problem, ProblemKind};
use crate::record::{ClaimOutcome, LeaseToken, StoredOutcome, StoredResponse, TokenOutcome};
use crate::store::{BoxFuture, ClaimRequest, Store, StoreError};

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
        self.headers
            .get_all(name)
            .iter()
            .map(http::HeaderValue::as_bytes)
    }
}

/// The idempotency engine: a config and a store. Cheap to clone.
#[derive(Clone)]
pub struct Idempotency {
    inner: Arc<Inner>,
}

struct Inner {
    config: IdempotencyConfig,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("store", &self.inner.store.backend())
            .field("config", &self.inner.config)
            .finish()
    }
}

/// The result of [`Idempotency::inspect`].
#[derive(Debug)]
pub enum Inspection {
    /// Not covered (method, or no key while keys are optional): run the handler untouched.
    PassThrough,
    /// Refuse without running the handler.
    Reject(Problem),
    /// Covered: read the body, then [`Idempotency::decide`].
    Pending(Pending),
}

/// A covered request whose head was accepted, waiting for its body.
#[derive(Debug)]
pub struct Pending {
    id: RecordId,
    fingerprint: FingerprintBuilder,
    body_limit: usize,
    span: tracing::Span,
}

impl Pending {
    /// The largest body to read; over it, answer [`Idempotency::body_too_large`].
    pub fn body_limit(&self) -> usize {
        self.body_limit
    }

    /// The request's span; adapters run the rest of the request inside it.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// The record this request addresses.
    pub fn record_id(&self) -> &RecordId {
        &self.id
    }
}

/// What to do with a covered request once its body is read.
#[derive(Debug)]
#[must_use]
pub enum Decision {
    /// This request holds the claim: run the handler, then complete or release.
    Execute(Execution),
    /// It completed before: send the stored response with `Idempotent-Replayed: true`.
    Replay(Replay),
    /// Refuse: 409, 410, 422 or 503.
    Reject(Problem),
    /// The store failed and the config is fail-open: run the handler unprotected.
    Unguarded,
}

impl Idempotency {
    /// An engine over `store`.
    pub fn new(store: impl Store, config: IdempotencyConfig) -> Self {
        Self::from_arc(Arc::new(store), config)
    }

    /// An engine over a shared, type-erased store.
    pub fn from_arc(store: Arc<dyn Store>, config: IdempotencyConfig) -> Self {
        Self {
            inner: Arc::new(Inner { config, store }),
        }
    }

    /// The config.
    pub fn config(&self) -> &IdempotencyConfig {
        &self.inner.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Step 1: looks at the head. `scope` is asked only for covered requests;
    /// `None` falls back to the configured scope header, then the global scope.
    pub fn inspect<H: RequestHead + ?Sized>(
        &self,
        head: &H,
        scope: impl FnOnce() -> Option<Scope>,
    ) -> Inspection {
        let config = &self.inner.config;
        let method = head.method();
        if !config.covers(method) {
            return Inspection::PassThrough;
        }
        let key = match parse_key(head.header_values(IDEMPOTENCY_KEY)) {
            Ok(Some(key)) => key,
            Ok(None) if !config.require_key => return Inspection::PassThrough,
            Ok(None) => return self.reject_key(&KeyError::Missing),
            Err(e) => return self.reject_key(&e),
        };
        let declared = head
            .header_values("content-length")
            .next()
            .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > config.max_request_body as u64) {
            tracing::debug!(
                decision = "rejected",
                reason = "body too large",
                "idempotency"
            );
            return Inspection::Reject(self.body_too_large());
        }
        let scope = scope()
            .or_else(|| {
                let name = config.scope_header.as_deref()?;
                head.header_values(name).next().map(Scope::new)
            })
            .unwrap_or(Scope::GLOBAL);
        let id = RecordId::new(&scope, &key);
        let content_type = head.header_values("content-type").next();
        let span = tracing::debug_span!("idempotency", method, path = head.path(), record = ?id);
        Inspection::Pending(Pending {
            id,
            fingerprint: FingerprintBuilder::new(method, head.path(), head.query(), content_type),
            body_limit: config.max_request_body,
            span,
        })
    }

    fn reject_key(&self, e: &KeyError) -> Inspection {
        tracing::debug!(decision = "rejected", reason = %e, "idempotency");
        Inspection::Reject(Problem::from_key_error(e))
    }

    /// The 413 for a body over [`Pending::body_limit`].
    pub fn body_too_large(&self) -> Problem {
        Problem::new(
            ProblemKind::BodyTooLarge,
            format!(
                "The request body is larger than the {} bytes this endpoint accepts.",
                self.inner.config.max_request_body
            ),
        )
    }

    /// The 400 for a body that could not be read.
    pub fn unreadable_body(&self, cause: &dyn std::fmt::Display) -> Problem {
        tracing::debug!(decision = "rejected", reason = %cause, "idempotency: unreadable body");
        Problem::new(
            ProblemKind::UnreadableBody,
            "The request body could not be read.",
        )
    }

    /// Step 2: claims the record and decides.
    pub async fn decide(&self, pending: Pending, body: &[u8]) -> Decision {
        let Pending {
            id,
            fingerprint,
            span,
            ..
        } = pending;
        let fingerprint = fingerprint.finish(body);
        let token = LeaseToken::random();
        let config = &self.inner.config;
        let request = ClaimRequest {
            id: &id,
            fingerprint: &fingerprint,
            token,
            lease: config.lease,
            ttl: config.ttl,
        };
        let mut outcome = self
            .timed(self.inner.store.claim(request))
            .instrument(span.clone())
            .await;
        if !config.wait_for_in_flight.is_zero() {
            outcome = self
                .wait_while_in_flight(request, outcome)
                .instrument(span.clone())
                .await;
        }
        let _enter = span.enter();
        match outcome {
            Ok(ClaimOutcome::Acquired(token)) => {
                tracing::debug!(decision = "executed", "idempotency");
                drop(_enter);
                Decision::Execute(Execution {
                    engine: self.clone(),
                    id,
                    token,
                    settled: false,
                    span,
                })
            }
            Ok(ClaimOutcome::InFlight {
                fingerprint: held,
                lease_remaining,
            }) => {
                if held != fingerprint {
                    tracing::debug!(decision = "mismatch", "idempotency");
                    Decision::Reject(key_reused())
                } else {
                    tracing::debug!(decision = "conflict", "idempotency");
                    Decision::Reject(
                        Problem::new(
                            ProblemKind::InFlight,
                            "A request with this Idempotency-Key is still being processed. Retry after the delay in Retry-After to get its response.",
                        )
                        .retry_after(lease_remaining.clamp(Duration::from_secs(1), config.lease)),
                    )
                }
            }
            Ok(ClaimOutcome::Completed {
                fingerprint: stored,
                outcome,
            }) => {
                if stored != fingerprint {
                    tracing::debug!(decision = "mismatch", "idempotency");
                    return Decision::Reject(key_reused());
                }
                match &*outcome {
                    StoredOutcome::Response(r) => {
                        tracing::debug!(decision = "replayed", status = r.status, "idempotency");
                        Decision::Replay(Replay(Arc::clone(&outcome)))
                    }
                    StoredOutcome::NotReplayable { status } => {
                        tracing::debug!(
                            decision = "rejected",
                            reason = "not replayable",
                            "idempotency"
                        );
                        Decision::Reject(Problem::new(
                            ProblemKind::NotReplayable,
                            format!(
                                "The request with this Idempotency-Key was processed and answered {status}, but its response was too large to store, so it cannot be replayed. The operation was not repeated."
                            ),
                        ))
                    }
                }
            }
            Err(e) => self.store_failed(&e),
        }
    }

    /// With `wait_for_in_flight` set: while the same request is in flight
    /// elsewhere, claims again (every 25 ms, up to the bound) until it
    /// completes (replay), is released (this request runs), or the bound
    /// passes (409).
    async fn wait_while_in_flight(
        &self,
        request: ClaimRequest<'_>,
        mut outcome: Result<ClaimOutcome, StoreError>,
    ) -> Result<ClaimOutcome, StoreError> {
        let deadline = tokio::time::Instant::now() + self.inner.config.wait_for_in_flight;
        loop {
            match &outcome {
                Ok(ClaimOutcome::InFlight { fingerprint, .. })
                    if fingerprint == request.fingerprint => {}
                _ => return outcome,
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return outcome;
            }
            tokio::time::sleep((deadline - now).min(Duration::from_millis(25))).await;
            outcome = self.timed(self.inner.store.claim(request)).await;
        }
    }

    fn store_failed(&self, e: &StoreError) -> Decision {
        match self.inner.config.failure_mode {
            FailureMode::Closed => {
                tracing::error!(error = e as &dyn std::error::Error, cause = ?std::error::Error::source(e), decision = "rejected", "idempotency store failed; refusing the request (fail-closed)");
                Decision::Reject(
                    Problem::new(
                        ProblemKind::StoreUnavailable,
                        "The request was not processed because its idempotency could not be guaranteed right now. Retry with the same Idempotency-Key.",
                    )
                    .retry_after(Duration::from_secs(1)),
                )
            }
            FailureMode::Open => {
                tracing::error!(error = e as &dyn std::error::Error, cause = ?std::error::Error::source(e), decision = "unguarded", "idempotency store failed; running the handler unprotected (fail-open)");
                Decision::Unguarded
            }
        }
    }

    async fn timed<T>(
        &self,
        mut call: BoxFuture<'_, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        // A store that answers at once (memory) needs no timer: poll once
        // before arming one.
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(call.as_mut().poll(cx))).await;
        if let std::task::Poll::Ready(r) = first {
            return r;
        }
        let timeout = self.inner.config.store_timeout;
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout {
                backend: self.inner.store.backend(),
                timeout,
            }),
        }
    }
}

fn key_reused() -> Problem {
    Problem::new(
        ProblemKind::KeyReused,
        "This Idempotency-Key was already used for a request with a different method, path, query, content type or body. Use a new key for a new operation.",
    )
}

/// A stored response to replay. It shares the store's copy (no clone of
/// headers or body) and derefs to [`StoredResponse`].
#[derive(Debug, Clone)]
pub struct Replay(Arc<StoredOutcome>);

impl std::ops::Deref for Replay {
    type Target = StoredResponse;

    fn deref(&self) -> &StoredResponse {
        static NONE: StoredResponse = StoredResponse {
            status: 500,
            headers: Vec::new(),
            body: Bytes::new(),
        };
        match &*self.0 {
            StoredOutcome::Response(r) => r,
            // Never built from another variant (see `decide`).
            StoredOutcome::NotReplayable { .. } => &NONE,
        }
    }
}

/// A claim held by this request. Run the handler inside [`run`](Self::run),
/// then [`complete`](Self::complete) or [`release`](Self::release). Dropped
/// without either (a panic, a cancelled future), it releases the claim in the
/// background so a retry can run.
#[derive(Debug)]
#[must_use = "a claim must be completed or released"]
pub struct Execution {
    engine: Idempotency,
    id: RecordId,
    token: LeaseToken,
    settled: bool,
    span: tracing::Span,
}

impl Execution {
    /// The request's span.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Drives `handler` while extending the lease every half lease, so a
    /// handler slower than the lease keeps its claim.
    pub async fn run<F: Future>(&self, handler: F) -> F::Output {
        let lease = self.engine.inner.config.lease;
        let heartbeat = async {
            loop {
                tokio::time::sleep(lease / 2).await;
                let extend = self.engine.inner.store.extend(&self.id, self.token, lease);
                match self.engine.timed(extend).await {
                    Ok(TokenOutcome::Applied) => tracing::trace!("idempotency lease extended"),
                    Ok(TokenOutcome::Fenced) => {
                        tracing::warn!("idempotency claim was taken over while the handler ran; its response will not be stored");
                        return;
                    }
                    Err(e) => {
                        tracing::error!(error = &e as &dyn std::error::Error, cause = ?std::error::Error::source(&e), "idempotency lease could not be extended")
                    }
                }
            }
        };
        let handler = std::pin::pin!(handler);
        let heartbeat = std::pin::pin!(heartbeat.instrument(self.span.clone()));
        match futures_util::future::select(handler, heartbeat).await {
            futures_util::future::Either::Left((out, _)) => out,
            futures_util::future::Either::Right(((), handler)) => handler.await,
        }
    }

    /// Whether a response with this status is stored; otherwise release.
    pub fn should_store(&self, status: u16) -> bool {
        self.engine.inner.config.stores_status(status)
    }

    /// The largest body stored; a larger one goes to [`complete_not_replayable`](Self::complete_not_replayable).
    pub fn max_stored_response(&self) -> usize {
        self.engine.inner.config.max_stored_response
    }

    /// Builds the stored form of a response: drops the headers never replayed,
    /// keeps the others in order (repeated ones too).
    pub fn capture<'a>(
        &self,
        status: u16,
        headers: impl Iterator<Item = (&'a str, &'a [u8])>,
        body: Bytes,
    ) -> StoredResponse {
        let config = &self.engine.inner.config;
        StoredResponse {
            status,
            headers: headers
                .filter(|(name, _)| config.replays_header(name))
                .map(|(name, value)| (name.to_owned(), Bytes::copy_from_slice(value)))
                .collect(),
            body,
        }
    }

    /// Stores the response for replay.
    pub async fn complete(self, response: StoredResponse) {
        self.finish(StoredOutcome::Response(response)).await;
    }

    /// Marks the request done with a body too large to store: retries get a
    /// 410 problem and never re-run the handler.
    pub async fn complete_not_replayable(self, status: u16) {
        self.finish(StoredOutcome::NotReplayable { status }).await;
    }

    async fn finish(mut self, outcome: StoredOutcome) {
        self.settled = true;
        let span = self.span.clone();
        let engine = &self.engine;
        let config = &engine.inner.config;
        let outcome = Arc::new(outcome);
        let mut backoff = config.complete_backoff;
        async {
            for attempt in 1..=config.complete_attempts {
                let call = engine.inner.store.complete(&self.id, self.token, Arc::clone(&outcome), config.ttl);
                match engine.timed(call).await {
                    Ok(TokenOutcome::Applied) => return,
                    Ok(TokenOutcome::Fenced) => {
                        tracing::warn!("idempotency claim was taken over before the response was stored; the response was sent but not stored");
                        return;
                    }
                    Err(e) if attempt == config.complete_attempts => {
                        tracing::error!(
                            error = &e as &dyn std::error::Error,
                            cause = ?std::error::Error::source(&e),
                            attempts = attempt,
                            "idempotency store failed to record the response; a retry gets 409 until the lease passes, then runs the handler again"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = &e as &dyn std::error::Error, attempt, "idempotency complete failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = backoff.saturating_mul(2);
                    }
                }
            }
        }
        .instrument(span)
        .await;
    }

    /// Gives the claim up so that a retry runs the handler again (5xx and
    /// transient 4xx).
    pub async fn release(mut self) {
        self.settled = true;
        let _ = release(&self.engine, &self.id, self.token)
            .instrument(self.span.clone())
            .await;
    }
}

async fn release(
    engine: &Idempotency,
    id: &RecordId,
    token: LeaseToken,
) -> Result<TokenOutcome, StoreError> {
    let r = engine.timed(engine.inner.store.release(id, token)).await;
    match &r {
        Ok(TokenOutcome::Applied) => tracing::debug!("idempotency claim released"),
        Ok(TokenOutcome::Fenced) => {
            tracing::warn!("idempotency claim was taken over before it was released")
        }
        Err(e) => {
            tracing::error!(error = e as &dyn std::error::Error, cause = ?std::error::Error::source(e), "idempotency claim could not be released; a retry gets 409 until the lease passes")
        }
    }
    r
}

impl Drop for Execution {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let (engine, id, token) = (self.engine.clone(), self.id, self.token);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(
                    async move {
                        let _ = release(&engine, &id, token).await;
                    }
                    .instrument(self.span.clone()),
                );
            }
            Err(_) => tracing::warn!(
                "idempotency claim dropped outside a runtime; it is freed when its lease passes"
            ),
        }
    }
}

/// Drives a future in place; if dropped before it finishes (the client went
/// away and the framework dropped the request), hands the rest of it to
/// `spawn`, so it always runs to completion. Adapters wrap the handler's run
/// in it: cheaper than spawning every request, since a task exists only on
/// disconnect. `spawn` is `tokio::spawn` for tower, the framework's local
/// spawn for actix (whose futures are not `Send`).
pub struct DetachOnDrop<F: Future + 'static> {
    future: Option<Pin<Box<F>>>,
    spawn: fn(Pin<Box<F>>),
    span: tracing::Span,
}

impl<F: Future + 'static> DetachOnDrop<F> {
    /// Wraps `future`; `spawn` runs the rest of it if this is dropped first.
    pub fn new(future: F, spawn: fn(Pin<Box<F>>)) -> Self {
        Self {
            future: Some(Box::pin(future)),
            spawn,
            span: tracing::Span::current(),
        }
    }
}

impl<F: Future + 'static> Future for DetachOnDrop<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = self.get_mut();
        let Some(future) = this.future.as_mut() else {
            return std::task::Poll::Pending;
        };
        let out = std::task::ready!(future.as_mut().poll(cx));
        this.future = None;
        std::task::Poll::Ready(out)
    }
}

impl<F: Future + 'static> Drop for DetachOnDrop<F> {
    fn drop(&mut self) {
        let Some(future) = self.future.take() else {
            return;
        };
        if std::thread::panicking() {
            // The handler panicked inside poll; `Execution`'s own drop
            // releases the claim.
            return;
        }
        let _entered = self.span.enter();
        tracing::debug!("idempotency: client went away; the handler finishes in the background");
        (self.spawn)(future);
    }
}

impl<F: Future + 'static> std::fmt::Debug for DetachOnDrop<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DetachOnDrop")
            .field("finished", &self.future.is_none())
            .finish()
    }
}

/// The fingerprint a request would have (for tests and custom adapters).
pub fn fingerprint_of<H: RequestHead + ?Sized>(head: &H, body: &[u8]) -> Fingerprint {
    FingerprintBuilder::new(
        head.method(),
        head.path(),
        head.query(),
        head.header_values("content-type").next(),
    )
    .finish(body)
}
