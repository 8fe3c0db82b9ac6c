//! Connecting, against fake brokers (no service needed): `amqps://` and
//! `tls://` start a TLS handshake (never plaintext, never a panic), a broker
//! that accepts TCP and never answers is an error within the connect timeout
//! (the URL shown without its password), and a refused connection says so.
#![cfg(all(feature = "rabbitmq", feature = "nats"))]

use std::time::{Duration, Instant};

use inbox_consumer::rabbitmq::{self, ConsumeError, Subscription};
use inbox_consumer::{InboxMessage, Outcome};
use test_support::{closed_port, is_tls_client_hello, SilentServer};

/// How long a fake server waits for the client's first bytes.
const FIRST_BYTES: Duration = Duration::from_secs(10);

/// The `INFO` a NATS server that requires TLS greets its clients with.
const NATS_TLS_INFO: &str = "INFO {\"server_id\":\"FAKE\",\"server_name\":\"fake\",\
    \"version\":\"2.10.0\",\"proto\":1,\"host\":\"127.0.0.1\",\"port\":4222,\
    \"headers\":true,\"max_payload\":1048576,\"tls_required\":true}\r\n";

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

async fn never(_: InboxMessage) -> Outcome {
    unreachable!("no broker here delivers anything")
}

#[tokio::test]
async fn amqps_sends_a_tls_client_hello_never_the_amqp_header() {
    let mut server = SilentServer::start().await;
    let url = format!("amqps://guest:guest@{}/%2f", server.addr);
    let connecting =
        tokio::spawn(async move { rabbitmq::connect(&url, Duration::from_secs(2)).await });
    let first = server
        .first_bytes(FIRST_BYTES)
        .await
        .expect("the client sent nothing");
    assert!(
        !first.starts_with(b"AMQP"),
        "an amqps:// URL went out as plaintext AMQP: {first:?}"
    );
    assert!(
        is_tls_client_hello(&first),
        "not a TLS ClientHello: {first:?}"
    );
    let err = connecting
        .await
        .expect("connect panicked")
        .expect_err("a silent server cannot complete a handshake");
    assert!(matches!(err, ConsumeError::TimedOut { .. }), "{err}");
}

#[tokio::test]
async fn the_subscription_connects_over_tls_too() {
    let mut server = SilentServer::start().await;
    let url = format!("amqps://guest:guest@{}/%2f", server.addr);
    let running = tokio::spawn(async move {
        Subscription::new(url, "payments")
            .connect_timeout(Duration::from_secs(2))
            .run(never, std::future::pending())
            .await
    });
    let first = server
        .first_bytes(FIRST_BYTES)
        .await
        .expect("the client sent nothing");
    assert!(
        is_tls_client_hello(&first),
        "not a TLS ClientHello: {first:?}"
    );
    assert!(running.await.expect("run panicked").is_err());
}

#[tokio::test]
async fn a_silent_broker_is_an_error_within_the_connect_timeout() {
    let _server = SilentServer::start().await;
    let url = format!("amqp://guest:secret@{}/%2f", _server.addr);
    let started = Instant::now();
    let err = Subscription::new(url, "payments")
        .connect_timeout(Duration::from_millis(500))
        .run(never, std::future::pending())
        .await
        .expect_err("a broker that never answers");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let text = chain(&err);
    assert!(text.contains("did not answer within 500ms"), "{text}");
    assert!(text.contains("guest:***@"), "the URL, redacted: {text}");
    assert!(!text.contains("secret"), "the password leaked: {text}");
}

#[tokio::test]
async fn a_shutdown_during_the_first_connect_ends_the_run_at_once() {
    let _server = SilentServer::start().await;
    let url = format!("amqp://guest:guest@{}/%2f", _server.addr);
    let started = Instant::now();
    Subscription::new(url, "payments")
        .connect_timeout(Duration::from_secs(30))
        .run(never, tokio::time::sleep(Duration::from_millis(200)))
        .await
        .expect("a clean shutdown");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_refused_connection_says_so() {
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port());
    let err = Subscription::new(url, "payments")
        .run(never, std::future::pending())
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, ConsumeError::Connect { .. }), "{err}");
    let text = chain(&err).to_lowercase();
    assert!(text.contains("connection refused"), "{text}");
}

#[tokio::test]
async fn nats_tls_starts_a_handshake_instead_of_panicking() {
    for scheme in ["tls", "nats"] {
        let mut server = SilentServer::with_greeting(NATS_TLS_INFO).await;
        let url = format!("{scheme}://{}", server.addr);
        let connecting = tokio::spawn(async move {
            async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(2))
                .connect(url)
                .await
        });
        let first = server.first_bytes(FIRST_BYTES).await;
        let joined = connecting.await;
        assert!(
            !joined.as_ref().is_err_and(|e| e.is_panic()),
            "{scheme}://: connecting panicked"
        );
        let first = first.unwrap_or_else(|| panic!("{scheme}://: the client sent nothing"));
        assert!(
            is_tls_client_hello(&first),
            "{scheme}://: not a TLS ClientHello: {first:?}"
        );
        assert!(
            joined.unwrap().is_err(),
            "a silent server cannot complete it"
        );
    }
}
