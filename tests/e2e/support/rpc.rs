//! Calls on the generated client that several areas make the same way.

use std::time::Duration;

use sessionstore::v1::{
    CreateSessionRequest, CreateSessionResponse, GetSessionRequest, GetUserSessionCountRequest,
    ListUserSessionsRequest, RecordLoginAttemptRequest, RecordLoginAttemptResponse,
    ResetLoginAttemptsRequest, ResetLoginAttemptsResponse, RevocationReason,
    RevokeAllUserSessionsRequest, RevokeOtherUserSessionsRequest, RevokeOtherUserSessionsResponse,
    RevokeSessionRequest, Session, WatchRevocationsRequest, WatchRevocationsResponse,
    session_store_client::SessionStoreClient,
};
use tokio_stream::StreamExt;
use tonic::{Streaming, transport::Channel};

use super::{OnNeedle, PrivateRedis, TestServer, config_on, redis_relay, wait_until};

/// The generated client, on a plain channel.
pub(crate) type Client = SessionStoreClient<Channel>;

/// Creates the session `token` for `user`, with no metadata and the default TTL.
pub(crate) async fn create(client: &mut Client, user: &str, token: &str) -> CreateSessionResponse {
    client
        .create_session(CreateSessionRequest {
            user_id: user.into(),
            token_id: token.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// The session `token` names, looked up with the owner `hint` (may be empty).
pub(crate) async fn get(client: &mut Client, token: &str, hint: &str) -> Option<Session> {
    client
        .get_session(GetSessionRequest {
            token_id: token.into(),
            user_id: hint.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
}

/// Revokes the session `token` names, with the owner `hint` (may be empty);
/// whether a live session was revoked.
pub(crate) async fn revoke(client: &mut Client, token: &str, hint: &str) -> bool {
    client
        .revoke_session(RevokeSessionRequest {
            token_id: token.into(),
            user_id: hint.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .revoked
}

/// Revokes every session of `user`; how many were live.
pub(crate) async fn revoke_all(client: &mut Client, user: &str) -> u32 {
    client
        .revoke_all_user_sessions(RevokeAllUserSessionsRequest {
            user_id: user.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .revoked_count
}

/// The live sessions of `user`, newest first.
pub(crate) async fn list(client: &mut Client, user: &str) -> Vec<Session> {
    client
        .list_user_sessions(ListUserSessionsRequest {
            user_id: user.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sessions
}

/// How many live sessions `user` has.
pub(crate) async fn count(client: &mut Client, user: &str) -> u32 {
    client
        .get_user_session_count(GetUserSessionCountRequest {
            user_id: user.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .count
}

/// A login attempt from `ip` for `account` (may be empty), presenting the
/// device token `device_token` (may be empty); the verdict.
pub(crate) async fn record_attempt(
    client: &mut Client,
    ip: &str,
    account: &str,
    device_token: &str,
) -> RecordLoginAttemptResponse {
    client
        .record_login_attempt(RecordLoginAttemptRequest {
            ip: ip.into(),
            account: account.into(),
            device_token: device_token.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// A successful login from `ip` for `account` (may be empty):
/// ResetLoginAttempts with the device token `presented` (may be empty),
/// issuing a new one when `issue`.
pub(crate) async fn reset_attempts(
    client: &mut Client,
    ip: &str,
    account: &str,
    presented: &str,
    issue: bool,
) -> ResetLoginAttemptsResponse {
    client
        .reset_login_attempts(ResetLoginAttemptsRequest {
            ip: ip.into(),
            account: account.into(),
            issue_device_token: issue,
            device_token: presented.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Whether `client` (a near-cache, say) stops answering the session `token`
/// of `user` within `limit`, asked every 20 ms.
pub(crate) async fn gone_within(
    limit: Duration,
    client: &session_client::SessionClient,
    user: &str,
    token: &str,
) -> bool {
    wait_until(limit, || async {
        client
            .get_user_session(user, token)
            .await
            .unwrap()
            .is_none()
    })
    .await
}

/// Whether a lookup of `request()` gets an answer (found or not) within
/// `limit`, asked every 20 ms: calls work again after an outage.
pub(crate) async fn lookups_work_within(
    limit: Duration,
    client: &Client,
    request: impl Fn() -> GetSessionRequest,
) -> bool {
    wait_until(limit, || {
        let mut client = client.clone();
        let request = request();
        async move { client.get_session(request).await.is_ok() }
    })
    .await
}

/// Whether `client` (a session-client, perhaps answering from its
/// near-cache) finds `user`'s session `token`.
pub(crate) async fn found(client: &session_client::SessionClient, user: &str, token: &str) -> bool {
    client
        .get_user_session(user, token)
        .await
        .unwrap()
        .is_some()
}

/// A new revocation stream, once its first message (a reset) arrived
/// within `limit`.
pub(crate) async fn stream_starts(
    client: &mut Client,
    limit: Duration,
) -> Streaming<WatchRevocationsResponse> {
    let mut stream = client
        .watch_revocations(WatchRevocationsRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(limit, stream.next())
        .await
        .expect("the stream's first message did not come in time")
        .unwrap()
        .unwrap();
    assert!(first.reset, "{first:?}");
    stream
}

/// Creates a session and returns it, with its family.
pub(crate) async fn login(client: &mut Client, user: &str, token: &str) -> Session {
    let created = create(client, user, token).await;
    assert!(created.created, "{user}/{token}: {created:?}");
    created.session.unwrap()
}

/// RevokeOtherUserSessions keeping `keep`, which must answer.
pub(crate) async fn revoke_others(
    client: &mut Client,
    user: &str,
    keep: &str,
) -> RevokeOtherUserSessionsResponse {
    client
        .revoke_other_user_sessions(RevokeOtherUserSessionsRequest {
            user_id: user.into(),
            token_id: keep.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// This host's clock, in ms since the epoch (the Redis under test shares it).
pub(crate) fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// How long [`direct_and_held`]'s relay holds a command back: long enough
/// for a few rotations by another server on a loaded machine.
pub(crate) const HELD: Duration = Duration::from_millis(1000);

/// Two servers on one private Redis: `direct`, and `held`, whose commands
/// naming `needle` reach Redis [`HELD`] late (with ZRANGE, a
/// RevokeOtherUserSessions on it has read its kept session and waits before
/// reading the index; with the user's `revoked:{user}:` keys, it has read
/// the index and waits before its revocation). `held` is warmed up
/// (connections, scripts loaded) by one such call of its own. Both give
/// Redis 5 s (the held call's round trips wait on a loaded machine).
pub(crate) async fn direct_and_held(
    redis: &PrivateRedis,
    needle: &str,
    tune: impl Fn(&mut session_server::Config),
) -> (TestServer, TestServer) {
    let mut config = config_on(redis);
    config.redis_timeout_ms = 5000;
    tune(&mut config);
    let direct = TestServer::start_with(config.clone()).await;
    config.redis_url = redis_relay(redis.port, needle.into(), OnNeedle::Delay(HELD)).await;
    let held = TestServer::start_with(config).await;
    let mut client = direct.client().await;
    login(&mut client, "warm", "w-1").await;
    login(&mut client, "warm", "w-2").await;
    let warm = revoke_others(&mut held.client().await, "warm", "w-1").await;
    assert_eq!((warm.kept, warm.revoked_count), (true, 1));
    (direct, held)
}

/// The next `n` revocations `stream` carries, in order, as (user, token,
/// reason); each message must come within `limit`.
pub(crate) async fn next_revocations(
    stream: &mut Streaming<WatchRevocationsResponse>,
    n: usize,
    limit: Duration,
) -> Vec<(String, String, RevocationReason)> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let message = tokio::time::timeout(limit, stream.next())
            .await
            .expect("the revocations came")
            .unwrap()
            .unwrap();
        seen.extend(message.revocations.into_iter().map(|r| {
            let reason = r.reason();
            (r.user_id, r.token_id, reason)
        }));
    }
    seen
}
