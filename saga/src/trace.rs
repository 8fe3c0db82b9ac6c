//! Trace context across a saga's steps (feature `trace`): an instance keeps
//! the W3C `traceparent` of the span that started it, and each step's span
//! (`saga.step`) continues that trace, so the commands it enqueues (through
//! the outbox, which stores the step's context with them), the participants
//! that handle them and the replies all belong to one trace. Without the
//! feature this is an empty type and the spans are as before.

/// The trace an instance continues: the `traceparent` stored at its start
/// (feature `trace`); nothing without the feature.
#[derive(Debug, Clone, Default)]
pub(crate) struct Trace {
    #[cfg(feature = "trace")]
    traceparent: Option<String>,
}

impl Trace {
    /// The trace of an instance's row (its `traceparent` column, which
    /// [`SELECT_INSTANCE`](crate::runtime) selects with the feature).
    #[cfg_attr(not(feature = "trace"), allow(clippy::unnecessary_wraps))]
    pub(crate) fn of_row(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        #[cfg(feature = "trace")]
        {
            use sqlx::Row as _;
            Ok(Self {
                traceparent: row.try_get("traceparent")?,
            })
        }
        #[cfg(not(feature = "trace"))]
        {
            let _ = row;
            Ok(Self {})
        }
    }

    /// `span`, made to continue the instance's trace when there is one.
    pub(crate) fn continued(&self, span: tracing::Span) -> tracing::Span {
        #[cfg(feature = "trace")]
        if let Some(traceparent) = &self.traceparent {
            inbox_consumer::trace::continue_trace(&span, traceparent);
        }
        span
    }
}

/// The column of the stored `traceparent` in the instance's `SELECT`.
#[cfg(feature = "trace")]
macro_rules! trace_column {
    () => {
        ", traceparent"
    };
}
#[cfg(not(feature = "trace"))]
macro_rules! trace_column {
    () => {
        ""
    };
}
pub(crate) use trace_column;
