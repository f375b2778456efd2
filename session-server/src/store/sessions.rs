//! Sessions: create (with the per-user cap), look up, revoke one or all,
//! count and list, each one Redis script or command on the user's slot.

use redis::{FromRedisValue, Value};

use std::time::Duration;

use super::{Store, connection::Op, millis};

mod reads;
mod revoke;
use crate::{
    error::Error,
    model::{CreateOutcome, FamilyId, NewSession, Session, TokenId, UserId},
};

/// The longest family lifetime (`max_lifetime`, SESSION_MAX_LIFETIME): 365
/// days, as SESSION_TTL_MAX's bound.
pub const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 60 * 60);

impl Store {
    /// Stores a new session, reserving its token id first.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `ttl` when it is zero or above
    /// SESSION_TTL_MAX; Redis failures as [`Error::Unavailable`],
    /// [`Error::Timeout`] or [`Error::OutOfMemory`]. Concurrent creates for
    /// the same user are not an error: they are retried within the
    /// operation's deadline, past which they are [`Error::Busy`]. With
    /// REVOCATION_MIN_REPLICAS > 0, a create that evicted, or a replay
    /// (ALREADY_EXISTS), answers [`Error::NotReplicated`] when too few
    /// replicas acknowledged it (the session is stored on the master).
    pub async fn create_session(&self, new: NewSession) -> Result<CreateOutcome, Error> {
        let ttl_ms = self.ttl_ms(new.ttl)?;
        let lifetime_ms = millis(bounded(
            "max_lifetime",
            new.max_lifetime,
            self.settings().session_max_lifetime,
            (MAX_LIFETIME, "365 days"),
        )?);
        let family = FamilyId::generate()?;
        let mut op = self.op("create_session").await?;
        let prepared_at = match self.prepare_create(&mut op, &new, ttl_ms).await? {
            Prepared::Ready { now_ms } => now_ms,
            Prepared::Revoked => return Ok(CreateOutcome::TokenRevoked),
            Prepared::Exists(session) => {
                self.replicate(op, &new.user_id).await?;
                return Ok(CreateOutcome::AlreadyExists { session });
            }
        };
        if !self
            .claim_token(&mut op, &new.user_id, &new.token_id, ttl_ms, prepared_at)
            .await?
        {
            return Ok(CreateOutcome::TokenTaken);
        }
        let user = new.user_id.clone();
        let outcome = self
            .commit_create(&mut op, new, &family, (ttl_ms, lifetime_ms), prepared_at)
            .await?;
        // Evictions end sessions early: they wait for the replicas. So does
        // a replay, which may retry a create answered UNAVAILABLE for want
        // of them.
        match &outcome {
            CreateOutcome::Created { evicted, .. } if !evicted.is_empty() => {
                self.replicate(op, &user).await?;
            }
            CreateOutcome::AlreadyExists { .. } => self.replicate(op, &user).await?,
            _ => {}
        }
        Ok(outcome)
    }

    /// A session's ttl as asked for (`None`: SESSION_TTL), in ms, within
    /// SESSION_TTL_MAX.
    pub(super) fn ttl_ms(&self, ttl: Option<Duration>) -> Result<u64, Error> {
        let settings = self.settings();
        bounded(
            "ttl",
            ttl,
            settings.session_ttl,
            (settings.session_ttl_max, "SESSION_TTL_MAX"),
        )
        .map(millis)
    }

    /// A create's first step, in the user's slot: answers a replay of a
    /// revoked or live session, and otherwise records how long the claim
    /// that follows may make the token's reservation last, before it can.
    ///
    /// This order is what makes revocation final whatever step fails: a
    /// revocation reads the recorded end into its marker, so no reservation
    /// outlives the marker of a revoked token, and a later create of that
    /// token id finds the marker instead of a reservation to reuse.
    pub(super) async fn prepare_create(
        &self,
        op: &mut Op,
        new: &NewSession,
        ttl_ms: u64,
    ) -> Result<Prepared, Error> {
        let user = &new.user_id;
        let token = new.token_id.as_str();
        let reply: Vec<Value> = op
            .invoke(
                self.shared
                    .scripts
                    .prepare_create
                    .key(self.session_key(user, token))
                    .key(self.revoked_key(user, token))
                    .key(self.reservations_key(user))
                    .arg(token)
                    .arg(self.claim_lifetime_ms(ttl_ms))
                    .arg(self.reservation_slack_ms()),
            )
            .await?;
        let mut reply = Reply::new("prepare_create.lua", reply);
        let status = reply.int()?;
        let now_ms = reply.millis()?;
        match status {
            1 => Ok(Prepared::Ready { now_ms }),
            4 => Ok(Prepared::Revoked),
            0 => Ok(Prepared::Exists(parse_session(&reply.string()?)?)),
            other => Err(Error::Internal(
                format!("prepare_create.lua returned status {other}").into(),
            )),
        }
    }

