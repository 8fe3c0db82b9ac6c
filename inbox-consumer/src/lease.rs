//! Lease mode: dedup over any [`idempotency_core::Store`] (memory, Redis, …)
//! when the effect does not live in a database the inbox can share a
//! transaction with.
//!
//! Per delivery: `claim` the record `(consumer, message id)` with a lease; run
//! the handler while a heartbeat extends the lease every half lease; then
//! `complete` it with the retention as its TTL. A failure `release`s the claim
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

use bytes::Bytes;
use idempotency_core::{
    BoxFuture, ClaimOutcome, ClaimRequest, Fingerprint, LeaseToken, RecordId, Store, StoredOutcome,
    StoredResponse, TokenOutcome,
};

use crate::error::InboxError;
use crate::inbox::{run_guarded, Inbox};
use crate::message::InboxMessage;
use crate::outcome::{DeadReason, HandlerError, Outcome};

const DONE: u16 = 200;
const DEAD: u16 = 410;
const FAILURE: u16 = 500;
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(1);

/// Lease mode over the store `S`.
#[derive(Debug, Clone)]
pub struct Lease<S> {
    store: S,
}

fn marker(status: u16) -> Arc<StoredOutcome> {
    Arc::new(StoredOutcome::Response(StoredResponse {
        status,
        headers: Vec::new(),
        body: Bytes::new(),
    }))
}

fn status_of(outcome: &StoredOutcome) -> Option<u16> {
    match outcome {
        StoredOutcome::Response(r) => Some(r.status),
        _ => None,
    }
}

// Every claim of one message must carry the same fingerprint, so that a
// redelivery can take over a crashed holder's lease.
const FINGERPRINT: Fingerprint = Fingerprint::from_bytes([0; 32]);

impl<S: Store> Inbox<Lease<S>> {
    /// An inbox in lease mode over `store`.
    pub fn lease(store: S, config: crate::InboxConfig) -> Self {
        Self::from_parts(Lease { store }, config)
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

    fn claim_request<'a>(&self, id: &'a RecordId, token: LeaseToken) -> ClaimRequest<'a> {
        ClaimRequest {
            id,
            fingerprint: &FINGERPRINT,
            token,
            lease: self.config().lease(),
            ttl: self.config().retention(),
        }
    }

    async fn process_keyed<F>(
        &self,
        key: &str,
        message: &InboxMessage,
        handler: F,
    ) -> Result<Outcome, idempotency_core::StoreError>
    where
        F: for<'t> FnOnce(&'t InboxMessage) -> BoxFuture<'t, Result<(), HandlerError>>,
    {
        let store = &self.backend.store;
        let id = self.record_id(key);
        let token = match store
            .claim(self.claim_request(&id, LeaseToken::random()))
            .await?
        {
            ClaimOutcome::Acquired(token) => token,
            ClaimOutcome::Completed { outcome, .. } => {
                return Ok(if status_of(&outcome) == Some(DEAD) {
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
                return Err(idempotency_core::StoreError::Corrupt(format!(
                    "unexpected claim outcome {other:?}"
                )))
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
            self.complete(&id, token, DEAD, key).await?;
            return Ok(Outcome::Dead {
                reason: DeadReason::AlreadyDead,
            });
        }
        let attempt = failures + 1;
        match self
            .run_with_heartbeat(&id, token, key, handler(message))
            .await
        {
            Ok(()) => {
                if let Err(e) = self.complete(&id, token, DONE, key).await {
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
                    self.complete(&id, token, DEAD, key).await?;
                } else {
                    self.release_quietly(&id, token, key).await;
                }
                Ok(outcome)
            }
        }
    }

    async fn run_with_heartbeat(
        &self,
        id: &RecordId,
        token: LeaseToken,
        key: &str,
        handler: BoxFuture<'_, Result<(), HandlerError>>,
    ) -> Result<(), HandlerError> {
        let lease = self.config().lease();
        let run = run_guarded(handler);
        tokio::pin!(run);
        // The first beat after half a lease (an immediate first tick would cost a
        // trip through the timer on every message).
        let half = lease / 2;
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + half, half);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lost = false;
        loop {
            tokio::select! {
                result = &mut run => return result,
                _ = beat.tick(), if !lost => {
                    match self.backend.store.extend(id, token, lease).await {
                        Ok(TokenOutcome::Applied) => {}
                        Ok(TokenOutcome::Fenced) => {
                            lost = true;
                            self.shared.counters.lease_lost();
                            tracing::warn!(consumer = self.consumer(), message_id = key,
                                "inbox: lease taken over while the handler ran; its effect may run twice");
                        }
                        Err(e) => tracing::warn!(consumer = self.consumer(), message_id = key,
                            error = %e, "inbox: could not extend the lease"),
                    }
                }
            }
        }
    }

    async fn complete(
        &self,
        id: &RecordId,
        token: LeaseToken,
        status: u16,
        key: &str,
    ) -> Result<(), idempotency_core::StoreError> {
        let done = self
            .backend
            .store
            .complete(id, token, marker(status), self.config().retention())
            .await?;
        if done == TokenOutcome::Fenced {
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
        if let Err(e) = self.backend.store.release(id, token).await {
            // The claim lapses after its lease; the next delivery waits for that.
            tracing::warn!(consumer = self.consumer(), message_id = key, error = %e,
                "inbox: could not release the claim");
        }
    }

    /// Failed attempts recorded for `key`: the first `k` whose record is absent, minus one.
    async fn count_failures(&self, key: &str) -> Result<u32, idempotency_core::StoreError> {
        let store = &self.backend.store;
        for k in 1..=self.config().max_attempts() {
            let fid = self.failure_id(key, k);
            match store
                .claim(self.claim_request(&fid, LeaseToken::random()))
                .await?
            {
                ClaimOutcome::Acquired(probe) => {
                    let _ = store.release(&fid, probe).await?;
                    return Ok(k - 1);
                }
                ClaimOutcome::InFlight { .. } => return Ok(k - 1),
                _ => {}
            }
        }
        Ok(self.config().max_attempts())
    }

    /// Records a failure, starting at attempt `from`; returns its number.
    async fn record_failure(
        &self,
        key: &str,
        from: u32,
    ) -> Result<u32, idempotency_core::StoreError> {
        let store = &self.backend.store;
        let max = self.config().max_attempts();
        for k in from.max(1)..=max {
            let fid = self.failure_id(key, k);
            if let ClaimOutcome::Acquired(t) = store
                .claim(self.claim_request(&fid, LeaseToken::random()))
                .await?
            {
                let _ = store
                    .complete(&fid, t, marker(FAILURE), self.config().retention())
                    .await?;
                return Ok(k);
            }
        }
        Ok(max)
    }
}
