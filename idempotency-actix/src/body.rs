//! The response body.

use actix_web::body::{BodySize, MessageBody};
use bytes::Bytes;
use pin_project_lite::pin_project;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project! {
    /// The response body the client gets: the handler's own body, a body
    /// held in full (stored, replayed, or a problem), or a body too large to
    /// store (what was read, then the rest of the stream).
    pub struct ResponseBody<B: MessageBody> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B: MessageBody> {
        Inner { #[pin] body: B },
        Full { data: Option<Bytes>, len: u64 },
        Chain { prefix: VecDeque<Bytes>, rest: Pin<Box<B>> },
        Failed { error: Option<B::Error> },
    }
}

impl<B: MessageBody> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Inner { .. } => "inner",
            Kind::Full { .. } => "full",
            Kind::Chain { .. } => "chain",
            Kind::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}

impl<B: MessageBody> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                len: data.len() as u64,
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn chain(prefix: VecDeque<Bytes>, rest: Pin<Box<B>>) -> Self {
        Self {
            kind: Kind::Chain { prefix, rest },
        }
    }

    pub(crate) fn failed(error: B::Error) -> Self {
        Self {
            kind: Kind::Failed { error: Some(error) },
        }
    }
}

impl<B: MessageBody> MessageBody for ResponseBody<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        match &self.kind {
            Kind::Inner { body } => body.size(),
            Kind::Full { len, .. } => BodySize::Sized(*len),
            Kind::Chain { prefix, rest } => {
                let n: u64 = prefix.iter().map(|b| b.len() as u64).sum();
                match rest.size() {
                    BodySize::None => BodySize::Sized(n),
                    BodySize::Sized(r) => BodySize::Sized(n + r),
                    BodySize::Stream => BodySize::Stream,
                }
            }
            Kind::Failed { .. } => BodySize::Stream,
        }
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_next(cx),
            KindProj::Full { data, .. } => Poll::Ready(data.take().map(Ok)),
            KindProj::Chain { prefix, rest } => match prefix.pop_front() {
                Some(d) => Poll::Ready(Some(Ok(d))),
                None => rest.as_mut().poll_next(cx),
            },
            KindProj::Failed { error } => Poll::Ready(error.take().map(Err)),
        }
    }

    fn try_into_bytes(self) -> Result<Bytes, Self> {
        match self.kind {
            Kind::Inner { body } => body.try_into_bytes().map_err(Self::inner),
            Kind::Full { data, .. } => Ok(data.unwrap_or_default()),
            kind => Err(Self { kind }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::{to_bytes, BodyStream};
    use futures_util::stream;

    #[actix_web::test]
    async fn chain_yields_the_prefix_then_the_rest_and_sums_sizes() {
        let rest = Box::pin(Bytes::from_static(b"cd"));
        let body = ResponseBody::chain(VecDeque::from([Bytes::from_static(b"ab")]), rest);
        assert_eq!(body.size(), BodySize::Sized(4));
        assert_eq!(to_bytes(body).await.ok(), Some(Bytes::from_static(b"abcd")));
        let streamed = BodyStream::new(stream::iter([Ok::<_, std::io::Error>(
            Bytes::from_static(b"x"),
        )]));
        let body = ResponseBody::chain(VecDeque::new(), Box::pin(streamed));
        assert_eq!(body.size(), BodySize::Stream);
    }

    #[actix_web::test]
    async fn full_and_failed() {
        let full = ResponseBody::<()>::full(Bytes::from_static(b"hello"));
        assert_eq!(full.size(), BodySize::Sized(5));
        assert_eq!(
            full.try_into_bytes().ok(),
            Some(Bytes::from_static(b"hello"))
        );
        let empty = ResponseBody::<()>::full(Bytes::new());
        assert_eq!(empty.size(), BodySize::Sized(0));
        assert_eq!(to_bytes(empty).await.ok(), Some(Bytes::new()));
        type Streamed = BodyStream<stream::Empty<Result<Bytes, std::io::Error>>>;
        let failed = ResponseBody::<Streamed>::failed(std::io::Error::other("boom"));
        assert_eq!(failed.size(), BodySize::Stream);
        assert!(to_bytes(failed).await.is_err());
    }
}
