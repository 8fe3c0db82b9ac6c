//! The RabbitMQ publisher (lapin), with publisher confirms.
//!
//! - The channel is in confirm mode (`confirm.select`); a batch is sent
//!   whole, then every confirm is awaited.
//! - Each event is a persistent message (`delivery_mode` 2) with
//!   `message_id` = the event id and the event's headers as AMQP headers
//!   (long strings), published `mandatory` to the exchange (default: the
//!   default exchange `""`) with the destination as routing key: on the
//!   default exchange, the queue of that name. Declare it durable (the
//!   consumer's job, or [`RabbitMqPublisher::declare_queue`]).
//! - An ack is `Ok`. A nack, or a message the broker returns (no queue for
//!   the routing key), is [`PublishError::Rejected`]: retried with backoff,
//!   dead after the maximum attempts.
//! - A lost connection or channel is [`PublishError::Unavailable`]; the
//!   publisher reconnects at the next batch.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::publisher::{Outgoing, PublishError, Publisher};

/// Publishes to RabbitMQ with publisher confirms; see the [module](self).
pub struct RabbitMqPublisher {
    url: String,
    exchange: String,
    link: Mutex<Option<Link>>,
}

struct Link {
    connection: Connection,
    channel: Channel,
}

impl std::fmt::Debug for RabbitMqPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqPublisher")
            .field("exchange", &self.exchange)
            .finish_non_exhaustive()
    }
}

async fn open(url: &str) -> Result<Link, lapin::Error> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(Link {
        connection,
        channel,
    })
}

impl RabbitMqPublisher {
    /// Connects to `url` (the connection is checked now, and opened again
    /// after it is lost).
    ///
    /// # Errors
    /// The broker's error when it cannot be reached.
    pub async fn connect(url: impl Into<String>) -> Result<Self, lapin::Error> {
        let url = url.into();
        let link = open(&url).await?;
        Ok(Self {
            url,
            exchange: String::new(),
            link: Mutex::new(Some(link)),
        })
    }

    /// Publishes to `exchange` instead of the default exchange (the
    /// destination is still the routing key).
    #[must_use]
    pub fn with_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// Declares the durable queue `queue` (no arguments), for a destination
    /// on the default exchange.
    ///
    /// # Errors
    /// The broker's error.
    pub async fn declare_queue(&self, queue: &str) -> Result<(), lapin::Error> {
        let channel = self.channel().await?;
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    async fn channel(&self) -> Result<Channel, lapin::Error> {
        let mut link = self.link.lock().await;
        if let Some(l) = link.as_ref() {
            if l.channel.status().connected() && l.connection.status().connected() {
                return Ok(l.channel.clone());
            }
        }
        if let Some(old) = link.take() {
            let _ = old.connection.close(320, "reconnecting".into()).await;
        }
        tracing::info!("connecting to RabbitMQ");
        let fresh = open(&self.url).await?;
        let channel = fresh.channel.clone();
        *link = Some(fresh);
        Ok(channel)
    }

    async fn forget(&self) {
        *self.link.lock().await = None;
    }
}

fn properties(o: &Outgoing) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in o.event().headers() {
        headers.insert(
            name.as_str().into(),
            AMQPValue::LongString(value.as_str().into()),
        );
    }
    BasicProperties::default()
        .with_message_id(o.event().id().to_string().into())
        .with_delivery_mode(2)
        .with_headers(headers)
}

impl Publisher for RabbitMqPublisher {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        let channel = match self.channel().await {
            Ok(c) => c,
            Err(e) => {
                let e = PublishError::unavailable(format!("cannot connect to RabbitMQ: {e}"));
                return vec![Err(e); batch.len()];
            }
        };
        let mut pending = Vec::with_capacity(batch.len());
        let mut broken = None;
        for o in batch {
            if broken.is_some() {
                pending.push(None);
                continue;
            }
            let sent = channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    o.event().destination().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    o.event().payload(),
                    properties(o),
                )
                .await;
            match sent {
                Ok(confirm) => pending.push(Some(confirm)),
                Err(e) => {
                    broken = Some(e.to_string());
                    pending.push(None);
                }
            }
        }
        let mut results = Vec::with_capacity(batch.len());
        for confirm in pending {
            let Some(confirm) = confirm else {
                let reason = broken.as_deref().unwrap_or("not sent");
                results.push(Err(PublishError::unavailable(reason)));
                continue;
            };
            results.push(match confirm.await {
                Ok(Confirmation::Ack(None)) => Ok(()),
                Ok(Confirmation::Ack(Some(returned))) => Err(PublishError::rejected(format!(
                    "returned by the broker: {} {}",
                    returned.reply_code, returned.reply_text
                ))),
                Ok(Confirmation::Nack(_)) => Err(PublishError::rejected("nacked by the broker")),
                Ok(Confirmation::NotRequested) => {
                    broken.get_or_insert_with(|| "the channel is not in confirm mode".into());
                    Err(PublishError::unavailable("no publisher confirm"))
                }
                Err(e) => {
                    broken.get_or_insert_with(|| e.to_string());
                    Err(PublishError::unavailable(e))
                }
            });
        }
        if let Some(reason) = broken {
            tracing::warn!(%reason, "the RabbitMQ channel failed; reconnecting at the next batch");
            self.forget().await;
        }
        results
    }
}
