//! Optional caller authentication by static bearer tokens, for deployments
//! without mutual TLS.
//!
//! Tokens are read from AUTH_TOKENS_FILE (one per line; blank lines and lines
//! starting with `#` are ignored) and reloaded when the file changes or on
//! SIGHUP. Each call must send `authorization: Bearer <token>`; a missing or
//! wrong token gets UNAUTHENTICATED. Tokens are compared in constant time and
//! never logged. Health is not behind this check: probes carry no token.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use subtle::ConstantTimeEq;
use tonic::{Request, Status, service::Interceptor};

/// How often the tokens file is checked for changes.
const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

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
    /// The file holds no token: every call would be refused.
    #[error("AUTH_TOKENS_FILE {0} holds no token")]
    Empty(PathBuf),
}

/// The accepted tokens, shared by the interceptor and the reloader.
#[derive(Clone)]
pub struct Tokens {
    path: PathBuf,
    accepted: Arc<RwLock<Vec<Vec<u8>>>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens themselves.
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
    /// [`AuthError`] when the file cannot be read or holds no token.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let accepted = read_tokens(path)?;
        Ok(Self {
            path: path.to_owned(),
            accepted: Arc::new(RwLock::new(accepted)),
        })
    }

    /// Reads the file again. On failure the previous tokens stay in force, so a
    /// half-written file never locks every caller out.
    pub fn reload(&self) {
        match read_tokens(&self.path) {
            Ok(tokens) => {
                let count = tokens.len();
                *self.accepted.write().unwrap_or_else(|e| e.into_inner()) = tokens;
                tracing::info!(path = %self.path.display(), count, "auth tokens reloaded");
            }
            Err(err) => {
                tracing::error!(error = %err, "auth tokens not reloaded; keeping the previous ones")
            }
        }
    }

    /// Reloads on SIGHUP and whenever the file's modification time changes,
    /// until the task is dropped.
    pub async fn watch(self) {
        let mut last = modified(&self.path);
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
                () = hup => self.reload(),
                _ = ticker.tick() => {
                    let now = modified(&self.path);
                    if now != last {
                        last = now;
                        self.reload();
                    }
                }
            }
        }
    }

    fn accepts(&self, presented: &[u8]) -> bool {
        let accepted = self.accepted.read().unwrap_or_else(|e| e.into_inner());
        // Check every token, not stopping at a match, so timing does not
        // tell which (or whether an earlier) token matched.
        accepted
            .iter()
            .fold(subtle::Choice::from(0), |found, token| {
                found | token.as_slice().ct_eq(presented)
            })
            .into()
    }
}

/// Refuses calls without an accepted bearer token.
#[derive(Clone, Debug)]
pub struct BearerAuth {
    tokens: Tokens,
}

impl BearerAuth {
    /// Checks calls against `tokens`.
    pub fn new(tokens: Tokens) -> Self {
        Self { tokens }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match presented {
            Some(token) if self.tokens.accepts(token.trim().as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated(
                "missing bearer token: send `authorization: Bearer <token>`",
            )),
        }
    }
}

fn read_tokens(path: &Path) -> Result<Vec<Vec<u8>>, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_owned(),
        source,
    })?;
    let tokens: Vec<Vec<u8>> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.as_bytes().to_vec())
        .collect();
    if tokens.is_empty() {
        return Err(AuthError::Empty(path.to_owned()));
    }
    Ok(tokens)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(contents: &str) -> tempfile_like::TempFile {
        tempfile_like::TempFile::new(contents)
    }

    /// A tiny temp file helper, to avoid a dependency for two tests.
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

    #[test]
    fn tokens_file_skips_comments_and_blank_lines() {
        let f = file("# ops team\n\n  alpha  \nbeta\n");
        let tokens = Tokens::load(&f.0).unwrap();
        assert!(tokens.accepts(b"alpha"));
        assert!(tokens.accepts(b"beta"));
        assert!(!tokens.accepts(b"# ops team"));
        assert!(!tokens.accepts(b"alph"));
        assert!(!tokens.accepts(b""));
    }

    #[test]
    fn an_empty_file_is_refused_and_a_bad_reload_keeps_the_old_tokens() {
        let empty = file("# nothing\n");
        assert!(matches!(Tokens::load(&empty.0), Err(AuthError::Empty(_))));
        let f = file("gamma\n");
        let tokens = Tokens::load(&f.0).unwrap();
        std::fs::write(&f.0, "\n").unwrap();
        tokens.reload();
        assert!(tokens.accepts(b"gamma"));
        std::fs::write(&f.0, "delta\n").unwrap();
        tokens.reload();
        assert!(tokens.accepts(b"delta"));
        assert!(!tokens.accepts(b"gamma"));
    }
}
