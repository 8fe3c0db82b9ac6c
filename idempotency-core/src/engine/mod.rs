//! The request flow, shared by every adapter. Read it top-down:
//!
//! 1. [`head`]: the request head. Not covered: pass through. A bad or
//!    missing key, a declared body over the limit: refuse. Otherwise the key
//!    and the scope give the [`RecordId`](crate::RecordId), and the head
//!    starts the fingerprint.
//! 2. [`body`]: the request body is read up to its limit and ends the
//!    fingerprint.
//! 3. [`decide`]: the claim. Acquired: run. Completed: replay, or 422 for a
//!    different request. In flight: 409, or 422.
//! 4. [`run`]: the handler runs while the lease is extended.
//! 5. [`settle`]: its response is stored, stored as not replayable, or the
//!    claim released; the client gets the response either way.
//! 6. [`detach`]: a request whose client went away finishes in a task.
//!
//! An adapter calls [`Idempotency::inspect`] (step 1), then
//! [`Idempotency::respond`] (steps 2 to 5) inside a [`DetachOnDrop`] (step
//! 6), and renders what comes back: an [`Answer`] (a problem or a replay),
//! or the handler's response head with a [`ResponseBody`].

mod body;
mod decide;
mod detach;
mod handoff;
mod head;
mod run;
mod settle;
mod transaction;

use bytes::Bytes;
use std::future::Future;
use std::sync::Arc;

use crate::config::IdempotencyConfig;
use crate::problem::{Problem, ProblemKind};
use crate::store::{Guarded, Store, TransactionalStore};

pub use body::{Chunks, ResponseBody};

pub use decide::{Decision, Replay};
pub use detach::{DetachOnDrop, RequestFuture};
pub use handoff::Handoff;
pub use head::{Inspection, Pending, RequestHead, ScopedEngine};
pub use run::Execution;
pub use settle::ResponseHead;

use body::ReadError;

/// The idempotency engine: a config and a store. Cheap to clone.
#[derive(Clone)]
pub struct Idempotency {
    inner: Arc<Inner>,
}

struct Inner {
    config: IdempotencyConfig,
    store: Guarded,
    transactional: Option<Arc<dyn TransactionalStore>>,
    /// Transactional mode: the duplicates of this process that wait for a
    /// record whose transaction runs here, woken when it ends.
    settled: transaction::Settled,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("store", &self.inner.store)
            .field("config", &self.inner.config)
            .finish()
    }
}

impl Idempotency {
    /// An engine over `store`.
    pub fn new(store: impl Store, config: IdempotencyConfig) -> Self {
        Self::from_arc(Arc::new(store), config)
    }

    /// An engine over a shared, type-erased store. Every store call is
    /// bounded by the config's `store_timeout`. With
    /// [`encryption`](crate::IdempotencyConfigBuilder::encryption) set, the
    /// store is wrapped in [`Encrypted`](crate::Encrypted).
    pub fn from_arc(store: Arc<dyn Store>, config: IdempotencyConfig) -> Self {
        let store = match &config.encryption {
            Some(keys) => Arc::new(crate::Encrypted::new(store, keys.clone())),
            None => store,
        };
        let store = Guarded::new(store, config.store_timeout);
        Self {
            inner: Arc::new(Inner {
                config,
                store,
                transactional: None,
                settled: transaction::Settled::default(),
            }),
        }
    }

    /// An engine in transactional mode: the record commits in the
    /// handler's own transaction on `store`'s database, which the handler
    /// gets through the adapter's extractor (see [`TransactionalStore`]).
    pub fn transactional<S>(store: S, config: IdempotencyConfig) -> Self
    where
        S: Store + TransactionalStore + Clone,
    {
        match config.encryption.clone() {
            Some(keys) => Self::transactional_over(crate::Encrypted::new(store, keys), config),
            None => Self::transactional_over(store, config),
        }
    }

    fn transactional_over<S>(store: S, config: IdempotencyConfig) -> Self
    where
        S: Store + TransactionalStore + Clone,
    {
        let transactional: Arc<dyn TransactionalStore> = Arc::new(store.clone());
        let store = Guarded::new(Arc::new(store), config.store_timeout);
        Self {
            inner: Arc::new(Inner {
                config,
                store,
                transactional: Some(transactional),
                settled: transaction::Settled::default(),
            }),
        }
    }

    /// Whether the record commits in the handler's transaction.
    pub fn is_transactional(&self) -> bool {
        self.inner.transactional.is_some()
    }

    /// The config.
    pub fn config(&self) -> &IdempotencyConfig {
        &self.inner.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        self.inner.store.inner()
    }

    /// The store, its calls bounded by the store timeout.
    pub fn guarded(&self) -> &Guarded {
        &self.inner.store
    }

