//! Time, injectable so that tests never sleep.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in milliseconds since the Unix epoch.
///
/// Stores that keep time themselves (Redis key expiry, SQL `now()`) ignore it; the
/// memory store reads it for leases and expiry, so tests can move time with
/// [`FakeClock::advance`] instead of sleeping.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that only moves when told to. Clones share the same time.
#[derive(Debug, Clone)]
pub struct FakeClock {
    now: Arc<AtomicU64>,
}

impl Default for FakeClock {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeClock {
    /// A clock that starts at a fixed, arbitrary instant (2026-01-01).
    pub fn new() -> Self {
        Self {
            now: Arc::new(AtomicU64::new(1_767_225_600_000)),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.now.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_millis(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

/// Wall-clock time that follows tokio's clock: under `tokio::time::pause()`
/// it moves only with `tokio::time::advance` (or auto-advance), together with
/// the lease heartbeat's timers. For tests of slow handlers.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin_millis: u64,
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// Starts now. Call inside a tokio runtime.
    pub fn new() -> Self {
        Self {
            origin_millis: SystemClock.now_millis(),
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now_millis(&self) -> u64 {
        self.origin_millis + self.origin.elapsed().as_millis() as u64
    }
}
