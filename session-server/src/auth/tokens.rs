//! The accepted tokens: AUTH_TOKENS_FILE read, kept as digests, checked in
//! constant time, and reloaded (see the module docs of [`crate::auth`]).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use subtle::{ConditionallySelectable, ConstantTimeEq};
use tokio::sync::watch;
use tonic::{Status, codegen::http::HeaderMap};

use crate::secret_file::{self, SecretError, SecretFile, Stamp};

/// How often the tokens file is checked for changes. A change is installed
/// once the file looked the same on two checks, so within two intervals.
const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// How many times loading at start retries a file that changed while it was
/// read, before giving up.
const LOAD_ATTEMPTS: usize = 3;

/// A token as kept in memory: its SHA-256 digest.
type Digest = [u8; 32];

/// The message a stream ends with when its token is removed.
pub(super) const TOKEN_REMOVED: &str = "the bearer token this stream was opened with is no longer accepted \
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
    pub(super) fn reload(&self) -> Result<Stamp, AuthError> {
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
    pub(super) fn check(&self, headers: &HeaderMap) -> Result<(), Status> {
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
    pub(super) fn check_stream(
        &self,
        headers: &HeaderMap,
    ) -> Result<watch::Receiver<bool>, Status> {
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

#[cfg(test)]
mod tests;
