//! The parts of an inbox every mode shares: config, key resolution, counters
//! and the log line of each outcome.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;

use crate::config::{InboxConfig, MAX_ID_LEN};
use crate::message::InboxMessage;
use crate::metrics::{Counters, InboxMetrics};
use crate::outcome::{DeadReason, HandlerError, Outcome};

/// Dedupes broker messages by `(consumer name, message id)` before the
/// business handler runs. `B` is the mode: `PostgresTransactional`,
/// `SqliteTransactional` (transactional) or [`Lease`](crate::Lease).
///
/// Clones share the config, the counters and the backend's pool or store.
pub struct Inbox<B> {
    pub(crate) backend: B,
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) config: InboxConfig,
    pub(crate) counters: Counters,
}

impl<B: Clone> Clone for Inbox<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for Inbox<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbox")
            .field("backend", &self.backend)
            .field("config", &self.shared.config)
            .field("metrics", &self.metrics())
            .finish()
    }
}

impl<B> Inbox<B> {
    pub(crate) fn from_parts(backend: B, config: InboxConfig) -> Self {
        let counters = Counters::new(&config.consumer);
        Self {
            backend,
            shared: Arc::new(Shared { config, counters }),
        }
    }

    /// The config.
    pub fn config(&self) -> &InboxConfig {
        &self.shared.config
    }

    /// The consumer name (the scope of message ids).
    pub fn consumer(&self) -> &str {
        &self.shared.config.consumer
    }

    /// Counts of outcomes since this inbox was created.
    pub fn metrics(&self) -> InboxMetrics {
        self.shared.counters.snapshot()
    }

    /// The key a message is deduplicated by: its id, else what the key
    /// extractor finds, else it is dead.
    pub(crate) fn key_of(&self, message: &InboxMessage) -> Result<String, DeadReason> {
        let key = match message.id() {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => self
                .shared
                .config
                .extract_key(message)
                .filter(|k| !k.is_empty())
                .ok_or(DeadReason::MissingId)?,
        };
        if key.len() > MAX_ID_LEN {
            return Err(DeadReason::IdTooLong { len: key.len() });
        }
        Ok(key)
    }

    /// Counts the outcome and logs it.
    pub(crate) fn finish(&self, key: Option<&str>, outcome: Outcome) -> Outcome {
        self.shared.counters.record(&outcome);
        let consumer = self.consumer();
        let id = key.unwrap_or("<none>");
        match &outcome {
            Outcome::Processed { attempt } => {
                tracing::debug!(consumer, message_id = id, attempt, "inbox: processed");
            }
            Outcome::Duplicate => {
                tracing::debug!(consumer, message_id = id, "inbox: duplicate, skipped");
            }
            Outcome::InFlightElsewhere { retry_after } => tracing::debug!(
                consumer,
                message_id = id,
                ?retry_after,
                "inbox: in flight elsewhere"
            ),
            Outcome::Failed { attempt, error, .. } => tracing::warn!(
                consumer,
                message_id = id,
                attempt,
                error = %error,
                "inbox: handler failed, will retry"
            ),
            Outcome::Unavailable { error, .. } => tracing::error!(
                consumer,
                message_id = id,
                error = %error,
                cause = ?std::error::Error::source(error),
                "inbox: its own store failed, message requeued"
            ),
            Outcome::Dead { reason } => tracing::error!(
                consumer,
                message_id = id,
                %reason,
                "inbox: message dead-lettered"
            ),
        }
        outcome
    }

    /// The outcome of a failed attempt `attempt`: dead when the failure is
    /// permanent or the attempts are used up, else failed (requeue).
    pub(crate) fn failure_outcome(&self, attempt: u32, error: HandlerError) -> Outcome {
        use crate::outcome::FailureKind;
        if error.kind() == FailureKind::Permanent {
            Outcome::Dead {
                reason: DeadReason::Rejected {
                    attempt,
                    error: error.to_string(),
                },
            }
        } else if attempt >= self.shared.config.max_attempts {
            Outcome::Dead {
                reason: DeadReason::MaxAttempts {
                    attempts: attempt,
                    last_error: error.to_string(),
                },
            }
        } else {
            Outcome::Failed {
                attempt,
                retry_after: self.shared.config.retry_after(attempt),
                error,
            }
        }
    }
}

/// Runs `handler` in the span `inbox.handle` that continues the trace of
/// `message` (feature `trace`); without the feature, it is `handler` itself.
#[cfg_attr(not(feature = "trace"), allow(unused_variables))]
pub(crate) fn in_span<F: Future>(
    consumer: &str,
    message_id: &str,
    message: &InboxMessage,
    handler: F,
) -> impl Future<Output = F::Output> {
    #[cfg(feature = "trace")]
    {
        tracing::Instrument::instrument(
            handler,
            crate::trace::handle_span(consumer, message_id, message),
        )
    }
    #[cfg(not(feature = "trace"))]
    {
        handler
    }
}

/// Runs a handler's future, turning a panic into a transient failure so that
/// it is counted like any other (a panicking poison message still dies).
pub(crate) async fn run_guarded<F>(handler: F) -> Result<(), HandlerError>
where
    F: Future<Output = Result<(), HandlerError>>,
{
    match AssertUnwindSafe(handler).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string payload".to_owned());
            Err(HandlerError::transient(format!(
                "the handler panicked: {what}"
            )))
        }
    }
}