    /// A create's second step, in the token's slot: reserves the token id for
    /// the user, until the deadline [`prepare_create`](Self::prepare_create)
    /// set. Returns whether the user holds the reservation.
    pub(super) async fn claim_token(
        &self,
        op: &mut Op,
        user: &UserId,
        token: &TokenId,
        ttl_ms: u64,
        prepared_at_ms: u64,
    ) -> Result<bool, Error> {
        let reserved: i64 = op
            .invoke(
                self.shared
                    .scripts
                    .claim_token
                    .key(self.owner_key(token))
                    .arg(user.as_str())
                    .arg(self.claim_lifetime_ms(ttl_ms))
                    .arg(prepared_at_ms.saturating_add(self.reservation_slack_ms())),
            )
            .await?;
        match reserved {
            1 => Ok(true),
            0 => Ok(false),
            -1 => {
                // Either the claim waited in flight longer than the slack, or
                // the token's master's clock is that far ahead of the user's.
                tracing::error!(
                    slack_ms = self.reservation_slack_ms(),
                    "create refused: the token's claim ran after its deadline; \
                     if this repeats, the Redis masters' clocks disagree by more than the slack"
                );
                Err(Error::Unavailable(
                    "the token's reservation was claimed too late after the create began \
                     (a delayed round trip, or Redis masters' clocks that disagree); retry"
                        .into(),
                ))
            }
            other => Err(Error::Internal(
                format!("claim_token.lua returned {other}").into(),
            )),
        }
    }

    /// A create's last step, in the user's slot: the session itself, with the
    /// cap enforced (evicting or refusing) and revocation checked again.
    pub(super) async fn commit_create(
        &self,
        op: &mut Op,
        new: NewSession,
        family: &FamilyId,
        (ttl_ms, lifetime_ms): (u64, u64),
        prepared_at_ms: u64,
    ) -> Result<CreateOutcome, Error> {
        let settings = self.settings();
        let scripts = &self.shared.scripts;
        let head = session_json_head(&new.user_id, &new.token_id, &new.metadata, Some(family))?;
        let user = &new.user_id;
        let family_key = self.family_key(user, family);
        let session_key = self.session_key(user, new.token_id.as_str());
        let index_key = self.index_key(user);
        let revoked_key = self.revoked_key(user, new.token_id.as_str());
        let reservations_key = self.reservations_key(user);
        // The index members the script may evict: none at first (most creates
        // evict nothing); then every member the script last reported, under
        // this process's lock for the user, so that creates for one user from
        // this process take turns instead of invalidating each other's lists.
        // The script evicts only declared members, so a round fails only when
        // concurrent creates from other processes evicted all of them; the
        // operation's deadline bounds the rounds all the same.
        let mut declared: Vec<String> = Vec::new();
        let mut turn = None;
        let mut round = 0u32;
        loop {
            let mut invocation = scripts.create_session.key(&session_key);
            invocation
                .key(&index_key)
                .key(&revoked_key)
                .key(&reservations_key)
                .key(&family_key)
                .arg(new.token_id.as_str())
                .arg(ttl_ms)
                .arg(settings.max_sessions_per_user)
                .arg(settings.limit_policy.as_script_arg())
                .arg(&head)
                .arg(self.reservation_slack_ms())
                .arg(millis(settings.session_ttl_max))
                .arg(self.revocation_channel())
                .arg(user.as_str())
                .arg(prepared_at_ms.saturating_add(millis(settings.timeout)))
                .arg(lifetime_ms);
            for token in &declared {
                invocation
                    .key(self.session_key(user, token))
                    .key(self.revoked_key(user, token))
                    .arg(token);
            }
            let reply: Vec<Value> = op.invoke(&invocation).await?;
            let (status, created_at_ms, expires_at_ms, mut rest) = parse_create_reply(reply)?;
            match status {
                1 => {
                    let family_end = (!rest.is_empty())
                        .then(|| rest.remove(0).parse::<u64>().ok())
                        .flatten()
                        .ok_or_else(|| {
                            Error::Internal(
                                "create_session.lua: status 1 without the family's end".into(),
                            )
                        })?;
                    return Ok(CreateOutcome::Created {
                        session: Session {
                            user_id: new.user_id.into_string(),
                            token_id: new.token_id.into_string(),
                            metadata: new.metadata,
                            family_id: Some(family.as_str().to_owned()),
                            family_expires_at_ms: Some(family_end),
                            created_at_ms,
                            expires_at_ms,
                        },
                        evicted: rest,
                    });
                }
                0 => {
                    let json = rest.first().ok_or_else(|| {
                        Error::Internal("create_session.lua: status 0 without a session".into())
                    })?;
                    return Ok(CreateOutcome::AlreadyExists {
                        session: parse_session(json)?,
                    });
                }
                4 => return Ok(CreateOutcome::TokenRevoked),
                2 => return Ok(CreateOutcome::LimitReached),
                3 => {
                    declared = rest;
                    round = round.saturating_add(1);
                    if turn.is_none() {
                        turn = Some(op.wait_for_turn(self.create_turn(user)).await?);
                    } else if round >= 3 {
                        // Creates racing from several processes: fall out of
                        // step with them.
                        op.pause(jittered_backoff(round)).await?;
                    }
                }
                5 => {
                    return Err(Error::Unavailable(
                        "the create's last step reached Redis more than REDIS_TIMEOUT_MS after \
                         its first; nothing was stored; retry"
                            .into(),
                    ));
                }
                other => {
                    return Err(Error::Internal(
                        format!("create_session.lua returned status {other}").into(),
                    ));
                }
            }
        }
    }

