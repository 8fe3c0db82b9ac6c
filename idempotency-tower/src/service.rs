//! The [`IdempotencyService`].

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use idempotency_core::{
    Decision, DetachOnDrop, Execution, Idempotency, Inspection, Problem, StoredResponse,
};
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use tower_service::Service;

use crate::body::{RequestBody, ResponseBody};
use crate::future::ResponseFuture;
use crate::layer::IdempotencyLayer;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    ReqBody::Error: Into<BoxError>,
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
        let layer = &self.layer;
        let inspection = layer
            .engine
            .inspect(&parts, || layer.scope.as_ref().and_then(|f| f(&parts)));
        let pending = match inspection {
            Inspection::PassThrough => {
                return ResponseFuture::pass_through(
                    self.inner
                        .call(Request::from_parts(parts, RequestBody::original(body))),
                )
            }
            Inspection::Reject(problem) => {
                return ResponseFuture::ready(problem_response(&problem))
            }
            Inspection::Pending(pending) => pending,
        };
        // The inner service was made ready for this call; keep that one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let engine = layer.engine.clone();
        let span = pending.span().clone();
        let future: crate::future::GuardedFuture<ResBody, S::Error> = Box::pin(async move {
            let body = match read_request(body, pending.body_limit()).await {
                Ok(bytes) => bytes,
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    tracing::debug!(
                        decision = "rejected",
                        reason = "body too large",
                        "idempotency"
                    );
                    return Ok(problem_response(&engine.body_too_large()));
                }
                Err(e) => return Ok(problem_response(&engine.unreadable_body(&e))),
            };
            match engine.decide(pending, &body).await {
                Decision::Replay(stored) => Ok(replay_response(&stored)),
                Decision::Reject(problem) => Ok(problem_response(&problem)),
                Decision::Unguarded => {
                    let res = inner
                        .call(Request::from_parts(parts, RequestBody::buffered(body)))
                        .await?;
                    Ok(res.map(ResponseBody::inner))
                }
                Decision::Execute(execution) => {
                    let req = Request::from_parts(parts, RequestBody::buffered(body));
                    execute(execution, inner, req).await
                }
            }
        });
        ResponseFuture::guarded(DetachOnDrop::new(future, span, |rest| {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn(rest)),
                Err(_) => tracing::warn!("idempotent request dropped outside a runtime; its claim is freed when the lease passes"),
            }
        }))
    }
}

async fn execute<S, ReqBody, ResBody>(
    execution: Execution,
    mut inner: S,
    req: Request<RequestBody<ReqBody>>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    let outcome = execution
        .run(async {
            let res = inner.call(req).await?;
            let (parts, body) = res.into_parts();
            let status = parts.status.as_u16();
            if !execution.should_store(status) {
                return Ok((parts, Read::NotStored(body)));
            }
            Ok((
                parts,
                read_limited(body, execution.max_stored_response()).await,
            ))
        })
        .await;
    let (parts, read) = match outcome {
        Ok(v) => v,
        Err(e) => {
            execution.release().await;
            return Err(e);
        }
    };
    let status = parts.status.as_u16();
    let body = match read {
        Read::NotStored(body) => {
            execution.release().await;
            ResponseBody::inner(body)
        }
        Read::Complete(bytes) => {
            let stored = execution.capture(
                status,
                parts
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_bytes())),
                bytes.clone(),
            );
            execution.complete(stored).await;
            ResponseBody::full(bytes)
        }
        Read::Oversized(bytes) => {
            execution.complete_not_replayable(status).await;
            ResponseBody::full(bytes)
        }
        Read::TooLarge { prefix, rest } => {
            execution.complete_not_replayable(status).await;
            ResponseBody::chain(prefix, rest)
        }
        Read::Failed(error) => {
            execution.release().await;
            ResponseBody::failed(error)
        }
    };
    Ok(Response::from_parts(parts, body))
}

enum Read<B: Body> {
    NotStored(B),
    Complete(Bytes),
    TooLarge {
        prefix: VecDeque<Bytes>,
        rest: Pin<Box<B>>,
    },
    /// Over the limit although its size hint said otherwise; read in full.
    Oversized(Bytes),
    Failed(B::Error),
}

