//! Exactly-once *effects* for at-least-once brokers.
//!
//! RabbitMQ and NATS JetStream deliver each message at least once: after a
//! lost ack, a crash, a consumer restart or a publisher retry, the same
//! message comes again. An [`Inbox`] remembers which messages a consumer has
//! processed, by `(consumer name, message id)`, and runs the business handler
//! only for messages it has not seen.
//!
//! # Quick start: PostgreSQL and RabbitMQ (transactional mode)
//!
//! Not on crates.io yet: depend on a clone of the repository (here beside
//! your project).
//!
//! ```toml
//! [dependencies]
//! inbox-consumer = { path = "../idempotency-rs/inbox-consumer", features = ["postgres", "rabbitmq"] }
//! sqlx = { version = "0.8", default-features = false, features = ["postgres", "runtime-tokio"] }
//! tokio = { version = "1", features = ["rt-multi-thread", "macros", "signal"] }
//! ```
//!
//! ```no_run
//! # #[cfg(all(feature = "postgres", feature = "rabbitmq"))]
//! # async fn run(shutdown: impl std::future::Future<Output = ()>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use inbox_consumer::{rabbitmq, HandlerError, Inbox, InboxConfig};
//!
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?;
//! // The handler's own table (the inbox creates its schema `inbox_consumer`).
//! sqlx::query("CREATE TABLE IF NOT EXISTS ledger_entries (account TEXT NOT NULL, amount BIGINT NOT NULL, message_id TEXT NOT NULL)")
//!     .execute(&pool)
//!     .await?;
//! let inbox = Inbox::postgres(pool, InboxConfig::builder("ledger").build()?).await?;
//!
//! let inbox = &inbox;
//! // Owns its connection: reconnects and subscribes again after a loss.
//! rabbitmq::Subscription::new("amqp://guest:guest@127.0.0.1:5672/%2f", "payments")
//!     .consumer_tag("ledger")
//!     .run(
//!         |message| async move {
//!             inbox
//!                 .process(&message, |tx, message| {
//!                     Box::pin(async move {
//!                         // The effect commits in the inbox's transaction, or not at all.
//!                         sqlx::query("INSERT INTO ledger_entries (account, amount, message_id) VALUES ($1, $2, $3)")
//!                             .bind("acct-1")
//!                             .bind(100_i64)
//!                             .bind(message.id())
//!                             .execute(&mut **tx)
//!                             .await?;
//!                         Ok::<_, HandlerError>(())
//!                     })
//!                 })
//!                 .await
//!         },
//!         // Until it resolves (Ctrl-C, SIGTERM); the delivery in hand is finished first.
//!         shutdown,
//!     )
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Quick start: any idempotency store (lease mode)
//!
//! ```
//! use inbox_consumer::{Inbox, InboxConfig, InboxMessage};
//! use idempotency_core::MemoryStore;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let inbox = Inbox::lease(MemoryStore::new(), InboxConfig::builder("mailer").build()?);
//! let message = InboxMessage::new(Some("msg-1".into()), &b"{}"[..]);
//! for _ in 0..3 {
//!     inbox.process(&message, |_message| Box::pin(async { /* send the mail */ Ok(()) })).await;
//! }
//! assert_eq!(inbox.metrics().processed, 1);
//! assert_eq!(inbox.metrics().duplicate, 2);
//! # Ok(()) }
//! ```
//!
//! # Batches: many messages, one commit (transactional mode)
//!
//! One transaction per message bounds a consumer by the database's flush.
//! [`Inbox::process_batch`] and [`Inbox::process_each`] take a batch of
//! messages, deduplicate it with **one statement** (a multi-row insert of
//! the inbox rows that returns the new ones, honouring dead marks and the
//! attempt limit), run the handler for the new ones in one transaction and
//! commit once; [`rabbitmq::Subscription::run_batch`] and
//! [`nats::Subscription::run_batch`] collect the batches (up to N messages,
//! or what arrived within a short window, 5 ms by default) and ack after
//! the commit: RabbitMQ with one `multiple` ack covering that batch and
//! nothing else, JetStream message by message.
//!
//! ```no_run
//! # #[cfg(all(feature = "postgres", feature = "rabbitmq"))]
//! # async fn run(inbox: inbox_consumer::PostgresInbox, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use std::time::Duration;
//! use inbox_consumer::{rabbitmq, HandlerError};
//!
//! let inbox = &inbox;
//! rabbitmq::Subscription::new("amqp://guest:guest@127.0.0.1:5672/%2f", "payments")
//!     .batch(100, Duration::from_millis(5)) // the prefetch follows: 200
//!     .run_batch(
//!         |messages| async move {
//!             // The per-message handler of `process`, unchanged, run for
//!             // each new message inside the batch's one transaction.
//!             inbox
//!                 .process_each(&messages, |tx, message| {
//!                     Box::pin(async move {
//!                         sqlx::query("INSERT INTO ledger_entries (account, amount, message_id) VALUES ($1, $2, $3)")
//!                             .bind("acct-1")
//!                             .bind(100_i64)
//!                             .bind(message.id())
//!                             .execute(&mut **tx)
//!                             .await?;
//!                         Ok::<_, HandlerError>(())
//!                     })
//!                 })
//!                 .await
//!         },
//!         shutdown,
//!     )
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! - An id twice in one batch runs once; both deliveries are acked.
//! - A failing or panicking message does not hold its batch back nor count
//!   an attempt against the others: the batch is rolled back and its new
//!   messages are processed one at a time, as [`Inbox::process`] does, so
//!   that the failing one is counted (and dead-lettered after the maximum)
//!   and the others commit. A batch whose one new message fails is that
//!   message's attempt, with no second run.
//! - Batches that share ids insert their rows in the ids' order, so they
//!   wait for one another instead of deadlocking.
//!
//! # Dead messages and replays (transactional mode)
//!
//! A failing message keeps its payload and headers with its attempt count
//! (`inbox_consumer.attempts`: `failures`, `dead`, `last_error`,
//! `payload`, `headers`), so a dead message can be replayed after a fix
//! without the broker: a queue without a dead-letter exchange drops a
//! rejected message, and JetStream never redelivers a terminated one. An
//! operator asks for the replay (`messaging-admin inbox retry`, which sets
//! `replay_at` and clears the dead mark); the consumer runs
//! [`Inbox::run_replays`] beside its subscription with the same handler,
//! so the replay goes through the inbox: a message processed meanwhile is a
//! duplicate, a failing one is counted and dies again after the maximum.
//!
//! ```no_run
//! # #[cfg(feature = "postgres")]
//! # async fn run(inbox: inbox_consumer::PostgresInbox, shutdown: impl std::future::Future<Output = ()>) {
//! use std::time::Duration;
//! use inbox_consumer::HandlerError;
//!
//! let inbox = &inbox;
//! inbox
//!     .run_replays(
//!         |message| async move {
//!             inbox
//!                 .process(&message, |_tx, _message| Box::pin(async { Ok::<_, HandlerError>(()) }))
//!                 .await
//!         },
//!         Duration::from_secs(1),
//!         shutdown,
//!     )
//!     .await;
//! # }
//! ```
//!
//! # Trace context (feature `trace`)
//!
//! With the feature `trace`, the handler runs in a span `inbox.handle`
//! (consumer, message id) whose parent is the trace context of the
//! message's W3C `traceparent` header, which the `outbox` crate's relays
//! set from what `outbox::enqueue` stored: the producer's trace goes on in
//! the consumer, through [`Inbox::process`], [`Inbox::process_each`] (a
//! span per message), the replays and the lease mode; a
//! [`Inbox::process_batch`] handler runs in one span `inbox.batch` linked to
//! each message's context. The application installs tracing-opentelemetry's
//! layer. Without the feature no OpenTelemetry crate is compiled and no span
//! is made. See the `trace` module.
//!
//! # Outcomes and what the adapters do with them
//!
//! | [`Outcome`] | meaning | RabbitMQ | JetStream |
//! |---|---|---|---|
//! | `Processed` | the handler ran, its effect committed | ack | ack |
//! | `Duplicate` | processed before, handler not run | ack | ack |
//! | `InFlightElsewhere` | another consumer holds the lease (lease mode) | nack, requeue | nak with delay |
//! | `Failed { attempt }` | the handler failed, attempt counted | nack, requeue | nak with backoff |
//! | `Unavailable` | the inbox's own database or store failed | nack, requeue | nak with delay |
//! | `Dead { reason }` | never to be processed | reject, no requeue (→ DLX) | term |
//!
//! Attempts are counted outside the handler's transaction, so a rollback does
//! not erase them. After `max_attempts` (default 5) failures the message is
//! dead. A [`HandlerError::permanent`] failure (an undecodable payload) is
//! counted and dead at once. A message without an id is dead with
//! [`DeadReason::MissingId`] unless a key extractor is configured. A handler
//! that panics is counted as a failed attempt.
//!
//! # In production
//!
//! - **TLS.** `amqps://` and `tls://` URLs connect over TLS (rustls on ring,
//!   with the platform's root certificates), never in plaintext.
//! - **Reconnection.** [`rabbitmq::Subscription`] owns its connection and,
//!   after losing it (a broker restart, a network cut, a channel error), logs
//!   the cause at WARN and connects and subscribes again, backing off from
//!   100 ms to 5 s; the broker redelivers what was not acked and the inbox
//!   acks the copies it already processed. Each connect and subscription
//!   step is bounded (5 s by default), so a broker that accepts TCP and never
//!   answers is an error, not a hang. [`nats::Subscription`] relies on
//!   async-nats's own reconnection, logs the consumer's errors and goes on,
//!   and opens the consumer (and the stream, if asked) again when it was
//!   deleted. The lower-level [`rabbitmq::consume`] does not reconnect.
//! - **JetStream messages without `Nats-Msg-Id`** are keyed
//!   `<stream>/<sequence>@<stored>`, the instant the stream stored the
//!   message in nanoseconds: redeliveries dedupe, and a stream deleted and
//!   created again (whose sequence restarts at 1) does not make its new
//!   messages look like the old ones. RabbitMQ messages without a
//!   `message_id` are dead-lettered unless a key extractor finds a key (AMQP
//!   has no stored sequence to key by).
//!   Prefer ids set by the publisher: only they dedupe a message published
//!   twice.
//! - **A new durable JetStream consumer replays the stream.** Created with
//!   the default deliver policy (`All`), it is handed every message the
//!   stream still holds; the inbox runs those its consumer name has not
//!   processed (all of them for a new name, or after their rows were
//!   purged). Choose `DeliverPolicy::New` or `ByStartTime` when the history
//!   must not run.
//! - **The consumer name is the dedup scope, not the broker.** Two
//!   consumers with the same name share their processed ids, whatever broker
//!   or queue they read: the same id arriving through RabbitMQ and through
//!   JetStream runs once. Give each independent effect its own name.
//!
//! # Guarantees
//!
//! ## Transactional mode (PostgreSQL, SQLite)
//!
//! **Promises.**
//! - *Exactly-once effect* for effects written through the transaction the
//!   handler gets: the inbox row and the effect commit together or not at all.
//! - *Crashes.* Before the commit: both roll back and the redelivery processes
//!   the message. After the commit, before the ack: the redelivery finds the
//!   row, is [`Outcome::Duplicate`], and is acked.
//! - *Concurrency.* Two consumers given the same message at once: the second
//!   insert waits on the primary key until the first transaction ends, then
//!   sees the row (duplicate) or, if the first rolled back, processes it. The
//!   handler's effect never commits twice.
//! - *Poison messages* stop after `max_attempts` and are dead-lettered; the
//!   messages behind them flow.
//! - *Batches* ([`Inbox::process_batch`], [`Inbox::process_each`]): every
//!   promise above holds message by message. A crash before the batch's
//!   commit rolls the whole batch back: it is redelivered and nothing of it
//!   was applied. A crash after the commit and before the ack (a
//!   RabbitMQ `multiple` ack, or JetStream's acks one by one) redelivers
//!   duplicates only, acked without running. A failing message sends its
//!   batch through one message at a time, where only it is counted.
//! - *Retention.* [`Inbox::purge`] deletes processed rows older than the
//!   retention (default 7 days) in batches, safely from many instances
//!   (`FOR UPDATE SKIP LOCKED` on PostgreSQL); rows of messages in flight are
//!   uncommitted, so it cannot see them.
//!
//! **Does not promise.**
//! - Anything about side effects *outside* the transaction (an HTTP call, an
//!   email): those run again when the transaction rolls back. In a batch
//!   that falls back to one message at a time (one of its messages
//!   failed), the handler runs again for every new message of the batch.
//! - Dedup beyond the retention window: a message redelivered after its row
//!   was purged runs again. Keep the retention above the broker's redelivery
//!   horizon.
//! - Counting a crash as an attempt: a process killed mid-handler rolls back
//!   without a trace, so a message that kills the process every time is only
//!   stopped by the broker (quorum queue `x-delivery-limit`, JetStream
//!   `max_deliver`). Panics are caught and counted.
//! - Ordering: a requeued message may be overtaken.
//!
//! ## Lease mode (any [`idempotency_core::Store`]: memory, Redis)
//!
//! **At-least-once with deduplication.** The effect and the "done" mark are two
//! writes in two systems, so there is a window between them.
//!
//! **Promises.**
//! - Duplicates that arrive after the mark are acked without running the
//!   handler, for the retention (the mark's TTL).
//! - Of concurrent copies, one runs; the others get
//!   [`Outcome::InFlightElsewhere`] while its lease holds (extended by a
//!   heartbeat every half lease).
//! - Attempts and dead marks as in transactional mode.
//! - *A store that hangs* does not hang [`Inbox::process`]: every store call
//!   (claim, complete, release, the heartbeat's extensions) is bounded by
//!   [`InboxConfig::store_timeout`](config::InboxConfigBuilder::store_timeout)
//!   (default 2 s), through [`idempotency_core::Guarded`], the same guard the
//!   HTTP middleware uses. A claim that times out gives
//!   [`Outcome::Unavailable`] within that time.
//!
//! **Does not promise.**
//! - A crash after the effect and before the mark: the claim lapses after its
//!   lease, the redelivery takes it over, and the effect runs again.
//! - A handler that outlives its lease while the heartbeat cannot reach the
//!   store may be taken over and run twice ([`InboxMetrics::lease_lost`]
//!   counts it).
//! - With the memory store, anything across processes or restarts.
//!
//! ## Store outages (both modes)
//!
//! The handler does not run; the outcome is [`Outcome::Unavailable`] and the
//! message is requeued, not counted as an attempt. In lease mode a store that
//! does not answer at all counts as an outage once the store timeout has
//! passed ([`StoreError::Timeout`](idempotency_core::StoreError::Timeout)):
//! a store that hangs gives `Unavailable` within the store timeout (the
//! first claim times out). One that stops answering midway stops `process`
//! at the first call that times out, plus at most one more (the release of
//! the claim it holds). If the store stops answering *after* the handler
//! ran, the effect is kept and the message is `Processed` (the missing mark
//! is logged; the claim lapses after the lease). In transactional mode the
//! database pool's own timeouts bound the wait.
//!
//! ## Metrics
//!
//! [`Inbox::metrics`] counts outcomes in the process. The same counts go
//! through the [`metrics`](https://docs.rs/metrics) facade, to whatever
//! exporter the application installs: `inbox_messages_total{consumer,outcome}`
//! (`processed`, `duplicate`, `in_flight_elsewhere`, `failed`,
//! `unavailable`, `dead`) and `inbox_lease_lost_total{consumer}`; in lease
//! mode the store calls also count in `idempotency_store_errors_total` and
//! `idempotency_store_duration_seconds` ([`idempotency_core::metrics`] lists
//! them and what to alert on). The series are registered at 0 when the
//! inbox is created: install the recorder before.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

