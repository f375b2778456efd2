//! [`RequireSessionLayer`]: tower middleware (feature `tower`) that lets a
//! request through only while its session is live in SessionStore, for axum,
//! tonic and any other tower stack. It answers what the auth flow must answer
//! in one place: 401 (or gRPC UNAUTHENTICATED) for a session that is missing,
//! expired or revoked, 503 (or UNAVAILABLE) when SessionStore cannot answer.
//!
//! It checks sessions, not JWTs: the caller's own middleware, placed before
//! it, verifies the JWT's signature and expiry and leaves the claims in the
//! request's extensions; the layer's extractor reads `(user_id, token_id)`
//! (the JWT's `sub` and `jti`) from there.
//!
//! Allocation: on a near-cache hit the layer adds none of its own: the
//! extractor borrows the ids, the lookup is synchronous, and the inner
//! service's future is returned as it is (no box). What is allocated is the
//! lookup's answer (the cloned [`Session`]) and its slot in the request's
//! extensions. A miss (and every request of a client without the near-cache)
//! makes a gRPC call, which allocates the request's two ids and one boxed
//! future besides what tonic allocates.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header, request::Parts};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::{client::SessionClient, error::Error, near_cache::CompactSession, types::Session};

/// The longest user or token id SessionStore accepts (its `MAX_ID_LEN`):
/// a longer one cannot name a live session.
const MAX_ID_LEN: usize = 256;

/// What the layer does when SessionStore cannot answer (unreachable,
/// overloaded, out of time: [`Error::is_retryable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WhenUnavailable {
    /// Answer 503 / UNAVAILABLE: a revoked session is never let through.
    FailClosed,
    /// Pass the request on with [`SessionUnchecked`] instead of a
    /// [`Session`] in its extensions.
    PassUnchecked,
}

/// A [`tower_layer::Layer`] that wraps a service in [`RequireSession`]: only
/// requests whose session SessionStore finds live reach it, with the
/// [`Session`] in their extensions.
///
/// `extract` reads the request's `(user_id, token_id)` (the verified JWT's
/// `sub` and `jti`) from its head, borrowing them; `None` (no credentials)
/// is answered like a session that is not live.
///
/// Answers, decided by the request's `content-type` (`application/grpc*` is
/// gRPC, anything else HTTP):
///
/// | session | HTTP | gRPC |
/// |---|---|---|
/// | live | passed on, [`Session`] in its extensions | the same |
/// | missing, expired, revoked, or no ids | 401, `WWW-Authenticate: Bearer error="invalid_token"` | `grpc-status` 16 UNAUTHENTICATED (HTTP 200) |
/// | SessionStore cannot answer | 503 (or passed on: [`pass_when_unavailable`](Self::pass_when_unavailable)) | `grpc-status` 14 UNAVAILABLE |
/// | SessionStore refuses this client (a wrong bearer token, a bug) | 503 | UNAVAILABLE |
///
/// Uses the client's [near-cache](crate::Builder::near_cache) when it has
/// one (a revoked session may then pass for the bound stated there), and asks
/// the server otherwise, through the client's retries and budget.
///
/// # Examples
///
/// ```no_run
/// use session_client::{RequireSessionLayer, Session, SessionClient};
///
/// /// What the service's JWT middleware, placed before the layer, leaves
/// /// in the request's extensions once the JWT's signature is checked.
/// #[derive(Clone)]
/// struct Claims {
///     sub: String,
///     jti: String,
/// }
///
/// # async fn run() -> session_client::Result<()> {
/// let client = SessionClient::builder("http://127.0.0.1:50051")
///     .near_cache(100_000)
///     .connect()
///     .await?;
/// let layer = RequireSessionLayer::new(client, |parts| {
///     let claims = parts.extensions.get::<Claims>()?;
///     Some((claims.sub.as_str(), claims.jti.as_str()))
/// });
/// // axum: Router::new().route("/me", get(me)).layer(layer).layer(jwt_middleware)
/// // and in the handler: Extension(session): Extension<Session>.
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RequireSessionLayer<F> {
    client: SessionClient,
    extract: F,
    when_unavailable: WhenUnavailable,
    compact: bool,
}

