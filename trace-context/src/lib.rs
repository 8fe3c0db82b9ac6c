//! The W3C Trace Context `traceparent` that the workspace's hops carry: the
//! `outbox` stores it with an event and its relays send it as a message
//! header, the `inbox-consumer` continues it in the handler's span, and the
//! `saga` in each step's span (each crate's feature `trace`). One
//! implementation of the format, here, for all of them.
//!
//! The spans are `tracing` spans; their OpenTelemetry context comes from
//! [`tracing-opentelemetry`](https://docs.rs/tracing-opentelemetry), so the
//! application installs its `OpenTelemetryLayer` (with the exporter of its
//! choice). Without that layer, or outside any span, there is no valid
//! context: nothing is stored and nothing is continued. Only `traceparent`
//! travels (not `tracestate` nor baggage).
//!
//! # Quick start
//!
//! ```
//! use opentelemetry::trace::TraceContextExt;
//!
//! // What a consumer does with a message's header: a remote parent.
//! let cx = trace_context::remote_context(
//!     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
//! )
//! .unwrap();
//! assert_eq!(
//!     cx.span().span_context().trace_id().to_string(),
//!     "4bf92f3577b34da6a3ce929d0e0e4736"
//! );
//! // Malformed, version ff, upper case or all-zero ids: nothing to continue.
//! assert!(trace_context::remote_context("00-garbage").is_none());
//! // What a producer stores: the current span's, none without a layer.
//! assert!(trace_context::Traceparent::current().is_none());
//! ```
//!
//! # Guarantees
//!
//! - **Concurrency:** pure functions of their input and of the current
//!   span; nothing shared.
//! - **Crashes and outages:** nothing is kept here; a `traceparent` lives
//!   where the caller stores it (the outbox's row, the saga's instance).
//! - **Bad input** (a header from anywhere): refused as `None`, never a
//!   panic; making a [`Traceparent`] allocates nothing.
#![forbid(unsafe_code)]

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The message header (and the outbox's column) that carries the trace
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

/// The span context of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`;
/// a later version may append fields after a `-`), marked remote; `None`
/// when it is malformed, of the forbidden version `ff`, or has an all-zero
/// trace or span id.
pub fn span_context(traceparent: &str) -> Option<SpanContext> {
    let b = traceparent.as_bytes();
    if b.len() < LEN || (b.len() > LEN && (b[..2] == *b"00" || b[LEN] != b'-')) {
        return None;
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    if unhex::<1>(&b[..2])? == [0xff] {
        return None;
    }
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

/// `N` bytes of the lowercase hex `text` (W3C allows no uppercase), twice
/// as long.
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

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn formats_the_w3c_example_and_parses_it_back() {
        let span = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        );
        assert_eq!(Traceparent::of(&span).unwrap().as_str(), GOOD);
        assert!(Traceparent::of(&SpanContext::NONE).is_none());
        let parsed = span_context(GOOD).unwrap();
        assert_eq!(Traceparent::of(&parsed).unwrap().as_str(), GOOD);
    }

    #[test]
    fn parses_only_valid_traceparents() {
        let cx = span_context(GOOD).unwrap();
        assert_eq!(cx.span_id().to_string(), "00f067aa0ba902b7");
        assert!(cx.is_remote() && cx.is_sampled());
        // A later version may add fields; version 00 may not.
        assert!(span_context(&format!("01-{}-ab", &GOOD[3..])).is_some());
        for bad in [
            "",
            &GOOD[..54],
            &format!("{GOOD}-x"),
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

    #[test]
    fn no_layer_no_context() {
        let span = tracing::info_span!("no layer");
        let _entered = span.enter();
        assert!(Traceparent::current().is_none());
    }
}
