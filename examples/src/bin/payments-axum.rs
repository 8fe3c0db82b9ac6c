//! The payments API on axum, behind `idempotency-tower`.
//!
//! `cargo run --release -p examples --bin payments-axum -- --help`

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clap::Parser;
use examples::{
    init_tracing, shutdown_signal, Ledger, PaymentsArgs, ResultExt, StartError, PROBLEM_JSON,
};
use idempotency_tower::IdempotencyLayer;

#[derive(Clone)]
struct App {
    ledger: Arc<Ledger>,
    delay: std::time::Duration,
}

async fn create_payment(State(app): State<App>, body: Bytes) -> Response {
    if !app.delay.is_zero() {
        tokio::time::sleep(app.delay).await;
    }
    match app.ledger.create(&body) {
        Ok(p) => (
            StatusCode::CREATED,
            [
                (header::LOCATION, format!("/payments/{}", p.id)),
                (header::CONTENT_TYPE, "application/json".to_owned()),
            ],
            serde_json::to_string(&p).unwrap_or_default(),
        )
            .into_response(),
        Err(problem) => (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, PROBLEM_JSON)],
            problem,
        )
            .into_response(),
    }
}

async fn list_payments(State(app): State<App>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        app.ledger.list_json(),
    )
        .into_response()
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    init_tracing("info");
    let args = PaymentsArgs::parse();
    examples::finish(env!("CARGO_BIN_NAME"), run(args).await)
}

async fn run(args: PaymentsArgs) -> Result<(), StartError> {
    let engine = args.engine().await?;
    let app = App {
        ledger: Arc::default(),
        delay: args.handler_delay,
    };
    let mut router = Router::new()
        .route("/payments", get(list_payments).post(create_payment))
        .with_state(app);
    if let Some(engine) = engine {
        router = router.layer(IdempotencyLayer::new(engine));
    }
    // Outside the layer: health checks never touch the store.
    let router = router.route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .context(format!("could not listen on {} (--listen)", args.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        store = %args.store,
        idempotency = !args.no_idempotency,
        "payments-axum serving"
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the server failed")?;
    Ok(())
}
