//! The NATS JetStream adapter (async-nats): a consume loop that outlives
//! connection losses and a deleted consumer ([`Subscription`]), and the two
//! steps it is made of: turn a JetStream message into an [`InboxMessage`]
//! ([`message`]) and settle it by its [`Outcome`] ([`settle`]).
//!
//! - The id is the `Nats-Msg-Id` header. A message without one is keyed by
//!   where and when JetStream stored it: `<stream>/<stream sequence>@<stored>`,
//!   `<stored>` being the time the stream stored it, in nanoseconds since the
//!   Unix epoch (from the message's ack subject, the same in every
//!   redelivery). Redeliveries of one stored message dedupe; a stream
//!   deleted and created again restarts its sequence at 1, but the new
//!   message 1 was stored at another instant, so it is a new key and runs.
//!   (The sequence alone, `<stream>/<seq>`, would have made it a duplicate of
//!   the old message 1 and acked it without running it.)
//! - [`Outcome::Processed`] and [`Outcome::Duplicate`]: `ack`, sent only after
//!   the inbox committed.
//! - Failed, unavailable or in flight elsewhere: `nak` with the outcome's delay.
//! - Dead: `term`, so JetStream never redelivers it.
//!
//! # Connections and consumer errors
//!
//! async-nats reconnects by itself, and a pull consumer's message stream asks
//! for messages again after a reconnection. [`Subscription::run`] and
//! [`consume`] log the stream's errors (a missed heartbeat, a failed pull)
//! and an ack that could not be sent at WARN and go on (an unacked message is
//! redelivered after the consumer's `ack_wait`, and the inbox dedupes it).
//! When the stream of messages ends (the consumer or its stream was
//! deleted), [`Subscription::run`] opens the stream and the consumer again
//! (creating them if configured to), with backoff; [`consume`], which was
//! handed its consumer, returns.
//!
//! # A new durable consumer replays the stream
//!
//! A durable consumer created on an existing stream starts, by default
//! (`DeliverPolicy::All`), at the stream's first message: it delivers every
//! message the stream still holds. The inbox runs the handler only for the
//! ones its consumer name has not processed, so a new consumer name, or an
//! inbox whose rows were purged, runs them all again. Choose the deliver
//! policy (`New`, `ByStartTime`) when the history must not run.
//!
//! # TLS
//!
//! `tls://` URLs, and servers that require TLS, connect over TLS (rustls on
//! ring, with the platform's root certificates): this crate enables
//! async-nats's `ring` feature, so rustls finds its crypto provider by itself.
//! If your build enables a second rustls provider (aws-lc-rs, through another
//! crate), rustls cannot choose: install one at startup with
//! `rustls::crypto::ring::default_provider().install_default()`.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::{pull, PullConsumer};
use async_nats::jetstream::{self, AckKind};
use futures_util::future::Fuse;
use futures_util::{FutureExt, StreamExt};

use crate::backoff::Backoff;
use crate::message::InboxMessage;
use crate::outcome::{Disposition, Outcome};

