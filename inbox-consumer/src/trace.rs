//! Trace context across hops (feature `trace`): the handler runs in a span
//! (`inbox.handle`) whose parent is the trace context the message carries
//! in its W3C `traceparent` header, which the `outbox` crate's relays set
//! from what `outbox::enqueue` stored (its own `trace` feature). The trace
//! that enqueued the event thus goes on in the consumer.
//!
//! The spans are `tracing` spans; the parent is set through
//! [`tracing-opentelemetry`](https://docs.rs/tracing-opentelemetry), so the
//! application installs its `OpenTelemetryLayer` (and its exporter). A
//! message without a valid `traceparent` runs in a span that is a child of
//! the current one, as any span. [`Inbox::process_batch`](crate::Inbox::process_batch)'s
//! handler, which takes many messages at once, runs in one span
//! (`inbox.batch`) linked to each message's context.
//!
//! Only `traceparent` travels (not `tracestate` nor baggage).
//!
//! ```
//! use opentelemetry::trace::TraceContextExt;
//!
//! let cx = inbox_consumer::trace::remote_context(
//!     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
//! )
//! .unwrap();
//! assert_eq!(
//!     cx.span().span_context().trace_id().to_string(),
//!     "4bf92f3577b34da6a3ce929d0e0e4736"
//! );
//! assert!(inbox_consumer::trace::remote_context("00-garbage").is_none());
//! ```

use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::message::InboxMessage;

/// The format itself is the `trace-context` crate's, shared with the
/// outbox and the saga.
pub use trace_context::{continue_trace, remote_context, span_context, HEADER};

/// The span `inbox.handle` a message's handler runs in, continuing the
/// message's trace.
pub(crate) fn handle_span(
    consumer: &str,
    message_id: &str,
    message: &InboxMessage,
) -> tracing::Span {
    let span = tracing::info_span!("inbox.handle", consumer, message_id);
    if let Some(traceparent) = message.header(HEADER) {
        continue_trace(&span, traceparent);
    }
    span
}

/// The span `inbox.batch` a batch handler runs in, linked to each message's
/// trace.
pub(crate) fn batch_span(consumer: &str, messages: &[&InboxMessage]) -> tracing::Span {
    let span = tracing::info_span!("inbox.batch", consumer, messages = messages.len());
    if !span.is_disabled() {
        for message in messages {
            if let Some(cx) = message.header(HEADER).and_then(span_context) {
                span.add_link(cx);
            }
        }
    }
    span
}
