//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade: this
//! crate and `inbox-consumer` only record; the application installs the
//! exporter it wants (Prometheus, StatsD, OpenTelemetry, ...). With no
//! recorder installed every call is a no-op: the keys are statics (or built
//! once per engine and per inbox), nothing is allocated per request, and a
//! store call that answers at once (the memory store) reads no clock.
//!
//! Install the recorder first, then call [`describe`] once, so that every
//! request outcome is a series (at 0) from the first scrape on, and the
//! exporter has each metric's help text. A scrape endpoint such as
//! `GET /metrics` must be served outside the idempotency layer.
//!
//! # The metrics
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | [`idempotency_requests_total`](REQUESTS_TOTAL) | counter | `outcome` | every covered request, once, under the answer it got |
//! | [`idempotency_store_errors_total`](STORE_ERRORS_TOTAL) | counter | `backend`, `op` | store calls that failed or timed out |
//! | [`idempotency_store_duration_seconds`](STORE_DURATION_SECONDS) | histogram | `backend`, `op` | latency of each store call that waited |
//! | [`idempotency_memory_evictions_total`](MEMORY_EVICTIONS_TOTAL) | counter | `reason` | [`MemoryStore`](crate::MemoryStore): completed records evicted before their ttl, to make room for a record (`capacity`) or for a response's bytes (`bytes`) |
//! | [`inbox_messages_total`](INBOX_MESSAGES_TOTAL) | counter | `consumer`, `outcome` | every delivery an inbox handled, under its outcome |
//! | [`inbox_lease_lost_total`](INBOX_LEASE_LOST_TOTAL) | counter | `consumer` | lease mode: a handler's lease was taken over while it ran |
//!
//! `outcome` of `idempotency_requests_total` ([`outcome`]):
//!
//! - `executed`: the request held the claim and its handler ran (in
//!   transactional mode: the handler ran and its answer went to the client;
//!   a transaction that timed out or failed to commit is `unavailable`);
//! - `replayed`: the stored response was sent again;
//! - `conflict`: 409, the same request is still in flight;
//! - `mismatch`: 422, the key was used for a different request;
//! - `rejected`: refused for what the request is: a missing or invalid key
//!   (400), a scope header given more than once (400), an unreadable body
//!   (400), a body that did not arrive within its bound (408), a body over
//!   the limit (413), a request that completed with a response too large to
//!   store (410);
//! - `unavailable`: the store failed or timed out and the request was
//!   refused (fail-closed 503), or its transaction timed out or failed;
//! - `unguarded`: the store failed and, fail-open, the handler ran without
//!   protection. Its own outcome, not `executed`: such a request may run
//!   twice, and an alert should see it.
//!
//! Requests the layer does not cover (a method it does not guard, no key
//! while keys are optional) are not counted.
//!
//! `op` ([`op`]): `claim`, `complete`, `release`, `extend` (the heartbeat).
//! `backend`: the store's [`backend`](crate::Store::backend) name (`memory`,
//! `redis`, `postgres`, `sqlite`, ...). Both store metrics are recorded in
//! [`Guarded`](crate::Guarded), which every store call of the HTTP engine
//! and of the inbox's lease mode goes through. A call the store answers at
//! once ([`StoreFuture::ready`](crate::StoreFuture::ready): the memory
//! store) is not timed: its latency is that of a function call, and timing
//! it would be the larger part of its cost; its errors are counted all the
//! same. Transactional mode's calls (snapshot, begin, commit) run on the
//! handler's database connection, not through `Guarded`: their failures
//! show as `outcome="unavailable"`.
//!
//! `reason` of `idempotency_memory_evictions_total` ([`eviction_reason`]):
//! `capacity` (the store held its capacity in records, a new claim needed
//! a slot) or `bytes` (a completion would have passed the store's byte
//! bound). A memory store registers both at 0 when it is built.
//!
//! `outcome` of `inbox_messages_total` ([`inbox_outcome`]): `processed`,
//! `duplicate`, `in_flight_elsewhere`, `failed`, `unavailable`, `dead`, the
//! same as `InboxMetrics` in `inbox-consumer`. `consumer` is the inbox's
//! consumer name. The inbox registers its series when it is created, so
//! install the recorder before creating it.
//!
//! # What to alert on
//!
//! - **`unavailable` rising**: `rate(idempotency_requests_total{outcome="unavailable"}[5m])`
//!   above 0 means clients get 503s: the store is down, slow past the store
//!   timeout, or (transactional mode) handlers hold their transaction too
//!   long. Page on it.
//! - **any `unguarded`**: fail-open ran handlers without protection;
//!   duplicates may have run twice.
//! - **store error rate**: `rate(idempotency_store_errors_total[5m])` by
//!   `op`. Errors on `complete` leave records in flight (retries get 409
//!   until the lease passes); errors on `extend` risk a takeover of a slow
//!   handler's claim.
//! - **p99 store latency**: `histogram_quantile(0.99, ...)` of
//!   `idempotency_store_duration_seconds` nearing the store timeout
//!   (default 2 s) comes before `unavailable`.
//! - **`conflict` spikes**: clients retrying faster than their requests
//!   complete (a retry policy without backoff, or a slow handler); `mismatch`
//!   means clients reuse keys for different requests (a client bug).
//! - **memory store evictions**: any rate of
//!   `idempotency_memory_evictions_total` means retries of evicted requests
//!   run their handler again: give the store more room (`capacity`,
//!   `max_bytes`), a shorter ttl, or a shared store.
//! - **inbox**: `failed` and `dead` rising (poison messages, a failing
//!   handler), `unavailable` (the inbox's database), and any
//!   `inbox_lease_lost_total` (an effect may have run twice: make the lease
//!   longer than the slowest handler).

