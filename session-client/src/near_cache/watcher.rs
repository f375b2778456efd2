//! The near-cache's network side: the task that holds the revocation stream
//! (`WatchRevocations`) for one client, each stream in a task of its own on a
//! connection of its own, replaced make before break and reopened with
//! backoff. What each message means for the cache is decided by the state in
//! the parent module ([`NearCache::received`], [`NearCache::ended`]); this
//! task only opens, follows and closes streams as the cache's roles say (see
//! *Replacing the stream* in the parent module's docs).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use sessionstore::v1::{self as pb, session_store_client::SessionStoreClient};
use tonic::Request;

use super::NearCache;
use crate::{
    balance::{Member, Pool},
    metadata::Auth,
    retry::RetryPolicy,
};

/// Pauses between two attempts to open the revocation stream: from 100 ms
/// (a server restarting, a stream dropped for being slow) doubling to 5 s (a
/// server down, or one that does not serve `WatchRevocations` yet), each
/// with jitter so that a fleet of clients does not reconnect in step.
const RECONNECT: RetryPolicy = RetryPolicy {
    max_attempts: u32::MAX,
    initial_backoff: Duration::from_millis(100),
    max_backoff: Duration::from_secs(5),
};

/// The stream task of one client: spawned by the builder, aborted when the
/// last clone of the client is dropped.
#[derive(Debug)]
pub(crate) struct Watcher {
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Starts holding the revocation stream for `cache` over the client's
    /// endpoints, with its bearer token, each stream replaced after
    /// `lifetime`.
    pub(crate) fn spawn(
        cache: Arc<NearCache>,
        pool: Arc<Pool>,
        auth: Arc<Auth>,
        lifetime: Duration,
    ) -> Self {
        Self {
            task: tokio::spawn(watch(cache, pool, auth, lifetime)),
        }
    }

    /// A task that holds no stream, for a cache driven by its caller
    /// (`bench.rs`).
    #[cfg(feature = "bench-internals")]
    pub(crate) fn idle() -> Self {
        Self {
            task: tokio::spawn(std::future::pending()),
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Dropping the task drops its `JoinSet`, which aborts every stream's
        // task: their calls are cancelled (RST_STREAM) and their connections
        // closed, so the server lets go of them too.
        self.task.abort();
    }
}

/// Holds the stream forever: opens one (each in a task of its own, on a
/// connection of its own), lets the cache decide what each stream's
/// messages mean ([`NearCache::received`]), closes the streams the cache no
/// longer listens to, and opens the next one: `lifetime` after the current
/// one took over (make before break, see the module docs), or after a pause
/// once a stream ended or failed to start (100 ms doubling to 5 s).
async fn watch(cache: Arc<NearCache>, pool: Arc<Pool>, auth: Arc<Auth>, lifetime: Duration) {
    let mut tasks: tokio::task::JoinSet<Followed> = tokio::task::JoinSet::new();
    let mut running: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
    let mut next_id = 0_u64;
    let mut failures = 0_u32;
    let mut retry_at = Instant::now();
    let mut current_since: Option<(u64, Instant)> = None;
    let mut last: Option<Arc<Member>> = None;
    loop {
        let roles = cache.roles();
        running.retain(|id, task| {
            let keep = roles.knows(*id);
            if !keep {
                task.abort();
            }
            keep
        });
        if roles.current != current_since.map(|(id, _)| id) {
            current_since = roles.current.map(|id| (id, Instant::now()));
        }
        let drain_until = roles.draining.map(|(_, until)| until);
        let open_at = match (roles.candidate, current_since) {
            (Some(_), _) => None,
            // One replacement at a time, once the last drain is over.
            (None, Some((_, since))) => Some(
                (since + lifetime)
                    .max(retry_at)
                    .max(drain_until.unwrap_or(retry_at)),
            ),
            (None, None) => Some(retry_at),
        };
        let sleep_until = |at: Option<Instant>| async move {
            match at {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cache.roles_changed.notified() => {}
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                // Aborted tasks (streams the cache let go of) report nothing.
                // The end is told to the cache here rather than by the task,
                // so that the next stream is never opened before the pause
                // this end calls for is known.
                if let Ok(followed) = joined {
                    running.remove(&followed.id);
                    cache.ended(followed.id, followed.ended_at);
                    failures = if followed.synced { 1 } else { failures.saturating_add(1) };
                    retry_at = Instant::now() + RECONNECT.backoff(failures);
                }
            }
            () = sleep_until(open_at) => {
                match pool.pick(last.as_ref()) {
                    Some(member) => {
                        let id = next_id;
                        next_id += 1;
                        cache.open(id);
                        let task = tasks.spawn(follow(cache.clone(), id, member.clone(), auth.clone()));
                        running.insert(id, task);
                        last = Some(member);
                    }
                    // No address yet (DNS discovery that resolved nothing).
                    None => {
                        failures = failures.saturating_add(1);
                        retry_at = Instant::now() + RECONNECT.backoff(failures);
                    }
                }
            }
            () = sleep_until(drain_until) => {
                if let Some((id, _)) = roles.draining {
                    cache.ended(id, Instant::now());
                }
            }
        }
    }
}

/// How a stream's task ended.
struct Followed {
    id: u64,
    /// It delivered its reset: a stream that worked is reopened quickly.
    synced: bool,
    /// When its end (or silence, or failure to open) was seen.
    ended_at: Instant,
}

/// One stream, from its opening to its end, on a connection of its own (so
/// that its age is the stream's: see the module docs).
async fn follow(cache: Arc<NearCache>, id: u64, member: Arc<Member>, auth: Arc<Auth>) -> Followed {
    let mut synced = false;
    let silence = cache.max_staleness;
    let run = async {
        let mut stub = SessionStoreClient::new(member.endpoint().connect_lazy());
        let mut request = Request::new(pb::WatchRevocationsRequest {});
        auth.authorize(&mut request);
        // Waiting for the headers counts as silence too: a hung server must
        // not hold the task.
        let mut stream = match tokio::time::timeout(silence, stub.watch_revocations(request)).await
        {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(_)) | Err(_) => return,
        };
        // Ended (shutdown, a slow receiver dropped, a broken connection),
        // silent past the bound, or no longer listened to: done.
        while let Ok(Ok(Some(message))) = tokio::time::timeout(silence, stream.message()).await {
            synced |= message.reset;
            if !cache.received(id, message, Instant::now()) {
                return;
            }
        }
    };
    run.await;
    Followed {
        id,
        synced,
        ended_at: Instant::now(),
    }
}
