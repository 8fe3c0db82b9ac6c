//! The layer over the shared stores, at the HTTP level:
//! - two independent layer instances, each with its own connection to the
//!   same Redis (then the same PostgreSQL), get 32 concurrent duplicates
//!   split between them: the handler runs exactly once in total;
//! - Redis goes away (a private `redis-server` this test starts and kills):
//!   fail-closed answers 503 problem+json with `Retry-After` and the handler
//!   does not run; fail-open runs the handler and logs the outage at `error`;
//!   once Redis is back, requests succeed without a restart.
//!
//! `REDIS_URL` and `DATABASE_URL` are read at run time; a test whose service
//! is unset prints why it skips and passes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use idempotency_core::{FailureMode, Idempotency, IdempotencyConfig, LeaseToken, Store};
use idempotency_tower::IdempotencyLayer;
use test_support::{service_url, Answer, RedisServer};
use tower::ServiceExt;

/// A handler that counts its runs and answers 201 with a body unique to the run.
fn app(
    store: Arc<dyn Store>,
    runs: Arc<AtomicUsize>,
    mode: FailureMode,
    delay: Duration,
) -> Router {
    let config = IdempotencyConfig::builder()
        .failure_mode(mode)
        .lease(Duration::from_secs(10))
        .ttl(Duration::from_secs(120))
        .build()
        .expect("config");
    Router::new()
        .route(
            "/payments",
            post(move |body: axum::body::Bytes| {
                let runs = Arc::clone(&runs);
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(delay).await;
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .header("location", format!("/payments/{n}"))
                        .header("content-type", "application/json")
                        .body(Body::from(format!(
                            "{{\"run\":{n},\"echo\":{}}}",
                            String::from_utf8_lossy(&body)
                        )))
                        .expect("response")
                }
            }),
        )
        .layer(IdempotencyLayer::new(Idempotency::from_arc(store, config)))
}