impl<F> RequireSessionLayer<F>
where
    F: Fn(&Parts) -> Option<(&str, &str)>,
{
    /// A layer checking each request's session with `client`, whose ids
    /// `extract` reads from the request's head. Fails closed: a request is
    /// passed on only when SessionStore says its session is live.
    pub fn new(client: SessionClient, extract: F) -> Self {
        Self {
            client,
            extract,
            when_unavailable: WhenUnavailable::FailClosed,
            compact: false,
        }
    }
}

impl<F> RequireSessionLayer<F> {
    /// Opts in to availability over revocation: when SessionStore cannot
    /// answer ([`Error::is_retryable`]: unreachable, overloaded, out of
    /// time), the request is passed on with [`SessionUnchecked`] in its
    /// extensions (and no [`Session`]) instead of answered 503 / UNAVAILABLE.
    ///
    /// During an outage every JWT that passed the caller's own checks is then
    /// accepted, revoked ones included: logout and "sign out everywhere" stop
    /// working until SessionStore answers again. Handlers that must not run
    /// on an unchecked session (changing a password, payments) should refuse
    /// requests carrying [`SessionUnchecked`]. A client that SessionStore
    /// refuses (a wrong bearer token) is still answered 503: that is a
    /// misconfiguration, not an outage.
    #[must_use]
    pub fn pass_when_unavailable(mut self) -> Self {
        self.when_unavailable = WhenUnavailable::PassUnchecked;
        self
    }

    /// Puts a [`CompactSession`] in a passed request's extensions instead
    /// of a [`Session`]: the same session, built in one allocation instead
    /// of about ten (see
    /// [`SessionClient::check_user_session`]). On a near-cache hit that is
    /// most of the layer's work (BENCHMARKS.md, #28's fourth pass). Handlers
    /// then read `Extension<CompactSession>`; by default the layer inserts
    /// a `Session`, as before.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn build(client: session_client::SessionClient) {
    /// use session_client::RequireSessionLayer;
    ///
    /// let layer = RequireSessionLayer::new(client, |parts: &http::request::Parts| {
    ///     let user = parts.headers.get("x-user")?.to_str().ok()?;
    ///     let token = parts.headers.get("x-jti")?.to_str().ok()?;
    ///     Some((user, token))
    /// })
    /// .compact();
    /// # let _ = layer;
    /// # }
    /// ```
    #[must_use]
    pub fn compact(mut self) -> Self {
        self.compact = true;
        self
    }
}

impl<S, F: Clone> Layer<S> for RequireSessionLayer<F> {
    type Service = RequireSession<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireSession {
            inner,
            client: self.client.clone(),
            extract: self.extract.clone(),
            when_unavailable: self.when_unavailable,
            compact: self.compact,
        }
    }
}

impl<F> fmt::Debug for RequireSessionLayer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequireSessionLayer")
            .field("client", &self.client)
            .field("when_unavailable", &self.when_unavailable)
            .field("compact", &self.compact)
            .finish_non_exhaustive()
    }
}

/// Put in a request's extensions instead of a [`Session`] when SessionStore
/// could not answer and the layer was built with
/// [`RequireSessionLayer::pass_when_unavailable`]: the JWT passed the
/// caller's checks, but whether its session was revoked is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionUnchecked;

/// The service [`RequireSessionLayer`] makes: see there for what it answers.
#[derive(Clone)]
pub struct RequireSession<S, F> {
    inner: S,
    client: SessionClient,
    extract: F,
    when_unavailable: WhenUnavailable,
    /// Whether a passed request carries a [`CompactSession`] rather than
    /// a [`Session`].
    compact: bool,
}

impl<S, F> fmt::Debug for RequireSession<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequireSession")
            .field("client", &self.client)
            .field("when_unavailable", &self.when_unavailable)
            .field("compact", &self.compact)
            .finish_non_exhaustive()
    }
}

