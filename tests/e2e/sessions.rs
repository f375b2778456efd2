//! Sessions: create, get, revoke, revoke-all, count and list, their semantics
//! and the key layout in Redis.

use std::{collections::HashMap, time::Duration};

use session_server::store::LimitPolicy;
use sessionstore::v1::{CreateSessionRequest, CreateSessionResponse, ListUserSessionsRequest};

use crate::support::{Client, TestServer, count, get, inspect, list, revoke, revoke_all};

fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn create(client: &mut Client, user: &str, token: &str) -> CreateSessionResponse {
    client
        .create_session(CreateSessionRequest {
            max_lifetime: None,
            user_id: user.into(),
            token_id: token.into(),
            metadata: meta(&[("ip", "10.0.0.1")]),
            ttl: None,
        })
        .await
        .unwrap()
        .into_inner()
}

fn millis(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds * 1000 + i64::from(ts.nanos) / 1_000_000
}

/// A created session is found by token alone and with the owner hint, with its
/// metadata and an expiry SESSION_TTL after its creation.
#[tokio::test]
async fn create_then_get_with_and_without_hint() {
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let created = create(&mut client, "alice", "tok-1").await;
    assert!(created.created);
    assert!(created.evicted_token_ids.is_empty());
    let session = created.session.expect("created session is returned");
    assert_eq!(session.user_id, "alice");
    assert_eq!(session.token_id, "tok-1");
    assert_eq!(session.metadata, meta(&[("ip", "10.0.0.1")]));
    let lifetime =
        millis(session.expires_at.as_ref().unwrap()) - millis(session.created_at.as_ref().unwrap());
    assert_eq!(lifetime, 900_000, "default SESSION_TTL is 900 s");

    assert_eq!(get(&mut client, "tok-1", "").await, Some(session.clone()));
    assert_eq!(get(&mut client, "tok-1", "alice").await, Some(session));
    assert_eq!(
        get(&mut client, "tok-1", "bob").await,
        None,
        "a wrong hint finds nothing"
    );
    assert_eq!(get(&mut client, "no-such-token", "").await, None);
}

/// Sessions live under the spec's keys, braces kept as hash tags, with the TTL
/// on the session key and an index scored by expiry that expires with it.
#[tokio::test]
async fn keys_follow_the_spec_layout() {
    let server = TestServer::start().await;
    let prefix = server.config.key_prefix.clone();
    let mut client = server.client().await;
    let session = create(&mut client, "u-keys", "t-keys")
        .await
        .session
        .unwrap();

    let config = &server.config;
    let session_key = format!("{prefix}session:{{u-keys}}:{{t-keys}}");
    let json: String = inspect(config, redis::cmd("GET").arg(&session_key)).await;
    let stored: serde_like::Stored = serde_like::parse(&json);
    assert_eq!(stored.user_id, "u-keys");
    let ttl: i64 = inspect(config, redis::cmd("PTTL").arg(&session_key)).await;
    assert!((899_000..=900_000).contains(&ttl), "session key ttl {ttl}");

    let index = format!("{prefix}user_sessions:{{u-keys}}");
    let members: Vec<(String, f64)> = inspect(
        config,
        redis::cmd("ZRANGE")
            .arg(&index)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES"),
    )
    .await;
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].0, "t-keys");
    assert_eq!(
        members[0].1 as i64,
        millis(session.expires_at.as_ref().unwrap())
    );
    let index_ttl: i64 = inspect(config, redis::cmd("PTTL").arg(&index)).await;
    assert!(
        index_ttl > 0 && index_ttl <= 900_000,
        "index ttl {index_ttl}"
    );
}

