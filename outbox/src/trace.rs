//! Trace context across hops (feature `trace`): [`enqueue`](crate::enqueue)
//! stores the W3C `traceparent` of the current span with the event, and the
//! relay publishes the event in a span `outbox.publish` that continues it
//! and sends that span's context as the message header [`HEADER`], so that
//! the consumer (the `inbox-consumer` crate with its own `trace` feature)
//! continues the producer's trace.
//!
//! The current span's OpenTelemetry context comes from
//! [`tracing-opentelemetry`](https://docs.rs/tracing-opentelemetry): the
//! application installs its `OpenTelemetryLayer` (with the exporter of its
//! choice). Without that layer, or outside any span, there is no valid
//! context and nothing is stored.
//!
//! ```
//! // No OpenTelemetry layer installed: no trace context to store.
//! assert!(outbox::trace::Traceparent::current().is_none());
//! ```

#[cfg(any(feature = "postgres", feature = "sqlite"))]
use opentelemetry::trace::TraceContextExt;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The format itself (making, parsing) is the `trace-context` crate's,
/// shared with the inbox and the saga.
pub use trace_context::{Traceparent, HEADER};

/// The relay's hop (feature `trace`): for each event of `batch` that carries
/// a valid `traceparent` header, a span `outbox.publish` (relay,
/// destination, event id) that continues it, and the header set to that
/// span's context, so that the consumer's span is its child. The spans end
/// when the returned vector is dropped (after the batch is marked).
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) fn publish_spans(relay: &str, batch: &mut [crate::Outgoing]) -> Vec<tracing::Span> {
    let mut spans = Vec::new();
    for outgoing in batch {
        let event = &mut outgoing.event;
        let Some(parent) = event.header(HEADER).and_then(trace_context::span_context) else {
            continue;
        };
        let span = tracing::info_span!(
            "outbox.publish",
            relay,
            destination = event.destination(),
            event_id = %event.id()
        );
        if span.is_disabled()
            || span
                .set_parent(opentelemetry::Context::new().with_remote_span_context(parent))
                .is_err()
        {
            continue;
        }
        if let Some(traceparent) = Traceparent::of(span.context().span().span_context()) {
            event.set_traceparent(traceparent.as_str());
        }
        spans.push(span);
    }
    spans
}
