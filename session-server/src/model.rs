//! Domain types: validated identifiers, sessions and login-attempt verdicts.
//!
//! Validation lives here, in the constructors, so a value of these types is
//! always one that can be placed in a Redis key: the store never sees an id
//! that could collide with another in the key space.

use std::{collections::HashMap, fmt, time::Duration};

use crate::error::Error;

/// The longest `user_id` or `token_id`, in bytes.
pub const MAX_ID_LEN: usize = 256;
/// The most metadata entries one session may carry.
pub const MAX_METADATA_ENTRIES: usize = 32;
/// The longest metadata key, in bytes.
pub const MAX_METADATA_KEY_LEN: usize = 64;
/// The longest metadata value, in bytes.
pub const MAX_METADATA_VALUE_LEN: usize = 1024;

/// The bytes an id may hold: printable ASCII but `{`, `}` and `:`.
const ID_BYTES: [bool; 256] = {
    let mut allowed = [false; 256];
    let mut byte: u8 = 0;
    loop {
        allowed[byte as usize] =
            byte.is_ascii_graphic() && byte != b'{' && byte != b'}' && byte != b':';
        if byte == u8::MAX {
            break allowed;
        }
        byte += 1;
    }
};

/// Checks one identifier against the contract: 1..=256 bytes of printable
/// ASCII without white space, `{`, `}` or `:`.
///
/// Braces and colons are refused because they delimit the parts of a key
/// (`session:{user}:{token}`); without them no two distinct id pairs can map to
/// the same key, and the first `{...}` stays the Redis Cluster hash tag.
fn validate_id(field: &'static str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(Error::invalid(
            field,
            format!("must be at most {MAX_ID_LEN} bytes, got {}", value.len()),
        ));
    }
    // Byte by byte through a table: every id of every call passes here,
    // and decoding characters cost twice as much (BENCHMARKS.md, "#22 hot
    // path"). A byte of a multi-byte character is not ASCII, so refused;
    // the message then names the character.
    if value.bytes().all(|b| ID_BYTES[usize::from(b)]) {
        return Ok(());
    }
    if let Some(c) = value
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '{' | '}' | ':'))
    {
        return Err(Error::invalid(
            field,
            format!("must be printable ASCII without white space, '{{', '}}' or ':', found {c:?}"),
        ));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates `value`, naming `field` in the error.
            ///
            /// # Errors
            ///
            /// [`Error::InvalidArgument`] when `value` breaks the identifier rules.
            pub fn parse(field: &'static str, value: String) -> Result<Self, Error> {
                validate_id(field, &value)?;
                Ok(Self(value))
            }

            /// The identifier as sent by the caller.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Consumes the id, returning its string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A user identifier (a JWT's `sub`), valid for use in a Redis key.
    UserId
);
id_type!(
    /// A session's token identifier (a JWT's `jti`), valid for use in a Redis key.
    TokenId
);
id_type!(
    /// A session family's identifier, valid for use in a Redis key: the server
    /// makes them (128 random bits, hex), callers only hand them back.
    FamilyId
);

impl FamilyId {
    /// A new family id: 128 bits from the operating system's generator, as
    /// 32 lower-case hex digits.
    ///
    /// # Errors
    ///
    /// [`Error::Internal`] when the operating system's generator fails.
    pub fn generate() -> Result<Self, Error> {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| Error::Internal("the system's random generator failed".into()))?;
        Ok(Self(hex(&bytes)))
    }

    /// A short, one-way tag for logs: the first 8 hex digits of the id's
    /// SHA-256. The id itself is a secret and is never logged.
    pub fn log_tag(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.0.as_bytes());
        hex(&digest.as_ref()[..4])
    }
}

/// Lower-case hex of `bytes`: a table lookup per nibble, not `fmt` (which
/// cost about 250 instructions a byte, 16,000 per device attempt).
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        hex.push(char::from(DIGITS[usize::from(b >> 4)]));
        hex.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    hex
}

impl TokenId {
    /// A shortened form for logs: token ids are bearer-adjacent secrets and are
    /// never logged in full at info level.
    pub fn redacted(&self) -> String {
        let prefix: String = self.0.chars().take(4).collect();
        format!("{prefix}…")
    }
}

