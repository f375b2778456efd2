//! Fuzzes what a client controls: the bytes of every request message, decoded
//! by prost as tonic does, then passed through the same validation and
//! conversion as the server's handlers (`session_server::convert` and
//! `session_server::model`), and the results converted back to proto as the
//! handlers do.
//!
//! The first input byte picks the request type; the rest is its protobuf
//! encoding. Besides "never panics", each decoded request is checked against
//! the contract of `session_store.proto`, restated here: accepted exactly when
//! every field is valid, refused as INVALID_ARGUMENT naming an invalid field.

#![no_main]

use std::{
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use session_server::{
    Error, convert,
    model::{ClientAddr, LoginLimit, LoginVerdict, Session},
};
use sessionstore::v1 as pb;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 13 {
        0 => decoded::<pb::CreateSessionRequest>(bytes, create_session),
        1 => decoded::<pb::GetSessionRequest>(bytes, |r| lookup(r.token_id, r.user_id)),
        2 => decoded::<pb::RevokeSessionRequest>(bytes, |r| lookup(r.token_id, r.user_id)),
        3 => decoded::<pb::RevokeAllUserSessionsRequest>(bytes, |r| user(r.user_id)),
        4 => decoded::<pb::GetUserSessionCountRequest>(bytes, |r| user(r.user_id)),
        5 => decoded::<pb::ListUserSessionsRequest>(bytes, |r| user(r.user_id)),
        6 => decoded::<pb::RecordLoginAttemptRequest>(bytes, |r| {
            ip(&r.ip);
            login_fields(&r.account, &r.device_token);
        }),
        7 => decoded::<pb::ResetLoginAttemptsRequest>(bytes, |r| {
            ip(&r.ip);
            login_fields(&r.account, &r.device_token);
        }),
        8 => decoded::<pb::RotateSessionRequest>(bytes, rotate_session),
        9 => decoded::<pb::ExtendSessionRequest>(bytes, extend_session),
        10 => decoded::<pb::ForgetLoginDevicesRequest>(bytes, |r| {
            // Required: the handler refuses an empty account.
            login_fields(&r.account, "");
        }),
        11 => decoded::<pb::RevokeOtherUserSessionsRequest>(bytes, |r| {
            user(r.user_id);
            token(r.token_id);
        }),
        // What the handlers send back: stored sessions and verdicts, whose
        // numbers come from Redis rather than from the caller.
        _ => responses(bytes),
    }
});

/// Runs `check` on the message when the bytes decode as one. Failing to decode
/// is fine (tonic answers INTERNAL for that before any handler runs); panicking
/// is not.
fn decoded<M: Message + Default>(bytes: &[u8], check: impl FnOnce(M)) {
    if let Ok(message) = M::decode(bytes) {
        check(message);
    }
}

/// The identifier rule: 1 to 256 bytes of printable ASCII without `{`, `}`, `:`.
fn id_ok(id: &str) -> bool {
    (1..=256).contains(&id.len())
        && id
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && !matches!(b, b'{' | b'}' | b':'))
}

/// The metadata rule: at most 32 entries, keys 1 to 64 bytes, values at most 1024.
fn metadata_ok(metadata: &std::collections::HashMap<String, String>) -> bool {
    metadata.len() <= 32
        && metadata
            .iter()
            .all(|(k, v)| (1..=64).contains(&k.len()) && v.len() <= 1024)
}

/// The ttl rule as far as it can be checked without the server's settings:
/// positive and well formed (the upper bound and whole milliseconds depend on
/// SESSION_TTL_MAX and are checked by the store).
fn ttl_ok(ttl: Option<&prost_types::Duration>) -> bool {
    ttl.is_none_or(|d| {
        d.seconds >= 0 && (0..1_000_000_000).contains(&d.nanos) && (d.seconds, d.nanos) != (0, 0)
    })
}

/// A refusal must be INVALID_ARGUMENT naming one of the `bad` fields, as the
/// status the handler would send.
fn assert_refused(err: Error, bad: &[&str]) {
    let Error::InvalidArgument { field, .. } = &err else {
        panic!("validation failed with a non-argument error: {err:?}");
    };
    assert!(bad.contains(field), "{field} named, invalid were {bad:?}");
    let field = *field;
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with(&format!("invalid {field}: ")),
        "{:?}",
        status.message()
    );
}

