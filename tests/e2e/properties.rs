//! Property tests of the whole stack: for arbitrary ids, metadata and client
//! addresses, over gRPC against a real Redis, a request is either served
//! exactly as the contract says or refused with INVALID_ARGUMENT naming a field
//! that breaks the contract; never any other code.
//!
//! One server serves the whole run: proptest's runner is synchronous, so the
//! test drives its own Tokio runtime and blocks on each case. The rules are
//! restated here from `session_store.proto`, not taken from the server, so the
//! server is checked against the contract rather than against itself.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::atomic::{AtomicU64, Ordering},
};

use proptest::{
    collection::{hash_map, vec},
    prelude::*,
    sample::select,
    test_runner::{Config, TestCaseError, TestRunner},
};
use sessionstore::v1::{
    CreateSessionRequest, GetSessionRequest, RecordLoginAttemptRequest,
    session_store_client::SessionStoreClient,
};
use tonic::{Code, transport::Channel};

use crate::support::TestServer;

/// Cases per run: enough to meet every rule many times, few enough for a few
/// seconds. `PROPTEST_CASES` overrides it for a longer run.
const CASES: u32 = 128;

/// The contract's limits (`session_store.proto`).
const MAX_ID_LEN: usize = 256;
const MAX_ENTRIES: usize = 32;
const MAX_KEY_LEN: usize = 64;
const MAX_VALUE_LEN: usize = 1024;

/// The identifier rule: 1 to 256 bytes of printable ASCII (0x21-0x7E)
/// without `{`, `}` or `:`.
fn id_ok(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && !matches!(b, b'{' | b'}' | b':'))
}

/// The metadata rule: at most 32 entries, keys 1 to 64 bytes, values at most
/// 1024 bytes.
fn metadata_ok(metadata: &HashMap<String, String>) -> bool {
    metadata.len() <= MAX_ENTRIES
        && metadata
            .iter()
            .all(|(k, v)| (1..=MAX_KEY_LEN).contains(&k.len()) && v.len() <= MAX_VALUE_LEN)
}

/// The address rule: an IPv4 or IPv6 address, as Rust's standard library
/// reads one, once surrounding white space is trimmed.
fn ip_ok(ip: &str) -> bool {
    ip.trim().parse::<IpAddr>().is_ok()
}

/// The fields of a CreateSessionRequest that break the contract.
fn bad_fields(req: &CreateSessionRequest) -> Vec<&'static str> {
    let mut bad = Vec::new();
    if !id_ok(&req.user_id) {
        bad.push("user_id");
    }
    if !id_ok(&req.token_id) {
        bad.push("token_id");
    }
    if !metadata_ok(&req.metadata) {
        bad.push("metadata");
    }
    bad
}

/// The field an INVALID_ARGUMENT message names: it reads `invalid FIELD: why`.
fn named_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("invalid ")?
        .split_once(':')
        .map(|(field, _)| field)
}

/// Printable ASCII without the key delimiters: what a valid id is made of.
fn safe_char() -> impl Strategy<Value = char> {
    select(
        ('!'..='~')
            .filter(|c| !matches!(c, '{' | '}' | ':'))
            .collect::<Vec<_>>(),
    )
}

/// Any character, weighted towards those the rules are about.
fn risky_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => safe_char(),
        4 => select(vec![
            '{', '}', ':', ' ', '\t', '\n', '\0', '\u{7f}', '\u{a0}', 'é', '€', '😀',
        ]),
        1 => any::<char>(),
    ]
}

/// An id as a caller might send it: mostly valid, often not.
fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => vec(safe_char(), 1..=24).prop_map(String::from_iter),
        3 => vec(risky_char(), 0..=12).prop_map(String::from_iter),
        1 => Just(String::new()),
        2 => vec(safe_char(), MAX_ID_LEN - 2..=MAX_ID_LEN + 1).prop_map(String::from_iter),
    ]
}

/// A string of exactly `len` bytes (any characters, then ASCII padding).
fn sized(len: impl Strategy<Value = usize>) -> impl Strategy<Value = String> {
    len.prop_flat_map(|len| {
        vec(
            prop_oneof![3 => any::<char>(), 1 => Just('"'), 1 => Just('\\')],
            0..=len.min(32),
        )
        .prop_map(move |chars| {
            let mut text = String::with_capacity(len);
            for c in chars {
                if text.len() + c.len_utf8() > len {
                    break;
                }
                text.push(c);
            }
            while text.len() < len {
                text.push('x');
            }
            text
        })
    })
}

/// Metadata around the limits: small, full to the limits, or one step over.
fn metadata() -> impl Strategy<Value = HashMap<String, String>> {
    let key = || sized(prop_oneof![1usize..=8, MAX_KEY_LEN - 1..=MAX_KEY_LEN]);
    let value = || sized(prop_oneof![0usize..=16, MAX_VALUE_LEN - 1..=MAX_VALUE_LEN]);
    let bad_entry = prop_oneof![
        (sized(Just(0usize)), value()),
        (sized(MAX_KEY_LEN + 1..=MAX_KEY_LEN + 2), value()),
        (key(), sized(MAX_VALUE_LEN + 1..=MAX_VALUE_LEN + 2)),
    ];
    prop_oneof![
        4 => hash_map(key(), value(), 0..=4),
        3 => hash_map(key(), value(), MAX_ENTRIES - 1..=MAX_ENTRIES),
        1 => hash_map(key(), value(), MAX_ENTRIES + 1..=MAX_ENTRIES + 2),
        1 => (hash_map(key(), value(), 0..=4), bad_entry).prop_map(|(mut map, (k, v))| {
            map.insert(k, v);
            map
        }),
    ]
}

