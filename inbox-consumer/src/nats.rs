//! The NATS JetStream adapter (async-nats): turn a JetStream message into an
//! [`InboxMessage`] and settle it by its [`Outcome`].
//!
//! - The id is the `Nats-Msg-Id` header, else `<stream>/<stream sequence>`
//!   (unique in the stream, so redeliveries of one stored message dedupe even
//!   when the publisher set no id).
//! - [`Outcome::Processed`] and [`Outcome::Duplicate`]: `ack`, sent only after
//!   the inbox committed.
//! - Failed, unavailable or in flight elsewhere: `nak` with the outcome's delay.
//! - Dead: `term`, so JetStream never redelivers it.

use std::future::Future;

use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;

use crate::message::InboxMessage;
use crate::outcome::{Disposition, Outcome};

/// The header JetStream dedupes publishes by, and this adapter keys by.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The message as the inbox sees it.
pub fn message(msg: &jetstream::Message) -> InboxMessage {
    let info = msg.info().ok();
    let header_id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(MSG_ID_HEADER))
        .map(|v| v.as_str().to_owned())
        .filter(|v| !v.is_empty());
    let id = header_id.or_else(|| {
        info.as_ref()
            .map(|i| format!("{}/{}", i.stream, i.stream_sequence))
    });
    let mut message = InboxMessage::new(id, msg.payload.clone())
        .redelivered(info.as_ref().is_some_and(|i| i.delivered > 1));
    if let Some(headers) = &msg.headers {
        for (name, values) in headers.iter() {
            for value in values {
                message = message.with_header(name.to_string(), value.as_str());
            }
        }
    }
    message
}

/// Tells JetStream what became of `msg`; returns what it told.
///
/// # Errors
/// The client's error (the message is redelivered after the consumer's ack wait).
pub async fn settle(msg: &jetstream::Message, outcome: &Outcome) -> Result<Disposition, BoxError> {
    let disposition = outcome.disposition();
    let kind = match disposition {
        Disposition::Ack => AckKind::Ack,
        Disposition::Requeue { delay } => AckKind::Nak(Some(delay)),
        _ => AckKind::Term,
    };
    msg.ack_with(kind).await?;
    Ok(disposition)
}

/// Processes the pull consumer's messages one at a time with `process` (which
/// calls an inbox) and settles each, until the stream of messages ends.
///
/// # Errors
/// The client's error.
pub async fn consume<F, Fut>(
    consumer: &jetstream::consumer::PullConsumer,
    mut process: F,
) -> Result<(), BoxError>
where
    F: FnMut(InboxMessage) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let mut messages = consumer.messages().await?;
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        let outcome = process(message(&msg)).await;
        settle(&msg, &outcome).await?;
    }
    Ok(())
}
