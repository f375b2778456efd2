//! [`SessionClient`]: the generated stub wrapped to speak domain types: each
//! RPC as a method taking and returning domain types, marked a read or a
//! write for the attempt loop (`call.rs`, which owns deadlines, retries and
//! the pick of an endpoint), and the near-cache consulted and kept true
//! around the calls that concern it.
//!
//! This file holds the type, what its clones share, and its constructor;
//! the methods are in one file per area of the API, each an
//! `impl SessionClient` block:
//!
//! - `sessions`: create, rotate, extend (writes that start or move a
//!   session);
//! - `lookups`: get a session (through the near-cache), count and list a
//!   user's sessions;
//! - `revocations`: revoke one or all of a user's sessions, and the guard
//!   that applies a revocation to the near-cache around its call;
//! - `login`: the login limiter's attempts, resets and trusted devices.
//!
//! The ways to make a client (`SessionClient::builder`, `connect`) are in
//! `builder`, which imports this module, not the other way round.

use std::{fmt, sync::Arc};

// Only the docs name these: `Error`'s variants are what each call fails
// with, `Builder`'s settings what it does. The builder imports this module,
// not the other way round.
#[cfg(doc)]
use crate::{builder::Builder, error::Error, types::RotateOutcome};
use crate::{
    call::Caller,
    error::Result,
    near_cache::{NearCache, NearCacheSettings, NearCacheStats, Watcher},
};

mod login;
mod lookups;
mod revocations;
mod sessions;

/// A handle to SessionStore. Cheap to clone: clones share the connections,
/// the retry budget and the bearer token, so make one at start-up and hand
/// clones to every task.
///
/// Each call has one budget, the builder's [`timeout`](Builder::timeout):
/// every attempt and every pause between attempts ends within it, and each
/// attempt tells the server the time left (`grpc-timeout`).
///
/// Reads (get, count, list) are retried with exponential backoff on
/// UNAVAILABLE (the server or its Redis unreachable, a connection cut
/// mid-call), on the server's load shedding and on an attempt past its
/// [`attempt_timeout`](Builder::attempt_timeout). Writes are retried only
/// when the server provably never processed the request: its connection
/// could not be opened (retried on another endpoint when there is one), or
/// the server turned it away before any processing: a request queued on, or
/// opened past the last stream of, a connection the server was closing (its
/// GOAWAY: every connection it ages out at `MAX_CONNECTION_AGE`, or a
/// graceful shutdown), or a stream it refused (`REFUSED_STREAM`). The first
/// of those turn-aways in a call is retried at once on a new connection,
/// without counting as an attempt or taking from the retry budget (gRPC's
/// "transparent retry"); any later one is an ordinary retry. Retries are
/// bounded per call ([`max_attempts`](Builder::max_attempts)) and across
/// calls (the retry budget, [`retry_throttling`](Builder::retry_throttling)).
///
/// # Writes whose outcome is unknown
///
/// A write that fails with [`Error::Unavailable`] or
/// [`Error::DeadlineExceeded`], or whose future is dropped before it
/// finishes (a `select!`, a cancelled request handler, a caller's own
/// timeout), may or may not have taken effect: the request may have reached
/// the server. Repeating it is safe for these calls: a repeated
/// [`create_session_with`](Self::create_session_with) answers
/// [`CreateOutcome::AlreadyExists`](crate::CreateOutcome::AlreadyExists)
/// (with the stored session) when the first one took effect; a repeated
/// [`rotate_session`](Self::rotate_session) with the same `new_token_id`
/// answers [`RotateOutcome::AlreadyRotated`] with the same successor (within
/// the server's ROTATION_GRACE_MS); a repeated
/// [`extend_session`](Self::extend_session) moves the expiry to where one
/// would have; a repeated revoke answers `false`; only a repeated
/// [`record_login_attempt`](Self::record_login_attempt) counts twice.
///
/// # Examples
///
/// ```no_run
/// use session_client::{Error, SessionClient};
///
/// # async fn run() -> Result<(), Error> {
/// let client = SessionClient::connect("http://127.0.0.1:50051").await?;
/// match client.get_session("jti-from-the-jwt").await? {
///     Some(session) => println!("signed in as {}", session.user_id),
///     None => println!("signed out"),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SessionClient {
    shared: Arc<Shared>,
}

