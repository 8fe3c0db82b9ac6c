//! The one place that bounds store calls by a timeout and keeps claims
//! alive with a heartbeat, for the HTTP engine and the inbox alike.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::{Claim, Store, StoreError, StoreFuture};
use crate::fingerprint::RecordId;
use crate::metrics::{Op, OpMetrics, StoreMetrics};
use crate::record::{ClaimOutcome, LeaseToken, StoredOutcome, TokenOutcome};

/// A store whose every call fails with [`StoreError::Timeout`] after
/// `timeout`, and which keeps a claim alive while work runs
/// ([`hold`](Self::hold)). The HTTP engine and the inbox's lease mode both
/// call their store through it. Cheap to clone.
///
/// It is a [`Store`] itself, so it can wrap any store for any caller.
///
/// It also records the store metrics ([`metrics`](crate::metrics)): each
/// failed call in `idempotency_store_errors_total{backend,op}`, and the
/// latency of each call that waits in `idempotency_store_duration_seconds`.
/// A call the store answers at once ([`StoreFuture::ready`]) is not timed.
#[derive(Clone)]
pub struct Guarded {
    store: Arc<dyn Store>,
    timeout: Duration,
    metrics: Arc<StoreMetrics>,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("store", &self.store.backend())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Guarded {
    /// `store`, each call bounded by `timeout`.
    pub fn new(store: Arc<dyn Store>, timeout: Duration) -> Self {
        let metrics = Arc::new(StoreMetrics::new(store.backend()));
        Self {
            store,
            timeout,
            metrics,
        }
    }

    /// The store inside.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The bound of each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Bounds one call: an answer the store already has costs nothing, and a
    /// store that bounds its own call within the timeout gets no second timer.
    fn bounded<'a, T: Send + 'a>(
        &'a self,
        call: StoreFuture<'a, Result<T, StoreError>>,
    ) -> Bounded<'a, T> {
        self.metered(None, call)
    }

    /// [`bounded`](Self::bounded), recording the store metrics of `op`: an
    /// error is counted however the store answers; only a call that waits
    /// reads the clock, twice, to be timed.
    fn metered<'a, T: Send + 'a>(
        &'a self,
        op: Option<Op>,
        call: StoreFuture<'a, Result<T, StoreError>>,
    ) -> Bounded<'a, T> {
        let call = match call.into_ready() {
            Ok(value) => {
                if let (Some(op), Err(_)) = (op, &value) {
                    self.metrics.op(op).error();
                }
                Call::Ready { value: Some(value) }
            }
            Err(call) => {
                let meter = op.map(|op| Meter {
                    metrics: self.metrics.op(op),
                    start: crate::metrics::clock(),
                });
                if call.bound().is_some_and(|b| b <= self.timeout) {
                    Call::Plain { call, meter }
                } else {
                    Call::Timed {
                        call: Box::pin(tokio::time::timeout(self.timeout, call)),
                        backend: self.store.backend(),
                        timeout: self.timeout,
                        meter,
                    }
                }
            }
        };
        Bounded { call }
    }

    /// [`Store::claim`], bounded.
    pub fn claim<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> Bounded<'a, ClaimOutcome> {
        self.metered(Some(Op::Claim), self.store.claim(id, token, claim))
    }

    /// [`Store::complete`], bounded.
    pub fn complete<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        outcome: &'a StoredOutcome,
        ttl: Duration,
    ) -> Bounded<'a, TokenOutcome> {
        self.metered(
            Some(Op::Complete),
            self.store.complete(id, token, outcome, ttl),
        )
    }

    /// [`Store::release`], bounded.
    pub fn release<'a>(&'a self, id: &'a RecordId, token: LeaseToken) -> Bounded<'a, TokenOutcome> {
        self.metered(Some(Op::Release), self.store.release(id, token))
    }

    /// [`Store::extend`], bounded.
    pub fn extend<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
    ) -> Bounded<'a, TokenOutcome> {
        self.metered(Some(Op::Extend), self.store.extend(id, token, lease))
    }

    /// Drives `work` while extending the claim of `token` on `id` every half
    /// `lease`, so work slower than the lease keeps its claim. The heartbeat
    /// is built only once `work` waits (work that answers on its first poll
    /// costs no timer and no store call), and stops when the claim is fenced.
    pub fn hold<'a, F: Future>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
        work: F,
    ) -> Hold<'a, F> {
        Hold {
            work,
            guard: self,
            id,
            token,
            lease,
            heartbeat: None,
            lost: false,
        }
    }

    /// Extends the lease every half lease until the claim is fenced.
    async fn heartbeat(&self, id: &RecordId, token: LeaseToken, lease: Duration) {
        loop {
            tokio::time::sleep(lease / 2).await;
            match self.extend(id, token, lease).await {
                Ok(TokenOutcome::Applied) => tracing::trace!("lease extended"),
                Ok(TokenOutcome::Fenced) => {
                    tracing::warn!("the claim was taken over while its work ran");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = &e as &dyn std::error::Error, cause = ?std::error::Error::source(&e), "the lease could not be extended")
                }
            }
        }
    }

    /// [`Store::watch`], bounded.
    pub fn watch<'a>(&'a self, id: &'a RecordId) -> Bounded<'a, Option<super::Watch>> {
        self.bounded(self.store.watch(id))
    }
}