fn create_session(req: pb::CreateSessionRequest) {
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
    if !ttl_ok(req.ttl.as_ref()) {
        bad.push("ttl");
    }
    if !ttl_ok(req.max_lifetime.as_ref()) {
        bad.push("max_lifetime");
    }
    match convert::new_session(req.clone()) {
        Ok(new) => {
            assert!(bad.is_empty(), "accepted although {bad:?} are invalid");
            assert_eq!(new.user_id.as_str(), req.user_id);
            assert_eq!(new.token_id.as_str(), req.token_id);
            assert_eq!(new.metadata, req.metadata);
            // A valid ttl survives the trip to a Duration and back.
            assert_eq!(new.ttl.map(convert::duration_to_proto), req.ttl);
            // The redacted form for logs never panics on any valid id.
            let _ = new.token_id.redacted();
            // The session as the handler would return it, with the ttl's
            // milliseconds standing in for Redis's clock.
            let ms = new
                .ttl
                .map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
            let proto = convert::session_to_proto(Session {
                user_id: new.user_id.into_string(),
                token_id: new.token_id.into_string(),
                metadata: new.metadata,
                family_id: Some("f".repeat(32)),
                family_expires_at_ms: Some(ms.saturating_mul(3)),
                created_at_ms: ms,
                expires_at_ms: ms.saturating_mul(2),
            });
            assert_eq!(proto.user_id, req.user_id);
            assert_eq!(proto.metadata, req.metadata);
        }
        Err(err) => {
            assert!(!bad.is_empty(), "refused a valid request: {err:?}");
            assert_refused(err, &bad);
        }
    }
}

/// GetSession and RevokeSession: a required token id and an optional user hint.
fn lookup(token_id: String, user_id: String) {
    token(token_id);
    match convert::user_hint(user_id.clone()) {
        Ok(None) => assert!(user_id.is_empty()),
        Ok(Some(user)) => {
            assert!(id_ok(&user_id));
            assert_eq!(user.as_str(), user_id);
        }
        Err(err) => {
            assert!(!user_id.is_empty() && !id_ok(&user_id), "{user_id:?}");
            assert_refused(err, &["user_id"]);
        }
    }
}

/// A required token id.
fn token(token_id: String) {
    match convert::token_id(token_id.clone()) {
        Ok(token) => {
            assert!(id_ok(&token_id), "{token_id:?}");
            assert_eq!(token.as_str(), token_id);
        }
        Err(err) => {
            assert!(!id_ok(&token_id), "{token_id:?}");
            assert_refused(err, &["token_id"]);
        }
    }
}

/// The RPCs that take only a required user id.
fn user(user_id: String) {
    match convert::user_id(user_id.clone()) {
        Ok(user) => {
            assert!(id_ok(&user_id), "{user_id:?}");
            assert_eq!(user.as_str(), user_id);
        }
        Err(err) => {
            assert!(!id_ok(&user_id), "{user_id:?}");
            assert_refused(err, &["user_id"]);
        }
    }
}

