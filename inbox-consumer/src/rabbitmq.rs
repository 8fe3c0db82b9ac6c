//! The RabbitMQ adapter (lapin): a consume loop that owns its connection
//! ([`Subscription`]), and the two steps it is made of for callers that own
//! theirs: turn a `Delivery` into an [`InboxMessage`] ([`message`]) and
//! settle it by its [`Outcome`] ([`settle`]).
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
//!
//! # Reconnection
//!
//! [`Subscription::run`] connects, opens a channel, sets the prefetch and
//! consumes the queue; when the connection or the channel is lost (a broker
//! restart, a network cut, a channel error, the queue deleted), it logs the
//! cause at WARN, waits (100 ms, doubling up to 5 s by default), connects and
//! subscribes again, until its shutdown future resolves. The deliveries that
//! were not acked on the lost connection are redelivered by the broker, and
//! the inbox acks those it had already processed as duplicates, so every
//! message's effect still happens once. Only the *first* subscription's
//! failure is returned (a wrong URL, wrong credentials, a missing queue), so
//! that a misconfigured process fails at startup. Every step (TCP, TLS, the
//! AMQP handshake, each channel method) is bounded by the connect timeout
//! (default 5 s): a broker that accepts TCP and never answers is an error,
//! not a hang. [`consume`] does not reconnect: it is for a `lapin::Consumer`
//! the caller owns, and ends at its first error.
//!
//! # TLS
//!
//! `amqps://` URLs connect over TLS (rustls, with the platform's root
//! certificates); an `amqps://` URL is never sent in plaintext.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_util::future::Fuse;
use futures_util::{FutureExt, StreamExt};
use idempotency_core::redact;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};

use crate::backoff::Backoff;
use crate::message::InboxMessage;
use crate::outcome::{Disposition, Outcome};

/// The default bound of connecting (TCP, TLS, the AMQP handshake) and of each
/// step of subscribing (channel, declare, prefetch, consume).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default prefetch: deliveries the broker sends ahead of the acks.
pub const DEFAULT_PREFETCH: u16 = 32;
/// The default batch of [`Subscription::run_batch`]: up to 100 deliveries...
pub const DEFAULT_BATCH_SIZE: usize = 100;
/// ...or those that arrived within 5 ms of the first, whichever comes first.
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(5);
/// The default first pause before reconnecting; it doubles after each failure.
pub const DEFAULT_MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The default longest pause between reconnections.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);

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
/// It does not reconnect: it ends at the first error of the connection or
/// the channel. A long-running consumer should use [`Subscription::run`],
/// which owns its connection and subscribes again after a loss.
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

/// Why a [`Subscription`] could not start, or [`connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumeError {
    /// The broker refused the connection, or it failed (the URL is shown
    /// with its password redacted).
    #[error("could not connect to RabbitMQ at {url}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// lapin's error (e.g. connection refused, access refused).
        #[source]
        source: lapin::Error,
    },
    /// The broker did not answer a step within the connect timeout.
    #[error("RabbitMQ at {url} did not answer within {timeout:?} ({step})")]
    TimedOut {
        /// The URL, password redacted.
        url: String,
        /// What was waited for: `connecting`, `opening a channel`, ...
        step: &'static str,
        /// The bound.
        timeout: Duration,
    },
    /// The broker refused a step of the subscription (a missing queue, a
    /// queue declared with other arguments, access refused).
    #[error("could not subscribe to the queue {queue} ({step})")]
    Subscribe {
        /// The queue.
        queue: String,
        /// The step that failed: `opening a channel`, `declaring the queue`, ...
        step: &'static str,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
}

/// Connects to `url` (`amqp://` or `amqps://`), bounded by `timeout`.
///
/// # Errors
/// [`ConsumeError::Connect`] with lapin's cause, or
/// [`ConsumeError::TimedOut`] when the broker does not finish the handshake
/// in time (one that accepts TCP and never answers, say).
pub async fn connect(url: &str, timeout: Duration) -> Result<Connection, ConsumeError> {
    connect_named(url, "", timeout).await
}

