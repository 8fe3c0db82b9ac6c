//! The [`IdempotencyService`].

use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpMessage, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use idempotency_core::key::IDEMPOTENCY_KEY;
use idempotency_core::{
    Decision, DetachOnDrop, Execution, Inspection, Problem, RequestHead, StoredResponse,
};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::rc::Rc;

use crate::body::ResponseBody;
use crate::future::ResponseFuture;
use crate::middleware::IdempotencyMiddleware;

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

impl<S, B> Service<ServiceRequest> for IdempotencyService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<ResponseBody<B>>;
    type Error = actix_web::Error;
    type Future = ResponseFuture<S::Future, B>;

    actix_web::dev::forward_ready!(inner);

    fn call(&self, mut req: ServiceRequest) -> Self::Future {
        let middleware = &self.middleware;
        let inspection = middleware.engine.inspect(&Head(req.head()), || {
            middleware.scope.as_ref().and_then(|f| f(&req))
        });
        let pending = match inspection {
            Inspection::PassThrough => return ResponseFuture::pass_through(self.inner.call(req)),
            Inspection::Reject(problem) => {
                return ResponseFuture::ready(problem_response(req, &problem))
            }
            Inspection::Pending(pending) => pending,
        };
        let inner = Rc::clone(&self.inner);
        let engine = middleware.engine.clone();
        let span = pending.span().clone();
        let future: LocalBoxFuture<
            'static,
            Result<ServiceResponse<ResponseBody<B>>, actix_web::Error>,
        > = Box::pin(async move {
            let body = match read_payload(req.take_payload(), pending.body_limit()).await {
                Ok(body) => body,
                Err(PayloadRead::TooLarge) => {
                    tracing::debug!(
                        decision = "rejected",
                        reason = "body too large",
                        "idempotency"
                    );
                    return Ok(problem_response(req, &engine.body_too_large()));
                }
                Err(PayloadRead::Failed(e)) => {
                    return Ok(problem_response(req, &engine.unreadable_body(&e)))
                }
            };
            match engine.decide(pending, &body).await {
                Decision::Replay(stored) => Ok(replay_response(req, &stored)),
                Decision::Reject(problem) => Ok(problem_response(req, &problem)),
                Decision::Unguarded => {
                    req.set_payload(payload(body));
                    let res = inner.call(req).await?;
                    Ok(res.map_body(|_, b| ResponseBody::inner(b)))
                }
                Decision::Execute(execution) => {
                    req.set_payload(payload(body));
                    execute(execution, inner, req).await
                }
            }
        });
        ResponseFuture::guarded(DetachOnDrop::new(future, span, |rest| {
            drop(actix_web::rt::spawn(rest));
        }))
    }
}

/// The read body, handed to the handler as its payload: one boxed stream
/// of one chunk (`Payload::from(Bytes)` would build an h1 payload, two
/// allocations).
fn payload(body: Bytes) -> Payload {
    Payload::Stream {
        payload: Box::pin(futures_util::stream::once(std::future::ready(Ok(body)))),
    }
}

enum PayloadRead {
    TooLarge,
    Failed(PayloadError),
}

/// Reads the streamed request payload, refusing past `limit` bytes.
async fn read_payload(mut payload: Payload, limit: usize) -> Result<Bytes, PayloadRead> {
    let mut first = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    let mut len = 0usize;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(PayloadRead::Failed)?;
        len += chunk.len();
        if len > limit {
            return Err(PayloadRead::TooLarge);
        }
        match &mut joined {
            Some(buf) => buf.extend_from_slice(&chunk),
            None if first.is_empty() => first = chunk,
            None => {
                let mut buf = BytesMut::with_capacity(len.max(1024).min(limit));
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&chunk);
                joined = Some(buf);
            }
        }
    }
    Ok(joined.map_or(first, BytesMut::freeze))
}

