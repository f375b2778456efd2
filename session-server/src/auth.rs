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

use std::{
    marker::PhantomData,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use subtle::ConstantTimeEq;
use tonic::{
    Status,
    codegen::http::{HeaderMap, Request, Response},
};
use tower::{
    Layer, Service,
    util::{Either, future::EitherResponseFuture},
};

/// How often the tokens file is checked for changes. A change is installed
/// once the file looked the same on two checks, so within two intervals.
const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// How many times loading at start retries a file that changed while it was
/// read, before giving up.
const LOAD_ATTEMPTS: usize = 3;

/// A token as kept in memory: its SHA-256 digest.
type Digest = [u8; 32];

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

/// What identifies one version of the file: a change to any of these means
/// the file was rewritten or replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    /// Tells a renamed-in replacement from the file it replaced even when
    /// both have the same size and time.
    #[cfg(unix)]
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        let metadata = std::fs::metadata(path)?;
        Ok(Self {
            len: metadata.len(),
            modified: metadata.modified().ok(),
            #[cfg(unix)]
            inode: std::os::unix::fs::MetadataExt::ino(&metadata),
        })
    }
}

/// The accepted tokens, shared by the layer and the reloader.
#[derive(Clone)]
pub struct Tokens {
    path: PathBuf,
    accepted: Arc<RwLock<Vec<Digest>>>,
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
        let mut attempt = 1;
        let (accepted, loaded) = loop {
            match read_tokens(path, read_file) {
                Err(AuthError::Changing(_)) if attempt < LOAD_ATTEMPTS => attempt += 1,
                result => break result?,
            }
        };
        if accepted.is_empty() {
            return Err(AuthError::Empty(path.to_owned()));
        }
        Ok(Self {
            path: path.to_owned(),
            accepted: Arc::new(RwLock::new(accepted)),
            loaded,
        })
    }

    /// Reads the file again and installs what it holds, an empty set
    /// included (every call is then refused). On failure the previous tokens
    /// stay in force, the failure is logged and counted.
    fn reload(&self) -> Result<Stamp, AuthError> {
        let result = self.reload_with(read_file);
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
    /// in the middle of it.
    fn reload_with(
        &self,
        read: impl FnOnce(&Path) -> std::io::Result<String>,
    ) -> Result<Stamp, AuthError> {
        let (tokens, stamp) = read_tokens(&self.path, read)?;
        let count = tokens.len();
        *self.accepted.write().unwrap_or_else(|e| e.into_inner()) = tokens;
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
            .iter()
            .fold(subtle::Choice::from(0), |found, token| {
                found | token.as_slice().ct_eq(presented.as_slice())
            })
            .into()
    }

    /// Whether the call may proceed: `Err` is the UNAUTHENTICATED answer.
    fn check(&self, headers: &HeaderMap) -> Result<(), Status> {
        let presented = headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token);
        match presented {
            Some(token) if self.accepts(token.as_bytes()) => Ok(()),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated(
                "missing bearer token: send `authorization: Bearer <token>`",
            )),
        }
    }
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

fn read_file(path: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(path)
}

/// The digests of the tokens in `path` and the version read: the file is
/// examined before and after `read`, and refused as [`AuthError::Changing`]
/// if it changed in between or the text read is not the whole file.
fn read_tokens(
    path: &Path,
    read: impl FnOnce(&Path) -> std::io::Result<String>,
) -> Result<(Vec<Digest>, Stamp), AuthError> {
    let io_error = |source| AuthError::Read {
        path: path.to_owned(),
        source,
    };
    let before = Stamp::of(path).map_err(io_error)?;
    let text = read(path).map_err(io_error)?;
    let after = Stamp::of(path).map_err(io_error)?;
    if before != after || u64::try_from(text.len()).ok() != Some(after.len) {
        return Err(AuthError::Changing(path.to_owned()));
    }
    let tokens = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| digest(line.as_bytes()))
        .collect();
    Ok((tokens, after))
}

/// Puts [`Tokens`] in front of a service stack, or nothing when
/// AUTH_TOKENS_FILE is unset (one layer type either way, so the server's
/// type does not depend on the configuration).
#[derive(Clone, Debug)]
pub struct AuthLayer {
    tokens: Option<Tokens>,
}

impl AuthLayer {
    /// Requires one of `tokens` on every call but health; `None` lets every
    /// call through.
    pub fn new(tokens: Option<Tokens>) -> Self {
        Self { tokens }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Tokens>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Auth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    // The inner future as it is, not boxed: one allocation less per call.
    type Future =
        EitherResponseFuture<std::future::Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if let Some(tokens) = &self.tokens
            && !request
                .uri()
                .path()
                .starts_with(crate::limits::HEALTH_PREFIX)
            && let Err(status) = tokens.check(request.headers())
        {
            let mut refusal = Either::<_, &mut S>::Left(Refusal(status.into_http(), PhantomData));
            return refusal.call(request);
        }
        Either::<Refusal<Self::Response, Self::Error>, _>::Right(&mut self.inner).call(request)
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
            let partial = std::fs::read_to_string(path)?;
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
        let result = tokens.reload_with(|_| Ok("zeta".into()));
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

    #[tokio::test]
    async fn the_layer_guards_everything_but_health() {
        let f = file("iota\n");
        let tokens = Tokens::load(&f.0).unwrap();
        let ok = tower::service_fn(|_request: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(tonic::body::Body::default()))
        });
        let mut service = AuthLayer::new(Some(tokens)).layer(ok);
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
        let mut open = AuthLayer::new(None).layer(ok);
        assert_eq!(code(open.call(Request::new(())).await.unwrap()), None);
    }
}
