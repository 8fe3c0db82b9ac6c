//! Step 3: the claim, and what it decides: run the handler, replay, or refuse.

use std::time::Duration;

use crate::config::FailureMode;
use crate::fingerprint::Fingerprint;
use crate::problem::{Problem, ProblemKind};
use crate::record::{ClaimOutcome, LeaseToken, StoredOutcome, StoredResponse};
use crate::store::{Claim, StoreError};

use super::{Execution, Idempotency, Pending};
use std::sync::Arc;

/// How often a duplicate that waits polls a store that cannot notify.
pub(super) const POLL: Duration = Duration::from_millis(25);

/// How often a duplicate that waits on a [`Watch`](crate::store::Watch)
/// claims again anyway, in case its notification was lost (a listener that
/// reconnected, a holder that crashed and whose lease passed).
pub(super) const WATCH_FALLBACK: Duration = Duration::from_millis(250);

/// What to do with a covered request once its body is read.
#[derive(Debug)]
#[must_use]
pub enum Decision {
    /// This request holds the claim: run the handler, then settle.
    Execute(Execution),
    /// It completed before: send the stored response with `Idempotent-Replayed: true`.
    Replay(Replay),
    /// Refuse: 409, 410, 422 or 503.
    Reject(Problem),
    /// The store failed and the config is fail-open: run the handler unprotected.
    Unguarded,
}

/// A stored response to replay. It shares the store's copy (no clone of
/// headers or body) and derefs to [`StoredResponse`].
#[derive(Debug, Clone)]
pub struct Replay(Arc<StoredResponse>);

impl std::ops::Deref for Replay {
    type Target = StoredResponse;

    fn deref(&self) -> &StoredResponse {
        &self.0
    }
}

