//! Property tests of the Redis key layout and the validation in front of it:
//! ids are accepted exactly when the contract allows, a valid id can never make
//! two requests share a key, and client addresses map to rate-limit keys by
//! the /64 rule. Generated ids lean on the characters that would break the key
//! layout if they got through: `{`, `}`, `:`, white space, non-ASCII, empty and
//! over-long.
//!
//! These complement the example tests in `model.rs` and `store/`; the
//! end-to-end counterpart (the same rules seen over gRPC) is
//! `tests/e2e/properties.rs`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::LazyLock,
};

use proptest::{collection::vec, prelude::*, sample::select};

use crate::{
    error::Error,
    model::{ClientAddr, MAX_ID_LEN, TokenId, UserId},
    store::{Settings, Store},
};

/// The contract's identifier rule, written out independently of `model.rs`:
/// 1 to 256 bytes, each printable ASCII (0x21..=0x7E) other than `{`, `}`, `:`.
fn is_valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && !matches!(b, b'{' | b'}' | b':'))
}

/// Printable ASCII without the key delimiters: what a valid id is made of.
fn safe_char() -> impl Strategy<Value = char> {
    let safe: Vec<char> = ('!'..='~')
        .filter(|c| !matches!(c, '{' | '}' | ':'))
        .collect();
    select(safe)
}

/// Any character, weighted towards the ones that matter to keys or validation.
fn risky_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => safe_char(),
        4 => select(vec![
            '{', '}', ':', ' ', '\t', '\n', '\r', '\0', '\u{7f}', '\u{a0}', '\u{200b}', 'é', '€',
            '😀', '\u{fffd}',
        ]),
        1 => any::<char>(),
    ]
}

/// Fragments that, concatenated, tend to build ids which would collide in a
/// naive key layout (`a}:{b` as a user id, say).
fn fragment_id() -> impl Strategy<Value = String> {
    vec(
        select(vec![
            "a", "b", "}:{", "}", "{", ":", ":{", "}:", " ", "é", "-",
        ]),
        0..6,
    )
    .prop_map(|parts| parts.concat())
}

/// A valid id: short, or at the length limit.
fn valid_id() -> impl Strategy<Value = String> {
    prop_oneof![
        // A tiny alphabet, so distinct pairs often concatenate to the same text.
        4 => vec(select(vec!['a', 'b', '-']), 1..=6).prop_map(String::from_iter),
        4 => vec(safe_char(), 1..=32).prop_map(String::from_iter),
        1 => vec(safe_char(), MAX_ID_LEN - 2..=MAX_ID_LEN).prop_map(String::from_iter),
    ]
}

/// Any id a caller might send: mostly valid-looking, often dangerous, empty,
/// around the length limit, or arbitrary Unicode.
fn any_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => vec(safe_char(), 1..=16).prop_map(String::from_iter),
        4 => vec(risky_char(), 0..=16).prop_map(String::from_iter),
        2 => fragment_id(),
        1 => Just(String::new()),
        2 => (
            vec(safe_char(), MAX_ID_LEN - 3..=MAX_ID_LEN + 2),
            proptest::option::of((any::<prop::sample::Index>(), risky_char())),
        )
            .prop_map(|(chars, insert)| {
                let mut id: String = chars.into_iter().collect();
                if let Some((at, c)) = insert {
                    id.insert(at.index(id.len() + 1), c);
                }
                id
            }),
        1 => any::<String>(),
    ]
}

/// A KEY_PREFIX as the configuration accepts it: no braces, at most 128 bytes.
fn key_prefix() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        vec(select(vec!['a', 'z', '0', ':', '-', '_', '.']), 1..=16).prop_map(String::from_iter),
    ]
}

/// `Store::new` starts no connection, but its pool wants a runtime to exist.
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
});

/// The default settings, parsed once rather than per case (half the run time).
static SETTINGS: LazyLock<Settings> = LazyLock::new(|| {
    crate::Config::defaults()
        .store_settings()
        .expect("default settings are valid")
});

fn store(prefix: &str) -> Store {
    let _runtime = RUNTIME.enter();
    let settings = Settings {
        key_prefix: prefix.into(),
        ..SETTINGS.clone()
    };
    Store::new(settings).expect("a store on the default URL")
}

/// A store without a key prefix, built once for the tests that need no other.
static UNPREFIXED: LazyLock<Store> = LazyLock::new(|| store(""));