/// Free-form data stored with a session, checked against the size limits.
pub type Metadata = HashMap<String, String>;

/// Checks metadata against the contract's limits.
///
/// # Errors
///
/// [`Error::InvalidArgument`] naming `metadata` and the offending key.
pub fn validate_metadata(metadata: &Metadata) -> Result<(), Error> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(Error::invalid(
            "metadata",
            format!(
                "must have at most {MAX_METADATA_ENTRIES} entries, got {}",
                metadata.len()
            ),
        ));
    }
    for (key, value) in metadata {
        if key.is_empty() || key.len() > MAX_METADATA_KEY_LEN {
            return Err(Error::invalid(
                "metadata",
                format!(
                    "keys must be 1 to {MAX_METADATA_KEY_LEN} bytes, got {} bytes",
                    key.len()
                ),
            ));
        }
        if value.len() > MAX_METADATA_VALUE_LEN {
            return Err(Error::invalid(
                "metadata",
                format!(
                    "value of {key:?} must be at most {MAX_METADATA_VALUE_LEN} bytes, got {}",
                    value.len()
                ),
            ));
        }
    }
    Ok(())
}

/// A live session as stored in Redis. Times are Redis-clock milliseconds since
/// the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Session {
    /// The owner.
    pub user_id: String,
    /// The token id, unique across users.
    pub token_id: String,
    /// Caller-supplied data.
    pub metadata: Metadata,
    /// The session's family (one login and its rotations); `None` for a
    /// session stored by a server older than families.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family_id: Option<String>,
    /// The family's absolute end, ms since the epoch by Redis's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family_expires_at_ms: Option<u64>,
    /// Creation time, ms since the epoch by Redis's clock.
    pub created_at_ms: u64,
    /// Expiry time, ms since the epoch by Redis's clock; equals the key's expiry.
    pub expires_at_ms: u64,
}

impl Session {
    /// Parses a session as stored in Redis.
    ///
    /// The layout this server writes (`create_session.lua` appends the times
    /// to serde_json's head: `{"user_id":"…","token_id":"…","metadata":{…},
    /// "family_id":"…","family_expires_at_ms":…,"created_at_ms":…,
    /// "expires_at_ms":…}`, strings without escapes; servers older than
    /// families wrote no family fields) is read
    /// by a direct scan: the generic parser was 6 % of a GetSession's
    /// instructions. Anything else (escapes, white space, another field
    /// order, a value that does not fit) goes through serde_json, so every
    /// JSON document of the same shape still parses as before, with the same
    /// errors.
    ///
    /// # Errors
    ///
    /// serde_json's, when `json` is not a session.
    pub fn from_stored_json(json: &str) -> Result<Self, serde_json::Error> {
        match stored_layout(json, None) {
            Some(session) => Ok(session),
            None => serde_json::from_str(json),
        }
    }

    /// [`Session::from_stored_json`] for a session read under the key of
    /// `user_id` and `token_id`: where the stored ids are these (they are,
    /// unless the value was written by hand under another key), the session
    /// takes these strings instead of copies of the stored ones, two
    /// allocations and their frees fewer a GetSession (BENCHMARKS.md, "#22
    /// hot path"). The session is the same either way.
    ///
    /// # Errors
    ///
    /// serde_json's, when `json` is not a session.
    pub fn from_stored_json_with_ids(
        json: &str,
        user_id: String,
        token_id: String,
    ) -> Result<Self, serde_json::Error> {
        match stored_layout(json, Some((user_id, token_id))) {
            Some(session) => Ok(session),
            None => serde_json::from_str(json),
        }
    }
}

/// `known` when it is `stored`, else a copy of `stored`.
fn reuse(known: String, stored: &str) -> String {
    if known == stored {
        known
    } else {
        stored.to_owned()
    }
}

