//! What projectors did, and how far behind they are: an in-process
//! [`ProjectorMetrics`] snapshot ([`Projector::metrics`](crate::Projector::metrics))
//! and the same figures through the [`metrics`](https://docs.rs/metrics)
//! facade. Install the exporter you use, call [`describe`], then build the
//! projectors (each registers its counters, at 0, with the recorder
//! installed then).
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | [`projection_events_behind`](EVENTS_BEHIND) | gauge | `projection`, `version` | events committed and not yet applied (outbox source: counted up to 100 000 per partition; broker source: what the application records) |
//! | [`projection_seconds_behind`](SECONDS_BEHIND) | gauge | `projection`, `version` | the age of the oldest event not yet applied, from its `created_at` (0: none waits) |
//! | [`projection_events_applied_total`](EVENTS_APPLIED_TOTAL) | counter | `projection`, `version` | events applied (committed) |
//! | [`projection_events_parked_total`](EVENTS_PARKED_TOTAL) | counter | `projection`, `version` | events parked after their attempts (or at once: permanent failures, unreadable rows) |
//! | [`projection_apply_failures_total`](APPLY_FAILURES_TOTAL) | counter | `projection`, `version` | failed attempts of `apply` (each rolled back) |
//! | [`projection_database_errors_total`](DATABASE_ERRORS_TOTAL) | counter | `projection`, `version` | rounds and measures that failed on the projector's own statements |
//! | [`projection_served_version`](SERVED_VERSION) | gauge | `projection` | the version served, as this process last read it |
//!
//! `projection` is the projection's name and `version` its version number:
//! both come from code, so the series are few.
//!
//! What to alert on: `projection_seconds_behind` above how stale the read
//! model may be (it sees a stopped projector, a database outage and an
//! event in retry alike); any increase of `projection_events_parked_total`
//! (an event is missing from the model: read `projection.parked`); a
//! building version (`version` above `projection_served_version`) whose
//! `projection_events_behind` does not fall.

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Gauge};

/// Events committed and not yet applied (gauge).
pub const EVENTS_BEHIND: &str = "projection_events_behind";
/// Age of the oldest event not yet applied, seconds (gauge).
pub const SECONDS_BEHIND: &str = "projection_seconds_behind";
/// Events applied (counter).
pub const EVENTS_APPLIED_TOTAL: &str = "projection_events_applied_total";
/// Events parked (counter).
pub const EVENTS_PARKED_TOTAL: &str = "projection_events_parked_total";
/// Failed attempts of `apply` (counter).
pub const APPLY_FAILURES_TOTAL: &str = "projection_apply_failures_total";
/// Failures of the projector's own statements (counter).
pub const DATABASE_ERRORS_TOTAL: &str = "projection_database_errors_total";
/// The version served (gauge).
pub const SERVED_VERSION: &str = "projection_served_version";

/// The label names.
pub mod label {
    /// The projection's name.
    pub const PROJECTION: &str = "projection";
    /// The version number.
    pub const VERSION: &str = "version";
}

/// Describes every series to the installed recorder.
pub fn describe() {
    metrics::describe_gauge!(
        EVENTS_BEHIND,
        "Events committed that the projection version has not applied yet."
    );
    metrics::describe_gauge!(
        SECONDS_BEHIND,
        metrics::Unit::Seconds,
        "Age of the oldest event the projection version has not applied yet."
    );
    metrics::describe_counter!(
        EVENTS_APPLIED_TOTAL,
        "Events the projection version applied."
    );
    metrics::describe_counter!(
        EVENTS_PARKED_TOTAL,
        "Events the projection version parked (never applied), with their reason in projection.parked."
    );
    metrics::describe_counter!(
        APPLY_FAILURES_TOTAL,
        "Failed attempts to apply an event (rolled back, retried or parked)."
    );
    metrics::describe_counter!(
        DATABASE_ERRORS_TOTAL,
        "Projector rounds and lag measures that failed on the database."
    );
    metrics::describe_gauge!(SERVED_VERSION, "The projection version served.");
}

/// What a projector did since it was created (its clones share it), and
/// the lag it last measured or was given.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct ProjectorMetrics {
    /// Events applied.
    pub applied: u64,
    /// Events parked.
    pub parked: u64,
    /// Failed attempts.
    pub failures: u64,
    /// Failures of the projector's own statements.
    pub database_errors: u64,
    /// Events behind at the last measure.
    pub events_behind: Option<u64>,
    /// Seconds behind at the last measure.
    pub seconds_behind: Option<f64>,
}

/// A projector's counts and its handles in the facade, built once.
pub(crate) struct Counters {
    applied: AtomicU64,
    parked: AtomicU64,
    failures: AtomicU64,
    database_errors: AtomicU64,
    lag: std::sync::Mutex<(Option<u64>, Option<f64>)>,
    handles: Handles,
}

struct Handles {
    applied: Counter,
    parked: Counter,
    failures: Counter,
    database_errors: Counter,
    events_behind: Gauge,
    seconds_behind: Gauge,
    served: Gauge,
}

impl Counters {
    /// Counters at 0 of `name` version `version`, registered with the
    /// recorder installed now.
    pub(crate) fn new(name: &str, version: u32) -> Self {
        let labels = [
            (label::PROJECTION, name.to_owned()),
            (label::VERSION, version.to_string()),
        ];
        let handles = Handles {
            applied: metrics::counter!(EVENTS_APPLIED_TOTAL, &labels),
            parked: metrics::counter!(EVENTS_PARKED_TOTAL, &labels),
            failures: metrics::counter!(APPLY_FAILURES_TOTAL, &labels),
            database_errors: metrics::counter!(DATABASE_ERRORS_TOTAL, &labels),
            events_behind: metrics::gauge!(EVENTS_BEHIND, &labels),
            seconds_behind: metrics::gauge!(SECONDS_BEHIND, &labels),
            served: metrics::gauge!(SERVED_VERSION, label::PROJECTION => name.to_owned()),
        };
        for c in [
            &handles.applied,
            &handles.parked,
            &handles.failures,
            &handles.database_errors,
        ] {
            c.increment(0);
        }
        Self {
            applied: AtomicU64::new(0),
            parked: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            database_errors: AtomicU64::new(0),
            lag: std::sync::Mutex::new((None, None)),
            handles,
        }
    }

    pub(crate) fn applied(&self, n: u64) {
        self.applied.fetch_add(n, Ordering::Relaxed);
        self.handles.applied.increment(n);
    }

    pub(crate) fn parked(&self, n: u64) {
        self.parked.fetch_add(n, Ordering::Relaxed);
        self.handles.parked.increment(n);
    }

    pub(crate) fn failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.handles.failures.increment(1);
    }

    pub(crate) fn database_error(&self) {
        self.database_errors.fetch_add(1, Ordering::Relaxed);
        self.handles.database_errors.increment(1);
    }

    pub(crate) fn lag(&self, events: u64, seconds: f64) {
        *self
            .lag
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (Some(events), Some(seconds));
        #[allow(clippy::cast_precision_loss)] // a count of events fits
        self.handles.events_behind.set(events as f64);
        self.handles.seconds_behind.set(seconds);
    }

    pub(crate) fn served(&self, version: Option<u32>) {
        self.handles.served.set(version.map_or(0.0, f64::from));
    }

    pub(crate) fn snapshot(&self) -> ProjectorMetrics {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (events_behind, seconds_behind) = *self
            .lag
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ProjectorMetrics {
            applied: l(&self.applied),
            parked: l(&self.parked),
            failures: l(&self.failures),
            database_errors: l(&self.database_errors),
            events_behind,
            seconds_behind,
        }
    }
}
