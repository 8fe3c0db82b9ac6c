//! The pause between reconnections of the adapters' consume loops.

use std::time::{Duration, Instant};

/// Doubles from `min` to `max`; starts again from `min` once a subscription
/// has lasted `max` (so a broker that drops every connection at once is
/// retried every `max`, not in a hot loop).
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The pause before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// A subscription that started at `since` ended: if it lasted, the next
    /// outage starts from `min` again.
    pub(crate) fn lasted(&mut self, since: Instant) {
        if since.elapsed() >= self.max {
            self.next = self.min;
        }
    }

    pub(crate) fn bounds(&self) -> (Duration, Duration) {
        (self.min, self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn starts_again_after_a_lasting_subscription() {
        let mut b = Backoff::new(Duration::from_millis(1), Duration::from_millis(2));
        b.next_delay();
        b.next_delay();
        let since = Instant::now() - Duration::from_millis(5);
        b.lasted(since);
        assert_eq!(b.next_delay(), Duration::from_millis(1));
    }
}