/// A queue to consume for as long as the process runs: the connection is
/// the subscription's own, and it is opened again after it is lost (see the
/// [module](self)).
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # async fn run(inbox: inbox_consumer::PostgresInbox, shutdown: impl std::future::Future<Output = ()>) -> Result<(), inbox_consumer::rabbitmq::ConsumeError> {
/// use inbox_consumer::rabbitmq::Subscription;
///
/// let inbox = &inbox;
/// Subscription::new("amqp://guest:guest@127.0.0.1:5672/%2f", "payments")
///     .consumer_tag("ledger")
///     .run(
///         |message| async move {
///             inbox
///                 .process(&message, |_tx, _message| Box::pin(async { Ok(()) }))
///                 .await
///         },
///         shutdown, // e.g. Ctrl-C or SIGTERM
///     )
///     .await
/// # }
/// ```
#[derive(Clone)]
#[must_use]
pub struct Subscription {
    url: String,
    queue: String,
    consumer_tag: String,
    prefetch: u16,
    declare: bool,
    connect_timeout: Duration,
    backoff: Backoff,
    batch_size: usize,
    batch_window: Duration,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("url", &redact(&self.url))
            .field("queue", &self.queue)
            .field("consumer_tag", &self.consumer_tag)
            .field("prefetch", &self.prefetch)
            .field("declare", &self.declare)
            .field("connect_timeout", &self.connect_timeout)
            .field("backoff", &self.backoff.bounds())
            .field("batch_size", &self.batch_size)
            .field("batch_window", &self.batch_window)
            .finish()
    }
}

/// A subscription in place: the connection, its channel and the consumer.
struct Session {
    connection: Connection,
    consumer: lapin::Consumer,
}

/// How serving a session ended.
enum Served {
    Shutdown,
    Lost(String),
}

