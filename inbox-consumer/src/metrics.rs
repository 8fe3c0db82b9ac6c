//! Counters of outcomes, shared by every clone of an inbox, and the same
//! counts through the [`metrics`](https://docs.rs/metrics) facade:
//! `inbox_messages_total{consumer,outcome}` and
//! `inbox_lease_lost_total{consumer}` (names and label values in
//! [`idempotency_core::metrics`]). The facade's keys are built once per
//! inbox, and its series registered (at 0) with the recorder installed when
//! the inbox is created: install the recorder first.

use std::sync::atomic::{AtomicU64, Ordering};

use ::metrics::{Key, Label, Level, Metadata};
use idempotency_core::metrics::{
    inbox_outcome, label, INBOX_LEASE_LOST_TOTAL, INBOX_MESSAGES_TOTAL,
};

use crate::outcome::Outcome;

static METADATA: Metadata<'static> =
    Metadata::new("inbox_consumer", Level::INFO, Some(module_path!()));

#[derive(Debug)]
pub(crate) struct Counters {
    processed: AtomicU64,
    duplicate: AtomicU64,
    in_flight_elsewhere: AtomicU64,
    failed: AtomicU64,
    unavailable: AtomicU64,
    dead: AtomicU64,
    lease_lost: AtomicU64,
    /// `inbox_messages_total` of each outcome, in the order of
    /// [`inbox_outcome::ALL`].
    messages: [Key; 6],
    lease_lost_key: Key,
}

impl Counters {
    /// Counters at 0 for `consumer`, registered with the recorder installed now.
    pub(crate) fn new(consumer: &str) -> Self {
        let consumer = Label::new(label::CONSUMER, consumer.to_owned());
        let messages = inbox_outcome::ALL.map(|outcome| {
            Key::from_parts(
                INBOX_MESSAGES_TOTAL,
                vec![
                    consumer.clone(),
                    Label::from_static_parts(label::OUTCOME, outcome),
                ],
            )
        });
        let lease_lost_key = Key::from_parts(INBOX_LEASE_LOST_TOTAL, vec![consumer]);
        ::metrics::with_recorder(|r| {
            for key in messages.iter().chain([&lease_lost_key]) {
                r.register_counter(key, &METADATA).increment(0);
            }
        });
        Self {
            processed: AtomicU64::new(0),
            duplicate: AtomicU64::new(0),
            in_flight_elsewhere: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            unavailable: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            lease_lost: AtomicU64::new(0),
            messages,
            lease_lost_key,
        }
    }

    pub(crate) fn record(&self, outcome: &Outcome) {
        let (c, i) = match outcome {
            Outcome::Processed { .. } => (&self.processed, 0),
            Outcome::Duplicate => (&self.duplicate, 1),
            Outcome::InFlightElsewhere { .. } => (&self.in_flight_elsewhere, 2),
            Outcome::Failed { .. } => (&self.failed, 3),
            Outcome::Unavailable { .. } => (&self.unavailable, 4),
            Outcome::Dead { .. } => (&self.dead, 5),
        };
        debug_assert_eq!(inbox_outcome::ALL[i], outcome.name());
        c.fetch_add(1, Ordering::Relaxed);
        increment(&self.messages[i]);
    }

    pub(crate) fn lease_lost(&self) {
        self.lease_lost.fetch_add(1, Ordering::Relaxed);
        increment(&self.lease_lost_key);
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

fn increment(key: &Key) {
    ::metrics::with_recorder(|r| r.register_counter(key, &METADATA)).increment(1);
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