/// A TTL of `seconds`, as a request carries it.
fn seconds(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

/// Minimal JSON field extraction, so the test checks the stored format without
/// depending on the server's types.
mod serde_like {
    pub(crate) struct Stored {
        pub(crate) user_id: String,
    }

    pub(crate) fn parse(json: &str) -> Stored {
        let value: serde_json::Value = serde_json::from_str(json).expect("session is JSON");
        for field in ["token_id", "metadata", "created_at_ms", "expires_at_ms"] {
            assert!(
                value.get(field).is_some(),
                "stored session lacks {field}: {json}"
            );
        }
        Stored {
            user_id: value["user_id"].as_str().unwrap().to_string(),
        }
    }
}

/// Offering a live token id again, for the same user or another, is refused and
/// leaves the first session exactly as it was.
#[tokio::test]
async fn a_live_token_id_cannot_be_taken_again() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let first = create(&mut client, "owner", "shared-tok")
        .await
        .session
        .unwrap();

    for user in ["owner", "intruder"] {
        let again = client
            .create_session(CreateSessionRequest {
                max_lifetime: None,
                user_id: user.into(),
                token_id: "shared-tok".into(),
                metadata: meta(&[("ip", "6.6.6.6")]),
                ttl: seconds(5),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!again.created, "{user} re-used a live token id");
        if user == "owner" {
            // A retried create: the existing session, not the new request's.
            assert_eq!(again.session.as_ref(), Some(&first));
        } else {
            assert!(again.session.is_none());
        }
    }
    assert_eq!(
        get(&mut client, "shared-tok", "").await,
        Some(first.clone())
    );
    assert_eq!(get(&mut client, "shared-tok", "intruder").await, None);
    assert_eq!(count(&mut client, "intruder").await, 0);
    assert_eq!(count(&mut client, "owner").await, 1);
}

/// A revoked token id stays reserved to its user: another user cannot claim it
/// while a JWT carrying it could still be presented.
#[tokio::test]
async fn a_revoked_token_id_is_not_handed_to_another_user() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    create(&mut client, "first", "reused").await;
    assert!(revoke(&mut client, "reused", "").await);
    assert!(!create(&mut client, "second", "reused").await.created);
    assert_eq!(get(&mut client, "reused", "").await, None);
}

/// RevokeSession ends the session at once, with or without the hint; a second
/// revoke, a wrong hint or an unknown token revokes nothing.
#[tokio::test]
async fn revoke_session_takes_effect_immediately() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    create(&mut client, "carol", "c-1").await;
    create(&mut client, "carol", "c-2").await;

    assert!(!revoke(&mut client, "c-1", "dave").await);
    assert!(
        get(&mut client, "c-1", "").await.is_some(),
        "wrong hint left it alone"
    );

    assert!(revoke(&mut client, "c-1", "").await);
    assert_eq!(get(&mut client, "c-1", "").await, None);
    assert!(revoke(&mut client, "c-2", "carol").await);
    assert_eq!(get(&mut client, "c-2", "carol").await, None);

    assert!(!revoke(&mut client, "c-1", "").await);
    assert!(!revoke(&mut client, "never-was", "").await);
    assert_eq!(count(&mut client, "carol").await, 0);
}

/// RevokeAllUserSessions ends every session of the user, counts them, and
/// leaves other users alone.
#[tokio::test]
async fn revoke_all_ends_every_session_of_the_user() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for token in ["e-1", "e-2", "e-3"] {
        assert!(create(&mut client, "erin", token).await.created);
    }
    create(&mut client, "frank", "f-1").await;

    assert_eq!(revoke_all(&mut client, "erin").await, 3);
    for token in ["e-1", "e-2", "e-3"] {
        assert_eq!(get(&mut client, token, "").await, None, "{token} survived");
        assert_eq!(
            get(&mut client, token, "erin").await,
            None,
            "{token} survived"
        );
    }
    assert_eq!(count(&mut client, "erin").await, 0);
    assert_eq!(count(&mut client, "frank").await, 1);
    assert_eq!(revoke_all(&mut client, "erin").await, 0);
    // The user can sign in again afterwards.
    assert!(create(&mut client, "erin", "e-4").await.created);
}

