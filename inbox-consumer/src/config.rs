//! How an inbox dedupes, retries, dead-letters and forgets.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::message::InboxMessage;

/// The default number of attempts before a message is dead-lettered.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// The default time processed messages are remembered: 7 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The default lease of lease mode: 30 s.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// The default bound of each lease-mode store call: 2 s, as on the HTTP side.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(2);
/// The default number of rows one purge statement deletes.
pub const DEFAULT_PURGE_BATCH: u32 = 1000;
/// The longest message id or consumer name accepted, in bytes.
pub const MAX_ID_LEN: usize = 512;

type Extractor = Arc<dyn Fn(&InboxMessage) -> Option<String> + Send + Sync>;

/// An inbox's settings. Build it with [`InboxConfig::builder`].
#[derive(Clone)]
pub struct InboxConfig {
    pub(crate) consumer: String,
    pub(crate) max_attempts: u32,
    pub(crate) retention: Duration,
    pub(crate) lease: Duration,
    pub(crate) store_timeout: Duration,
    pub(crate) purge_batch: u32,
    pub(crate) retry_delay: Duration,
    pub(crate) max_retry_delay: Duration,
    pub(crate) key_extractor: Option<Extractor>,
}

impl fmt::Debug for InboxConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxConfig")
            .field("consumer", &self.consumer)
            .field("max_attempts", &self.max_attempts)
            .field("retention", &self.retention)
            .field("lease", &self.lease)
            .field("store_timeout", &self.store_timeout)
            .field("purge_batch", &self.purge_batch)
            .field("retry_delay", &self.retry_delay)
            .field("max_retry_delay", &self.max_retry_delay)
            .field("key_extractor", &self.key_extractor.is_some())
            .finish()
    }
}

impl InboxConfig {
    /// Starts a config for the consumer `consumer`: the name that scopes its
    /// message ids (two consumers of one message each run their effect once).
    pub fn builder(consumer: impl Into<String>) -> InboxConfigBuilder {
        InboxConfigBuilder {
            config: InboxConfig {
                consumer: consumer.into(),
                max_attempts: DEFAULT_MAX_ATTEMPTS,
                retention: DEFAULT_RETENTION,
                lease: DEFAULT_LEASE,
                store_timeout: DEFAULT_STORE_TIMEOUT,
                purge_batch: DEFAULT_PURGE_BATCH,
                retry_delay: Duration::from_secs(1),
                max_retry_delay: Duration::from_secs(60),
                key_extractor: None,
            },
        }
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Attempts before a message is dead-lettered.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// How long processed messages are remembered.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// The lease of lease mode.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The bound of each lease-mode store call.
    pub fn store_timeout(&self) -> Duration {
        self.store_timeout
    }

    /// The redelivery delay suggested after failed attempt `attempt` (1-based):
    /// `retry_delay * 2^(attempt-1)`, capped at `max_retry_delay`.
    pub fn retry_after(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.retry_delay
            .saturating_mul(factor)
            .min(self.max_retry_delay)
    }

    pub(crate) fn extract_key(&self, message: &InboxMessage) -> Option<String> {
        self.key_extractor.as_ref().and_then(|f| f(message))
    }
}

/// Builds an [`InboxConfig`]; [`build`](Self::build) checks it.
#[derive(Debug, Clone)]
#[must_use]
pub struct InboxConfigBuilder {
    config: InboxConfig,
}

impl InboxConfigBuilder {
    /// Attempts before a message is dead-lettered (default 5, at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.config.max_attempts = attempts;
        self
    }

    /// How long processed messages are remembered (default 7 days). It must
    /// be longer than the longest time the broker may redeliver a message.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.config.retention = retention;
        self
    }

    /// How long a lease-mode claim holds without a heartbeat (default 30 s).
    /// The running handler extends it every half lease.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease;
        self
    }

    /// How long one lease-mode store call (claim, complete, release, lease
    /// extension) may take before it fails with
    /// [`StoreError::Timeout`](idempotency_core::StoreError::Timeout)
    /// (default 2 s, at least 1 ns). A store that hangs then makes
    /// [`process`](crate::Inbox::process) answer
    /// [`Outcome::Unavailable`](crate::Outcome::Unavailable) within this
    /// time instead of waiting for ever. Keep it well below half the lease,
    /// so a slow heartbeat fails before the lease passes. Transactional mode
    /// does not use it: bound its database with the pool's own timeouts.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config.store_timeout = timeout;
        self
    }

    /// Rows one purge statement deletes (default 1000).
    pub fn purge_batch(mut self, rows: u32) -> Self {
        self.config.purge_batch = rows;
        self
    }

    /// The redelivery delay after the first failure, doubled after each
    /// further one up to `max` (defaults 1 s and 60 s). Adapters that can
    /// delay a redelivery (JetStream `nak`) use it.
    pub fn retry_delay(mut self, first: Duration, max: Duration) -> Self {
        self.config.retry_delay = first;
        self.config.max_retry_delay = max;
        self
    }

    /// Keys messages that carry no id by what `extract` returns (a business
    /// key from the payload or a header). Without an extractor, a message
    /// without an id is dead-lettered.
    pub fn key_extractor(
        mut self,
        extract: impl Fn(&InboxMessage) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.config.key_extractor = Some(Arc::new(extract));
        self
    }

    /// Checks and returns the config.
    ///
    /// # Errors
    /// [`ConfigError`] names the first setting that is out of range.
    pub fn build(self) -> Result<InboxConfig, ConfigError> {
        let c = self.config;
        if c.consumer.is_empty() || c.consumer.len() > MAX_ID_LEN {
            return Err(ConfigError::ConsumerName {
                len: c.consumer.len(),
            });
        }
        if c.max_attempts == 0 {
            return Err(ConfigError::ZeroMaxAttempts);
        }
        if c.lease < Duration::from_millis(10) {
            return Err(ConfigError::LeaseTooShort(c.lease));
        }
        if c.store_timeout.is_zero() {
            return Err(ConfigError::ZeroStoreTimeout);
        }
        if c.retention < Duration::from_secs(1) {
            return Err(ConfigError::RetentionTooShort(c.retention));
        }
        if c.purge_batch == 0 {
            return Err(ConfigError::ZeroPurgeBatch);
        }
        if c.retry_delay > c.max_retry_delay {
            return Err(ConfigError::RetryDelay {
                first: c.retry_delay,
                max: c.max_retry_delay,
            });
        }
        Ok(c)
    }
}

