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

use std::{
    future::Future,
    marker::PhantomData,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use http_body::Frame;
use subtle::{ConditionallySelectable, ConstantTimeEq};
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

use crate::{
    methods::Methods,
    secret_file::{self, SecretError, SecretFile, Stamp},
};

/// How often the tokens file is checked for changes. A change is installed
/// once the file looked the same on two checks, so within two intervals.
const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// How many times loading at start retries a file that changed while it was
/// read, before giving up.
const LOAD_ATTEMPTS: usize = 3;

/// A token as kept in memory: its SHA-256 digest.
type Digest = [u8; 32];

/// The message a stream ends with when its token is removed.
const TOKEN_REMOVED: &str = "the bearer token this stream was opened with is no longer accepted \
     (removed from the server's tokens file); reopen it with a current token";

/// Errors reading the tokens file.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read.
    #[error("AUTH_TOKENS_FILE {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no token at start: every call would be refused, which
    /// is more likely a missing Secret than intended. (At run time emptying
    /// the file does refuse every call.)
    #[error("AUTH_TOKENS_FILE {0} holds no token")]
    Empty(PathBuf),
    /// The file changed while it was read: it is being rewritten in place.
    #[error(
        "AUTH_TOKENS_FILE {0} changed while it was read; write a new file and rename it into place"
    )]
    Changing(PathBuf),
}

/// The accepted tokens, each with the signal that ends the streams opened
/// with it when a reload removes it.
#[derive(Debug)]
struct Accepted {
    /// Sorted and without duplicates, so a token listed twice has one signal
    /// and a reload can match the old set with the new in one pass.
    digests: Vec<Digest>,
    /// One per token, at the same index: set to `true` (once, for good) when
    /// a reload removes the token. Streaming calls subscribe; nothing else
    /// does, so a token no stream uses costs one small allocation.
    removed: Vec<watch::Sender<bool>>,
}

impl Accepted {
    fn new(mut digests: Vec<Digest>) -> Self {
        digests.sort_unstable();
        digests.dedup();
        let removed = digests.iter().map(|_| watch::channel(false).0).collect();
        Self { digests, removed }
    }

    /// Installs `next` in place of the current tokens. A token in both keeps
    /// its signal, so its streams never notice the reload; the signals of the
    /// tokens not in `next` are returned, for the caller to fire.
    fn replace(&mut self, next: Vec<Digest>) -> Vec<watch::Sender<bool>> {
        let next = Self::new(next);
        let old_digests = std::mem::take(&mut self.digests);
        let old_removed = std::mem::take(&mut self.removed);
        let mut old = old_digests.into_iter().zip(old_removed).peekable();
        let mut gone = Vec::new();
        let mut removed = Vec::with_capacity(next.digests.len());
        // Both lists are sorted: a merge.
        for (digest, fresh) in next.digests.iter().zip(next.removed) {
            while let Some((_, signal)) = old.next_if(|(old, _)| old < digest) {
                gone.push(signal);
            }
            match old.next_if(|(old, _)| old == digest) {
                Some((_, kept)) => removed.push(kept),
                None => removed.push(fresh),
            }
        }
        gone.extend(old.map(|(_, signal)| signal));
        self.digests = next.digests;
        self.removed = removed;
        gone
    }

    /// The index of `presented` among the tokens, found in constant time as
    /// [`Tokens::accepts`] does (every token compared, the index selected
    /// without a branch).
    fn position(&self, presented: &Digest) -> Option<usize> {
        let mut found = subtle::Choice::from(0);
        let mut index: u64 = 0;
        for (candidate, token) in (0_u64..).zip(&self.digests) {
            let equal = token.as_slice().ct_eq(presented.as_slice());
            index.conditional_assign(&candidate, equal);
            found |= equal;
        }
        bool::from(found)
            .then(|| usize::try_from(index).ok())
            .flatten()
    }
}

