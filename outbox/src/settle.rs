//! What both relays (PostgreSQL, SQLite) do with a batch between the claim
//! and the marking: publish it, and sort the answers.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::config::RelayConfig;
use crate::publisher::{Outgoing, PublishError, Publisher};

/// What one `run_once` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchReport {
    /// Events claimed and handed to the publisher.
    pub claimed: usize,
    /// Confirmed and marked published.
    pub published: usize,
    /// Failed, scheduled for a retry.
    pub retried: usize,
    /// Failed for the last time (or permanently): dead.
    pub dead: usize,
    /// Not confirmed because the broker was unavailable; untouched.
    pub unavailable: usize,
    /// Later events of a key whose earlier event failed in this batch; left
    /// untouched, so they are not marked published ahead of it.
    pub deferred: usize,
}

/// Decodes a batch's rows. A row that is not an event (written by something
/// other than `enqueue`: an id that is not a UUID, headers that are not a
/// list of pairs) is set aside as a dead failure with the reason, to be
/// marked with the batch, so it cannot block the relay (or its key) forever.
pub(crate) fn decode_rows<R, T>(
    rows: &[R],
    decode: impl Fn(&R) -> Result<T, crate::OutboxError>,
    seq: impl Fn(&R) -> Result<i64, crate::OutboxError>,
) -> Result<(Vec<T>, Vec<Failure>), crate::OutboxError> {
    let mut decoded = Vec::with_capacity(rows.len());
    let mut corrupt = Vec::new();
    for row in rows {
        match decode(row) {
            Ok(item) => decoded.push(item),
            Err(crate::OutboxError::Corrupt(why)) => {
                let seq = seq(row)?;
                tracing::error!(seq, reason = %why, "an outbox row is not an event: marked dead, not published");
                corrupt.push(Failure {
                    seq,
                    error: format!("unreadable row: {why}"),
                    delay: Duration::ZERO,
                    dead: true,
                });
            }
            Err(e) => return Err(e),
        }
    }
    Ok((decoded, corrupt))
}

/// A failed event (or a row that is not an event), to be counted as an
/// attempt: retried after `delay`, or dead.
pub struct Failure {
    pub(crate) seq: i64,
    pub(crate) error: String,
    pub(crate) delay: Duration,
    pub(crate) dead: bool,
}

pub(crate) struct Settled {
    pub(crate) published: Vec<i64>,
    pub(crate) failures: Vec<Failure>,
    pub(crate) report: BatchReport,
}

/// Keeps, from candidates in `seq` order with their "due" flag, each key's
/// events from its head on, up to `max_per_key`, stopping a key at its first
/// event not due. Keyless events pass if due.
pub(crate) fn take_heads(
    candidates: impl IntoIterator<Item = (Outgoing, bool)>,
    max_per_key: u32,
) -> Vec<Outgoing> {
    let mut taken: HashMap<String, u32> = HashMap::new();
    let mut closed: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for (o, ready) in candidates {
        let Some(key) = o.event.ordering_key() else {
            if ready {
                out.push(o);
            }
            continue;
        };
        if closed.contains(key) {
            continue;
        }
        let n = taken.entry(key.to_owned()).or_insert(0);
        if !ready || *n >= max_per_key {
            closed.insert(key.to_owned());
            continue;
        }
        *n += 1;
        out.push(o);
    }
    out
}

/// Publishes `batch` (bounded by the publish timeout) and sorts the answers:
/// confirmed, failed (retry or dead), unavailable, and deferred (after an
/// earlier failure of the same key in the batch).
pub(crate) async fn publish<P: Publisher>(
    publisher: &P,
    batch: &[Outgoing],
    cfg: &RelayConfig,
) -> Settled {
    let started = Instant::now();
    // A publisher that does not answer in time: every event of the batch
    // counts as unavailable (below).
    let results = tokio::time::timeout(cfg.publish_timeout, publisher.publish(batch))
        .await
        .unwrap_or_default();
    let publish_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut results = results.into_iter();
    let mut stopped: HashSet<&str> = HashSet::new();
    let mut published = Vec::new();
    let mut failures = Vec::new();
    let mut report = BatchReport {
        claimed: batch.len(),
        ..BatchReport::default()
    };
    for o in batch {
        let result = results
            .next()
            .unwrap_or_else(|| Err(PublishError::unavailable("no confirmation (timed out)")));
        let key = o.event.ordering_key();
        if key.is_some_and(|k| stopped.contains(k)) {
            report.deferred += 1;
            continue;
        }
        let error = match result {
            Ok(()) => {
                published.push(o.seq);
                continue;
            }
            Err(e) => e,
        };
        if let Some(k) = key {
            stopped.insert(k);
        }
        let dead = match &error {
            PublishError::Unavailable(_) => {
                report.unavailable += 1;
                tracing::debug!(seq = o.seq, id = %o.event.id(), %error, "not confirmed");
                continue;
            }
            PublishError::Rejected(_) => o.attempt >= cfg.max_attempts,
            PublishError::Permanent(_) => true,
        };
        if dead {
            report.dead += 1;
            tracing::warn!(seq = o.seq, id = %o.event.id(), attempt = o.attempt, %error, "event dead");
        } else {
            report.retried += 1;
            tracing::info!(seq = o.seq, id = %o.event.id(), attempt = o.attempt, %error, "publish failed, will retry");
        }
        failures.push(Failure {
            seq: o.seq,
            error: error.to_string(),
            delay: cfg.retry_after(o.attempt),
            dead,
        });
    }
    report.published = published.len();
    tracing::debug!(
        published = report.published,
        retried = report.retried,
        dead = report.dead,
        unavailable = report.unavailable,
        deferred = report.deferred,
        publish_ms,
        "batch published"
    );
    Settled {
        published,
        failures,
        report,
    }
}

pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