async fn execute<S, B>(
    execution: Execution,
    inner: Rc<S>,
    req: ServiceRequest,
) -> Result<ServiceResponse<ResponseBody<B>>, actix_web::Error>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let outcome = execution
        .run(async {
            let res = inner.call(req).await?;
            if !execution.should_store(res.status().as_u16()) {
                return Ok(Handled::NotStored(res));
            }
            let (req, res) = res.into_parts();
            let (head, body) = res.into_parts();
            let read = read_limited(body, execution.max_stored_response()).await;
            Ok(Handled::Read(req, head, read))
        })
        .await;
    let (req, head, read) = match outcome {
        Ok(Handled::Read(req, head, read)) => (req, head, read),
        Ok(Handled::NotStored(res)) => {
            execution.release().await;
            return Ok(res.map_body(|_, b| ResponseBody::inner(b)));
        }
        Err(e) => {
            execution.release().await;
            return Err(e);
        }
    };
    let status = head.status().as_u16();
    let body = match read {
        Read::Complete(bytes) => {
            let headers = head.headers().iter();
            let stored = execution.capture(
                status,
                headers.map(|(n, v)| (n.as_str(), v.as_bytes())),
                bytes.clone(),
            );
            execution.complete(stored).await;
            ResponseBody::full(bytes)
        }
        Read::TooLarge { prefix, rest } => {
            execution.complete_not_replayable(status).await;
            match rest {
                Some(rest) => ResponseBody::chain(prefix, rest),
                None => ResponseBody::full(prefix.into_iter().next().unwrap_or_default()),
            }
        }
        Read::Failed(error) => {
            execution.release().await;
            ResponseBody::failed(error)
        }
    };
    Ok(ServiceResponse::new(req, head.set_body(body)))
}

enum Handled<B: MessageBody> {
    NotStored(ServiceResponse<B>),
    Read(actix_web::HttpRequest, HttpResponse<()>, Read<B>),
}

enum Read<B: MessageBody> {
    Complete(Bytes),
    /// What was read, then the rest of the stream (`None`: it was all read).
    TooLarge {
        prefix: VecDeque<Bytes>,
        rest: Option<Pin<Box<B>>>,
    },
    Failed(B::Error),
}

/// Reads the response body up to `limit` bytes; past that, hands back what
/// was read and the rest of the stream so the client still gets all of it.
async fn read_limited<B: MessageBody>(body: B, limit: usize) -> Read<B> {
    if let BodySize::Sized(n) = body.size() {
        if n > limit as u64 {
            return Read::TooLarge {
                prefix: VecDeque::new(),
                rest: Some(Box::pin(body)),
            };
        }
    }
    let body = match body.try_into_bytes() {
        Ok(bytes) if bytes.len() > limit => {
            return Read::TooLarge {
                prefix: VecDeque::from([bytes]),
                rest: None,
            }
        }
        Ok(bytes) => return Read::Complete(bytes),
        Err(body) => body,
    };
    let mut body = Box::pin(body);
    let mut chunks = VecDeque::new();
    let mut len = 0usize;
    loop {
        match poll_fn(|cx| body.as_mut().poll_next(cx)).await {
            None => break,
            Some(Err(e)) => return Read::Failed(e),
            Some(Ok(data)) => {
                len += data.len();
                chunks.push_back(data);
                if len > limit {
                    return Read::TooLarge {
                        prefix: chunks,
                        rest: Some(body),
                    };
                }
            }
        }
    }
    Read::Complete(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop_front().unwrap_or_default(),
        _ => {
            let mut buf = BytesMut::with_capacity(len);
            for c in chunks {
                buf.extend_from_slice(&c);
            }
            buf.freeze()
        }
    })
}

fn replay_response<B: MessageBody>(
    req: ServiceRequest,
    stored: &StoredResponse,
) -> ServiceResponse<ResponseBody<B>> {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = HttpResponse::with_body(status, ResponseBody::full(stored.body.clone()));
    let headers = res.headers_mut();
    for (name, value) in stored.replay_headers() {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_maybe_shared(value),
        ) {
            (Ok(n), Ok(v)) => headers.append(n, v),
            _ => tracing::warn!(
                header = name,
                "stored header is not valid HTTP; left out of the replay"
            ),
        }
    }
    req.into_response(res)
}

fn problem_response<B: MessageBody>(
    req: ServiceRequest,
    problem: &Problem,
) -> ServiceResponse<ResponseBody<B>> {
    let status = StatusCode::from_u16(problem.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut res =
        HttpResponse::with_body(status, ResponseBody::full(Bytes::from(problem.to_json())));
    for (name, value) in problem.headers() {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::try_from(value),
        ) {
            res.headers_mut().insert(n, v);
        }
    }
    req.into_response(res)
}
