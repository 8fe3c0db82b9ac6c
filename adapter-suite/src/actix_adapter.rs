//! The suite's actix adapter: an actix-web `App` behind `IdempotencyMiddleware`,
//! driven in process through `actix_web::test::init_service`.

use crate::{Adapter, Backend, SuiteRequest, SuiteResponse};
use actix_http::Request;
use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Payload, Service, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{test, web, App, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::stream::Stream;
use futures_util::{FutureExt, StreamExt};
use idempotency_actix::IdempotencyMiddleware;
use idempotency_core::Idempotency;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

type Call = dyn Fn(Request) -> LocalBoxFuture<'static, Option<SuiteResponse>>;

/// The chunk size of streamed request bodies: a body without a
/// `Content-Length` arrives in pieces, as from a chunked upload.
const CHUNK: usize = 256;

/// actix-web + `idempotency-actix`. Not `Send`: actix apps live on one
/// worker thread.
#[derive(Clone)]
pub struct ActixAdapter {
    call: Rc<Call>,
}

impl std::fmt::Debug for ActixAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActixAdapter").finish_non_exhaustive()
    }
}

/// Serves one request with the framework-neutral backend.
async fn serve(backend: web::Data<Backend>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let suite_req = SuiteRequest {
        method: req.method().as_str().to_owned(),
        uri: req.uri().to_string(),
        headers: req
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect(),
        body,
        stall: false,
    };
    let res = backend.handle(suite_req).await;
    let mut out = HttpResponse::build(
        StatusCode::from_u16(res.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    );
    for (n, v) in &res.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            out.append_header((n, v));
        }
    }
    out.body(res.body)
}

/// Converts a response, reading its whole body. Like actix's HTTP/1 encoder,
/// it adds the `Content-Length` of a sized body when the headers have none
/// (actix computes it on the wire, where axum puts it in the header map), so
/// the suite sees what a client sees.
pub async fn read_response<B: MessageBody>(res: ServiceResponse<B>) -> SuiteResponse {
    let status = res.status().as_u16();
    let mut headers: Vec<(String, Vec<u8>)> = res
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    let wire_length = !matches!(status, 100..=199 | 204 | 304);
    if let (BodySize::Sized(n), true) = (res.response().body().size(), wire_length) {
        if !headers.iter().any(|(name, _)| name == "content-length") {
            headers.push(("content-length".to_owned(), n.to_string().into_bytes()));
        }
    }
    let body = match actix_web::body::to_bytes(res.into_body()).await {
        Ok(b) => b,
        Err(_) => panic!("body reads"),
    };
    SuiteResponse {
        status,
        headers,
        body,
    }
}

/// Builds the actix request of a suite request. A body with a declared
/// `Content-Length` is one chunk; without, it is streamed in chunks of 256 bytes.
pub fn to_request(req: SuiteRequest) -> Request {
    let method = Method::from_bytes(req.method.as_bytes()).expect("suite method is valid");
    let mut builder = test::TestRequest::default().method(method).uri(&req.uri);
    let mut declared = false;
    for (n, v) in &req.headers {
        declared |= n == "content-length";
        let name = HeaderName::from_bytes(n.as_bytes()).expect("suite header name is valid");
        let value = HeaderValue::from_bytes(v).expect("suite header value is valid");
        builder = builder.append_header((name, value));
    }
    let request = builder.to_request();
    let payload = if req.stall {
        // The bytes, then a payload that never ends.
        let bytes = futures_util::stream::iter([Ok::<_, PayloadError>(req.body)]);
        let stream: Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>> =
            Box::pin(bytes.chain(futures_util::stream::pending()));
        Payload::from(stream)
    } else if declared {
        Payload::from(req.body)
    } else {
        let chunks: Vec<Result<Bytes, PayloadError>> = req
            .body
            .chunks(CHUNK)
            .map(|c| Ok(req.body.slice_ref(c)))
            .collect();
        let stream: Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>> =
            Box::pin(futures_util::stream::iter(chunks));
        Payload::from(stream)
    };
    request.replace_payload(payload).0
}

impl Adapter for ActixAdapter {
    async fn build(engine: Idempotency, backend: Arc<Backend>) -> Self {
        let app = test::init_service(
            App::new()
                .app_data(web::Data::from(backend))
                .wrap(IdempotencyMiddleware::new(engine))
                .default_service(web::to(serve)),
        )
        .await;
        let app = Rc::new(app);
        let call = move |req: Request| -> LocalBoxFuture<'static, Option<SuiteResponse>> {
            let app = Rc::clone(&app);
            Box::pin(async move {
                let call = AssertUnwindSafe(app.call(req)).catch_unwind();
                let res = call.await.ok()?.expect("the app answers");
                Some(read_response(res).await)
            })
        };
        Self {
            call: Rc::new(call),
        }
    }

    async fn try_send(&self, req: SuiteRequest) -> Option<SuiteResponse> {
        (self.call)(to_request(req)).await
    }
}
