//! actix-specific behaviour the shared suite does not reach: streamed
//! response bodies, extractors after fingerprinting, and `with_scope`.

use actix_web::body::{to_bytes, BodyStream, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse};
use actix_web::{test, web, App, HttpMessage, HttpResponse};
use bytes::Bytes;
use futures_util::stream;
use idempotency_actix::IdempotencyMiddleware;
use idempotency_core::{Idempotency, IdempotencyConfig, MemoryStore, Scope};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn engine(max_stored: usize) -> Idempotency {
    let config = IdempotencyConfig::builder()
        .max_stored_response(max_stored)
        .build()
        .expect("valid config");
    Idempotency::new(MemoryStore::new(), config)
}

fn post(uri: &str, key: &str, body: &'static str) -> actix_http::Request {
    test::TestRequest::post()
        .uri(uri)
        .insert_header(("idempotency-key", key))
        .insert_header(("content-type", "application/json"))
        .set_payload(body)
        .to_request()
}

async fn call<S, B>(app: &S, req: actix_http::Request) -> (u16, Option<String>, Bytes)
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let res = app.call(req).await.expect("the app answers");
    let status = res.status().as_u16();
    let replayed = res
        .headers()
        .get("idempotent-replayed")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = to_bytes(res.into_body()).await.ok().expect("body reads");
    (status, replayed, body)
}

/// A body streamed in 100-byte chunks, with no size known up front.
fn streamed(len: usize) -> HttpResponse {
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..len)
        .step_by(100)
        .map(|i| Ok(Bytes::from(vec![(i / 100) as u8; 100.min(len - i)])))
        .collect();
    HttpResponse::Ok().body(BodyStream::new(stream::iter(chunks)))
}

#[actix_web::test]
async fn streamed_response_under_the_limit_is_stored_and_replayed() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let app = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(engine(1000)))
            .route(
                "/s",
                web::post().to(move || {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async { streamed(950) }
                }),
            ),
    )
    .await;
    let (s1, r1, b1) = call(&app, post("/s", "k", "{}")).await;
    let (s2, r2, b2) = call(&app, post("/s", "k", "{}")).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!((r1, r2.as_deref()), (None, Some("true")));
    assert_eq!(b1.len(), 950);
    assert_eq!(b1, b2);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[actix_web::test]
async fn streamed_response_over_the_limit_reaches_the_client_whole_and_is_not_replayable() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let app = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(engine(1000)))
            .route(
                "/s",
                web::post().to(move || {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async { streamed(5050) }
                }),
            ),
    )
    .await;
    let (status, _, body) = call(&app, post("/s", "k", "{}")).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), 5050, "the prefix read for storage and the rest");
    assert!(body
        .chunks(100)
        .enumerate()
        .all(|(i, c)| c.iter().all(|b| *b == i as u8)));
    let (status, _, body) = call(&app, post("/s", "k", "{}")).await;
    assert_eq!(status, 410, "{}", String::from_utf8_lossy(&body));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[actix_web::test]
async fn response_body_error_releases_the_claim() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let app = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(engine(1000)))
            .route(
                "/s",
                web::post().to(move || {
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if n == 0 {
                            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                                Ok(Bytes::from_static(b"partial")),
                                Err(std::io::Error::other("disk on fire")),
                            ];
                            HttpResponse::Ok().body(BodyStream::new(stream::iter(chunks)))
                        } else {
                            HttpResponse::Ok().body("whole")
                        }
                    }
                }),
            ),
    )
    .await;
    let res = app.call(post("/s", "k", "{}")).await.expect("answers");
    assert!(
        to_bytes(res.into_body()).await.is_err(),
        "the client sees the error"
    );
    let (status, replayed, body) = call(&app, post("/s", "k", "{}")).await;
    assert_eq!((status, replayed, &body[..]), (200, None, &b"whole"[..]));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the retry ran the handler again"
    );
}

#[actix_web::test]
async fn handler_extractors_get_the_bytes_that_were_fingerprinted() {
    let app = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(engine(1000)))
            .route("/echo", web::post().to(|body: String| async move { body })),
    )
    .await;
    let (status, _, body) = call(&app, post("/echo", "k", r#"{"amount":1}"#)).await;
    assert_eq!((status, &body[..]), (200, &br#"{"amount":1}"#[..]));
}

#[derive(Clone)]
struct User(&'static str);

#[actix_web::test]
async fn with_scope_keeps_principals_apart() {
    let middleware = IdempotencyMiddleware::new(engine(1000))
        .with_scope(|req: &ServiceRequest| req.extensions().get::<User>().map(|u| Scope::new(u.0)));
    let app = test::init_service(
        App::new()
            .wrap(middleware)
            // Registered last, so it runs first: an auth layer naming the principal.
            .wrap_fn(|req, srv| {
                let user = match req.headers().get("x-user").map(|v| v.as_bytes()) {
                    Some(b"alice") => Some(User("alice")),
                    Some(b"bob") => Some(User("bob")),
                    _ => None,
                };
                if let Some(user) = user {
                    req.extensions_mut().insert(user);
                }
                srv.call(req)
            })
            .route("/echo", web::post().to(|body: String| async move { body })),
    )
    .await;
    let as_user = |user: &'static str, body: &'static str| {
        test::TestRequest::post()
            .uri("/echo")
            .insert_header(("idempotency-key", "same"))
            .insert_header(("x-user", user))
            .set_payload(body)
            .to_request()
    };
    let (a, _, a_body) = call(&app, as_user("alice", "from alice")).await;
    let (b, b_replayed, b_body) = call(&app, as_user("bob", "from bob")).await;
    assert_eq!((a, b), (200, 200), "no 422 across scopes");
    assert_eq!(b_replayed, None, "bob never gets alice's response");
    assert_eq!(
        (&a_body[..], &b_body[..]),
        (&b"from alice"[..], &b"from bob"[..])
    );
    let (_, replayed, body) = call(&app, as_user("alice", "from alice")).await;
    assert_eq!(
        (replayed.as_deref(), &body[..]),
        (Some("true"), &b"from alice"[..])
    );
}
