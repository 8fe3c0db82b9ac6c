//! The suite's tower adapter: an axum `Router` behind `IdempotencyLayer`.

use crate::{Adapter, Backend, SuiteRequest, SuiteResponse};
use axum::body::Body;
use axum::Router;
use futures_util::{FutureExt, StreamExt};
use http_body_util::BodyExt;
use idempotency_core::Idempotency;
use idempotency_tower::IdempotencyLayer;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tower::ServiceExt;

/// axum + `idempotency-tower`.
#[derive(Clone, Debug)]
pub struct TowerAdapter {
    router: Router,
}

async fn serve(backend: Arc<Backend>, req: axum::extract::Request) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let suite_req = SuiteRequest {
        method: parts.method.as_str().to_owned(),
        uri: parts.uri.to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect(),
        body,
        stall: false,
    };
    let res = backend.handle(suite_req).await;
    let mut builder = http::Response::builder().status(res.status);
    for (n, v) in &res.headers {
        builder = builder.header(n.as_str(), v.as_slice());
    }
    builder
        .body(Body::from(res.body))
        .unwrap_or_else(|_| http::Response::new(Body::empty()))
}

impl Adapter for TowerAdapter {
    async fn build(engine: Idempotency, backend: Arc<Backend>) -> Self {
        let router = Router::new()
            .fallback(move |req: axum::extract::Request| serve(Arc::clone(&backend), req))
            .layer(IdempotencyLayer::new(engine));
        Self { router }
    }

    async fn try_send(&self, req: SuiteRequest) -> Option<SuiteResponse> {
        let mut builder = http::Request::builder()
            .method(req.method.as_str())
            .uri(req.uri.as_str());
        for (n, v) in &req.headers {
            builder = builder.header(n.as_str(), v.as_slice());
        }
        let body = if req.stall {
            // The bytes, then a body that never ends.
            let bytes = futures_util::stream::iter([Ok::<_, std::io::Error>(req.body)]);
            Body::from_stream(bytes.chain(futures_util::stream::pending()))
        } else {
            Body::from(req.body)
        };
        let request = builder.body(body).expect("suite request is valid HTTP");
        let call = AssertUnwindSafe(self.router.clone().oneshot(request)).catch_unwind();
        let res = call.await.ok()?.expect("infallible");
        let (parts, body) = res.into_parts();
        let body = body.collect().await.expect("body reads").to_bytes();
        Some(SuiteResponse {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect(),
            body,
        })
    }
}
