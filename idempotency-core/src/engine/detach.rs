//! Step 6: a request whose client went away still finishes. And the one
//! response future both adapters return.

// `pin_project!` takes `?Sized` only in the generics and the rest in `where`.
#![allow(clippy::multiple_bound_locations)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tracing::instrument::Instrumented;
use tracing::Instrument;

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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
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

pin_project_lite::pin_project! {
    /// An adapter's response future: a request that passes through (not
    /// boxed, its output mapped to the adapter's response type), an answer
    /// known at once, or a covered request that core drives.
    #[project = RequestFutureProj]
    pub struct RequestFuture<F: Future, G: ?Sized, O>
    where
        G: Future<Output = O>,
    {
        #[pin]
        kind: Flow<F, G, O>,
    }
}

pin_project_lite::pin_project! {
    #[project = FlowProj]
    enum Flow<F: Future, G: ?Sized, O>
    where
        G: Future<Output = O>,
    {
        PassThrough { #[pin] future: F, map: fn(F::Output) -> O },
        Ready { output: Option<O> },
        Covered { future: DetachOnDrop<G> },
    }
}

impl<F: Future, G: Future<Output = O> + ?Sized, O> RequestFuture<F, G, O> {
    /// A request that passes through: `future` is the inner service's, and
    /// `map` turns its output into the adapter's.
    pub fn pass_through(future: F, map: fn(F::Output) -> O) -> Self {
        Self {
            kind: Flow::PassThrough { future, map },
        }
    }

    /// An answer known at once.
    pub fn ready(output: O) -> Self {
        Self {
            kind: Flow::Ready {
                output: Some(output),
            },
        }
    }

    /// A covered request.
    pub fn covered(future: DetachOnDrop<G>) -> Self {
        Self {
            kind: Flow::Covered { future },
        }
    }
}

impl<F: Future, G: Future<Output = O> + ?Sized, O> Future for RequestFuture<F, G, O> {
    type Output = O;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<O> {
        match self.project().kind.project() {
            FlowProj::PassThrough { future, map } => future.poll(cx).map(*map),
            FlowProj::Ready { output } => match output.take() {
                Some(output) => Poll::Ready(output),
                None => panic!("RequestFuture polled after completion"),
            },
            FlowProj::Covered { future } => Pin::new(future).poll(cx),
        }
    }
}

impl<F: Future, G: Future<Output = O> + ?Sized, O> std::fmt::Debug for RequestFuture<F, G, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestFuture").finish_non_exhaustive()
    }
}