#[cfg(any(feature = "rabbitmq", feature = "nats"))]
mod backoff;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod batch;
pub mod config;
pub mod error;
mod inbox;
mod lease;
pub mod message;
pub mod metrics;
pub mod outcome;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod replay;
#[cfg(feature = "trace")]
pub mod trace;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod transactional;

#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;

pub use config::{ConfigError, InboxConfig, InboxConfigBuilder};
pub use error::InboxError;
pub use inbox::Inbox;
pub use lease::Lease;
pub use message::InboxMessage;
pub use metrics::InboxMetrics;
pub use outcome::{DeadReason, Disposition, FailureKind, HandlerError, Outcome};

#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub use replay::REPLAY_BATCH;
#[cfg(feature = "postgres")]
pub use transactional::{migrate_postgres, PostgresTransactional};
#[cfg(feature = "sqlite")]
pub use transactional::{migrate_sqlite, SqliteTransactional};
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub use transactional::{InboxDatabase, Transactional};

/// An inbox in transactional mode on PostgreSQL.
#[cfg(feature = "postgres")]
pub type PostgresInbox = Inbox<PostgresTransactional>;
/// An inbox in transactional mode on SQLite.
#[cfg(feature = "sqlite")]
pub type SqliteInbox = Inbox<SqliteTransactional>;
/// An inbox in lease mode over the store `S`.
pub type LeaseInbox<S> = Inbox<Lease<S>>;

/// The boxed future a handler returns (`Box::pin(async move { .. })`).
pub use idempotency_core::BoxFuture;
