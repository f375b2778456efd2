//! Bad input: every rule of the contract refused with INVALID_ARGUMENT naming
//! the field, and oversized requests refused before decoding.

use std::collections::HashMap;

use sessionstore::v1::{
    CreateSessionRequest, GetSessionRequest, GetUserSessionCountRequest, ListUserSessionsRequest,
    RecordLoginAttemptRequest, ResetLoginAttemptsRequest, RevokeAllUserSessionsRequest,
    RevokeOtherUserSessionsRequest, RevokeSessionRequest,
};
use tonic::Code;

use crate::support::{Client, TestServer};

/// Ids that break the identifier rules, with why.
fn bad_ids() -> Vec<(String, &'static str)> {
    vec![
        (String::new(), "empty"),
        ("x".repeat(257), "257 bytes"),
        ("a b".into(), "space"),
        ("a\tb".into(), "tab"),
        ("a{b".into(), "open brace"),
        ("a}b".into(), "close brace"),
        ("a:b".into(), "colon"),
        ("caf\u{e9}".into(), "non-ASCII"),
        ("a\u{7f}".into(), "DEL control"),
    ]
}

fn assert_invalid(result: Result<impl std::fmt::Debug, tonic::Status>, field: &str, case: &str) {
    let status = result.expect_err(case);
    assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
    assert!(
        status.message().contains(field),
        "{case}: message {:?} does not name {field}",
        status.message()
    );
}

fn get(token: &str, hint: &str) -> GetSessionRequest {
    GetSessionRequest {
        token_id: token.into(),
        user_id: hint.into(),
    }
}

fn revoke(token: &str, hint: &str) -> RevokeSessionRequest {
    RevokeSessionRequest {
        token_id: token.into(),
        user_id: hint.into(),
    }
}

fn create(user: &str, token: &str) -> CreateSessionRequest {
    CreateSessionRequest {
        max_lifetime: None,
        user_id: user.into(),
        token_id: token.into(),
        metadata: HashMap::new(),
        ttl: None,
    }
}

/// Every RPC that takes a user_id or token_id refuses each malformed id,
/// naming the field.
#[tokio::test]
async fn malformed_ids_are_refused_by_every_rpc() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for (bad, why) in bad_ids() {
        let case = format!("{why} ({bad:?})");
        let answers = [
            (
                "user_id",
                c.create_session(create(&bad, "t")).await.map(drop),
            ),
            (
                "token_id",
                c.create_session(create("u", &bad)).await.map(drop),
            ),
            ("token_id", c.get_session(get(&bad, "")).await.map(drop)),
            (
                "token_id",
                c.revoke_session(revoke(&bad, "")).await.map(drop),
            ),
            (
                "user_id",
                c.revoke_all_user_sessions(RevokeAllUserSessionsRequest {
                    user_id: bad.clone(),
                })
                .await
                .map(drop),
            ),
            (
                "user_id",
                c.revoke_other_user_sessions(RevokeOtherUserSessionsRequest {
                    user_id: bad.clone(),
                    token_id: "t".into(),
                })
                .await
                .map(drop),
            ),
            (
                "token_id",
                c.revoke_other_user_sessions(RevokeOtherUserSessionsRequest {
                    user_id: "u".into(),
                    token_id: bad.clone(),
                })
                .await
                .map(drop),
            ),
            (
                "user_id",
                c.get_user_session_count(GetUserSessionCountRequest {
                    user_id: bad.clone(),
                })
                .await
                .map(drop),
            ),
            (
                "user_id",
                c.list_user_sessions(ListUserSessionsRequest {
                    user_id: bad.clone(),
                })
                .await
                .map(drop),
            ),
        ];
        for (field, answer) in answers {
            assert_invalid(answer, field, &case);
        }
        if !bad.is_empty() {
            // An empty hint means "no hint"; a malformed one is an error.
            let hinted = [
                c.get_session(get("t", &bad)).await.map(drop),
                c.revoke_session(revoke("t", &bad)).await.map(drop),
            ];
            for answer in hinted {
                assert_invalid(answer, "user_id", &case);
            }
        }
    }
    // The longest valid id is accepted.
    let longest = "y".repeat(256);
    assert!(
        c.create_session(create(&longest, &longest))
            .await
            .unwrap()
            .into_inner()
            .created
    );
}