/// The optional login fields: an account is 1 to 256 bytes of UTF-8 (empty
/// means none) and only its SHA-256 is kept; a device token is 1 to 256 bytes
/// of printable ASCII without spaces (empty means none), kept only hashed.
fn login_fields(account: &str, device_token: &str) {
    match convert::account(account) {
        Ok(None) => assert!(account.is_empty()),
        Ok(Some(key)) => {
            assert!((1..=256).contains(&account.len()), "{account:?}");
            assert_eq!(key.as_str().len(), 64);
            assert!(key.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        }
        Err(err) => {
            assert!(account.len() > 256, "{account:?} refused: {err}");
            assert!(matches!(
                err,
                Error::InvalidArgument {
                    field: "account",
                    ..
                }
            ));
        }
    }
    let ok = device_token.len() <= 256 && device_token.bytes().all(|b| (0x21..=0x7e).contains(&b));
    match convert::device_token(device_token) {
        Ok(None) => assert!(device_token.is_empty()),
        Ok(Some(token)) => {
            assert!(ok, "{device_token:?} accepted");
            let key = token.key();
            assert_eq!(key.len(), 64);
            assert_ne!(key, device_token, "only the hash reaches a key");
        }
        Err(err) => {
            assert!(!ok, "{device_token:?} refused: {err}");
            assert!(matches!(
                err,
                Error::InvalidArgument {
                    field: "device_token",
                    ..
                }
            ));
        }
    }
}

/// RecordLoginAttempt and ResetLoginAttempts: an address, counted per IPv4
/// address or IPv6 /64.
fn ip(text: &str) {
    let expected = text.trim().parse::<IpAddr>().ok();
    match ClientAddr::parse(text) {
        Ok(addr) => {
            let Some(parsed) = expected else {
                panic!("{text:?} accepted but is not an address");
            };
            let canonical = addr.as_str();
            // The canonical form goes inside a key's `{...}` hash tag.
            assert!(!canonical.contains(['{', '}']), "{canonical:?}");
            match canonical.strip_suffix("/64") {
                Some(network) => {
                    let network: Ipv6Addr = network.parse().expect("a /64 network");
                    assert_eq!(u128::from(network) & u128::from(u64::MAX), 0);
                    let IpAddr::V6(v6) = parsed else {
                        panic!("{text:?} is IPv4 but counted as a /64");
                    };
                    assert_eq!(u128::from(v6) >> 64, u128::from(network) >> 64);
                    // Every address of the /64 counts as the same client.
                    let again = ClientAddr::parse(&network.to_string()).expect("an address");
                    assert_eq!(again.as_str(), canonical);
                }
                None => {
                    let v4: std::net::Ipv4Addr = canonical.parse().expect("an IPv4 address");
                    let same = match parsed {
                        IpAddr::V4(a) => a == v4,
                        IpAddr::V6(a) => a.to_ipv4_mapped() == Some(v4),
                    };
                    assert!(same, "{text:?} counted as {canonical:?}");
                }
            }
        }
        Err(err) => {
            assert!(expected.is_none(), "{text:?} refused: {err:?}");
            assert_refused(err, &["ip"]);
        }
    }
}

/// Converts sessions and verdicts with numbers taken from the input: the
/// times and counters come from Redis, so every value must convert.
fn rotate_session(req: pb::RotateSessionRequest) {
    let mut bad = Vec::new();
    for (field, id) in [
        ("user_id", &req.user_id),
        ("family_id", &req.family_id),
        ("token_id", &req.token_id),
        ("new_token_id", &req.new_token_id),
    ] {
        if !id_ok(id) {
            bad.push(field);
        }
    }
    if id_ok(&req.new_token_id) && req.new_token_id == req.token_id {
        bad.push("new_token_id");
    }
    if !metadata_ok(&req.metadata) {
        bad.push("metadata");
    }
    if !ttl_ok(req.ttl.as_ref()) {
        bad.push("ttl");
    }
    match convert::rotation(req.clone()) {
        Ok(rotation) => {
            assert!(bad.is_empty(), "accepted although {bad:?} are invalid");
            assert_eq!(rotation.family_id.as_str(), req.family_id);
            assert_eq!(rotation.new_token_id.as_str(), req.new_token_id);
            assert_ne!(rotation.token_id, rotation.new_token_id);
        }
        Err(err) => {
            assert!(!bad.is_empty(), "refused a valid request: {err:?}");
            assert_refused(err, &bad);
        }
    }
}

fn extend_session(req: pb::ExtendSessionRequest) {
    let mut bad = Vec::new();
    if !id_ok(&req.user_id) {
        bad.push("user_id");
    }
    if !id_ok(&req.token_id) {
        bad.push("token_id");
    }
    if !ttl_ok(req.ttl.as_ref()) {
        bad.push("ttl");
    }
    match convert::extension(req) {
        Ok(_) => assert!(bad.is_empty(), "accepted although {bad:?} are invalid"),
        Err(err) => {
            assert!(!bad.is_empty(), "refused a valid request: {err:?}");
            assert_refused(err, &bad);
        }
    }
}

fn responses(bytes: &[u8]) {
    let mut words = bytes
        .chunks(8)
        .map(|c| c.iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b)));
    let (created, expires, attempts, left) = (
        words.next().unwrap_or(0),
        words.next().unwrap_or(0),
        words.next().unwrap_or(0),
        words.next().unwrap_or(0),
    );
    let session = convert::session_to_proto(Session {
        user_id: "u".into(),
        token_id: "t".into(),
        metadata: Default::default(),
        family_id: None,
        family_expires_at_ms: None,
        created_at_ms: created,
        expires_at_ms: expires,
    });
    for (ms, ts) in [(created, session.created_at), (expires, session.expires_at)] {
        let ts = ts.expect("timestamps are always set");
        let back = u64::try_from(ts.seconds).expect("after the epoch") * 1000
            + u64::try_from(ts.nanos).expect("non-negative") / 1_000_000;
        assert_eq!(back, ms);
    }
    let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
    let verdict = convert::verdict_to_proto(LoginVerdict {
        allowed: attempts <= 5,
        attempts,
        remaining: 5u32.saturating_sub(attempts),
        retry_after: (attempts > 5).then(|| Duration::from_millis(left)),
        refused_by: (attempts > 5).then_some(if attempts % 2 == 0 {
            LoginLimit::Address
        } else {
            LoginLimit::Device
        }),
        decided_at_ms: left,
        device_trusted: attempts % 2 == 1,
    });
    assert_eq!(verdict.device_trusted, attempts % 2 == 1);
    if let Some(after) = verdict.retry_after {
        assert_eq!(
            u64::try_from(after.seconds).expect("non-negative") * 1000
                + u64::try_from(after.nanos).expect("non-negative") / 1_000_000,
            left
        );
    }
}
