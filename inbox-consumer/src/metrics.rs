//! Counters of outcomes, shared by every clone of an inbox.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::outcome::Outcome;

#[derive(Debug, Default)]
pub(crate) struct Counters {
    processed: AtomicU64,
    duplicate: AtomicU64,
    in_flight_elsewhere: AtomicU64,
    failed: AtomicU64,
    unavailable: AtomicU64,
    dead: AtomicU64,
    lease_lost: AtomicU64,
}

impl Counters {
    pub(crate) fn record(&self, outcome: &Outcome) {
        let c = match outcome {
            Outcome::Processed { .. } => &self.processed,
            Outcome::Duplicate => &self.duplicate,
            Outcome::InFlightElsewhere { .. } => &self.in_flight_elsewhere,
            Outcome::Failed { .. } => &self.failed,
            Outcome::Unavailable { .. } => &self.unavailable,
            Outcome::Dead { .. } => &self.dead,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn lease_lost(&self) {
        self.lease_lost.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> InboxMetrics {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        InboxMetrics {
            processed: l(&self.processed),
            duplicate: l(&self.duplicate),
            in_flight_elsewhere: l(&self.in_flight_elsewhere),
            failed: l(&self.failed),
            unavailable: l(&self.unavailable),
            dead: l(&self.dead),
            lease_lost: l(&self.lease_lost),
        }
    }
}

/// How many deliveries ended how, since the inbox was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InboxMetrics {
    /// Handler ran and its effect committed.
    pub processed: u64,
    /// Seen before; acked without running the handler.
    pub duplicate: u64,
    /// Held by another consumer's lease (lease mode).
    pub in_flight_elsewhere: u64,
    /// Handler failed; requeued.
    pub failed: u64,
    /// The inbox's database or store failed; requeued, not counted as an attempt.
    pub unavailable: u64,
    /// Dead-lettered.
    pub dead: u64,
    /// Lease mode: a handler's lease was taken over while it ran (its effect
    /// may have run twice; see the crate's guarantees).
    pub lease_lost: u64,
}
