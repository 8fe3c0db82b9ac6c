//! A response body whose size hint promises less than it sends: the client
//! still gets every byte, and the record completes as not replayable.

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;
use idempotency_core::{Idempotency, IdempotencyConfig, MemoryStore};
use idempotency_tower::IdempotencyLayer;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::ServiceExt;

/// Sends 20 chunks of 100 bytes while claiming at most 10 bytes in all.
struct LyingBody {
    left: usize,
}

impl http_body::Body for LyingBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![
            b'x';
            100
        ])))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let mut h = http_body::SizeHint::new();
        h.set_upper(10);
        h
    }
}

fn request() -> http::Request<Body> {
    http::Request::post("/lie")
        .header("idempotency-key", "lie-1")
        .body(Body::empty())
        .expect("request")
}

#[tokio::test]
async fn a_body_larger_than_its_hint_reaches_the_client_and_is_never_rerun() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let config = IdempotencyConfig::builder()
        .max_stored_response(1000)
        .build()
        .expect("config");
    let app = Router::new()
        .route(
            "/lie",
            post(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async { http::Response::new(Body::new(LyingBody { left: 20 })) }
            }),
        )
        .layer(IdempotencyLayer::new(Idempotency::new(
            MemoryStore::new(),
            config,
        )));
    let first = app.clone().oneshot(request()).await.expect("infallible");
    assert_eq!(first.status(), 200);
    let body = first.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body.len(), 2000, "every byte reached the client");
    let retry = app.oneshot(request()).await.expect("infallible");
    assert_eq!(retry.status(), 410, "not replayable, never re-run");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
