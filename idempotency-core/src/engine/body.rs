//! Step 2: bodies. A request body is read up to its limit (for the
//! fingerprint, and for the handler after); a response body is read up to
//! the storable limit, and what the client gets is a [`ResponseBody`].
//! Adapters hand both in as [`Chunks`].

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A body as a stream of data chunks: what an adapter makes of its
/// framework's body type, so that core reads every body the same way.
pub trait Chunks {
    /// The error of the underlying body.
    type Error;

    /// The next chunk of data, `None` at the end. Frames that are not data
    /// (trailers) are skipped.
    fn poll_chunk(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>>;

    /// The body's length in bytes: at least the first, at most the second
    /// when known.
    fn size_hint(&self) -> (u64, Option<u64>) {
        (0, None)
    }

    /// Whether nothing is left (a hint, as `http_body::Body::is_end_stream`).
    fn is_end_stream(&self) -> bool {
        self.size_hint().1 == Some(0)
    }

    /// The whole body at once, when it is already in memory.
    fn try_into_bytes(self) -> Result<Bytes, Self>
    where
        Self: Sized,
    {
        Err(self)
    }
}

/// Why a request body was not read.
#[derive(Debug)]
pub(super) enum ReadError<E> {
    TooLarge,
    /// It did not end within the bound.
    TimedOut,
    Failed(E),
}

/// Chunks joined into one `Bytes`, copying only when there is more than one.
#[derive(Default)]
struct Joined {
    first: Option<Bytes>,
    rest: Option<BytesMut>,
    len: usize,
}

impl Joined {
    fn push(&mut self, data: Bytes) {
        self.len += data.len();
        match (&self.first, &mut self.rest) {
            (None, _) => self.first = Some(data),
            (Some(_), Some(rest)) => rest.extend_from_slice(&data),
            (Some(first), None) => {
                let mut rest = BytesMut::with_capacity(self.len.max(1024));
                rest.extend_from_slice(first);
                rest.extend_from_slice(&data);
                self.rest = Some(rest);
            }
        }
    }