use ::metrics::{Key, Label, Level, Metadata};

/// Counter: every covered request, once, labelled [`label::OUTCOME`] (one of [`outcome`]).
pub const REQUESTS_TOTAL: &str = "idempotency_requests_total";
/// Counter: store calls that failed or timed out, labelled [`label::BACKEND`] and [`label::OP`].
pub const STORE_ERRORS_TOTAL: &str = "idempotency_store_errors_total";
/// Histogram: the latency in seconds of each store call that waited,
/// labelled [`label::BACKEND`] and [`label::OP`].
pub const STORE_DURATION_SECONDS: &str = "idempotency_store_duration_seconds";
/// Counter: the memory store's completed records evicted before their ttl,
/// labelled [`label::REASON`] (one of [`eviction_reason`]).
pub const MEMORY_EVICTIONS_TOTAL: &str = "idempotency_memory_evictions_total";
/// Counter: every delivery an inbox handled, labelled [`label::CONSUMER`]
/// and [`label::OUTCOME`] (one of [`inbox_outcome`]).
pub const INBOX_MESSAGES_TOTAL: &str = "inbox_messages_total";
/// Counter: lease mode, a handler's lease was taken over while it ran,
/// labelled [`label::CONSUMER`].
pub const INBOX_LEASE_LOST_TOTAL: &str = "inbox_lease_lost_total";

/// Label names.
pub mod label {
    /// What became of a request or a message.
    pub const OUTCOME: &str = "outcome";
    /// The store's backend name.
    pub const BACKEND: &str = "backend";
    /// The store call: one of [`op`](super::op).
    pub const OP: &str = "op";
    /// The inbox's consumer name.
    pub const CONSUMER: &str = "consumer";
    /// Why a record was evicted: one of [`eviction_reason`](super::eviction_reason).
    pub const REASON: &str = "reason";
}

/// The values of `reason` for [`MEMORY_EVICTIONS_TOTAL`].
pub mod eviction_reason {
    /// The store held its capacity in records.
    pub const CAPACITY: &str = "capacity";
    /// The store's responses would have passed its byte bound.
    pub const BYTES: &str = "bytes";
    /// Every value, in this order.
    pub const ALL: [&str; 2] = [CAPACITY, BYTES];
}

/// The values of `outcome` for [`REQUESTS_TOTAL`].
pub mod outcome {
    /// The handler ran, holding the claim.
    pub const EXECUTED: &str = "executed";
    /// The stored response was sent again.
    pub const REPLAYED: &str = "replayed";
    /// 409: the same request is in flight.
    pub const CONFLICT: &str = "conflict";
    /// 422: the key was used for a different request.
    pub const MISMATCH: &str = "mismatch";
    /// Refused for what the request is (400, 408, 410, 413).
    pub const REJECTED: &str = "rejected";
    /// The store or the transaction failed: 503.
    pub const UNAVAILABLE: &str = "unavailable";
    /// The store failed and, fail-open, the handler ran unprotected.
    pub const UNGUARDED: &str = "unguarded";
    /// Every value, in this order.
    pub const ALL: [&str; 7] = [
        EXECUTED,
        REPLAYED,
        CONFLICT,
        MISMATCH,
        REJECTED,
        UNAVAILABLE,
        UNGUARDED,
    ];
}

/// The values of `op` for the store metrics.
pub mod op {
    /// [`Store::claim`](crate::Store::claim).
    pub const CLAIM: &str = "claim";
    /// [`Store::complete`](crate::Store::complete).
    pub const COMPLETE: &str = "complete";
    /// [`Store::release`](crate::Store::release).
    pub const RELEASE: &str = "release";
    /// [`Store::extend`](crate::Store::extend) (the heartbeat).
    pub const EXTEND: &str = "extend";
    /// Every value, in this order.
    pub const ALL: [&str; 4] = [CLAIM, COMPLETE, RELEASE, EXTEND];
}

