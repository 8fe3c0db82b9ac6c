//! How a projector runs: its batches, attempts, waits and switch.

use std::time::Duration;

/// How a [`Projector`](crate::Projector) runs. Every field has a default
/// (`ProjectorConfig { batch_size: 500, ..ProjectorConfig::default() }`);
/// [`ProjectorBuilder::build`](crate::ProjectorBuilder::build) checks them.
#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// Events applied per transaction (outbox source), 1 to 10 000.
    /// Default 100.
    pub batch_size: u32,
    /// Failed attempts after which an event is parked (both sources).
    /// Default 5.
    pub max_attempts: u32,
    /// The pause after an event's first failed attempt, doubled at each
    /// further one up to `max_retry_delay`; its partition waits meanwhile
    /// (the others go on). Default 100 ms.
    pub retry_delay: Duration,
    /// The longest pause between two attempts of an event. Default 10 s.
    pub max_retry_delay: Duration,
    /// How long an idle partition waits for a notification (`LISTEN
    /// outbox`) before it looks anyway. Default 1 s.
    pub poll_interval: Duration,
    /// The pause after a database error of the projector's own. Default 1 s.
    pub outage_delay: Duration,
    /// How often [`run`](crate::Projector::run) measures the lag (and, while
    /// the version builds, whether it has caught up). Default 1 s.
    pub lag_interval: Duration,
    /// A version that builds becomes the served one once at most this many
    /// of its events wait (outbox source). Default 100: under a steady
    /// stream a tail is rarely at exactly 0, and what waits at the switch
    /// is applied within a round after it.
    pub switch_lag: u64,
    /// How long [`served_version`](crate::Projector::served_version) keeps
    /// what it read; the projector's own listener also forgets it at each
    /// switch. Default 1 s.
    pub served_ttl: Duration,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            max_attempts: 5,
            retry_delay: Duration::from_millis(100),
            max_retry_delay: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            outage_delay: Duration::from_secs(1),
            lag_interval: Duration::from_secs(1),
            switch_lag: 100,
            served_ttl: Duration::from_secs(1),
        }
    }
}

impl ProjectorConfig {
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        if !(1..=10_000).contains(&self.batch_size) {
            return Err(ConfigError::BatchSize(self.batch_size));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::MaxAttempts);
        }
        if self.poll_interval.is_zero() || self.lag_interval.is_zero() {
            return Err(ConfigError::ZeroInterval);
        }
        Ok(())
    }

    /// The pause after an event's `failures`-th failed attempt.
    pub(crate) fn retry_after(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        self.retry_delay
            .saturating_mul(1 << doublings)
            .min(self.max_retry_delay)
    }
}

/// A projector that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The name is not a plain lowercase identifier of at most
    /// [`MAX_NAME_LEN`](crate::MAX_NAME_LEN) bytes.
    #[error("`{0}` is not a projection name: a lowercase letter or `_`, then lowercase letters, digits or `_`, at most 48 bytes")]
    Name(String),
    /// Versions count from 1.
    #[error("versions count from 1")]
    Version,
    /// Partitions: 1 to 1024.
    #[error("{0} partitions: 1 to 1024")]
    Partitions(u32),
    /// Batch size: 1 to 10 000.
    #[error("a batch of {0} events: 1 to 10000")]
    BatchSize(u32),
    /// At least one attempt.
    #[error("max_attempts must be at least 1")]
    MaxAttempts,
    /// The poll and lag intervals must not be zero.
    #[error("poll_interval and lag_interval must not be zero")]
    ZeroInterval,
    /// An empty destination in the filter.
    #[error("an empty destination")]
    Destination,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_and_backoff() {
        let c = ProjectorConfig::default();
        c.check().unwrap();
        assert_eq!(c.retry_after(1), Duration::from_millis(100));
        assert_eq!(c.retry_after(3), Duration::from_millis(400));
        assert_eq!(c.retry_after(40), Duration::from_secs(10));
        let bad = ProjectorConfig {
            batch_size: 0,
            ..ProjectorConfig::default()
        };
        assert_eq!(bad.check(), Err(ConfigError::BatchSize(0)));
        let bad = ProjectorConfig {
            max_attempts: 0,
            ..ProjectorConfig::default()
        };
        assert_eq!(bad.check(), Err(ConfigError::MaxAttempts));
    }
}