    fn into_bytes(self) -> Bytes {
        match self.rest {
            Some(rest) => rest.freeze(),
            None => self.first.unwrap_or_default(),
        }
    }
}

async fn next<S: Chunks>(body: &mut Pin<&mut S>) -> Option<Result<Bytes, S::Error>> {
    poll_fn(|cx| body.as_mut().poll_chunk(cx)).await
}

/// Reads a request body, refusing it past `limit` bytes or when it has not
/// ended within `bound`. A body of one chunk (the usual case) is kept as it
/// is, without copying; a body whole by its first poll is not timed.
pub(super) async fn read_request<S: Chunks>(
    body: S,
    limit: usize,
    bound: std::time::Duration,
) -> Result<Bytes, ReadError<S::Error>> {
    let body = match body.try_into_bytes() {
        Ok(bytes) if bytes.len() > limit => return Err(ReadError::TooLarge),
        Ok(bytes) => return Ok(bytes),
        Err(body) => body,
    };
    let read = async {
        let mut body = std::pin::pin!(body);
        let mut joined = Joined::default();
        while let Some(chunk) = next(&mut body).await {
            joined.push(chunk.map_err(ReadError::Failed)?);
            if joined.len > limit {
                return Err(ReadError::TooLarge);
            }
        }
        Ok(joined.into_bytes())
    };
    // Most bodies are whole by their first poll: they arm no timer (nor
    // read the clock).
    let mut read = std::pin::pin!(read);
    let first = poll_fn(|cx| match read.as_mut().poll(cx) {
        Poll::Ready(read) => Poll::Ready(Some(read)),
        Poll::Pending => Poll::Ready(None),
    });
    if let Some(read) = first.await {
        return read;
    }
    tokio::time::timeout(bound, read)
        .await
        .unwrap_or(Err(ReadError::TimedOut))
}

/// A handler's response body as read for storing.
pub(super) enum Read<S: Chunks> {
    /// Read in full, within the limit.
    Complete(Bytes),
    /// Over the limit: what was read, then the rest (`None`: all was read).
    TooLarge {
        prefix: VecDeque<Bytes>,
        rest: Option<Pin<Box<S>>>,
    },
    /// The body failed while it was read.
    Failed(S::Error),
}

/// Reads a response body up to `limit` bytes; past that, hands back what
/// was read and the rest of the stream so the client still gets all of it.
pub(super) async fn read_response<S: Chunks>(body: S, limit: usize) -> Read<S> {
    let (lower, upper) = body.size_hint();
    if lower > limit as u64 {
        return Read::TooLarge {
            prefix: VecDeque::new(),
            rest: Some(Box::pin(body)),
        };
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
    if upper.is_some_and(|upper| upper <= limit as u64) {
        // The body says it fits: read it in place, no box, no queue.
        let mut body = std::pin::pin!(body);
        let mut joined = Joined::default();
        while let Some(chunk) = next(&mut body).await {
            match chunk {
                Ok(data) => joined.push(data),
                Err(e) => return Read::Failed(e),
            }
        }
        // A body that broke its size hint was read in full anyway.
        let oversized = joined.len > limit;
        let bytes = joined.into_bytes();
        return if oversized {
            Read::TooLarge {
                prefix: VecDeque::from([bytes]),
                rest: None,
            }
        } else {
            Read::Complete(bytes)
        };
    }
    let mut boxed = Box::pin(body);
    let mut chunks = VecDeque::new();
    let mut len = 0usize;
    loop {
        match next(&mut boxed.as_mut()).await {
            None => break,
            Some(Err(e)) => return Read::Failed(e),
            Some(Ok(data)) => {
                len += data.len();
                chunks.push_back(data);
                if len > limit {
                    return Read::TooLarge {
                        prefix: chunks,
                        rest: Some(boxed),
                    };
                }
            }
        }
    }
    let mut joined = Joined::default();
    chunks.into_iter().for_each(|c| joined.push(c));
    Read::Complete(joined.into_bytes())
}

pin_project_lite::pin_project! {
    /// The response body a client gets from a covered request: the
    /// handler's own stream (passed through, or not stored), a body held in
    /// full (stored, replayed, or a problem), or a body too large to store
    /// (what was read, then the rest of the stream). Adapters wrap it in
    /// their framework's body trait.
    pub struct ResponseBody<S: Chunks> {
        #[pin]
        kind: Kind<S>,
    }
}

pin_project_lite::pin_project! {
    #[project = KindProj]
    enum Kind<S: Chunks> {
        Stream { #[pin] body: S },
        Full { data: Option<Bytes>, len: u64 },
        Chain { prefix: VecDeque<Bytes>, rest: Pin<Box<S>> },
        Failed { error: Option<S::Error> },
    }
}

impl<S: Chunks> ResponseBody<S> {
    /// The handler's own body, untouched.
    pub fn stream(body: S) -> Self {
        Self {
            kind: Kind::Stream { body },
        }
    }

    /// A body held in full.
    pub fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                len: data.len() as u64,
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(super) fn chain(prefix: VecDeque<Bytes>, rest: Pin<Box<S>>) -> Self {
        Self {
            kind: Kind::Chain { prefix, rest },
        }
    }

    pub(super) fn failed(error: S::Error) -> Self {
        Self {
            kind: Kind::Failed { error: Some(error) },
        }
    }

    /// The next chunk.
    pub fn poll_chunk(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, S::Error>>> {
        match self.project().kind.project() {
            KindProj::Stream { body } => body.poll_chunk(cx),
            KindProj::Full { data, .. } => Poll::Ready(data.take().map(Ok)),
            KindProj::Chain { prefix, rest } => match prefix.pop_front() {
                Some(d) => Poll::Ready(Some(Ok(d))),
                None => rest.as_mut().poll_chunk(cx),
            },
            KindProj::Failed { error } => Poll::Ready(error.take().map(Err)),
        }
    }

    /// The handler's stream, once all that core holds of the body was
    /// sent: an adapter polls it itself to pass on what is not data
    /// (trailers). `None` while core still has data to send.
    pub fn stream_mut(self: Pin<&mut Self>) -> Option<Pin<&mut S>> {
        match self.project().kind.project() {
            KindProj::Stream { body } => Some(body),
            KindProj::Chain { prefix, rest } if prefix.is_empty() => Some(rest.as_mut()),
            _ => None,
        }
    }

    /// The handler's own stream, when the body is that stream untouched.
    pub fn stream_ref(&self) -> Option<&S> {
        match &self.kind {
            Kind::Stream { body } => Some(body),
            _ => None,
        }
    }

    /// The length in bytes, as in [`Chunks::size_hint`].
    pub fn size_hint(&self) -> (u64, Option<u64>) {
        match &self.kind {
            Kind::Stream { body } => body.size_hint(),
            Kind::Full { len, .. } => (*len, Some(*len)),
            Kind::Chain { prefix, rest } => {
                let n: u64 = prefix.iter().map(|b| b.len() as u64).sum();
                let (lower, upper) = rest.size_hint();
                (lower + n, upper.map(|u| u + n))
            }
            Kind::Failed { .. } => (0, None),
        }
    }

    /// Whether nothing is left to send.
    pub fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Stream { body } => body.is_end_stream(),
            Kind::Full { data, .. } => data.is_none(),
            Kind::Chain { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
            Kind::Failed { error } => error.is_none(),
        }
    }

    /// The whole body, when it is in memory.
    pub fn try_into_bytes(self) -> Result<Bytes, Self> {
        match self.kind {
            Kind::Stream { body } => body.try_into_bytes().map_err(Self::stream),
            Kind::Full { data, .. } => Ok(data.unwrap_or_default()),
            kind => Err(Self { kind }),
        }
    }
}

impl<S: Chunks> std::fmt::Debug for ResponseBody<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Stream { .. } => "stream",
            Kind::Full { .. } => "full",
            Kind::Chain { .. } => "chain",
            Kind::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}
