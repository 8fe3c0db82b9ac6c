//! [actix-web] middleware that makes POST and PATCH handlers safe under
//! retries.
//!
//! A client retries a request with the same `Idempotency-Key`: the handler
//! runs once, and the retry gets the first response back with
//! `Idempotent-Replayed: true`. A concurrent duplicate gets 409, the same key
//! with a different request 422. All decisions come from
//! [`idempotency_core`] (the same engine, config and stores as
//! `idempotency-tower`); this crate only converts actix-web's types, so both
//! adapters answer alike.
//!
//! # Quick start
//!
//! Not on crates.io yet: depend on a clone of the repository (here beside
//! your project). The same server, reading its port from `PORT`, is the
//! workspace README's quick start, which the `examples` crate runs as
//! `quickstart-actix` in `tests/quickstarts.rs`.
//!
//! ```toml
//! [dependencies]
//! # features: "redis", "postgres", "sqlite"
//! idempotency-actix = { path = "../idempotency-rs/idempotency-actix" }
//! actix-web = "4"
//! ```
//!
//! ```no_run
//! use actix_web::{web, App, HttpResponse, HttpServer};
//! use idempotency_actix::{Idempotency, IdempotencyConfig, IdempotencyMiddleware, MemoryStore};
//!
//! #[actix_web::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let config = IdempotencyConfig::builder().scope_header("authorization").build()?;
//!     let engine = Idempotency::new(MemoryStore::new(), config);
//!     // Build it once: every worker shares the engine and its store.
//!     let idempotency = IdempotencyMiddleware::new(engine);
//!     HttpServer::new(move || {
//!         App::new()
//!             .wrap(idempotency.clone())
//!             .route("/payments", web::post().to(|| async { HttpResponse::Created().body("paid") }))
//!     })
//!     .bind(("127.0.0.1", 3000))?
//!     .run()
//!     .await?;
//!     Ok(())
//! }
//! ```
//!
//! To keep a route out of the middleware (a health check that must not touch
//! the store), register it outside the wrapped scope, e.g.
//! `App::new().route("/healthz", ..).service(web::scope("").wrap(idempotency))`.
//!
//! # Transactional mode
//!
//! With `Idempotency::transactional(store, config)` (a PostgreSQL or SQLite
//! store) a handler takes the request's transaction with the
//! `Transaction<DB>` extractor, writes its effect through it
//! (`query(..).execute(&mut *tx)`) and never commits it: the middleware
//! writes the response into the record and commits both, or rolls both back.
//! See the workspace README.
//!
//! # Behaviour
//!
//! | situation | answer |
//! |---|---|
//! | method not covered (default: POST, PATCH covered) | passes through untouched |
//! | covered, no key (required by default) | 400 problem+json, handler not run |
//! | key empty, over 255 characters, outside the bare-key alphabet (visible ASCII but `"` `,` `;` `\`), repeated or comma-joined, or a malformed quoted string | 400 |
//! | the scope header (e.g. `Authorization`) given more than once | 400 problem+json (`ambiguous-scope`), handler not run |
//! | body over the limit (default 1 MiB), declared or streamed | 413, handler not run |
//! | body not received within `request_body_timeout` (default 30 s: a chunked body that never ends, a short `Content-Length`) | 408 problem+json, handler not run, nothing claimed; the connection is closed |
//! | first request | handler runs once; its response is stored and returned |
//! | retry, same request | stored status, headers and body, `Idempotent-Replayed: true` |
//! | same key, different method/path/query/content-type/body | 422 |
//! | same key while the first still runs | 409 with `Retry-After` (1 s by default) |
//! | store down or slower than its timeout | 503 with `Retry-After` (or fail-open) |
//!
//! The request payload of a covered request is read (up to the limit) before
//! the handler runs, to fingerprint it; the handler then gets the same bytes
//! through its usual extractors (`web::Bytes`, `web::Json`, ...).
//!
//! # Guarantees
//!
//! - **Concurrency**: of any number of concurrent requests with one scope and
//!   key, on one worker or many, on one instance or many sharing a store,
//!   exactly one runs the handler (the store's `claim` is atomic). The
//!   store is `Send + Sync` and shared by every worker; the middleware itself
//!   never needs `Send` futures.
//! - **Client disconnects**: actix drops a request's future when its client
//!   goes away. The rest of a covered request (its claim, the handler,
//!   storing the response) then moves to a local task of its own
//!   (`actix_web::rt::spawn`, through core's `DetachOnDrop`), so it runs to
//!   completion anyway, and the retry replays it. While the client stays, nothing is spawned.
//! - **Handler panics** count as a 5xx: nothing is stored, the claim is
//!   released, and the retry runs the handler. The request's future is
//!   dropped, never handed off or polled again.
//! - **Slow handlers** keep their claim: the lease is extended every half lease.
//! - **Crashes**: a claim left by a dead process is taken over by the next
//!   retry once its lease passes; the handler may then run again. In
//!   transactional mode (`Transaction<DB>`, features `postgres` or `sqlite`)
//!   the effect and the record are one commit: a crash before it rolls both
//!   back and the retry runs at once.
//! - **Large responses**: a body over the storable limit still reaches the
//!   client in full; the record completes as not replayable and a retry gets
//!   410 problem+json, never a second run.
//! - **Store outages**: fail-closed by default (503 with `Retry-After`, the
//!   handler does not run) or fail-open; see [`idempotency_core`]'s
//!   guarantees. Store errors are logged with their cause and never shown to
//!   the client.
//!
//! The middleware must run on actix's runtime (`HttpServer`, `#[actix_web::main]`,
//! `#[actix_web::test]`), which provides the local task set it spawns into.
//!
//! [actix-web]: https://actix.rs
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod middleware;
mod service;
mod transaction;

pub use body::{Message, ResponseBody};
pub use middleware::IdempotencyMiddleware;
pub use service::{IdempotencyService, ResponseFuture};
pub use transaction::{NoTransaction, Transaction};

/// Every store whose feature is on (`redis`, `postgres`, `sqlite`), and
/// [`connect`], which picks one from a URL.
pub use idempotency_connect::{connect, stores, ConnectError};
/// The core crate: the engine, its config, the store contract. Depend on
/// this adapter alone.
pub use idempotency_core;
pub use idempotency_core::{FailureMode, Idempotency, IdempotencyConfig, MemoryStore, Scope};
