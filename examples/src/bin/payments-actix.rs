//! The payments API on actix-web, behind `idempotency-actix`: the same routes
//! and flags as `payments-axum`.
//!
//! `cargo run --release -p examples --bin payments-actix -- --help`

use actix_web::http::header;
use actix_web::{web, App, HttpResponse, HttpServer};
use clap::Parser;
use examples::{
    init_tracing, shutdown_signal, Ledger, PaymentsArgs, ResultExt, StartError, PROBLEM_JSON,
};
use idempotency_actix::IdempotencyMiddleware;
use std::time::Duration;

/// The largest request body the handlers read, as axum's default.
const BODY_LIMIT: usize = 2 * 1024 * 1024;

struct HandlerDelay(Duration);

async fn create_payment(
    ledger: web::Data<Ledger>,
    delay: web::Data<HandlerDelay>,
    body: web::Bytes,
) -> HttpResponse {
    if !delay.0.is_zero() {
        tokio::time::sleep(delay.0).await;
    }
    match ledger.create(&body) {
        Ok(p) => HttpResponse::Created()
            .insert_header((header::LOCATION, format!("/payments/{}", p.id)))
            .content_type("application/json")
            .body(serde_json::to_string(&p).unwrap_or_default()),
        Err(problem) => HttpResponse::BadRequest()
            .content_type(PROBLEM_JSON)
            .body(problem),
    }
}

async fn list_payments(ledger: web::Data<Ledger>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(ledger.list_json())
}

// HEAD is served wherever GET is, as axum's `get` does (same status and
// headers; actix drops the body on the wire and keeps its Content-Length).
fn payments(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/payments")
            .route(web::get().to(list_payments))
            .route(web::head().to(list_payments))
            .route(web::post().to(create_payment)),
    );
}

async fn healthz() -> &'static str {
    "ok"
}

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    init_tracing("info");
    let args = PaymentsArgs::parse();
    examples::finish(env!("CARGO_BIN_NAME"), run(args).await)
}

async fn run(args: PaymentsArgs) -> Result<(), StartError> {
    let idempotency = args.engine().await?.map(IdempotencyMiddleware::new);
    let ledger = web::Data::new(Ledger::default());
    let delay = web::Data::new(HandlerDelay(args.handler_delay));
    let server = HttpServer::new(move || {
        let idempotency = idempotency.clone();
        App::new()
            .app_data(ledger.clone())
            .app_data(delay.clone())
            .app_data(web::PayloadConfig::new(BODY_LIMIT))
            // Outside the middleware: health checks never touch the store.
            .service(
                web::resource("/healthz")
                    .route(web::get().to(healthz))
                    .route(web::head().to(healthz)),
            )
            .configure(move |cfg| match idempotency {
                Some(idempotency) => {
                    cfg.service(web::scope("").wrap(idempotency).configure(payments));
                }
                None => payments(cfg),
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
        store = %args.store,
        idempotency = !args.no_idempotency,
        "payments-actix serving"
    );
    server.await.context("the server failed")?;
    Ok(())
}