fn payment(key: &str) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri("/payments")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Body::from(r#"{"amount":100,"currency":"EUR"}"#))
        .expect("request")
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    let (head, body) = app
        .clone()
        .oneshot(req)
        .await
        .expect("infallible")
        .into_parts();
    let header = |name: &str| {
        head.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let body = body.collect().await.expect("body").to_bytes();
    Answer::new(head.status.as_u16(), header, body)
}

fn unique_key() -> String {
    format!("shared-{}", LeaseToken::random().to_hex())
}

/// 32 concurrent duplicates split between two layer instances with their
/// own store connections: one run in total; every other answer is 409 or the
/// replay of that run; later retries on either instance replay it byte for byte.
async fn two_instances_run_the_handler_once(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let delay = Duration::from_millis(300);
    let apps = [
        app(a, Arc::clone(&runs), FailureMode::Closed, delay),
        app(b, Arc::clone(&runs), FailureMode::Closed, delay),
    ];
    let key = unique_key();
    let barrier = Arc::new(tokio::sync::Barrier::new(32));
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (app, key, barrier) = (apps[i % 2].clone(), key.clone(), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                send(&app, payment(&key)).await
            })
        })
        .collect();
    let mut first = None;
    for t in tasks {
        let a = t.await.expect("task");
        match StatusCode::from_u16(a.status).expect("a status") {
            StatusCode::CREATED if !a.replayed => {
                assert!(first.is_none(), "two fresh 201s");
                first = Some(a.body);
            }
            StatusCode::CREATED => {}
            StatusCode::CONFLICT => assert!(a.retry_after.is_some()),
            other => panic!("unexpected {other}: {:?}", a.body),
        }
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler ran more than once"
    );
    let first = first.expect("no request ran the handler");
    for app in &apps {
        let retry = send(app, payment(&key)).await;
        assert_eq!(retry.status, StatusCode::CREATED);
        assert!(retry.replayed);
        assert_eq!(retry.body, first, "the replay differs");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_redis_run_the_handler_once() {
    use idempotency_redis::RedisStore;
    let Some(url) = service_url("REDIS_URL", "two_instances_on_one_redis") else {
        return;
    };
    let prefix = format!("tower-{}:", LeaseToken::random().to_hex());
    let a = RedisStore::connect(&url)
        .await
        .expect("redis a")
        .with_prefix(&prefix);
    let b = RedisStore::connect(&url)
        .await
        .expect("redis b")
        .with_prefix(&prefix);
    two_instances_run_the_handler_once(Arc::new(a), Arc::new(b)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_postgres_run_the_handler_once() {
    use idempotency_sqlx::postgres::PostgresStore;
    let Some(url) = service_url("DATABASE_URL", "two_instances_on_one_postgres") else {
        return;
    };
    // The default schema; the random key keeps this run's record apart.
    let a = PostgresStore::connect(&url).await.expect("postgres a");
    let b = PostgresStore::connect(&url).await.expect("postgres b");
    two_instances_run_the_handler_once(Arc::new(a), Arc::new(b)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_sqlite_file_run_the_handler_once() {
    use idempotency_sqlx::sqlite::SqliteStore;
    let path = std::env::temp_dir().join(format!("{}.sqlite", unique_key()));
    let url = format!("sqlite://{}", path.display());
    let a = SqliteStore::connect(&url).await.expect("sqlite a");
    let b = SqliteStore::connect(&url).await.expect("sqlite b");
    two_instances_run_the_handler_once(Arc::new(a), Arc::new(b)).await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// Waits until `app` answers a fresh covered request with 201 (Redis back).
async fn until_recovered(app: &Router) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let a = send(app, payment(&unique_key())).await;
        if a.status == StatusCode::CREATED {
            return a;
        }
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            Instant::now() < deadline,
            "still 503 15 s after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fail_closed_answers_503_and_recovers() {
    use idempotency_redis::RedisStore;
    let Some(mut server) = RedisServer::start("redis_outage_fail_closed") else {
        return;
    };
    let store = RedisStore::connect(&format!("redis://127.0.0.1:{}", server.port))
        .await
        .expect("connect");
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(
        Arc::new(store),
        Arc::clone(&runs),
        FailureMode::Closed,
        Duration::ZERO,
    );
    let key = unique_key();
    assert_eq!(send(&app, payment(&key)).await.status, StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    server.kill();
    for key in [unique_key(), unique_key(), key.clone()] {
        let a = send(&app, payment(&key)).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.content_type.as_deref(), Some("application/problem+json"));
        assert!(a.retry_after.is_some(), "503 without Retry-After");
        let problem: serde_json::Value = serde_json::from_slice(&a.body).expect("problem json");
        assert_eq!(problem["status"], 503);
        let text = String::from_utf8_lossy(&a.body).to_lowercase();
        for leak in ["redis", "connection", "refused", "127.0.0.1"] {
            assert!(!text.contains(leak), "the problem leaks {leak:?}: {text}");
        }
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler ran during the outage (fail-closed)"
    );

    server.restart().expect("restart redis-server");
    let a = until_recovered(&app).await;
    assert!(!a.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// Collects the messages of `error` events (a minimal tracing subscriber).
#[derive(Clone, Default)]
struct ErrorLog(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for ErrorLog {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write;
                let _ = write!(self.0, "{}={:?} ", field.name(), value);
            }
        }
        if *event.metadata().level() == tracing::Level::ERROR {
            let mut m = Message(String::new());
            event.record(&mut m);
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(m.0);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn redis_outage_fail_open_runs_the_handler_and_logs() {
    let log = ErrorLog::default();
    // One thread, so the subscriber set for it sees every event of the request.
    let _guard = tracing::subscriber::set_default(log.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        use idempotency_redis::RedisStore;
        let Some(mut server) = RedisServer::start("redis_outage_fail_open") else {
            return;
        };
        let store = RedisStore::connect(&format!("redis://127.0.0.1:{}", server.port))
            .await
            .expect("connect");
        let runs = Arc::new(AtomicUsize::new(0));
        let app = app(
            Arc::new(store),
            Arc::clone(&runs),
            FailureMode::Open,
            Duration::ZERO,
        );
        assert_eq!(
            send(&app, payment(&unique_key())).await.status,
            StatusCode::CREATED
        );

        server.kill();
        let a = send(&app, payment(&unique_key())).await;
        assert_eq!(
            a.status,
            StatusCode::CREATED,
            "fail-open must run the handler"
        );
        assert!(!a.replayed);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        let logged = log.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert!(
            logged.iter().any(|m| m.contains("fail-open")),
            "the outage was not logged at error: {logged:?}"
        );

        server.restart().expect("restart redis-server");
        // Protected again, without a restart: a retry replays instead of running.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let key = unique_key();
            assert_eq!(send(&app, payment(&key)).await.status, StatusCode::CREATED);
            let before = runs.load(Ordering::SeqCst);
            let retry = send(&app, payment(&key)).await;
            if retry.replayed {
                assert_eq!(runs.load(Ordering::SeqCst), before);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not protected 15 s after Redis came back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}
