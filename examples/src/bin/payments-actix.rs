//! The payments API on actix-web, behind `idempotency-actix`: the same routes
//! and flags as `payments-axum`.
//!
//! `cargo run --release -p examples --bin payments-actix -- --help`

use actix_web::http::header;
use actix_web::{web, App, HttpResponse, HttpServer};
use clap::Parser;
use examples::{
    init_tracing, shutdown_signal, Payment, Payments, PaymentsArgs, PaymentsDatabase,
    PaymentsTable, ResultExt, StartError, METRICS_CONTENT_TYPE, PROBLEM_JSON,
};
use idempotency_actix::{IdempotencyMiddleware, Transaction};
use metrics_exporter_prometheus::PrometheusHandle;
use std::time::Duration;

/// The largest request body the handlers read, as axum's default.
const BODY_LIMIT: usize = 2 * 1024 * 1024;

struct HandlerDelay(Duration);

async fn create_payment(
    payments: web::Data<Payments>,
    delay: web::Data<HandlerDelay>,
    body: web::Bytes,
) -> HttpResponse {
    if !delay.0.is_zero() {
        tokio::time::sleep(delay.0).await;
    }
    match payments.ledger.create(&body) {
        Ok(p) => created(&p),
        Err(problem) => HttpResponse::BadRequest()
            .content_type(PROBLEM_JSON)
            .body(problem),
    }
}

/// `--transactional`: the row goes into the request's transaction, which the
/// middleware commits with the record after this returns.
async fn create_payment_in<DB: PaymentsDatabase>(
    payments: web::Data<Payments>,
    delay: web::Data<HandlerDelay>,
    mut tx: Transaction<sqlx::Transaction<'static, DB>>,
    body: web::Bytes,
) -> HttpResponse {
    let payment = match examples::new_payment(&body) {
        Ok(p) => p,
        Err(problem) => {
            return HttpResponse::BadRequest()
                .content_type(PROBLEM_JSON)
                .body(problem)
        }
    };
    // The row, and with --outbox its event: one transaction.
    if let Err(problem) = examples::record_payment::<DB>(&mut tx, &payment, &payments).await {
        return HttpResponse::InternalServerError()
            .content_type(PROBLEM_JSON)
            .body(problem);
    }
    if !delay.0.is_zero() {
        tokio::time::sleep(delay.0).await;
    }
    created(&payment)
}

fn created(p: &Payment) -> HttpResponse {
    HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/payments/{}", p.id)))
        .content_type("application/json")
        .body(serde_json::to_string(p).unwrap_or_default())
}

fn database_failed(e: &sqlx::Error) -> HttpResponse {
    HttpResponse::InternalServerError()
        .content_type(PROBLEM_JSON)
        .body(examples::database_problem(e))
}

async fn list_payments(payments: web::Data<Payments>) -> HttpResponse {
    match payments.list_json().await {
        Ok(list) => HttpResponse::Ok()
            .content_type("application/json")
            .body(list),
        Err(e) => database_failed(&e),
    }
}

// HEAD is served wherever GET is, as axum's `get` does (same status and
// headers; actix drops the body on the wire and keeps its Content-Length).
fn payment_routes(cfg: &mut web::ServiceConfig, table: Option<&PaymentsTable>) {
    let create = match table {
        None => web::post().to(create_payment),
        Some(PaymentsTable::Postgres(_)) => web::post().to(create_payment_in::<sqlx::Postgres>),
        Some(PaymentsTable::Sqlite(_)) => web::post().to(create_payment_in::<sqlx::Sqlite>),
    };
    cfg.service(
        web::resource("/payments")
            .route(web::get().to(list_payments))
            .route(web::head().to(list_payments))
            .route(create),
    );
}

async fn healthz() -> &'static str {
    "ok"
}

async fn metrics(handle: web::Data<PrometheusHandle>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(METRICS_CONTENT_TYPE)
        .body(handle.render())
}

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    init_tracing("info");
    let args = PaymentsArgs::parse();
    examples::finish(env!("CARGO_BIN_NAME"), run(args).await)
}

async fn run(args: PaymentsArgs) -> Result<(), StartError> {
    let metrics_handle = web::Data::new(examples::install_metrics()?);
    let (engine, payments) = args.open().await?;
    let idempotency = engine.map(IdempotencyMiddleware::new);
    let payments = web::Data::new(payments);
    let delay = web::Data::new(HandlerDelay(args.handler_delay));
    let server = HttpServer::new(move || {
        let idempotency = idempotency.clone();
        let table = payments.table.clone();
        App::new()
            .app_data(payments.clone())
            .app_data(delay.clone())
            .app_data(metrics_handle.clone())
            .app_data(web::PayloadConfig::new(BODY_LIMIT))
            // Outside the middleware: health checks never touch the store,
            // and scrapes are not requests to count.
            .service(
                web::resource("/healthz")
                    .route(web::get().to(healthz))
                    .route(web::head().to(healthz)),
            )
            .service(web::resource("/metrics").route(web::get().to(metrics)))
            .configure(move |cfg| match idempotency {
                Some(idempotency) => {
                    cfg.service(
                        web::scope("")
                            .wrap(idempotency)
                            .configure(|cfg| payment_routes(cfg, table.as_ref())),
                    );
                }
                None => payment_routes(cfg, table.as_ref()),
            })
    })
    .disable_signals()
    .bind(args.listen)
    .context(format!("could not listen on {} (--listen)", args.listen))?;
    let addrs = server.addrs();
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        shutdown_signal().await;
        handle.stop(true).await;
    });
    tracing::info!(
        listen = ?addrs,
        store = %idempotency_core::redact(&args.store),
        idempotency = !args.no_idempotency,
        transactional = args.transactional,
        outbox = args.outbox,
        "payments-actix serving"
    );
    server.await.context("the server failed")?;
    Ok(())
}
