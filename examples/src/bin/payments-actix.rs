//! The payments API on actix-web, behind `idempotency-actix`: the same routes
//! and flags as `payments-axum`.
//!
//! `cargo run --release -p examples --bin payments-actix -- --help`

use actix_web::http::header;
use actix_web::{web, App, HttpResponse, HttpServer};
use clap::Parser;
use examples::{
    init_tracing, shutdown_signal, Payment, Payments, PaymentsArgs, PaymentsDatabase,
    PaymentsTable, ResultExt, StartError, BODY_READ_TIMEOUT, HEADER_READ_TIMEOUT,
    METRICS_CONTENT_TYPE, PROBLEM_JSON,
};
use futures_util::StreamExt;
use idempotency_actix::{IdempotencyMiddleware, Transaction};
use metrics_exporter_prometheus::PrometheusHandle;
use std::time::Duration;

/// The largest request body the handlers read, as axum's default.
const BODY_LIMIT: usize = 2 * 1024 * 1024;

struct HandlerDelay(Duration);

/// Reads a request body within [`BODY_READ_TIMEOUT`] and [`BODY_LIMIT`]. A
/// covered request's body was read by the middleware already (bounded by
/// the engine); this bounds `--no-idempotency`, where nothing else does
/// (actix bounds the request head only).
async fn read_body(mut payload: web::Payload) -> Result<web::Bytes, HttpResponse> {
    let read = async {
        let payload = &mut payload;
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|_| HttpResponse::BadRequest().finish())?;
            if body.len() + chunk.len() > BODY_LIMIT {
                return Err(HttpResponse::PayloadTooLarge().finish());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(read) => read,
        Err(_) => {
            // The payload is held until the answer is sent: actix closes the
            // connection only while it is alive, and drains a dropped
            // chunked payload, which may never end.
            let problem = web::Bytes::from(examples::body_timeout_problem());
            let len = problem.len() as u64;
            let held = futures_util::stream::poll_fn(move |_| {
                let _held = &payload;
                std::task::Poll::Ready(None::<Result<web::Bytes, std::convert::Infallible>>)
            });
            let body = futures_util::stream::once(std::future::ready(Ok(problem))).chain(held);
            Err(HttpResponse::RequestTimeout()
                .content_type(PROBLEM_JSON)
                .force_close()
                .body(actix_web::body::SizedStream::new(len, body)))
        }
    }
}

async fn create_payment(
    payments: web::Data<Payments>,
    delay: web::Data<HandlerDelay>,
    payload: web::Payload,
) -> HttpResponse {
    let body = match read_body(payload).await {
        Ok(body) => body,
        Err(res) => return res,
    };
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

/// `GET /payments/<id>`: the payment as `POST /payments` returned it.
async fn get_payment(payments: web::Data<Payments>, id: web::Path<String>) -> HttpResponse {
    match payments.get(&id).await {
        Ok(Some(p)) => HttpResponse::Ok()
            .content_type("application/json")
            .body(serde_json::to_string(&p).unwrap_or_default()),
        Ok(None) => HttpResponse::NotFound()
            .content_type(PROBLEM_JSON)
            .body(examples::payment_not_found()),
        Err(e) => database_failed(&e),
    }
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
    cfg.service(
        web::resource("/payments/{id}")
            .route(web::get().to(get_payment))
            .route(web::head().to(get_payment)),
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
    // A client must send a request's head within this, or get 408; an
    // idle keep-alive connection is closed after as long. Bodies are
    // bounded by the engine (covered requests) and `read_body`.
    .client_request_timeout(HEADER_READ_TIMEOUT)
    .keep_alive(HEADER_READ_TIMEOUT)
    .client_disconnect_timeout(Duration::from_secs(1))
    .bind(&examples::resolve_listen(&args.listen).await?[..])
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
