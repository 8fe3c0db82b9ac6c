//! What a relay did: the in-process [`RelayMetrics`] snapshot
//! ([`Relay::metrics`](crate::Relay::metrics)), and the same counts, plus
//! the lag, through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! The relay only records; the application installs the exporter it wants
//! (Prometheus, StatsD, OpenTelemetry, ...). With no recorder installed
//! every call is a no-op. A relay builds its keys once, when it is created,
//! and registers its counters (at 0) with the recorder installed then:
//! install the recorder first, call [`describe`] once for the help texts
//! and units, then create the relays.
//!
//! # The metrics
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | [`outbox_events_total`](EVENTS_TOTAL) | counter | `relay`, `outcome` | every event a relay claimed, once per round, under what became of it in that round |
//! | [`outbox_lag_seconds`](LAG_SECONDS) | gauge | `relay` | the age of the oldest event neither published nor dead (0: none waits) |
//! | [`outbox_batches_total`](BATCHES_TOTAL) | counter | `relay` | rounds that claimed at least one event, published and marked |
//! | [`outbox_database_errors_total`](DATABASE_ERRORS_TOTAL) | counter | `relay` | relay rounds, lag measures and purges that failed on the outbox's database |
//! | [`outbox_purged_total`](PURGED_TOTAL) | counter | `relay` | published events deleted by the retention purge |
//!
//! `outcome` ([`outcome`]), counted when the round's marking committed:
//!
//! - `published`: confirmed by the broker and marked published;
//! - `retried`: refused ([`PublishError::Rejected`](crate::PublishError::Rejected)),
//!   an attempt, scheduled for a retry with backoff;
//! - `dead`: refused for the last time (`max_attempts`), failed
//!   permanently ([`PublishError::Permanent`](crate::PublishError::Permanent)),
//!   or a row that is not an event (`last_error` = `unreadable row: ...`):
//!   marked dead, it will never be published;
//! - `unavailable`: not confirmed because the broker was unavailable or did
//!   not answer within the publish timeout; not an attempt, the event waits;
//! - `deferred`: a later event of a key whose earlier event failed in the
//!   same round; left waiting, it is sent again after the failed one (it may
//!   have reached the broker already: batches are pipelined).
//!
//! `retried`, `unavailable` and `deferred` count rounds, not distinct
//! events: during an outage the same waiting events count as `unavailable`
//! again every outage delay. Read them as rates. A round whose database
//! failed counts no outcome (nothing was marked; its events are claimed
//! again) and one `outbox_database_errors_total`.
//!
//! `relay` ([`label::RELAY`]) is the relay's name:
//! [`Relay::named`](crate::Relay::named), or [`DEFAULT_RELAY`] for
//! [`Relay::new`](crate::Relay::new). Its values are the relays a program
//! creates in code, so they are few; do not put a per-process value in it
//! (the exporter's scrape already tells instances apart). Relays of one
//! process with the same name share their series: their counts add up, and
//! if they relay different outboxes their lag overwrites each other's, so
//! name relays of different outboxes apart.
//!
//! **No `destination` label**: a destination is any string a producer
//! passes to [`Event::new`](crate::Event::new) (a subject per tenant or per
//! aggregate is common on NATS), so its cardinality is the application's,
//! not bounded by the relay; and a lag per destination would cost a
//! `GROUP BY` at every measure. The dead events of a destination are in the
//! table: `SELECT destination, count(*) FROM outbox.events WHERE dead_at IS
//! NOT NULL GROUP BY destination`.
//!
//! **The lag** is measured by [`Relay::run`](crate::Relay::run) when the
//! relay goes idle and at least every poll interval while it works, and by
//! each call to [`Relay::lag`](crate::Relay::lag). It counts events waiting
//! for a retry (a key behind its failed head waits with it). It is a
//! property of the outbox, not of the relay: every relay on one outbox
//! reports about the same value; aggregate it with `max`, not `sum`. The
//! gauge appears at the first measure (within the first round of `run`),
//! and keeps its last value while the relay cannot measure: a failed
//! measure counts in `outbox_database_errors_total`.
//!
//! # What to alert on
//!
//! - **the lag**: `max(outbox_lag_seconds) > N` for a few minutes, where N
//!   is how stale your consumers may be. The one alert that sees every
//!   cause (broker down, database down, a relay stopped or too slow, a
//!   poison event in backoff). Leave room for the retry backoff: a refused
//!   event holds the lag up to `max_retry_delay` per attempt until it
//!   publishes or dies.
//! - **any dead event**: `increase(outbox_events_total{outcome="dead"}[15m]) > 0`:
//!   an event will never reach its consumers. Read `last_error` in the
//!   table; republish or drop it by hand.
//! - **the broker**: `rate(outbox_events_total{outcome="unavailable"}[5m]) > 0`
//!   for several minutes: the broker is down or slower than the publish
//!   timeout. Nothing is lost; the lag grows.
//! - **the database**: `rate(outbox_database_errors_total[5m]) > 0`: the
//!   relay cannot claim or mark, and its lag gauge is stale. The log says
//!   which call failed.
//! - **refusals**: `rate(outbox_events_total{outcome="retried"}[5m])`
//!   rising: the broker refuses events (a missing queue, a full one, a
//!   policy); they die after `max_attempts`.
//! - **a stopped relay**: `rate(outbox_events_total{outcome="published"}[5m]) == 0`
//!   while the lag grows, with no outage and no database error.
//!
//! For capacity, not alerts: `rate(outbox_events_total{outcome="published"}[5m])
//! / rate(outbox_batches_total[5m])` is the events per batch; near twice the
//! batch size the relay runs full batches back to back, and more relays (or
//! a larger batch) would publish more. `outbox_purged_total` shows the
//! retention at work (a failing purge counts as a database error).