/// The header JetStream dedupes publishes by, and this adapter keys by.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// The default first pause before opening the consumer again; it doubles
/// after each failure.
pub const DEFAULT_MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The default longest pause between attempts to open the consumer again.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The default batch of [`Subscription::run_batch`]: up to 100 messages...
pub const DEFAULT_BATCH_SIZE: usize = 100;
/// ...or those that arrived within 5 ms of the first, whichever comes first.
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(5);
/// The idle heartbeat of the pull requests (async-nats's default).
const PULL_HEARTBEAT: Duration = Duration::from_secs(15);
/// The messages one pull request asks for (async-nats's default), unless a
/// batch needs more.
const PULL_BATCH: usize = 200;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The message as the inbox sees it (see the [module](self) for the id of a
/// message without `Nats-Msg-Id`).
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
            .map(|i| stored_key(i.stream, i.stream_sequence, i.published.into()))
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

/// `<stream>/<sequence>@<stored, nanoseconds since the epoch>`.
fn stored_key(stream: &str, sequence: u64, stored: SystemTime) -> String {
    let nanos = stored
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{stream}/{sequence}@{nanos}")
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
/// calls an inbox) and settles each, until the stream of messages ends (the
/// consumer was deleted). Errors of the stream (a missed heartbeat, a failed
/// pull while the connection is down) and acks that could not be sent are
/// logged at WARN and do not end it. [`Subscription::run`] also survives a
/// deleted consumer, and stops on a shutdown signal.
///
/// # Errors
/// Only when the consumer cannot start pulling.
pub async fn consume<F, Fut>(consumer: &PullConsumer, mut process: F) -> Result<(), BoxError>
where
    F: FnMut(InboxMessage) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let mut messages = consumer.messages().await?;
    One(&mut process)
        .serve(
            &mut messages,
            &mut std::pin::pin!(std::future::pending::<()>().fuse()),
        )
        .await;
    Ok(())
}

/// How serving a stream of messages ended.
enum Served {
    Shutdown,
    Ended,
}

/// How a stream of messages is served: one at a time ([`One`]) or in
/// batches ([`Batched`]).
trait Serve {
    /// Processes messages until the stream ends or `shutdown` resolves.
    async fn serve<S: Future<Output = ()>>(
        &mut self,
        messages: &mut pull::Stream,
        shutdown: &mut Pin<&mut Fuse<S>>,
    ) -> Served;
}

/// [`Subscription::run`]'s (and [`consume`]'s) process function.
struct One<F>(F);

impl<F, Fut> Serve for One<F>
where
    F: FnMut(InboxMessage) -> Fut,
    Fut: Future<Output = Outcome>,
{
    async fn serve<S: Future<Output = ()>>(
        &mut self,
        messages: &mut pull::Stream,
        shutdown: &mut Pin<&mut Fuse<S>>,
    ) -> Served {
        loop {
            let next = tokio::select! {
                biased;
                () = &mut *shutdown => return Served::Shutdown,
                next = messages.next() => next,
            };
            let msg = match next {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    tracing::warn!(error = %crate::error::chain(&e), "receiving from JetStream failed; going on");
                    continue;
                }
                None => return Served::Ended,
            };
            let outcome = (self.0)(message(&msg)).await;
            // Ack only now, after the inbox committed. A lost ack means a
            // redelivery after the ack wait, which the inbox dedupes.
            if let Err(e) = settle(&msg, &outcome).await {
                tracing::warn!(error = %crate::error::chain(&*e), "could not settle a JetStream message; it will be redelivered");
            }
        }
    }
}

/// [`Subscription::run_batch`]'s process function, and its batch.
struct Batched<F> {
    process: F,
    size: usize,
    window: Duration,
}

impl<F, Fut> Serve for Batched<F>
where
    F: FnMut(Vec<InboxMessage>) -> Fut,
    Fut: Future<Output = Vec<Outcome>>,
{
    async fn serve<S: Future<Output = ()>>(
        &mut self,
        messages: &mut pull::Stream,
        shutdown: &mut Pin<&mut Fuse<S>>,
    ) -> Served {
        loop {
            let mut batch = Vec::with_capacity(self.size);
            // Fused: once resolved it never fires again, so remember it.
            let mut stopping = false;
            let mut until = None;
            while batch.len() < self.size {
                // The window opens with the batch's first message.
                let window = async {
                    match until {
                        Some(until) => tokio::time::sleep_until(until).await,
                        None => std::future::pending().await,
                    }
                };
                let next = tokio::select! {
                    biased;
                    () = &mut *shutdown => {
                        stopping = true;
                        break;
                    }
                    next = messages.next() => next,
                    () = window => break,
                };
                match next {
                    Some(Ok(msg)) => {
                        if until.is_none() {
                            until = Some(tokio::time::Instant::now() + self.window);
                        }
                        batch.push(msg);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %crate::error::chain(&e), "receiving from JetStream failed; going on");
                    }
                    None => {
                        // Unprocessed, unacked: redelivered after the ack wait.
                        return Served::Ended;
                    }
                }
            }
            if !batch.is_empty() {
                let outcomes = (self.process)(batch.iter().map(message).collect()).await;
                if outcomes.len() != batch.len() {
                    tracing::error!(
                        messages = batch.len(),
                        outcomes = outcomes.len(),
                        "the batch's process function did not return one outcome per message; \
                         the messages without one are redelivered after the ack wait"
                    );
                }
                // Ack each only now, after the inbox committed.
                for (msg, outcome) in batch.iter().zip(&outcomes) {
                    if let Err(e) = settle(msg, outcome).await {
                        tracing::warn!(error = %crate::error::chain(&*e), "could not settle a JetStream message; it will be redelivered");
                    }
                }
            }
            if stopping {
                return Served::Shutdown;
            }
        }
    }
}

/// Why a [`Subscription`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumeError {
    /// The stream could not be opened (or created).
    #[error("could not open the stream {stream}")]
    Stream {
        /// The stream.
        stream: String,
        /// async-nats's error.
        #[source]
        source: BoxError,
    },
    /// The durable consumer could not be opened or created.
    #[error("could not open or create the consumer {consumer} on the stream {stream}")]
    Consumer {
        /// The stream.
        stream: String,
        /// The consumer.
        consumer: String,
        /// async-nats's error.
        #[source]
        source: BoxError,
    },
    /// The consumer could not start pulling messages.
    #[error("could not start pulling messages from the consumer {consumer}")]
    Pull {
        /// The consumer.
        consumer: String,
        /// async-nats's error.
        #[source]
        source: BoxError,
    },
}

