//! The sagas' metrics, through the [`metrics`](https://docs.rs/metrics)
//! facade. Install the exporter you use, then call [`describe`].
//!
//! | name | kind | labels | what it counts |
//! |---|---|---|---|
//! | `saga_instances` | gauge | `saga`, `state` | instances in each state (refreshed by the workers every `gauge_interval`) |
//! | `saga_instances_ended_total` | counter | `saga`, `state` | instances that reached `completed`, `compensated` or `failed` |
//! | `saga_steps_total` | counter | `saga`, `step`, `outcome` | actions (steps and compensations) that ended: `done`, `failed` (definitely), `timeout` |
//! | `saga_step_duration_seconds` | histogram | `saga`, `step` | from an action's start to its end, across retries and crashes |
//! | `saga_calls_total` | counter | `saga`, `step`, `outcome` | calls made: `done`, `failed`, `uncertain` |
//! | `saga_call_duration_seconds` | histogram | `saga`, `step` | one call, as the worker waited for it |
//! | `saga_compensations_total` | counter | `saga` | instances that began compensating |
//! | `saga_timeouts_total` | counter | `saga`, `step` | replies that did not come in time |
//!
//! Every label is a name from a definition, so the series are bounded.
//!
//! What to alert on: `saga_instances{state="failed"}` above 0 (an operator
//! decides: resume, retry the step, or compensate); a rising
//! `saga_instances{state="running"}` with flat `saga_instances_ended_total`
//! (workers stopped, or a service stopped answering); `saga_calls_total{outcome="uncertain"}`
//! growing (a called service is down: its calls are retried); the
//! p99 of `saga_step_duration_seconds` against the step's timeout.

use std::time::Duration;

use crate::machine::State;

/// Instances in each state (gauge).
pub const SAGA_INSTANCES: &str = "saga_instances";
/// Instances that ended, by final state (counter).
pub const SAGA_INSTANCES_ENDED_TOTAL: &str = "saga_instances_ended_total";
/// Actions that ended, by outcome (counter).
pub const SAGA_STEPS_TOTAL: &str = "saga_steps_total";
/// An action's duration, start to end (histogram, seconds).
pub const SAGA_STEP_DURATION_SECONDS: &str = "saga_step_duration_seconds";
/// Calls made, by outcome (counter).
pub const SAGA_CALLS_TOTAL: &str = "saga_calls_total";
/// One call's duration (histogram, seconds).
pub const SAGA_CALL_DURATION_SECONDS: &str = "saga_call_duration_seconds";
/// Instances that began compensating (counter).
pub const SAGA_COMPENSATIONS_TOTAL: &str = "saga_compensations_total";
/// Replies that did not come in time (counter).
pub const SAGA_TIMEOUTS_TOTAL: &str = "saga_timeouts_total";

/// Describes every series to the installed recorder.
pub fn describe() {
    metrics::describe_gauge!(SAGA_INSTANCES, "Saga instances in each state.");
    metrics::describe_counter!(
        SAGA_INSTANCES_ENDED_TOTAL,
        "Saga instances that reached a final state."
    );
    metrics::describe_counter!(SAGA_STEPS_TOTAL, "Saga actions that ended, by outcome.");
    metrics::describe_histogram!(
        SAGA_STEP_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time from a saga action's start to its end."
    );
    metrics::describe_counter!(SAGA_CALLS_TOTAL, "Calls saga steps made, by outcome.");
    metrics::describe_histogram!(
        SAGA_CALL_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Duration of one call of a saga step."
    );
    metrics::describe_counter!(
        SAGA_COMPENSATIONS_TOTAL,
        "Saga instances that began compensating."
    );
    metrics::describe_counter!(
        SAGA_TIMEOUTS_TOTAL,
        "Saga steps whose reply did not come in time."
    );
}

pub(crate) struct Metrics;

impl Metrics {
    pub(crate) fn instances(saga: &'static str, state: State, n: u64) {
        #[allow(clippy::cast_precision_loss)] // counts of instances fit
        metrics::gauge!(SAGA_INSTANCES, "saga" => saga, "state" => state.as_str()).set(n as f64);
    }

    pub(crate) fn ended(saga: &'static str, state: State) {
        metrics::counter!(SAGA_INSTANCES_ENDED_TOTAL, "saga" => saga, "state" => state.as_str())
            .increment(1);
    }

    pub(crate) fn step(
        saga: &'static str,
        step: &'static str,
        outcome: &'static str,
        seconds: f64,
    ) {
        metrics::counter!(SAGA_STEPS_TOTAL, "saga" => saga, "step" => step, "outcome" => outcome)
            .increment(1);
        metrics::histogram!(SAGA_STEP_DURATION_SECONDS, "saga" => saga, "step" => step)
            .record(seconds.max(0.0));
    }

    pub(crate) fn call<D>(
        saga: &'static str,
        step: &'static str,
        outcome: &crate::CallOutcome<D>,
        took: Duration,
    ) {
        let outcome = match outcome {
            crate::CallOutcome::Done(_) => "done",
            crate::CallOutcome::Failed(_) => "failed",
            crate::CallOutcome::Uncertain(_) => "uncertain",
        };
        metrics::counter!(SAGA_CALLS_TOTAL, "saga" => saga, "step" => step, "outcome" => outcome)
            .increment(1);
        metrics::histogram!(SAGA_CALL_DURATION_SECONDS, "saga" => saga, "step" => step)
            .record(took.as_secs_f64());
    }

    pub(crate) fn compensation(saga: &'static str) {
        metrics::counter!(SAGA_COMPENSATIONS_TOTAL, "saga" => saga).increment(1);
    }

    pub(crate) fn timeout(saga: &'static str, step: &'static str) {
        metrics::counter!(SAGA_TIMEOUTS_TOTAL, "saga" => saga, "step" => step).increment(1);
    }
}
