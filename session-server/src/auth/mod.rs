//! Optional caller authentication by static bearer tokens, for deployments
//! without mutual TLS: a tower layer in front of every service but health.
//!
//! Tokens are read from AUTH_TOKENS_FILE (one per line; blank lines and lines
//! starting with `#` are ignored) and reloaded when the file changes or on
//! SIGHUP. Each call must send `authorization: Bearer <token>` (the scheme in
//! any case, RFC 6750); a missing or wrong token gets UNAUTHENTICATED before
//! the call takes a concurrency permit or reaches a service, reflection
//! included. Health is not behind this check: probes carry no token.
//!
//! Tokens are kept only as SHA-256 digests and a presented token is compared,
//! digest to digest, with every accepted one in constant time: equal lengths,
//! so neither which token matched nor how long the tokens are shows in the
//! timing. Tokens are never logged.
//!
//! Rewriting the file: write a new file and rename it over the old one (what
//! Kubernetes does for a mounted Secret). A file rewritten in place is
//! defended against, not supported: a reload installs a file only when its
//! size, modification time (and inode) were the same on two checks one
//! reload interval apart and did not change while it was read, so a writer
//! caught mid-write is waited for rather than installed. A file that holds no
//! token means "refuse every call" (revoking every token after a leak); one
//! that cannot be read keeps the previous tokens and counts in
//! `sessionstore_auth_tokens_reload_failures_total`.
//!
//! A streaming call (WatchRevocations, reflection) is checked when it opens
//! like any other, and then ends, with UNAUTHENTICATED in its trailers, as
//! soon as a reload removes the token it opened with: revoking a token stops
//! what it is streaming, not only its next call. Each accepted token carries
//! a signal for this, kept with the token set, that only streaming calls
//! subscribe to (which methods stream, the method table says); a
//! reload keeps the signal of every token still in the file, so the streams
//! of those are untouched, and fires the signals of the tokens it removed. A
//! reload that fails keeps every token, and so every stream; a file emptied
//! removes every token, and so ends every stream. A unary call pays only
//! the lookup of its path in the method table ([`crate::methods`]): no
//! allocation, no lock beyond the token check's.

mod tokens;

use self::tokens::TOKEN_REMOVED;
pub use self::tokens::{AuthError, Tokens};

use std::{
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http_body::Frame;
use tokio::sync::watch;
use tonic::{
    Status,
    body::Body,
    codegen::{
        Bytes,
        http::{HeaderMap, Request, Response},
    },
};
use tower::{
    Layer, Service,
    util::{Either, future::EitherResponseFuture},
};

use crate::methods::Methods;

/// Puts [`Tokens`] in front of a service stack, or nothing when
/// AUTH_TOKENS_FILE is unset (one layer type either way, so the server's
/// type does not depend on the configuration).
#[derive(Clone, Debug)]
pub struct AuthLayer {
    guard: Option<Arc<Guard>>,
}

/// What [`Auth`] checks calls against; one `Arc`, so the per-call clone of
/// the service stack costs one reference count.
#[derive(Debug)]
struct Guard {
    tokens: Tokens,
    /// Which calls are health's (no token needed) and which stream (their
    /// answers end when their token is removed).
    methods: &'static Methods,
}

impl AuthLayer {
    /// Requires one of `tokens` on every call but health, and ends a
    /// streaming call with UNAUTHENTICATED when a reload removes the token
    /// it was opened with; `None` lets every call through. Which calls are
    /// health's and which stream, `methods` says.
    pub fn new(tokens: Option<Tokens>, methods: &'static Methods) -> Self {
        Self {
            guard: tokens.map(|tokens| Arc::new(Guard { tokens, methods })),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            guard: self.guard.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    guard: Option<Arc<Guard>>,
}

/// A call's answer.
type Answer<E> = Result<Response<Body>, E>;

/// The future of an accepted streaming call: boxed, as only streams pay it.
type StreamFuture<E> = Pin<Box<dyn Future<Output = Answer<E>> + Send>>;

impl<S, ReqBody> Service<Request<ReqBody>> for Auth<S>
where
    S: Service<Request<ReqBody>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    // A unary call's inner future as it is, not boxed: one allocation less
    // per call.
    type Future = EitherResponseFuture<
        std::future::Ready<Answer<S::Error>>,
        EitherResponseFuture<S::Future, StreamFuture<S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let checked = match &self.guard {
            None => Ok(None),
            Some(guard) => {
                let method = guard.methods.resolve(request.uri().path());
                if method.is_health() {
                    Ok(None)
                } else if method.is_streaming() {
                    guard.tokens.check_stream(request.headers()).map(Some)
                } else {
                    guard.tokens.check(request.headers()).map(|()| None)
                }
            }
        };
        let inner = match checked {
            Ok(None) => Either::Left(&mut self.inner),
            Ok(Some(removed)) => Either::Right(UntilRemovedService {
                inner: &mut self.inner,
                removed,
            }),
            Err(status) => {
                let mut refusal = Either::<_, Either<&mut S, UntilRemovedService<'_, S>>>::Left(
                    Refusal(status.into_http(), PhantomData),
                );
                return refusal.call(request);
            }
        };
        Either::<Refusal<Self::Response, Self::Error>, _>::Right(inner).call(request)
    }
}