/// A boxed future, for the path that waits for the server.
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, F, ReqBody, ResBody> Service<Request<ReqBody>> for RequireSession<S, F>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    F: Fn(&Parts) -> Option<(&str, &str)>,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, S::Error, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        // No ids, an empty one (an empty user id would ask SessionStore
        // for the token's session whoever owns it), or one longer than any
        // id SessionStore accepts: no live session, without asking.
        let Some((user_id, token_id)) = (self.extract)(&parts).filter(|(user, token)| {
            (1..=MAX_ID_LEN).contains(&user.len()) && (1..=MAX_ID_LEN).contains(&token.len())
        }) else {
            return ResponseFuture::rejected(Reject::NotLive, &parts.headers);
        };
        if self.compact {
            if let Some(session) = self.client.cached_user_session_compact(user_id, token_id) {
                parts.extensions.insert(session);
                return ResponseFuture::inner(self.inner.call(Request::from_parts(parts, body)));
            }
        } else if let Some(session) = self.client.cached_user_session(user_id, token_id) {
            parts.extensions.insert(session);
            return ResponseFuture::inner(self.inner.call(Request::from_parts(parts, body)));
        }
        let (user_id, token_id) = (user_id.to_owned(), token_id.to_owned());
        let client = self.client.clone();
        // The inner service was made ready by `poll_ready`: take it, and
        // leave a clone to be made ready for the next request (tower's
        // advice for services that call their inner service later).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let when_unavailable = self.when_unavailable;
        let compact = self.compact;
        let future = async move {
            let verdict = match client.get_user_session_uncached(user_id, token_id).await {
                Ok(Some(session)) => Verdict::Pass(Some(session)),
                Ok(None) | Err(Error::InvalidArgument(_)) => Verdict::Reject(Reject::NotLive),
                Err(err)
                    if err.is_retryable() && when_unavailable == WhenUnavailable::PassUnchecked =>
                {
                    Verdict::Pass(None)
                }
                Err(_) => Verdict::Reject(Reject::Unavailable),
            };
            match verdict {
                Verdict::Pass(Some(session)) if compact => {
                    parts.extensions.insert(CompactSession::from(session));
                    inner.call(Request::from_parts(parts, body)).await
                }
                Verdict::Pass(Some(session)) => {
                    parts.extensions.insert(session);
                    inner.call(Request::from_parts(parts, body)).await
                }
                Verdict::Pass(None) => {
                    parts.extensions.insert(SessionUnchecked);
                    inner.call(Request::from_parts(parts, body)).await
                }
                Verdict::Reject(reject) => Ok(rejection(reject, &parts.headers)),
            }
        };
        ResponseFuture::lookup(Box::pin(future))
    }
}

/// What the server's answer means for the request.
enum Verdict {
    /// Pass it on, with the session (or unchecked, when `None`).
    Pass(Option<Session>),
    /// Answer it.
    Reject(Reject),
}

/// Why a request is answered by the layer.
#[derive(Clone, Copy, Debug)]
enum Reject {
    /// No ids, or a session that is missing, expired or revoked.
    NotLive,
    /// SessionStore could not answer, or refused this client.
    Unavailable,
}

pin_project! {
    /// [`RequireSession`]'s response future: the inner service's own future
    /// when the near-cache answered, a boxed one when the server is asked,
    /// or the layer's answer.
    pub struct ResponseFuture<Fut, E, ResBody> {
        #[pin]
        state: State<Fut, E, ResBody>,
    }
}

pin_project! {
    /// Where a [`ResponseFuture`] is.
    #[project = StateProj]
    enum State<Fut, E, ResBody> {
        // The session was live in the near-cache: the inner call as it is.
        Inner {
            #[pin]
            future: Fut,
        },
        // The server is asked, then the inner service called (or not).
        Lookup {
            future: BoxFuture<Result<Response<ResBody>, E>>,
        },
        // Answered without a call: no ids in the request.
        Rejected {
            response: Option<Response<ResBody>>,
        },
    }
}

