//! The payments API on axum, behind `idempotency-tower`.
//!
//! `cargo run --release -p examples --bin payments-axum -- --help`
//!
//! It serves through hyper's HTTP/1 connection builder (`http_serve::serve_axum`,
//! which every server of the workspace shares) rather than
//! `axum::serve`, which sets no timer and so cannot bound how long a client
//! takes to send its headers: a client that sends half of them held a
//! connection for as long as it liked. hyper-util's `TowerToHyperService`
//! and `GracefulShutdown` are what `axum::serve` itself is built on, kept
//! by the hyper project.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use examples::{
    init_tracing, shutdown_signal, Answer, Payments, PaymentsArgs, PaymentsDatabase, PaymentsTable,
    ResultExt, StartError, BODY_READ_TIMEOUT, METRICS_CONTENT_TYPE, PROBLEM_JSON,
};
use idempotency_tower::{IdempotencyLayer, Transaction};
use tokio::net::TcpListener;

/// The largest request body the handlers read (axum's default).
const BODY_LIMIT: usize = 2 * 1024 * 1024;

type App = Arc<Payments>;

/// Reads a request body within [`BODY_READ_TIMEOUT`] and [`BODY_LIMIT`]. A
/// covered request's body was read by the middleware already (bounded by
/// the engine); this bounds `--no-idempotency`, where nothing else does.
async fn read_body(body: Body) -> Result<Bytes, Response> {
    match tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, BODY_LIMIT)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let too_large = e
                .into_inner()
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            Err(if too_large {
                StatusCode::PAYLOAD_TOO_LARGE.into_response()
            } else {
                StatusCode::BAD_REQUEST.into_response()
            })
        }
        Err(_) => {
            let mut res = problem_response(
                StatusCode::REQUEST_TIMEOUT,
                examples::body_timeout_problem(),
            );
            res.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            Err(res)
        }
    }
}

/// The framework's response of the payments API's answer.
fn respond(answer: Answer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = (
        status,
        [(header::CONTENT_TYPE, answer.content_type)],
        answer.body,
    )
        .into_response();
    if let Some(location) = answer.location.and_then(|l| l.parse().ok()) {
        res.headers_mut().insert(header::LOCATION, location);
    }
    res
}

async fn create_payment(State(app): State<App>, body: Body) -> Response {
    match read_body(body).await {
        Ok(body) => respond(app.create(&body).await),
        Err(res) => res,
    }
}

/// `--transactional`: the row goes into the request's transaction, which the
/// middleware commits with the record after this returns.
async fn create_payment_in<DB: PaymentsDatabase>(
    State(app): State<App>,
    mut tx: Transaction<sqlx::Transaction<'static, DB>>,
    body: Bytes,
) -> Response {
    respond(app.create_in::<DB>(&mut tx, &body).await)
}

async fn refund_payment(State(app): State<App>, Path(id): Path<String>) -> Response {
    respond(app.refund(&id))
}

/// `--transactional`: the refund's row goes into the request's transaction.
async fn refund_payment_in<DB: PaymentsDatabase>(
    State(app): State<App>,
    Path(id): Path<String>,
    mut tx: Transaction<sqlx::Transaction<'static, DB>>,
) -> Response {
    respond(app.refund_in::<DB>(&mut tx, &id).await)
}

/// `GET /payments/<id>`: the payment as `POST /payments` returned it.
async fn get_payment(State(app): State<App>, Path(id): Path<String>) -> Response {
    respond(app.get(&id).await)
}

fn problem_response(status: StatusCode, problem: String) -> Response {
    (status, [(header::CONTENT_TYPE, PROBLEM_JSON)], problem).into_response()
}

async fn list_payments(State(app): State<App>) -> Response {
    respond(app.list().await)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    init_tracing("info");
    let args = PaymentsArgs::parse();
    examples::finish(env!("CARGO_BIN_NAME"), run(args).await)
}

async fn run(args: PaymentsArgs) -> Result<(), StartError> {
    let metrics = examples::install_metrics()?;
    let (engine, payments) = args.open().await?;
    let (create, refund) = match &payments.table {
        None => (post(create_payment), post(refund_payment)),
        Some(PaymentsTable::Postgres(_)) => (
            post(create_payment_in::<sqlx::Postgres>),
            post(refund_payment_in::<sqlx::Postgres>),
        ),
        Some(PaymentsTable::Sqlite(_)) => (
            post(create_payment_in::<sqlx::Sqlite>),
            post(refund_payment_in::<sqlx::Sqlite>),
        ),
    };
    let mut router = Router::new()
        .route("/payments", create.get(list_payments))
        .route("/payments/{id}", get(get_payment))
        .route("/payments/{id}/refunds", refund)
        .with_state(Arc::new(payments));
    if let Some(engine) = engine {
        router = router.layer(IdempotencyLayer::new(engine));
    }
    // Outside the layer: health checks never touch the store, and scrapes
    // are not requests to count.
    let router = router.route("/healthz", get(|| async { "ok" })).route(
        "/metrics",
        get(move || {
            let text = metrics.render();
            async move { ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text) }
        }),
    );
    // Outermost: every request runs in its span, the root of its trace.
    let router = router.layer(axum::middleware::from_fn(examples::in_request_span));
    let listeners = bind(&args.listen).await?;
    let addrs = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<Vec<_>, _>>()?;
    tracing::info!(
        listen = %addrs.iter().map(SocketAddr::to_string).collect::<Vec<_>>().join(","),
        store = %idempotency_core::redact(&args.store),
        idempotency = !args.no_idempotency,
        transactional = args.transactional,
        outbox = args.outbox,
        decline_above = ?args.decline_above,
        "payments-axum serving"
    );
    examples::serve_axum(listeners, router, shutdown_signal()).await;
    Ok(())
}

/// Listens on every address `--listen` names (a host name may resolve to
/// several, as `localhost` to `127.0.0.1` and `::1`), as actix's `bind`
/// does: an address that cannot be bound is skipped when another can.
async fn bind(listen: &str) -> Result<Vec<TcpListener>, StartError> {
    let mut listeners = Vec::new();
    let mut failed = None;
    for addr in examples::resolve_listen(listen).await? {
        match TcpListener::bind(addr).await {
            Ok(listener) => listeners.push(listener),
            Err(e) => {
                tracing::debug!(%addr, error = %e, "could not listen on one address of --listen");
                failed = Some(e);
            }
        }
    }
    match failed {
        Some(e) if listeners.is_empty() => {
            Err(e).context(format!("could not listen on {listen} (--listen)"))
        }
        _ => Ok(listeners),
    }
}
