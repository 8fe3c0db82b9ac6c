//! The operator's tools for stuck work: dead outbox events, dead inbox
//! messages, failed sagas and idempotency records in flight past their
//! lease, without hand-written SQL. A CLI (`messaging-admin`) and a web
//! console with its JSON API (`messaging-admin serve`), both over
//! [`Admin`].
//!
//! # Quick start
//!
//! ```text
//! messaging-admin --database postgres://... outbox list                 # dead events
//! messaging-admin --database postgres://... outbox groups               # dead events by cause
//! messaging-admin --database postgres://... outbox show 0193...        # payload, headers, reason
//! messaging-admin --database postgres://... outbox retry 0193...       # back to the relay
//! messaging-admin --database postgres://... outbox retry --state dead --destination payments
//! messaging-admin --database postgres://... inbox list --consumer ledger
//! messaging-admin --database postgres://... saga retry order-42        # a failed saga
//! messaging-admin --database postgres://... serve --listen 127.0.0.1:3300 --token-file tokens
//! ```
//!
//! ```no_run
//! # async fn demo() -> Result<(), messaging_admin::AdminError> {
//! use messaging_admin::{Action, Actor, Admin, Area, Filter, Target};
//!
//! let admin = Admin::connect("postgres://postgres@127.0.0.1:5432/test", "idempotency").await?;
//! let dead = admin.list(Area::Outbox, &Filter::default(), 100).await?;
//! let me = Actor { name: "ops@example.com".into(), via: "cli" };
//! let filter = Filter { state: Some("dead".into()), destination: Some("payments".into()), ..Filter::default() };
//! let report = admin.act(&me, Area::Outbox, Action::Retry, &Target::Filter(filter)).await?;
//! println!("{} of {} retried", report.changed.len(), dead.len());
//! # Ok(()) }
//! ```
//!
//! # What each action does
//!
//! | area | retry | discard | purge `--older-than` |
//! |---|---|---|---|
//! | `outbox` (`pending`, `dead`, `discarded`) | a dead event waits again, its attempts counted afresh, and the relays are woken: a relay publishes it; an event in backoff is made due now | marked discarded: kept, out of the dead list | discarded events (below the lowest retention hold only) |
//! | `inbox` (`dead`, `failing`, `replaying`) | the consumer replays the kept payload through its inbox (`Inbox::run_replays`): a message processed meanwhile is a duplicate | settled as handled without running: a redelivery is a duplicate | processed rows (the retention, by hand) |
//! | `saga` (`failed`, `pending`, ...) | the current step again (`saga::operator::retry_step`); also `resume` and `compensate` | an ended instance is deleted with its history | completed and compensated instances |
//! | `idempotency` (`in-flight`) | — (the client's retry takes a record over) | the record is deleted | expired records |
//!
//! Nothing here runs a step, publishes or consumes: a retried item goes
//! back through the normal path, run by the service's own relay, consumer
//! or saga worker.
//!
//! # Guarantees
//!
//! - **Audit.** Every action writes who (the console token's name, or the
//!   CLI's `--as`), what, which items and when to
//!   `messaging_admin.audit`, in the transaction that performs it: an
//!   action that did not commit left no row, and a row means it committed.
//! - **Twice, or from two consoles at once.** Each item's state is checked
//!   in the statement that changes it, so it is changed once; an action by
//!   filter takes batches of [`BATCH`] with `FOR UPDATE SKIP LOCKED`, only
//!   among items untouched since it started (an event retried and dead
//!   again is not retried again by the same action).
//! - **Thousands of items** go in batches, each its own short transaction
//!   with its own audit row; a failure stops the action, the batches
//!   before it stay done.
//! - **The console** answers `401` to every request under `/api/` that
//!   shows no token of the token file, whatever the path or method, before
//!   anything runs.
//! - **Bad input** is said plainly: an unknown id, a filter that matches
//!   nothing, a state an area has not, a database without the tables.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod admin;
pub mod cli;
pub mod console;
mod error;
mod model;
mod sql;

pub use admin::{Admin, BATCH, CONNECT_TIMEOUT, DEFAULT_LIMIT};
pub use error::AdminError;
pub use model::{Action, Actor, Area, Filter, Group, Report, Skipped, Target};