/// The accepted tokens, shared by the layer and the reloader.
#[derive(Clone)]
pub struct Tokens {
    path: PathBuf,
    accepted: Arc<RwLock<Accepted>>,
    /// The version of the file loaded at start, so the watcher notices a
    /// change made before it first looks.
    loaded: Stamp,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens (or their digests).
        f.debug_struct("Tokens")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Tokens {
    /// Loads the tokens from `path`.
    ///
    /// # Errors
    ///
    /// [`AuthError`] when the file cannot be read, holds no token, or keeps
    /// changing while it is read.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let (accepted, loaded) = read_tokens(path, LOAD_ATTEMPTS, |path| std::fs::read(path))?;
        if accepted.is_empty() {
            return Err(AuthError::Empty(path.to_owned()));
        }
        Ok(Self {
            path: path.to_owned(),
            accepted: Arc::new(RwLock::new(Accepted::new(accepted))),
            loaded,
        })
    }

    /// Reads the file again and installs what it holds, an empty set
    /// included (every call is then refused), ending the streams of the
    /// tokens it no longer holds. On failure the previous tokens stay in
    /// force, streams included, and the failure is logged and counted.
    fn reload(&self) -> Result<Stamp, AuthError> {
        let result = self.reload_with(|path| std::fs::read(path));
        match &result {
            Ok(_) => {}
            Err(err) => {
                metrics::counter!(crate::metrics::AUTH_TOKENS_RELOAD_FAILURES).increment(1);
                tracing::error!(error = %err, "auth tokens not reloaded; keeping the previous ones");
            }
        }
        result
    }

    /// [`Tokens::reload`] with the read given, so tests can change the file
    /// in the middle of it. One attempt: the watcher tries again at its next
    /// check.
    fn reload_with(
        &self,
        read: impl FnMut(&Path) -> std::io::Result<Vec<u8>>,
    ) -> Result<Stamp, AuthError> {
        let (tokens, stamp) = read_tokens(&self.path, 1, read)?;
        let (count, removed) = {
            let mut accepted = self.accepted.write().unwrap_or_else(|e| e.into_inner());
            let removed = accepted.replace(tokens);
            (accepted.digests.len(), removed)
        };
        // The removed tokens are out of the set: new calls with them are
        // refused, and a stream that subscribed before the swap (under the
        // read lock, see `check_stream`) sees this.
        if !removed.is_empty() {
            let streams: usize = removed
                .iter()
                .map(|signal| {
                    signal.send_replace(true);
                    signal.receiver_count()
                })
                .sum();
            tracing::info!(
                path = %self.path.display(),
                tokens_removed = removed.len(),
                streams_ended = streams,
                "auth tokens removed: ending the streams opened with them"
            );
        }
        if count == 0 {
            tracing::warn!(path = %self.path.display(), "auth tokens file holds no token: every call but health is refused");
        } else {
            tracing::info!(path = %self.path.display(), count, "auth tokens reloaded");
        }
        Ok(stamp)
    }

    /// Reloads on SIGHUP, and when the file changed and then stayed the same
    /// for one check interval, until the task is dropped. A failed reload is
    /// tried again on the next check.
    pub async fn watch(self) {
        let mut installed = Some(self.loaded);
        let mut seen = installed;
        let mut ticker = tokio::time::interval(RELOAD_INTERVAL);
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<()>();
            tokio::select! {
                // The operator says the file is ready: no waiting for it to settle.
                () = hup => {
                    if let Ok(stamp) = self.reload() {
                        installed = Some(stamp);
                        seen = installed;
                    }
                }
                _ = ticker.tick() => {
                    let now = Stamp::of(&self.path).ok();
                    if settled_change(installed, seen, now)
                        && let Ok(stamp) = self.reload()
                    {
                        installed = Some(stamp);
                    }
                    seen = now;
                }
            }
        }
    }

    fn accepts(&self, presented: &[u8]) -> bool {
        let presented = digest(presented);
        let accepted = self.accepted.read().unwrap_or_else(|e| e.into_inner());
        // Check every token, not stopping at a match, so timing does not
        // tell which (or whether an earlier) token matched. Digests all have
        // the same length, so neither does a token's length.
        accepted
            .digests
            .iter()
            .fold(subtle::Choice::from(0), |found, token| {
                found | token.as_slice().ct_eq(presented.as_slice())
            })
            .into()
    }

    /// Whether the call may proceed: `Err` is the UNAUTHENTICATED answer.
    fn check(&self, headers: &HeaderMap) -> Result<(), Status> {
        let token = presented(headers)?;
        if self.accepts(token.as_bytes()) {
            Ok(())
        } else {
            Err(invalid())
        }
    }

    /// [`Tokens::check`] for a streaming call: `Ok` is the signal that a
    /// reload removed the token. Checked and subscribed under one read lock,
    /// so a reload removing the token comes either before (the call is
    /// refused) or after (the signal fires).
    fn check_stream(&self, headers: &HeaderMap) -> Result<watch::Receiver<bool>, Status> {
        let token = presented(headers)?;
        let presented = digest(token.as_bytes());
        let accepted = self.accepted.read().unwrap_or_else(|e| e.into_inner());
        accepted
            .position(&presented)
            .and_then(|index| accepted.removed.get(index))
            .map(watch::Sender::subscribe)
            .ok_or_else(invalid)
    }
}

