//! Orchestrated sagas: a business operation across services, as a sequence
//! of steps that either all complete, or are undone step by step, across
//! crashes of any process. Built from the workspace's parts, so that every
//! transition is one local transaction and every hop happens once: commands
//! leave through the transactional [`outbox`], replies arrive through the
//! transactional [`inbox`](inbox_consumer), and the instance, its timer and
//! its history live in the same PostgreSQL database.
//!
//! # Quick start: an order saga
//!
//! ```no_run
//! use std::time::Duration;
//! use saga::{CallOutcome, Command, OnTimeout, ReplyError, Saga, Sagas, Step};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! struct Order { id: String, sku: String, quantity: i64, amount: i64, payment_id: Option<String> }
//!
//! #[derive(Deserialize)]
//! struct InventoryReply { r#type: String }
//!
//! async fn charge(order: Order, key: String) -> CallOutcome<Order> {
//!     // POST the payment with `Idempotency-Key: key`; a 402 is definite, a timeout is not.
//! #   let _ = key;
//!     CallOutcome::Done(Order { payment_id: Some("pay_1".into()), ..order })
//! }
//!
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let order = Saga::<Order>::builder("order", 1)
//!     .step(
//!         Step::message("reserve", |o: &Order, _| {
//!             Command::json("inventory", &serde_json::json!({"type": "reserve", "order_id": o.id, "sku": o.sku, "quantity": o.quantity}))
//!         })
//!         .on_reply(|_, reply| match reply.json::<InventoryReply>()?.r#type.as_str() {
//!             "reserved" => Ok(()),
//!             "rejected" => Err(ReplyError::failed("out of stock")),
//!             other => Err(ReplyError::Undecodable(format!("unknown reply {other}"))),
//!         })
//!         .timeout(Duration::from_secs(30), OnTimeout::Compensate)
//!         .compensate(
//!             Step::message("release", |o: &Order, _| {
//!                 Command::json("inventory", &serde_json::json!({"type": "release", "order_id": o.id}))
//!             })
//!             .on_reply(|_, _| Ok(())),
//!         ),
//!     )
//!     .step(
//!         Step::call("charge", |o: Order, ctx| charge(o, ctx.idempotency_key()))
//!             .compensate(Step::call("refund", |o: Order, _ctx| async move { CallOutcome::Done(o) })),
//!     )
//!     .step(
//!         Step::message("ship", |o: &Order, _| {
//!             Command::json("inventory", &serde_json::json!({"type": "ship", "order_id": o.id}))
//!         })
//!         .on_reply(|_, reply| match reply.json::<InventoryReply>()?.r#type.as_str() {
//!             "shipped" => Ok(()),
//!             _ => Err(ReplyError::failed("unshippable")),
//!         }),
//!     )
//!     .build()?;
//!
//! saga::migrate(&pool).await?;
//! let sagas = Sagas::builder(pool.clone()).register(order).build();
//!
//! // Start it in the transaction that writes the order (with the request's
//! // idempotency record, in transactional mode): all of it commits, or none.
//! let mut tx = pool.begin().await?;
//! let data = Order { id: "42".into(), sku: "sku-1".into(), quantity: 1, amount: 100, payment_id: None };
//! sagas.start(&mut *tx, "order", &data.id, &data).await?;
//! tx.commit().await?;
//!
//! // Workers (any number, in any processes): timers, calls, retries.
//! sagas.run(std::future::pending()).await;
//! # Ok(()) }
//! ```
//!
//! Replies arrive through the transactional inbox of the saga's reply
//! queue: [`Sagas::process_reply`] (or [`Sagas::handle_reply`] inside your
//! own inbox handler). A service answering a command copies the command's
//! correlation headers into its reply ([`reply_headers`]).
//!
//! # Steps
//!
//! - *local* ([`Step::local`]): runs inside the transition's transaction
//!   (in a savepoint: a failing one leaves no write behind).
//! - *message* ([`Step::message`]): sends a command through the outbox in
//!   the transition's transaction (ordering key: the instance, so one
//!   instance's commands reach the broker in order), then waits for the
//!   reply, correlated by the headers `saga-id`, `saga-action`,
//!   `saga-phase`. Its timeout is a durable timer; on expiry the step
//!   retries or compensates, as its definition says.
//! - *call* ([`Step::call`]): an async call outside any transaction (an HTTP
//!   request), handed a stable idempotency key per saga and action
//!   ([`StepContext::idempotency_key`]). A worker claims it (a new attempt,
//!   the instance's timer pushed out by the call lease), commits, calls,
//!   then records the outcome in a new transaction, fenced by the attempt.
//!   [`CallOutcome::Uncertain`] is retried with the same key until the
//!   answer is definite; only [`CallOutcome::Failed`] compensates.
//!
//! # Trace context (feature `trace`)
//!
//! With the feature `trace` (which turns on `outbox/trace` and
//! `inbox-consumer/trace`), an instance keeps the W3C `traceparent` of the
//! span that started it (column `saga.instances.traceparent`), and every
//! step's span `saga.step` (local, call, and the enqueue of a command)
//! continues that trace. A command carries it through the outbox and the
//! broker to the participant's inbox, whose reply carries it back: one
//! trace from the start through every step. Without the feature no
//! OpenTelemetry crate is compiled and the spans are as before.
//!
//! # Guarantees
//!
//! - **One transaction per transition.** A reply's transition commits the
//!   inbox mark of the reply, the instance (locked `FOR UPDATE`) and its
//!   history, the outgoing commands and the timer in one commit; a timer's
//!   or a call's transition likewise, without the inbox. Nothing is written
//!   outside it. Starting a saga commits with the caller's transaction.
//! - **Crashes.** A crash before a commit rolls the transition back: the
//!   reply is redelivered (the inbox then sees it anew), the timer is still
//!   due. A crash after the commit and before the ack redelivers a
//!   duplicate that the inbox drops. A worker that dies during a call
//!   leaves the call claimed until its lease passes; the next worker makes
//!   it again under the same idempotency key, so the called service runs it
//!   once.
//! - **Concurrency.** Any number of workers, in any processes: a due
//!   instance is taken with `FOR UPDATE SKIP LOCKED`; a reply and a timer
//!   that race take the same row lock, and the second finds the instance
//!   no longer waiting (a late reply after a timeout is acknowledged and
//!   changes nothing: exactly one wins). A call's outcome is applied only if
//!   its attempt still holds the instance.
//! - **Compensation** runs in reverse order of the completed steps, each
//!   compensation retried with backoff; the instance ends `compensated`, or
//!   `failed` when a compensation keeps failing past its attempts (an
//!   operator decides). A definite failure compensates; an uncertain one
//!   never does.
//! - **Versions.** An instance keeps the definition version it started
//!   with. A worker that does not register that version leaves it alone
//!   and logs it once.
//! - **Bad input.** A reply for an unknown instance or a step it is not
//!   waiting for is acknowledged, logged, and changes nothing; a reply a
//!   step cannot read is dead-lettered by the inbox with its reason; an
//!   instance whose data does not decode is marked `failed` with the
//!   reason, and no worker panics.
//! - **Operators.** A `failed` instance waits for an operator: the
//!   [`operator`] functions (and `messaging-admin saga`) resume it, retry
//!   its current step or force a compensation; each only makes the
//!   instance due, and a worker runs the next transition as usual.
//! - **Outages.** A database error rolls the transition back and is
//!   retried (the reply is redelivered, the timer stays due); a broker
//!   outage delays only the outbox relay and the inbox consumer.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod definition;
mod machine;
pub mod metrics;
pub mod operator;
mod runtime;
mod trace;

pub use definition::{
    CallOutcome, Command, DefinitionError, OnTimeout, Phase, Reply, ReplyError, Retry, Saga,
    SagaBuilder, SagaData, Step, StepContext,
};
pub use machine::State;
pub use runtime::{
    header, migrate, reply_headers, HistoryEntry, InstanceView, Round, SagaConfig, SagaError,
    Sagas, SagasBuilder,
};

#[cfg(test)]
mod tests;