/// What every clone of a client shares.
struct Shared {
    /// The endpoints, token, bounds and retry budget every call runs with.
    caller: Caller,
    /// The near-cache and its stream task (aborted when the last clone
    /// drops this), when the builder turned it on.
    near_cache: Option<(Arc<NearCache>, Watcher)>,
}

impl SessionClient {
    /// Must run inside a Tokio runtime when `near_cache` is set: its stream
    /// task is spawned here.
    pub(crate) fn new(caller: Caller, near_cache: Option<NearCacheSettings>) -> Self {
        let near_cache = near_cache.map(|settings| {
            let cache = NearCache::with_metadata(
                settings.max_entries,
                settings.max_staleness,
                settings.metadata,
            );
            let watcher = Watcher::spawn(
                cache.clone(),
                caller.pool.clone(),
                caller.auth.clone(),
                settings.stream_lifetime,
            );
            (cache, watcher)
        });
        Self {
            shared: Arc::new(Shared { caller, near_cache }),
        }
    }

    /// This client (no clone of it made yet) answering lookups from `cache`,
    /// which the caller drives: no stream task (the scale measurement,
    /// `near_cache/bench.rs`). `None` when a clone exists.
    #[cfg(feature = "bench-internals")]
    pub(crate) fn with_driven_cache(self, cache: Arc<NearCache>) -> Option<Self> {
        let shared = Arc::into_inner(self.shared)?;
        Some(Self {
            shared: Arc::new(Shared {
                caller: shared.caller,
                near_cache: Some((cache, Watcher::idle())),
            }),
        })
    }

    fn near_cache(&self) -> Option<&Arc<NearCache>> {
        self.shared.near_cache.as_ref().map(|(cache, _)| cache)
    }

    #[cfg(test)]
    pub(crate) fn near_cache_for_tests(&self) -> Option<&Arc<NearCache>> {
        self.near_cache()
    }

    /// What the near-cache has done so far (hits, misses, revocations
    /// applied, resets) and holds now; `None` when it is off (see
    /// [`Builder::near_cache`]).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn run(client: session_client::SessionClient) {
    /// if let Some(stats) = client.near_cache_stats() {
    ///     let lookups = stats.hits + stats.misses;
    ///     println!("{} of {lookups} checks answered from memory", stats.hits);
    /// }
    /// # }
    /// ```
    pub fn near_cache_stats(&self) -> Option<NearCacheStats> {
        self.near_cache().map(|cache| cache.stats())
    }

    /// Replaces the bearer token for every later call of this client and its
    /// clones, for a token rotated without rebuilding the client (calls in
    /// flight keep the old one). Typically called when the secret's file
    /// changes; the server accepts both tokens during a rotation when both
    /// are in its AUTH_TOKENS_FILE.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the token is not visible ASCII, or would go to
    /// an `http://` endpoint without
    /// [`allow_plaintext_token`](Builder::allow_plaintext_token); the old
    /// token stays in use.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let token = std::fs::read_to_string("/var/run/secrets/sessionstore/token")
    ///     .expect("token file");
    /// client.set_bearer_token(token.trim())?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn set_bearer_token(&self, token: impl AsRef<str>) -> Result<()> {
        self.shared.caller.auth.set(token.as_ref())
    }
}

impl fmt::Debug for SessionClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let caller = &self.shared.caller;
        f.debug_struct("SessionClient")
            .field("endpoints", &caller.pool)
            .field("auth", &caller.auth)
            .field("policy", &caller.policy)
            .field("retry_budget", &caller.throttle)
            .field("near_cache", &self.near_cache())
            .finish()
    }
}