impl Subscription {
    /// Consumes `queue` at the broker `url` (`amqp://` or `amqps://`), with
    /// a server-chosen consumer tag, prefetch [`DEFAULT_PREFETCH`], the
    /// queue not declared, [`DEFAULT_CONNECT_TIMEOUT`], and reconnections
    /// from [`DEFAULT_MIN_BACKOFF`] doubling to [`DEFAULT_MAX_BACKOFF`].
    pub fn new(url: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            queue: queue.into(),
            consumer_tag: String::new(),
            prefetch: DEFAULT_PREFETCH,
            declare: false,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            backoff: Backoff::new(DEFAULT_MIN_BACKOFF, DEFAULT_MAX_BACKOFF),
            batch_size: DEFAULT_BATCH_SIZE,
            batch_window: DEFAULT_BATCH_WINDOW,
        }
    }

    /// The consumer tag (shown by the broker; empty: the broker picks one).
    /// It is also the connection's name in the management UI.
    pub fn consumer_tag(mut self, tag: impl Into<String>) -> Self {
        self.consumer_tag = tag.into();
        self
    }

    /// Deliveries the broker sends ahead of the acks (`basic.qos`; at least 1).
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Declares the queue, durable and without arguments, when it is
    /// missing (checked passively first, so an existing queue is used as it
    /// is, whatever its arguments).
    pub fn declare_when_missing(mut self) -> Self {
        self.declare = true;
        self
    }

    /// The bound of connecting and of each step of subscribing.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The first pause before reconnecting after a loss, doubled after each
    /// failed attempt up to `max`.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(min, max);
        self
    }

    /// The batches of [`run_batch`](Self::run_batch): up to `size`
    /// deliveries (at least 1), or those that arrived within `window` of the
    /// batch's first, whichever comes first (defaults
    /// [`DEFAULT_BATCH_SIZE`], [`DEFAULT_BATCH_WINDOW`]). [`run`](Self::run)
    /// takes one delivery at a time whatever this says.
    pub fn batch(mut self, size: usize, window: Duration) -> Self {
        self.batch_size = size.max(1);
        self.batch_window = window;
        self
    }

    /// The queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Processes the queue's deliveries one at a time with `process` (which
    /// calls an inbox) and settles each, reconnecting after every loss, until
    /// `shutdown` resolves. The delivery in hand when it resolves is
    /// processed and settled first; the prefetched ones go back to the queue
    /// when the connection closes.
    ///
    /// # Errors
    /// Only when the *first* subscription fails; later losses are logged at
    /// WARN and retried with backoff.
    pub async fn run<F, Fut, S>(&self, process: F, shutdown: S) -> Result<(), ConsumeError>
    where
        F: FnMut(InboxMessage) -> Fut,
        Fut: Future<Output = Outcome>,
        S: Future<Output = ()>,
    {
        self.run_with(One(process), shutdown).await
    }

    /// [`run`](Self::run) in batches: `process` gets up to the batch size
    /// of deliveries, or those that arrived within the batch window of the
    /// first ([`batch`](Self::batch)), and returns one outcome per message,
    /// in order (typically from
    /// [`Inbox::process_batch`](crate::Inbox::process_batch) or
    /// [`process_each`](crate::Inbox::process_each), which commit the batch
    /// once). Then the deliveries are settled: those not to be acked one by
    /// one first (nack with requeue, reject), then the others with **one**
    /// `basic.ack` with `multiple` set, at the highest delivery tag among
    /// them. That ack covers this batch's deliveries and nothing else: the
    /// batches are taken in delivery order and each is settled before the
    /// next is collected, so every lower tag is already settled, and the
    /// deliveries prefetched for the next batch have higher tags. A missing
    /// outcome (fewer outcomes than messages) requeues its delivery.
    ///
    /// The prefetch is raised to twice the batch size when it is lower, so
    /// that the next batch is on its way while one commits. A loss while a
    /// batch is being collected drops it unprocessed (the broker redelivers
    /// it); when `shutdown` resolves, the batch in hand is processed and
    /// settled first.
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # async fn run(inbox: inbox_consumer::PostgresInbox, shutdown: impl std::future::Future<Output = ()>) -> Result<(), inbox_consumer::rabbitmq::ConsumeError> {
    /// use std::time::Duration;
    /// use inbox_consumer::rabbitmq::Subscription;
    ///
    /// let inbox = &inbox;
    /// Subscription::new("amqp://guest:guest@127.0.0.1:5672/%2f", "payments")
    ///     .batch(100, Duration::from_millis(5))
    ///     .run_batch(
    ///         |messages| async move {
    ///             inbox
    ///                 .process_each(&messages, |_tx, _message| Box::pin(async { Ok(()) }))
    ///                 .await
    ///         },
    ///         shutdown,
    ///     )
    ///     .await
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`run`](Self::run).
    pub async fn run_batch<F, Fut, S>(&self, process: F, shutdown: S) -> Result<(), ConsumeError>
    where
        F: FnMut(Vec<InboxMessage>) -> Fut,
        Fut: Future<Output = Vec<Outcome>>,
        S: Future<Output = ()>,
    {
        let fits = u16::try_from(self.batch_size.saturating_mul(2)).unwrap_or(u16::MAX);
        let raised = self.clone().prefetch(self.prefetch.max(fits));
        raised.run_with(Batched(process), shutdown).await
    }

    /// The reconnecting loop of [`run`](Self::run) and
    /// [`run_batch`](Self::run_batch), serving each session with `mode`.
    async fn run_with<M: Serve, S>(&self, mut mode: M, shutdown: S) -> Result<(), ConsumeError>
    where
        S: Future<Output = ()>,
    {
        let mut shutdown = std::pin::pin!(shutdown.fuse());
        let mut session = tokio::select! {
            biased;
            () = &mut shutdown => return Ok(()),
            session = self.subscribe() => session?,
        };
        tracing::info!(queue = %self.queue, consumer = %self.consumer_tag, prefetch = self.prefetch, "consuming");
        let mut backoff = self.backoff.clone();
        loop {
            let since = Instant::now();
            let served = mode.serve(self, &mut session, &mut shutdown).await;
            self.close(session).await;
            let cause = match served {
                Served::Shutdown => {
                    tracing::info!(queue = %self.queue, "stopped consuming");
                    return Ok(());
                }
                Served::Lost(cause) => cause,
            };
            backoff.lasted(since);
            tracing::warn!(queue = %self.queue, %cause, "lost the RabbitMQ subscription; reconnecting");
            session = loop {
                let delay = backoff.next_delay();
                tokio::select! {
                    biased;
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
                let attempt = tokio::select! {
                    biased;
                    () = &mut shutdown => return Ok(()),
                    session = self.subscribe() => session,
                };
                match attempt {
                    Ok(session) => break session,
                    Err(e) => tracing::warn!(
                        queue = %self.queue,
                        error = %crate::error::chain(&e),
                        "could not subscribe again; retrying"
                    ),
                }
            };
            tracing::info!(queue = %self.queue, consumer = %self.consumer_tag, "consuming again");
        }
    }

    /// Connects, opens a channel, declares the queue if asked, sets the
    /// prefetch and consumes: each step bounded by the connect timeout.
    async fn subscribe(&self) -> Result<Session, ConsumeError> {
        let connection = connect_named(&self.url, &self.consumer_tag, self.connect_timeout).await?;
        match self.consume_on(&connection).await {
            Ok(consumer) => Ok(Session {
                connection,
                consumer,
            }),
            Err(e) => {
                close_connection(&connection).await;
                Err(e)
            }
        }
    }

    async fn consume_on(&self, connection: &Connection) -> Result<lapin::Consumer, ConsumeError> {
        let mut channel = self
            .step("opening a channel", connection.create_channel())
            .await?;
        if self.declare {
            channel = self.declare_on(connection, channel).await?;
        }
        self.step(
            "setting the prefetch",
            channel.basic_qos(self.prefetch, BasicQosOptions::default()),
        )
        .await?;
        self.step(
            "consuming",
            channel.basic_consume(
                self.queue.as_str().into(),
                self.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
    }

    /// Declares the queue durable when a passive declare says it is missing
    /// (which closes that channel: the returned one is new).
    async fn declare_on(
        &self,
        connection: &Connection,
        channel: Channel,
    ) -> Result<Channel, ConsumeError> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let exists = self
            .step(
                "checking the queue",
                channel.queue_declare(self.queue.as_str().into(), passive, FieldTable::default()),
            )
            .await;
        match exists {
            Ok(_) => return Ok(channel),
            Err(e @ ConsumeError::TimedOut { .. }) => return Err(e),
            Err(_) => {}
        }
        let channel = self
            .step("opening a channel", connection.create_channel())
            .await?;
        self.step(
            "declaring the queue",
            channel.queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(channel)
    }

    async fn step<T>(
        &self,
        step: &'static str,
        fut: impl Future<Output = Result<T, lapin::Error>>,
    ) -> Result<T, ConsumeError> {
        match tokio::time::timeout(self.connect_timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(ConsumeError::Subscribe {
                queue: self.queue.clone(),
                step,
                source,
            }),
            Err(_) => Err(ConsumeError::TimedOut {
                url: redact(&self.url),
                step,
                timeout: self.connect_timeout,
            }),
        }
    }

    async fn close(&self, session: Session) {
        close_connection(&session.connection).await;
    }
}

/// How a session's deliveries are served: one at a time ([`One`]) or in
/// batches ([`Batched`]).
trait Serve {
    /// Processes deliveries until the session is lost or `shutdown` resolves.
    async fn serve<S: Future<Output = ()>>(
        &mut self,
        subscription: &Subscription,
        session: &mut Session,
        shutdown: &mut Pin<&mut Fuse<S>>,
    ) -> Served;
}

/// [`Subscription::run`]'s process function.
struct One<F>(F);

impl<F, Fut> Serve for One<F>
where
    F: FnMut(InboxMessage) -> Fut,
    Fut: Future<Output = Outcome>,
{
    async fn serve<S: Future<Output = ()>>(
        &mut self,
        subscription: &Subscription,
        session: &mut Session,
        shutdown: &mut Pin<&mut Fuse<S>>,
    ) -> Served {
        loop {
            let next = tokio::select! {
                biased;
                () = &mut *shutdown => return Served::Shutdown,
                next = session.consumer.next() => next,
                lost = closed(&session.connection) => return lost,
            };
            let delivery = match received(next) {
                Ok(delivery) => delivery,
                Err(lost) => return lost,
            };
            let outcome = (self.0)(message(&delivery)).await;
            // Ack only now, after the inbox committed. A failure leaves the
            // delivery unacked: the broker redelivers it, the inbox dedupes it.
            let settled =
                tokio::time::timeout(subscription.connect_timeout, settle(&delivery, &outcome));
            match settled.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Served::Lost(format!("settling a delivery failed: {e}")),
                Err(_) => return Served::Lost("settling a delivery did not finish in time".into()),
            }
        }
    }
}

/// [`Subscription::run_batch`]'s process function.
struct Batched<F>(F);

impl<F, Fut> Serve for Batched<F>
where
    F: FnMut(Vec<InboxMessage>) -> Fut,
    Fut: Future<Output = Vec<Outcome>>,
{
    async fn serve<S: Future<Output = ()>>(
        &mut self,
        subscription: &Subscription,
        session: &mut Session,
        shutdown: &mut Pin<&mut Fuse<S>>,
    ) -> Served {
        loop {
            let first = tokio::select! {
                biased;
                () = &mut *shutdown => return Served::Shutdown,
                next = session.consumer.next() => next,
                lost = closed(&session.connection) => return lost,
            };
            let mut deliveries = match received(first) {
                Ok(delivery) => vec![delivery],
                Err(lost) => return lost,
            };
            // Fused: once resolved it never fires again, so remember it.
            let mut stopping = false;
            let until = tokio::time::Instant::now() + subscription.batch_window;
            while deliveries.len() < subscription.batch_size {
                let next = tokio::select! {
                    biased;
                    () = &mut *shutdown => {
                        stopping = true;
                        break;
                    }
                    next = session.consumer.next() => next,
                    () = tokio::time::sleep_until(until) => break,
                };
                match received(next) {
                    Ok(delivery) => deliveries.push(delivery),
                    // Unprocessed, unacked: the broker redelivers them.
                    Err(lost) => return lost,
                }
            }
            let messages = deliveries.iter().map(message).collect();
            let outcomes = (self.0)(messages).await;
            // Ack only now, after the inbox committed.
            let settled = tokio::time::timeout(
                subscription.connect_timeout,
                settle_batch(&deliveries, &outcomes),
            );
            match settled.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Served::Lost(format!("settling a batch failed: {e}")),
                Err(_) => return Served::Lost("settling a batch did not finish in time".into()),
            }
            if stopping {
                return Served::Shutdown;
            }
        }
    }
}

