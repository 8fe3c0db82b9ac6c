//! Lease mode: dedup over any [`idempotency_core::Store`] (memory, Redis, …)
//! when the effect does not live in a database the inbox can share a
//! transaction with.
//!
//! Per delivery: `claim` the record `(consumer, message id)` with a lease; run
//! the handler while a heartbeat extends the lease every half lease; then
//! `complete` it with the retention as its TTL. Every store call goes through
//! [`idempotency_core::Guarded`], the same guard the HTTP engine uses: it
//! bounds each call by the store timeout (a store that hangs gives
//! [`Outcome::Unavailable`]) and runs the heartbeat. A failure `release`s the claim
//! (or completes it as dead). Failures are counted in separate records
//! `(consumer, message id, k)`, one per failed attempt, so the count needs no
//! operation the store trait does not have.
//!
//! This is **at-least-once with deduplication**, not exactly-once: the effect
//! and the mark are two writes in two systems. A crash after the effect and
//! before `complete` leaves a claim that the next delivery takes over once
//! the lease passes, and the effect runs again. Make the effect idempotent
//! itself, or use transactional mode.

use std::sync::Arc;
use std::time::Duration;

use idempotency_core::{
    BoxFuture, ClaimOutcome, Fingerprint, LeaseToken, RecordId, Store, StoreError, StoredOutcome,
    TokenOutcome,
};
use idempotency_core::{Claim, Guarded, Held};

use crate::error::InboxError;
use crate::inbox::{in_span, run_guarded, Inbox};
use crate::message::InboxMessage;
use crate::outcome::{DeadReason, HandlerError, Outcome};

/// The mark of a processed message.
const DONE: StoredOutcome = StoredOutcome::Mark(1);
/// The mark of a dead message.
const DEAD: StoredOutcome = StoredOutcome::Mark(2);
/// The mark of one failed attempt (in a failure record).
const FAILED: StoredOutcome = StoredOutcome::Mark(3);
/// The status an earlier version stored (as an HTTP response) for a dead message.
const LEGACY_DEAD_STATUS: u16 = 410;
/// The fingerprint an earlier version claimed every record with.
const LEGACY_FINGERPRINT: Fingerprint = Fingerprint::from_bytes([0; 32]);
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(1);

/// Lease mode over the store `S`: every store call goes through a
/// [`Guarded`] (bounded by [`InboxConfig::store_timeout`](crate::InboxConfig::store_timeout)),
/// which also keeps the claim alive while the handler runs.
pub struct Lease<S> {
    store: Arc<S>,
    // The same store, shared with `store`.
    guarded: Guarded,
}

impl<S> Clone for Lease<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            guarded: self.guarded.clone(),
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for Lease<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("store", &self.store)
            .field("timeout", &self.guarded.timeout())
            .finish()
    }
}

/// Whether a completed record marks the message dead. Records written by
/// this version carry [`DEAD`]. An earlier version stored HTTP responses as
/// marks (200 done, 410 dead, 500 failed) and such records may still be in a
/// store within their retention: a stored response with status 410 still
/// reads as dead, and any other completed record as done (a duplicate).
fn is_dead(outcome: &StoredOutcome) -> bool {
    match outcome {
        StoredOutcome::Mark(_) => *outcome == DEAD,
        StoredOutcome::Response(r) => r.status == LEGACY_DEAD_STATUS,
        _ => false,
    }
}

/// The fingerprint a record is claimed with: the record id's own bytes. It
/// is the same for every claim of one message, which a redelivery needs to
/// take over a crashed holder's lease.
fn fingerprint_of(id: &RecordId) -> Fingerprint {
    Fingerprint::from_bytes(*id.as_bytes())
}

impl<S: Store> Inbox<Lease<S>> {
    /// An inbox in lease mode over `store`. Each store call is bounded by the
    /// config's [`store_timeout`](crate::InboxConfig::store_timeout).
    pub fn lease(store: S, config: crate::InboxConfig) -> Self {
        let store = Arc::new(store);
        let guarded = Guarded::new(store.clone(), config.store_timeout());
        Self::from_parts(Lease { store, guarded }, config)
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.backend.store
    }

