//! The broker sources: a projection applied inside the transactional
//! inbox's transaction.

use std::sync::Arc;

use inbox_consumer::{
    DeadReason, Inbox, InboxConfig, InboxError, InboxMessage, Outcome, PostgresInbox,
};

use crate::event::Event;
use crate::projector::{Projector, Source};
use crate::tail::guarded;
use crate::{Projection, ProjectionError};

/// Records a message the inbox dead-lettered as parked (once).
const PARK: &str = "INSERT INTO projection.parked (name, version, event_id, attempts, reason) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING";

impl<P: Projection> Projector<P> {
    /// The inbox consumer name of this version: its schema,
    /// `<name>_v<version>`, so a new version (a new durable consumer from
    /// the stream's start) deduplicates apart from the old one.
    pub fn consumer(&self) -> &str {
        self.inner.version.schema()
    }

    /// Registers the version (broker source), then the transactional inbox
    /// it applies messages through: consumer [`consumer`](Self::consumer),
    /// the projector's `max_attempts` and retry delays.
    ///
    /// # Errors
    /// As [`register`](Self::register); [`ProjectionError::Inbox`].
    pub async fn inbox(&self) -> Result<PostgresInbox, ProjectionError> {
        self.expect_broker("inbox")?;
        self.registration().await?;
        let cfg = &self.inner.config;
        let config = InboxConfig::builder(self.consumer())
            .max_attempts(cfg.max_attempts)
            .retry_delay(cfg.retry_delay, cfg.max_retry_delay)
            .build()
            .map_err(|e| ProjectionError::Inbox(InboxError::Config(e)))?;
        Inbox::postgres(self.inner.pool.clone(), config)
            .await
            .map_err(ProjectionError::Inbox)
    }

    /// Applies `message` through `inbox` (from [`inbox`](Self::inbox)):
    /// [`Projection::apply`] runs inside the transaction that records the
    /// message in the inbox, so a redelivered copy is a
    /// [`Outcome::Duplicate`] and is not applied again. A message the inbox
    /// dead-letters (after `max_attempts`, at once for a permanent error) is
    /// recorded as parked, with its reason. Settle the message with the
    /// outcome (`inbox_consumer::rabbitmq::settle`, `nats::settle`, or the
    /// adapters' `consume` loops).
    ///
    /// Order: the broker's, one message at a time (consume a queue or a
    /// JetStream consumer sequentially to keep it).
    pub async fn apply_message(&self, inbox: &PostgresInbox, message: &InboxMessage) -> Outcome {
        if let Err(e) = self.registration().await {
            return self.unregistered(&e);
        }
        let inner = Arc::clone(&self.inner);
        let outcome = inbox
            .process(message, move |tx, m| {
                Box::pin(async move {
                    let event = Event::from_message(m);
                    guarded(inner.projection.apply(tx, &inner.version, &event)).await
                })
            })
            .await;
        self.count(message, &outcome).await;
        outcome
    }

    /// [`apply_message`](Self::apply_message) for a batch of messages
    /// (from `inbox_consumer::rabbitmq::Subscription::batch` or
    /// `nats::Subscription::batch` and their `run_batch`): every new message
    /// is applied in turn inside **one** transaction, which also records
    /// them all in the inbox, committed once
    /// ([`Inbox::process_each`](inbox_consumer::Inbox::process_each)).
    /// Returns one outcome per message, in order; ack after this returns.
    ///
    /// - A redelivered copy, or an id twice in the batch, is a
    ///   [`Outcome::Duplicate`] and is not applied again.
    /// - An event whose apply fails does not hold the batch back: the batch
    ///   is rolled back and its messages applied one at a time, so only the
    ///   failing one counts an attempt (and is parked after the last).
    /// - Order: the batch's, which is the broker's.
    pub async fn apply_batch(
        &self,
        inbox: &PostgresInbox,
        messages: &[InboxMessage],
    ) -> Vec<Outcome> {
        if let Err(e) = self.registration().await {
            return messages.iter().map(|_| self.unregistered(&e)).collect();
        }
        let inner = Arc::clone(&self.inner);
        let outcomes = inbox
            .process_each(messages, move |tx, m| {
                let inner = Arc::clone(&inner);
                Box::pin(async move {
                    let event = Event::from_message(m);
                    guarded(inner.projection.apply(tx, &inner.version, &event)).await
                })
            })
            .await;
        for (message, outcome) in messages.iter().zip(&outcomes) {
            self.count(message, outcome).await;
        }
        outcomes
    }

    /// The outcome of a message while the version cannot be registered
    /// (the database is down, say): nothing decided.
    fn unregistered(&self, e: &ProjectionError) -> Outcome {
        self.inner.counters.database_error();
        Outcome::Unavailable {
            error: InboxError::Database(sqlx::Error::Configuration(e.to_string().into())),
            retry_after: self.inner.config.outage_delay,
        }
    }

    /// Counts a message's outcome; parks it when the inbox dead-lettered it.
    async fn count(&self, message: &InboxMessage, outcome: &Outcome) {
        let counters = &self.inner.counters;
        match outcome {
            Outcome::Processed { .. } => counters.applied(1),
            Outcome::Failed { .. } => counters.failure(),
            Outcome::Dead { reason } => self.park(message, reason).await,
            _ => {}
        }
    }

    /// Records a dead-lettered message in `projection.parked`.
    async fn park(&self, message: &InboxMessage, reason: &DeadReason) {
        let attempts = match reason {
            DeadReason::AlreadyDead => return,
            DeadReason::MaxAttempts { attempts, .. } => *attempts,
            DeadReason::Rejected { attempt, .. } => *attempt,
            _ => 0,
        };
        if attempts > 0 {
            self.inner.counters.failure();
        }
        let version = &self.inner.version;
        let parked = sqlx::query(PARK)
            .bind(version.name())
            .bind(i32::try_from(version.number()).unwrap_or(i32::MAX))
            .bind(message.id().unwrap_or("(no id)"))
            .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
            .bind(reason.to_string())
            .execute(&self.inner.pool)
            .await;
        match parked {
            Ok(done) => {
                self.inner.counters.parked(done.rows_affected());
                tracing::warn!(projection = %version, message = ?message.id(), %reason,
                    "projection: message parked");
            }
            Err(e) => {
                // The inbox keeps its dead mark; the parked row is what is lost.
                self.inner.counters.database_error();
                tracing::error!(projection = %version, message = ?message.id(), %reason, error = %e,
                    "projection: could not record a parked message");
            }
        }
    }

    fn expect_broker(&self, method: &'static str) -> Result<(), ProjectionError> {
        if self.inner.source == Source::Inbox {
            Ok(())
        } else {
            Err(ProjectionError::WrongSource {
                method,
                expected: Source::Inbox,
            })
        }
    }
}