/// Resolves once the session's connection is no longer connected, checked
/// twice a second: a watchdog beside the consumer's stream, so that a
/// connection that died without the stream saying so (seen once, under
/// load, as a consumer that waited for ever after its broker link was cut)
/// still ends the session and reconnects.
async fn closed(connection: &Connection) -> Served {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !connection.status().connected() {
            return Served::Lost("the connection is no longer connected".into());
        }
    }
}

/// The next delivery of the consumer's stream, or how the session was lost.
fn received(next: Option<Result<Delivery, lapin::Error>>) -> Result<Delivery, Served> {
    match next {
        Some(Ok(delivery)) => Ok(delivery),
        Some(Err(e)) => Err(Served::Lost(format!("receiving a delivery failed: {e}"))),
        None => Err(Served::Lost(
            "the broker cancelled the consumer (the queue was deleted?)".into(),
        )),
    }
}

/// Settles a batch of deliveries of one channel, consecutive in delivery
/// order, every earlier delivery of the channel settled: the ones not to
/// be acked one by one (so that nothing below covers them), then the
/// others with one `multiple` ack at their highest tag. A delivery without
/// an outcome is requeued.
async fn settle_batch(deliveries: &[Delivery], outcomes: &[Outcome]) -> Result<(), lapin::Error> {
    if outcomes.len() != deliveries.len() {
        tracing::error!(
            deliveries = deliveries.len(),
            outcomes = outcomes.len(),
            "the batch's process function did not return one outcome per message; \
             the deliveries without one are requeued"
        );
    }
    let mut last_acked: Option<&Delivery> = None;
    for (i, delivery) in deliveries.iter().enumerate() {
        match outcomes.get(i) {
            Some(outcome) if outcome.disposition() == Disposition::Ack => {
                if last_acked.is_none_or(|d| d.delivery_tag < delivery.delivery_tag) {
                    last_acked = Some(delivery);
                }
            }
            Some(outcome) => {
                settle(delivery, outcome).await?;
            }
            None => {
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    })
                    .await?;
            }
        }
    }
    if let Some(delivery) = last_acked {
        delivery.ack(BasicAckOptions { multiple: true }).await?;
    }
    Ok(())
}

/// [`connect`], naming the connection after the consumer tag.
async fn connect_named(
    url: &str,
    name: &str,
    timeout: Duration,
) -> Result<Connection, ConsumeError> {
    let mut properties = ConnectionProperties::default();
    if !name.is_empty() {
        properties = properties.with_connection_name(name.into());
    }
    match tokio::time::timeout(timeout, Connection::connect(url, properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => Err(ConsumeError::Connect {
            url: redact(url),
            source,
        }),
        Err(_) => Err(ConsumeError::TimedOut {
            url: redact(url),
            step: "connecting",
            timeout,
        }),
    }
}

/// Closes a connection, best effort: a dead one fails at once, a stalled
/// one is given a second.
async fn close_connection(connection: &Connection) {
    if connection.status().connected() {
        let _ =
            tokio::time::timeout(Duration::from_secs(1), connection.close(200, "bye".into())).await;
    }
}
