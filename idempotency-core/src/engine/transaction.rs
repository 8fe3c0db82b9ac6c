//! Steps 3 to 5 in transactional mode (a [`TransactionalStore`]): the record is
//! claimed, and settled, in the handler's own database transaction.
//!
//! 1. One snapshot read, no transaction: completed → replay (or 422, 410).
//! 2. A transaction on the store's pool, the record's lock taken without
//!    waiting (held elsewhere → 409 at once, no connection kept), the
//!    record in flight inside it.
//! 3. The handler runs with the transaction (the adapter puts its handle
//!    into the request), bounded by the transaction timeout.
//! 4. A response to store: written into the record, then **one commit** for
//!    the effect and the record. Anything else (a status that is not
//!    stored, a body that failed, the handler's error, a panic, a timeout,
//!    a crash) rolls both back, and the retry runs at once.

use bytes::Bytes;
use std::future::Future;
use std::time::Duration;

use super::body::Chunks;
use super::settle::{read, settlement, ResponseHead, Settlement};
use super::{Decision, Handoff, Idempotency, Pending, Reply};
use crate::problem::{Problem, ProblemKind};
use crate::record::{ClaimOutcome, LeaseToken};
use crate::store::{Begun, OpenTransaction, TransactionalStore};
use crate::store::{Claim, StoreError};

impl Idempotency {
    pub(super) async fn respond_in_transaction<C, F, H, S, E>(
        &self,
        store: &dyn TransactionalStore,
        pending: Pending,
        body: Bytes,
        call: C,
    ) -> Result<Reply<H, S>, E>
    where
        C: FnOnce(Handoff) -> F,
        F: Future<Output = Result<(H, S), E>>,
        H: ResponseHead,
        S: Chunks,
    {
        let config = self.config();
        let Pending {
            id,
            fingerprint,
            route,
            ..
        } = pending;
        let route = route.as_deref().unwrap_or("");
        let fingerprint = fingerprint.finish(&body);
        let claim = Claim {
            fingerprint: &fingerprint,
            lease: config.lease,
            ttl: config.ttl,
        };
        let token = LeaseToken::random();
        let deadline = tokio::time::Instant::now() + config.wait_for_in_flight;
        // Waiting (`wait_for_in_flight`) for a transaction of this process:
        // woken when it ends; for one elsewhere: polled.
        let mut watch = None;
        let open = loop {
            match self.bounded(store, store.snapshot(&id, &fingerprint)).await {
                Ok(Some(existing)) => return Ok(self.existing(existing, &fingerprint)),
                Ok(None) => {}
                Err(e) => return Ok(self.transaction_failed(&e)),
            }
            match self.bounded(store, store.begin(&id, token, claim)).await {
                Ok(Begun::Acquired(open)) => break open,
                Ok(Begun::Existing(existing)) => return Ok(self.existing(existing, &fingerprint)),
                Ok(Begun::Locked) if tokio::time::Instant::now() < deadline => {
                    // Registered before the next read, so an end from now on
                    // wakes it; the first time, read again at once.
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let settled = &self.inner.settled;
                    if let Some(watch) = watch.replace(settled.waiters.watch(&id)) {
                        // Held here: it wakes us when it ends. Held elsewhere: poll.
                        let every = if settled.held_here(&id) {
                            super::decide::WATCH_FALLBACK
                        } else {
                            super::decide::POLL
                        };
                        let _ = tokio::time::timeout(left.min(every), watch).await;
                    }
                }
                Ok(Begun::Locked) => {
                    tracing::debug!(decision = "conflict", "idempotency");
                    return Ok(Reply::problem(self.in_flight(config.lease)));
                }
                Err(e) => return Ok(self.transaction_failed(&e)),
            }
        };
        drop(watch);
        // However this ends (settled, rolled back, cancelled, a panic), the
        // duplicates of this process that wait for it are woken.
        let _settled = self.inner.settled.hold(&id);
        tracing::debug!(decision = "executed", transactional = true, "idempotency");
        let bound = config.transaction_timeout();
        let handoff = Handoff {
            body,
            transaction: Some(open.handle()),
        };
        let work = async {
            let (head, body) = call(handoff).await?;
            let handled = read(config, head.status(), body).await;
            Ok((head, handled))
        };
        let (head, handled) = match tokio::time::timeout(bound, work).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                rollback(open, bound).await;
                tracing::warn!(
                    route,
                    "idempotency: the handler failed (the service returned an error); its transaction was rolled back, and a retry runs it again"
                );
                crate::metrics::request(crate::metrics::Outcome::Executed);
                return Err(e);
            }
            Err(_) => {
                // The handler was cancelled; its transaction rolls back.
                rollback(open, bound).await;
                tracing::warn!(timeout = ?bound, "idempotency: the handler held its transaction too long; rolled back");
                crate::metrics::request(crate::metrics::Outcome::Unavailable);
                return Ok(Reply::problem(
                    Problem::new(
                        ProblemKind::TransactionTimeout,
                        "The request took longer than allowed and was rolled back; nothing was done. Retry with the same Idempotency-Key.",
                    )
                    .retry_after(Duration::from_secs(1)),
                ));
            }
        };
        let (outcome, body) = match settlement(config, &head, handled) {
            Settlement::Keep(outcome, body) => (outcome, body),
            Settlement::Discard(body) => {
                rollback(open, bound).await;
                rolled_back(config, route, head.status());
                crate::metrics::request(crate::metrics::Outcome::Executed);
                return Ok(Reply::Handler(head, body));
            }
        };
        // Waiting for the handler to let go is bounded by `bound`, the two
        // statements after it by the store timeout.
        let commit = open.commit(outcome, config.ttl, bound);
        let limit = bound.saturating_add(config.store_timeout);
        match self.bounded_by(limit, store, commit).await {
            Ok(()) => {
                crate::metrics::request(crate::metrics::Outcome::Executed);
                Ok(Reply::Handler(head, body))
            }
            // Not committed (or, if the connection broke during COMMIT, not
            // known to be): the client must not see the handler's answer.
            // A retry replays what did commit, or runs again.
            Err(e) => Ok(self.transaction_failed(&e)),
        }
    }

    /// A store call bounded by the store timeout.
    async fn bounded<T>(
        &self,
        store: &dyn TransactionalStore,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.bounded_by(self.config().store_timeout, store, call)
            .await
    }

    async fn bounded_by<T>(
        &self,
        timeout: Duration,
        store: &dyn TransactionalStore,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(StoreError::Timeout {
                backend: store.backend(),
                timeout,
            }))
    }

    /// A record that was not acquired: a conflict, a mismatch or a replay.
    fn existing<H, S: Chunks>(
        &self,
        outcome: ClaimOutcome,
        fingerprint: &crate::Fingerprint,
    ) -> Reply<H, S> {
        match self.decided(outcome, fingerprint) {
            Decision::Replay(replay) => Reply::Answer(super::Answer::Replay(replay)),
            Decision::Reject(problem) => Reply::problem(problem),
            // Fail-open has no meaning here: the store is the handler's database.
            Decision::Unguarded | Decision::Execute(_) => Reply::problem(unavailable()),
        }
    }

    fn transaction_failed<H, S: Chunks>(&self, e: &StoreError) -> Reply<H, S> {
        tracing::error!(error = e as &dyn std::error::Error, cause = ?std::error::Error::source(e), decision = "rejected", "idempotency: the transaction failed; nothing was done (fail-closed)");
        crate::metrics::request(crate::metrics::Outcome::Unavailable);
        Reply::problem(unavailable())
    }
}

