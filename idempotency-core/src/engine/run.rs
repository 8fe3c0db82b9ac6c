//! Step 4: the handler runs while this request holds the claim; its lease
//! is extended every half lease ([`Guarded::hold`](crate::store::Guarded::hold)).

use std::future::Future;
use tracing::Instrument;

use crate::fingerprint::RecordId;
use crate::record::{LeaseToken, TokenOutcome};
use crate::store::{Held, StoreError};

use super::Idempotency;

/// A claim held by this request. Run the handler inside [`run`](Self::run),
/// then settle: [`complete`](Self::complete) or [`release`](Self::release).
/// Dropped without either (a panic, a cancelled future), it releases the
/// claim in the background so a retry can run.
#[derive(Debug)]
#[must_use = "a claim must be completed or released"]
pub struct Execution {
    pub(super) engine: Idempotency,
    pub(super) id: RecordId,
    pub(super) token: LeaseToken,
    pub(super) settled: bool,
    pub(super) span: tracing::Span,
}

impl Execution {
    pub(super) fn new(
        engine: Idempotency,
        id: RecordId,
        token: LeaseToken,
        span: tracing::Span,
    ) -> Self {
        Self {
            engine,
            id,
            token,
            settled: false,
            span,
        }
    }

    /// Drives `handler` while extending the lease every half lease, so a
    /// handler slower than the lease keeps its claim.
    pub fn run<'a, F: Future + 'a>(&'a self, handler: F) -> impl Future<Output = F::Output> + 'a {
        let lease = self.engine.config().lease;
        let hold = self
            .engine
            .guarded()
            .hold(&self.id, self.token, lease, handler);
        async move {
            let (output, held) = hold.await;
            if held == Held::Lost {
                tracing::warn!("idempotency claim was taken over while the handler ran; its response will not be stored");
            }
            output
        }
    }

    /// Gives the claim up so that a retry runs the handler again (5xx and
    /// transient 4xx).
    pub async fn release(mut self) {
        self.settled = true;
        let _ = release(&self.engine, &self.id, self.token).await;
    }
}

pub(super) async fn release(
    engine: &Idempotency,
    id: &RecordId,
    token: LeaseToken,
) -> Result<TokenOutcome, StoreError> {
    let r = engine.guarded().release(id, token).await;
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
