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

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
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

/// The span context of a W3C `traceparent` (version 00, or a later version
/// with the same first four fields), marked remote; `None` when it is
/// malformed or has an all-zero id.
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
pub(crate) fn parse(traceparent: &str) -> Option<SpanContext> {
    let b = traceparent.as_bytes();
    if b.len() < LEN || (b.len() > LEN && (b[..2] == *b"00" || b[LEN] != b'-')) {
        return None;
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' || b[..2] == *b"ff" {
        return None;
    }
    let _version = unhex::<1>(&b[..2])?;
    let trace_id = TraceId::from_bytes(unhex::<16>(&b[3..35])?);
    let span_id = SpanId::from_bytes(unhex::<8>(&b[36..52])?);
    let [flags] = unhex::<1>(&b[53..55])?;
    let cx = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & 1),
        true,
        TraceState::NONE,
    );
    cx.is_valid().then_some(cx)
}

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
        let Some(parent) = event.header(HEADER).and_then(parse) else {
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

/// `N` bytes of the lowercase hex `text`, twice as long.
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
fn unhex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
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
        let parsed = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(
            Traceparent::of(&parsed).unwrap().as_str(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn no_layer_no_context() {
        let span = tracing::info_span!("no layer");
        let _entered = span.enter();
        assert!(Traceparent::current().is_none());
    }
}
