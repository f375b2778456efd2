//! Ending open streams when the server closes its listener, so the drain waits
//! only for calls that end by themselves.
//!
//! A graceful HTTP/2 shutdown lets every open stream run to its end, and a
//! health `Watch`, a reflection session or any other server stream has none:
//! without this, one idle `grpcurl` or a load balancer's health watch would
//! hold the drain for its whole timeout. [`EndStreamsLayer`] wraps both
//! bodies of every call. Once the shutdown sequence signals that the
//! listener is closing, a body that is waiting for its next message ends
//! instead, with UNAVAILABLE ("server is shutting down"), which tells the
//! caller to retry elsewhere: a response body sends that status as its
//! trailers; a request body (a caller still streaming in, as reflection's
//! does) fails with it, so the handler stops reading and lets the stream go.
//! A message being sent is never cut. A unary call is not touched: its
//! handler has read the whole request before it answers, and its answer
//! never waits, so it finishes in the drain; only a request still arriving
//! when the listener closes fails, unexecuted.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::watch;
use tonic::{
    body::Body,
    codegen::{
        Bytes,
        http::{HeaderMap, Request, Response},
    },
};
use tower::{Layer, Service};

/// The message open streams end with.
const SHUTTING_DOWN: &str = "server is shutting down";

/// Wraps response bodies so they end when `closing` turns true (or its sender
/// is dropped).
#[derive(Clone, Debug)]
pub(crate) struct EndStreamsLayer {
    closing: watch::Receiver<bool>,
}

impl EndStreamsLayer {
    /// Ends open streams once `closing` is true.
    pub(crate) fn new(closing: watch::Receiver<bool>) -> Self {
        Self { closing }
    }
}

impl<S> Layer<S> for EndStreamsLayer {
    type Service = EndStreams<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EndStreams {
            inner,
            closing: self.closing.clone(),
        }
    }
}

/// The service made by [`EndStreamsLayer`].
#[derive(Clone, Debug)]
pub(crate) struct EndStreams<S> {
    inner: S,
    closing: watch::Receiver<bool>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for EndStreams<S>
where
    S: Service<Request<Body>, Response = Response<ResBody>>,
    ReqBody: HttpBody<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<tonic::codegen::StdError>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = Response<EndAtShutdown>;
    type Error = S::Error;
    type Future = EndStreamsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // Set when shutdown cuts this call's request: a handler that then
        // stops (reflection does) ends its answer with OK, which must reach
        // the caller (and the metrics) as the UNAVAILABLE it really is.
        let cut = Arc::new(AtomicBool::new(false));
        let request = request.map(|body| {
            // The services below take tonic's body type, hence the box.
            Body::new(EndAtShutdown::new(
                Body::new(body),
                self.closing.clone(),
                End::Fail,
                Arc::clone(&cut),
            ))
        });
        EndStreamsFuture {
            inner: self.inner.call(request),
            end: Some((self.closing.clone(), cut)),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`EndStreams`]: wraps the answer's body once it
    /// comes. Not boxed: it is polled inside the future of the layer around
    /// it.
    #[derive(Debug)]
    pub(crate) struct EndStreamsFuture<F> {
        #[pin]
        inner: F,
        // What the answer's body needs; `None` once the answer has come.
        end: Option<(watch::Receiver<bool>, Arc<AtomicBool>)>,
    }
}

impl<F, B, E> Future for EndStreamsFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Output = Result<Response<EndAtShutdown>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        // Taken only here, when the future completes; a future may not be
        // polled after that (the `Future` contract), so it is still there.
        let (closing, cut) = this
            .end
            .take()
            .expect("EndStreamsFuture polled after completion");
        // `Body::new` keeps a tonic body as it is (no new allocation).
        Poll::Ready(Ok(response.map(|body| {
            EndAtShutdown::new(Body::new(body), closing, End::Trailers, cut)
        })))
    }
}

