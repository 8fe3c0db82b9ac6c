//! RFC 9457 `application/problem+json` responses for every refusal.

use std::time::Duration;

use crate::key::KeyError;

/// The media type of every refusal.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The kinds of refusal, each with a stable `type` URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// 400: a covered request has no `Idempotency-Key` and one is required.
    MissingKey,
    /// 400: the key is malformed, too long, or given more than once.
    InvalidKey,
    /// 400: the request body could not be read.
    UnreadableBody,
    /// 408: the request body did not arrive within the engine's bound
    /// ([`request_body_timeout`](crate::IdempotencyConfigBuilder::request_body_timeout));
    /// the connection is closed after the answer.
    RequestTimeout,
    /// 400: the request carries its scope header (say `Authorization`)
    /// more than once, so the scope it belongs to is ambiguous.
    AmbiguousScope,
    /// 413: the request body is over the limit.
    BodyTooLarge,
    /// 409: a request with this key is still being processed.
    InFlight,
    /// 422: the key was used before with a different request.
    KeyReused,
    /// 410: the first response was too large to store; it cannot be replayed.
    NotReplayable,
    /// 503: the idempotency store is unavailable.
    StoreUnavailable,
    /// 503: in transactional mode, the handler held its transaction longer
    /// than the bound; the effect and the record were rolled back.
    TransactionTimeout,
    /// 500: the server is wired wrongly (a handler asked for a transaction
    /// its route does not have); the cause is logged, never shown.
    Internal,
}

impl ProblemKind {
    /// The `type` member: a URN per kind, stable across versions.
    pub const fn type_uri(self) -> &'static str {
        match self {
            ProblemKind::MissingKey => "urn:idempotency:problem:missing-key",
            ProblemKind::InvalidKey => "urn:idempotency:problem:invalid-key",
            ProblemKind::UnreadableBody => "urn:idempotency:problem:unreadable-body",
            ProblemKind::RequestTimeout => "urn:idempotency:problem:request-timeout",
            ProblemKind::AmbiguousScope => "urn:idempotency:problem:ambiguous-scope",
            ProblemKind::BodyTooLarge => "urn:idempotency:problem:body-too-large",
            ProblemKind::InFlight => "urn:idempotency:problem:in-flight",
            ProblemKind::KeyReused => "urn:idempotency:problem:key-reused",
            ProblemKind::NotReplayable => "urn:idempotency:problem:not-replayable",
            ProblemKind::StoreUnavailable => "urn:idempotency:problem:store-unavailable",
            ProblemKind::TransactionTimeout => "urn:idempotency:problem:transaction-timeout",
            ProblemKind::Internal => "urn:idempotency:problem:internal",
        }
    }

    /// The `title` member.
    pub const fn title(self) -> &'static str {
        match self {
            ProblemKind::MissingKey => "Idempotency-Key is missing",
            ProblemKind::InvalidKey => "Idempotency-Key is invalid",
            ProblemKind::UnreadableBody => "Request body could not be read",
            ProblemKind::RequestTimeout => "Request body was not received in time",
            ProblemKind::AmbiguousScope => "The request's scope is ambiguous",
            ProblemKind::BodyTooLarge => "Request body is too large",
            ProblemKind::InFlight => "A request with this Idempotency-Key is in progress",
            ProblemKind::KeyReused => "Idempotency-Key was used for a different request",
            ProblemKind::NotReplayable => "The original response cannot be replayed",
            ProblemKind::StoreUnavailable => "Idempotency store is unavailable",
            ProblemKind::TransactionTimeout => "The request took too long and was rolled back",
            ProblemKind::Internal => "Internal server error",
        }
    }

    /// The HTTP status.
    pub const fn status(self) -> u16 {
        match self {
            ProblemKind::MissingKey
            | ProblemKind::InvalidKey
            | ProblemKind::UnreadableBody
            | ProblemKind::AmbiguousScope => 400,
            ProblemKind::RequestTimeout => 408,
            ProblemKind::BodyTooLarge => 413,
            ProblemKind::InFlight => 409,
            ProblemKind::KeyReused => 422,
            ProblemKind::NotReplayable => 410,
            ProblemKind::StoreUnavailable | ProblemKind::TransactionTimeout => 503,
            ProblemKind::Internal => 500,
        }
    }
}

