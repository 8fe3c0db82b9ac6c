//! Body wrappers: tower's bodies as core's [`Chunks`], and core's
//! [`ResponseBody`](idempotency_core::ResponseBody) as an [`http_body::Body`].

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use idempotency_core::Chunks;
use pin_project_lite::pin_project;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

pin_project! {
    /// An [`http_body::Body`] as core reads it: its data frames.
    #[derive(Debug)]
    pub struct Frames<B> {
        #[pin]
        body: B,
    }
}

impl<B> Frames<B> {
    pub(crate) fn new(body: B) -> Self {
        Self { body }
    }
}

impl<B: Body<Data = Bytes>> Chunks for Frames<B> {
    type Error = B::Error;

    fn poll_chunk(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, B::Error>>> {
        let mut body = self.project().body;
        loop {
            match ready!(body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => return Poll::Ready(Some(Ok(data))),
                    Err(_trailers) => continue,
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => return Poll::Ready(None),
            }
        }
    }

    fn size_hint(&self) -> (u64, Option<u64>) {
        let hint = self.body.size_hint();
        (hint.lower(), hint.upper())
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

pin_project! {
    /// The request body the inner service sees: the original stream for
    /// requests that pass through, or the bytes read for the fingerprint.
    #[derive(Debug)]
    pub struct RequestBody<B: Body<Data = Bytes>> {
        #[pin]
        body: idempotency_core::ResponseBody<Frames<B>>,
    }
}

pin_project! {
    /// The response body the client gets: see
    /// [`ResponseBody`](idempotency_core::ResponseBody).
    #[derive(Debug)]
    pub struct ResponseBody<B: Body<Data = Bytes>> {
        #[pin]
        body: idempotency_core::ResponseBody<Frames<B>>,
    }
}

impl<B: Body<Data = Bytes>> RequestBody<B> {
    pub(crate) fn original(body: B) -> Self {
        Self {
            body: idempotency_core::ResponseBody::stream(Frames::new(body)),
        }
    }

    pub(crate) fn buffered(data: Bytes) -> Self {
        Self {
            body: idempotency_core::ResponseBody::full(data),
        }
    }
}

impl<B: Body<Data = Bytes>> ResponseBody<B> {
    pub(crate) fn new(body: idempotency_core::ResponseBody<Frames<B>>) -> Self {
        Self { body }
    }
}

/// One `http_body::Body` impl for both: frames of the handler's own stream
/// pass through whole (trailers too), everything else is data from core.
fn poll_frame<B: Body<Data = Bytes>>(
    mut body: Pin<&mut idempotency_core::ResponseBody<Frames<B>>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
    if let Some(stream) = body.as_mut().stream_mut() {
        return stream.project().body.poll_frame(cx);
    }
    body.poll_chunk(cx).map(|c| c.map(|r| r.map(Frame::data)))
}

fn size_hint<B: Body<Data = Bytes>>(body: &idempotency_core::ResponseBody<Frames<B>>) -> SizeHint {
    let (lower, upper) = body.size_hint();
    let mut hint = SizeHint::new();
    hint.set_lower(lower);
    if let Some(upper) = upper {
        hint.set_upper(upper);
    }
    hint
}

macro_rules! body_impl {
    ($name:ident) => {
        impl<B: Body<Data = Bytes>> Body for $name<B> {
            type Data = Bytes;
            type Error = B::Error;

            fn poll_frame(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
                poll_frame(self.project().body, cx)
            }

            fn is_end_stream(&self) -> bool {
                self.body.is_end_stream()
            }

            fn size_hint(&self) -> SizeHint {
                size_hint(&self.body)
            }
        }
    };
}
body_impl!(RequestBody);
body_impl!(ResponseBody);
