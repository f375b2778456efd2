//! A handle on a near-cache without a client or a server, for the scale
//! measurement (`examples/near_cache_scale.rs`, BENCHMARKS.md): fills,
//! lookups, revocations and resets driven directly, as the stream and the
//! client's calls would. Only built with the `bench-internals` feature; not
//! part of the client's API (hidden, and may change at any time).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use sessionstore::v1 as pb;

use super::{CompactSession, NearCache, Revocation};
use crate::{SessionClient, types::Session};

/// A near-cache synced to a stream of its own (stream id 0).
#[derive(Debug, Clone)]
pub struct BenchCache {
    cache: Arc<NearCache>,
}

impl BenchCache {
    /// An empty cache of `max_entries`; `metadata: false` keeps only what
    /// validity needs (`Builder::near_cache_metadata(false)`).
    pub fn new(max_entries: usize, max_staleness: Duration, metadata: bool) -> Self {
        Self {
            cache: NearCache::with_metadata(max_entries, max_staleness, metadata),
        }
    }

    /// The stream's first message: a reset telling Redis's clock.
    pub fn sync(&self, redis_now: SystemTime) {
        self.cache.open(0);
        self.reset(redis_now);
    }

    /// A reset on the current stream: flushes everything.
    pub fn reset(&self, redis_now: SystemTime) {
        let message = pb::WatchRevocationsResponse {
            revocations: Vec::new(),
            reset: true,
            redis_time: Some(redis_now.into()),
            shortened: Vec::new(),
        };
        self.cache.received(0, message, Instant::now());
    }

    /// A heartbeat telling Redis's clock.
    pub fn heartbeat(&self, redis_now: SystemTime) {
        let message = pb::WatchRevocationsResponse {
            revocations: Vec::new(),
            reset: false,
            redis_time: Some(redis_now.into()),
            shortened: Vec::new(),
        };
        self.cache.received(0, message, Instant::now());
    }

    /// A lookup's miss answered by the server: registered, then completed.
    /// Returns whether it was cached.
    #[allow(clippy::too_many_arguments)]
    pub fn fill(
        &self,
        user_id: &str,
        token_id: &str,
        family_id: &str,
        metadata: HashMap<String, String>,
        created_at: SystemTime,
        expires_at: SystemTime,
    ) -> bool {
        let session = Session {
            user_id: user_id.to_owned(),
            token_id: token_id.to_owned(),
            metadata,
            created_at,
            expires_at,
            family_id: family_id.to_owned(),
            family_expires_at: Some(expires_at + Duration::from_secs(86_400)),
        };
        self.cache
            .begin_fill(token_id, Some(user_id))
            .complete(&session)
    }

    /// `get_session` (`user_id: None`) or `get_user_session` from memory.
    pub fn lookup(&self, token_id: &str, user_id: Option<&str>) -> Option<Session> {
        self.cache.lookup(token_id, user_id)
    }

    /// [`SessionClient::check_user_session`](crate::SessionClient::check_user_session)'s
    /// answer from memory (`user_id: None`: any user's).
    pub fn lookup_compact(&self, token_id: &str, user_id: Option<&str>) -> Option<CompactSession> {
        self.cache.lookup_compact(token_id, user_id)
    }

    /// [`SessionClient::with_cached_session`](crate::SessionClient::with_cached_session)'s
    /// lookup: `read` of the cached session's view (`user_id: None`: any
    /// user's).
    pub fn lookup_view<R>(
        &self,
        token_id: &str,
        user_id: Option<&str>,
        read: impl FnOnce(super::SessionView<'_>) -> R,
    ) -> Option<R> {
        self.cache.lookup_view(token_id, user_id, read)
    }

    /// A client of `endpoint` (lazy: nothing is connected until a call
    /// misses) whose near-cache is this one: to measure lookups through
    /// the client's public methods. Must run inside a Tokio runtime.
    ///
    /// # Errors
    ///
    /// As [`Builder::connect`](crate::Builder::connect).
    pub async fn client(&self, endpoint: &str) -> crate::Result<SessionClient> {
        let client = SessionClient::builder(endpoint)
            .lazy(true)
            .connect()
            .await?;
        client
            .with_driven_cache(self.cache.clone())
            .ok_or_else(|| crate::Error::Config("client cloned".into()))
    }

    /// A revocation from the stream: one session (`token_id`), or every
    /// session of the user created at or before `revoked_at`.
    pub fn revoke(&self, user_id: &str, token_id: Option<&str>, revoked_at: Option<SystemTime>) {
        self.cache.apply(&[Revocation {
            user_id: user_id.to_owned(),
            token_id: token_id.map(str::to_owned),
            revoked_at,
        }]);
    }

    /// The cache's counters.
    pub fn stats(&self) -> crate::NearCacheStats {
        self.cache.stats()
    }
}