    /// Runs `handler` once per message id, unless it was processed before,
    /// is held by another consumer's lease, or is dead. Ack the message only
    /// after [`Outcome::Processed`] or [`Outcome::Duplicate`] (see
    /// [`Outcome::disposition`]).
    ///
    /// Like a spawned task, the handler's future may borrow only the message:
    /// move clones of anything else into it.
    pub async fn process<F>(&self, message: &InboxMessage, handler: F) -> Outcome
    where
        F: for<'t> FnOnce(&'t InboxMessage) -> BoxFuture<'t, Result<(), HandlerError>>,
    {
        let key = match self.key_of(message) {
            Ok(key) => key,
            Err(reason) => return self.finish(None, Outcome::Dead { reason }),
        };
        let outcome = match self.process_keyed(&key, message, handler).await {
            Ok(outcome) => outcome,
            Err(error) => Outcome::Unavailable {
                error: InboxError::Store(error),
                retry_after: UNAVAILABLE_RETRY,
            },
        };
        self.finish(Some(&key), outcome)
    }

    fn record_id(&self, key: &str) -> RecordId {
        RecordId::from_parts(self.consumer().as_bytes(), key.as_bytes())
    }

    /// The record of failed attempt `k`. Its scope starts with 0xff, which no
    /// UTF-8 consumer name does, so it never meets a message's record.
    fn failure_id(&self, key: &str, k: u32) -> RecordId {
        let consumer = self.consumer().as_bytes();
        let mut scope = Vec::with_capacity(consumer.len() + 24);
        scope.extend_from_slice(b"\xffinbox-failure");
        scope.extend_from_slice(&(consumer.len() as u64).to_be_bytes());
        scope.extend_from_slice(consumer);
        scope.extend_from_slice(&k.to_be_bytes());
        RecordId::from_parts(&scope, key.as_bytes())
    }

    /// Claims `id` with a fresh token, through the guard.
    async fn claim(&self, id: &RecordId) -> Result<ClaimOutcome, StoreError> {
        let fingerprint = fingerprint_of(id);
        let claim = Claim {
            fingerprint: &fingerprint,
            lease: self.config().lease(),
            ttl: self.config().retention(),
        };
        let outcome = self
            .backend
            .guarded
            .claim(id, LeaseToken::random(), claim)
            .await?;
        match outcome {
            // A claim an earlier version made (with the all-zero fingerprint)
            // and left in flight when its holder died: once its lease has
            // passed, take it over with that fingerprint, as that version would.
            ClaimOutcome::InFlight {
                fingerprint,
                lease_remaining,
            } if fingerprint == LEGACY_FINGERPRINT && lease_remaining.is_zero() => {
                let legacy = Claim {
                    fingerprint: &LEGACY_FINGERPRINT,
                    ..claim
                };
                self.backend
                    .guarded
                    .claim(id, LeaseToken::random(), legacy)
                    .await
            }
            outcome => Ok(outcome),
        }
    }

    async fn process_keyed<F>(
        &self,
        key: &str,
        message: &InboxMessage,
        handler: F,
    ) -> Result<Outcome, StoreError>
    where
        F: for<'t> FnOnce(&'t InboxMessage) -> BoxFuture<'t, Result<(), HandlerError>>,
    {
        let id = self.record_id(key);
        let token = match self.claim(&id).await? {
            ClaimOutcome::Acquired(token) => token,
            ClaimOutcome::Completed { outcome, .. } => {
                return Ok(if is_dead(&outcome) {
                    Outcome::Dead {
                        reason: DeadReason::AlreadyDead,
                    }
                } else {
                    Outcome::Duplicate
                });
            }
            ClaimOutcome::InFlight {
                lease_remaining, ..
            } => {
                return Ok(Outcome::InFlightElsewhere {
                    retry_after: lease_remaining,
                })
            }
            other => {
                return Err(StoreError::corrupt(
                    self.backend.guarded.backend(),
                    format!("unexpected claim outcome {other:?}"),
                ))
            }
        };
        let max = self.config().max_attempts();
        // Only a redelivery can have failed before; first deliveries skip the probe.
        let failures = if message.is_redelivered() {
            match self.count_failures(key).await {
                Ok(n) => n,
                Err(e) => {
                    self.release_quietly(&id, token, key).await;
                    return Err(e);
                }
            }
        } else {
            0
        };
        if failures >= max {
            self.complete(&id, token, &DEAD, key, Held::Kept).await?;
            return Ok(Outcome::Dead {
                reason: DeadReason::AlreadyDead,
            });
        }
        let attempt = failures + 1;
        let (result, held) = self
            .run_with_heartbeat(&id, token, key, message, handler(message))
            .await;
        match result {
            Ok(()) => {
                if let Err(e) = self.complete(&id, token, &DONE, key, held).await {
                    // The effect happened: ack it rather than run it again on
                    // a redelivery. The claim lapses after its lease.
                    tracing::error!(consumer = self.consumer(), message_id = key, error = %e,
                        "inbox: the effect ran but could not be marked done");
                }
                Ok(Outcome::Processed { attempt })
            }
            Err(error) => {
                let counted = match self.record_failure(key, attempt).await {
                    Ok(n) => n,
                    Err(e) => {
                        self.release_quietly(&id, token, key).await;
                        return Err(e);
                    }
                };
                let outcome = self.failure_outcome(counted, error);
                if matches!(outcome, Outcome::Dead { .. }) {
                    self.complete(&id, token, &DEAD, key, held).await?;
                } else {
                    self.release_quietly(&id, token, key).await;
                }
                Ok(outcome)
            }
        }
    }

    /// Runs the handler while the guard extends its lease every half lease;
    /// counts and logs a lease taken over meanwhile.
    async fn run_with_heartbeat(
        &self,
        id: &RecordId,
        token: LeaseToken,
        key: &str,
        message: &InboxMessage,
        handler: BoxFuture<'_, Result<(), HandlerError>>,
    ) -> (Result<(), HandlerError>, Held) {
        let lease = self.config().lease();
        let handler = in_span(self.consumer(), key, message, handler);
        let (result, held) = self
            .backend
            .guarded
            .hold(id, token, lease, run_guarded(handler))
            .await;
        if held == Held::Lost {
            self.shared.counters.lease_lost();
            tracing::warn!(
                consumer = self.consumer(),
                message_id = key,
                "inbox: lease taken over while the handler ran; its effect may run twice"
            );
        }
        (result, held)
    }

    /// Marks the claim of `token` on `id`. A fenced mark is counted as a lost
    /// lease, unless the heartbeat already counted it (`held` is `Lost`).
    async fn complete(
        &self,
        id: &RecordId,
        token: LeaseToken,
        mark: &StoredOutcome,
        key: &str,
        held: Held,
    ) -> Result<(), StoreError> {
        let done = self
            .backend
            .guarded
            .complete(id, token, mark, self.config().retention())
            .await?;
        if done == TokenOutcome::Fenced && held == Held::Kept {
            self.shared.counters.lease_lost();
            tracing::warn!(
                consumer = self.consumer(),
                message_id = key,
                "inbox: lease was taken over before completion"
            );
        }
        Ok(())
    }

    async fn release_quietly(&self, id: &RecordId, token: LeaseToken, key: &str) {
        if let Err(e) = self.backend.guarded.release(id, token).await {
            // The claim lapses after its lease; the next delivery waits for that.
            tracing::warn!(consumer = self.consumer(), message_id = key, error = %e,
                "inbox: could not release the claim");
        }
    }

    /// Failed attempts recorded for `key`: the first `k` whose record is absent, minus one.
    async fn count_failures(&self, key: &str) -> Result<u32, StoreError> {
        for k in 1..=self.config().max_attempts() {
            let fid = self.failure_id(key, k);
            match self.claim(&fid).await? {
                ClaimOutcome::Acquired(probe) => {
                    let _ = self.backend.guarded.release(&fid, probe).await?;
                    return Ok(k - 1);
                }
                ClaimOutcome::InFlight { .. } => return Ok(k - 1),
                _ => {}
            }
        }
        Ok(self.config().max_attempts())
    }

    /// Records a failure, starting at attempt `from`; returns its number.
    async fn record_failure(&self, key: &str, from: u32) -> Result<u32, StoreError> {
        let max = self.config().max_attempts();
        for k in from.max(1)..=max {
            let fid = self.failure_id(key, k);
            if let ClaimOutcome::Acquired(t) = self.claim(&fid).await? {
                let _ = self
                    .backend
                    .guarded
                    .complete(&fid, t, &FAILED, self.config().retention())
                    .await?;
                return Ok(k);
            }
        }
        Ok(max)
    }
}