/// The session in `json` when it is exactly in the stored layout (see
/// [`Session::from_stored_json`]); `None` for anything else. `ids`: the
/// user and token ids the caller holds, taken instead of copies where the
/// stored ones are the same (see [`Session::from_stored_json_with_ids`]).
fn stored_layout(json: &str, ids: Option<(String, String)>) -> Option<Session> {
    let mut at = Scan(json);
    at.eat("{\"user_id\":")?;
    let user_id = at.string()?;
    at.eat(",\"token_id\":")?;
    let token_id = at.string()?;
    at.eat(",\"metadata\":{")?;
    let metadata = if at.eat("}").is_some() {
        Metadata::new()
    } else {
        // Made at the size the first insert would grow an empty map to
        // (hashbrown's smallest table: four buckets, three entries), so the
        // same allocation without the insert's growth path; more entries
        // grow it as before (BENCHMARKS.md, "#22 hot path").
        let mut metadata = Metadata::with_capacity(3);
        loop {
            let key = at.string()?;
            at.eat(":")?;
            let value = at.string()?;
            // A repeated key keeps its last value, as serde_json does.
            metadata.insert(key.to_owned(), value.to_owned());
            if at.eat(",").is_none() {
                at.eat("}")?;
                break metadata;
            }
        }
    };
    let mut family_id = None;
    let mut family_expires_at_ms = None;
    if at.eat(",\"family_id\":").is_some() {
        family_id = Some(at.string()?.to_owned());
        at.eat(",\"family_expires_at_ms\":")?;
        family_expires_at_ms = Some(at.number()?);
    }
    at.eat(",\"created_at_ms\":")?;
    let created_at_ms = at.number()?;
    at.eat(",\"expires_at_ms\":")?;
    let expires_at_ms = at.number()?;
    at.eat("}")?;
    if !at.0.is_empty() {
        return None;
    }
    let (user_id, token_id) = match ids {
        Some((known_user, known_token)) => {
            (reuse(known_user, user_id), reuse(known_token, token_id))
        }
        None => (user_id.to_owned(), token_id.to_owned()),
    };
    Some(Session {
        user_id,
        token_id,
        metadata,
        family_id,
        family_expires_at_ms,
        created_at_ms,
        expires_at_ms,
    })
}

/// The unread rest of a stored session.
struct Scan<'a>(&'a str);

/// Digits of a number that cannot overflow a `u64`: 10^19 - 1 is below
/// 2^64.
const SAFE_DIGITS: usize = 19;

/// Where the JSON string starting at `bytes` (after its opening quote)
/// stops being plain: the first `"`, `\` or control character (below
/// 0x20), if any.
///
/// Eight bytes at a time: a byte at a time with three comparisons cost
/// about 600 instructions a GetSession over a session's ids and metadata
/// (BENCHMARKS.md, "#22 hot path"). In each word, a byte's high bit is set
/// in `found` when the byte is below 0x20 or equal to `"` or `\` after the
/// subtraction's borrows; a borrow can only mark bytes after a byte that
/// really matched, so the lowest marked byte is the first match.
fn string_end(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    /// High bit set where a byte of `word` is below `limit` (at most 0x80).
    const fn below(word: u64, limit: u8) -> u64 {
        word.wrapping_sub(ONES * limit as u64) & !word & HIGHS
    }
    let mut rest = bytes;
    let mut at = 0;
    while let Some((word, tail)) = rest.split_first_chunk::<8>() {
        let word = u64::from_le_bytes(*word);
        let found = below(word, 0x20)
            | below(word ^ (ONES * u64::from(b'"')), 1)
            | below(word ^ (ONES * u64::from(b'\\')), 1);
        if found != 0 {
            // Little-endian: the first byte is the lowest; at most 7.
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
        rest = tail;
    }
    rest.iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|found| at + found)
}

impl<'a> Scan<'a> {
    /// Consumes `literal` if the rest starts with it.
    fn eat(&mut self, literal: &str) -> Option<()> {
        self.0 = self.0.strip_prefix(literal)?;
        Some(())
    }

