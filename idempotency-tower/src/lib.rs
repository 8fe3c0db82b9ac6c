//! A [tower] layer that makes POST and PATCH handlers safe under retries,
//! for axum and anything else built on tower.
//!
//! A client retries a request with the same `Idempotency-Key`: the handler
//! runs once, and the retry gets the first response back with
//! `Idempotent-Replayed: true`. A concurrent duplicate gets 409, the same key
//! with a different request 422. All decisions come from
//! [`idempotency_core`]; this crate only converts tower's types.
//!
//! # Quick start
//!
//! Not on crates.io yet: depend on a clone of the repository (here beside
//! your project).
//!
//! ```toml
//! [dependencies]
//! # features: "redis", "postgres", "sqlite", "axum"
//! idempotency-tower = { path = "../idempotency-rs/idempotency-tower" }
//! axum = "0.8"
//! tokio = { version = "1", features = ["rt-multi-thread", "macros", "net"] }
//! ```
//!
//! ```no_run
//! use axum::{routing::post, Router};
//! use idempotency_tower::{Idempotency, IdempotencyConfig, IdempotencyLayer, MemoryStore};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = IdempotencyConfig::builder().scope_header("authorization").build()?;
//! let engine = Idempotency::new(MemoryStore::new(), config);
//! let app: Router = Router::new()
//!     .route("/payments", post(|| async { "paid" }))
//!     .layer(IdempotencyLayer::new(engine));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! The same server is the workspace README's quick start, which the
//! `examples` crate runs as `quickstart-axum` in `tests/quickstarts.rs`.
//!
//! # Transactional mode
//!
//! With `Idempotency::transactional(store, config)` (a PostgreSQL or SQLite
//! store) a handler takes the request's transaction with the
//! `Transaction<DB>` extractor (feature `axum`), writes its effect through it
//! and never commits it: the middleware writes the response into the record
//! and commits both, or rolls both back. See the workspace README.
//!
//! # Behaviour
//!
//! | situation | answer |
//! |---|---|
//! | method not covered (default: POST, PATCH covered) | passes through untouched |
//! | covered, no key (required by default) | 400 problem+json, handler not run |
//! | key empty, over 255 characters, outside the bare-key alphabet (visible ASCII but `"` `,` `;` `\`), repeated or comma-joined, or a malformed quoted string | 400 |
//! | the scope header (e.g. `Authorization`) given more than once | 400 problem+json (`ambiguous-scope`), handler not run |
//! | body over the limit (default 1 MiB) | 413, handler not run |
//! | body not received within `request_body_timeout` (default 30 s: a chunked body that never ends, a short `Content-Length`) | 408 problem+json with `Connection: close`, handler not run, nothing claimed |
//! | first request | handler runs once; its response is stored and returned |
//! | retry, same request | stored status, headers and body, `Idempotent-Replayed: true` |
//! | same key, different method/path/query/content-type/body | 422 |
//! | same key while the first still runs | 409 with `Retry-After` (1 s by default) |
//! | store down or slower than its timeout | 503 with `Retry-After` (or fail-open) |
//!
//! # Guarantees
//!
//! - **Concurrency**: of any number of concurrent requests with one scope and
//!   key, exactly one runs the handler (the store's `claim` is atomic).
//! - **Client disconnects**: when the server drops a covered request's
//!   future (its client went away), the rest of it (its claim, the handler,
//!   storing the response) moves to a tokio task of its own and runs to
//!   completion, and the retry replays it. While the client stays, nothing is spawned.
//! - **Handler panics** count as a 5xx: nothing is stored, the claim is
//!   released, and the retry runs the handler. The request's future is
//!   dropped, never handed off or polled again.
//! - **Slow handlers** keep their claim: the lease is extended every half lease.
//! - **Crashes**: a claim left by a dead process is taken over by the next
//!   retry once its lease passes; the handler may then run again. In
//!   transactional mode (`Transaction`, features `axum` and `postgres` or
//!   `sqlite`) the effect and the record are one commit: a crash before it
//!   rolls both back and the retry runs at once.
//! - **Large responses**: a body over the storable limit still reaches the
//!   client in full; the record completes as not replayable and a retry gets
//!   410 problem+json, never a second run.
//! - **Store outages**: see [`idempotency_core`]'s guarantees. Store errors are
//!   logged with their cause and never shown to the client.
//!
//! The inner service must be `Clone + Send + 'static` with `Send` futures and
//! bodies (as axum's `Router` is), because an abandoned request finishes in a
//! spawned tokio task.
//!
//! [tower]: https://docs.rs/tower
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod layer;
mod service;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
mod transaction;

pub use body::{Frames, RequestBody, ResponseBody};
pub use layer::IdempotencyLayer;
pub use service::{IdempotencyService, ResponseFuture};
#[cfg(feature = "axum")]
pub use transaction::{NoTransaction, Transaction};

/// Every store whose feature is on (`redis`, `postgres`, `sqlite`), and
/// [`connect`], which picks one from a URL.
pub use idempotency_connect::{connect, stores, ConnectError};
/// The core crate: the engine, its config, the store contract. Depend on
/// this adapter alone.
pub use idempotency_core;
pub use idempotency_core::{FailureMode, Idempotency, IdempotencyConfig, MemoryStore, Scope};
