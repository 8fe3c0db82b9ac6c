//! The [`IdempotencyService`].

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use idempotency_core::{
    Answer, DetachOnDrop, Handoff, Idempotency, Inspection, Reply, RequestFuture,
};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tower_service::Service;

use crate::body::{Frames, RequestBody, ResponseBody};
use crate::layer::IdempotencyLayer;

type Output<B, E> = Result<Response<ResponseBody<B>>, E>;

/// The future of [`IdempotencyService`]. Requests that pass through are
/// not boxed.
pub type ResponseFuture<F, B, E> =
    RequestFuture<F, dyn Future<Output = Output<B, E>> + Send, Output<B, E>>;

/// Makes the inner service idempotent under retries. Made by
/// [`IdempotencyLayer`]; see the crate docs for the behaviour.
#[derive(Clone, Debug)]
pub struct IdempotencyService<S> {
    pub(crate) inner: S,
    pub(crate) layer: IdempotencyLayer,
}

impl<S> IdempotencyService<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, engine: Idempotency) -> Self {
        Self {
            inner,
            layer: IdempotencyLayer::new(engine),
        }
    }

    /// A layer that makes this service.
    pub fn layer(engine: Idempotency) -> IdempotencyLayer {
        IdempotencyLayer::new(engine)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for IdempotencyService<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: std::fmt::Display + Send,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let pending = match self.layer.engine.inspect(&parts, &parts) {
            Inspection::PassThrough => {
                let req = Request::from_parts(parts, RequestBody::original(body));
                return ResponseFuture::pass_through(self.inner.call(req), |r| {
                    r.map(|res| {
                        res.map(|b| {
                            ResponseBody::new(idempotency_core::ResponseBody::stream(Frames::new(
                                b,
                            )))
                        })
                    })
                });
            }
            Inspection::Reject(problem) => {
                return ResponseFuture::ready(Ok(answer(&problem.into())))
            }
            Inspection::Pending(pending) => pending,
        };
        // The inner service was made ready for this call; keep that one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let engine = self.layer.engine().clone();
        let span = pending.span().clone();
        let future: Pin<Box<dyn Future<Output = Output<ResBody, S::Error>> + Send>> =
            Box::pin(async move {
                let call = |handoff: Handoff| async move {
                    let (body, transaction) = handoff.into_parts();
                    let mut req = Request::from_parts(parts, RequestBody::buffered(body));
                    if let Some(transaction) = transaction {
                        req.extensions_mut().insert(transaction);
                    }
                    let (parts, body) = inner.call(req).await?.into_parts();
                    Ok((parts, Frames::new(body)))
                };
                Ok(
                    match engine.respond(pending, Frames::new(body), call).await? {
                        Reply::Answer(a) => answer(&a),
                        Reply::Handler(parts, body) => {
                            Response::from_parts(parts, ResponseBody::new(body))
                        }
                    },
                )
            });
        ResponseFuture::covered(DetachOnDrop::new(future, span, |rest| {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn(rest)),
                Err(_) => tracing::warn!("idempotent request dropped outside a runtime; its claim is freed when the lease passes"),
            }
        }))
    }
}

/// Built at compile time: `from_static` checks its input when run.
const IDEMPOTENT_REPLAYED: HeaderName =
    HeaderName::from_static(idempotency_core::IDEMPOTENT_REPLAYED);

/// A problem or a replay as a response.
pub(crate) fn answer<B: Body<Data = Bytes>>(answer: &Answer) -> Response<ResponseBody<B>> {
    let body = ResponseBody::new(idempotency_core::ResponseBody::full(answer.body()));
    let mut res = Response::new(body);
    *res.status_mut() =
        StatusCode::from_u16(answer.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = res.headers_mut();
    let answer_headers = answer.headers();
    headers.reserve(answer_headers.size_hint().0);
    for (name, value) in answer_headers {
        let name = if name == idempotency_core::IDEMPOTENT_REPLAYED {
            Ok(IDEMPOTENT_REPLAYED)
        } else {
            HeaderName::from_bytes(name.as_bytes())
        };
        match (name, HeaderValue::from_maybe_shared(value)) {
            (Ok(n), Ok(v)) => drop(headers.append(n, v)),
            _ => tracing::warn!("stored header is not valid HTTP; left out of the response"),
        }
    }
    res
}