/// How a body that is cut short ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// A response: UNAVAILABLE as its trailers, the gRPC way to end a call.
    Trailers,
    /// A request: an UNAVAILABLE error, which the handler reads as a broken
    /// stream, not as a complete one, so it cannot act on partial input.
    Fail,
}

/// A body that ends with UNAVAILABLE when the server starts closing while it
/// waits for its next frame.
#[derive(Debug)]
pub(crate) struct EndAtShutdown {
    inner: Body,
    closing: watch::Receiver<bool>,
    end: End,
    /// Made the first time the body has to wait: most bodies (unary answers)
    /// never do, and so never allocate it.
    closed: Option<Closed>,
    /// The body has been cut short.
    ended: bool,
    /// Shared by a call's request and response: the request was cut.
    cut: Arc<AtomicBool>,
}

/// Completes when the listener starts closing.
struct Closed(Pin<Box<dyn Future<Output = ()> + Send>>);

impl std::fmt::Debug for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Closed").finish_non_exhaustive()
    }
}

impl EndAtShutdown {
    fn new(inner: Body, closing: watch::Receiver<bool>, end: End, cut: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            closing,
            end,
            closed: None,
            ended: false,
            cut,
        }
    }

    /// Ends the body with UNAVAILABLE, as its end kind does.
    fn cut_short(&mut self) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        self.ended = true;
        let status = tonic::Status::unavailable(SHUTTING_DOWN);
        Poll::Ready(Some(match self.end {
            End::Trailers => {
                let mut trailers = HeaderMap::new();
                // A code and an ASCII message always make valid headers.
                let _ = status.add_header(&mut trailers);
                Ok(Frame::trailers(trailers))
            }
            End::Fail => {
                self.cut.store(true, Ordering::Release);
                Err(status)
            }
        }))
    }
}

