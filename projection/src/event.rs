//! What a projection applies: an event from the outbox table or a broker.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::ApplyError;

/// One event, as [`Projection::apply`](crate::Projection::apply) gets it.
///
/// From the outbox table every field is there; from a broker (through the
/// inbox) the id is the message's id (AMQP `message_id`, `Nats-Msg-Id`:
/// the outbox event's id when the outbox relay published it), with its
/// headers and payload, and no `seq`, destination, ordering key or time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    id: String,
    seq: Option<i64>,
    destination: Option<String>,
    ordering_key: Option<String>,
    headers: Vec<(String, String)>,
    payload: Bytes,
    created_at: Option<SystemTime>,
}

impl Event {
    /// An event with this id and payload and nothing else (to test a
    /// projection's `apply` without a database of events).
    pub fn new(id: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            id: id.into(),
            seq: None,
            destination: None,
            ordering_key: None,
            headers: Vec::new(),
            payload: payload.into(),
            created_at: None,
        }
    }

    /// With this ordering key.
    #[must_use]
    pub fn with_ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// With this destination.
    #[must_use]
    pub fn with_destination(mut self, destination: impl Into<String>) -> Self {
        self.destination = Some(destination.into());
        self
    }

    /// With one more header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// An event of the outbox table.
    pub(crate) fn from_outbox(row: OutboxRow) -> Self {
        Self {
            id: row.id,
            seq: Some(row.seq),
            destination: Some(row.destination),
            ordering_key: row.ordering_key,
            headers: row.headers,
            payload: row.payload.into(),
            created_at: row
                .created_at
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(s)),
        }
    }

    /// A broker's message, as the inbox got it (its id is there: the inbox
    /// dead-letters a message without one before the handler runs).
    pub(crate) fn from_message(message: &inbox_consumer::InboxMessage) -> Self {
        Self {
            id: message.id().unwrap_or_default().to_owned(),
            seq: None,
            destination: None,
            ordering_key: None,
            headers: message.headers().to_vec(),
            payload: message.payload().clone(),
            created_at: None,
        }
    }

    /// The event's id (the outbox event's UUID, as text).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its position in the outbox table (`outbox.events.seq`); `None` from
    /// a broker.
    pub fn seq(&self) -> Option<i64> {
        self.seq
    }

    /// Its destination (queue or subject) in the outbox; `None` from a broker.
    pub fn destination(&self) -> Option<&str> {
        self.destination.as_deref()
    }

    /// Its ordering key; `None` for a keyless event and from a broker.
    pub fn ordering_key(&self) -> Option<&str> {
        self.ordering_key.as_deref()
    }

    /// Its headers, in order.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The first header named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// When its transaction started (`outbox.events.created_at`); `None`
    /// from a broker.
    pub fn created_at(&self) -> Option<SystemTime> {
        self.created_at
    }

    /// The payload as JSON. A payload that does not decode is a
    /// [permanent](ApplyError::permanent) failure: no retry can cure it, so
    /// the event is parked at once, with the reason.
    ///
    /// # Errors
    /// The decoding error, as a permanent [`ApplyError`].
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApplyError> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            ApplyError::permanent(format!(
                "event {}: the payload is not the JSON expected: {e}",
                self.id
            ))
        })
    }
}

/// The columns of one row of `outbox.events` the tail reads.
pub(crate) struct OutboxRow {
    pub(crate) seq: i64,
    pub(crate) id: String,
    pub(crate) destination: String,
    pub(crate) ordering_key: Option<String>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) payload: Vec<u8>,
    /// Seconds since the epoch.
    pub(crate) created_at: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_that_does_not_decode_is_permanent() {
        #[derive(serde::Deserialize, Debug)]
        struct Payment {
            #[allow(dead_code)]
            amount: i64,
        }
        let e = Event::new("e-1", &b"{\"amount\":\"x\"}"[..]).with_header("Content-Type", "json");
        let err = e.json::<Payment>().unwrap_err();
        assert_eq!(err.kind(), inbox_consumer::FailureKind::Permanent);
        assert!(err.to_string().contains("e-1"), "{err}");
        assert_eq!(e.header("content-type"), Some("json"));
        assert_eq!(e.seq(), None);
    }
}
