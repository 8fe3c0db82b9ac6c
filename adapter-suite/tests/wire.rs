//! The 408 of a covered request whose body does not arrive in time, over a
//! real connection, on both servers: the client gets the answer and the
//! server closes the connection, instead of reading (or, actix, draining) a
//! body that may never end. The in-process suite
//! (`a_body_that_never_ends_is_408`) checks the answer; only a socket shows
//! what becomes of the connection.

use actix_web::{web, App, HttpServer};
use adapter_suite::config;
use axum::Router;
use idempotency_actix::IdempotencyMiddleware;
use idempotency_core::{Idempotency, MemoryStore};
use idempotency_tower::IdempotencyLayer;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The engine's bound on reading a body.
const BOUND: Duration = Duration::from_secs(1);

fn engine() -> Idempotency {
    let config = config()
        .request_body_timeout(BOUND)
        .build()
        .expect("valid config");
    Idempotency::new(MemoryStore::new(), config)
}

/// A chunked body that never ends, and a body shorter than its
/// `Content-Length`: both stop after a few bytes.
fn stalled() -> [(&'static str, &'static [u8]); 2] {
    [
        (
            "chunked",
            b"POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: c\r\n\
              Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\n{\"amo\r\n",
        ),
        (
            "short Content-Length",
            b"POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: s\r\n\
              Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"amount\":1",
        ),
    ]
}

/// Sends `raw` and reads until the server closes the connection (bounded:
/// a server that holds it fails the test). The answer and how long it took.
fn until_closed(addr: SocketAddr, raw: &[u8]) -> (String, Duration) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(raw).expect("write");
    let sent = Instant::now();
    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer);
    let took = sent.elapsed();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        read.is_ok(),
        "the connection was still open after {took:?} ({read:?}); the answer so far: {answer}"
    );
    (answer, took)
}

async fn check(server: &str, addr: SocketAddr) {
    for (what, raw) in stalled() {
        let (answer, took) = tokio::task::spawn_blocking(move || until_closed(addr, raw))
            .await
            .expect("the client thread");
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "{server}, {what}: {answer}"
        );
        assert!(
            answer.contains("urn:idempotency:problem:request-timeout"),
            "{server}, {what}: {answer}"
        );
        assert!(
            took >= BOUND && took < BOUND + Duration::from_secs(3),
            "{server}, {what}: closed after {took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_answers_408_and_closes_the_connection() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = Router::new()
        .fallback(|| async { "the handler ran" })
        .layer(IdempotencyLayer::new(engine()));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    check("axum", addr).await;
    server.abort();
}

#[actix_web::test]
async fn actix_answers_408_and_closes_the_connection() {
    let idempotency = IdempotencyMiddleware::new(engine());
    let server = HttpServer::new(move || {
        App::new()
            .wrap(idempotency.clone())
            .default_service(web::to(|| async { "the handler ran" }))
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .expect("bind");
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    check("actix", addr).await;
    handle.stop(false).await;
}
