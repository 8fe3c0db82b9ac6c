//! Step 5: settling the claim with the handler's response. Stored (the
//! replayable headers and the body), stored as not replayable (a body over
//! the storable limit), or released (a status that must be retried, a body
//! that failed); then the response goes to the client.

use bytes::{Bytes, BytesMut};
use tracing::Instrument;

use crate::record::{HeaderText, StoredOutcome, StoredResponse, TokenOutcome};
use crate::store::StoreError;

use super::body::{Chunks, Read, ResponseBody};
use super::Execution;

/// What the engine needs to know of a response head, whatever the framework.
pub trait ResponseHead {
    /// The status code.
    fn status(&self) -> u16;
    /// Every header, in order, names in lowercase.
    fn headers(&self) -> impl Iterator<Item = (&str, &[u8])>;
}

impl ResponseHead for http::response::Parts {
    fn status(&self) -> u16 {
        self.status.as_u16()
    }
    fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()))
    }
}

/// A response body up to this size is copied into its record's one buffer
/// (with the headers); a larger one is kept as the handler's `Bytes`.
const INLINE_BODY: usize = 4096;

/// A handler's response as read before settling.
pub(super) enum Handled<S: Chunks> {
    /// A status that is not stored: the claim is released.
    NotStored(S),
    /// Read up to the storable limit.
    Read(Read<S>),
}

impl Execution {
    /// Whether a response with this status is stored; otherwise release.
    pub fn should_store(&self, status: u16) -> bool {
        self.engine.config().stores_status(status)
    }

    /// Reads the response for settling (inside [`run`](Self::run), so the
    /// lease is kept while a slow body streams).
    pub(super) async fn read<S: Chunks>(&self, status: u16, body: S) -> Handled<S> {
        read(self.engine.config(), status, body).await
    }

    /// Settles the claim with what [`read`](Self::read) found, and gives
    /// back the body the client gets.
    pub(super) async fn settle<H: ResponseHead, S: Chunks>(
        self,
        head: &H,
        handled: Handled<S>,
    ) -> ResponseBody<S> {
        match settlement(self.engine.config(), head, handled) {
            Settlement::Keep(outcome, body) => {
                self.finish(outcome).await;
                body
            }
            Settlement::Discard(body) => {
                self.release().await;
                body
            }
        }
    }

    /// Builds the stored form of a response: drops the headers never replayed,
    /// keeps the others in order (repeated ones too).
    pub fn capture<'a>(
        &self,
        status: u16,
        headers: impl Iterator<Item = (&'a str, &'a [u8])>,
        body: Bytes,
    ) -> StoredResponse {
        capture(self.engine.config(), status, headers, body)
    }
    /// Stores the response for replay.
    pub async fn complete(self, response: StoredResponse) {
        self.finish(StoredOutcome::response(response)).await;
    }

    /// Marks the request done with a body too large to store: retries get a
    /// 410 problem and never re-run the handler.
    pub async fn complete_not_replayable(self, status: u16) {
        self.finish(StoredOutcome::NotReplayable { status }).await;
    }

    async fn finish(mut self, outcome: StoredOutcome) {
        self.settled = true;
        let engine = &self.engine;
        let ttl = engine.config().ttl;
        let first = engine
            .guarded()
            .complete(&self.id, self.token, &outcome, ttl)
            .await;
        if let Some(e) = self.completed(first, 1) {
            // Retries (a failing store) in a future of their own, so their
            // timer does not weigh on every request.
            Box::pin(self.complete_retries(&outcome, e))
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
        match result {
            Ok(TokenOutcome::Applied) => None,
            Ok(TokenOutcome::Fenced) => {
                let _enter = self.span.enter();
                tracing::warn!("idempotency claim was taken over before the response was stored; the response was sent but not stored");
                None
            }
            Err(e) if attempt >= self.engine.config().complete_attempts => {
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

    async fn complete_retries(&self, outcome: &StoredOutcome, mut error: StoreError) {
        let config = self.engine.config();
        let mut backoff = config.complete_backoff;
        for attempt in 2..=config.complete_attempts {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                attempt = attempt - 1,
                "idempotency complete failed; retrying"
            );
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
            let call = self
                .engine
                .guarded()
                .complete(&self.id, self.token, outcome, config.ttl);
            match self.completed(call.await, attempt) {
                Some(e) => error = e,
                None => return,
            }
        }
    }
}

/// What becomes of a handled response, in either mode: kept (completed,
/// or committed with the effect) or discarded (released, or rolled back),
/// and the body the client gets either way.
pub(super) enum Settlement<S: Chunks> {
    /// Store this outcome.
    Keep(StoredOutcome, ResponseBody<S>),
    /// Store nothing: a status that is not stored, or a body that failed.
    Discard(ResponseBody<S>),
}

/// Decides the [`Settlement`] of a response read by [`read`].
pub(super) fn settlement<H: ResponseHead, S: Chunks>(
    config: &crate::IdempotencyConfig,
    head: &H,
    handled: Handled<S>,
) -> Settlement<S> {
    let status = head.status();
    match handled {
        Handled::NotStored(body) => Settlement::Discard(ResponseBody::stream(body)),
        Handled::Read(Read::Failed(error)) => Settlement::Discard(ResponseBody::failed(error)),
        Handled::Read(Read::Complete(bytes)) => {
            let stored = capture(config, status, head.headers(), bytes.clone());
            Settlement::Keep(StoredOutcome::response(stored), ResponseBody::full(bytes))
        }
        Handled::Read(Read::TooLarge { mut prefix, rest }) => {
            let body = match rest {
                Some(rest) => ResponseBody::chain(prefix, rest),
                None => ResponseBody::full(prefix.pop_front().unwrap_or_default()),
            };
            Settlement::Keep(StoredOutcome::NotReplayable { status }, body)
        }
    }
}

/// Reads a handler's response for settling: not stored (its status), or
/// read up to the storable limit.
pub(super) async fn read<S: Chunks>(
    config: &crate::IdempotencyConfig,
    status: u16,
    body: S,
) -> Handled<S> {
    if !config.stores_status(status) {
        return Handled::NotStored(body);
    }
    Handled::Read(super::body::read_response(body, config.max_stored_response).await)
}

/// The stored form of a response: see [`Execution::capture`].
pub(super) fn capture<'a>(
    config: &crate::IdempotencyConfig,
    status: u16,
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
    body: Bytes,
) -> StoredResponse {
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
