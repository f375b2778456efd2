//! The revocation channel's messages: decoded (`r:` a revocation, `x:` a
//! shortened expiry, `h:` a heartbeat; the formats are in the parent
//! module's docs), and the copies of one publish that a cluster delivers
//! once per master dropped.

use std::time::Duration;

use tokio::time::Instant;

use crate::model::{Revocation, RevocationReason, Shortened};

/// Revocation messages seen in the last 10 to 20 s, with how many times each
/// came over each master's connection. On a cluster one PUBLISH arrives once
/// per master (over its own master's connection, and over the bus on the
/// others), and two publishes can carry the same text (two
/// RevokeAllUserSessions of one user in one Redis millisecond). So the n-th
/// arrival of a text over any one connection is the n-th publish of it: a
/// message passes when some connection delivers it more often than any had
/// before, and only the copies of one publish are dropped.
#[derive(Default)]
pub(super) struct Recent {
    current: std::collections::HashMap<Box<[u8]>, Arrivals>,
    previous: std::collections::HashMap<Box<[u8]>, Arrivals>,
    since: Option<Instant>,
}

/// How often one text arrived: per source (master index), and the most over
/// any source, which is how many publishes of it passed.
#[derive(Default)]
struct Arrivals {
    by_source: Vec<u32>,
    passed: u32,
}

impl Recent {
    const SPAN: Duration = Duration::from_secs(10);

    /// Whether `payload`, arriving over `source`'s connection, is a publish
    /// not passed on yet.
    pub(super) fn first_time(&mut self, payload: &[u8], source: usize) -> bool {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() > Self::SPAN {
            self.previous = std::mem::take(&mut self.current);
            self.since = Some(Instant::now());
        }
        if !self.current.contains_key(payload) {
            let carried = self.previous.remove(payload).unwrap_or_default();
            self.current.insert(payload.into(), carried);
        }
        let Some(arrivals) = self.current.get_mut(payload) else {
            return true;
        };
        if arrivals.by_source.len() <= source {
            arrivals.by_source.resize(source + 1, 0);
        }
        let count = &mut arrivals.by_source[source];
        *count = count.saturating_add(1);
        if *count > arrivals.passed {
            arrivals.passed = *count;
            true
        } else {
            false
        }
    }
}

/// A decoded channel message.
#[derive(Debug, PartialEq)]
pub(super) enum Parsed {
    Revoked(Revocation),
    Shortened(Shortened),
    Heartbeat,
}

pub(super) fn parse(payload: &[u8]) -> Option<Parsed> {
    let text = std::str::from_utf8(payload).ok()?;
    if text.starts_with("h:") {
        return Some(Parsed::Heartbeat);
    }
    if let Some(rest) = text.strip_prefix("x:") {
        let mut parts = rest.splitn(3, ':');
        let expires_at_ms = parts.next()?.parse().ok()?;
        let user_id = parts.next().filter(|u| !u.is_empty())?.to_owned();
        let token_id = parts
            .next()
            .filter(|t| !t.is_empty() && !t.contains(':'))?
            .to_owned();
        return Some(Parsed::Shortened(Shortened {
            user_id,
            token_id,
            expires_at_ms,
        }));
    }
    let mut parts = text.strip_prefix("r:")?.splitn(4, ':');
    let revoked_at_ms = parts.next()?.parse().ok()?;
    let reason = match parts.next()? {
        "revoked" => RevocationReason::Revoked,
        "signed_out_everywhere" => RevocationReason::SignedOutEverywhere,
        "evicted" => RevocationReason::Evicted,
        "rotated" => RevocationReason::Rotated,
        "reuse_detected" => RevocationReason::ReuseDetected,
        _ => return None,
    };
    let user_id = parts.next().filter(|u| !u.is_empty())?.to_owned();
    let token_id = parts.next()?;
    if token_id.contains(':') {
        return None;
    }
    Some(Parsed::Revoked(Revocation {
        user_id,
        token_id: (!token_id.is_empty()).then(|| token_id.to_owned()),
        revoked_at_ms,
        reason,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_message_kind() {
        assert_eq!(
            parse(b"r:1700000000123:revoked:alice:t-1"),
            Some(Parsed::Revoked(Revocation {
                user_id: "alice".into(),
                token_id: Some("t-1".into()),
                revoked_at_ms: 1_700_000_000_123,
                reason: RevocationReason::Revoked,
            }))
        );
        assert_eq!(
            parse(b"r:5:signed_out_everywhere:bob:"),
            Some(Parsed::Revoked(Revocation {
                user_id: "bob".into(),
                token_id: None,
                revoked_at_ms: 5,
                reason: RevocationReason::SignedOutEverywhere,
            }))
        );
        assert!(matches!(
            parse(b"r:5:evicted:bob:t"),
            Some(Parsed::Revoked(Revocation {
                reason: RevocationReason::Evicted,
                ..
            }))
        ));
        assert_eq!(parse(b"h:00ff"), Some(Parsed::Heartbeat));
        assert_eq!(
            parse(b"x:1700000000123:alice:t-1"),
            Some(Parsed::Shortened(Shortened {
                user_id: "alice".into(),
                token_id: "t-1".into(),
                expires_at_ms: 1_700_000_000_123,
            }))
        );
    }

    #[test]
    fn refuses_malformed_messages() {
        for bad in [
            &b""[..],
            b"q:1:revoked:a:b",
            b"x:1:revoked:a:b",
            b"x:1:a:",
            b"x:1::b",
            b"x:abc:a:b",
            b"x:1:a",
            b"r:abc:revoked:a:b",
            b"r:1:unknown:a:b",
            b"r:1:revoked::b",
            b"r:1:revoked:a",
            b"r:1:revoked:a:b:c",
            b"r:-1:revoked:a:b",
            b"\xff",
        ] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn copies_of_a_revocation_pass_once() {
        let mut recent = Recent::default();
        // One publish, arriving over three masters' connections.
        assert!(recent.first_time(b"r:1:revoked:u:t", 0));
        assert!(!recent.first_time(b"r:1:revoked:u:t", 2));
        assert!(!recent.first_time(b"r:1:revoked:u:t", 1));
        assert!(recent.first_time(b"r:1:revoked:u:t2", 1));
    }

    /// Two publishes of one text (two user-wide revocations in one Redis
    /// millisecond) both pass, in any order of their copies; their copies
    /// do not; and on one connection (standalone) every publish passes.
    #[test]
    fn two_publishes_of_one_text_pass_twice() {
        let text = b"r:5:signed_out_everywhere:u:";
        for order in [[0, 1, 0, 1], [0, 0, 1, 1], [1, 0, 0, 1]] {
            let mut recent = Recent::default();
            let passed = order
                .iter()
                .filter(|source| recent.first_time(text, **source))
                .count();
            assert_eq!(passed, 2, "{order:?}");
        }
        let mut recent = Recent::default();
        assert!(recent.first_time(text, 0));
        assert!(recent.first_time(text, 0));
        assert!(recent.first_time(text, 0));
    }
}
