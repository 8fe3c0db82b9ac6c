//! The [`IdempotencyService`].

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpMessage, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use idempotency_core::IDEMPOTENCY_KEY;
use idempotency_core::{
    Answer, DetachOnDrop, Handoff, Inspection, Reply, RequestFuture, RequestHead, ResponseHead,
};
use std::future::Future;
use std::rc::Rc;

use crate::body::{Message, PayloadChunks, ResponseBody};
use crate::middleware::IdempotencyMiddleware;

type Output<B> = Result<ServiceResponse<ResponseBody<B>>, actix_web::Error>;

/// The future of [`IdempotencyService`]. Requests that pass through are
/// not boxed.
pub type ResponseFuture<F, B> = RequestFuture<F, dyn Future<Output = Output<B>>, Output<B>>;

/// Makes the inner service idempotent under retries. Made by
/// [`IdempotencyMiddleware`]; see the crate docs for the behaviour.
pub struct IdempotencyService<S> {
    pub(crate) inner: Rc<S>,
    pub(crate) middleware: IdempotencyMiddleware,
}

impl<S> IdempotencyService<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S> std::fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("middleware", &self.middleware)
            .finish_non_exhaustive()
    }
}

/// Built at compile time: `from_static` checks its input when run.
const IDEMPOTENCY_KEY_NAME: HeaderName = HeaderName::from_static(IDEMPOTENCY_KEY);

/// What the engine sees of an actix request head (actix-web 4 uses `http` 0.2).
struct Head<'a>(&'a actix_web::dev::RequestHead);

impl RequestHead for Head<'_> {
    fn method(&self) -> &str {
        self.0.method.as_str()
    }
    fn path(&self) -> &str {
        self.0.uri.path()
    }
    fn query(&self) -> Option<&str> {
        self.0.uri.query()
    }
    fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        // The names the engine asks for, without parsing (and, for
        // `idempotency-key`, allocating) them again.
        let headers = &self.0.headers;
        let values = match name {
            IDEMPOTENCY_KEY => headers.get_all(IDEMPOTENCY_KEY_NAME),
            "content-type" => headers.get_all(header::CONTENT_TYPE),
            "content-length" => headers.get_all(header::CONTENT_LENGTH),
            _ => headers.get_all(name),
        };
        values.map(HeaderValue::as_bytes)
    }
}

/// A handler's response head: its request, and the response without a body.
struct Handled(HttpRequest, HttpResponse<()>);

impl ResponseHead for Handled {
    fn status(&self) -> u16 {
        self.1.status().as_u16()
    }
    fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.1
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
    }
}

impl<S, B> Service<ServiceRequest> for IdempotencyService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<ResponseBody<B>>;
    type Error = actix_web::Error;
    type Future = ResponseFuture<S::Future, B>;

    actix_web::dev::forward_ready!(inner);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let pending = match self.middleware.engine.inspect(&Head(req.head()), &req) {
            Inspection::PassThrough => {
                return ResponseFuture::pass_through(self.inner.call(req), |r| {
                    r.map(|res| {
                        res.map_body(|_, b| {
                            ResponseBody::new(idempotency_core::ResponseBody::stream(Message::new(
                                b,
                            )))
                        })
                    })
                })
            }
            Inspection::Reject(problem) => {
                let (req, _) = req.into_parts();
                return ResponseFuture::ready(Ok(answer(req, &problem.into())));
            }
            Inspection::Pending(pending) => pending,
        };
        let inner = Rc::clone(&self.inner);
        let engine = self.middleware.engine().clone();
        let span = pending.span().clone();
        let (req, mut payload) = req.into_parts();
        let future: LocalBoxFuture<'static, Output<B>> = Box::pin(async move {
            // The request goes to the handler, or back with an answer; never
            // cloned (routing needs it unshared).
            let mut request = Some(req);
            let call = |handoff: Handoff| {
                let req = request.take();
                async move {
                    let req = req.ok_or_else(gone)?;
                    let (body, transaction) = handoff.into_parts();
                    if let Some(transaction) = transaction {
                        req.extensions_mut().insert(transaction);
                    }
                    let res = inner.call(ServiceRequest::from_parts(req, one_chunk(body)));
                    let (req, res) = res.await?.into_parts();
                    let (head, body) = res.into_parts();
                    Ok::<_, actix_web::Error>((Handled(req, head), Message::new(body)))
                }
            };
            let reply = engine
                .respond(pending, PayloadChunks(&mut payload), call)
                .await?;
            Ok(match reply {
                Reply::Answer(a) if a.closes_connection() => {
                    // The body was not read to its end (a 408): actix closes
                    // the connection after the answer only while the payload
                    // is alive, and would otherwise drain a chunked body
                    // that may never end.
                    answer(request.ok_or_else(gone)?, &a).map_body(|_, body| body.holding(payload))
                }
                Reply::Answer(a) => answer(request.ok_or_else(gone)?, &a),
                Reply::Handler(Handled(req, head), body) => {
                    ServiceResponse::new(req, head.set_body(ResponseBody::new(body)))
                }
            })
        });
        ResponseFuture::covered(DetachOnDrop::new(future, span, |rest| {
            drop(actix_web::rt::spawn(rest));
        }))
    }
}

/// Core answers or calls the handler, never both; this is the other case.
fn gone() -> actix_web::Error {
    actix_web::error::ErrorInternalServerError("idempotency: the request was already handed on")
}

/// The read body, handed to the handler as its payload: one boxed stream
/// of one chunk (`Payload::from(Bytes)` would build an h1 payload, two
/// allocations).
fn one_chunk(body: Bytes) -> Payload {
    Payload::Stream {
        payload: Box::pin(futures_util::stream::once(std::future::ready(Ok(body)))),
    }
}

/// A problem or a replay as a response to `req`.
fn answer<B: MessageBody>(req: HttpRequest, answer: &Answer) -> ServiceResponse<ResponseBody<B>> {
    ServiceResponse::new(req, response(answer))
}

/// A problem or a replay as a response.
pub(crate) fn response<B: MessageBody>(answer: &Answer) -> HttpResponse<ResponseBody<B>> {
    let status = StatusCode::from_u16(answer.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = ResponseBody::new(idempotency_core::ResponseBody::full(answer.body()));
    let mut res = HttpResponse::with_body(status, body);
    let headers = res.headers_mut();
    let answer_headers = answer.headers();
    headers.reserve(answer_headers.size_hint().0);
    for (name, value) in answer_headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_maybe_shared(value),
        ) {
            (Ok(n), Ok(v)) => headers.append(n, v),
            _ => tracing::warn!("stored header is not valid HTTP; left out of the response"),
        }
    }
    if answer.closes_connection() {
        // actix writes `Connection` from the head, not from the header map.
        res.head_mut()
            .set_connection_type(actix_web::http::ConnectionType::Close);
    }
    res
}
