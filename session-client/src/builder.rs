//! [`Builder`]: how a [`SessionClient`] reaches SessionStore: endpoints (or a
//! DNS name to discover them), timeouts, retries, TLS, the bearer token and
//! when to connect. Everything that can be checked is checked in
//! [`Builder::connect`], so a bad setting fails at start-up, not on a call.
//!
//! This file holds the settings: the type, its defaults and its setters;
//! `connect` checks them and assembles the client.

use std::{fmt, future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

// `Error` only in the docs: the settings' checks are in `connect`.
#[cfg(doc)]
use crate::error::Error;
use crate::{
    balance::Resolver, client::SessionClient, endpoint::TlsSettings, error::Result,
    retry::RetryPolicy,
};

mod connect;

/// Configures and connects a [`SessionClient`]; made by
/// [`SessionClient::builder`].
///
/// Every setting has a production default, named by the `DEFAULT_*`
/// constants below.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use session_client::SessionClient;
///
/// # async fn run() -> Result<(), session_client::Error> {
/// let ca = std::fs::read("/etc/sessionstore/ca.pem").expect("CA certificate");
/// let client = SessionClient::builder("https://sessionstore-0.internal:50051")
///     .endpoint("https://sessionstore-1.internal:50051")
///     .ca_certificate(ca)
///     .bearer_token("token-from-the-secret-store")
///     .timeout(Duration::from_millis(500))
///     .connect()
///     .await?;
/// # let _ = client;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Builder {
    endpoints: Vec<String>,
    connect_timeout: Duration,
    timeout: Duration,
    attempt_timeout: Option<Duration>,
    lazy: bool,
    retry: RetryPolicy,
    retry_max_tokens: u32,
    retry_token_ratio: f64,
    bearer_token: Option<String>,
    allow_plaintext_token: bool,
    dns_refresh: Option<Duration>,
    resolver: Option<Resolver>,
    tls: TlsSettings,
    near_cache: Option<usize>,
    near_cache_max_staleness: Duration,
    near_cache_stream_lifetime: Duration,
    near_cache_metadata: bool,
}

// The ways to make a client: here rather than in `client.rs`, so that the
// builder depends on the client and not the other way round.
impl SessionClient {
    /// A [`Builder`] for a client of the SessionStore at `endpoint`
    /// (`http://host:port` or `https://host:port`).
    pub fn builder(endpoint: impl Into<String>) -> Builder {
        Builder::new(endpoint)
    }

    /// A client of `endpoint` with every default: lazy connection, 5 s
    /// connect timeout, 2 s per call, up to 3 attempts.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `endpoint` is not an `http://` or `https://` URL
    /// (see [`Builder::connect`]).
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self> {
        Self::builder(endpoint).connect().await
    }
}

impl Builder {
    /// Bound on opening one connection (TCP and TLS). 5 s: long enough for a
    /// cold TLS handshake across zones, short enough to fail over quickly.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// The whole budget of each call, every attempt and pause included. 2 s:
    /// SessionStore answers in milliseconds and gives up on Redis after 1 s
    /// (REDIS_TIMEOUT_MS), so 2 s leaves room for one retry after a slow
    /// failure, and an auth check must not hang a request for longer.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    /// Attempts a call gets in all, the first included: 3 rides out a Redis
    /// failover or a pod restart without tripling load during a real outage
    /// (the retry budget stops retries well before that).
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
    /// Pause before the first retry, doubled for each further one, with
    /// jitter. 50 ms: a reconnect usually succeeds within that.
    pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(50);
    /// The longest pause between two attempts.
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(1);
    /// The retry budget's size, in retries: as gRPC's retry throttling
    /// examples. See [`retry_throttling`](Self::retry_throttling).
    pub const DEFAULT_RETRY_MAX_TOKENS: u32 = 10;
    /// What each successful call gives back to the retry budget: one retry
    /// per ten successes, so in steady state at most about 10 % of calls
    /// are retried.
    pub const DEFAULT_RETRY_TOKEN_RATIO: f64 = 0.1;
    /// How long the near-cache keeps answering from memory without a message
    /// on its revocation stream: 3 s, three of the server's heartbeats at
    /// its default REVOCATION_HEARTBEAT_MS (1000), so one or two late
    /// heartbeats do not empty the cache, and a server that lost Redis (it
    /// stops beating) is noticed within 3 s. See
    /// [`near_cache_max_staleness`](Self::near_cache_max_staleness).
    pub const DEFAULT_NEAR_CACHE_MAX_STALENESS: Duration = Duration::from_secs(3);
    /// How long the near-cache uses one revocation stream before replacing
    /// it: 4 minutes, a minute under the server's default MAX_CONNECTION_AGE
    /// (300 s), so the server never closes the stream's connection; see
    /// [`near_cache_stream_lifetime`](Self::near_cache_stream_lifetime).
    pub const DEFAULT_NEAR_CACHE_STREAM_LIFETIME: Duration = Duration::from_secs(240);

    fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoints: vec![endpoint.into()],
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            timeout: Self::DEFAULT_TIMEOUT,
            attempt_timeout: None,
            lazy: true,
            retry: RetryPolicy {
                max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
                initial_backoff: Self::DEFAULT_INITIAL_BACKOFF,
                max_backoff: Self::DEFAULT_MAX_BACKOFF,
            },
            retry_max_tokens: Self::DEFAULT_RETRY_MAX_TOKENS,
            retry_token_ratio: Self::DEFAULT_RETRY_TOKEN_RATIO,
            bearer_token: None,
            allow_plaintext_token: false,
            dns_refresh: None,
            resolver: None,
            tls: TlsSettings::default(),
            near_cache: None,
            near_cache_max_staleness: Self::DEFAULT_NEAR_CACHE_MAX_STALENESS,
            near_cache_stream_lifetime: Self::DEFAULT_NEAR_CACHE_STREAM_LIFETIME,
            near_cache_metadata: true,
        }
    }

    /// Adds another endpoint (`http://host:port` or `https://host:port`).
    /// Each endpoint gets its own connection; every attempt goes to the less
    /// busy of two endpoints picked at random among those whose connection
    /// is not failing. An endpoint whose connection cannot be opened, or
    /// that leaves 3 attempts in a row unanswered past their time (a hung
    /// server whose port still accepts; its very first timeout, for one that
    /// never answered), is left out and probed in the background (after
    /// 100 ms, doubling up to 3 s): used again once a new connection opens
    /// and answers a `grpc.health.v1` check.
    ///
    /// So with one endpoint hung, calls made one at a time lose at most 3
    /// writes to it (each fails as [`Error::DeadlineExceeded`], outcome
    /// unknown), plus any call in flight to it at that moment; reads whose
    /// attempt times out are retried on another endpoint, given an
    /// [`attempt_timeout`](Self::attempt_timeout) shorter than the call's
    /// [`timeout`](Self::timeout).
    #[must_use]
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoints.push(url.into());
        self
    }

    /// Treats each endpoint's host as a DNS name standing for several
    /// servers: resolves it to all its addresses (A and AAAA records), keeps
    /// one connection per address, balanced as for [`endpoint`](Self::endpoint),
    /// and resolves it again every `refresh`, adding and removing addresses
    /// as the answer changes. Each endpoint's name is resolved on its own: a
    /// lookup that fails or finds nothing keeps that name's last known
    /// addresses (an empty answer never removes a server; only an answer
    /// listing other addresses does), while the other names are updated.
    /// [`connect`](Self::connect) fails only when no name resolves to
    /// anything.
    ///
    /// This is how to spread load over the pods of a Kubernetes headless
    /// Service (`clusterIP: None`, whose name resolves to every ready pod):
    /// through a regular Service, HTTP/2 pins each client to one pod. A
    /// `refresh` of 5 to 30 s follows pods as they come and go; an address
    /// that has gone is skipped as soon as its connection fails, before the
    /// next lookup. For `https://`, each address is expected to present a
    /// certificate for the DNS name (or [`tls_domain_name`](Self::tls_domain_name)).
    ///
    /// Default: off, each endpoint is one server.
    #[must_use]
    pub fn dns_discovery(mut self, refresh: Duration) -> Self {
        self.dns_refresh = Some(refresh);
        self
    }

    /// Replaces DNS for [`dns_discovery`](Self::dns_discovery) with
    /// `resolve(host, port)`: for tests that control which addresses a name
    /// has.
    #[doc(hidden)]
    #[must_use]
    pub fn dns_resolver<F, Fut>(mut self, resolve: F) -> Self
    where
        F: Fn(String, u16) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'static,
    {
        self.resolver = Some(Arc::new(move |host, port| Box::pin(resolve(host, port))));
        self
    }

    /// Bound on opening one connection. Default
    /// [`DEFAULT_CONNECT_TIMEOUT`](Self::DEFAULT_CONNECT_TIMEOUT).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The whole budget of each call: every attempt, and the pauses between
    /// them, end within it. Past it the call fails with
    /// [`Error::DeadlineExceeded`] (or the last attempt's error, when no
    /// further attempt could fit). Each attempt sends the time left as
    /// `grpc-timeout`, so the server gives up when the caller does. Default
    /// [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Bound on each attempt, within [`timeout`](Self::timeout): an attempt
    /// still unanswered after it is abandoned, and a read is tried again
    /// while the call's budget lasts; three in a row on one endpoint eject
    /// it (see [`endpoint`](Self::endpoint)). Set it for a read to survive a
    /// hung server. Default: none, an attempt may use all the time left.
    #[must_use]
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// Whether [`connect`](Self::connect) returns at once and connects on the
    /// first call (`true`, the default), so an application can start before
    /// SessionStore does; or connects first and fails if it cannot (`false`).
    /// An eager connect tries every endpoint at once and returns as soon as
    /// one connects.
    #[must_use]
    pub fn lazy(mut self, lazy: bool) -> Self {
        self.lazy = lazy;
        self
    }

    /// Attempts a call gets in all, the first included; `1` turns retries off
    /// and `0` counts as `1`.
    ///
    /// Reads (get, count, list) are retried on UNAVAILABLE (Redis or the
    /// server unreachable, a connection cut mid-call), on the server's load
    /// shedding ([`Error::Overloaded`]) and on an attempt that ran out of its
    /// [`attempt_timeout`](Self::attempt_timeout). Writes (create, revoke,
    /// login attempts) are retried only when the server provably never
    /// processed the request (its connection could not be opened; or the
    /// server turned it away unprocessed: a connection it was closing with a
    /// GOAWAY, as at its `MAX_CONNECTION_AGE`, or `REFUSED_STREAM`): any
    /// other failure may come after the write took effect. Retries also need
    /// the shared retry budget ([`retry_throttling`](Self::retry_throttling)),
    /// except those of requests that never left, the first retry of a call
    /// the server turned away unprocessed (which is not counted here either),
    /// and those of reads whose connection broke while another endpoint is
    /// available. Default
    /// [`DEFAULT_MAX_ATTEMPTS`](Self::DEFAULT_MAX_ATTEMPTS).
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.retry.max_attempts = attempts.max(1);
        self
    }

    /// Pause before the first retry; each further one doubles it, up to
    /// [`max_backoff`](Self::max_backoff), and waits between half and all of
    /// that at random. A pause that would end past the call's budget is not
    /// taken: the call fails with its last error instead. Default
    /// [`DEFAULT_INITIAL_BACKOFF`](Self::DEFAULT_INITIAL_BACKOFF).
    #[must_use]
    pub fn initial_backoff(mut self, backoff: Duration) -> Self {
        self.retry.initial_backoff = backoff;
        self
    }

    /// The longest pause between two attempts. Default
    /// [`DEFAULT_MAX_BACKOFF`](Self::DEFAULT_MAX_BACKOFF).
    #[must_use]
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.retry.max_backoff = backoff;
        self
    }

    /// The retry budget shared by all calls of the client and its clones, as
    /// gRPC's retry throttling: it holds `max_tokens`; each attempt failing
    /// with a retryable failure takes one, each success gives back
    /// `token_ratio`; retries are made only while more than half are left.
    /// So retries cannot multiply load during an outage: once most calls
    /// fail, each costs one attempt. Exempt: a request that never left, the
    /// first retry of a call the server turned away unprocessed (a connection
    /// aged out fails every call queued on it at once), and a read whose
    /// connection broke (an endpoint that died) retried while another
    /// endpoint is available; one server dying must not spend the budget
    /// once per call in flight on it. `max_tokens` must be 1 to 1000 and
    /// `token_ratio` above 0 and at most `max_tokens` (checked by
    /// [`connect`](Self::connect)). Defaults
    /// [`DEFAULT_RETRY_MAX_TOKENS`](Self::DEFAULT_RETRY_MAX_TOKENS) and
    /// [`DEFAULT_RETRY_TOKEN_RATIO`](Self::DEFAULT_RETRY_TOKEN_RATIO).
    #[must_use]
    pub fn retry_throttling(mut self, max_tokens: u32, token_ratio: f64) -> Self {
        self.retry_max_tokens = max_tokens;
        self.retry_token_ratio = token_ratio;
        self
    }

    /// Sends `authorization: Bearer <token>` with every call, for a server
    /// that requires one. Only to `https://` endpoints unless
    /// [`allow_plaintext_token`](Self::allow_plaintext_token); replaceable
    /// later with [`SessionClient::set_bearer_token`]. Never printed by
    /// `Debug`. Default: none.
    #[must_use]
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.bearer_token = Some(token.into());
        self
    }

    /// Allows the bearer token to travel to `http://` endpoints. Only for a
    /// hop that is encrypted by other means, such as a service-mesh sidecar
    /// (Istio, Linkerd) that upgrades the connection to mutual TLS: anyone
    /// who can read plaintext traffic could otherwise take the token. Default
    /// `false`: a token with an `http://` endpoint is an [`Error::Config`].
    #[must_use]
    pub fn allow_plaintext_token(mut self, allow: bool) -> Self {
        self.allow_plaintext_token = allow;
        self
    }

    /// Trusts the CA certificate(s) in `pem` (the file's contents, not its
    /// path) for `https://` endpoints, instead of the operating system's
    /// roots (the default).
    #[must_use]
    pub fn ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.ca_certificate = Some(pem.into());
        self
    }

    /// Presents this client certificate chain and private key (both PEM
    /// contents) to `https://` endpoints, for servers that require mutual
    /// TLS.
    #[must_use]
    pub fn identity(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.tls.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Expects the server's certificate to be for `name` rather than the
    /// endpoint's host: for endpoints given by IP address, or behind a
    /// load balancer with another name.
    #[must_use]
    pub fn tls_domain_name(mut self, name: impl Into<String>) -> Self {
        self.tls.domain_name = Some(name.into());
        self
    }

    /// Turns on the near-cache: [`get_session`](SessionClient::get_session)
    /// and [`get_user_session`](SessionClient::get_user_session) answer from
    /// memory, without a network round trip, for up to `max_entries` sessions
    /// (sessions not looked up lately make room: CLOCK), kept
    /// true by revocations the
    /// server pushes (`WatchRevocations`). Off by default.
    ///
    /// A session is answered from memory when it was found by an earlier
    /// call (never "not found": a session created a moment later is found),
    /// is not past its `expires_at` by Redis's clock, belongs to the user
    /// given (for `get_user_session`), and the revocation stream is healthy:
    /// its first message arrived, and some message (a revocation or a
    /// heartbeat, every second by default) within
    /// [`near_cache_max_staleness`](Self::near_cache_max_staleness).
    /// Otherwise the call goes to the server as without the cache.
    ///
    /// **Expiry by Redis's clock.** This host's wall clock is never used:
    /// the stream's resets and heartbeats tell Redis's time, and the cache
    /// counts on from the latest with the monotonic clock ([`Instant`]). A
    /// session is therefore answered from memory at most the stream's
    /// delivery latency after Redis's `expires_at` (milliseconds), however
    /// far this host's wall clock is off. A server too old to tell Redis's
    /// time (no `redis_time` on its stream) never has lookups answered from
    /// memory: every call goes to it, as without the cache.
    ///
    /// [`Instant`]: std::time::Instant
    ///
    /// **The bound.** A session revoked by another client or process may be
    /// answered as alive by this one for at most the stream's delivery
    /// latency (milliseconds) while the stream is healthy, and never longer
    /// than `max_staleness` when it is not. Revocations made through this
    /// client (and its clones) apply to its cache before the call returns.
    /// A caller that needs "once RevokeSession returns, no process finds the
    /// session" must not turn the cache on.
    ///
    /// The client holds one stream (on one of its endpoints, on a connection
    /// of its own, with its bearer token), replaced every
    /// [`near_cache_stream_lifetime`](Self::near_cache_stream_lifetime)
    /// without emptying the cache (the new stream takes over while the old
    /// one still works), and reopened with backoff (100 ms doubling to 5 s,
    /// jittered) after it ends. Everything cached is dropped when the
    /// stream ends or falls silent without a replacement in place, and when
    /// the server says it may have missed revocations (a reset; every new
    /// stream opens with one, so the cache starts cold when its stream had
    /// to be reopened, such as after a server restart).
    /// The stream's task is spawned by [`connect`](Self::connect), lazy or
    /// not, and stops when the last clone of the client is dropped.
    ///
    /// `max_entries` must be above zero (checked by
    /// [`connect`](Self::connect)); memory is taken as sessions are cached,
    /// not up front: about 250 bytes per session with an ip, a 110-byte user
    /// agent and a device in its metadata (a metadata string many sessions
    /// share, such as a user agent, is kept once; about 360 bytes when every
    /// session's user agent differs), about 200 without metadata or
    /// with [`near_cache_metadata(false)`](Self::near_cache_metadata)
    /// (README, *Near-cache*, sizing). Lookups on several threads scale:
    /// the sessions are sharded, and a lookup takes only a read lock on its
    /// shard, striped by thread (eight stripes: threads rarely share one).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use session_client::SessionClient;
    ///
    /// # async fn run() -> Result<(), session_client::Error> {
    /// let client = SessionClient::builder("http://127.0.0.1:50051")
    ///     .near_cache(100_000)
    ///     .connect()
    ///     .await?;
    /// // The first check calls the server; the next ones are answered from
    /// // memory until the session is revoked or expires.
    /// let alive = client.get_user_session("user-42", "jti-7f3a").await?.is_some();
    /// # let _ = alive;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn near_cache(mut self, max_entries: usize) -> Self {
        self.near_cache = Some(max_entries);
        self
    }

    /// How long the near-cache may go without a message on its revocation
    /// stream and still answer from memory: past it, lookups go to the
    /// server, the cache is flushed and the stream reopened. The longest a
    /// revoked session can be answered as alive when the stream breaks
    /// silently. Keep it above the server's REVOCATION_HEARTBEAT_MS (two to
    /// three heartbeats), or the cache will keep emptying itself. Must be
    /// above zero (checked by [`connect`](Self::connect)); ignored without
    /// [`near_cache`](Self::near_cache). Default
    /// [`DEFAULT_NEAR_CACHE_MAX_STALENESS`](Self::DEFAULT_NEAR_CACHE_MAX_STALENESS).
    #[must_use]
    pub fn near_cache_max_staleness(mut self, max_staleness: Duration) -> Self {
        self.near_cache_max_staleness = max_staleness;
        self
    }

    /// How long the near-cache uses one revocation stream before it opens a
    /// replacement beside it. The replacement takes over without emptying
    /// the cache when its first message arrives while the old stream still
    /// works; the old one's revocations keep being applied for
    /// `max_staleness` more, then it is closed (a revocation in flight on it
    /// is not lost).
    ///
    /// Why: the server closes every connection at its MAX_CONNECTION_AGE
    /// (300 s by default: a GOAWAY, then an abrupt close after
    /// MAX_CONNECTION_AGE_GRACE), and a stream the server cuts empties the
    /// cache. Each stream has a connection of its own, so keep this plus
    /// `max_staleness` plus a connect below the server's MAX_CONNECTION_AGE
    /// (or at most below age plus grace) and the server never has to cut it.
    /// Must be above zero (checked by [`connect`](Self::connect)); ignored
    /// without [`near_cache`](Self::near_cache). Default
    /// [`DEFAULT_NEAR_CACHE_STREAM_LIFETIME`](Self::DEFAULT_NEAR_CACHE_STREAM_LIFETIME).
    #[must_use]
    pub fn near_cache_stream_lifetime(mut self, lifetime: Duration) -> Self {
        self.near_cache_stream_lifetime = lifetime;
        self
    }

    /// Whether the near-cache keeps each session's
    /// [`metadata`](crate::Session::metadata). With `false`, a session
    /// answered from memory has an empty `metadata` map (an answer from the
    /// server still carries it): the cache keeps only what validity needs
    /// (the ids, the times, the family), about half the memory per session
    /// with an ip, a user agent and a device in the metadata, and lookups
    /// that read less memory (README, *Near-cache*, sizing). Default `true`;
    /// ignored without [`near_cache`](Self::near_cache).
    #[must_use]
    pub fn near_cache_metadata(mut self, keep: bool) -> Self {
        self.near_cache_metadata = keep;
        self
    }
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the token or the private key.
        f.debug_struct("Builder")
            .field("endpoints", &self.endpoints)
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("lazy", &self.lazy)
            .field("retry", &self.retry)
            .field("retry_max_tokens", &self.retry_max_tokens)
            .field("retry_token_ratio", &self.retry_token_ratio)
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .field("allow_plaintext_token", &self.allow_plaintext_token)
            .field("dns_refresh", &self.dns_refresh)
            .field("ca_certificate", &self.tls.ca_certificate.is_some())
            .field(
                "identity",
                &self.tls.identity.as_ref().map(|_| "<redacted>"),
            )
            .field("tls_domain_name", &self.tls.domain_name)
            .field("near_cache", &self.near_cache)
            .field("near_cache_max_staleness", &self.near_cache_max_staleness)
            .field(
                "near_cache_stream_lifetime",
                &self.near_cache_stream_lifetime,
            )
            .field("near_cache_metadata", &self.near_cache_metadata)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::client::SessionClient;

    /// The defaults are the documented ones, and Debug prints neither token nor key.
    #[test]
    fn defaults_are_the_documented_ones_and_debug_hides_secrets() {
        let builder = SessionClient::builder("http://127.0.0.1:50051")
            .bearer_token("s3cret")
            .identity("CERT", "PRIVATE KEY BYTES")
            .max_attempts(0);
        assert_eq!(builder.connect_timeout, Duration::from_secs(5));
        assert_eq!(builder.timeout, Duration::from_secs(2));
        assert_eq!(builder.attempt_timeout, None);
        assert_eq!(
            (builder.retry_max_tokens, builder.retry_token_ratio),
            (10, 0.1)
        );
        assert!(!builder.allow_plaintext_token);
        assert!(builder.lazy);
        assert_eq!(builder.retry.max_attempts, 1);
        assert_eq!(builder.retry.initial_backoff, Duration::from_millis(50));
        assert_eq!(builder.near_cache, None, "the near-cache is opt-in");
        assert_eq!(builder.near_cache_max_staleness, Duration::from_secs(3));
        assert_eq!(builder.near_cache_stream_lifetime, Duration::from_secs(240));
        assert!(builder.near_cache_metadata, "metadata kept by default");
        let debug = format!("{builder:?}");
        assert!(!debug.contains("s3cret") && !debug.contains("PRIVATE KEY BYTES"));
    }
}
