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
//!   publisher reconnects at the next batch. While it cannot, it logs why at
//!   WARN: at the first failure, when the reason changes, and every
//!   [`OUTAGE_WARN_INTERVAL`] while the outage lasts (the attempts in
//!   between at DEBUG); and at INFO once it is connected again.
//! - Connecting (TCP, TLS, the AMQP handshake, the channel, confirm mode)
//!   and declaring a queue are bounded by the connect timeout (default
//!   [`DEFAULT_CONNECT_TIMEOUT`]): a broker that accepts TCP and never
//!   answers is an error, not a hang.
//! - `amqps://` URLs connect over TLS (rustls, with the platform's root
//!   certificates), never in plaintext.
//! - A returned message's payload is never logged by the publisher. (lapin
//!   itself logs each returned message, payload included, at WARN under
//!   the target `lapin::returned_messages`: filter that target out of your
//!   logs, e.g. `RUST_LOG=...,lapin::returned_messages=off`.)

use std::future::Future;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::publisher::{Outgoing, PublishError, Publisher};

/// The default bound of connecting and of declaring a queue.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an outage that goes on is logged again at WARN.
pub const OUTAGE_WARN_INTERVAL: Duration = Duration::from_secs(30);

/// Publishes to RabbitMQ with publisher confirms; see the [module](self).
pub struct RabbitMqPublisher {
    url: String,
    exchange: String,
    connect_timeout: Duration,
    // Boxed: the publisher stays small in the enums callers keep it in.
    link: Mutex<Option<Box<Link>>>,
    outage: std::sync::Mutex<Option<Outage>>,
}

/// The broker cannot be reached: since when, how often tried, what was last
/// logged at WARN.
struct Outage {
    since: Instant,
    attempts: u64,
    warned_at: Instant,
    reason: String,
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

/// `step`, bounded by `timeout`: a timeout is an `io::ErrorKind::TimedOut`
/// error saying what did not answer.
async fn bounded<T>(
    timeout: Duration,
    step: &str,
    fut: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, lapin::Error> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("RabbitMQ did not answer within {timeout:?} ({step})"),
        )
        .into()),
    }
}

async fn open(url: &str, timeout: Duration) -> Result<Link, lapin::Error> {
    let connection = bounded(
        timeout,
        "connecting",
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await?;
    let opened = async {
        let channel = bounded(timeout, "opening a channel", connection.create_channel()).await?;
        bounded(
            timeout,
            "selecting confirm mode",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok::<_, lapin::Error>(channel)
    }
    .await;
    match opened {
        Ok(channel) => Ok(Link {
            connection,
            channel,
        }),
        Err(e) => {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                connection.close(320, "giving up".into()),
            )
            .await;
            Err(e)
        }
    }
}

impl RabbitMqPublisher {
    /// Connects to `url` (`amqp://` or `amqps://`; the connection is checked
    /// now, and opened again after it is lost), each step bounded by
    /// [`DEFAULT_CONNECT_TIMEOUT`].
    ///
    /// # Errors
    /// The broker's error when it cannot be reached; an
    /// `io::ErrorKind::TimedOut` error when it does not answer in time.
    pub async fn connect(url: impl Into<String>) -> Result<Self, lapin::Error> {
        Self::connect_with_timeout(url, DEFAULT_CONNECT_TIMEOUT).await
    }

    /// [`connect`](Self::connect), each step of this connection and of
    /// every reconnection bounded by `timeout`.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn connect_with_timeout(
        url: impl Into<String>,
        timeout: Duration,
    ) -> Result<Self, lapin::Error> {
        let url = url.into();
        let link = open(&url, timeout).await?;
        Ok(Self {
            url,
            exchange: String::new(),
            connect_timeout: timeout,
            link: Mutex::new(Some(Box::new(link))),
            outage: std::sync::Mutex::new(None),
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
        bounded(
            self.connect_timeout,
            "declaring a queue",
            channel.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
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
        tracing::debug!("connecting to RabbitMQ");
        match open(&self.url, self.connect_timeout).await {
            Ok(fresh) => {
                self.connected();
                let channel = fresh.channel.clone();
                *link = Some(Box::new(fresh));
                Ok(channel)
            }
            Err(e) => {
                self.failed(&e);
                Err(e)
            }
        }
    }

    /// Logs a failed connection: at WARN the first time, when the reason
    /// changes, and every [`OUTAGE_WARN_INTERVAL`]; else at DEBUG.
    fn failed(&self, error: &lapin::Error) {
        let reason = error.to_string();
        let now = Instant::now();
        let mut outage = self.outage.lock().unwrap_or_else(|p| p.into_inner());
        let o = outage.get_or_insert_with(|| Outage {
            since: now,
            attempts: 0,
            warned_at: now,
            reason: String::new(),
        });
        o.attempts += 1;
        let warn = o.attempts == 1
            || o.reason != reason
            || now.duration_since(o.warned_at) >= OUTAGE_WARN_INTERVAL;
        let down_for = now.duration_since(o.since);
        if warn {
            o.warned_at = now;
            o.reason.clone_from(&reason);
            tracing::warn!(
                %reason,
                attempts = o.attempts,
                ?down_for,
                "cannot connect to RabbitMQ; retrying"
            );
        } else {
            tracing::debug!(%reason, attempts = o.attempts, ?down_for, "cannot connect to RabbitMQ");
        }
    }

    /// Ends an outage, saying how long it lasted.
    fn connected(&self) {
        let ended = self.outage.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(o) = ended {
            tracing::info!(
                attempts = o.attempts,
                down_for = ?o.since.elapsed(),
                "connected to RabbitMQ again"
            );
        }
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