    /// How much longer a token's reservation lives than the ttl it was
    /// claimed for, and so a revocation marker than its session: the time the
    /// create script may still run after the claim (the operation's timeout)
    /// plus the grace period. It is also the claim's window after
    /// [`prepare_create`](Self::prepare_create) (wide, so that Redis Cluster
    /// masters' clocks may disagree by up to it); the create's last step must
    /// run within the timeout of its first, by one master's clock.
    pub(super) fn reservation_slack_ms(&self) -> u64 {
        millis(self.settings().owner_grace).saturating_add(millis(self.settings().timeout))
    }

    /// How long a claim makes a token's reservation last.
    pub(super) fn claim_lifetime_ms(&self, ttl_ms: u64) -> u64 {
        ttl_ms.saturating_add(self.reservation_slack_ms())
    }
}

/// What [`Store::prepare_create`] found.
#[derive(Debug)]
pub(super) enum Prepared {
    /// The claim may proceed; `now_ms` is the user's master's clock, from
    /// which the claim's deadline and the create's lateness are measured.
    Ready {
        /// When the step ran, by the user's master's clock.
        now_ms: u64,
    },
    /// The token id was revoked for this user.
    Revoked,
    /// The user already has this live session (a replay).
    Exists(Session),
}

/// A duration a request gave (`None`: `default`), checked: positive, whole
/// milliseconds, at most `max` (named by `max_name` in the error).
pub(super) fn bounded(
    field: &'static str,
    asked: Option<Duration>,
    default: Duration,
    (max, max_name): (Duration, &str),
) -> Result<Duration, Error> {
    match asked {
        None => Ok(default),
        Some(value) if value.is_zero() => Err(Error::invalid(field, "must be positive")),
        Some(value) if value > max => Err(Error::invalid(
            field,
            format!(
                "must be at most {max_name} ({} s), got {value:?}",
                max.as_secs()
            ),
        )),
        Some(value) if value.subsec_nanos() % 1_000_000 != 0 => Err(Error::invalid(
            field,
            "must be a whole number of milliseconds",
        )),
        Some(value) => Ok(value),
    }
}

/// The session JSON up to its timestamps, which the scripts append from
/// Redis's clock (with the family's end, when there is a family).
pub(super) fn session_json_head(
    user_id: &UserId,
    token_id: &TokenId,
    metadata: &crate::model::Metadata,
    family: Option<&FamilyId>,
) -> Result<String, Error> {
    #[derive(serde::Serialize)]
    struct Head<'a> {
        user_id: &'a str,
        token_id: &'a str,
        metadata: &'a crate::model::Metadata,
        #[serde(skip_serializing_if = "Option::is_none")]
        family_id: Option<&'a str>,
    }
    let mut json = serde_json::to_string(&Head {
        user_id: user_id.as_str(),
        token_id: token_id.as_str(),
        metadata,
        family_id: family.map(FamilyId::as_str),
    })
    .map_err(|e| Error::Internal(e.into()))?;
    // Serialising a struct always ends with its closing brace.
    json.pop();
    Ok(json)
}

/// A pause of up to 2^(round - 3) ms (at most 8 ms), chosen at random so
/// that creates for one user racing from several processes fall out of step.
fn jittered_backoff(round: u32) -> Duration {
    let cap_us = 1000u64 << round.saturating_sub(3).min(3);
    Duration::from_micros(100 + super::random_u64() % cap_us)
}

pub(super) fn parse_session(json: &str) -> Result<Session, Error> {
    Session::from_stored_json(json).map_err(corrupt)
}