impl<Fut, E, ResBody: Default> ResponseFuture<Fut, E, ResBody> {
    fn inner(future: Fut) -> Self {
        Self {
            state: State::Inner { future },
        }
    }

    fn lookup(future: BoxFuture<Result<Response<ResBody>, E>>) -> Self {
        Self {
            state: State::Lookup { future },
        }
    }

    fn rejected(reject: Reject, request: &HeaderMap) -> Self {
        Self {
            state: State::Rejected {
                response: Some(rejection(reject, request)),
            },
        }
    }
}

impl<Fut, E, ResBody> Future for ResponseFuture<Fut, E, ResBody>
where
    Fut: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner { future } => future.poll(cx),
            StateProj::Lookup { future } => future.as_mut().poll(cx),
            // Polling a future again after it completed is a caller's bug
            // every future may answer with a panic.
            StateProj::Rejected { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after it completed"))),
        }
    }
}

impl<Fut, E, ResBody> fmt::Debug for ResponseFuture<Fut, E, ResBody> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Inner { .. } => "Inner",
            State::Lookup { .. } => "Lookup",
            State::Rejected { .. } => "Rejected",
        };
        f.debug_tuple("ResponseFuture").field(&state).finish()
    }
}

/// The content type of a gRPC request (`application/grpc`, `+proto`,
/// `-web`...): gRPC is told by it, as gRPC servers tell it. `None` for HTTP.
fn grpc_content_type(request: &HeaderMap) -> Option<&HeaderValue> {
    request
        .get(header::CONTENT_TYPE)
        .filter(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// The layer's answer to a request with headers `request`: for gRPC a
/// trailers-only response (HTTP 200 with `grpc-status` in the headers, and
/// the request's content type), as tonic answers an error before any
/// message.
fn rejection<ResBody: Default>(reject: Reject, request: &HeaderMap) -> Response<ResBody> {
    let mut response = Response::new(ResBody::default());
    let headers = response.headers_mut();
    if let Some(content_type) = grpc_content_type(request) {
        let (code, message) = match reject {
            // 16 UNAUTHENTICATED: the credentials are not valid.
            Reject::NotLive => ("16", "session expired or revoked"),
            // 14 UNAVAILABLE: retrying later may succeed.
            Reject::Unavailable => ("14", "session store unavailable"),
        };
        headers.insert(header::CONTENT_TYPE, content_type.clone());
        headers.insert("grpc-status", HeaderValue::from_static(code));
        headers.insert("grpc-message", HeaderValue::from_static(message));
        return response;
    }
    match reject {
        Reject::NotLive => {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
            *response.status_mut() = StatusCode::UNAUTHORIZED;
        }
        Reject::Unavailable => *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE,
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(content_type: Option<&'static str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = content_type {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn grpc_is_told_by_its_content_type() {
        for grpc in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc-web",
        ] {
            assert!(grpc_content_type(&headers(Some(grpc))).is_some(), "{grpc}");
        }
        assert!(grpc_content_type(&headers(Some("application/json"))).is_none());
        assert!(grpc_content_type(&headers(None)).is_none());
    }

    #[test]
    fn http_rejections_say_why() {
        let json = headers(Some("application/json"));
        let denied: Response<()> = rejection(Reject::NotLive, &json);
        assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            denied.headers()[header::WWW_AUTHENTICATE],
            "Bearer error=\"invalid_token\""
        );
        let down: Response<()> = rejection(Reject::Unavailable, &headers(None));
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(down.headers().get(header::WWW_AUTHENTICATE).is_none());
    }

    #[test]
    fn grpc_rejections_are_trailers_only() {
        let grpc = headers(Some("application/grpc+proto"));
        let denied: Response<()> = rejection(Reject::NotLive, &grpc);
        assert_eq!(denied.status(), StatusCode::OK);
        assert_eq!(denied.headers()["grpc-status"], "16");
        assert_eq!(
            denied.headers()[header::CONTENT_TYPE],
            "application/grpc+proto"
        );
        let down: Response<()> = rejection(Reject::Unavailable, &grpc);
        assert_eq!(down.headers()["grpc-status"], "14");
    }
}