use std::time::Duration;

/// Counter: every event a relay claimed, once per round, labelled
/// [`label::RELAY`] and [`label::OUTCOME`] (one of [`outcome`]).
pub const EVENTS_TOTAL: &str = "outbox_events_total";
/// Gauge: the age in seconds of the oldest event neither published nor
/// dead, 0 when none waits, labelled [`label::RELAY`].
pub const LAG_SECONDS: &str = "outbox_lag_seconds";
/// Counter: rounds that claimed at least one event and committed their
/// marking, labelled [`label::RELAY`].
pub const BATCHES_TOTAL: &str = "outbox_batches_total";
/// Counter: relay rounds, lag measures and purges that failed on the
/// outbox's database, labelled [`label::RELAY`].
pub const DATABASE_ERRORS_TOTAL: &str = "outbox_database_errors_total";
/// Counter: published events deleted by the retention purge, labelled
/// [`label::RELAY`].
pub const PURGED_TOTAL: &str = "outbox_purged_total";

/// The `relay` label of a relay made by [`Relay::new`](crate::Relay::new).
pub const DEFAULT_RELAY: &str = "default";

/// Label names.
pub mod label {
    /// The relay's name.
    pub const RELAY: &str = "relay";
    /// What became of an event in a round: one of [`outcome`](super::outcome).
    pub const OUTCOME: &str = "outcome";
}

/// The values of `outcome` for [`EVENTS_TOTAL`].
pub mod outcome {
    /// Confirmed by the broker and marked published.
    pub const PUBLISHED: &str = "published";
    /// Refused; scheduled for a retry.
    pub const RETRIED: &str = "retried";
    /// Marked dead: refused for the last time, failed permanently, or a row
    /// that is not an event.
    pub const DEAD: &str = "dead";
    /// Not confirmed: the broker was unavailable. Not an attempt.
    pub const UNAVAILABLE: &str = "unavailable";
    /// Left waiting behind an earlier failed event of its key.
    pub const DEFERRED: &str = "deferred";
    /// Every value, in this order.
    pub const ALL: [&str; 5] = [PUBLISHED, RETRIED, DEAD, UNAVAILABLE, DEFERRED];
}