/// [`parse_session`] for a session read under the key of `user` and
/// `token`, which it takes instead of copies where the stored ids are these
/// (`Session::from_stored_json_with_ids`).
pub(super) fn parse_session_of(json: &str, user: UserId, token: TokenId) -> Result<Session, Error> {
    Session::from_stored_json_with_ids(json, user.into_string(), token.into_string())
        .map_err(corrupt)
}

fn corrupt(e: serde_json::Error) -> Error {
    Error::Internal(format!("corrupt session JSON: {e}").into())
}

type CreateReply = (i64, u64, u64, Vec<String>);

fn parse_create_reply(reply: Vec<Value>) -> Result<CreateReply, Error> {
    let mut reply = Reply::new("create_session.lua", reply);
    Ok((
        reply.int()?,
        reply.millis()?,
        reply.millis()?,
        reply.strings()?,
    ))
}

/// A script's reply (an array), read in order; anything missing or of the
/// wrong type is an internal error naming the script.
pub(super) struct Reply {
    script: &'static str,
    values: std::vec::IntoIter<Value>,
}

impl Reply {
    pub(super) fn new(script: &'static str, reply: Vec<Value>) -> Self {
        Self {
            script,
            values: reply.into_iter(),
        }
    }

    pub(super) fn malformed(&self) -> Error {
        Error::Internal(format!("{} returned a malformed reply", self.script).into())
    }

    fn next<T: FromRedisValue>(&mut self) -> Result<T, Error> {
        match self.values.next() {
            Some(value) => T::from_redis_value(value).map_err(|e| Error::Internal(e.into())),
            None => Err(self.malformed()),
        }
    }

    pub(super) fn int(&mut self) -> Result<i64, Error> {
        self.next()
    }

    /// A time or duration in ms: never negative.
    pub(super) fn millis(&mut self) -> Result<u64, Error> {
        let value = self.int()?;
        u64::try_from(value).map_err(|_| self.malformed())
    }

    pub(super) fn string(&mut self) -> Result<String, Error> {
        self.next()
    }

    /// Every value left, as strings.
    pub(super) fn strings(self) -> Result<Vec<String>, Error> {
        self.values
            .map(String::from_redis_value)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Internal(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A create at the cap that cannot get its user's turn (held here, as
    /// another create of this process would) within REDIS_TIMEOUT_MS fails
    /// with contention, not with Redis not answering: Redis answered every
    /// round trip at once.
    #[tokio::test]
    async fn a_create_that_outwaits_its_turn_is_busy_not_a_redis_timeout() {
        let settings = super::super::Settings {
            key_prefix: format!("turn-{:x}:", super::super::random_u64()),
            max_sessions_per_user: 1,
            timeout: Duration::from_millis(200),
            ..super::super::Settings::for_tests("redis://127.0.0.1:6379")
        };
        let store = Store::new(settings).unwrap();
        let new = |token: &str| NewSession {
            user_id: UserId::parse("user_id", "crowd".into()).unwrap(),
            token_id: TokenId::parse("token_id", token.into()).unwrap(),
            metadata: Default::default(),
            ttl: None,
            max_lifetime: None,
        };
        let first = store.create_session(new("first")).await.unwrap();
        assert!(matches!(first, CreateOutcome::Created { .. }), "{first:?}");

        let user = UserId::parse("user_id", "crowd".into()).unwrap();
        let turn = store.create_turn(&user).await;
        let err = store.create_session(new("second")).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Busy(crate::error::Contention::UserCreates { timeout })
                    if timeout == Duration::from_millis(200)
            ),
            "{err:?}"
        );
        drop(turn);
        let second = store.create_session(new("second")).await.unwrap();
        assert!(
            matches!(&second, CreateOutcome::Created { evicted, .. } if evicted == &["first"]),
            "{second:?}"
        );
    }

    #[test]
    fn json_head_plus_script_suffix_is_a_session() {
        let new = NewSession {
            user_id: UserId::parse("user_id", "u\"1".into()).unwrap(),
            token_id: TokenId::parse("token_id", "t1".into()).unwrap(),
            metadata: [("ip".to_string(), "10.0.0.1".to_string())].into(),
            ttl: None,
            max_lifetime: None,
        };
        let json = format!(
            "{},\"created_at_ms\":1,\"expires_at_ms\":2}}",
            session_json_head(&new.user_id, &new.token_id, &new.metadata, None).unwrap()
        );
        let session = parse_session(&json).unwrap();
        assert_eq!(session.user_id, "u\"1");
        assert_eq!(session.metadata["ip"], "10.0.0.1");
        assert_eq!((session.created_at_ms, session.expires_at_ms), (1, 2));
    }
}
