//! Conversions between the generated proto types and the domain types. Proto
//! types stop here: the store never sees them.

use std::time::Duration;

use sessionstore::v1 as pb;

use crate::{
    error::Error,
    model::{
        self, AccountKey, DeviceToken, FamilyId, LoginLimit, LoginVerdict, NewSession, Revocation,
        RevocationReason, Rotation, Session, Shortened, TokenId, UserId,
    },
};

/// A required user id.
pub fn user_id(value: String) -> Result<UserId, Error> {
    UserId::parse("user_id", value)
}

/// A required token id.
pub fn token_id(value: String) -> Result<TokenId, Error> {
    TokenId::parse("token_id", value)
}

/// An optional user id hint: empty means absent.
pub fn user_hint(value: String) -> Result<Option<UserId>, Error> {
    if value.is_empty() {
        Ok(None)
    } else {
        user_id(value).map(Some)
    }
}

/// An optional login account: empty means absent.
pub fn account(value: &str) -> Result<Option<AccountKey>, Error> {
    if value.is_empty() {
        Ok(None)
    } else {
        AccountKey::parse(value).map(Some)
    }
}

/// An optional device token: empty means absent.
pub fn device_token(value: &str) -> Result<Option<DeviceToken>, Error> {
    if value.is_empty() {
        Ok(None)
    } else {
        DeviceToken::parse(value).map(Some)
    }
}

/// Validates a CreateSessionRequest into a [`NewSession`].
pub fn new_session(req: pb::CreateSessionRequest) -> Result<NewSession, Error> {
    let user_id = user_id(req.user_id)?;
    let token_id = token_id(req.token_id)?;
    model::validate_metadata(&req.metadata)?;
    let ttl = duration(req.ttl, "ttl")?;
    let max_lifetime = duration(req.max_lifetime, "max_lifetime")?;
    Ok(NewSession {
        user_id,
        token_id,
        metadata: req.metadata,
        ttl,
        max_lifetime,
    })
}

/// Validates a RotateSessionRequest into a [`Rotation`].
pub fn rotation(req: pb::RotateSessionRequest) -> Result<Rotation, Error> {
    let user_id = user_id(req.user_id)?;
    let family_id = FamilyId::parse("family_id", req.family_id)?;
    let token_id = token_id(req.token_id)?;
    let new_token_id = TokenId::parse("new_token_id", req.new_token_id)?;
    if new_token_id == token_id {
        return Err(Error::invalid(
            "new_token_id",
            "must differ from token_id: a rotation gives the family a new token id",
        ));
    }
    model::validate_metadata(&req.metadata)?;
    Ok(Rotation {
        user_id,
        family_id,
        token_id,
        new_token_id,
        ttl: duration(req.ttl, "ttl")?,
        metadata: req.metadata,
    })
}

/// Validates an ExtendSessionRequest.
pub fn extension(
    req: pb::ExtendSessionRequest,
) -> Result<(UserId, TokenId, Option<Duration>), Error> {
    Ok((
        user_id(req.user_id)?,
        token_id(req.token_id)?,
        duration(req.ttl, "ttl")?,
    ))
}

/// An optional duration field, checked as a duration (its bounds are the
/// store's to check).
fn duration(
    value: Option<prost_types::Duration>,
    field: &'static str,
) -> Result<Option<Duration>, Error> {
    value.map(|d| duration_from_proto(d, field)).transpose()
}

fn duration_from_proto(ttl: prost_types::Duration, field: &'static str) -> Result<Duration, Error> {
    if ttl.seconds < 0 || ttl.nanos < 0 || (ttl.seconds == 0 && ttl.nanos == 0) {
        return Err(Error::invalid(field, "must be positive"));
    }
    if ttl.nanos >= 1_000_000_000 {
        return Err(Error::invalid(field, "nanos must be below one second"));
    }
    // seconds and nanos are non-negative: checked above.
    Ok(Duration::new(
        ttl.seconds.unsigned_abs(),
        ttl.nanos.unsigned_abs(),
    ))
}