/// A client address as a caller might send it: any address in several
/// spellings, or something that only looks like one.
fn ip() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<IpAddr>().prop_map(|a| a.to_string()),
        1 => any::<IpAddr>().prop_map(|a| format!(" {a}\n")),
        1 => any::<std::net::Ipv4Addr>().prop_map(|a| format!("::FFFF:{a}")),
        1 => any::<u128>().prop_map(|a| {
            let segments = Ipv6Addr::from(a).segments().map(|s| format!("{s:04X}"));
            segments.join(":")
        }),
        1 => any::<[u16; 4]>().prop_map(|o| format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3])),
        1 => any::<IpAddr>().prop_map(|a| format!("[{a}]")),
        1 => any::<IpAddr>().prop_map(|a| format!("{a}/24")),
        1 => any::<Ipv6Addr>().prop_map(|a| format!("{a}%eth0")),
        2 => vec(select("0123456789abcdefABCDEF:. ".chars().collect::<Vec<_>>()), 0..=40)
            .prop_map(String::from_iter),
        1 => any::<String>(),
    ]
}

/// One case: a CreateSession request and a login attempt's address.
fn case() -> impl Strategy<Value = (CreateSessionRequest, String)> {
    ((id(), id(), metadata()), ip()).prop_map(|((user_id, token_id, metadata), ip)| {
        let req = CreateSessionRequest {
            max_lifetime: None,
            user_id,
            token_id,
            metadata,
            ttl: None,
        };
        (req, ip)
    })
}

/// Makes a valid token id unique to this case (keeping it valid and at most
/// 256 bytes), so no case finds a token taken by an earlier one. Invalid ids
/// are left as they are: they must be refused as generated.
fn unique_token(token_id: String) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    if !id_ok(&token_id) {
        return token_id;
    }
    let suffix = format!("-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let keep = token_id.len().min(MAX_ID_LEN - suffix.len());
    // Valid ids are ASCII, so any byte index is a character boundary.
    format!("{}{suffix}", &token_id[..keep])
}

fn fail(context: &str, status: &tonic::Status) -> TestCaseError {
    TestCaseError::fail(format!("{context}: {status:?}"))
}

/// Checks one case against the running server.
async fn check(
    mut client: SessionStoreClient<Channel>,
    mut req: CreateSessionRequest,
    ip: String,
    max_attempts: u32,
) -> Result<(), TestCaseError> {
    req.token_id = unique_token(req.token_id);
    let bad = bad_fields(&req);
    match client.create_session(req.clone()).await {
        Ok(created) => {
            prop_assert!(bad.is_empty(), "accepted although {:?} are invalid", bad);
            let created = created.into_inner();
            prop_assert!(created.created, "a fresh token id was not stored");
            let session = created
                .session
                .ok_or_else(|| TestCaseError::fail("created without a session"))?;
            prop_assert_eq!(&session.user_id, &req.user_id);
            prop_assert_eq!(&session.token_id, &req.token_id);
            prop_assert_eq!(&session.metadata, &req.metadata);
            for hint in [String::new(), req.user_id.clone()] {
                let found = client
                    .get_session(GetSessionRequest {
                        token_id: req.token_id.clone(),
                        user_id: hint.clone(),
                    })
                    .await
                    .map_err(|s| fail("GetSession of a created session", &s))?
                    .into_inner()
                    .session;
                prop_assert_eq!(found.as_ref(), Some(&session), "hint {:?}", hint);
            }
        }
        Err(status) => {
            prop_assert_eq!(status.code(), Code::InvalidArgument, "{:?}", status);
            let named = named_field(status.message());
            prop_assert!(
                named.is_some_and(|f| bad.contains(&f)),
                "{:?} names {:?}, not one of the invalid fields {:?}",
                status.message(),
                named,
                bad
            );
        }
    }

    let valid_ip = ip_ok(&ip);
    match client
        .record_login_attempt(RecordLoginAttemptRequest {
            ip: ip.clone(),
            ..Default::default()
        })
        .await
    {
        Ok(verdict) => {
            prop_assert!(valid_ip, "accepted ip {:?}", ip);
            let verdict = verdict.into_inner();
            prop_assert!(verdict.attempts >= 1);
            prop_assert_eq!(verdict.allowed, verdict.attempts <= max_attempts);
        }
        Err(status) => {
            prop_assert!(!valid_ip, "refused ip {:?}: {:?}", ip, status);
            prop_assert_eq!(status.code(), Code::InvalidArgument, "{:?}", status);
            prop_assert_eq!(named_field(status.message()), Some("ip"));
        }
    }
    Ok(())
}

/// For arbitrary user ids, token ids, metadata and addresses: CreateSession
/// either stores the exact session, which GetSession returns with and without
/// the user hint, or answers INVALID_ARGUMENT naming an invalid field; and
/// RecordLoginAttempt answers OK for an address, INVALID_ARGUMENT naming `ip`
/// for anything else. No other code, ever.
#[test]
fn any_request_is_served_or_refused_naming_its_field() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(TestServer::start());
    let client = runtime.block_on(server.client());
    let max_attempts = server.config.rate_limit_max_attempts;
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CASES);
    let mut runner = TestRunner::new(Config {
        cases,
        // Each run uses fresh keys; a failure prints its shrunk input instead.
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case(), |(req, ip)| {
        runtime.block_on(check(client.clone(), req, ip, max_attempts))
    });
    runtime.block_on(server.shutdown());
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
