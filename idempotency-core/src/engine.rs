//! The decision what to do with a request, shared by every adapter.
//!
//! An adapter drives it in four steps:
//! 1. [`Idempotency::inspect`] the request head: pass through, refuse, or go on;
//! 2. read the body (up to [`Pending::body_limit`]) and [`Idempotency::decide`];
//! 3. on [`Decision::Execute`], run the handler inside [`Execution::run`]
//!    (which keeps the lease alive), even if the client goes away;
//! 4. [`Execution::complete`] with the captured response, or
//!    [`Execution::release`] when [`Execution::should_store`] says no.

use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tracing::instrument::Instrumented;
use tracing::Instrument;

use crate::config::{FailureMode, IdempotencyConfig};
use crate::fingerprint::{Fingerprint, FingerprintBuilder, RecordId, Scope};
use crate::key::{parse_key_ref, KeyError, IDEMPOTENCY_KEY};
use crate::problem::{Problem, ProblemKind};
use crate::record::{
    ClaimOutcome, HeaderText, LeaseToken, StoredOutcome, StoredResponse, TokenOutcome,
};
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

/// A response body up to this size is copied into its record's one buffer
/// (with the headers); a larger one is kept as the handler's `Bytes`.
const INLINE_BODY: usize = 4096;

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
        let key = match parse_key_ref(head.header_values(IDEMPOTENCY_KEY)) {
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
        let id = RecordId::from_parts(scope.as_bytes(), key.as_bytes());
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

    /// Step 2: claims the record and decides. The body is hashed before the
    /// future is returned (it is not borrowed across the claim). Run the
    /// future inside [`Pending::span`], as the adapters do.
    pub fn decide(&self, pending: Pending, body: &[u8]) -> impl Future<Output = Decision> + '_ {
        let Pending {
            id,
            fingerprint,
            span,
            ..
        } = pending;
        let fingerprint = fingerprint.finish(body);
        let token = LeaseToken::random();
        async move {
            let config = &self.inner.config;
            let request = ClaimRequest {
                id: &id,
                fingerprint: &fingerprint,
                token,
                lease: config.lease,
                ttl: config.ttl,
            };
            let store = &self.inner.store;
            let mut outcome = match store.claim_ready(request) {
                Some(ready) => ready,
                None => self.timed(store.claim(request)).await,
            };
            if !config.wait_for_in_flight.is_zero() {
                // Rarely configured: its timers live in a box of their own.
                outcome = Box::pin(self.wait_while_in_flight(request, outcome)).await;
            }
            self.decided(outcome, id, fingerprint, span)
        }
    }

    fn decided(
        &self,
        outcome: Result<ClaimOutcome, StoreError>,
        id: RecordId,
        fingerprint: Fingerprint,
        span: tracing::Span,
    ) -> Decision {
        let config = &self.inner.config;
        match outcome {
            Ok(ClaimOutcome::Acquired(token)) => {
                tracing::debug!(decision = "executed", "idempotency");
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
        let first = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
        if let Poll::Ready(r) = first {
            return r;
        }
        // A store that bounds its own calls within our timeout needs no
        // second timer.
        let store = &self.inner.store;
        if matches!(store.call_timeout(), Some(t) if t <= self.inner.config.store_timeout) {
            return call.await;
        }
        Box::pin(self.timeout(call)).await
    }

    async fn timeout<T>(
        &self,
        call: BoxFuture<'_, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
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
    pub fn run<'a, F: Future + 'a>(&'a self, handler: F) -> impl Future<Output = F::Output> + 'a {
        Run {
            handler,
            execution: self,
            heartbeat: None,
            beating: true,
        }
    }

    /// Extends the lease every half lease until the claim is fenced.
    fn heartbeat(&self) -> impl Future<Output = ()> + Send + '_ {
        let lease = self.engine.inner.config.lease;
        async move {
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
        }
        .instrument(self.span.clone())
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
        // The kept names and values, and a small body, are copied into one
        // buffer whose parts the record then shares: one allocation to make
        // (or a few, past the first guess of its size) and to free when the
        // record goes, however many headers there are.
        let inline = !body.is_empty() && body.len() <= INLINE_BODY;
        let mut buf = BytesMut::with_capacity(192 + if inline { body.len() } else { 0 });
        let headers = headers
            .filter(|(name, _)| config.replays_header(name))
            .map(|(name, value)| {
                buf.extend_from_slice(name.as_bytes());
                let name = HeaderText::from_str_bytes(buf.split().freeze());
                buf.extend_from_slice(value);
                (name, buf.split().freeze())
            })
            .collect();
        let body = if inline {
            buf.extend_from_slice(&body);
            buf.freeze()
        } else {
            body
        };
        StoredResponse {
            status,
            headers,
            body,
        }
    }

    /// Stores the response for replay.
    pub fn complete(self, response: StoredResponse) -> impl Future<Output = ()> {
        self.finish(StoredOutcome::Response(response))
    }

    /// Marks the request done with a body too large to store: retries get a
    /// 410 problem and never re-run the handler.
    pub fn complete_not_replayable(self, status: u16) -> impl Future<Output = ()> {
        self.finish(StoredOutcome::NotReplayable { status })
    }

    async fn finish(mut self, outcome: StoredOutcome) {
        self.settled = true;
        let engine = &self.engine;
        let config = &engine.inner.config;
        let outcome = Arc::new(outcome);
        // The first attempt inline; retries (a failing store) in a future of
        // their own, so their timer does not weigh on every request.
        let store = &engine.inner.store;
        let first = match store.complete_ready(&self.id, self.token, &outcome, config.ttl) {
            Some(ready) => ready,
            None => {
                let call = store.complete(&self.id, self.token, Arc::clone(&outcome), config.ttl);
                engine.timed(call).await
            }
        };
        if let Some(e) = self.completed(first, 1) {
            Box::pin(self.complete_retries(outcome, e))
                .instrument(self.span.clone())
                .await;
        }
    }

    /// Logs what a `complete` did; the error when it should be retried.
    fn completed(
        &self,
        result: Result<TokenOutcome, StoreError>,
        attempt: u32,
    ) -> Option<StoreError> {
        let attempts = self.engine.inner.config.complete_attempts;
        match result {
            Ok(TokenOutcome::Applied) => None,
            Ok(TokenOutcome::Fenced) => {
                let _enter = self.span.enter();
                tracing::warn!("idempotency claim was taken over before the response was stored; the response was sent but not stored");
                None
            }
            Err(e) if attempt >= attempts => {
                let _enter = self.span.enter();
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    cause = ?std::error::Error::source(&e),
                    attempts = attempt,
                    "idempotency store failed to record the response; a retry gets 409 until the lease passes, then runs the handler again"
                );
                None
            }
            Err(e) => Some(e),
        }
    }

    async fn complete_retries(&self, outcome: Arc<StoredOutcome>, mut error: StoreError) {
        let engine = &self.engine;
        let config = &engine.inner.config;
        let mut backoff = config.complete_backoff;
        for attempt in 2..=config.complete_attempts {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                attempt = attempt - 1,
                "idempotency complete failed; retrying"
            );
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
            let call =
                engine
                    .inner
                    .store
                    .complete(&self.id, self.token, Arc::clone(&outcome), config.ttl);
            match self.completed(engine.timed(call).await, attempt) {
                Some(e) => error = e,
                None => return,
            }
        }
    }

    /// Gives the claim up so that a retry runs the handler again (5xx and
    /// transient 4xx).
    pub async fn release(mut self) {
        self.settled = true;
        let _ = release(&self.engine, &self.id, self.token).await;
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Execution::run`]: the handler, and a heartbeat built
    /// only once the handler waits (one that answers on its first poll needs
    /// no timer and no store call).
    struct Run<'a, F> {
        #[pin]
        handler: F,
        execution: &'a Execution,
        heartbeat: Option<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>,
        beating: bool,
    }
}

impl<F: Future> Future for Run<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.handler.poll(cx) {
            return Poll::Ready(out);
        }
        if *this.beating {
            let execution = *this.execution;
            let beat = this
                .heartbeat
                .get_or_insert_with(|| Box::pin(execution.heartbeat()));
            if beat.as_mut().poll(cx).is_ready() {
                // Fenced: the handler finishes without it.
                *this.beating = false;
                *this.heartbeat = None;
            }
        }
        Poll::Pending
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

/// Drives a request's future, boxed once, inside the request's span; if
/// dropped after its first poll and before it finishes (the client went away
/// and the framework dropped the request), hands the rest of it to `spawn`,
/// so it runs to completion: a claim already sent is settled, and a handler
/// that started finishes and its response is stored for the retry. Cheaper
/// than spawning every request: a task exists only on disconnect. `spawn` is
/// `tokio::spawn` for tower, the framework's local spawn for actix (whose
/// futures are not `Send`).
///
/// A future whose poll panicked (a handler that panics) is never handed
/// off: it cannot be polled again, and the panic already dropped its claim,
/// which releases it. That holds whether the framework drops it while the
/// panic unwinds or later, after catching the panic (hyper's and actix's
/// connection tasks, a catch-panic layer).
pub struct DetachOnDrop<F: Future + ?Sized> {
    future: Option<Pin<Box<F>>>,
    state: PollState,
    spawn: fn(Instrumented<Pin<Box<F>>>),
    span: tracing::Span,
}

/// Where a [`DetachOnDrop`]'s future is, as far as dropping it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PollState {
    /// Never polled: nothing was sent to the store yet.
    Unpolled,
    /// Inside a poll, or a poll that never returned: it panicked.
    Polling,
    /// Polled, and waiting: the rest can run elsewhere.
    Waiting,
}

impl<F: Future + ?Sized> DetachOnDrop<F> {
    /// Wraps `future`, polled inside `span` (so is the rest of it, if
    /// detached).
    pub fn new(
        future: Pin<Box<F>>,
        span: tracing::Span,
        spawn: fn(Instrumented<Pin<Box<F>>>),
    ) -> Self {
        Self {
            future: Some(future),
            state: PollState::Unpolled,
            spawn,
            span,
        }
    }
}

impl<F: Future + ?Sized> Future for DetachOnDrop<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let Some(future) = this.future.as_mut() else {
            return Poll::Pending;
        };
        this.state = PollState::Polling;
        let poll = {
            let _entered = this.span.enter();
            future.as_mut().poll(cx)
        };
        // Not reached if the poll panicked: the state stays `Polling`.
        this.state = PollState::Waiting;
        if poll.is_ready() {
            this.future = None;
        }
        poll
    }
}

impl<F: Future + ?Sized> Drop for DetachOnDrop<F> {
    fn drop(&mut self) {
        let Some(future) = self.future.take() else {
            return;
        };
        let _entered = self.span.enter();
        match self.state {
            // Never started: nothing was sent to the store yet.
            PollState::Unpolled => return drop(future),
            // Its poll panicked: the future is spent, and the panic dropped
            // its `Execution`, which releases the claim.
            PollState::Polling => {
                tracing::debug!(
                    "idempotency: the request's future panicked; its claim is released"
                );
                return drop(future);
            }
            PollState::Waiting => {}
        }
        if std::thread::panicking() {
            // Something else panicked while this request waited: do not
            // spawn while unwinding. Dropping the future drops its
            // `Execution`, which releases the claim.
            return drop(future);
        }
        tracing::debug!("idempotency: client went away; the handler finishes in the background");
        (self.spawn)(future.instrument(self.span.clone()));
    }
}

impl<F: Future + ?Sized> std::fmt::Debug for DetachOnDrop<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DetachOnDrop")
            .field("finished", &self.future.is_none())
            .field("state", &self.state)
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
