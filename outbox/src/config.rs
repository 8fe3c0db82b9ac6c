//! How a relay claims, retries, dead-letters, waits and forgets.

use std::time::Duration;

/// The default number of events one batch claims of each kind (keyed, keyless).
pub const DEFAULT_BATCH_SIZE: u32 = 100;
/// The default number of failed publishes before an event is dead.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// The default time published events are kept: 7 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The default number of rows one purge statement deletes.
pub const DEFAULT_PURGE_BATCH: u32 = 1000;

/// A relay's settings. Build it with [`RelayConfig::builder`].
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub(crate) batch_size: u32,
    pub(crate) max_per_key: u32,
    pub(crate) max_attempts: u32,
    pub(crate) retry_delay: Duration,
    pub(crate) max_retry_delay: Duration,
    pub(crate) outage_delay: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) publish_timeout: Duration,
    pub(crate) retention: Duration,
    pub(crate) purge_batch: u32,
    pub(crate) purge_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: DEFAULT_BATCH_SIZE,
            max_per_key: DEFAULT_BATCH_SIZE,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            retry_delay: Duration::from_secs(1),
            max_retry_delay: Duration::from_secs(300),
            outage_delay: Duration::from_secs(1),
            poll_interval: Duration::from_secs(1),
            publish_timeout: Duration::from_secs(30),
            retention: DEFAULT_RETENTION,
            purge_batch: DEFAULT_PURGE_BATCH,
            purge_interval: Duration::from_secs(60),
        }
    }
}

impl RelayConfig {
    /// Starts a config with the defaults.
    pub fn builder() -> RelayConfigBuilder {
        RelayConfigBuilder {
            config: Self::default(),
        }
    }

    /// Events one batch claims, of each kind (keyed, keyless).
    pub fn batch_size(&self) -> u32 {
        self.batch_size
    }

    /// Failed publishes before an event is dead.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// How long published events are kept.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// How long the relay sleeps when nothing woke it.
    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// The delay before retrying an event after its failed attempt `attempt`
    /// (1-based): `retry_delay * 2^(attempt-1)`, capped at the maximum.
    pub fn retry_after(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.retry_delay
            .saturating_mul(factor)
            .min(self.max_retry_delay)
    }
}

/// Builds a [`RelayConfig`]; [`build`](Self::build) checks it.
#[derive(Debug, Clone)]
#[must_use]
pub struct RelayConfigBuilder {
    config: RelayConfig,
}

impl RelayConfigBuilder {
    /// Events one batch claims of each kind, keyed and keyless (default 100,
    /// at least 1): a batch holds up to twice this.
    pub fn batch_size(mut self, events: u32) -> Self {
        self.config.batch_size = events;
        self
    }

    /// Events of one ordering key in one batch (default: the batch size, at
    /// least 1). A batch is published pipelined, so when an event fails, the
    /// later events of its key in the same batch may have reached the broker
    /// already; they are sent again after the failed one. With `1`, a key
    /// never has more than one event in flight and the broker sees each key
    /// in strict order even across failures, at one event per key per batch.
    pub fn max_per_key(mut self, events: u32) -> Self {
        self.config.max_per_key = events;
        self
    }

    /// Failed publishes before an event is dead (default 10, at least 1).
    /// Broker outages ([`PublishError::Unavailable`](crate::PublishError::Unavailable))
    /// are not counted.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.config.max_attempts = attempts;
        self
    }

    /// The delay before the retry of a failed event, doubled after each
    /// further failure up to `max` (defaults 1 s and 5 min).
    pub fn retry_delay(mut self, first: Duration, max: Duration) -> Self {
        self.config.retry_delay = first;
        self.config.max_retry_delay = max;
        self
    }

    /// How long the relay waits after the broker was unavailable before it
    /// tries again (default 1 s, at least 1 ms).
    pub fn outage_delay(mut self, delay: Duration) -> Self {
        self.config.outage_delay = delay;
        self
    }

    /// How long the relay sleeps without a notification before it looks
    /// again (default 1 s, at least 1 ms): the fallback for lost
    /// notifications and for retries coming due.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.config.poll_interval = interval;
        self
    }

    /// How long the publisher may take for one batch before all its
    /// unconfirmed events count as unavailable (default 30 s, at least 1 ms).
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.config.publish_timeout = timeout;
        self
    }

    /// How long published events are kept before the purge deletes them
    /// (default 7 days). Dead events are kept.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.config.retention = retention;
        self
    }

    /// Rows one purge statement deletes (default 1000, at least 1).
    pub fn purge_batch(mut self, rows: u32) -> Self {
        self.config.purge_batch = rows;
        self
    }

    /// How often [`Relay::run`](crate::Relay::run) purges (default 60 s;
    /// zero: never).
    pub fn purge_interval(mut self, interval: Duration) -> Self {
        self.config.purge_interval = interval;
        self
    }

    /// Checks and returns the config.
    ///
    /// # Errors
    /// [`ConfigError`] names the first setting that is out of range.
    pub fn build(self) -> Result<RelayConfig, ConfigError> {
        let c = self.config;
        let ms = Duration::from_millis(1);
        if c.batch_size == 0 {
            return Err(ConfigError::Zero("batch_size"));
        }
        if c.max_per_key == 0 {
            return Err(ConfigError::Zero("max_per_key"));
        }
        if c.max_attempts == 0 {
            return Err(ConfigError::Zero("max_attempts"));
        }
        if c.purge_batch == 0 {
            return Err(ConfigError::Zero("purge_batch"));
        }
        for (name, d) in [
            ("outage_delay", c.outage_delay),
            ("poll_interval", c.poll_interval),
            ("publish_timeout", c.publish_timeout),
        ] {
            if d < ms {
                return Err(ConfigError::TooShort(name, d));
            }
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
    /// A count that must be at least 1 is 0.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// A duration that must be at least 1 ms is shorter.
    #[error("{0} must be at least 1ms, got {1:?}")]
    TooShort(&'static str, Duration),
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
    fn defaults_and_checks() {
        let c = RelayConfig::builder().build().unwrap();
        assert_eq!(c.batch_size(), 100);
        assert_eq!(c.max_attempts(), 10);
        assert_eq!(c.retry_after(1), Duration::from_secs(1));
        assert_eq!(c.retry_after(3), Duration::from_secs(4));
        assert_eq!(c.retry_after(40), Duration::from_secs(300));
        assert_eq!(
            RelayConfig::builder().batch_size(0).build().unwrap_err(),
            ConfigError::Zero("batch_size")
        );
        assert!(matches!(
            RelayConfig::builder().poll_interval(Duration::ZERO).build(),
            Err(ConfigError::TooShort("poll_interval", _))
        ));
        assert!(matches!(
            RelayConfig::builder()
                .retry_delay(Duration::from_secs(2), Duration::from_secs(1))
                .build(),
            Err(ConfigError::RetryDelay { .. })
        ));
    }
}