/// Every method of the contract is served by the real service: each unary
/// method, called with an empty request, answers OK or INVALID_ARGUMENT,
/// never UNIMPLEMENTED (the generated trait's default for a method the
/// service does not write: `build.rs`'s `generate_default_stubs`). The
/// methods come from the descriptor set, so a new RPC is checked here
/// without a line of this test.
#[tokio::test]
async fn every_method_of_the_contract_is_served() {
    use prost::Message;
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let descriptors =
        prost_types::FileDescriptorSet::decode(sessionstore::FILE_DESCRIPTOR_SET).unwrap();
    let service = descriptors
        .file
        .iter()
        .flat_map(|file| file.service.iter().map(move |s| (file, s)))
        .find(|(file, s)| format!("{}.{}", file.package(), s.name()) == sessionstore::SERVICE_NAME)
        .map(|(_, s)| s.clone())
        .expect("the service is in the descriptor set");
    let mut unary = 0;
    for method in &service.method {
        if method.server_streaming() || method.client_streaming() {
            continue;
        }
        unary += 1;
        let path = format!("/{}/{}", sessionstore::SERVICE_NAME, method.name());
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        // An empty message decodes as any proto3 message with every field
        // unset; `()` reads any answer, skipping its fields.
        let answer = grpc
            .unary(
                tonic::Request::new(()),
                path.parse().unwrap(),
                tonic_prost::ProstCodec::<(), ()>::default(),
            )
            .await;
        match answer {
            Ok(_) => {}
            Err(status) => assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}"),
        }
    }
    assert!(unary >= 11, "only {unary} unary methods found");
}

/// Metadata over its limits (entries, key length, value length, empty key) is refused.
#[tokio::test]
async fn metadata_limits_are_enforced() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let cases: Vec<(HashMap<String, String>, &str)> = vec![
        (
            (0..33).map(|i| (format!("k{i}"), "v".into())).collect(),
            "33 entries",
        ),
        ([("k".repeat(65), "v".into())].into(), "65-byte key"),
        ([(String::new(), "v".into())].into(), "empty key"),
        ([("k".into(), "v".repeat(1025))].into(), "1025-byte value"),
    ];
    for (metadata, why) in cases {
        let mut req = create("meta-user", "meta-tok");
        req.metadata = metadata;
        assert_invalid(c.create_session(req).await, "metadata", why);
    }
    let mut at_limits = create("meta-user", "meta-tok");
    at_limits.metadata = (0..32)
        .map(|i| (format!("{i:0>64}"), "v".repeat(1024)))
        .collect();
    let created = c.create_session(at_limits).await.unwrap().into_inner();
    assert!(created.created);
    assert_eq!(created.session.unwrap().metadata.len(), 32);
}

/// A ttl that is zero, negative, malformed, sub-millisecond or above
/// SESSION_TTL_MAX is refused naming ttl.
#[tokio::test]
async fn ttl_must_be_positive_and_within_the_maximum() {
    let mut config = crate::support::test_config();
    config.session_ttl = 60;
    config.session_ttl_max = 120;
    let server = TestServer::start_with(config).await;
    let max = i64::try_from(server.config.session_ttl_max).unwrap();
    let mut c = server.client().await;
    let cases = [
        (0, 0, "zero"),
        (-5, 0, "negative"),
        (0, -1, "negative nanos"),
        (1, 1_000_000_000, "nanos out of range"),
        (max + 1, 0, "above SESSION_TTL_MAX"),
        (1, 500, "sub-millisecond"),
    ];
    for (seconds, nanos, why) in cases {
        let mut req = create("ttl-user", "ttl-tok");
        req.ttl = Some(prost_types::Duration { seconds, nanos });
        assert_invalid(c.create_session(req).await, "ttl", why);
    }
    let mut at_max = create("ttl-user", "ttl-tok");
    at_max.ttl = Some(prost_types::Duration {
        seconds: max,
        nanos: 0,
    });
    assert!(c.create_session(at_max).await.unwrap().into_inner().created);
}

/// Addresses that are not IPv4 or IPv6 are refused naming ip.
#[tokio::test]
async fn login_rpcs_refuse_bad_addresses() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for bad in [
        "",
        "localhost",
        "1.2.3",
        "256.1.1.1",
        "1.2.3.4:80",
        "::g",
        "10.0.0.1/8",
    ] {
        both_login_rpcs_refuse(&mut c, bad, "", "ip", bad).await;
    }
    // An account is any UTF-8 up to 256 bytes.
    let long = "é".repeat(129);
    both_login_rpcs_refuse(&mut c, "192.0.2.1", &long, "account", &long).await;
}

/// RecordLoginAttempt and ResetLoginAttempts from `ip` for `account` are both
/// refused as invalid, naming `field`.
async fn both_login_rpcs_refuse(c: &mut Client, ip: &str, account: &str, field: &str, why: &str) {
    let record = RecordLoginAttemptRequest {
        ip: ip.into(),
        account: account.into(),
        ..Default::default()
    };
    let reset = ResetLoginAttemptsRequest {
        ip: ip.into(),
        account: account.into(),
        ..Default::default()
    };
    let record = c.record_login_attempt(record).await.map(drop);
    let reset = c.reset_login_attempts(reset).await.map(drop);
    for result in [record, reset] {
        assert_invalid(result, field, why);
    }
}

/// A request over the maximum message size is refused with OUT_OF_RANGE before
/// the server decodes it, and the server keeps serving.
#[tokio::test]
async fn oversized_requests_are_refused_before_decoding() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut req = create("big-user", "big-tok");
    req.metadata = [("k".into(), "v".repeat(100 * 1024))].into();
    let status = c.create_session(req).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        c.create_session(create("big-user", "big-tok"))
            .await
            .unwrap()
            .into_inner()
            .created
    );
}