/// A durable pull consumer to consume for as long as the process runs; it
/// is opened again after it (or its stream) is deleted (see the
/// [module](self)).
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # async fn run(inbox: inbox_consumer::PostgresInbox, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// use async_nats::jetstream;
/// use inbox_consumer::nats::Subscription;
///
/// let js = jetstream::new(async_nats::connect("nats://127.0.0.1:4222").await?);
/// let inbox = &inbox;
/// Subscription::new(js, "PAYMENTS", "ledger")
///     .create_stream_when_missing(jetstream::stream::Config {
///         name: "PAYMENTS".into(),
///         subjects: vec!["payments.>".into()],
///         ..Default::default()
///     })
///     .run(
///         |message| async move {
///             inbox
///                 .process(&message, |_tx, _message| Box::pin(async { Ok(()) }))
///                 .await
///         },
///         shutdown, // e.g. Ctrl-C or SIGTERM
///     )
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Subscription {
    js: jetstream::Context,
    stream: String,
    create_stream: Option<jetstream::stream::Config>,
    consumer: pull::Config,
    backoff: Backoff,
    batch_size: usize,
    batch_window: Duration,
}

impl Subscription {
    /// Consumes the stream `stream` through the durable pull consumer
    /// `consumer` (created with the default settings when missing), the
    /// stream not created, reopened from [`DEFAULT_MIN_BACKOFF`] doubling to
    /// [`DEFAULT_MAX_BACKOFF`].
    pub fn new(js: jetstream::Context, stream: impl Into<String>, consumer: &str) -> Self {
        Self {
            js,
            stream: stream.into(),
            create_stream: None,
            consumer: pull::Config {
                durable_name: Some(consumer.to_owned()),
                ..Default::default()
            },
            backoff: Backoff::new(DEFAULT_MIN_BACKOFF, DEFAULT_MAX_BACKOFF),
            batch_size: DEFAULT_BATCH_SIZE,
            batch_window: DEFAULT_BATCH_WINDOW,
        }
    }

    /// The batches of [`run_batch`](Self::run_batch): up to `size`
    /// messages (at least 1), or those that arrived within `window` of the
    /// batch's first, whichever comes first (defaults
    /// [`DEFAULT_BATCH_SIZE`], [`DEFAULT_BATCH_WINDOW`]). [`run`](Self::run)
    /// takes one message at a time whatever this says.
    pub fn batch(mut self, size: usize, window: Duration) -> Self {
        self.batch_size = size.max(1);
        self.batch_window = window;
        self
    }

    /// The settings the durable consumer is created with when missing (its
    /// `durable_name` names it; an existing consumer is used as it is).
    pub fn consumer_config(mut self, config: pull::Config) -> Self {
        self.consumer = config;
        self
    }

    /// Creates the stream with `config` when it is missing (an existing
    /// stream is used as it is).
    pub fn create_stream_when_missing(mut self, config: jetstream::stream::Config) -> Self {
        self.create_stream = Some(config);
        self
    }

