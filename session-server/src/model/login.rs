//! Login-attempt types: the verdict and its limits, and the validated
//! account, device token and client address the limiter keys on.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use super::hex;
use crate::error::Error;

/// Which limit refused a login attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginLimit {
    /// The client address (or its IPv6 network) is at RATE_LIMIT_MAX_ATTEMPTS.
    Address,
    /// The account is at RATE_LIMIT_ACCOUNT_MAX_ATTEMPTS.
    Account,
    /// The trusted device is at RATE_LIMIT_DEVICE_MAX_ATTEMPTS.
    Device,
}

/// The verdict on one login attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginVerdict {
    /// Whether the attempt may proceed.
    pub allowed: bool,
    /// Attempts of the refusing subject (the address when allowed) in the
    /// sliding window, this one included.
    pub attempts: u32,
    /// Attempts still allowed in the window, by every limit that applies.
    pub remaining: u32,
    /// When refused: the time until an attempt would be allowed by every
    /// limit; `None` when allowed.
    pub retry_after: Option<Duration>,
    /// When refused: the limit that refused (the longer one when both did).
    pub refused_by: Option<LoginLimit>,
    /// The Redis time of the address's decision, in ms since the epoch: what
    /// the window is measured in (logs and the model test compare against it).
    pub decided_at_ms: u64,
    /// The attempt presented a device token valid for its account and was
    /// counted against that device alone.
    pub device_trusted: bool,
}

/// The outcome of a login reset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginReset {
    /// Whether some counted attempt was cleared.
    pub reset: bool,
    /// The device token issued, when one was asked for with an account.
    pub device_token: Option<DeviceToken>,
}

/// The longest `account` a login attempt may name, in bytes.
pub const MAX_ACCOUNT_LEN: usize = 256;

/// The account a login attempt is for, reduced to the SHA-256 of its bytes
/// (lower-case hex): login names and emails are personal data and may hold
/// any character, so they never appear in a key. The hash is unsalted, so it
/// hides the name from a casual look at Redis but not from someone who can
/// guess it; keep Redis private.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountKey(String);

impl AccountKey {
    /// Validates `account` (1 to 256 bytes of UTF-8; `String` is UTF-8
    /// already) and hashes it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `account` when it is empty or too long.
    pub fn parse(account: &str) -> Result<Self, Error> {
        if account.is_empty() {
            return Err(Error::invalid("account", "must not be empty"));
        }
        if account.len() > MAX_ACCOUNT_LEN {
            return Err(Error::invalid(
                "account",
                format!(
                    "must be at most {MAX_ACCOUNT_LEN} bytes, got {}",
                    account.len()
                ),
            ));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, account.as_bytes());
        Ok(Self(hex(digest.as_ref())))
    }

    /// The hex digest used in the Redis keys.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The longest `device_token` a login may present, in bytes.
pub const MAX_DEVICE_TOKEN_LEN: usize = 256;

/// A device token as presented or issued: a bearer secret that trusts one
/// device for one account. Only its SHA-256 ([`DeviceToken::key`]) reaches
/// Redis, and its `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceToken(String);

impl fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceToken(***)")
    }
}

impl DeviceToken {
    /// Validates a presented token: 1 to 256 bytes of printable ASCII
    /// (`!` to `~`, as a cookie value may hold). Whether it is valid for an
    /// account is the store's question, never an error.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `device_token`.
    pub fn parse(token: &str) -> Result<Self, Error> {
        if token.is_empty() {
            return Err(Error::invalid("device_token", "must not be empty"));
        }
        if token.len() > MAX_DEVICE_TOKEN_LEN {
            return Err(Error::invalid(
                "device_token",
                format!(
                    "must be at most {MAX_DEVICE_TOKEN_LEN} bytes, got {}",
                    token.len()
                ),
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::invalid(
                "device_token",
                "must be printable ASCII without spaces",
            ));
        }
        Ok(Self(token.to_owned()))
    }

    /// A new token: 256 bits from the operating system's generator, as 64
    /// lower-case hex digits.
    ///
    /// # Errors
    ///
    /// [`Error::Internal`] when the operating system's generator fails.
    pub fn generate() -> Result<Self, Error> {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| Error::Internal("the system's random generator failed".into()))?;
        Ok(Self(hex(&bytes)))
    }

    /// The SHA-256 of the token (lower-case hex): what Redis keeps.
    pub fn key(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.0.as_bytes());
        hex(digest.as_ref())
    }

    /// The token itself, to hand to the client it was issued for.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The IPv6 grouping prefix used when none is configured.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// A client address as counted by the login rate limit: an IPv4 address, or
/// the network of an IPv6 address (one client usually holds a whole /64, and
/// RATE_LIMIT_IPV6_PREFIX can widen that: a /48 holder gets one budget, not
/// 65,536).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientAddr(String);

impl ClientAddr {
    /// Parses `ip` (IPv4 or IPv6) and reduces IPv6 to its /64.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `ip` when it is not an address.
    pub fn parse(ip: &str) -> Result<Self, Error> {
        Self::parse_with_prefix(ip, DEFAULT_IPV6_PREFIX)
    }

    /// Parses `ip` (IPv4 or IPv6) and reduces IPv6 to its network of
    /// `ipv6_prefix` bits (clamped to 0..=128).
    ///
    /// IPv4-mapped (`::ffff:a.b.c.d`) and the deprecated IPv4-compatible
    /// (`::a.b.c.d`) forms count as the IPv4 address they carry; without that
    /// rule every IPv4-compatible address would share `::/64` with `::1`.
    /// `::` and `::1` themselves stay IPv6.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `ip` when it is not an address.
    pub fn parse_with_prefix(ip: &str, ipv6_prefix: u8) -> Result<Self, Error> {
        let addr: IpAddr = ip.trim().parse().map_err(|_| {
            Error::invalid("ip", format!("must be an IPv4 or IPv6 address, got {ip:?}"))
        })?;
        let canonical = match addr {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => match embedded_ipv4(v6) {
                Some(v4) => v4.to_string(),
                None => {
                    let prefix = u32::from(ipv6_prefix.min(128));
                    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                    format!("{}/{prefix}", Ipv6Addr::from(u128::from(v6) & mask))
                }
            },
        };
        Ok(Self(canonical))
    }

    /// The canonical form used in the Redis key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The IPv4 address an IPv6 address carries: IPv4-mapped (`::ffff:0:0/96`) or
/// IPv4-compatible (`::/96` but `::` and `::1`).
pub fn embedded_ipv4(v6: Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let bits = u128::from(v6);
    // Below 2^32 the value fits a u32.
    (bits > 1 && bits <= u128::from(u32::MAX))
        .then(|| std::net::Ipv4Addr::from(u32::try_from(bits).unwrap_or_default()))
}
