//! Serves an [`axum::Router`] over HTTP/1 with the bounds every server of
//! the workspace keeps (the example binaries, `messaging-admin`'s console):
//!
//! - a client must send a request's headers within [`HEADER_READ_TIMEOUT`]
//!   (hyper closes the connection otherwise; the same bound holds an idle
//!   keep-alive connection), so a client that opens connections and sends
//!   nothing, or a byte at a time, cannot hold them;
//! - on shutdown, the listeners close at once and open connections get
//!   [`DRAIN`] to finish their requests;
//! - [`shutdown_signal`] resolves on SIGTERM or Ctrl-C.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use axum::{routing::get, Router};
//!
//! let router = Router::new().route("/healthz", get(|| async { "ok" }));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! http_serve::serve_axum(vec![listener], router, http_serve::shutdown_signal()).await;
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - **Concurrency:** each connection is served on a task of its own; a slow
//!   or silent client holds only its own connection, for at most
//!   [`HEADER_READ_TIMEOUT`] between requests.
//! - **Crashes:** nothing is stored; a killed process drops its connections.
//! - **Outages:** an `accept` that fails (out of file descriptors) is logged
//!   and retried after 50 ms, never ends the server.

use std::future::Future;
use std::time::Duration;

/// How long a client may take to send a request's headers, and how long an
/// idle keep-alive connection stays open. The same as actix-web's default
/// client request timeout and keep-alive.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long open connections may take to finish after the shutdown signal.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Serves `router` on `listeners` over HTTP/1 until `shutdown` resolves, then
/// lets open connections finish for up to [`DRAIN`]. A client must send a
/// request's headers within [`HEADER_READ_TIMEOUT`].
pub async fn serve_axum(
    listeners: Vec<tokio::net::TcpListener>,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accept =
            futures_util::future::select_all(listeners.iter().map(|l| Box::pin(l.accept())));
        let stream = tokio::select! {
            (accepted, _, _) = accept => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: let some close.
                    tracing::warn!(error = %e, "could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn =
            graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listeners);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(drain = ?DRAIN, "connections still open after the drain; closing them");
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}

/// The README's quick start, compiled by `cargo test`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
