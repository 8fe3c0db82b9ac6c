//! The transactional outbox: write an event in the same transaction as the
//! business change, and a relay publishes it to the broker afterwards.
//!
//! "Update the database, then publish" loses the message when the process
//! dies between the two, and "publish, then commit" sends a message about a
//! change that may roll back. [`enqueue`] writes the event as a row in the
//! caller's own sqlx transaction: it exists exactly when the change commits.
//! A relay ([`PostgresRelay`], [`SqliteRelay`]) claims committed events,
//! publishes them through a [`Publisher`] (RabbitMQ with publisher
//! confirms, NATS JetStream), and marks them published once the broker
//! confirmed them.
//!
//! # Quick start: PostgreSQL and RabbitMQ
//!
//! Not on crates.io yet: depend on a clone of the repository (here beside
//! your project).
//!
//! ```toml
//! [dependencies]
//! outbox = { path = "../idempotency-rs/outbox", features = ["postgres", "rabbitmq"] }
//! sqlx = { version = "0.8", default-features = false, features = ["postgres", "runtime-tokio"] }
//! tokio = { version = "1", features = ["rt-multi-thread", "macros", "signal"] }
//! ```
//!
//! ```no_run
//! # #[cfg(all(feature = "postgres", feature = "rabbitmq"))]
//! # async fn run(shutdown: impl std::future::Future<Output = ()>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use outbox::{rabbitmq::RabbitMqPublisher, Event, PostgresRelay, RelayConfig};
//!
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?;
//! outbox::migrate_postgres(&pool).await?;
//! sqlx::query("CREATE TABLE IF NOT EXISTS outbox_quickstart_payments (id TEXT PRIMARY KEY, amount BIGINT NOT NULL)")
//!     .execute(&pool)
//!     .await?;
//!
//! // The producer: the change and its event commit together, or not at all.
//! let id = outbox::Uuid::now_v7().to_string();
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO outbox_quickstart_payments (id, amount) VALUES ($1, $2)")
//!     .bind(&id)
//!     .bind(100_i64)
//!     .execute(&mut *tx)
//!     .await?;
//! let event = Event::new("payments", format!(r#"{{"id":"{id}","amount":100}}"#))
//!     .with_ordering_key("acct-1")
//!     .with_header("content-type", "application/json");
//! outbox::enqueue(&mut *tx, &event).await?;
//! tx.commit().await?;
//!
//! // The relay (any number of them, anywhere): destination `payments` goes to
//! // the durable queue `payments`, message_id = the event id.
//! let publisher = RabbitMqPublisher::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! let relay = PostgresRelay::new(pool, publisher, RelayConfig::default());
//! // Until `shutdown` resolves (SIGTERM, say); then it finishes the batch in hand.
//! relay.run(shutdown).await?;
//! # Ok(())
//! # }
//! ```
//!
//! [`enqueue`] takes any `&mut` connection of the database: `&mut *tx` for a
//! `sqlx::Transaction`, `&mut *conn` for a pooled connection. It works on
//! SQLite too ([`migrate_sqlite`], table `outbox_events`), where a single
//! [`SqliteRelay`] per database file publishes (no advisory locks on SQLite;
//! the guarantees below are the PostgreSQL relay's, and on SQLite hold for
//! one relay).
//!
//! Both relays are one type, [`Relay<DB, P>`](Relay), written once over the
//! sealed [`OutboxDatabase`] (`sqlx::Postgres`, `sqlx::Sqlite`): the run
//! loop, the lag and the retention are the same code; only the claim, the
//! marking, the wait for work and the SQL differ. [`PostgresRelay<P>`] and
//! [`SqliteRelay<P>`] name it on each database. Migrations run through
//! `sql-foundation`, the workspace's shared SQL layer.
//!
//! # Guarantees
//!
//! **At least once.** An event committed to the outbox reaches the broker at
//! least once, unless it dies (below). It can reach the broker more than once:
//! when the relay crashes, or its database fails, after the broker confirmed a
//! batch and before the relay's transaction committed, the batch is published
//! again. Every copy carries the event id (AMQP `message_id`, `Nats-Msg-Id`):
//! deduplicate on it (the `inbox-consumer` crate, JetStream's duplicate
//! window).
//!
//! **Nothing before commit.** A rolled-back transaction leaves no event; an
//! uncommitted one is invisible to the relays.
//!
//! **Order.** Events with the same ordering key reach the broker in enqueue
//! order (`seq`), with any number of producers and relays:
//! - producers of one key take a transaction-scoped advisory lock on the key
//!   in the `INSERT`, so they commit in the order they drew `seq` (a second
//!   producer of the key waits until the first commits or rolls back);
//! - a relay claims a key with `pg_try_advisory_xact_lock`, so two relays
//!   never publish one key at once, and a key's events are taken oldest
//!   first, only from the head: a key whose oldest waiting event is in
//!   backoff waits with it;
//! - a batch is sent in `seq` order on one channel and marked published only
//!   once confirmed; at the first failure of a key in a batch, the key's later
//!   events are left waiting, never marked ahead of it.
//!
//! The one exception: a batch is pipelined, so when an event fails, later
//! events of its key in the same batch may already be at the broker; they are
//! sent again after the failed one. A consumer that deduplicates by id then
//! sees them before it. With [`RelayConfigBuilder::max_per_key`]`(1)` a key
//! has at most one event in flight and the order holds across failures too.
//! Events without a key have no order (`FOR UPDATE SKIP LOCKED`, oldest
//! first). A dead event is skipped: its key goes on without it.
//!
//! **Concurrency.** Relays share the work without coordination: keyless
//! events by `SKIP LOCKED`, keyed events by key locks. A relay holds its
//! claim (row and key locks, in its transaction) while it publishes the
//! batch; a relay that dies releases it when its connection drops. A relay
//! uses two connections of its pool: one for `LISTEN`, one for the batch.
//!
//! **Broker outages.** A publish the broker does not confirm
//! ([`PublishError::Unavailable`]: connection lost, confirm timed out) is not
//! an attempt: the event waits untouched, the relay tries again after the
//! outage delay, and publishing resumes by itself when the broker is back
//! (the RabbitMQ publisher reconnects; async-nats reconnects). Nothing is
//! lost and nothing dies of an outage.
//!
//! **Failures of an event.** A refusal ([`PublishError::Rejected`]: a nack, a
//! returned message) counts as an attempt; the event is retried after
//! `retry_delay * 2^(attempt-1)` (capped), and dies after `max_attempts`
//! (default 10) with the last error kept (`dead_at`, `last_error`). A
//! [`PublishError::Permanent`] failure dies at once.
//!
//! **Crashes.** A relay that crashes mid-batch rolls back: its events wait
//! and are claimed again (and may be published twice, see above). A producer
//! that crashes before commit leaves nothing.
//!
//! **Wake-ups.** Each enqueue notifies the channel `outbox` at commit; the
//! relays `LISTEN` and poll every poll interval (default 1 s) as a fallback
//! (a lost notification, a retry coming due). While there is work, batches
//! follow each other without a pause.
//!
//! **Retention.** [`Relay::purge`] (run every purge interval by
//! [`Relay::run`]) deletes published events older than the retention
//! (default 7 days) in batches. Dead events are kept for inspection. On
//! PostgreSQL a reader of the table that needs its history (a projection
//! building from the events) places a *retention hold* ([`place_hold`],
//! table `outbox.holds`): the purge deletes only events below the lowest
//! hold, and records the highest `seq` it deleted ([`purged_through`]), so
//! a reader that asks for a history that is gone is told so.
//!
//! **Commit order.** On PostgreSQL each event records its transaction's id
//! (`txid`), taken before its `seq` is drawn: a transaction that holds a
//! drawn `seq` always has an xid, which is what lets a reader tail the table
//! in commit order without skipping an event that commits after one with a
//! higher `seq` (the `projection` crate does).
//!
//! **Does not promise.** Exactly-once delivery; order across keys; order for
//! keyless events; anything for events that died.
//!
//! # Trace context (feature `trace`)
//!
//! With the feature `trace`, [`enqueue`] stores the W3C `traceparent` of the
//! current `tracing` span's OpenTelemetry context (through
//! tracing-opentelemetry's layer, which the application installs) in the
//! event's `traceparent` column, formatted on the stack. Either relay, built
//! with the feature or not, sends a stored `traceparent` as the message
//! header `traceparent` (unless the event has a header of that name), so
//! that the consumer continues the trace ([`trace`] module; the
//! `inbox-consumer` crate's own `trace` feature). A relay built with the
//! feature is a hop of the trace: it publishes each event in a span
//! `outbox.publish` whose parent is the event's `traceparent`, ended when
//! the batch is marked, and sends that span's context as the header.
//! Without the feature no OpenTelemetry crate is compiled and enqueue's
//! statement is unchanged.
//!
//! # Metrics
//!
//! [`Relay::metrics`] is a snapshot of what a relay did; the same counts, and
//! the lag, go through the [`metrics`](https://docs.rs/metrics) facade to
//! the exporter the application installs: `outbox_events_total{relay,outcome}`
//! (`published`, `retried`, `dead`, `unavailable`, `deferred`),
//! `outbox_lag_seconds{relay}`, `outbox_batches_total{relay}`,
//! `outbox_database_errors_total{relay}` and `outbox_purged_total{relay}`.
//! Install the recorder, call [`metrics::describe`], then create the relays
//! ([`Relay::named`] sets the `relay` label). The module [`metrics`] lists
//! them, and what to alert on.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod config;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod database;
mod enqueue;
pub mod error;
pub mod event;
pub mod metrics;
pub mod publisher;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod relay;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod settle;
#[cfg(feature = "trace")]
#[cfg_attr(docsrs, doc(cfg(feature = "trace")))]
pub mod trace;