/// Calls the service below for a streaming call, and wraps its answer in
/// [`UntilRemoved`]: the accepted-stream side of [`Auth`]'s future.
struct UntilRemovedService<'a, S> {
    inner: &'a mut S,
    removed: watch::Receiver<bool>,
}

impl<S, R> Service<R> for UntilRemovedService<'_, S>
where
    S: Service<R, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = StreamFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let response = self.inner.call(request);
        let removed = self.removed.clone();
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Body::new(UntilRemoved::new(body, removed))))
        })
    }
}

/// A streaming call's response body, ended with UNAUTHENTICATED (as its
/// trailers, between two messages, never inside one) once a reload removes
/// the token the call was opened with.
struct UntilRemoved {
    inner: Body,
    /// Completes when the token is removed; never, if the tokens are dropped
    /// without removing it (the server is over).
    removed: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Trailers end a gRPC response; nothing may follow them.
    ended: bool,
}

impl std::fmt::Debug for UntilRemoved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UntilRemoved")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl UntilRemoved {
    fn new(inner: Body, mut removed: watch::Receiver<bool>) -> Self {
        Self {
            inner,
            removed: Box::pin(async move {
                if removed.wait_for(|removed| *removed).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }),
            ended: false,
        }
    }
}

impl http_body::Body for UntilRemoved {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        // `UntilRemoved` is `Unpin`: its fields are.
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        // First, so nothing more is sent once the token is gone, even from a
        // stream that always has a message ready.
        if this.removed.as_mut().poll(cx).is_ready() {
            this.ended = true;
            // Dropping the inner body ends the stream's work and gives back
            // its stream permit.
            this.inner = Body::empty();
            let mut trailers = HeaderMap::new();
            // A code and an ASCII message always make valid headers.
            let _ = Status::unauthenticated(TOKEN_REMOVED).add_header(&mut trailers);
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) if !frame.is_trailers() => {}
            _ => this.ended = true,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.ended {
            http_body::SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}

/// Answers with the refusal it holds, without calling the service below: the
/// refused side of [`Auth`]'s future.
struct Refusal<T, E>(T, PhantomData<fn() -> E>);

impl<R, T: Default, E> Service<R> for Refusal<T, E> {
    type Response = T;
    type Error = E;
    type Future = std::future::Ready<Result<T, E>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), E>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: R) -> Self::Future {
        // Made for one call: nothing is left behind that is used again.
        std::future::ready(Ok(std::mem::take(&mut self.0)))
    }
}

#[cfg(test)]
mod tests;
