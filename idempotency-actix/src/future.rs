//! The response future.

use actix_web::body::MessageBody;
use actix_web::dev::ServiceResponse;
use idempotency_core::DetachOnDrop;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::body::ResponseBody;

type Output<B> = Result<ServiceResponse<ResponseBody<B>>, actix_web::Error>;

pin_project! {
    /// The future of [`IdempotencyService`](crate::IdempotencyService).
    /// Requests that pass through are not boxed.
    pub struct ResponseFuture<F, B: MessageBody> {
        #[pin]
        kind: Kind<F, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B: MessageBody> {
        PassThrough { #[pin] future: F },
        Ready { response: Option<ServiceResponse<ResponseBody<B>>> },
        Guarded { future: DetachOnDrop<dyn Future<Output = Output<B>>> },
    }
}

impl<F, B: MessageBody> ResponseFuture<F, B> {
    pub(crate) fn pass_through(future: F) -> Self {
        Self {
            kind: Kind::PassThrough { future },
        }
    }

    pub(crate) fn ready(response: ServiceResponse<ResponseBody<B>>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    pub(crate) fn guarded(future: DetachOnDrop<dyn Future<Output = Output<B>>>) -> Self {
        Self {
            kind: Kind::Guarded { future },
        }
    }
}

impl<F, B> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<ServiceResponse<B>, actix_web::Error>>,
    B: MessageBody,
{
    type Output = Output<B>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::PassThrough { future } => future
                .poll(cx)
                .map(|r| r.map(|res| res.map_body(|_, b| ResponseBody::inner(b)))),
            KindProj::Ready { response } => match response.take() {
                Some(r) => Poll::Ready(Ok(r)),
                None => panic!("ResponseFuture polled after completion"),
            },
            KindProj::Guarded { future } => Pin::new(future).poll(cx),
        }
    }
}

impl<F, B: MessageBody> std::fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