    /// Steps 2 to 5 for a covered request: reads `body` up to the limit,
    /// claims, and then replays, refuses, or runs the handler through `call`
    /// (given the body read) and settles the claim with its response.
    ///
    /// `call` gets the [`Handoff`] (the body read and, in transactional
    /// mode, the transaction to put into the request's extensions) and
    /// answers with the handler's response head (kept for the adapter, read
    /// for storing) and its body. Its error (the inner service's) releases
    /// the claim and comes back as it is.
    pub async fn respond<B, C, F, H, S, E>(
        &self,
        pending: Pending,
        body: B,
        call: C,
    ) -> Result<Reply<H, S>, E>
    where
        B: Chunks,
        B::Error: std::fmt::Display,
        C: FnOnce(Handoff) -> F,
        F: Future<Output = Result<(H, S), E>>,
        H: ResponseHead,
        S: Chunks,
    {
        let config = self.config();
        let read = body::read_request(body, config.max_request_body, config.request_body_timeout);
        let body = match read.await {
            Ok(body) => body,
            Err(ReadError::TooLarge) => return Ok(Reply::problem(self.refuse_body_too_large())),
            Err(ReadError::TimedOut) => return Ok(Reply::problem(self.refuse_slow_body())),
            Err(ReadError::Failed(e)) => return Ok(Reply::problem(refuse_unreadable(&e))),
        };
        if let Some(store) = &self.inner.transactional {
            // Rare enough, and its futures large enough, to live in a box.
            return Box::pin(self.respond_in_transaction(&**store, pending, body, call)).await;
        }
        let call = |body| {
            call(Handoff {
                body,
                transaction: None,
            })
        };
        let execution = match self.decide(pending, &body).await {
            Decision::Execute(execution) => execution,
            Decision::Replay(replay) => return Ok(Reply::Answer(Answer::Replay(replay))),
            Decision::Reject(problem) => return Ok(Reply::problem(problem)),
            Decision::Unguarded => {
                let (head, body) = call(body).await?;
                return Ok(Reply::Handler(head, ResponseBody::stream(body)));
            }
        };
        let work = async {
            let (head, body) = call(body).await?;
            let handled = execution.read(head.status(), body).await;
            Ok((head, handled))
        };
        match execution.run(work).await {
            Ok((head, handled)) => {
                let body = execution.settle(&head, handled).await;
                Ok(Reply::Handler(head, body))
            }
            Err(e) => {
                execution.release().await;
                Err(e)
            }
        }
    }

    /// The 413 for a body over the limit.
    pub(crate) fn refuse_body_too_large(&self) -> Problem {
        tracing::debug!(
            decision = "rejected",
            reason = "body too large",
            "idempotency"
        );
        crate::metrics::request(crate::metrics::Outcome::Rejected);
        Problem::new(
            ProblemKind::BodyTooLarge,
            format!(
                "The request body is larger than the {} bytes this endpoint accepts.",
                self.config().max_request_body
            ),
        )
    }
}

impl Idempotency {
    /// The 408 for a body that did not arrive within the bound.
    fn refuse_slow_body(&self) -> Problem {
        let bound = self.config().request_body_timeout;
        tracing::info!(
            decision = "rejected",
            reason = "request body timeout",
            timeout = ?bound,
            "idempotency: the request body did not arrive in time; answered 408, handler not run"
        );
        crate::metrics::request(crate::metrics::Outcome::Rejected);
        Problem::new(
            ProblemKind::RequestTimeout,
            format!(
                "The request body did not arrive within {} s. Nothing was done; send the request again with the same Idempotency-Key.",
                bound.as_secs_f64()
            ),
        )
    }
}

/// The 400 for a body that could not be read.
fn refuse_unreadable(cause: &dyn std::fmt::Display) -> Problem {
    tracing::debug!(decision = "rejected", reason = %cause, "idempotency: unreadable body");
    crate::metrics::request(crate::metrics::Outcome::Rejected);
    Problem::new(
        ProblemKind::UnreadableBody,
        "The request body could not be read.",
    )
}

/// What [`Idempotency::respond`] gives an adapter to send.
#[derive(Debug)]
pub enum Reply<H, S: Chunks> {
    /// A response core made.
    Answer(Answer),
    /// The handler's response head, and the body the client gets.
    Handler(H, ResponseBody<S>),
}

impl<H, S: Chunks> Reply<H, S> {
    fn problem(problem: Problem) -> Self {
        Self::Answer(Answer::Problem(problem))
    }
}

/// A response core made, for the adapter to render as it is: a refusal, or
/// a replay of a stored response.
#[derive(Debug)]
pub enum Answer {
    /// A problem+json refusal.
    Problem(Problem),
    /// A stored response, sent again with `Idempotent-Replayed: true`.
    Replay(Replay),
}

impl Answer {
    /// The status code.
    pub fn status(&self) -> u16 {
        match self {
            Answer::Problem(p) => p.status(),
            Answer::Replay(r) => r.status,
        }
    }

    /// Whether the connection should be closed after this answer (a 408:
    /// the request body was not read to its end). Its headers carry
    /// `Connection: close` then; an adapter whose framework writes that
    /// header itself sets it its own way.
    pub fn closes_connection(&self) -> bool {
        matches!(self, Answer::Problem(p) if p.closes_connection())
    }

    /// Every header to send, in order (an exact size hint, to reserve room).
    pub fn headers(&self) -> AnswerHeaders<'_> {
        match self {
            Answer::Problem(p) => AnswerHeaders::Problem(p.headers()),
            Answer::Replay(r) => AnswerHeaders::Replay(r.replay_headers()),
        }
    }

    /// The body.
    pub fn body(&self) -> Bytes {
        match self {
            Answer::Problem(p) => Bytes::from(p.to_json()),
            Answer::Replay(r) => r.body.clone(),
        }
    }
}

/// The headers of an [`Answer`].
#[derive(Debug)]
pub enum AnswerHeaders<'a> {
    /// A problem's: its content type and `Retry-After`.
    Problem(crate::problem::ProblemHeaders),
    /// A replay's: see [`StoredResponse::replay_headers`](crate::StoredResponse::replay_headers).
    Replay(crate::record::ReplayHeaders<'a>),
}

impl<'a> Iterator for AnswerHeaders<'a> {
    type Item = (&'a str, Bytes);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            AnswerHeaders::Problem(h) => h.next(),
            AnswerHeaders::Replay(h) => h.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            AnswerHeaders::Problem(h) => h.size_hint(),
            AnswerHeaders::Replay(h) => h.size_hint(),
        }
    }
}

impl From<Problem> for Answer {
    fn from(problem: Problem) -> Self {
        Answer::Problem(problem)
    }
}
