//! The NATS JetStream publisher (async-nats).
//!
//! - The subject comes from the destination through the caller's mapping
//!   (`payments` → `payments.created`, say); a destination it does not map
//!   is [`PublishError::Permanent`] (dead at once).
//! - Each message carries `Nats-Msg-Id` = the event id (JetStream drops
//!   copies within the stream's duplicate window) and the event's headers.
//! - A batch is sent whole, then every `PubAck` is awaited. An ack is `Ok`;
//!   no ack in time or a lost connection is [`PublishError::Unavailable`]
//!   (async-nats reconnects by itself); no stream for the subject and other
//!   refusals are [`PublishError::Rejected`].
//! - The connection is the caller's: bound its connect with
//!   `async_nats::ConnectOptions::connection_timeout`. `tls://` URLs and
//!   servers that require TLS work (this crate enables async-nats's `ring`
//!   feature, so rustls finds its crypto provider; if your build enables a
//!   second provider, install one at startup).

use std::str::FromStr;
use std::sync::Arc;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::Context;
use async_nats::{HeaderMap, HeaderName, HeaderValue};

use crate::publisher::{Outgoing, PublishError, Publisher};

type SubjectMap = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Publishes to NATS JetStream; see the [module](self).
#[derive(Clone)]
pub struct NatsPublisher {
    js: Context,
    subject: SubjectMap,
}

impl std::fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPublisher").finish_non_exhaustive()
    }
}

impl NatsPublisher {
    /// Publishes through `js`, to the subject `subject(destination)`.
    pub fn new(
        js: Context,
        subject: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            js,
            subject: Arc::new(subject),
        }
    }

    /// Publishes through `js`, the destination being the subject.
    pub fn destination_as_subject(js: Context) -> Self {
        Self::new(js, |d| Some(d.to_owned()))
    }

    fn message(&self, o: &Outgoing) -> Result<(String, PublishMessage), PublishError> {
        let event = o.event();
        let subject = (self.subject)(event.destination()).ok_or_else(|| {
            PublishError::permanent(format!(
                "no subject for the destination {:?}",
                event.destination()
            ))
        })?;
        let mut headers = HeaderMap::new();
        for (name, value) in event.headers() {
            let name = HeaderName::from_str(name)
                .map_err(|_| PublishError::permanent(format!("the header name {name:?}")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| PublishError::permanent(format!("the value of header {name}")))?;
            headers.insert(name, value);
        }
        headers.insert("Nats-Msg-Id", event.id().to_string().as_str());
        let message = PublishMessage::build()
            .payload(event.payload().clone())
            .headers(headers);
        Ok((subject, message))
    }
}

fn map_error(e: &async_nats::jetstream::context::PublishError) -> PublishError {
    match e.kind() {
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending => PublishError::unavailable(e),
        PublishErrorKind::MaxPayloadExceeded => PublishError::permanent(e),
        _ => PublishError::rejected(e),
    }
}

impl Publisher for NatsPublisher {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        let mut pending = Vec::with_capacity(batch.len());
        for o in batch {
            let sent = match self.message(o) {
                Ok((subject, message)) => self
                    .js
                    .send_publish(subject, message)
                    .await
                    .map_err(|e| map_error(&e)),
                Err(e) => Err(e),
            };
            pending.push(sent);
        }
        let mut results = Vec::with_capacity(batch.len());
        for sent in pending {
            results.push(match sent {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| map_error(&e)),
                Err(e) => Err(e),
            });
        }
        results
    }
}