/// Describes every metric to the installed recorder (its help text and
/// unit). Call it once, after installing the recorder; it records nothing.
/// The series themselves are registered by each relay when it is created.
pub fn describe() {
    ::metrics::describe_counter!(
        EVENTS_TOTAL,
        "Events an outbox relay claimed, per round, by relay and outcome (published, retried, dead, unavailable, deferred)"
    );
    ::metrics::describe_gauge!(
        LAG_SECONDS,
        ::metrics::Unit::Seconds,
        "Age of the oldest outbox event neither published nor dead (0 when none waits), by relay"
    );
    ::metrics::describe_counter!(
        BATCHES_TOTAL,
        "Outbox relay rounds that claimed at least one event, by relay"
    );
    ::metrics::describe_counter!(
        DATABASE_ERRORS_TOTAL,
        "Outbox relay rounds, lag measures and purges that failed on the outbox database, by relay"
    );
    ::metrics::describe_counter!(
        PURGED_TOTAL,
        "Published outbox events deleted by the retention purge, by relay"
    );
}

#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) use counters::Counters;

#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod counters {
    use std::sync::atomic::{AtomicU64, Ordering};

    use ::metrics::{Key, Label, Level, Metadata};

    use super::*;
    use crate::settle::BatchReport;

    /// The metadata of every metric the relay records.
    static METADATA: Metadata<'static> = Metadata::new("outbox", Level::INFO, Some(module_path!()));

    const NO_LAG: u64 = u64::MAX;

    /// A relay's counts, shared by its clones, and its keys in the facade.
    #[derive(Debug)]
    pub(crate) struct Counters {
        published: AtomicU64,
        retried: AtomicU64,
        dead: AtomicU64,
        unavailable: AtomicU64,
        deferred: AtomicU64,
        batches: AtomicU64,
        database_errors: AtomicU64,
        purged: AtomicU64,
        lag_ms: AtomicU64,
        keys: Keys,
    }

    /// The facade's keys of one relay, built once.
    #[derive(Debug)]
    struct Keys {
        /// `outbox_events_total` of each outcome, in the order of [`outcome::ALL`].
        events: [Key; 5],
        batches: Key,
        database_errors: Key,
        purged: Key,
        lag: Key,
    }

    impl Counters {
        /// Counters at 0 for the relay `relay`, registered with the recorder
        /// installed now. The lag gauge is registered at its first measure.
        pub(crate) fn new(relay: &str) -> Self {
            let relay = Label::new(label::RELAY, relay.to_owned());
            let key = |name: &'static str| Key::from_parts(name, vec![relay.clone()]);
            let keys = Keys {
                events: outcome::ALL.map(|o| {
                    Key::from_parts(
                        EVENTS_TOTAL,
                        vec![relay.clone(), Label::from_static_parts(label::OUTCOME, o)],
                    )
                }),
                batches: key(BATCHES_TOTAL),
                database_errors: key(DATABASE_ERRORS_TOTAL),
                purged: key(PURGED_TOTAL),
                lag: key(LAG_SECONDS),
            };
            ::metrics::with_recorder(|r| {
                let counters = [&keys.batches, &keys.database_errors, &keys.purged];
                for key in keys.events.iter().chain(counters) {
                    r.register_counter(key, &METADATA).increment(0);
                }
            });
            let zero = || AtomicU64::new(0);
            Self {
                published: zero(),
                retried: zero(),
                dead: zero(),
                unavailable: zero(),
                deferred: zero(),
                batches: zero(),
                database_errors: zero(),
                purged: zero(),
                lag_ms: AtomicU64::new(NO_LAG),
                keys,
            }
        }

        /// A round whose marking committed: its report, and the rows that
        /// were not events (marked dead with it). A round that claimed no
        /// event counts no batch.
        pub(crate) fn round(&self, r: &BatchReport, unreadable: usize) {
            let outcomes = [
                (&self.published, r.published),
                (&self.retried, r.retried),
                (&self.dead, r.dead + unreadable),
                (&self.unavailable, r.unavailable),
                (&self.deferred, r.deferred),
            ];
            for ((c, n), key) in outcomes.into_iter().zip(&self.keys.events) {
                add(c, key, n as u64);
            }
            if r.claimed > 0 {
                add(&self.batches, &self.keys.batches, 1);
            }
        }

        /// A relay round, lag measure or purge that failed on the database.
        pub(crate) fn database_error(&self) {
            add(&self.database_errors, &self.keys.database_errors, 1);
        }

        /// `n` published events purged.
        pub(crate) fn purged(&self, n: u64) {
            add(&self.purged, &self.keys.purged, n);
        }

        /// The lag just measured.
        pub(crate) fn set_lag(&self, lag: Duration) {
            let ms = u64::try_from(lag.as_millis()).unwrap_or(NO_LAG - 1);
            self.lag_ms.store(ms, Ordering::Relaxed);
            ::metrics::with_recorder(|r| r.register_gauge(&self.keys.lag, &METADATA))
                .set(lag.as_secs_f64());
        }

        pub(crate) fn snapshot(&self) -> RelayMetrics {
            let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
            let lag = l(&self.lag_ms);
            RelayMetrics {
                published: l(&self.published),
                retried: l(&self.retried),
                dead: l(&self.dead),
                unavailable: l(&self.unavailable),
                deferred: l(&self.deferred),
                batches: l(&self.batches),
                database_errors: l(&self.database_errors),
                purged: l(&self.purged),
                lag: (lag != NO_LAG).then(|| Duration::from_millis(lag)),
            }
        }
    }

    /// Adds `n` to `c` and to the facade's counter `key` (nothing when 0:
    /// the series was registered at creation).
    fn add(c: &AtomicU64, key: &Key, n: u64) {
        if n == 0 {
            return;
        }
        c.fetch_add(n, Ordering::Relaxed);
        ::metrics::with_recorder(|r| r.register_counter(key, &METADATA)).increment(n);
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn keys_follow_the_documented_names() {
            let c = Counters::new("orders");
            let labels = |k: &Key| -> Vec<(String, String)> {
                k.labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect()
            };
            let relay = || ("relay".to_owned(), "orders".to_owned());
            for (key, o) in c.keys.events.iter().zip(outcome::ALL) {
                assert_eq!(key.name(), "outbox_events_total");
                assert_eq!(labels(key), [relay(), ("outcome".into(), o.into())]);
            }
            for (key, name) in [
                (&c.keys.batches, "outbox_batches_total"),
                (&c.keys.database_errors, "outbox_database_errors_total"),
                (&c.keys.purged, "outbox_purged_total"),
                (&c.keys.lag, "outbox_lag_seconds"),
            ] {
                assert_eq!(key.name(), name);
                assert_eq!(labels(key), [relay()]);
            }
            assert_eq!(
                outcome::ALL,
                ["published", "retried", "dead", "unavailable", "deferred"]
            );
        }
    }
}

/// What a relay did since it was created. The same counts go to the
/// [`metrics`](crate::metrics) facade, under the names given there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayMetrics {
    /// Events confirmed by the broker and marked published.
    pub published: u64,
    /// Failed publishes scheduled for a retry.
    pub retried: u64,
    /// Events that died (maximum attempts, or a permanent failure), and rows
    /// that were not events, marked dead.
    pub dead: u64,
    /// Events not confirmed because the broker was unavailable (not counted
    /// as attempts; they wait).
    pub unavailable: u64,
    /// Events left waiting behind an earlier event of their key that failed
    /// in the same round (sent again after it).
    pub deferred: u64,
    /// Batches claimed that held at least one event.
    pub batches: u64,
    /// Relay rounds, lag measures and purges that failed on the outbox's
    /// database.
    pub database_errors: u64,
    /// Published events deleted by the retention purge.
    pub purged: u64,
    /// Relay lag at the last measure: the age of the oldest event neither
    /// published nor dead (zero when none waits; `None` before the first
    /// measure). Measured by [`Relay::run`](crate::Relay::run) when the
    /// relay goes idle and at least every poll interval while it works, and
    /// by each call to [`Relay::lag`](crate::Relay::lag).
    pub lag: Option<Duration>,
}
