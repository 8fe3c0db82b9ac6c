//! What became of one delivery, and what the broker should be told.

use std::fmt;
use std::time::Duration;

use crate::error::InboxError;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Whether a handler's failure may succeed on a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureKind {
    /// Retry later (a timeout, a lock, a service down). Counted; the message is
    /// redelivered until `max_attempts`, then dead-lettered.
    Transient,
    /// Retrying cannot help (the payload does not decode, a business rule
    /// rejects it). Counted, then dead-lettered at once.
    Permanent,
}

/// A handler's failure: its kind and its cause.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?} handler failure: {source}")]
pub struct HandlerError {
    kind: FailureKind,
    #[source]
    source: BoxError,
}

impl HandlerError {
    /// A failure a retry may cure.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self {
            kind: FailureKind::Transient,
            source: source.into(),
        }
    }

    /// A failure no retry can cure (an undecodable payload): dead-lettered
    /// after it is counted.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self {
            kind: FailureKind::Permanent,
            source: source.into(),
        }
    }

    /// Its kind.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }
}

#[cfg(any(feature = "postgres", feature = "sqlite"))]
impl From<sqlx::Error> for HandlerError {
    /// A database error inside the handler is transient: the transaction
    /// rolled back and a retry may succeed.
    fn from(e: sqlx::Error) -> Self {
        Self::transient(e)
    }
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadReason {
    /// The message has no id and no key extractor is configured (or it found
    /// no key), so it cannot be deduplicated.
    MissingId,
    /// The id is longer than [`MAX_ID_LEN`](crate::config::MAX_ID_LEN) bytes.
    IdTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The handler failed transiently `attempts` times, the maximum.
    MaxAttempts {
        /// Attempts counted.
        attempts: u32,
        /// The last failure, as text.
        last_error: String,
    },
    /// The handler failed permanently (e.g. an undecodable payload).
    Rejected {
        /// The attempt that failed.
        attempt: u32,
        /// The failure, as text.
        error: String,
    },
    /// A redelivery of a message dead-lettered before; the handler was not run.
    AlreadyDead,
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadReason::MissingId => f.write_str(
                "the message has no id (and no key extractor found a key), so it cannot be deduplicated",
            ),
            DeadReason::IdTooLong { len } => write!(
                f,
                "the message id is {len} bytes, longer than {}",
                crate::config::MAX_ID_LEN
            ),
            DeadReason::MaxAttempts {
                attempts,
                last_error,
            } => write!(f, "failed {attempts} attempts, the maximum; last: {last_error}"),
            DeadReason::Rejected { attempt, error } => {
                write!(f, "permanent failure at attempt {attempt}: {error}")
            }
            DeadReason::AlreadyDead => f.write_str("the message was dead-lettered before"),
        }
    }
}

/// What became of one delivery.
#[derive(Debug)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler ran and its effect committed (transactional mode), or it
    /// completed and was marked done (lease mode). Ack.
    Processed {
        /// Which attempt succeeded (1 for the first). Exact in transactional
        /// mode; in lease mode exact when the broker flags redeliveries.
        attempt: u32,
    },
    /// The message was processed before: the handler did not run. Ack.
    Duplicate,
    /// Another consumer holds its lease now (lease mode only; transactional
    /// mode waits on the row lock instead). Requeue after `retry_after`.
    InFlightElsewhere {
        /// When the holder's lease runs out.
        retry_after: Duration,
    },
    /// The handler failed transiently; this was attempt `attempt` of
    /// `max_attempts`. Requeue after `retry_after`.
    Failed {
        /// The attempt that failed (1-based, counted in the inbox's store).
        attempt: u32,
        /// The handler's error.
        error: HandlerError,
        /// The suggested redelivery delay.
        retry_after: Duration,
    },
    /// The inbox's own database or store failed, so nothing was decided and
    /// no attempt was counted. Requeue after `retry_after`.
    Unavailable {
        /// The error.
        error: InboxError,
        /// The suggested redelivery delay.
        retry_after: Duration,
    },
    /// The message will never be processed: dead-letter it (AMQP reject
    /// without requeue, JetStream term).
    Dead {
        /// Why.
        reason: DeadReason,
    },
}

/// What an adapter tells the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disposition {
    /// Acknowledge: done (processed now or before).
    Ack,
    /// Redeliver, ideally after `delay`.
    Requeue {
        /// The suggested delay.
        delay: Duration,
    },
    /// Never redeliver: dead-letter it.
    DeadLetter,
}

impl Outcome {
    /// What the broker should be told.
    pub fn disposition(&self) -> Disposition {
        match self {
            Outcome::Processed { .. } | Outcome::Duplicate => Disposition::Ack,
            Outcome::InFlightElsewhere { retry_after }
            | Outcome::Failed { retry_after, .. }
            | Outcome::Unavailable { retry_after, .. } => Disposition::Requeue {
                delay: *retry_after,
            },
            Outcome::Dead { .. } => Disposition::DeadLetter,
        }
    }

    /// A short lowercase name for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Processed { .. } => "processed",
            Outcome::Duplicate => "duplicate",
            Outcome::InFlightElsewhere { .. } => "in_flight_elsewhere",
            Outcome::Failed { .. } => "failed",
            Outcome::Unavailable { .. } => "unavailable",
            Outcome::Dead { .. } => "dead",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispositions() {
        assert_eq!(
            Outcome::Processed { attempt: 1 }.disposition(),
            Disposition::Ack
        );
        assert_eq!(Outcome::Duplicate.disposition(), Disposition::Ack);
        let d = Duration::from_millis(5);
        assert_eq!(
            Outcome::InFlightElsewhere { retry_after: d }.disposition(),
            Disposition::Requeue { delay: d }
        );
        assert_eq!(
            Outcome::Failed {
                attempt: 1,
                error: HandlerError::transient("x"),
                retry_after: d
            }
            .disposition(),
            Disposition::Requeue { delay: d }
        );
        assert_eq!(
            Outcome::Dead {
                reason: DeadReason::MissingId
            }
            .disposition(),
            Disposition::DeadLetter
        );
    }

    #[test]
    fn handler_error_keeps_its_source() {
        use std::error::Error as _;
        let e = HandlerError::permanent(std::io::Error::other("bad json"));
        assert_eq!(e.kind(), FailureKind::Permanent);
        assert_eq!(e.source().unwrap().to_string(), "bad json");
    }

    #[test]
    fn dead_reasons_say_why() {
        assert!(DeadReason::MissingId.to_string().contains("no id"));
        assert!(DeadReason::MaxAttempts {
            attempts: 5,
            last_error: "boom".into()
        }
        .to_string()
        .contains("5 attempts"));
    }
}