impl Store for Guarded {
    fn claim<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> StoreFuture<'a, Result<ClaimOutcome, StoreError>> {
        Guarded::claim(self, id, token, claim).into_store_future(self.timeout)
    }
    fn complete<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        outcome: &'a StoredOutcome,
        ttl: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        Guarded::complete(self, id, token, outcome, ttl).into_store_future(self.timeout)
    }
    fn release<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        Guarded::release(self, id, token).into_store_future(self.timeout)
    }
    fn extend<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        Guarded::extend(self, id, token, lease).into_store_future(self.timeout)
    }
    fn backend(&self) -> &'static str {
        self.store.backend()
    }
    fn watch<'a>(
        &'a self,
        id: &'a RecordId,
    ) -> StoreFuture<'a, Result<Option<super::Watch>, StoreError>> {
        Guarded::watch(self, id).into_store_future(self.timeout)
    }
}

pin_project_lite::pin_project! {
    /// A store call bounded by [`Guarded`]'s timeout.
    #[must_use = "futures do nothing unless polled"]
    pub struct Bounded<'a, T> {
        #[pin]
        call: Call<'a, T>,
    }
}

pin_project_lite::pin_project! {
    #[project = CallProj]
    enum Call<'a, T> {
        // The store already had the answer.
        Ready { value: Option<Result<T, StoreError>> },
        // The store bounds this call itself.
        Plain { call: StoreFuture<'a, Result<T, StoreError>>, meter: Option<Meter<'a>> },
        // Bounded here; boxed, so that a store that answers at once does
        // not carry a timer's space in every caller's future.
        Timed {
            call: Pin<Box<tokio::time::Timeout<StoreFuture<'a, Result<T, StoreError>>>>>,
            backend: &'static str,
            timeout: Duration,
            meter: Option<Meter<'a>>,
        },
    }
}

/// A call being timed for the store metrics: 16 bytes in every store
/// call's future.
struct Meter<'a> {
    metrics: &'a OpMetrics,
    start: u64,
}

impl Meter<'_> {
    /// Records the call's latency, and counts it if it failed.
    fn finish<T>(meter: &mut Option<Self>, result: &Result<T, StoreError>) {
        if let Some(Meter { metrics, start }) = meter.take() {
            metrics.duration(start);
            if result.is_err() {
                metrics.error();
            }
        }
    }
}

impl<'a, T: Send + 'a> Bounded<'a, T> {
    fn into_store_future(self, bound: Duration) -> StoreFuture<'a, Result<T, StoreError>> {
        match self.call {
            Call::Ready { value: Some(value) } => StoreFuture::ready(value),
            call => StoreFuture::bounded(Bounded { call }, bound),
        }
    }
}

impl<T> Future for Bounded<'_, T> {
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().call.project() {
            CallProj::Ready { value } => match value.take() {
                Some(value) => Poll::Ready(value),
                None => panic!("Bounded polled after completion"),
            },
            CallProj::Plain { call, meter } => Pin::new(call).poll(cx).map(|r| {
                Meter::finish(meter, &r);
                r
            }),
            CallProj::Timed {
                call,
                backend,
                timeout,
                meter,
            } => call.as_mut().poll(cx).map(|r| {
                let r = r.unwrap_or(Err(StoreError::Timeout {
                    backend,
                    timeout: *timeout,
                }));
                Meter::finish(meter, &r);
                r
            }),
        }
    }
}

/// Whether a claim held by [`Guarded::hold`] stayed this holder's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// No heartbeat was fenced: as far as this holder knows, the claim is its own.
    Kept,
    /// A heartbeat found the claim taken over (its lease had passed).
    Lost,
}

pin_project_lite::pin_project! {
    /// The future of [`Guarded::hold`]: the work's output, and whether the
    /// claim was kept.
    #[must_use = "futures do nothing unless polled"]
    pub struct Hold<'a, F> {
        #[pin]
        work: F,
        guard: &'a Guarded,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
        heartbeat: Option<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>,
        lost: bool,
    }
}

impl<F: Future> Future for Hold<'_, F> {
    type Output = (F::Output, Held);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.work.poll(cx) {
            let held = if *this.lost { Held::Lost } else { Held::Kept };
            return Poll::Ready((out, held));
        }
        if !*this.lost {
            let (guard, id, token, lease) = (*this.guard, *this.id, *this.token, *this.lease);
            let beat = this
                .heartbeat
                .get_or_insert_with(|| Box::pin(guard.heartbeat(id, token, lease)));
            if beat.as_mut().poll(cx).is_ready() {
                // Fenced: the work finishes without it.
                *this.lost = true;
                *this.heartbeat = None;
            }
        }
        Poll::Pending
    }
}