/// ListUserSessions returns exactly the live sessions, newest first.
#[tokio::test]
async fn list_is_newest_first_and_exact() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for token in ["l-1", "l-2", "l-3"] {
        create(&mut client, "gina", token).await;
        // Distinct creation milliseconds make the order observable.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    revoke(&mut client, "l-2", "gina").await;
    let list = list(&mut client, "gina").await;
    let tokens: Vec<_> = list.iter().map(|s| s.token_id.as_str()).collect();
    assert_eq!(tokens, ["l-3", "l-1"]);
    assert!(
        list.iter()
            .all(|s| s.user_id == "gina" && s.metadata["ip"] == "10.0.0.1")
    );
    let empty = client
        .list_user_sessions(ListUserSessionsRequest {
            user_id: "nobody".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(empty.sessions.is_empty());
}

/// A session created with a 1 s ttl ends exactly then: found before, gone
/// after, and no longer counted or listed.
#[tokio::test]
async fn a_session_ends_with_its_ttl() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let short = client
        .create_session(CreateSessionRequest {
            max_lifetime: None,
            user_id: "hank".into(),
            token_id: "short".into(),
            metadata: HashMap::new(),
            ttl: seconds(1),
        })
        .await
        .unwrap()
        .into_inner();
    let session = short.session.unwrap();
    assert_eq!(
        millis(session.expires_at.as_ref().unwrap()) - millis(session.created_at.as_ref().unwrap()),
        1000
    );
    create(&mut client, "hank", "long").await;
    assert!(get(&mut client, "short", "").await.is_some());
    assert_eq!(count(&mut client, "hank").await, 2);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(&mut client, "short", "").await, None);
    assert_eq!(get(&mut client, "short", "hank").await, None);
    assert_eq!(count(&mut client, "hank").await, 1);
    let list = list(&mut client, "hank").await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].token_id, "long");
}

/// 50 concurrent CreateSession calls for one user leave exactly
/// MAX_SESSIONS_PER_USER live sessions, and every evicted session is really gone.
#[tokio::test]
async fn concurrent_creates_never_exceed_the_cap() {
    let server = TestServer::start().await;
    let max = server.config.max_sessions_per_user;
    let client = server.client().await;
    let calls = (0..50).map(|i| {
        let mut client = client.clone();
        tokio::spawn(async move { create(&mut client, "ivan", &format!("i-{i}")).await })
    });
    let mut evicted = Vec::new();
    for call in calls {
        let response = call.await.unwrap();
        assert!(response.created, "evict_oldest always makes room");
        evicted.extend(response.evicted_token_ids);
    }
    let mut client = client;
    assert_eq!(count(&mut client, "ivan").await, max);
    assert_eq!(evicted.len(), 50 - max as usize);
    let list = list(&mut client, "ivan").await;
    assert_eq!(list.len(), max as usize);
    for token in &evicted {
        assert_eq!(
            get(&mut client, token, "").await,
            None,
            "evicted {token} is still live"
        );
        assert!(list.iter().all(|s| &s.token_id != token));
    }
}

/// At the cap, evict_oldest revokes the session closest to expiry and names it.
#[tokio::test]
async fn evict_oldest_names_the_evicted_session() {
    let server = TestServer::start_tuned(|c| c.max_sessions_per_user = 2).await;
    let mut client = server.client().await;
    create(&mut client, "judy", "j-1").await;
    tokio::time::sleep(Duration::from_millis(3)).await;
    create(&mut client, "judy", "j-2").await;
    let third = create(&mut client, "judy", "j-3").await;
    assert!(third.created);
    assert_eq!(third.evicted_token_ids, ["j-1"]);
    assert_eq!(get(&mut client, "j-1", "").await, None);
    assert!(get(&mut client, "j-2", "").await.is_some());
    assert_eq!(count(&mut client, "judy").await, 2);
}

/// Under the reject policy a user at the cap gets created=false and keeps the
/// sessions they have; the cap holds under concurrency.
#[tokio::test]
async fn reject_policy_refuses_past_the_cap() {
    let server = TestServer::start_tuned(|c| {
        c.max_sessions_per_user = 3;
        c.session_limit_policy = LimitPolicy::Reject;
    })
    .await;
    let client = server.client().await;
    let calls = (0..20).map(|i| {
        let mut client = client.clone();
        tokio::spawn(async move { create(&mut client, "kim", &format!("k-{i}")).await.created })
    });
    let mut created = 0;
    for call in calls {
        created += u32::from(call.await.unwrap());
    }
    assert_eq!(created, 3);
    let mut client = client;
    assert_eq!(count(&mut client, "kim").await, 3);
    let refused = create(&mut client, "kim", "k-extra").await;
    assert!(!refused.created);
    assert!(refused.evicted_token_ids.is_empty());
    assert_eq!(get(&mut client, "k-extra", "").await, None);
}
