//! An event to publish, and why one is refused.

use bytes::Bytes;
use uuid::Uuid;

/// The default largest event [`enqueue`](crate::enqueue) accepts: 1 MiB,
/// counting the payload, the destination, the ordering key and the headers.
pub const DEFAULT_MAX_EVENT_SIZE: usize = 1024 * 1024;
/// The longest destination, ordering key or header name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// An event for the outbox: where it goes, in which order, and what it says.
///
/// ```
/// let event = outbox::Event::new("payments", &b"{\"amount\":100}"[..])
///     .with_ordering_key("acct-1")
///     .with_header("content-type", "application/json");
/// assert_eq!(event.destination(), "payments");
/// assert_eq!(event.id().get_version_num(), 7);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    id: Uuid,
    destination: String,
    ordering_key: Option<String>,
    headers: Vec<(String, String)>,
    payload: Bytes,
}

impl Event {
    /// An event for `destination` (a queue or a logical name the publisher
    /// maps to a subject), with a new UUID v7 id (time-ordered).
    pub fn new(destination: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            id: Uuid::now_v7(),
            destination: destination.into(),
            ordering_key: None,
            headers: Vec::new(),
            payload: payload.into(),
        }
    }

    /// Sets the id (the broker's message id, the consumer's dedup key).
    #[must_use]
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Events with the same ordering key reach the broker in enqueue order.
    #[must_use]
    pub fn with_ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Adds a header (checked at enqueue: see [`EventError::InvalidHeader`]).
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The id.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The destination.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// The ordering key, if any.
    pub fn ordering_key(&self) -> Option<&str> {
        self.ordering_key.as_deref()
    }

    /// The headers, in the order they were added.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The first value of the header `name` (ASCII case-insensitive).
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

    /// The size counted against the maximum: payload, destination, ordering
    /// key, header names and values, in bytes.
    pub fn size(&self) -> usize {
        self.payload.len()
            + self.destination.len()
            + self.ordering_key.as_ref().map_or(0, String::len)
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
    }

    /// Checks the event as [`enqueue`](crate::enqueue) does, against
    /// `max_size` bytes.
    ///
    /// # Errors
    /// The first [`EventError`] found.
    pub fn validate(&self, max_size: usize) -> Result<(), EventError> {
        if self.destination.is_empty() {
            return Err(EventError::EmptyDestination);
        }
        if self.destination.len() > MAX_NAME_LEN {
            return Err(EventError::DestinationTooLong {
                len: self.destination.len(),
            });
        }
        if let Some(key) = &self.ordering_key {
            if key.is_empty() || key.len() > MAX_NAME_LEN {
                return Err(EventError::OrderingKey { len: key.len() });
            }
        }
        for (name, value) in &self.headers {
            if let Err(reason) = check_header(name, value) {
                return Err(EventError::InvalidHeader {
                    name: name.clone(),
                    reason,
                });
            }
        }
        let size = self.size();
        if size > max_size {
            return Err(EventError::TooLarge {
                size,
                max: max_size,
            });
        }
        Ok(())
    }

    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(crate) fn headers_json(&self) -> String {
        serde_json::to_string(&self.headers).unwrap_or_else(|_| "[]".to_owned())
    }

    /// Adds the stored `traceparent` as a header, unless the event has a
    /// header of that name already (the producer's own wins).
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(crate) fn add_traceparent(&mut self, traceparent: String) {
        const NAME: &str = "traceparent";
        if self.header(NAME).is_none() {
            self.headers.push((NAME.to_owned(), traceparent));
        }
    }

    /// Sets the value of the `traceparent` header (the relay's span).
    #[cfg(all(feature = "trace", any(feature = "postgres", feature = "sqlite")))]
    pub(crate) fn set_traceparent(&mut self, traceparent: &str) {
        if let Some((_, value)) = self
            .headers
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case("traceparent"))
        {
            traceparent.clone_into(value);
        }
    }

    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(crate) fn from_row(
        id: &str,
        destination: String,
        ordering_key: Option<String>,
        headers: &str,
        payload: Vec<u8>,
    ) -> Result<Self, String> {
        Ok(Self {
            id: Uuid::parse_str(id).map_err(|e| format!("stored id {id:?}: {e}"))?,
            destination,
            ordering_key,
            headers: serde_json::from_str(headers)
                .map_err(|e| format!("stored headers of {id}: {e}"))?,
            payload: payload.into(),
        })
    }
}

fn check_header(name: &str, value: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("the name is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("the name is longer than 255 bytes");
    }
    if !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err("the name must be visible ASCII without ':'");
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err("the value contains a control character");
    }
    Ok(())
}

/// Why an event was refused before it reached the database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// The destination is empty.
    #[error("the event's destination is empty")]
    EmptyDestination,
    /// The destination is longer than [`MAX_NAME_LEN`] bytes.
    #[error("the event's destination is {len} bytes, the most is {MAX_NAME_LEN}")]
    DestinationTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The ordering key is empty or longer than [`MAX_NAME_LEN`] bytes.
    #[error("the ordering key must be 1..={MAX_NAME_LEN} bytes, got {len}")]
    OrderingKey {
        /// Its length in bytes.
        len: usize,
    },
    /// A header name or value cannot travel as a broker header.
    #[error("the header {name:?} is invalid: {reason}")]
    InvalidHeader {
        /// The header's name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The event is larger than the maximum.
    #[error("the event is {size} bytes, the most is {max}")]
    TooLarge {
        /// Its size ([`Event::size`]).
        size: usize,
        /// The maximum.
        max: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks() {
        let ok = Event::new("q", &b"x"[..]);
        assert_eq!(ok.validate(10), Ok(()));
        assert_eq!(
            Event::new("", &b""[..]).validate(10),
            Err(EventError::EmptyDestination)
        );
        assert_eq!(
            Event::new("q", vec![0u8; 10]).validate(10),
            Err(EventError::TooLarge { size: 11, max: 10 })
        );
        for (name, value) in [("", "v"), ("a b", "v"), ("a:b", "v"), ("ok", "x\r\ny")] {
            assert!(matches!(
                ok.clone().with_header(name, value).validate(100),
                Err(EventError::InvalidHeader { .. })
            ));
        }
        assert!(matches!(
            ok.clone().with_ordering_key("").validate(100),
            Err(EventError::OrderingKey { len: 0 })
        ));
        assert_eq!(
            ok.clone().with_header("X-Trace", "a\tb").header("x-trace"),
            Some("a\tb")
        );
    }

    #[test]
    fn ids_are_v7_and_settable() {
        let a = Event::new("q", &b""[..]);
        let b = Event::new("q", &b""[..]);
        assert_eq!(a.id().get_version_num(), 7);
        assert!(a.id() < b.id() || a.id() != b.id());
        let id = Uuid::now_v7();
        assert_eq!(a.with_id(id).id(), id);
    }
}