impl HttpBody for EndAtShutdown {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        // `EndAtShutdown` is `Unpin`: its fields are.
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            // The answer ends (trailers, or no more frames) after shutdown
            // cut its request: whatever the handler said, the call was cut.
            Poll::Ready(frame)
                if this.end == End::Trailers
                    && this.cut.load(Ordering::Acquire)
                    && frame
                        .as_ref()
                        .is_none_or(|f| f.as_ref().is_ok_and(Frame::is_trailers)) =>
            {
                return this.cut_short();
            }
            Poll::Ready(frame) => return Poll::Ready(frame),
            Poll::Pending => {}
        }
        let closing = &this.closing;
        let closed = this.closed.get_or_insert_with(|| {
            let mut closing = closing.clone();
            Closed(Box::pin(async move {
                // An error means the sender is gone: the server is over.
                let _ = closing.wait_for(|closing| *closing).await;
            }))
        });
        if closed.0.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.cut_short()
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.ended {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Code;

    use super::*;

    /// A test body: sends `frames`, then waits forever when `endless`, else
    /// ends.
    struct Scripted {
        frames: Vec<&'static str>,
        endless: bool,
    }

    impl HttpBody for Scripted {
        type Data = Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
            let this = self.get_mut();
            if this.frames.is_empty() {
                return if this.endless {
                    Poll::Pending
                } else {
                    Poll::Ready(None)
                };
            }
            let data = this.frames.remove(0);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(data.as_bytes())))))
        }
    }

    async fn next(body: &mut EndAtShutdown) -> Option<Result<Frame<Bytes>, tonic::Status>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    fn wrapped(frames: Vec<&'static str>, endless: bool) -> (watch::Sender<bool>, EndAtShutdown) {
        let (close, closing) = watch::channel(false);
        let body = Body::new(Scripted { frames, endless });
        (
            close,
            EndAtShutdown::new(body, closing, End::Trailers, Arc::default()),
        )
    }

    /// A waiting stream ends with UNAVAILABLE once the listener closes, after
    /// the frames it had.
    #[tokio::test]
    async fn a_waiting_stream_ends_when_closing() {
        let (close, mut body) = wrapped(vec!["first"], true);
        let first = next(&mut body).await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "first");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), next(&mut body))
                .await
                .is_err(),
            "the stream ended before the server closed"
        );
        close.send(true).unwrap();
        let last = next(&mut body).await.unwrap().unwrap();
        let trailers = last.into_trailers().unwrap();
        let status = tonic::Status::from_header_map(&trailers).unwrap();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), SHUTTING_DOWN);
        assert!(next(&mut body).await.is_none());
        assert!(body.is_end_stream());
    }

    /// A body that does not wait is passed through whole, closing or not.
    #[tokio::test]
    async fn an_answer_that_does_not_wait_is_untouched() {
        let (close, mut body) = wrapped(vec!["one", "two"], false);
        close.send(true).unwrap();
        assert_eq!(
            next(&mut body).await.unwrap().unwrap().into_data().unwrap(),
            "one"
        );
        assert_eq!(
            next(&mut body).await.unwrap().unwrap().into_data().unwrap(),
            "two"
        );
        assert!(next(&mut body).await.is_none());
        let (_close, closing) = watch::channel(true);
        let refusal = tonic::Status::not_found("x")
            .into_http::<Body>()
            .into_body();
        assert!(
            EndAtShutdown::new(refusal, closing, End::Trailers, Arc::default()).is_end_stream()
        );
    }

    /// A request still streaming in fails, rather than looking complete.
    #[tokio::test]
    async fn a_waiting_request_fails_when_closing() {
        let (close, closing) = watch::channel(false);
        let body = Body::new(Scripted {
            frames: vec!["part"],
            endless: true,
        });
        let mut body = EndAtShutdown::new(body, closing, End::Fail, Arc::default());
        assert!(next(&mut body).await.unwrap().is_ok());
        close.send(true).unwrap();
        let error = next(&mut body).await.unwrap().unwrap_err();
        assert_eq!(error.code(), Code::Unavailable);
        assert!(next(&mut body).await.is_none());
    }

    /// An answer that ends by itself, with OK, because shutdown cut its
    /// request (reflection stops when its request stream fails) reaches the
    /// caller as UNAVAILABLE; an answer of a call whose request was not cut
    /// keeps its own ending.
    #[tokio::test]
    async fn an_answer_ending_after_its_request_was_cut_is_unavailable() {
        let (close, closing) = watch::channel(false);
        let cut = Arc::new(AtomicBool::new(false));
        let request = Body::new(Scripted {
            frames: vec![],
            endless: true,
        });
        let mut request = EndAtShutdown::new(request, closing.clone(), End::Fail, Arc::clone(&cut));
        let answer = Body::new(Scripted {
            frames: vec!["reply"],
            endless: false,
        });
        let mut answer = EndAtShutdown::new(answer, closing.clone(), End::Trailers, cut);
        assert!(next(&mut answer).await.unwrap().is_ok());
        close.send(true).unwrap();
        assert_eq!(
            next(&mut request).await.unwrap().unwrap_err().code(),
            Code::Unavailable
        );
        let last = next(&mut answer).await.unwrap().unwrap();
        let trailers = last.into_trailers().unwrap();
        assert_eq!(trailers["grpc-status"], "14", "{trailers:?}");
        assert!(next(&mut answer).await.is_none());

        // Not cut: the answer's own end stands, even while closing.
        let answer = Body::new(Scripted {
            frames: vec![],
            endless: false,
        });
        let mut answer = EndAtShutdown::new(answer, closing, End::Trailers, Arc::default());
        assert!(next(&mut answer).await.is_none());
    }

    /// A stream also ends when the shutdown sequence is gone (the server is
    /// over), not only when told.
    #[tokio::test]
    async fn a_stream_ends_when_the_server_is_gone() {
        let (close, mut body) = wrapped(vec![], true);
        drop(close);
        let last = next(&mut body).await.unwrap().unwrap();
        assert!(last.is_trailers());
    }
}
