//! Read models fed by events (CQRS without event sourcing): a projection
//! applies events to tables of its own, and its change commits in the same
//! transaction as its record that the event is applied, so each event takes
//! effect exactly once, across crashes of any process.
//!
//! Two sources:
//! - **the outbox table** of the same PostgreSQL database
//!   (`outbox.events`, written by [`outbox::enqueue`]), tailed in commit
//!   order with no broker: [`Projector::run`]. It never skips an event whose
//!   transaction commits after one with a higher `seq` (see [The outbox
//!   tail](#the-outbox-tail));
//! - **a broker** (RabbitMQ, NATS JetStream) through the transactional
//!   [inbox](inbox_consumer): [`Projector::apply_message`] runs the
//!   projection inside the inbox's transaction; [`Projector::apply_batch`]
//!   applies a batch of messages (the subscriptions' `batch` and
//!   `run_batch`) in one transaction with one commit.
//!
//! A projection has a name and versions. Each version keeps its tables in a
//! schema of its own, `<name>_v<version>`; a new version builds from the
//! history while the old one serves, and one transaction switches to it
//! once it has caught up ([Rebuilds](#rebuilds)).
//!
//! # Quick start: per-currency totals of payments
//!
//! ```no_run
//! use projection::{ApplyError, Event, Projection, Projector, Version};
//! use serde::Deserialize;
//! use sqlx::PgConnection;
//!
//! /// Per-currency totals of the payments (the `payments` events).
//! struct PaymentTotals;
//!
//! #[derive(Deserialize)]
//! struct Payment {
//!     amount: i64,
//!     currency: String,
//! }
//!
//! impl Projection for PaymentTotals {
//!     async fn setup(&self, conn: &mut PgConnection, version: &Version) -> Result<(), sqlx::Error> {
//!         let totals = version.table("totals"); // payment_totals_v<N>.totals
//!         sqlx::query(&format!(
//!             "CREATE TABLE {totals} (currency TEXT PRIMARY KEY, total BIGINT NOT NULL, count BIGINT NOT NULL)"
//!         ))
//!         .execute(conn)
//!         .await?;
//!         Ok(())
//!     }
//!
//!     async fn apply(&self, conn: &mut PgConnection, version: &Version, event: &Event) -> Result<(), ApplyError> {
//!         let payment: Payment = event.json()?; // a payload that does not decode is parked at once
//!         let totals = version.table("totals");
//!         sqlx::query(&format!(
//!             "INSERT INTO {totals} AS t (currency, total, count) VALUES ($1, $2, 1) \
//!              ON CONFLICT (currency) DO UPDATE SET total = t.total + $2, count = t.count + 1"
//!         ))
//!         .bind(&payment.currency)
//!         .bind(payment.amount)
//!         .execute(conn)
//!         .await?; // a database error is an attempt, retried
//!         Ok(())
//!     }
//! }
//!
//! # async fn demo(pool: sqlx::PgPool, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Box<dyn std::error::Error>> {
//! projection::migrate(&pool).await?;
//! let projector = Projector::builder(pool.clone(), "payment_totals", PaymentTotals)
//!     .version(1) // a higher number rebuilds into new tables, then switches
//!     .partitions(4) // applied in parallel; one ordering key stays in order
//!     .destinations(["payments"])
//!     .build()?;
//!
//! // The query side, in any process: the tables of the version served.
//! if let Some(served) = projector.served_version().await? {
//!     let totals = projector.version_of(served).table("totals");
//!     let rows: Vec<(String, i64, i64)> =
//!         sqlx::query_as(&format!("SELECT currency, total, count FROM {totals} ORDER BY currency"))
//!             .fetch_all(&pool)
//!             .await?;
//! #   let _ = rows;
//! } // `None`: the first version is still building
//!
//! // The tail of the outbox (any number of processes): until `shutdown`
//! // resolves, or a newer version is served.
//! projector.run(shutdown).await?;
//! # Ok(()) }
//! ```
//!
//! The producer side is the outbox's: the business change and its event
//! commit together (`outbox::enqueue(&mut *tx, &Event::new("payments",
//! payload).with_ordering_key(account))`). A relay may publish the same
//! events to a broker for other consumers; the tail does not need one.
//!
//! # From a broker
//!
//! ```no_run
//! # use projection::{Projection, Projector, Source};
//! # use futures_util::StreamExt;
//! # async fn demo<P: Projection>(pool: sqlx::PgPool, totals: P, stream: async_nats::jetstream::stream::Stream) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use inbox_consumer::nats;
//!
//! let projector = Projector::builder(pool, "payment_totals", totals)
//!     .source(Source::Inbox)
//!     .build()?;
//! let inbox = projector.inbox().await?; // inbox consumer `payment_totals_v1`
//! // A durable consumer of the version's name, from the stream's start.
//! let consumer = stream
//!     .get_or_create_consumer(
//!         projector.consumer(),
//!         async_nats::jetstream::consumer::pull::Config {
//!             durable_name: Some(projector.consumer().to_owned()),
//!             ..Default::default()
//!         },
//!     )
//!     .await?;
//! let mut messages = consumer.messages().await?;
//! while let Some(msg) = messages.next().await {
//!     let msg = msg?;
//!     let outcome = projector.apply_message(&inbox, &nats::message(&msg)).await;
//!     nats::settle(&msg, &outcome).await?; // ack, nak with a delay, or term
//! }
//! # Ok(()) }
//! ```
//!
//! A redelivered message is an [`Outcome::Duplicate`](inbox_consumer::Outcome)
//! of the inbox and is not applied again. Order is the broker's: consume one
//! queue (or JetStream consumer) one message at a time. A new version is a
//! new inbox consumer ([`Projector::consumer`], `<name>_v<version>`) and,
//! on JetStream, a new durable consumer from the stream's start; the
//! application calls [`Projector::switch`] when it has caught up (no
//! message pending) and feeds [`Projector::record_lag`] from the broker.
//! RabbitMQ keeps no history: a new version fed from RabbitMQ only sees
//! what arrives after it starts.
//!
//! # The outbox tail
//!
//! Concurrent producers draw `seq`s before they commit, so events become
//! visible out of `seq` order: a transaction holding `seq` 5 may commit
//! after one holding 6. A tail that reads `seq > checkpoint` skips 5 for
//! good (Marten's async daemon lost events this way). This one:
//!
//! - **applies every visible event it has not applied**, in `seq` order,
//!   and records each applied `seq` (a *mark*, table `projection.applied`)
//!   in the apply's transaction: a late-committing lower `seq` is applied
//!   by the first round after it becomes visible;
//! - keeps the scan bounded with a **low watermark `W`** per partition:
//!   every event of the partition with `seq <= W` is applied (or parked) or
//!   will never exist; the scan starts above `W`, and marks at or below it
//!   are forgotten.
//!
//! A round of a partition is one transaction T: take the partition's
//! advisory lock (one applier at a time, across processes; T has no xid
//! yet), then one statement whose snapshot is `S`: the partition's state,
//! `xmin(S)`, the highest `seq` visible in `S`, and the partition's events
//! above `W` without a mark, in `seq` order (a batch). Apply them, mark
//! them, then:
//!
//! 1. if there is a candidate `(M, X)`, every transaction with an xid below
//!    `X` has ended (`xmin(S) >= X`; or, when a transaction of another
//!    database holds `xmin` back, every such transaction *of this database*,
//!    checked in the lock's statement, before `S`: `pg_stat_activity` and
//!    `pg_prepared_xacts`), and every event of the partition with
//!    `seq <= M` visible in `S` is now marked: `W := M`;
//! 2. with no candidate left, a new one: `M` a `seq` visible in `S` (the
//!    highest, when the scan reached the end; else the last one applied),
//!    and `X` = T's own xid, which T gets after `S` was taken;
//! 3. commit (marks, parked events, `W`, the candidate, and the outbox
//!    retention hold raised to `W + 1`: one statement).
//!
//! **Why `W := M` skips nothing.** Take an event of the partition with
//! `seq = s < M`, written by transaction `Ts`. `M` was visible in the
//! snapshot `S1` of the round that chose `(M, X)`, so `M`'s transaction
//! committed before `S1`. The sequence hands out `seq`s in increasing
//! order (its default `CACHE 1`), so `s` was drawn before `M`; and
//! [`outbox::enqueue`] takes the transaction's xid (`pg_current_xact_id()`)
//! in its statement *before* the row's `seq` is drawn, so `Ts` had its xid
//! `xs` before `s`, hence before `S1`, hence before `X` was assigned (after
//! `S1`). xids are assigned in increasing order: `xs < X`. A later round
//! sees `xmin(S2) >= X`: no transaction with an xid below `X` is running,
//! so `Ts` has ended. (Or its lock statement, before `S2`, found no
//! transaction of this database with an xid below `X` running, as a
//! backend's or a prepared one; `Ts` wrote to this database's table, and
//! a backend's xid is published before it draws a `seq`: so `Ts` had
//! ended before `S2` too.) Either it rolled back (`s` never exists) or it
//! committed before `S2` was taken, and `s` is visible in `S2`: the
//! condition of step 1 then requires it marked. So when `W` becomes `M`,
//! every event at or below `M` that will ever exist is applied. By
//! induction the same holds for every `W`, and the scan, which reads every
//! unmarked event above `W`, misses none.
//!
//! **Why the fence is T's xid and not `xmax(S1)`.** `pg_snapshot_xmax` is
//! the latest *completed* xid plus one, not the next xid to assign: a
//! running transaction whose xid is above every completed one is neither
//! listed in the snapshot nor below its `xmax`. If A takes xid 100, then B
//! takes 101 and draws `seq` 5, then A draws 6 and commits, a snapshot now
//! reads `101:101:`, and every later snapshot has `xmin = 101 >= xmax(S1)`
//! while B still runs: the rule `xmin(S2) >= xmax(S1)` would set `W = 6`
//! and skip 5 when B commits (the test
//! `the_snapshot_xmax_is_not_a_fence` builds this case). An xid assigned
//! after `S1` is above every xid assigned before it, running or not.
//!
//! **Requirements.** Every producer enqueues through this version of
//! [`outbox::enqueue`] (an older one drew the `seq` before its xid: the
//! proof does not hold for its events); nothing else inserts into
//! `outbox.events`; its sequence keeps `CACHE 1`.
//!
//! **Cost.** The scan reads the events between `W` and the newest:
//! normally about two batches (`W` moves one round behind). A write
//! transaction of this database that stays open — any transaction holding
//! an xid, a producer or not — holds `W` back until it ends (one of another
//! database does not: the check above looks past it), and the scans
//! meanwhile read every event committed since: a backlog applied while one
//! is open costs a scan that grows with it. Keep write transactions short
//! (`idle_in_transaction_session_timeout`).
//!
//! # Order and partitions
//!
//! Producers of one ordering key take a lock on the key in the enqueue
//! statement until they commit, so a key's events commit in `seq` order:
//! when one is visible, every earlier event of its key that commits at all
//! already has. A round applies in `seq` order, so a key's events apply in
//! order. With [`ProjectorBuilder::partitions`]`(P)` the events are split by
//! a hash of the ordering key (of the id for keyless events), and the P
//! partitions run in parallel, each in order; events of different keys
//! have no order between them.
//!
//! # Poison events
//!
//! A failing `apply` rolls its transaction back; the attempt is counted in
//! its own statement afterwards (`projection.attempts`), and the partition
//! retries it alone after a backoff (`retry_delay`, doubled per attempt up
//! to `max_retry_delay`) while the other partitions go on. After
//! `max_attempts` failures — at once for a [permanent](ApplyError::permanent)
//! error, a row that is not an event, or a payload [`Event::json`] cannot
//! decode — it is *parked*: recorded with its reason in `projection.parked`
//! ([`Projector::parked`]), marked as applied (it counts as applied for the
//! watermark), and the events behind it are applied. From a broker the
//! inbox counts the attempts and dead-letters the message; the projector
//! records it in `projection.parked` too.
//!
//! # Rebuilds
//!
//! A version's tables live in schema `<name>_v<version>`
//! ([`Version::schema`]; [`Projection::apply`] gets the version). Start a
//! projector with a higher [`version`](ProjectorBuilder::version): it
//! registers the new version (its schema, [`Projection::setup`], and a
//! retention hold in the outbox at the start of the history, so the outbox
//! keeps every event it has not applied), builds from the outbox's history
//! while the served version goes on, and when at most
//! [`switch_lag`](ProjectorConfig::switch_lag) events wait, one transaction
//! makes it the served version, releases the older versions' holds, and
//! notifies (`NOTIFY projection`). Every process reads the served version
//! ([`Projector::served_version`], [`ServedVersion`]: cached for
//! `served_ttl`, forgotten at a switch) and queries its tables; the old
//! version's tails stop ([`Finished::Superseded`]); its tables stay until
//! [`drop_version`]. The served version only goes up. The first version is
//! served once it has caught up too (before that, `served_version` is
//! `None`).
//!
//! **History gone.** The outbox records the highest `seq` its purge ever
//! deleted ([`outbox::purged_through`]). A version that needs events from a
//! `seq` at or below it is not registered:
//! [`ProjectionError::HistoryPurged`] names the projection, the version, the
//! first `seq` it needs and how far the purge went. Never a silently
//! partial model. ([`Start::Now`] starts a version from the events to come,
//! on purpose.)
//!
//! # Lag and metrics
//!
//! Per version, through the [`metrics`](https://docs.rs/metrics) facade:
//! events behind, seconds behind (from the oldest unapplied event's
//! `created_at`), events applied, parked, failed attempts, database errors,
//! and the served version. [`metrics`] lists them and what to alert on.
//!
//! # Guarantees
//!
//! - **Exactly once.** An event's change, its mark (or inbox row), and the
//!   partition's watermark commit in one transaction, or none of them does.
//!   An event is applied at most once per version, and every event that
//!   commits is applied or parked, none skipped, late commits included.
//! - **Concurrency.** Any number of processes may run one version: a
//!   partition is applied by one transaction at a time (a
//!   transaction-scoped advisory lock; a process that finds it taken waits
//!   for the next notification), and the next holder's snapshot, taken
//!   after the lock, sees everything the previous one committed. Producers
//!   are never blocked by the tail: it takes no lock they take.
//! - **Crashes.** A process killed mid-round rolls its transaction back
//!   (the lock goes with its connection): nothing of the batch is applied,
//!   nor marked, nor counted as an attempt; the next round, in any process,
//!   applies it. A crash after the commit loses nothing. The broker sources
//!   inherit the inbox's guarantees (a redelivery after the commit is a
//!   duplicate).
//! - **Outages.** A database error ends the round (rolled back); the
//!   partition retries after the outage delay, and a listener that fails
//!   falls back to polling. Nothing is counted as an attempt, nothing is
//!   lost. The outbox keeps what a version has not applied (its hold).
//! - **Does not promise.** Order across ordering keys; that a parked event
//!   is ever applied (an operator decides); anything for events written to
//!   `outbox.events` other than by [`outbox::enqueue`] (see the
//!   requirements above); effects of `apply` outside its transaction (an
//!   HTTP call runs again on a retry).
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod apply;
mod broker;
pub mod config;
pub mod error;
mod event;
pub mod metrics;
mod projector;
mod served;
mod tail;
mod version;

pub use apply::{ApplyError, Projection};
pub use config::{ConfigError, ProjectorConfig};
pub use error::ProjectionError;
pub use event::Event;
pub use metrics::ProjectorMetrics;
pub use projector::{
    drop_version, migrate, Finished, Lag, Parked, Projector, ProjectorBuilder, RoundReport, Source,
    Start, VersionState,
};
pub use served::{served_version, ServedVersion, SWITCH_CHANNEL};
pub use version::{valid_name, Version, MAX_NAME_LEN};
