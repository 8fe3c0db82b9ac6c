//! The RabbitMQ adapter (lapin): turn a `Delivery` into an [`InboxMessage`]
//! and settle it by its [`Outcome`].
//!
//! - The id is the AMQP `message_id` property (publishers must set it; without
//!   it the message is dead unless a key extractor is configured).
//! - [`Outcome::Processed`] and [`Outcome::Duplicate`]: `basic.ack`, sent only
//!   after the inbox committed.
//! - Failed, unavailable or in flight elsewhere: `basic.nack` with requeue.
//!   AMQP cannot delay a requeue, so a failing message comes back at once and
//!   uses up its attempts quickly; give the queue a dead-letter exchange.
//! - Dead: `basic.reject` without requeue, so the message goes to the queue's
//!   dead-letter exchange if it has one (and is dropped otherwise).

use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::AMQPValue;

use crate::message::InboxMessage;
use crate::outcome::{Disposition, Outcome};

/// The longest pause before requeueing a message another consumer holds (lease
/// mode), so that it does not bounce between broker and consumer in a hot loop.
pub const MAX_IN_FLIGHT_PAUSE: Duration = Duration::from_secs(1);

/// The message as the inbox sees it: `message_id` property, payload, string
/// headers and the `redelivered` flag.
pub fn message(delivery: &Delivery) -> InboxMessage {
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned());
    let mut message =
        InboxMessage::new(id, delivery.data.clone()).redelivered(delivery.redelivered);
    if let Some(headers) = delivery.properties.headers() {
        for (name, value) in headers.inner() {
            let value = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                _ => continue,
            };
            message = message.with_header(name.as_str(), value);
        }
    }
    message
}

/// Tells the broker what became of `delivery`; returns what it told.
///
/// # Errors
/// The channel's error (the delivery will be redelivered on another channel).
pub async fn settle(delivery: &Delivery, outcome: &Outcome) -> Result<Disposition, lapin::Error> {
    let disposition = outcome.disposition();
    match disposition {
        Disposition::Ack => {
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Disposition::Requeue { delay } => {
            if let Outcome::InFlightElsewhere { .. } = outcome {
                tokio::time::sleep(delay.min(MAX_IN_FLIGHT_PAUSE)).await;
            }
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await?;
        }
        _ => {
            delivery
                .reject(BasicRejectOptions { requeue: false })
                .await?;
        }
    }
    Ok(disposition)
}

/// Processes the consumer's deliveries one at a time with `process` (which
/// calls an inbox) and settles each, until the consumer is cancelled.
///
/// # Errors
/// The consumer's or channel's error.
pub async fn consume<F, Fut>(
    mut consumer: lapin::Consumer,
    mut process: F,
) -> Result<(), lapin::Error>
where
    F: FnMut(InboxMessage) -> Fut,
    Fut: Future<Output = Outcome>,
{
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let outcome = process(message(&delivery)).await;
        settle(&delivery, &outcome).await?;
    }
    Ok(())
}