/// The values of `outcome` for [`INBOX_MESSAGES_TOTAL`].
pub mod inbox_outcome {
    /// The handler ran and its effect committed.
    pub const PROCESSED: &str = "processed";
    /// Seen before; acked without running the handler.
    pub const DUPLICATE: &str = "duplicate";
    /// Held by another consumer's lease.
    pub const IN_FLIGHT_ELSEWHERE: &str = "in_flight_elsewhere";
    /// The handler failed; requeued.
    pub const FAILED: &str = "failed";
    /// The inbox's own database or store failed; requeued.
    pub const UNAVAILABLE: &str = "unavailable";
    /// Dead-lettered.
    pub const DEAD: &str = "dead";
    /// Every value, in this order.
    pub const ALL: [&str; 6] = [
        PROCESSED,
        DUPLICATE,
        IN_FLIGHT_ELSEWHERE,
        FAILED,
        UNAVAILABLE,
        DEAD,
    ];
}

/// The metadata of every metric this crate records.
static METADATA: Metadata<'static> =
    Metadata::new("idempotency_core", Level::INFO, Some(module_path!()));

/// Describes every metric to the installed recorder (its help text and
/// unit), and registers each request outcome at 0 so that a scrape right
/// after startup lists all of them. Call it once, after installing the
/// recorder; it records nothing else.
pub fn describe() {
    ::metrics::describe_counter!(
        REQUESTS_TOTAL,
        "Requests the idempotency layer decided, by outcome (executed, replayed, conflict, mismatch, rejected, unavailable, unguarded)"
    );
    ::metrics::describe_counter!(
        STORE_ERRORS_TOTAL,
        "Idempotency store calls that failed or timed out, by backend and op"
    );
    ::metrics::describe_histogram!(
        STORE_DURATION_SECONDS,
        ::metrics::Unit::Seconds,
        "Latency of idempotency store calls that waited, by backend and op"
    );
    ::metrics::describe_counter!(
        MEMORY_EVICTIONS_TOTAL,
        "Memory store: completed records evicted before their ttl, by reason (capacity, bytes)"
    );
    ::metrics::describe_counter!(
        INBOX_MESSAGES_TOTAL,
        "Deliveries an inbox handled, by consumer and outcome"
    );
    ::metrics::describe_counter!(
        INBOX_LEASE_LOST_TOTAL,
        "Inbox lease mode: handlers whose lease was taken over while they ran"
    );
    ::metrics::with_recorder(|r| {
        for key in REQUEST_KEYS {
            r.register_counter(key, &METADATA).increment(0);
        }
    });
}

/// What became of a covered request: see [`outcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Executed,
    Replayed,
    Conflict,
    Mismatch,
    Rejected,
    Unavailable,
    Unguarded,
}

macro_rules! static_key {
    ($name:expr, $($k:expr => $v:expr),+) => {{
        static LABELS: [Label; [$($k),+].len()] = [$(Label::from_static_parts($k, $v)),+];
        static KEY: Key = Key::from_static_parts($name, &LABELS);
        &KEY
    }};
}

/// The key of each outcome, in the order of [`outcome::ALL`].
static REQUEST_KEYS: [&Key; 7] = [
    static_key!(REQUESTS_TOTAL, label::OUTCOME => outcome::EXECUTED),
    static_key!(REQUESTS_TOTAL, label::OUTCOME => outcome::REPLAYED),
    static_key!(REQUESTS_TOTAL, label::OUTCOME => outcome::CONFLICT),
    static_key!(REQUESTS_TOTAL, label::OUTCOME => outcome::MISMATCH),
    static_key!(REQUESTS_TOTAL, label::OUTCOME => outcome::REJECTED),
    static_key!(REQUESTS_TOTAL, label::OUTCOME => outcome::UNAVAILABLE),
    static_key!(REQUESTS_TOTAL, label::OUTCOME => outcome::UNGUARDED),
];

/// Counts one request under `outcome`: a static key, no allocation; with no
/// recorder, a thread-local read, an atomic load and a no-op.
#[inline]
pub(crate) fn request(outcome: Outcome) {
    let key = REQUEST_KEYS[outcome as usize];
    ::metrics::with_recorder(|r| r.register_counter(key, &METADATA)).increment(1);
}

/// Why the memory store evicted a record: see [`eviction_reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Eviction {
    Capacity,
    Bytes,
}

impl Eviction {
    pub(crate) fn as_str(self) -> &'static str {
        eviction_reason::ALL[self as usize]
    }
}

