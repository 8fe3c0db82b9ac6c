//! Trace context across hops (feature `trace`): [`enqueue`](crate::enqueue)
//! stores the W3C `traceparent` of the current span with the event, and the
//! relay sends it as the message header [`HEADER`], so that the consumer
//! (the `inbox-consumer` crate with its own `trace` feature) continues the
//! producer's trace.
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

use opentelemetry::trace::{SpanContext, TraceContextExt};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The message header (and the outbox column) that carries the trace
/// context: W3C Trace Context's `traceparent`.
pub const HEADER: &str = "traceparent";

/// The length of a version-00 `traceparent`.
const LEN: usize = 55;

/// A W3C `traceparent` of version 00 (`00-<trace id>-<span id>-<flags>`,
/// lowercase hex), held on the stack: making one allocates nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Traceparent([u8; LEN]);

impl Traceparent {
    /// The `traceparent` of the current `tracing` span's OpenTelemetry
    /// context, if it has a valid one.
    pub fn current() -> Option<Self> {
        let span = tracing::Span::current();
        if span.is_none() {
            return None;
        }
        Self::of(span.context().span().span_context())
    }

    /// The `traceparent` of `span`, if it is valid (non-zero ids).
    pub fn of(span: &SpanContext) -> Option<Self> {
        if !span.is_valid() {
            return None;
        }
        let mut out = [b'-'; LEN];
        out[..2].copy_from_slice(b"00");
        hex(&span.trace_id().to_bytes(), &mut out[3..35]);
        hex(&span.span_id().to_bytes(), &mut out[36..52]);
        hex(&[span.trace_flags().to_u8()], &mut out[53..55]);
        Some(Self(out))
    }

    /// The header's value.
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever written (hex digits and '-').
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for Traceparent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for Traceparent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Writes `bytes` as lowercase hex into `out` (twice as long).
fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    #[test]
    fn formats_the_w3c_example() {
        let span = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        );
        assert_eq!(
            Traceparent::of(&span).unwrap().as_str(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert!(Traceparent::of(&SpanContext::NONE).is_none());
    }

    #[test]
    fn no_layer_no_context() {
        let span = tracing::info_span!("no layer");
        let _entered = span.enter();
        assert!(Traceparent::current().is_none());
    }
}
