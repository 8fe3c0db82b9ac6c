//! A broker message as the inbox sees it, whatever broker it came from.

use bytes::Bytes;

/// One delivery of a message: its id (if the publisher set one), its payload,
/// string headers, and whether the broker says it delivered it before.
///
/// The adapters build it from a lapin `Delivery` or a JetStream message;
/// anything else can build it with [`InboxMessage::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMessage {
    id: Option<String>,
    payload: Bytes,
    headers: Vec<(String, String)>,
    redelivered: bool,
}

impl InboxMessage {
    /// A message with an id (`None` when the publisher set none) and a payload.
    pub fn new(id: Option<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            id,
            payload: payload.into(),
            headers: Vec::new(),
            redelivered: false,
        }
    }

    /// Adds a header (the key extractor may read it).
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Marks it as a redelivery (the broker's flag: AMQP `redelivered`,
    /// JetStream `delivered > 1`).
    #[must_use]
    pub fn redelivered(mut self, redelivered: bool) -> Self {
        self.redelivered = redelivered;
        self
    }

    /// The id the publisher set, if any.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The first value of header `name` (case-sensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// All string headers, in order.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// Whether the broker says it delivered this message before.
    pub fn is_redelivered(&self) -> bool {
        self.redelivered
    }
}
