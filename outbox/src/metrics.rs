//! Counters of a relay, shared by its clones.
// The counters are the relay's (feature `postgres` or `sqlite`); the snapshot type is always there.
#![cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const NO_LAG: u64 = u64::MAX;

#[derive(Debug)]
pub(crate) struct Counters {
    pub(crate) published: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead: AtomicU64,
    pub(crate) unavailable: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) purged: AtomicU64,
    lag_ms: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            published: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            unavailable: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            purged: AtomicU64::new(0),
            lag_ms: AtomicU64::new(NO_LAG),
        }
    }
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn set_lag(&self, lag: Option<Duration>) {
        let v = lag.map_or(NO_LAG, |d| {
            u64::try_from(d.as_millis()).unwrap_or(NO_LAG - 1)
        });
        self.lag_ms.store(v, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> RelayMetrics {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let lag = l(&self.lag_ms);
        RelayMetrics {
            published: l(&self.published),
            retried: l(&self.retried),
            dead: l(&self.dead),
            unavailable: l(&self.unavailable),
            batches: l(&self.batches),
            purged: l(&self.purged),
            lag: (lag != NO_LAG).then(|| Duration::from_millis(lag)),
        }
    }
}

/// What a relay did since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayMetrics {
    /// Events confirmed by the broker and marked published.
    pub published: u64,
    /// Failed publishes scheduled for a retry.
    pub retried: u64,
    /// Events that died (maximum attempts, or a permanent failure).
    pub dead: u64,
    /// Events not confirmed because the broker was unavailable (not counted
    /// as attempts; they wait).
    pub unavailable: u64,
    /// Batches claimed that held at least one event.
    pub batches: u64,
    /// Published events deleted by the retention purge.
    pub purged: u64,
    /// Relay lag at the last measure: the age of the oldest event neither
    /// published nor dead (`Some(0)`-ish when caught up, `None` when the
    /// outbox was empty or not measured yet). Measured when the relay goes
    /// idle and at least every poll interval while it works.
    pub lag: Option<Duration>,
}