impl Idempotency {
    /// Fingerprints the body, claims the record and decides. The body is
    /// hashed before the future is returned (it is not borrowed across the
    /// claim). [`respond`](Self::respond) calls it; a custom adapter may too.
    pub fn decide(
        &self,
        pending: Pending,
        body: &[u8],
    ) -> impl std::future::Future<Output = Decision> + Send + '_ {
        let Pending {
            id,
            fingerprint,
            span,
            ..
        } = pending;
        let fingerprint = fingerprint.finish(body);
        let token = LeaseToken::random();
        async move {
            let config = self.config();
            let claim = Claim {
                fingerprint: &fingerprint,
                lease: config.lease,
                ttl: config.ttl,
            };
            let store = self.guarded();
            let mut outcome = store.claim(&id, token, claim).await;
            if !config.wait_for_in_flight.is_zero() {
                // Rarely configured: its timers live in a box of their own.
                outcome = Box::pin(self.wait_while_in_flight(&id, token, claim, outcome)).await;
            }
            match outcome {
                Ok(ClaimOutcome::Acquired(token)) => {
                    tracing::debug!(decision = "executed", "idempotency");
                    crate::metrics::request(crate::metrics::Outcome::Executed);
                    Decision::Execute(Execution::new(self.clone(), id, token, span))
                }
                Ok(other) => self.decided(other, &fingerprint),
                Err(e) => self.store_failed(&e),
            }
        }
    }

    /// A claim that was not acquired: a conflict, a mismatch or a replay.
    pub(super) fn decided(&self, outcome: ClaimOutcome, fingerprint: &Fingerprint) -> Decision {
        let (held, outcome) = match outcome {
            ClaimOutcome::InFlight {
                fingerprint: held,
                lease_remaining,
            } if held == *fingerprint => {
                tracing::debug!(decision = "conflict", "idempotency");
                return Decision::Reject(self.in_flight(lease_remaining));
            }
            ClaimOutcome::InFlight { fingerprint, .. } => (fingerprint, None),
            ClaimOutcome::Completed {
                fingerprint,
                outcome,
            } => (fingerprint, Some(outcome)),
            ClaimOutcome::Acquired(_) => unreachable!("handled by decide"),
        };
        match outcome {
            _ if held != *fingerprint => {
                tracing::debug!(decision = "mismatch", "idempotency");
                crate::metrics::request(crate::metrics::Outcome::Mismatch);
                Decision::Reject(Problem::new(
                    ProblemKind::KeyReused,
                    "This Idempotency-Key was already used for a request with a different method, path, query, content type or body. Use a new key for a new operation.",
                ))
            }
            Some(StoredOutcome::Response(r)) => {
                tracing::debug!(decision = "replayed", status = r.status, "idempotency");
                crate::metrics::request(crate::metrics::Outcome::Replayed);
                Decision::Replay(Replay(r))
            }
            Some(StoredOutcome::NotReplayable { status }) => {
                tracing::debug!(
                    decision = "rejected",
                    reason = "not replayable",
                    "idempotency"
                );
                crate::metrics::request(crate::metrics::Outcome::Rejected);
                Decision::Reject(Problem::new(
                    ProblemKind::NotReplayable,
                    format!(
                        "The request with this Idempotency-Key was processed and answered {status}, but its response was too large to store, so it cannot be replayed. The operation was not repeated."
                    ),
                ))
            }
            Some(StoredOutcome::Sealed(sealed)) => {
                // Written by an engine with keys; this one has none.
                self.store_failed(&StoreError::corrupt(
                    self.guarded().inner().backend(),
                    crate::DecryptError::NoKeys {
                        key_id: sealed.key_id().to_owned(),
                    },
                ))
            }
            Some(StoredOutcome::Mark(_)) | None => {
                // A record this engine did not write (the inbox's), under this key.
                self.store_failed(&StoreError::corrupt(
                    self.guarded().inner().backend(),
                    crate::record::CorruptRecord::new("the record holds no HTTP response"),
                ))
            }
        }
    }

    /// The 409 for a request still in flight, whose holder's lease has
    /// `lease_remaining` left.
    pub(super) fn in_flight(&self, lease_remaining: Duration) -> Problem {
        crate::metrics::request(crate::metrics::Outcome::Conflict);
        let config = self.config();
        let hint = config
            .in_flight_retry_after
            .min(lease_remaining)
            .min(config.lease);
        Problem::new(
            ProblemKind::InFlight,
            "A request with this Idempotency-Key is still being processed. Retry after the delay in Retry-After to get its response.",
        )
        .retry_after(hint)
    }

    /// With `wait_for_in_flight` set: while the same request is in flight
    /// elsewhere, waits, up to the bound, until it completes (replay), is
    /// released (this request runs), or the bound passes (409).
    ///
    /// A store that notifies ([`Store::watch`](crate::store::Store::watch))
    /// wakes the waiter when the record completes or is released; it then
    /// claims again, and polls only every [`WATCH_FALLBACK`] in case a
    /// notification was lost. A store that cannot notify is polled every
    /// [`POLL`].
    async fn wait_while_in_flight(
        &self,
        id: &crate::RecordId,
        token: LeaseToken,
        claim: Claim<'_>,
        mut outcome: Result<ClaimOutcome, StoreError>,
    ) -> Result<ClaimOutcome, StoreError> {
        let waiting = |outcome: &Result<ClaimOutcome, StoreError>| matches!(outcome, Ok(ClaimOutcome::InFlight { fingerprint, .. }) if fingerprint == claim.fingerprint);
        let deadline = tokio::time::Instant::now() + self.config().wait_for_in_flight;
        let store = self.guarded();
        // Kept across fallback polls; a new one after each wake-up.
        let mut watch = None;
        loop {
            if !waiting(&outcome) || tokio::time::Instant::now() >= deadline {
                return outcome;
            }
            if watch.is_none() {
                // A store error here only costs the notification: poll instead.
                watch = store.watch(id).await.ok().flatten();
                if watch.is_some() {
                    // It may have completed before the watch began.
                    outcome = store.claim(id, token, claim).await;
                    if !waiting(&outcome) {
                        return outcome;
                    }
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match watch.as_mut() {
                Some(pending) => {
                    if tokio::time::timeout(left.min(WATCH_FALLBACK), pending)
                        .await
                        .is_ok()
                    {
                        watch = None;
                    }
                }
                None => tokio::time::sleep(left.min(POLL)).await,
            }
            outcome = store.claim(id, token, claim).await;
        }
    }

    fn store_failed(&self, e: &StoreError) -> Decision {
        match self.config().failure_mode {
            FailureMode::Closed => {
                tracing::error!(error = e as &dyn std::error::Error, cause = ?std::error::Error::source(e), decision = "rejected", "idempotency store failed; refusing the request (fail-closed)");
                crate::metrics::request(crate::metrics::Outcome::Unavailable);
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
                crate::metrics::request(crate::metrics::Outcome::Unguarded);
                Decision::Unguarded
            }
        }
    }
}