#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;

pub use config::{ConfigError, RelayConfig, RelayConfigBuilder};
#[cfg(feature = "sqlite")]
pub use database::migrate_sqlite;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub use database::OutboxDatabase;
#[cfg(feature = "postgres")]
pub use database::{holds, migrate_postgres, place_hold, purged_through, raise_hold, release_hold};
pub use enqueue::{enqueue, enqueue_with_max_size, OutboxConnection, CHANNEL};
pub use error::OutboxError;
pub use event::{Event, EventError, DEFAULT_MAX_EVENT_SIZE};
pub use metrics::RelayMetrics;
pub use publisher::{Outgoing, PublishError, Publisher};
#[cfg(feature = "postgres")]
pub use relay::PostgresRelay;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub use relay::Relay;
#[cfg(feature = "sqlite")]
pub use relay::SqliteRelay;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub use settle::BatchReport;
pub use uuid::Uuid;

/// Entry points for the fuzz targets (`fuzz/`): the decoding of a stored
/// row, which the relays call with the row's columns. Not part of the API.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[doc(hidden)]
pub mod __fuzz {
    use crate::{Event, OutboxError};

    /// The event of a row with these `id`, `destination`, `ordering_key`,
    /// `headers` and `payload` columns, as both relays read it.
    pub fn event_from_row(
        id: &str,
        destination: String,
        ordering_key: Option<String>,
        headers: &str,
        payload: Vec<u8>,
    ) -> Result<Event, OutboxError> {
        Event::from_row(id, destination, ordering_key, headers, payload)
            .map_err(OutboxError::Corrupt)
    }

    /// The columns [`enqueue`](crate::enqueue) writes for `event`, in the
    /// order of [`event_from_row`]'s parameters.
    pub fn event_to_row(event: &Event) -> (String, String, Option<String>, String, Vec<u8>) {
        (
            event.id().to_string(),
            event.destination().to_owned(),
            event.ordering_key().map(str::to_owned),
            event.headers_json(),
            event.payload().to_vec(),
        )
    }
}
