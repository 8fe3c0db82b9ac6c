//! The payments API on axum, behind `idempotency-tower`.
//!
//! `cargo run --release -p examples --bin payments-axum -- --help`

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use examples::{
    init_tracing, shutdown_signal, Payment, Payments, PaymentsArgs, PaymentsDatabase,
    PaymentsTable, ResultExt, StartError, METRICS_CONTENT_TYPE, PROBLEM_JSON,
};
use idempotency_tower::{IdempotencyLayer, Transaction};

#[derive(Clone)]
struct App {
    payments: Arc<Payments>,
    delay: std::time::Duration,
}

async fn create_payment(State(app): State<App>, body: Bytes) -> Response {
    if !app.delay.is_zero() {
        tokio::time::sleep(app.delay).await;
    }
    match app.payments.ledger.create(&body) {
        Ok(p) => created(&p),
        Err(problem) => problem_response(StatusCode::BAD_REQUEST, problem),
    }
}

/// `--transactional`: the row goes into the request's transaction, which the
/// middleware commits with the record after this returns.
async fn create_payment_in<DB: PaymentsDatabase>(
    State(app): State<App>,
    mut tx: Transaction<sqlx::Transaction<'static, DB>>,
    body: Bytes,
) -> Response {
    let payment = match examples::new_payment(&body) {
        Ok(p) => p,
        Err(problem) => return problem_response(StatusCode::BAD_REQUEST, problem),
    };
    // The row, and with --outbox its event: one transaction.
    if let Err(problem) = examples::record_payment::<DB>(&mut tx, &payment, &app.payments).await {
        return problem_response(StatusCode::INTERNAL_SERVER_ERROR, problem);
    }
    if !app.delay.is_zero() {
        tokio::time::sleep(app.delay).await;
    }
    created(&payment)
}

fn created(p: &Payment) -> Response {
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, format!("/payments/{}", p.id)),
            (header::CONTENT_TYPE, "application/json".to_owned()),
        ],
        serde_json::to_string(p).unwrap_or_default(),
    )
        .into_response()
}

fn problem_response(status: StatusCode, problem: String) -> Response {
    (status, [(header::CONTENT_TYPE, PROBLEM_JSON)], problem).into_response()
}

async fn list_payments(State(app): State<App>) -> Response {
    match app.payments.list_json().await {
        Ok(list) => ([(header::CONTENT_TYPE, "application/json")], list).into_response(),
        Err(e) => problem_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            examples::database_problem(&e),
        ),
    }
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
    let create = match &payments.table {
        None => post(create_payment),
        Some(PaymentsTable::Postgres(_)) => post(create_payment_in::<sqlx::Postgres>),
        Some(PaymentsTable::Sqlite(_)) => post(create_payment_in::<sqlx::Sqlite>),
    };
    let app = App {
        payments: Arc::new(payments),
        delay: args.handler_delay,
    };
    let mut router = Router::new()
        .route("/payments", create.get(list_payments))
        .with_state(app);
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
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .context(format!("could not listen on {} (--listen)", args.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        store = %idempotency_core::redact(&args.store),
        idempotency = !args.no_idempotency,
        transactional = args.transactional,
        outbox = args.outbox,
        "payments-axum serving"
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the server failed")?;
    Ok(())
}
