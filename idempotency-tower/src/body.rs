//! Body wrappers.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project! {
    /// The request body the inner service sees: the original stream for
    /// requests that pass through, or the bytes read for the fingerprint.
    #[derive(Debug)]
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    #[derive(Debug)]
    enum RequestKind<B> {
        Original { #[pin] body: B },
        Buffered { data: Option<Bytes> },
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn original(body: B) -> Self {
        Self {
            kind: RequestKind::Original { body },
        }
    }

    pub(crate) fn buffered(data: Bytes) -> Self {
        Self {
            kind: RequestKind::Buffered {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl<B: Body<Data = Bytes>> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            RequestKindProj::Original { body } => body.poll_frame(cx),
            RequestKindProj::Buffered { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Original { body } => body.is_end_stream(),
            RequestKind::Buffered { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Original { body } => body.size_hint(),
            RequestKind::Buffered { data } => exact(data),
        }
    }
}

fn exact(data: &Option<Bytes>) -> SizeHint {
    SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
}

pin_project! {
    /// The response body the client gets: the handler's own stream, a body
    /// held in full (stored, replayed, or a problem), or a body too large to
    /// store (what was read, then the rest of the stream).
    pub struct ResponseBody<B: Body> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B: Body> {
        Inner { #[pin] body: B },
        Full { data: Option<Bytes> },
        Chain { prefix: VecDeque<Bytes>, rest: Pin<Box<B>> },
        Failed { error: Option<B::Error> },
    }
}

impl<B: Body> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            ResponseKind::Inner { .. } => "inner",
            ResponseKind::Full { .. } => "full",
            ResponseKind::Chain { .. } => "chain",
            ResponseKind::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: ResponseKind::Inner { body },
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: ResponseKind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn chain(prefix: VecDeque<Bytes>, rest: Pin<Box<B>>) -> Self {
        Self {
            kind: ResponseKind::Chain { prefix, rest },
        }
    }

    pub(crate) fn failed(error: B::Error) -> Self {
        Self {
            kind: ResponseKind::Failed { error: Some(error) },
        }
    }
}

impl<B: Body<Data = Bytes>> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            ResponseKindProj::Inner { body } => body.poll_frame(cx),
            ResponseKindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseKindProj::Chain { prefix, rest } => match prefix.pop_front() {
                Some(d) => Poll::Ready(Some(Ok(Frame::data(d)))),
                None => rest.as_mut().poll_frame(cx),
            },
            ResponseKindProj::Failed { error } => Poll::Ready(error.take().map(Err)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Inner { body } => body.is_end_stream(),
            ResponseKind::Full { data } => data.is_none(),
            ResponseKind::Chain { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
            ResponseKind::Failed { error } => error.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Inner { body } => body.size_hint(),
            ResponseKind::Full { data } => exact(data),
            ResponseKind::Chain { prefix, rest } => {
                let n: u64 = prefix.iter().map(|b| b.len() as u64).sum();
                let r = rest.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(r.lower() + n);
                if let Some(u) = r.upper() {
                    h.set_upper(u + n);
                }
                h
            }
            ResponseKind::Failed { .. } => SizeHint::default(),
        }
    }
}