/// The bearer token a call presents, or the UNAUTHENTICATED answer when it
/// sends none.
fn presented(headers: &HeaderMap) -> Result<&str, Status> {
    headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token)
        .ok_or_else(|| {
            Status::unauthenticated("missing bearer token: send `authorization: Bearer <token>`")
        })
}

/// The answer to a token that is not (or no longer) accepted.
fn invalid() -> Status {
    Status::unauthenticated("invalid bearer token")
}

/// Whether the watcher should reload: the file differs from the installed
/// version and looked the same on the previous check (`seen`) as now, so no
/// writer was at work across a whole interval. A file that cannot be
/// examined (`now` is `None`) is reloaded too, so the failure is reported.
fn settled_change(installed: Option<Stamp>, seen: Option<Stamp>, now: Option<Stamp>) -> bool {
    now != installed && now == seen
}

/// The token of an `authorization` value in the `Bearer` scheme, whose name
/// is case-insensitive (RFC 6750 section 2.1, RFC 9110 section 11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn digest(token: &[u8]) -> Digest {
    let digest = ring::digest::digest(&ring::digest::SHA256, token);
    let mut out = [0; 32];
    // SHA-256 digests are 32 bytes.
    out.copy_from_slice(digest.as_ref());
    out
}

/// The digests of the tokens in `path` and the version read, read as every
/// secret file is ([`crate::secret_file`]): a file that changed during each
/// of `attempts` reads is [`AuthError::Changing`].
fn read_tokens(
    path: &Path,
    attempts: usize,
    read: impl FnMut(&Path) -> std::io::Result<Vec<u8>>,
) -> Result<(Vec<Digest>, Stamp), AuthError> {
    let file = SecretFile {
        variable: "AUTH_TOKENS_FILE",
        path,
    };
    let mut reads =
        secret_file::read_settled_with(&[file], attempts, read).map_err(|err| match err {
            SecretError::Read { source, .. } => AuthError::Read {
                path: path.to_owned(),
                source,
            },
            SecretError::Changing { .. } => AuthError::Changing(path.to_owned()),
        })?;
    let Some(secret_file::Read { bytes, stamp }) = reads.pop() else {
        // read_settled answers one read per file it was given, or an error.
        unreachable!("one file read, one result");
    };
    let text = String::from_utf8(bytes).map_err(|e| AuthError::Read {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    let tokens = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| digest(line.as_bytes()))
        .collect();
    Ok((tokens, stamp))
}

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
mod tests {
    use http_body::Body as _;

    use super::*;

    fn file(contents: &str) -> tempfile_like::TempFile {
        tempfile_like::TempFile::new(contents)
    }

    /// A tiny temp file helper, to avoid a dependency for a few tests.
    mod tempfile_like {
        pub(super) struct TempFile(pub(super) std::path::PathBuf);

        impl TempFile {
            pub(super) fn new(contents: &str) -> Self {
                static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path =
                    std::env::temp_dir().join(format!("auth-test-{}-{n}", std::process::id()));
                std::fs::write(&path, contents).unwrap();
                Self(path)
            }
        }

        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", authorization.parse().unwrap());
        headers
    }

    #[test]
    fn tokens_file_skips_comments_and_blank_lines() {
        let f = file("# ops team\n\n  alpha  \nbeta\n");
        let tokens = Tokens::load(&f.0).unwrap();
        assert!(tokens.accepts(b"alpha"));
        assert!(tokens.accepts(b"beta"));
        assert!(!tokens.accepts(b"# ops team"));
        assert!(!tokens.accepts(b"alph"));
        assert!(!tokens.accepts(b"alphaa"));
        assert!(!tokens.accepts(b""));
    }

    #[test]
    fn an_empty_file_is_refused_at_start_and_denies_all_on_reload() {
        let empty = file("# nothing\n");
        assert!(matches!(Tokens::load(&empty.0), Err(AuthError::Empty(_))));
        let f = file("gamma\n");
        let tokens = Tokens::load(&f.0).unwrap();
        std::fs::write(&f.0, "# all revoked\n").unwrap();
        tokens.reload().unwrap();
        assert!(!tokens.accepts(b"gamma"));
        assert!(tokens.check(&headers("Bearer gamma")).is_err());
        std::fs::write(&f.0, "delta\n").unwrap();
        tokens.reload().unwrap();
        assert!(tokens.accepts(b"delta"));
        assert!(!tokens.accepts(b"gamma"));
    }

    #[test]
    fn an_unreadable_file_keeps_the_previous_tokens() {
        let f = file("epsilon\n");
        let tokens = Tokens::load(&f.0).unwrap();
        std::fs::remove_file(&f.0).unwrap();
        assert!(matches!(tokens.reload(), Err(AuthError::Read { .. })));
        assert!(tokens.accepts(b"epsilon"));
    }

    /// A file still being written while it is read (here: the rest of a
    /// token arrives during the read) is not installed, so a truncated token
    /// never becomes acceptable; the complete file is, on a later reload.
    #[test]
    fn a_file_changing_while_read_is_never_installed() {
        let f = file("old-token\n");
        let tokens = Tokens::load(&f.0).unwrap();
        std::fs::write(&f.0, "new-to").unwrap();
        let result = tokens.reload_with(|path| {
            let partial = std::fs::read(path)?;
            // The writer finishes after the reader saw half the file.
            std::fs::write(path, "new-token-complete\n")?;
            Ok(partial)
        });
        assert!(matches!(result, Err(AuthError::Changing(_))), "{result:?}");
        assert!(
            !tokens.accepts(b"new-to"),
            "a truncated token was installed"
        );
        assert!(tokens.accepts(b"old-token"));
        tokens.reload().unwrap();
        assert!(tokens.accepts(b"new-token-complete"));
        assert!(!tokens.accepts(b"old-token"));
    }

    /// The text read must be the whole file, even if the file's size and time
    /// did not move during the read (a short read).
    #[test]
    fn a_short_read_is_never_installed() {
        let f = file("zeta-token\n");
        let tokens = Tokens::load(&f.0).unwrap();
        let result = tokens.reload_with(|_| Ok(b"zeta".to_vec()));
        assert!(matches!(result, Err(AuthError::Changing(_))));
        assert!(!tokens.accepts(b"zeta"));
    }

    /// The watcher reloads a changed file only once it looked the same on two
    /// checks in a row.
    #[test]
    fn the_watcher_waits_for_the_file_to_settle() {
        let f = file("eta\n");
        let a = Stamp::of(&f.0).unwrap();
        let b = Stamp {
            len: a.len + 1,
            ..a
        };
        let c = Stamp {
            len: a.len + 2,
            ..a
        };
        assert!(!settled_change(Some(a), Some(a), Some(a)), "unchanged");
        assert!(!settled_change(Some(a), Some(a), Some(b)), "just changed");
        assert!(settled_change(Some(a), Some(b), Some(b)), "settled");
        assert!(!settled_change(Some(a), Some(b), Some(c)), "still changing");
        assert!(settled_change(Some(a), None, None), "gone: report it");
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_the_token_exact() {
        let f = file("theta-secret\n");
        let tokens = Tokens::load(&f.0).unwrap();
        for ok in [
            "Bearer theta-secret",
            "bearer theta-secret",
            "BEARER theta-secret",
            "Bearer   theta-secret ",
        ] {
            assert!(tokens.check(&headers(ok)).is_ok(), "{ok:?}");
        }
        for bad in [
            "Bearer theta-secre",
            "Bearer theta-secretX",
            "Basic theta-secret",
            "Bearertheta-secret",
            "Bearer ",
            "theta-secret",
        ] {
            let status = tokens.check(&headers(bad)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        let missing = tokens.check(&HeaderMap::new()).unwrap_err();
        assert!(missing.message().contains("missing bearer token"));
    }

    fn digests(tokens: &[&str]) -> Vec<Digest> {
        tokens.iter().map(|t| digest(t.as_bytes())).collect()
    }

    /// A subscription to `token`'s removal, as a stream opened with it has.
    fn subscribe(accepted: &Accepted, token: &str) -> watch::Receiver<bool> {
        let index = accepted.position(&digest(token.as_bytes())).unwrap();
        accepted.removed[index].subscribe()
    }

    /// A reload keeps the signal of every token still listed, whatever else
    /// changed, and hands back exactly the signals of the tokens it removed:
    /// rotation (old and new both listed, then old removed), an unchanged
    /// file, duplicates, an emptied file.
    #[test]
    fn a_reload_signals_exactly_the_removed_tokens() {
        let mut accepted = Accepted::new(digests(&["old", "other", "old"]));
        assert_eq!(accepted.digests.len(), 2, "a duplicate is one token");
        let old = subscribe(&accepted, "old");
        let other = subscribe(&accepted, "other");

        // Rotation, first step: the new token is added.
        assert!(
            accepted
                .replace(digests(&["other", "new", "old"]))
                .is_empty()
        );
        let new = subscribe(&accepted, "new");
        // The same file again.
        assert!(
            accepted
                .replace(digests(&["old", "new", "other"]))
                .is_empty()
        );
        assert!(!old.has_changed().unwrap() && !other.has_changed().unwrap());
        assert!(accepted.position(&digest(b"old")).is_some());

        // Rotation, second step: the old token is removed.
        let removed = accepted.replace(digests(&["new", "other"]));
        assert_eq!(removed.len(), 1);
        assert!(removed[0].subscribe().same_channel(&old));
        assert!(accepted.position(&digest(b"old")).is_none());
        assert!(accepted.position(&digest(b"nope")).is_none());
        for signal in removed {
            signal.send_replace(true);
        }
        assert!(*old.borrow(), "the old token's streams are told");
        assert!(!*other.borrow() && !*new.borrow());
        assert!(!other.has_changed().unwrap() && !new.has_changed().unwrap());

        // Emptied: every token goes.
        let removed = accepted.replace(Vec::new());
        assert_eq!(removed.len(), 2);
        assert!(removed.iter().any(|s| s.subscribe().same_channel(&other)));
        assert!(removed.iter().any(|s| s.subscribe().same_channel(&new)));
        assert!(accepted.digests.is_empty() && accepted.removed.is_empty());
    }

    /// The index found is the presented token's, wherever it sits.
    #[test]
    fn position_finds_each_token() {
        let tokens = ["a", "b", "c", "d", "e"];
        let accepted = Accepted::new(digests(&tokens));
        for token in tokens {
            let index = accepted.position(&digest(token.as_bytes())).unwrap();
            assert_eq!(accepted.digests[index], digest(token.as_bytes()));
        }
        assert!(Accepted::new(Vec::new()).position(&digest(b"a")).is_none());
    }

    /// A body that never ends, like an idle WatchRevocations stream.
    struct Endless;

    impl http_body::Body for Endless {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Pending
        }
    }

    async fn next_frame(body: &mut Body) -> Option<Result<Frame<Bytes>, Status>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    /// Whether `body` is still open (waiting) after a moment.
    async fn still_open(body: &mut Body) -> bool {
        tokio::time::timeout(Duration::from_millis(50), next_frame(body))
            .await
            .is_err()
    }

    const WATCH: &str = "/sessionstore.v1.SessionStore/WatchRevocations";

    fn methods() -> &'static Methods {
        Methods::served().unwrap()
    }

    fn call_to(path: &str, token: &str) -> Request<()> {
        let mut request = Request::new(());
        *request.uri_mut() = path.parse().unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    }

    /// Streams opened with a token end with UNAUTHENTICATED when a reload
    /// removes it, and only those: a reload of the same file, one that adds
    /// a token, one that fails, leave every stream open; a unary answer is
    /// not wrapped; emptying the file ends every stream.
    #[tokio::test]
    async fn a_removed_token_ends_its_streams_and_only_those() {
        let f = file("kappa\nlambda\n");
        let tokens = Tokens::load(&f.0).unwrap();
        let endless = tower::service_fn(|_request: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(Body::new(Endless)))
        });
        let mut service = AuthLayer::new(Some(tokens.clone()), methods()).layer(endless);
        let open = |service: &mut Auth<_>, token| service.call(call_to(WATCH, token));
        let mut kappa = open(&mut service, "kappa").await.unwrap().into_body();
        let mut kappa_too = open(&mut service, "kappa").await.unwrap().into_body();
        let mut lambda = open(&mut service, "lambda").await.unwrap().into_body();
        let mut unary = service
            .call(call_to("/sessionstore.v1.SessionStore/GetSession", "kappa"))
            .await
            .unwrap()
            .into_body();

        tokens.reload().unwrap();
        std::fs::write(&f.0, "lambda\nkappa\nmu\n").unwrap();
        tokens.reload().unwrap();
        std::fs::remove_file(&f.0).unwrap();
        assert!(tokens.reload().is_err());
        for body in [&mut kappa, &mut kappa_too, &mut lambda] {
            assert!(
                still_open(body).await,
                "a reload keeping the token ended a stream"
            );
        }

        std::fs::write(&f.0, "lambda\nmu\n").unwrap();
        tokens.reload().unwrap();
        for body in [&mut kappa, &mut kappa_too] {
            let last = next_frame(body).await.unwrap().unwrap();
            let status = Status::from_header_map(&last.into_trailers().unwrap()).unwrap();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            assert_eq!(status.message(), TOKEN_REMOVED);
            assert!(next_frame(body).await.is_none());
            assert!(body.is_end_stream());
        }
        assert!(
            still_open(&mut lambda).await,
            "another token's stream ended"
        );
        assert!(still_open(&mut unary).await, "a unary answer was wrapped");
        let refused = service.call(call_to(WATCH, "kappa")).await.unwrap();
        assert_eq!(
            Status::from_header_map(refused.headers()).map(|s| s.code()),
            Some(tonic::Code::Unauthenticated)
        );

        std::fs::write(&f.0, "# all revoked\n").unwrap();
        tokens.reload().unwrap();
        let last = next_frame(&mut lambda).await.unwrap().unwrap();
        assert!(last.is_trailers());
    }

    #[tokio::test]
    async fn the_layer_guards_everything_but_health() {
        let f = file("iota\n");
        let tokens = Tokens::load(&f.0).unwrap();
        let ok = tower::service_fn(|_request: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(tonic::body::Body::default()))
        });
        let mut service = AuthLayer::new(Some(tokens), methods()).layer(ok);
        let code = |response: Response<tonic::body::Body>| {
            tonic::Status::from_header_map(response.headers()).map(|s| s.code())
        };
        let mut reflection = Request::new(());
        *reflection.uri_mut() = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
            .parse()
            .unwrap();
        let refused = service.call(reflection).await.unwrap();
        assert_eq!(code(refused), Some(tonic::Code::Unauthenticated));
        let mut probe = Request::new(());
        *probe.uri_mut() = "/grpc.health.v1.Health/Check".parse().unwrap();
        assert_eq!(code(service.call(probe).await.unwrap()), None);
        let mut authed = Request::new(());
        authed
            .headers_mut()
            .insert("authorization", "bearer iota".parse().unwrap());
        assert_eq!(code(service.call(authed).await.unwrap()), None);
        let mut open = AuthLayer::new(None, methods()).layer(ok);
        assert_eq!(code(open.call(Request::new(())).await.unwrap()), None);
    }
}