/// Which record a key holds, with the ids in it: what a key must identify.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Key {
    Session { user: String, token: String },
    Index { user: String },
    Owner { token: String },
    RateLimit { addr: String },
}

/// Reads a key back into its record. That this inverts key construction for
/// every valid input proves the layout injective: two different records can
/// never share a key, whatever family they belong to.
fn decode_key(prefix: &str, key: &str) -> Option<Key> {
    let key = key.strip_prefix(prefix)?;
    // The part inside one `{...}`: it may not contain `}`.
    fn tagged(rest: &str) -> Option<(&str, &str)> {
        let (inside, after) = rest.strip_prefix('{')?.split_once('}')?;
        Some((inside, after))
    }
    if let Some(rest) = key.strip_prefix("session:") {
        let (user, rest) = tagged(rest)?;
        let (token, rest) = tagged(rest.strip_prefix(':')?)?;
        rest.is_empty().then(|| Key::Session {
            user: user.into(),
            token: token.into(),
        })
    } else if let Some(rest) = key.strip_prefix("user_sessions:") {
        let (user, rest) = tagged(rest)?;
        rest.is_empty().then(|| Key::Index { user: user.into() })
    } else if let Some(rest) = key.strip_prefix("token_owner:") {
        let (token, rest) = tagged(rest)?;
        rest.is_empty().then(|| Key::Owner {
            token: token.into(),
        })
    } else if let Some(rest) = key.strip_prefix("rate_limit:login:addr:") {
        let (addr, rest) = tagged(rest)?;
        rest.is_empty()
            .then(|| Key::RateLimit { addr: addr.into() })
    } else {
        None
    }
}

/// The Redis Cluster hash tag of a key: the text inside its first `{...}`.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let len = key[open + 1..].find('}')?;
    (len > 0).then(|| &key[open + 1..open + 1 + len])
}

fn user(id: &str) -> UserId {
    UserId::parse("user_id", id.into()).expect("generated as valid")
}

fn token(id: &str) -> TokenId {
    TokenId::parse("token_id", id.into()).expect("generated as valid")
}

/// Every key a store would build for one session's user and token.
fn session_keys(store: &Store, u: &str, t: &str) -> [String; 3] {
    [
        store.session_key(&user(u), t),
        store.index_key(&user(u)),
        store.owner_key(&token(t)),
    ]
}

/// The textual forms of `addr` a caller may send: its canonical form, padded
/// with white space, the IPv6 form spelled out in upper case, and an IPv4
/// address mapped into IPv6.
fn spellings(addr: IpAddr) -> Vec<String> {
    let mut forms = vec![addr.to_string(), format!(" {addr}\t")];
    match addr {
        IpAddr::V4(v4) => forms.push(format!("::ffff:{v4}")),
        IpAddr::V6(v6) => {
            let long: Vec<String> = v6.segments().iter().map(|s| format!("{s:X}")).collect();
            forms.push(long.join(":"));
        }
    }
    forms
}

/// An IPv6 address from its /64 network and interface id.
fn v6(network: u64, host: u64) -> Ipv6Addr {
    Ipv6Addr::from((u128::from(network) << 64) | u128::from(host))
}