/// Says why a handled request was rolled back: a 5xx is the handler's own
/// failure (often its database's), which the operator must hear of; a
/// transient 4xx (408, 409, 425, 429) is the client's to retry.
fn rolled_back(config: &crate::IdempotencyConfig, route: &str, status: u16) {
    if !config.stores_status(status) && status >= 500 {
        tracing::warn!(
            status,
            route,
            "idempotency: the handler answered a server error; its transaction was rolled back (effect and record), and a retry runs it again"
        );
    } else if config.stores_status(status) {
        tracing::warn!(
            status,
            route,
            "idempotency: the handler's response body failed; its transaction was rolled back (effect and record), and a retry runs it again"
        );
    } else {
        tracing::debug!(
            status,
            route,
            "idempotency: the handler's answer is not stored; its transaction was rolled back"
        );
    }
}

async fn rollback(open: Box<dyn OpenTransaction>, bound: Duration) {
    // Bounded: past it the transaction is dropped, and the database rolls it
    // back all the same.
    let rollback = tokio::time::timeout(bound, open.rollback(bound));
    if let Ok(Err(e)) = rollback.await {
        // Dropped instead: the database rolls it back all the same.
        tracing::warn!(
            error = &e as &dyn std::error::Error,
            "idempotency: rollback failed"
        );
    }
}

fn unavailable() -> Problem {
    Problem::new(
        ProblemKind::StoreUnavailable,
        "The request was not processed because its idempotency could not be guaranteed right now. Retry with the same Idempotency-Key.",
    )
    .retry_after(Duration::from_secs(1))
}

/// The transactions of this process, for the duplicates that wait for one
/// (`wait_for_in_flight`): which records they hold, and who waits.
#[derive(Default)]
pub(super) struct Settled {
    waiters: crate::store::Waiters,
    held: std::sync::Mutex<std::collections::HashSet<crate::RecordId>>,
}

impl Settled {
    fn held(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<crate::RecordId>> {
        // Every change under this lock is one insert or remove.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn held_here(&self, id: &crate::RecordId) -> bool {
        self.held().contains(id)
    }

    /// Marks `id` held by a transaction of this process until the guard drops.
    fn hold<'a>(&'a self, id: &'a crate::RecordId) -> Holding<'a> {
        self.held().insert(*id);
        Holding { settled: self, id }
    }
}

/// A transaction of this process holds a record: when it ends, however it
/// ends (settled, rolled back, cancelled, a panic), its waiters are woken.
struct Holding<'a> {
    settled: &'a Settled,
    id: &'a crate::RecordId,
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.settled.held().remove(self.id);
        self.settled.waiters.wake(self.id);
    }
}