/// A refusal, ready to be turned into a response by an adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    kind: ProblemKind,
    detail: String,
    retry_after: Option<u64>,
}

impl Problem {
    /// A problem of `kind` with a human-readable `detail`.
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// Adds `Retry-After`, rounded up to whole seconds (at least 1).
    #[must_use]
    pub fn retry_after(mut self, after: Duration) -> Self {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        self.retry_after = Some(secs.max(1));
        self
    }

    pub(crate) fn from_key_error(e: &KeyError) -> Self {
        match e {
            KeyError::Missing => Self::new(
                ProblemKind::MissingKey,
                "This endpoint requires an Idempotency-Key header: send a unique value (for example a UUID) per logical operation, and the same value when you retry it.",
            ),
            other => Self::new(ProblemKind::InvalidKey, other.to_string()),
        }
    }

    /// The kind.
    pub fn kind(&self) -> ProblemKind {
        self.kind
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The `detail` member.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The `Retry-After` value in seconds, if any.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
    }

    /// The JSON body.
    pub fn to_json(&self) -> String {
        let mut s = String::with_capacity(160 + self.detail.len());
        s.push_str("{\"type\":");
        json_string(&mut s, self.kind.type_uri());
        s.push_str(",\"title\":");
        json_string(&mut s, self.kind.title());
        s.push_str(",\"status\":");
        s.push_str(&self.status().to_string());
        s.push_str(",\"detail\":");
        json_string(&mut s, &self.detail);
        s.push('}');
        s
    }

    /// Whether the connection should be closed after this answer: a 408,
    /// whose request body was not read to its end (RFC 9110, section 15.5.9).
    pub fn closes_connection(&self) -> bool {
        self.kind == ProblemKind::RequestTimeout
    }

    /// The response headers: content type, `Retry-After` when set, and
    /// `Connection: close` when [`closes_connection`](Self::closes_connection).
    pub fn headers(&self) -> ProblemHeaders {
        ProblemHeaders {
            content_type: true,
            retry_after: self.retry_after,
            close: self.closes_connection(),
        }
    }
}

/// The headers of a [`Problem`]: its content type, then `Retry-After` when
/// set, then `Connection: close` when the connection should not be reused.
#[derive(Debug, Clone)]
pub struct ProblemHeaders {
    content_type: bool,
    retry_after: Option<u64>,
    close: bool,
}

impl Iterator for ProblemHeaders {
    type Item = (&'static str, bytes::Bytes);

    fn next(&mut self) -> Option<Self::Item> {
        if std::mem::take(&mut self.content_type) {
            return Some((
                "content-type",
                bytes::Bytes::from_static(PROBLEM_JSON.as_bytes()),
            ));
        }
        if let Some(secs) = self.retry_after.take() {
            return Some(("retry-after", crate::record::decimal(secs as usize)));
        }
        std::mem::take(&mut self.close).then(|| ("connection", bytes::Bytes::from_static(b"close")))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = usize::from(self.content_type)
            + usize::from(self.retry_after.is_some())
            + usize::from(self.close);
        (n, Some(n))
    }
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_four_members_and_escapes() {
        let p = Problem::new(ProblemKind::InFlight, "a \"quoted\"\n\u{1} detail")
            .retry_after(Duration::from_millis(1500));
        let j = p.to_json();
        assert!(j.starts_with("{\"type\":\"urn:idempotency:problem:in-flight\""));
        assert!(j.contains("\"status\":409"));
        assert!(j.contains(r#""detail":"a \"quoted\"\n\u0001 detail""#));
        assert_eq!(p.retry_after_secs(), Some(2));
        let h: Vec<_> = p.headers().collect();
        assert_eq!(h[1], ("retry-after", bytes::Bytes::from_static(b"2")));
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn a_408_closes_the_connection() {
        let p = Problem::new(ProblemKind::RequestTimeout, "slow");
        assert_eq!(p.status(), 408);
        let h: Vec<_> = p.headers().collect();
        assert_eq!(p.headers().size_hint(), (2, Some(2)));
        assert_eq!(h[1], ("connection", bytes::Bytes::from_static(b"close")));
    }
}
