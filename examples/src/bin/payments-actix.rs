//! The payments API on actix-web, behind `idempotency-actix`: the same routes
//! and flags as `payments-axum`.
//!
//! `cargo run --release -p examples --bin payments-actix -- --help`

use actix_web::http::header;
use actix_web::{web, App, HttpResponse, HttpServer};
use clap::Parser;
use examples::{
    init_tracing, shutdown_signal, Answer, Payments, PaymentsArgs, PaymentsDatabase, PaymentsTable,
    ResultExt, StartError, BODY_READ_TIMEOUT, HEADER_READ_TIMEOUT, METRICS_CONTENT_TYPE,
    PROBLEM_JSON,
};
use futures_util::StreamExt;
use idempotency_actix::{IdempotencyMiddleware, Transaction};
use metrics_exporter_prometheus::PrometheusHandle;
use std::time::Duration;

/// The largest request body the handlers read, as axum's default.
const BODY_LIMIT: usize = 2 * 1024 * 1024;

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

/// The framework's response of the payments API's answer.
fn respond(answer: Answer) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(answer.status)
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = HttpResponse::build(status);
    if let Some(location) = answer.location {
        res.insert_header((header::LOCATION, location));
    }
    res.content_type(answer.content_type).body(answer.body)
}

async fn create_payment(payments: web::Data<Payments>, payload: web::Payload) -> HttpResponse {
    match read_body(payload).await {
        Ok(body) => respond(payments.create(&body).await),
        Err(res) => res,
    }
}

/// `--transactional`: the row goes into the request's transaction, which the
/// middleware commits with the record after this returns.
async fn create_payment_in<DB: PaymentsDatabase>(
    payments: web::Data<Payments>,
    mut tx: Transaction<sqlx::Transaction<'static, DB>>,
    body: web::Bytes,
) -> HttpResponse {
    respond(payments.create_in::<DB>(&mut tx, &body).await)
}

async fn refund_payment(payments: web::Data<Payments>, id: web::Path<String>) -> HttpResponse {
    respond(payments.refund(&id))
}

/// `--transactional`: the refund's row goes into the request's transaction.
async fn refund_payment_in<DB: PaymentsDatabase>(
    payments: web::Data<Payments>,
    id: web::Path<String>,
    mut tx: Transaction<sqlx::Transaction<'static, DB>>,
) -> HttpResponse {
    respond(payments.refund_in::<DB>(&mut tx, &id).await)
}

/// `GET /payments/<id>`: the payment as `POST /payments` returned it.
async fn get_payment(payments: web::Data<Payments>, id: web::Path<String>) -> HttpResponse {
    respond(payments.get(&id).await)
}

async fn list_payments(payments: web::Data<Payments>) -> HttpResponse {
    respond(payments.list().await)
}

// HEAD is served wherever GET is, as axum's `get` does (same status and
// headers; actix drops the body on the wire and keeps its Content-Length).
fn payment_routes(cfg: &mut web::ServiceConfig, table: Option<&PaymentsTable>) {
    let (create, refund) = match table {
        None => (
            web::post().to(create_payment),
            web::post().to(refund_payment),
        ),
        Some(PaymentsTable::Postgres(_)) => (
            web::post().to(create_payment_in::<sqlx::Postgres>),
            web::post().to(refund_payment_in::<sqlx::Postgres>),
        ),
        Some(PaymentsTable::Sqlite(_)) => (
            web::post().to(create_payment_in::<sqlx::Sqlite>),
            web::post().to(refund_payment_in::<sqlx::Sqlite>),
        ),
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
    cfg.service(web::resource("/payments/{id}/refunds").route(refund));
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
    let server = HttpServer::new(move || {
        let idempotency = idempotency.clone();
        let table = payments.table.clone();
        App::new()
            .app_data(payments.clone())
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
        decline_above = ?args.decline_above,
        "payments-actix serving"
    );
    server.await.context("the server failed")?;
    Ok(())
}