    /// Consumes a JSON string without escapes or control characters, and
    /// returns its contents.
    fn string(&mut self) -> Option<&'a str> {
        let body = self.0.strip_prefix('"')?;
        let end = string_end(body.as_bytes())?;
        // An ASCII byte, so `end` and `end + 1` are character boundaries.
        if body.as_bytes()[end] != b'"' {
            return None;
        }
        self.0 = &body[end + 1..];
        Some(&body[..end])
    }

    /// Consumes a JSON integer that fits a `u64`.
    fn number(&mut self) -> Option<u64> {
        // Accumulated as it is scanned: one pass, where `str::parse` would
        // scan the digits a second time (about 250 instructions a number,
        // BENCHMARKS.md "#22 hot path"). Nineteen digits always fit a
        // `u64`, so only a twentieth is checked for overflow (a stored
        // time has thirteen).
        let bytes = self.0.as_bytes();
        let mut number: u64 = 0;
        let mut end = 0;
        while let Some(&byte) = bytes.get(end) {
            if !byte.is_ascii_digit() {
                break;
            }
            let digit = u64::from(byte - b'0');
            number = if end < SAFE_DIGITS {
                number * 10 + digit
            } else {
                number.checked_mul(10)?.checked_add(digit)?
            };
            end += 1;
        }
        // JSON has no leading zeros; serde_json says so in its error.
        if end == 0 || (end > 1 && bytes[0] == b'0') {
            return None;
        }
        // Digits are ASCII, so `end` is a character boundary.
        self.0 = &self.0[end..];
        Some(number)
    }
}

/// A session, or every session of a user, ended before its expiry: what the
/// revocation stream carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// The user whose session ended.
    pub user_id: String,
    /// The session that ended; `None` for every session of the user created
    /// at or before `revoked_at_ms`.
    pub token_id: Option<String>,
    /// When, ms since the epoch by Redis's clock (the clock of `created_at_ms`).
    pub revoked_at_ms: u64,
    /// Why.
    pub reason: RevocationReason,
}

/// A live session whose expiry ExtendSession moved earlier: what the
/// revocation stream carries besides revocations, so that caches never
/// answer the session past its new expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortened {
    /// The session's owner.
    pub user_id: String,
    /// The session.
    pub token_id: String,
    /// Its new expiry, ms since the epoch by Redis's clock.
    pub expires_at_ms: u64,
}

/// Why a session ended early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevocationReason {
    /// RevokeSession.
    Revoked,
    /// RevokeAllUserSessions.
    SignedOutEverywhere,
    /// Evicted at the per-user cap by a newer session.
    Evicted,
    /// Rotated away by RotateSession; the family goes on with a successor.
    Rotated,
    /// RotateSession saw a token its family had moved past: the family ended.
    ReuseDetected,
}

/// What CreateSession did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The session was stored; `evicted` lists sessions revoked to make room.
    Created {
        /// The stored session.
        session: Session,
        /// Token ids evicted under the `evict_oldest` policy.
        evicted: Vec<String>,
    },
    /// The same user already has a live session with this token id (a retried
    /// create): nothing changed.
    AlreadyExists {
        /// The existing session.
        session: Session,
    },
    /// Another user holds the token id: a live session or a reservation.
    TokenTaken,
    /// The token id's session was revoked; it is refused while a JWT carrying
    /// it could still be presented.
    TokenRevoked,
    /// The user is at the session cap and the policy is `reject`.
    LimitReached,
}

/// A request to store a new session, validated.
#[derive(Clone, Debug)]
pub struct NewSession {
    /// The owner.
    pub user_id: UserId,
    /// The new token id.
    pub token_id: TokenId,
    /// Validated metadata.
    pub metadata: Metadata,
    /// Lifetime; `None` means the server's SESSION_TTL.
    pub ttl: Option<Duration>,
    /// The family's absolute lifetime; `None` means SESSION_MAX_LIFETIME.
    pub max_lifetime: Option<Duration>,
}

/// A request to rotate a family's session, validated.
#[derive(Clone, Debug)]
pub struct Rotation {
    /// The family's owner.
    pub user_id: UserId,
    /// The family.
    pub family_id: FamilyId,
    /// The token the caller presents.
    pub token_id: TokenId,
    /// The successor's token id; never equal to `token_id`.
    pub new_token_id: TokenId,
    /// The successor's lifetime; `None` means SESSION_TTL.
    pub ttl: Option<Duration>,
    /// The successor's metadata; empty keeps the presented session's.
    pub metadata: Metadata,
}