fn ip_like_char() -> impl Strategy<Value = char> {
    select(
        "0123456789abcdefABCDEFxX:.%/[] \t-+"
            .chars()
            .collect::<Vec<_>>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// UserId and TokenId accept an id exactly when the contract's rule
    /// does, and refuse every other one naming the field: never a panic.
    #[test]
    fn ids_are_accepted_exactly_when_the_contract_allows(id in any_id()) {
        let valid = is_valid_id(&id);
        let as_user = UserId::parse("user_id", id.clone());
        let as_token = TokenId::parse("token_id", id.clone());
        prop_assert_eq!(as_user.is_ok(), valid, "user_id {:?}", id);
        prop_assert_eq!(as_token.is_ok(), valid, "token_id {:?}", id);
        match (as_user, as_token) {
            (Ok(u), Ok(t)) => {
                prop_assert_eq!(u.as_str(), id.as_str());
                prop_assert_eq!(t.as_str(), id.as_str());
            }
            (Err(u), Err(t)) => {
                let u_field = matches!(u, Error::InvalidArgument { field: "user_id", .. });
                let t_field = matches!(t, Error::InvalidArgument { field: "token_id", .. });
                prop_assert!(u_field, "{:?}", u);
                prop_assert!(t_field, "{:?}", t);
            }
            (u, t) => prop_assert!(false, "user {:?} and token {:?} disagree", u, t),
        }
    }

    /// Every key of a valid session reads back as exactly the record it was
    /// built for (so the layout is injective across users, tokens and key
    /// families), and its hash tag is the user id or token id, so all of a
    /// user's keys share a Redis Cluster slot.
    #[test]
    fn keys_read_back_as_their_ids(prefix in key_prefix(), u in valid_id(), t in valid_id()) {
        let store = store(&prefix);
        let [session, index, owner] = session_keys(&store, &u, &t);
        prop_assert_eq!(
            decode_key(&prefix, &session),
            Some(Key::Session { user: u.clone(), token: t.clone() })
        );
        prop_assert_eq!(decode_key(&prefix, &index), Some(Key::Index { user: u.clone() }));
        prop_assert_eq!(decode_key(&prefix, &owner), Some(Key::Owner { token: t.clone() }));
        prop_assert_eq!(hash_tag(&session), Some(u.as_str()));
        prop_assert_eq!(hash_tag(&index), Some(u.as_str()));
        prop_assert_eq!(hash_tag(&owner), Some(t.as_str()));
    }

    /// Two distinct valid (user_id, token_id) pairs never share a session
    /// key; distinct users never share an index key, distinct tokens never an
    /// owner key. The second pair is often the first re-split (`ab`,`c` and
    /// `a`,`bc`), the case a layout without delimiters gets wrong.
    #[test]
    fn distinct_valid_ids_never_share_a_key(
        prefix in key_prefix(),
        (u1, t1) in (valid_id(), valid_id()),
        other in (valid_id(), valid_id()),
        split in any::<prop::sample::Index>(),
        resplit in any::<bool>(),
    ) {
        let (u2, t2) = if resplit {
            let joined = format!("{u1}{t1}");
            let at = 1 + split.index(joined.len() - 1);
            (joined[..at].to_string(), joined[at..].to_string())
        } else {
            other
        };
        prop_assume!(is_valid_id(&u2) && is_valid_id(&t2));
        let store = store(&prefix);
        let [s1, i1, o1] = session_keys(&store, &u1, &t1);
        let [s2, i2, o2] = session_keys(&store, &u2, &t2);
        prop_assert_eq!(s1 == s2, (&u1, &t1) == (&u2, &t2), "{} / {}", s1, s2);
        prop_assert_eq!(i1 == i2, u1 == u2, "{} / {}", i1, i2);
        prop_assert_eq!(o1 == o2, t1 == t2, "{} / {}", o1, o2);
    }

    /// Whenever two different (user_id, token_id) pairs would spell the same
    /// session key (`a}:{b`,`c` and `a`,`b}:{c`), validation refuses at least
    /// one of them: only refused ids can collide.
    #[test]
    fn pairs_that_would_collide_are_refused(u in fragment_id(), t in fragment_id()) {
        // The text between the key's outer braces, `session:{` and `}`.
        let inner = format!("{u}}}:{{{t}");
        for (at, _) in inner.match_indices("}:{") {
            let (u2, t2) = (&inner[..at], &inner[at + 3..]);
            if (u2, t2) == (u.as_str(), t.as_str()) {
                continue;
            }
            let both_accepted = UserId::parse("user_id", u.clone()).is_ok()
                && TokenId::parse("token_id", t.clone()).is_ok()
                && UserId::parse("user_id", u2.into()).is_ok()
                && TokenId::parse("token_id", t2.into()).is_ok();
            prop_assert!(!both_accepted, "({:?}, {:?}) and ({:?}, {:?}) collide", u, t, u2, t2);
        }
    }

    /// Every spelling of every IP address is accepted and maps to one
    /// rate-limit key, whose hash tag is its canonical form: the IPv4 address
    /// (also when IPv4-mapped), or the IPv6 /64 network.
    #[test]
    fn every_ip_maps_to_a_rate_limit_key(prefix in key_prefix(), addr in any::<IpAddr>()) {
        let store = store(&prefix);
        let canonical = match addr {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                // IPv4-compatible (`::a.b.c.d`, but not `::` or `::1`).
                None if (2..1 << 32).contains(&u128::from(v6)) => v6.to_ipv4().expect("in ::/96").to_string(),
                None => format!("{}/64", Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
            },
        };
        for text in spellings(addr) {
            let parsed = ClientAddr::parse(&text);
            prop_assert!(parsed.is_ok(), "{:?} refused: {:?}", text, parsed);
            let key = store.rate_limit_key(&parsed.expect("checked above"));
            prop_assert_eq!(
                decode_key(&prefix, &key),
                Some(Key::RateLimit { addr: canonical.clone() }),
                "{:?}", text
            );
            prop_assert_eq!(hash_tag(&key), Some(canonical.as_str()));
        }
    }

    /// IPv6 addresses in one /64 share a rate-limit key, addresses in
    /// different /64 networks never do. (IPv4-mapped addresses, `::ffff:0:0/96`
    /// inside `::/64`, count as their IPv4 address instead.)
    #[test]
    fn ipv6_shares_a_key_exactly_within_a_64(
        n1 in any::<u64>(),
        n2 in prop_oneof![Just(None), any::<u64>().prop_map(Some)],
        h1 in any::<u64>(),
        h2 in any::<u64>(),
    ) {
        let n2 = n2.unwrap_or(n1);
        let (a, b) = (v6(n1, h1), v6(n2, h2));
        prop_assume!(crate::model::embedded_ipv4(a).is_none() && crate::model::embedded_ipv4(b).is_none());
        let store = &*UNPREFIXED;
        let key = |addr: Ipv6Addr| {
            ClientAddr::parse(&addr.to_string()).map(|c| store.rate_limit_key(&c))
        };
        let (ka, kb) = (key(a), key(b));
        prop_assert!(ka.is_ok() && kb.is_ok());
        prop_assert_eq!(ka.ok() == kb.ok(), n1 == n2, "{} / {}", a, b);
    }

    /// With any RATE_LIMIT_IPV6_PREFIX, two IPv6 addresses (neither carrying
    /// an IPv4 address) share a rate-limit key exactly when their first
    /// `prefix` bits agree.
    #[test]
    fn ipv6_shares_a_key_exactly_within_the_prefix(
        prefix in 32u8..=128,
        a in any::<u128>(),
        flip in 0u32..128,
    ) {
        let b = a ^ (1u128 << flip);
        let (a, b) = (Ipv6Addr::from(a), Ipv6Addr::from(b));
        prop_assume!(crate::model::embedded_ipv4(a).is_none() && crate::model::embedded_ipv4(b).is_none());
        let key = |addr: Ipv6Addr| ClientAddr::parse_with_prefix(&addr.to_string(), prefix).ok();
        // Bit `flip` counted from the least significant: inside the prefix
        // when it is among the top `prefix` bits.
        let differs_in_prefix = 127 - flip < u32::from(prefix);
        prop_assert_eq!(key(a) == key(b), !differs_in_prefix, "{} / {} /{}", a, b, prefix);
    }

    /// Distinct IPv4 addresses never share a key, and no IPv4 key is an IPv6 one.
    #[test]
    fn ipv4_keys_are_per_address(a in any::<Ipv4Addr>(), b in any::<Ipv4Addr>(), n in any::<u64>()) {
        let store = &*UNPREFIXED;
        let key = |ip: &str| ClientAddr::parse(ip).map(|c| store.rate_limit_key(&c)).ok();
        prop_assert_eq!(key(&a.to_string()) == key(&b.to_string()), a == b);
        prop_assume!(n != 0);
        prop_assert_ne!(key(&a.to_string()), key(&v6(n, 1).to_string()));
    }

    /// The address parser never panics, and accepts a string exactly when it
    /// is an address once trimmed of white space; a refusal names `ip`.
    #[test]
    fn ip_parser_accepts_exactly_addresses(
        text in prop_oneof![
            3 => vec(ip_like_char(), 0..48).prop_map(String::from_iter),
            1 => any::<String>(),
            1 => any::<IpAddr>().prop_map(|a| format!("[{a}]")),
        ]
    ) {
        let parsed = ClientAddr::parse(&text);
        prop_assert_eq!(parsed.is_ok(), text.trim().parse::<IpAddr>().is_ok(), "{:?}", text);
        match parsed {
            Ok(addr) => prop_assert!(!addr.as_str().contains(['{', '}']), "{:?}", addr),
            Err(err) => {
                let names_ip = matches!(err, Error::InvalidArgument { field: "ip", .. });
                prop_assert!(names_ip, "{:?}", err);
            }
        }
    }
}