/// A domain duration as a proto Duration.
pub fn duration_to_proto(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        // Always below 1e9, so it fits.
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

/// A time in ms since the epoch as a proto Timestamp: the one
/// `prost_types::Timestamp::from(UNIX_EPOCH + Duration::from_millis(ms))`
/// gives, by division, without the two clock additions and subtractions
/// of going through `SystemTime` (about 75 instructions a timestamp, two
/// in every session answered; BENCHMARKS.md "#22 hot path").
fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        // At most u64::MAX / 1000, which fits.
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        // Below 1e9, so it fits.
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

/// A stored session as its proto message.
pub fn session_to_proto(session: Session) -> pb::Session {
    pb::Session {
        user_id: session.user_id,
        token_id: session.token_id,
        metadata: session.metadata,
        created_at: Some(timestamp(session.created_at_ms)),
        expires_at: Some(timestamp(session.expires_at_ms)),
        family_id: session.family_id.unwrap_or_default(),
        family_expires_at: session.family_expires_at_ms.map(timestamp),
    }
}

/// A revocation as its proto message.
pub fn revocation_to_proto(revocation: &Revocation) -> pb::Revocation {
    let reason = match revocation.reason {
        RevocationReason::Revoked => pb::RevocationReason::Revoked,
        RevocationReason::SignedOutEverywhere => pb::RevocationReason::SignedOutEverywhere,
        RevocationReason::Evicted => pb::RevocationReason::Evicted,
        RevocationReason::Rotated => pb::RevocationReason::Rotated,
        RevocationReason::ReuseDetected => pb::RevocationReason::ReuseDetected,
    };
    pb::Revocation {
        user_id: revocation.user_id.clone(),
        token_id: revocation.token_id.clone().unwrap_or_default(),
        revoked_at: Some(timestamp(revocation.revoked_at_ms)),
        reason: reason.into(),
    }
}

/// A shortened expiry as the revocation stream carries it.
pub fn shortened_to_proto(shortened: &Shortened) -> pb::ShortenedSession {
    pb::ShortenedSession {
        user_id: shortened.user_id.clone(),
        token_id: shortened.token_id.clone(),
        expires_at: Some(timestamp(shortened.expires_at_ms)),
    }
}

/// A login verdict as its proto response.
pub fn verdict_to_proto(verdict: LoginVerdict) -> pb::RecordLoginAttemptResponse {
    pb::RecordLoginAttemptResponse {
        allowed: verdict.allowed,
        attempts: verdict.attempts,
        remaining: verdict.remaining,
        retry_after: verdict.retry_after.map(duration_to_proto),
        refused_by: match verdict.refused_by {
            None => pb::LoginLimit::Unspecified,
            Some(LoginLimit::Address) => pb::LoginLimit::Address,
            Some(LoginLimit::Account) => pb::LoginLimit::Account,
            Some(LoginLimit::Device) => pb::LoginLimit::Device,
        }
        .into(),
        device_trusted: verdict.device_trusted,
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn timestamps_are_those_of_system_time() {
        for ms in [
            0,
            1,
            999,
            1_000,
            1_001,
            1_700_000_000_123,
            u64::MAX / 7,
            u64::MAX,
        ] {
            assert_eq!(
                timestamp(ms),
                prost_types::Timestamp::from(UNIX_EPOCH + Duration::from_millis(ms)),
                "{ms}"
            );
        }
    }

    #[test]
    fn ttl_must_be_positive_and_well_formed() {
        let bad = [(0, 0), (-1, 0), (0, -1), (1, 1_000_000_000)];
        for (seconds, nanos) in bad {
            let err =
                duration_from_proto(prost_types::Duration { seconds, nanos }, "ttl").unwrap_err();
            assert!(matches!(err, Error::InvalidArgument { field: "ttl", .. }));
        }
        assert_eq!(
            duration_from_proto(
                prost_types::Duration {
                    seconds: 1,
                    nanos: 500_000_000
                },
                "ttl"
            )
            .unwrap(),
            Duration::from_millis(1500)
        );
    }
}
