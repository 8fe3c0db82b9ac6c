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

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::message::InboxMessage;

/// The header that carries the trace context: W3C Trace Context's
/// `traceparent`.
pub const HEADER: &str = "traceparent";

/// The span context of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`;
/// a later version may append fields after a `-`), marked remote; `None`
/// when it is malformed, of the forbidden version `ff`, or has an all-zero
/// trace or span id.
pub fn span_context(traceparent: &str) -> Option<SpanContext> {
    let b = traceparent.as_bytes();
    if b.len() < 55 || (b.len() > 55 && (b[..2] == *b"00" || b[55] != b'-')) {
        return None;
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let version = hex::<1>(&b[..2])?;
    if version == [0xff] {
        return None;
    }
    let trace_id = TraceId::from_bytes(hex::<16>(&b[3..35])?);
    let span_id = SpanId::from_bytes(hex::<8>(&b[36..52])?);
    let [flags] = hex::<1>(&b[53..55])?;
    let cx = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & 1),
        true,
        TraceState::NONE,
    );
    cx.is_valid().then_some(cx)
}

/// The OpenTelemetry context of a W3C `traceparent`, to be a span's remote
/// parent; see [`span_context`].
pub fn remote_context(traceparent: &str) -> Option<Context> {
    span_context(traceparent).map(|span| Context::new().with_remote_span_context(span))
}

/// Makes `span` continue the trace of `traceparent` (sets its parent);
/// returns whether it did. It must be called before the span is first
/// entered; it does nothing when `traceparent` is invalid or no
/// OpenTelemetry layer is installed.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) -> bool {
    if span.is_disabled() {
        return false;
    }
    remote_context(traceparent).is_some_and(|cx| span.set_parent(cx).is_ok())
}

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

/// `N` bytes of the lowercase hex `text` (W3C allows no uppercase), twice
/// as long.
fn hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_valid_traceparents() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = span_context(good).unwrap();
        assert_eq!(cx.span_id().to_string(), "00f067aa0ba902b7");
        assert!(cx.is_remote() && cx.is_sampled());
        // A later version may add fields; version 00 may not.
        assert!(span_context(&format!("01-{}-ab", &good[3..])).is_some());
        for bad in [
            "",
            &good[..54],
            &format!("{good}-x"),
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736+00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert!(span_context(bad).is_none(), "{bad:?}");
        }
    }
}
