//! The bounds, against a real server on a free port: a client that sends
//! part of its headers and then nothing is cut off after
//! `HEADER_READ_TIMEOUT`; a whole request is answered; an idle keep-alive
//! connection is closed after the same bound; shutdown ends the server.

use std::time::{Duration, Instant};

use axum::{routing::get, Router};
use http_serve::{serve_axum, HEADER_READ_TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn server() -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new().route("/healthz", get(|| async { "ok" }));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_axum(vec![listener], router, async move {
        let _ = stopped.await;
    }));
    (addr, stop, task)
}

#[tokio::test]
async fn a_client_that_stops_sending_its_headers_is_cut_off_in_time() {
    let (addr, stop, task) = server().await;
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    // The server closes the connection (hyper may answer 408 first).
    let read = tokio::time::timeout(HEADER_READ_TIMEOUT * 3, slow.read_to_end(&mut buf)).await;
    let took = started.elapsed();
    assert!(read.is_ok(), "the connection was still open after {took:?}");
    assert!(
        took >= HEADER_READ_TIMEOUT - Duration::from_millis(500),
        "cut off too early: {took:?}"
    );

    // A whole request on another connection is answered.
    let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
    ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    ok.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");

    // An idle keep-alive connection: after its answer, nothing more.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0_u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(HEADER_READ_TIMEOUT * 3, idle.read_to_end(&mut rest)).await;
    let took = started.elapsed();
    assert!(
        closed.is_ok(),
        "an idle keep-alive connection still open after {took:?}"
    );
    assert!(
        took >= HEADER_READ_TIMEOUT - Duration::from_millis(500),
        "idle connection cut off too early: {took:?}"
    );

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the server ends on shutdown")
        .unwrap();
}