/// Reads a request body through [`Limited`]; a body of one chunk (the usual
/// case) is kept as it is, without copying.
async fn read_request<B>(body: B, limit: usize) -> Result<Bytes, BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(Limited::new(body, limit));
    let mut joined = Joined::default();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            joined.push(data);
        }
    }
    Ok(joined.into_bytes())
}

/// Chunks joined into one `Bytes`, copying only when there is more than one.
#[derive(Default)]
struct Joined {
    first: Option<Bytes>,
    rest: Vec<u8>,
}

impl Joined {
    fn push(&mut self, data: Bytes) {
        match &self.first {
            None => self.first = Some(data),
            Some(first) => {
                if self.rest.is_empty() {
                    self.rest.extend_from_slice(first);
                }
                self.rest.extend_from_slice(&data);
            }
        }
    }

    fn len(&self) -> usize {
        if self.rest.is_empty() {
            self.first.as_ref().map_or(0, Bytes::len)
        } else {
            self.rest.len()
        }
    }

    fn into_bytes(self) -> Bytes {
        if self.rest.is_empty() {
            self.first.unwrap_or_default()
        } else {
            Bytes::from(self.rest)
        }
    }
}

/// Reads the body up to `limit` bytes; past that, hands back what was read
/// and the rest of the stream so the client still gets all of it.
async fn read_limited<B: Body<Data = Bytes>>(body: B, limit: usize) -> Read<B> {
    // Trailers are not stored: a replay has none.
    if body
        .size_hint()
        .upper()
        .is_some_and(|upper| upper <= limit as u64)
    {
        // The body says it fits: read it in place, no box, no queue.
        let mut body = std::pin::pin!(body);
        let mut joined = Joined::default();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        joined.push(data);
                    }
                }
                Err(e) => return Read::Failed(e),
            }
        }
        // A body that broke its size hint was read in full anyway.
        return if joined.len() > limit {
            Read::Oversized(joined.into_bytes())
        } else {
            Read::Complete(joined.into_bytes())
        };
    }
    let mut body = Box::pin(body);
    let mut chunks = VecDeque::new();
    let mut len = 0usize;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Read::Failed(e),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    len += data.len();
                    chunks.push_back(data);
                    if len > limit {
                        return Read::TooLarge {
                            prefix: chunks,
                            rest: body,
                        };
                    }
                }
            }
        }
    }
    let mut joined = Joined::default();
    for c in chunks {
        joined.push(c);
    }
    Read::Complete(joined.into_bytes())
}

/// Built at compile time: `from_static` checks its input when run.
const IDEMPOTENT_REPLAYED: HeaderName =
    HeaderName::from_static(idempotency_core::IDEMPOTENT_REPLAYED);

fn replay_response<B: Body>(stored: &StoredResponse) -> Response<ResponseBody<B>> {
    let mut res = Response::new(ResponseBody::full(Bytes::new()));
    *res.status_mut() =
        StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = res.headers_mut();
    headers.reserve(stored.headers.len() + 2);
    for (name, value) in stored.replay_headers() {
        let parsed = if name == idempotency_core::IDEMPOTENT_REPLAYED {
            Ok(IDEMPOTENT_REPLAYED)
        } else {
            HeaderName::from_bytes(name.as_bytes())
        };
        match (parsed, HeaderValue::from_maybe_shared(value)) {
            (Ok(n), Ok(v)) => {
                headers.append(n, v);
            }
            _ => tracing::warn!(
                header = name,
                "stored header is not valid HTTP; left out of the replay"
            ),
        }
    }
    *res.body_mut() = ResponseBody::full(stored.body.clone());
    res
}

fn problem_response<B: Body>(problem: &Problem) -> Response<ResponseBody<B>> {
    let mut res = Response::new(ResponseBody::full(Bytes::from(problem.to_json())));
    *res.status_mut() = StatusCode::from_u16(problem.status()).unwrap_or(StatusCode::BAD_REQUEST);
    for (name, value) in problem.headers() {
        if let Ok(v) = HeaderValue::try_from(value) {
            res.headers_mut().insert(name, v);
        }
    }
    res
}
