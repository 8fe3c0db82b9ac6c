//! Body wrappers: actix's payloads and bodies as core's [`Chunks`], and
//! core's [`ResponseBody`](idempotency_core::ResponseBody) as a [`MessageBody`].

use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::Payload;
use actix_web::error::PayloadError;
use bytes::Bytes;
use futures_util::Stream;
use idempotency_core::Chunks;
use pin_project_lite::pin_project;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The request payload as core reads it, borrowed: the service keeps it,
/// to hold it until an answer that closes the connection is sent.
pub(crate) struct PayloadChunks<'a>(pub(crate) &'a mut Payload);

impl Chunks for PayloadChunks<'_> {
    type Error = PayloadError;

    fn poll_chunk(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, PayloadError>>> {
        Pin::new(&mut *self.get_mut().0).poll_next(cx)
    }
}

pin_project! {
    /// A [`MessageBody`] as core reads it.
    #[derive(Debug)]
    pub struct Message<B> {
        #[pin]
        body: B,
    }
}

impl<B> Message<B> {
    pub(crate) fn new(body: B) -> Self {
        Self { body }
    }
}

impl<B: MessageBody> Chunks for Message<B> {
    type Error = B::Error;

    fn poll_chunk(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, B::Error>>> {
        self.project().body.poll_next(cx)
    }

    fn size_hint(&self) -> (u64, Option<u64>) {
        match self.body.size() {
            BodySize::None => (0, Some(0)),
            BodySize::Sized(n) => (n, Some(n)),
            BodySize::Stream => (0, None),
        }
    }

    fn try_into_bytes(self) -> Result<Bytes, Self> {
        self.body.try_into_bytes().map_err(Self::new)
    }
}

pin_project! {
    /// The response body the client gets: see
    /// [`ResponseBody`](idempotency_core::ResponseBody).
    pub struct ResponseBody<B: MessageBody> {
        #[pin]
        body: idempotency_core::ResponseBody<Message<B>>,
        // The request payload, unread, held until this is sent: actix then
        // closes the connection rather than draining a chunked body that
        // may never end (a 408).
        held: Option<Payload>,
    }
}

impl<B: MessageBody> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("body", &self.body)
            .field("holds_payload", &self.held.is_some())
            .finish()
    }
}

impl<B: MessageBody> ResponseBody<B> {
    pub(crate) fn new(body: idempotency_core::ResponseBody<Message<B>>) -> Self {
        Self { body, held: None }
    }

    /// Holds the request's unread `payload` until this body is dropped.
    pub(crate) fn holding(mut self, payload: Payload) -> Self {
        self.held = Some(payload);
        self
    }
}

impl<B: MessageBody> MessageBody for ResponseBody<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        if let Some(handler) = self.body.stream_ref() {
            return handler.body.size();
        }
        match self.body.size_hint() {
            (lower, Some(upper)) if lower == upper => BodySize::Sized(lower),
            _ => BodySize::Stream,
        }
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        self.project().body.poll_chunk(cx)
    }

    fn try_into_bytes(self) -> Result<Bytes, Self> {
        if self.held.is_some() {
            // As bytes, the payload would be dropped before the answer is sent.
            return Err(self);
        }
        self.body.try_into_bytes().map_err(Self::new)
    }
}