/// The key of each eviction reason, in the order of [`eviction_reason::ALL`].
static EVICTION_KEYS: [&Key; 2] = [
    static_key!(MEMORY_EVICTIONS_TOTAL, label::REASON => eviction_reason::CAPACITY),
    static_key!(MEMORY_EVICTIONS_TOTAL, label::REASON => eviction_reason::BYTES),
];

/// Counts one eviction of the memory store.
pub(crate) fn memory_eviction(reason: Eviction) {
    let key = EVICTION_KEYS[reason as usize];
    ::metrics::with_recorder(|r| r.register_counter(key, &METADATA)).increment(1);
}

/// Registers the memory store's eviction counters at 0 with the recorder
/// installed now, if any, so that they are series from startup.
pub(crate) fn register_memory_evictions() {
    ::metrics::with_recorder(|r| {
        for key in EVICTION_KEYS {
            r.register_counter(key, &METADATA).increment(0);
        }
    });
}

/// A store call, for [`StoreMetrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Claim,
    Complete,
    Release,
    Extend,
}

/// The store metrics' keys of one backend, built once per
/// [`Guarded`](crate::Guarded), by op.
#[derive(Debug)]
pub(crate) struct StoreMetrics([OpMetrics; 4]);

/// The keys of one op of one backend.
#[derive(Debug)]
pub(crate) struct OpMetrics {
    errors: Key,
    duration: Key,
}

impl StoreMetrics {
    /// The keys for `backend`; its error counters are registered (at 0) with
    /// the recorder installed now, if any.
    pub(crate) fn new(backend: &'static str) -> Self {
        let key = |name: &'static str, op: &'static str| {
            Key::from_parts(
                name,
                vec![
                    Label::from_static_parts(label::BACKEND, backend),
                    Label::from_static_parts(label::OP, op),
                ],
            )
        };
        let metrics = Self(op::ALL.map(|op| OpMetrics {
            errors: key(STORE_ERRORS_TOTAL, op),
            duration: key(STORE_DURATION_SECONDS, op),
        }));
        ::metrics::with_recorder(|r| {
            for op in &metrics.0 {
                r.register_counter(&op.errors, &METADATA).increment(0);
            }
        });
        metrics
    }

    /// The keys of `op`.
    pub(crate) fn op(&self, op: Op) -> &OpMetrics {
        &self.0[op as usize]
    }
}

impl OpMetrics {
    /// Counts a failed call.
    pub(crate) fn error(&self) {
        ::metrics::with_recorder(|r| r.register_counter(&self.errors, &METADATA)).increment(1);
    }

    /// Records a call that started at `start` (from [`clock`]).
    pub(crate) fn duration(&self, start: u64) {
        let seconds = clock().saturating_sub(start) as f64 / 1e9;
        ::metrics::with_recorder(|r| r.register_histogram(&self.duration, &METADATA))
            .record(seconds);
    }
}

/// Nanoseconds on the monotonic clock since its first use: 8 bytes to keep
/// in a store call's future, where an `Instant` takes 16.
pub(crate) fn clock() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_names() {
        for (i, key) in REQUEST_KEYS.iter().enumerate() {
            assert_eq!(key.name(), REQUESTS_TOTAL);
            let labels: Vec<_> = key.labels().map(|l| (l.key(), l.value())).collect();
            assert_eq!(labels, [(label::OUTCOME, outcome::ALL[i])]);
        }
        let store = StoreMetrics::new("memory");
        for (i, op) in op::ALL.into_iter().enumerate() {
            let keys = &store.0[i];
            for key in [&keys.errors, &keys.duration] {
                let labels: Vec<_> = key.labels().map(|l| (l.key(), l.value())).collect();
                assert_eq!(labels, [(label::BACKEND, "memory"), (label::OP, op)]);
            }
        }
        assert_eq!(
            [Op::Claim, Op::Complete, Op::Release, Op::Extend].map(|o| o as usize),
            [0, 1, 2, 3]
        );
        let outcomes = [
            Outcome::Executed,
            Outcome::Replayed,
            Outcome::Conflict,
            Outcome::Mismatch,
            Outcome::Rejected,
            Outcome::Unavailable,
            Outcome::Unguarded,
        ];
        assert_eq!(outcomes.map(|o| o as usize), [0, 1, 2, 3, 4, 5, 6]);
        for (i, key) in EVICTION_KEYS.iter().enumerate() {
            assert_eq!(key.name(), MEMORY_EVICTIONS_TOTAL);
            let labels: Vec<_> = key.labels().map(|l| (l.key(), l.value())).collect();
            assert_eq!(labels, [(label::REASON, eviction_reason::ALL[i])]);
        }
        assert_eq!(
            [Eviction::Capacity, Eviction::Bytes].map(Eviction::as_str),
            eviction_reason::ALL
        );
    }
}