/// A setting out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The consumer name is empty or longer than [`MAX_ID_LEN`] bytes.
    #[error("the consumer name must be 1..={MAX_ID_LEN} bytes, got {len}")]
    ConsumerName {
        /// Its length in bytes.
        len: usize,
    },
    /// `max_attempts` is 0.
    #[error("max_attempts must be at least 1")]
    ZeroMaxAttempts,
    /// The lease is shorter than 10 ms.
    #[error("the lease must be at least 10ms, got {0:?}")]
    LeaseTooShort(Duration),
    /// The store timeout is zero.
    #[error("the store timeout must be longer than zero")]
    ZeroStoreTimeout,
    /// The retention is shorter than 1 s.
    #[error("the retention must be at least 1s, got {0:?}")]
    RetentionTooShort(Duration),
    /// The purge batch is 0.
    #[error("the purge batch must be at least 1 row")]
    ZeroPurgeBatch,
    /// The first retry delay is longer than the maximum.
    #[error("the first retry delay {first:?} is longer than the maximum {max:?}")]
    RetryDelay {
        /// The first delay.
        first: Duration,
        /// The maximum.
        max: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = InboxConfig::builder("ledger").build().unwrap();
        assert_eq!(c.max_attempts(), 5);
        assert_eq!(c.retention(), Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.lease(), Duration::from_secs(30));
        assert_eq!(c.store_timeout(), Duration::from_secs(2));
        assert_eq!(c.consumer(), "ledger");
    }

    #[test]
    fn out_of_range_settings_are_typed_errors() {
        let b = || InboxConfig::builder("c");
        assert_eq!(
            InboxConfig::builder("").build().unwrap_err(),
            ConfigError::ConsumerName { len: 0 }
        );
        assert!(matches!(
            InboxConfig::builder("x".repeat(MAX_ID_LEN + 1)).build(),
            Err(ConfigError::ConsumerName { .. })
        ));
        assert_eq!(
            b().max_attempts(0).build().unwrap_err(),
            ConfigError::ZeroMaxAttempts
        );
        assert!(matches!(
            b().lease(Duration::ZERO).build(),
            Err(ConfigError::LeaseTooShort(_))
        ));
        let zero = b().store_timeout(Duration::ZERO).build().unwrap_err();
        assert_eq!(zero, ConfigError::ZeroStoreTimeout);
        assert_eq!(
            zero.to_string(),
            "the store timeout must be longer than zero"
        );
        assert_eq!(
            b().store_timeout(Duration::from_nanos(1))
                .build()
                .unwrap()
                .store_timeout(),
            Duration::from_nanos(1)
        );
        assert!(matches!(
            b().retention(Duration::ZERO).build(),
            Err(ConfigError::RetentionTooShort(_))
        ));
        assert_eq!(
            b().purge_batch(0).build().unwrap_err(),
            ConfigError::ZeroPurgeBatch
        );
        assert!(matches!(
            b().retry_delay(Duration::from_secs(2), Duration::from_secs(1))
                .build(),
            Err(ConfigError::RetryDelay { .. })
        ));
    }

    #[test]
    fn retry_delay_doubles_up_to_the_cap() {
        let c = InboxConfig::builder("c")
            .retry_delay(Duration::from_millis(100), Duration::from_millis(350))
            .build()
            .unwrap();
        assert_eq!(c.retry_after(1), Duration::from_millis(100));
        assert_eq!(c.retry_after(2), Duration::from_millis(200));
        assert_eq!(c.retry_after(3), Duration::from_millis(350));
        assert_eq!(c.retry_after(u32::MAX), Duration::from_millis(350));
    }
}
