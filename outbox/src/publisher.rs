//! What the relay hands a broker, and how a broker answers.

use std::future::Future;

use crate::event::Event;

/// An event claimed by a relay, on its way to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub(crate) seq: i64,
    pub(crate) attempt: u32,
    pub(crate) event: Event,
}

impl Outgoing {
    /// An outgoing event (for tests of a [`Publisher`]).
    pub fn new(seq: i64, attempt: u32, event: Event) -> Self {
        Self {
            seq,
            attempt,
            event,
        }
    }

    /// Its place in the enqueue order.
    pub fn seq(&self) -> i64 {
        self.seq
    }

    /// Which attempt this is, 1-based (failed attempts before it, plus one).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The event.
    pub fn event(&self) -> &Event {
        &self.event
    }
}

/// Why the broker did not confirm an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The broker cannot be reached or did not answer in time. Not counted
    /// as an attempt: the event waits, and the relay tries again after its
    /// outage delay.
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
    /// The broker refused this event (a nack, a returned message). Counted:
    /// retried with backoff, dead after the maximum attempts.
    #[error("the broker refused the event: {0}")]
    Rejected(String),
    /// The event can never be published (no route for its destination).
    /// Dead at once.
    #[error("the event cannot be published: {0}")]
    Permanent(String),
}

impl PublishError {
    /// [`PublishError::Unavailable`] with `reason`.
    pub fn unavailable(reason: impl std::fmt::Display) -> Self {
        Self::Unavailable(reason.to_string())
    }

    /// [`PublishError::Rejected`] with `reason`.
    pub fn rejected(reason: impl std::fmt::Display) -> Self {
        Self::Rejected(reason.to_string())
    }

    /// [`PublishError::Permanent`] with `reason`.
    pub fn permanent(reason: impl std::fmt::Display) -> Self {
        Self::Permanent(reason.to_string())
    }
}

/// Publishes a batch to a broker, **pipelined**: send every event, then wait
/// for every confirmation.
///
/// The answer has one entry per event, in the batch's order. `Ok` means the
/// broker has taken responsibility for the event (a publisher confirm, a
/// JetStream `PubAck`). The relay marks an event published only on `Ok`.
/// Events arrive in `seq` order; send them in that order, on one ordered
/// channel, so that events of one ordering key reach the broker in order.
/// A missing entry counts as [`PublishError::Unavailable`].
pub trait Publisher: Send + Sync {
    /// Publishes `batch`; see the trait's documentation.
    fn publish(
        &self,
        batch: &[Outgoing],
    ) -> impl Future<Output = Vec<Result<(), PublishError>>> + Send;
}

impl<P: Publisher + ?Sized> Publisher for std::sync::Arc<P> {
    fn publish(
        &self,
        batch: &[Outgoing],
    ) -> impl Future<Output = Vec<Result<(), PublishError>>> + Send {
        (**self).publish(batch)
    }
}