    /// The first pause before opening the consumer again, doubled after
    /// each failed attempt up to `max`.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(min, max);
        self
    }

    fn consumer_name(&self) -> String {
        self.consumer
            .durable_name
            .clone()
            .or_else(|| self.consumer.name.clone())
            .unwrap_or_default()
    }

    /// Processes the consumer's messages one at a time with `process`
    /// (which calls an inbox) and settles each, until `shutdown` resolves
    /// (the message in hand is processed and settled first). Errors of the
    /// stream of messages are logged at WARN; when it ends, the stream and
    /// the consumer are opened again with backoff.
    ///
    /// # Errors
    /// Only when the *first* opening fails (a missing stream, say).
    pub async fn run<F, Fut, S>(&self, process: F, shutdown: S) -> Result<(), ConsumeError>
    where
        F: FnMut(InboxMessage) -> Fut,
        Fut: Future<Output = Outcome>,
        S: Future<Output = ()>,
    {
        self.run_with(One(process), None, shutdown).await
    }

    /// [`run`](Self::run) in batches: `process` gets up to the batch size
    /// of messages, or those that arrived within the batch window of the
    /// first ([`batch`](Self::batch)), and returns one outcome per message,
    /// in order (typically from
    /// [`Inbox::process_batch`](crate::Inbox::process_batch) or
    /// [`process_each`](crate::Inbox::process_each), which commit the batch
    /// once); then each message is settled by its outcome (JetStream acks
    /// one message at a time). A message without an outcome is not settled,
    /// and is redelivered after the consumer's ack wait.
    ///
    /// Each pull request asks for twice the batch size (at least 200, as
    /// async-nats does by default), so that the next batch is on its way
    /// while one commits; keep the consumer's `max_ack_pending` above the
    /// batch size. When `shutdown` resolves, the batch in hand is processed
    /// and settled first.
    ///
    /// # Errors
    /// As [`run`](Self::run).
    pub async fn run_batch<F, Fut, S>(&self, process: F, shutdown: S) -> Result<(), ConsumeError>
    where
        F: FnMut(Vec<InboxMessage>) -> Fut,
        Fut: Future<Output = Vec<Outcome>>,
        S: Future<Output = ()>,
    {
        let batched = Batched {
            process,
            size: self.batch_size,
            window: self.batch_window,
        };
        let pull = self.batch_size.saturating_mul(2).max(PULL_BATCH);
        self.run_with(batched, Some(pull), shutdown).await
    }

    /// The loop of [`run`](Self::run) and [`run_batch`](Self::run_batch),
    /// serving each opening of the consumer with `mode`, pulling `pull`
    /// messages at a time (`None`: async-nats's default).
    async fn run_with<M: Serve, S>(
        &self,
        mut mode: M,
        pull: Option<usize>,
        shutdown: S,
    ) -> Result<(), ConsumeError>
    where
        S: Future<Output = ()>,
    {
        let mut shutdown = std::pin::pin!(shutdown.fuse());
        let consumer = self.consumer_name();
        let mut messages = tokio::select! {
            biased;
            () = &mut shutdown => return Ok(()),
            messages = self.subscribe(pull) => messages?,
        };
        tracing::info!(stream = %self.stream, %consumer, "consuming");
        let mut backoff = self.backoff.clone();
        loop {
            let since = Instant::now();
            if let Served::Shutdown = mode.serve(&mut messages, &mut shutdown).await {
                tracing::info!(stream = %self.stream, %consumer, "stopped consuming");
                return Ok(());
            }
            backoff.lasted(since);
            tracing::warn!(
                stream = %self.stream,
                %consumer,
                "the JetStream consumer ended (deleted, or its stream was); opening it again"
            );
            messages = loop {
                let delay = backoff.next_delay();
                tokio::select! {
                    biased;
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
                let attempt = tokio::select! {
                    biased;
                    () = &mut shutdown => return Ok(()),
                    messages = self.subscribe(pull) => messages,
                };
                match attempt {
                    Ok(messages) => break messages,
                    Err(e) => tracing::warn!(
                        stream = %self.stream,
                        %consumer,
                        error = %crate::error::chain(&e),
                        "could not open the consumer again; retrying"
                    ),
                }
            };
            tracing::info!(stream = %self.stream, %consumer, "consuming again");
        }
    }

    async fn subscribe(&self, pull: Option<usize>) -> Result<pull::Stream, ConsumeError> {
        let stream = match &self.create_stream {
            Some(config) => self
                .js
                .get_or_create_stream(config.clone())
                .await
                .map_err(BoxError::from),
            None => self
                .js
                .get_stream(&self.stream)
                .await
                .map_err(BoxError::from),
        }
        .map_err(|source| ConsumeError::Stream {
            stream: self.stream.clone(),
            source,
        })?;
        let name = self.consumer_name();
        let consumer: PullConsumer = stream
            .get_or_create_consumer(&name, self.consumer.clone())
            .await
            .map_err(|e| ConsumeError::Consumer {
                stream: self.stream.clone(),
                consumer: name.clone(),
                source: Box::new(e),
            })?;
        let messages = match pull {
            None => consumer.messages().await,
            Some(batch) => {
                // Within the consumer's own limit, when it has one.
                let limit = usize::try_from(consumer.cached_info().config.max_batch)
                    .ok()
                    .filter(|&l| l > 0)
                    .unwrap_or(usize::MAX);
                consumer
                    .stream()
                    .heartbeat(PULL_HEARTBEAT)
                    .max_messages_per_batch(batch.min(limit))
                    .messages()
                    .await
            }
        };
        messages.map_err(|e| ConsumeError::Pull {
            consumer: name,
            source: Box::new(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_less_key_names_the_stream_the_sequence_and_the_instant() {
        let at = UNIX_EPOCH + Duration::from_nanos(1_733_580_000_123_456_789);
        assert_eq!(
            stored_key("PAYMENTS", 1, at),
            "PAYMENTS/1@1733580000123456789"
        );
        let later = at + Duration::from_secs(60);
        assert_ne!(
            stored_key("PAYMENTS", 1, at),
            stored_key("PAYMENTS", 1, later)
        );
    }
}