/// What RotateSession did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RotateOutcome {
    /// The presented session was the family's current one: it is revoked and
    /// `session` is its successor.
    Rotated {
        /// The successor.
        session: Session,
    },
    /// The presented token was rotated within the grace: `session` is the
    /// family's current session. Nothing changed.
    AlreadyRotated {
        /// The family's current session.
        session: Session,
    },
    /// The presented token is one the family moved past: the family is ended.
    ReuseDetected {
        /// The family's session that was revoked.
        revoked: String,
    },
    /// No live family by that id for that user.
    NotFound,
    /// The new token id is, or was, a token id. Nothing changed.
    TokenTaken,
}

mod login;

pub use login::{
    AccountKey, ClientAddr, DEFAULT_IPV6_PREFIX, DeviceToken, LoginLimit, LoginReset, LoginVerdict,
    MAX_ACCOUNT_LEN, MAX_DEVICE_TOKEN_LEN, embedded_ipv4,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff, 0x10]), "000fa5ff10");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn ids_accept_the_printable_range() {
        assert!(UserId::parse("user_id", "a".repeat(MAX_ID_LEN)).is_ok());
        assert!(TokenId::parse("token_id", "abc-DEF_123.~!@#$%^&*()".into()).is_ok());
    }

    #[test]
    fn ids_refuse_key_delimiters_space_and_length() {
        for bad in ["", "a b", "a{b", "a}b", "a:b", "é", "a\u{0}", "tab\t"] {
            let err = UserId::parse("user_id", bad.into()).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidArgument {
                        field: "user_id",
                        ..
                    }
                ),
                "{bad:?}"
            );
        }
        assert!(TokenId::parse("token_id", "a".repeat(MAX_ID_LEN + 1)).is_err());
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let a = ClientAddr::parse("2001:db8:1:2:aaaa::1").unwrap();
        let b = ClientAddr::parse("2001:db8:1:2:bbbb::2").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_str(), "2001:db8:1:2::/64");
        assert_ne!(a, ClientAddr::parse("2001:db8:1:3::1").unwrap());
        assert_eq!(
            ClientAddr::parse("::ffff:192.0.2.1").unwrap().as_str(),
            "192.0.2.1"
        );
        assert!(ClientAddr::parse("300.1.1.1").is_err());
    }

    #[test]
    fn ipv6_prefix_is_configurable_and_ipv4_compatible_counts_as_ipv4() {
        let at = |ip, prefix| ClientAddr::parse_with_prefix(ip, prefix).unwrap();
        assert_eq!(at("2001:db8:1:2::1", 48).as_str(), "2001:db8:1::/48");
        assert_eq!(at("2001:db8:1:2::1", 48), at("2001:db8:1:ffff::1", 48));
        assert_eq!(at("2001:db8::1", 128).as_str(), "2001:db8::1/128");
        assert_ne!(at("2001:db8::1", 128), at("2001:db8::2", 128));
        assert_eq!(at("::192.0.2.1", 64).as_str(), "192.0.2.1");
        assert_eq!(at("::1", 64).as_str(), "::/64");
        assert_ne!(at("::192.0.2.1", 64), at("::1", 64));
        assert_eq!(at("::ffff:192.0.2.1", 32).as_str(), "192.0.2.1");
    }

    #[test]
    fn accounts_are_hashed_and_bounded() {
        let a = AccountKey::parse("alice@example.com").unwrap();
        assert_eq!(a.as_str().len(), 64);
        assert!(!a.as_str().contains("alice"));
        assert_ne!(a, AccountKey::parse("Alice@example.com").unwrap());
        assert!(AccountKey::parse(&"é".repeat(128)).is_ok());
        let too_long = AccountKey::parse(&"a".repeat(MAX_ACCOUNT_LEN + 1)).unwrap_err();
        assert!(matches!(
            too_long,
            Error::InvalidArgument {
                field: "account",
                ..
            }
        ));
        assert!(AccountKey::parse("").is_err());
    }

    #[test]
    fn device_tokens_are_bounded_printable_and_random() {
        let issued = DeviceToken::generate().unwrap();
        assert_eq!(issued.as_str().len(), 64);
        assert_ne!(issued, DeviceToken::generate().unwrap());
        assert_eq!(
            DeviceToken::parse(issued.as_str()).unwrap().key(),
            issued.key()
        );
        assert_ne!(issued.key(), issued.as_str());
        assert!(!format!("{issued:?}").contains(issued.as_str()));
        assert!(DeviceToken::parse(&"a".repeat(MAX_DEVICE_TOKEN_LEN)).is_ok());
        for bad in [
            "".to_string(),
            "a".repeat(MAX_DEVICE_TOKEN_LEN + 1),
            "has space".into(),
            "tab\t".into(),
            "é".into(),
        ] {
            assert!(matches!(
                DeviceToken::parse(&bad),
                Err(Error::InvalidArgument {
                    field: "device_token",
                    ..
                })
            ));
        }
    }

    /// A session in the stored layout, and variants of it that only the
    /// generic parser reads.
    fn stored(user: &str, metadata: &str, created: &str) -> String {
        format!(
            r#"{{"user_id":"{user}","token_id":"t-1","metadata":{{{metadata}}},"created_at_ms":{created},"expires_at_ms":1700000900000}}"#
        )
    }

    #[test]
    fn the_ids_held_are_taken_only_where_they_are_the_stored_ones() {
        let json = stored("u1", r#""ip":"10.0.0.1""#, "1700000000000");
        let plain = Session::from_stored_json(&json).unwrap();
        let with = |user: &str, token: &str| {
            Session::from_stored_json_with_ids(&json, user.into(), token.into()).unwrap()
        };
        // The same session whatever the ids held: the stored ones count.
        assert_eq!(with("u1", "t-1"), plain);
        assert_eq!(with("u2", "t-1"), plain);
        assert_eq!(with("u1", "t-2"), plain);
        assert_eq!(with("", ""), plain);
        // Held ids equal to the stored ones are the strings taken.
        let (user, token) = (String::from("u1"), String::from("t-1"));
        let (user_at, token_at) = (user.as_ptr(), token.as_ptr());
        let session = Session::from_stored_json_with_ids(&json, user, token).unwrap();
        assert_eq!(session.user_id.as_ptr(), user_at);
        assert_eq!(session.token_id.as_ptr(), token_at);
        // Outside the stored layout, the generic parser's session.
        let spaced = format!("{json} ");
        assert_eq!(
            Session::from_stored_json_with_ids(&spaced, "x".into(), "y".into()).unwrap(),
            plain
        );
    }

    #[test]
    fn stored_sessions_parse_as_serde_json_parses_them() {
        let cases = [
            stored(
                "u1",
                r#""ip":"10.0.0.1","ua":"Mozilla/5.0 (X11)""#,
                "1700000000000",
            ),
            stored("u1", "", "0"),
            stored("u1", r#""a":"1","a":"2""#, "1"),
            stored("ü-ñ", r#""ключ":"значение""#, "18446744073709551615"),
            // Escapes, white space, another order: the generic parser.
            stored(r#"u\"1"#, r#""k":"v\\w\n""#, "1"),
            stored("u1", r#""k" : "v""#, "1"),
            format!("{} ", stored("u1", "", "1")),
            r#"{"token_id":"t","user_id":"u","metadata":{},"created_at_ms":1,"expires_at_ms":2}"#
                .to_string(),
            // The layout with a family, as this server writes it.
            r#"{"user_id":"u","token_id":"t","metadata":{"k":"v"},"family_id":"f0","family_expires_at_ms":9,"created_at_ms":1,"expires_at_ms":2}"#
                .to_string(),
        ];
        for json in &cases {
            let direct = Session::from_stored_json(json).unwrap();
            let generic: Session = serde_json::from_str(json).unwrap();
            assert_eq!(direct, generic, "{json}");
        }
        assert!(stored_layout(&cases[0], None).is_some());
        assert!(stored_layout(&cases[3], None).is_some());
        assert!(stored_layout(&cases[4], None).is_none());
        assert!(stored_layout(&cases[7], None).is_none());
        let family = stored_layout(&cases[8], None).unwrap();
        assert_eq!(family.family_id.as_deref(), Some("f0"));
        assert_eq!(family.family_expires_at_ms, Some(9));
        assert_eq!(stored_layout(&cases[0], None).unwrap().family_id, None);
        // Past u64, or with a leading zero: not a stored number.
        for created in ["18446744073709551616", "99999999999999999999", "01", "00"] {
            assert!(
                stored_layout(&stored("u1", "", created), None).is_none(),
                "{created}"
            );
            assert!(Session::from_stored_json(&stored("u1", "", created)).is_err());
        }
        // The largest numbers that fit, with nineteen and twenty digits.
        for (created, ms) in [
            ("9999999999999999999", 9_999_999_999_999_999_999),
            ("18446744073709551615", u64::MAX),
        ] {
            let session = stored_layout(&stored("u1", "", created), None).unwrap();
            assert_eq!(session.created_at_ms, ms, "{created}");
        }
    }

    /// Where each byte of a string stops it being plain, as the word-wide
    /// scan must find it: the first of `"`, `\` and the control characters,
    /// wherever it falls in an eight-byte word.
    #[test]
    fn string_ends_at_the_first_quote_backslash_or_control() {
        for stop in (0u8..0x20).chain([b'"', b'\\']) {
            for at in 0..20 {
                let mut bytes = vec![b'a'; 24];
                bytes[at] = stop;
                // A later stop never hides the first.
                bytes[23] = b'"';
                assert_eq!(string_end(&bytes), Some(at), "{stop:#x} at {at}");
            }
        }
        // The bytes just around the stops, and non-ASCII, never stop it.
        let plain: Vec<u8> = [0x20, 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0x80, 0xa2, 0xdc, 0xff]
            .into_iter()
            .cycle()
            .take(30)
            .collect();
        assert_eq!(string_end(&plain), None);
    }

    proptest::proptest! {
        /// The word-wide scan finds what a byte-by-byte one finds.
        #[test]
        fn string_end_is_the_first_stop(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            let naive = bytes.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
            proptest::prop_assert_eq!(string_end(&bytes), naive);
        }

        /// Any session serde_json writes in the stored field order reads back
        /// whole, by the direct scan when no string needs an escape.
        #[test]
        fn any_stored_session_reads_back(
            user_id in ".{0,12}",
            token_id in "[ -~]{0,12}",
            metadata in proptest::collection::hash_map(".{0,6}", ".{0,12}", 0..4),
            family in proptest::option::of(("[ -~]{0,12}", proptest::num::u64::ANY)),
            created_at_ms: u64,
            expires_at_ms: u64,
        ) {
            let (family_id, family_expires_at_ms) = family.map_or((None, None), |(id, end)| (Some(id), Some(end)));
            let session = Session {
                user_id, token_id, metadata, family_id, family_expires_at_ms, created_at_ms, expires_at_ms,
            };
            let json = serde_json::to_string(&session).unwrap();
            proptest::prop_assert_eq!(Session::from_stored_json(&json).unwrap(), session);
            proptest::prop_assert_eq!(stored_layout(&json, None).is_some(), !json.contains('\\'));
        }
    }

    #[test]
    fn malformed_stored_sessions_fail_as_serde_json_fails() {
        for json in [
            stored("u1", "", "01"),
            stored("u1", "", "18446744073709551616"),
            stored("u1", "", "-1"),
            stored("u1", r#""k":1"#, "1"),
            stored("u1", "", "1")[..40].to_string(),
            format!("{}x", stored("u1", "", "1")),
            String::new(),
        ] {
            let direct = Session::from_stored_json(&json).unwrap_err().to_string();
            let generic = serde_json::from_str::<Session>(&json)
                .unwrap_err()
                .to_string();
            assert_eq!(direct, generic, "{json}");
        }
    }

    #[test]
    fn metadata_limits() {
        let mut m = Metadata::new();
        m.insert(
            "k".repeat(MAX_METADATA_KEY_LEN),
            "v".repeat(MAX_METADATA_VALUE_LEN),
        );
        assert!(validate_metadata(&m).is_ok());
        m.insert("k".repeat(MAX_METADATA_KEY_LEN + 1), String::new());
        assert!(validate_metadata(&m).is_err());
        let many: Metadata = (0..=MAX_METADATA_ENTRIES)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert!(validate_metadata(&many).is_err());
    }
}
