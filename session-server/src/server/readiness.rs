//! Readiness: whether this pod should get calls, kept in step with Redis.
//! Every decision is one pure step, [`State::step`], from what a tick
//! observed to what to do (unit-tested at the bottom); [`watch_redis`] is the
//! thin loop that asks Redis, steps, and applies the actions: logs, metrics
//! and the gRPC health status.

use std::time::Duration;

use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    error::Error,
    store::{
        ReplicaShortfall, Store,
        health::{AccessRefused, MaxmemoryPolicy, NOEVICTION},
    },
};

/// What readiness asks of Redis, from the configuration (exported as
/// `server::ReadinessPolicy`).
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// REDIS_ALLOW_EVICTION: an evicting Redis does not block readiness.
    pub allow_eviction: bool,
    /// READINESS_FOLLOWS_REDIS: `Some(n)` turns readiness NOT_SERVING after
    /// `n` failed checks in a row (READINESS_REDIS_FAILURES); `None` leaves
    /// it SERVING through an outage.
    pub follows_redis: Option<u32>,
}

/// Keeps the readiness status ("sessionstore.v1.SessionStore") in step with
/// whether this pod should get calls. The overall status ("") stays SERVING:
/// nothing here is fixed by restarting the process.
///
/// Readiness is NOT_SERVING
/// - until Redis has answered once since the start, and answered the access
///   check (`Store::check_access`: a script and a harmless write on a key
///   under KEY_PREFIX, and `role:master`), in both modes: a pod that has
///   never reached Redis, or cannot use its keys (an ACL without them, a
///   REDIS_URL naming a replica), is misconfigured, and a rollout must stop
///   at it rather than replace every working pod with one;
/// - while a master may evict keys (`maxmemory-policy` is not `noeviction`
///   and `maxmemory` is set: with no limit Redis never evicts), unless
///   `allow_eviction` (REDIS_ALLOW_EVICTION) accepts the risk, in both
///   modes: that is a misconfiguration, not an outage;
/// - with READINESS_FOLLOWS_REDIS only, once READINESS_REDIS_FAILURES checks
///   in a row have failed, until one answers.
///
/// By default a Redis outage leaves readiness SERVING: Redis is shared, so
/// it would take every pod out of every endpoint list at once, and clients
/// would see connection refused and back off (up to 120 s with gRPC's
/// default backoff) instead of a fast UNAVAILABLE they retry. REDIS_UP says
/// Redis is down, for the alert.
///
/// The policy is read with `INFO memory` on every tick that PING answers: one
/// more round trip per master per HEALTH_CHECK_INTERVAL_MS, which costs Redis
/// about 3 µs of CPU (`INFO commandstats` on Redis 7.0 with 100,000 keys:
/// 2.84 µs per call, PING 0.04 µs) and a fix made at run time is seen on the
/// next tick, without a restart.
///
/// When `INFO` fails while PING answers (an ACL without `+info`, a proxy that
/// does not forward it) the last policy read stands; if none was ever read,
/// the policy is unknown and does not block readiness: refusing to serve
/// because a diagnostic is forbidden would turn a locked-down Redis into an
/// outage. A warning says so once, and REDIS_EVICTION_POLICY_OK reads -1.
///
/// The access check runs on the ticks where PING answers only until it first
/// passes, not on every tick: it exists to stop a misconfigured pod from ever
/// turning ready, which one success disproves. After that, a Redis that
/// starts refusing (an ACL changed at run time, a failover) is shared by
/// every pod, like an outage: taking them all out of the endpoints at once
/// would turn fast call errors into connection refused, the reason
/// READINESS_FOLLOWS_REDIS is off by default; and a demoted master's
/// connections are replaced on READONLY anyway (`connection.rs`). It also
/// keeps the steady state at PING and INFO: three more round trips per tick
/// would be spent on an answer that does not change.
pub(super) async fn watch_redis(
    store: Store,
    health: HealthReporter,
    interval: Duration,
    policy: Policy,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = State::new(policy);
    let mut shortfall = ReplicaShortfall::default();
    loop {
        ticker.tick().await;
        let ping = store.ping().await;
        let access = if ping.is_ok() && state.needs_access_check() {
            Some(store.check_access().await)
        } else {
            None
        };
        // Recorded before INFO's round trip: they describe PING's answer.
        metrics::gauge!(crate::metrics::REDIS_UP).set(if ping.is_ok() { 1.0 } else { 0.0 });
        store.record_pool_metrics();
        // A Redis that does not answer PING would not answer INFO either; the
        // last policy read stands until it does.
        let policies = if ping.is_ok() {
            Some(store.maxmemory_policies().await)
        } else {
            None
        };
        if ping.is_ok() {
            watch_replicas(&store, &mut shortfall).await;
        }
        let actions = state.step(Observation {
            ping,
            access,
            policies,
        });
        // The log lines first, then the gauges, then the health status: a
        // reader that saw a gauge change finds the line that explains it
        // (e2e eviction tests read the log once the metric moved).
        let (reports, logs): (Vec<_>, Vec<_>) = actions
            .into_iter()
            .partition(|action| matches!(action, Action::Report(_)));
        for action in logs {
            apply(action, &health).await;
        }
        metrics::gauge!(crate::metrics::REDIS_EVICTION_POLICY_OK).set(state.eviction.gauge());
        if let Some(now) = state.readiness {
            for label in crate::metrics::READINESS_STATES {
                let value = if label == now.as_str() { 1.0 } else { 0.0 };
                metrics::gauge!(crate::metrics::READINESS, "state" => label).set(value);
            }
        }
        for action in reports {
            apply(action, &health).await;
        }
    }
}

/// With REVOCATION_MIN_REPLICAS > 0: reads each master's connected replicas
/// into their gauge, and logs at ERROR, once per change, the masters with
/// fewer than the setting (every revocation there answers UNAVAILABLE), and
/// at INFO when none is short any more. Readiness does not follow it: every
/// pod shares the masters, and reads and creates still work.
async fn watch_replicas(store: &Store, shortfall: &mut ReplicaShortfall) {
    let wanted = store.settings().revocation_min_replicas;
    if wanted == 0 {
        return;
    }
    // A failed read (an ACL without INFO, Redis going away) changes nothing:
    // the revocations' own answers and PING's gauge say the rest.
    let Ok(replicas) = store.connected_replicas().await else {
        return;
    };
    for (node, connected) in &replicas {
        let node = node.clone().unwrap_or_else(|| "master".to_owned());
        metrics::gauge!(crate::metrics::REDIS_CONNECTED_REPLICAS, "node" => node)
            .set(f64::from(*connected));
    }
    match shortfall.observe(&replicas, wanted) {
        None => {}
        Some(short) if short.is_empty() => tracing::info!(
            revocation_min_replicas = wanted,
            "every Redis master has REVOCATION_MIN_REPLICAS connected replicas again"
        ),
        Some(short) => {
            let masters: Vec<String> = short
                .iter()
                .map(|(node, connected)| {
                    format!(
                        "{}: {connected} connected",
                        node.as_deref().unwrap_or("master")
                    )
                })
                .collect();
            tracing::error!(
                revocation_min_replicas = wanted,
                masters = %masters.join(", "),
                "Redis masters with fewer connected replicas than REVOCATION_MIN_REPLICAS: every \
                 revocation on them answers UNAVAILABLE until replicas reconnect (or lower the \
                 setting)"
            );
        }
    }
}

/// What one tick learned from Redis.
#[derive(Debug)]
pub(super) struct Observation {
    /// PING's answer.
    pub(super) ping: Result<(), Error>,
    /// The access check's answer, when it ran: on the ticks where PING
    /// answered, until it first passes ([`State::needs_access_check`]).
    pub(super) access: Option<Result<(), Result<AccessRefused, Error>>>,
    /// `INFO memory`'s answer, when it ran: on the ticks where PING answered.
    pub(super) policies: Option<Result<Vec<MaxmemoryPolicy>, Error>>,
}

/// What the loop does after a step, in order: a log line each, but for
/// [`Action::Report`], which also sets the health status.
#[derive(Debug)]
pub(super) enum Action {
    /// The access check passes after it had failed.
    AccessPasses,
    /// The access check failed for a cause not logged just before.
    AccessRefused(AccessRefused),
    /// The access check did not answer: the next tick tries again.
    AccessUnanswered(Error),
    /// PING answers, after it did not (or at the first tick).
    RedisAnswers,
    /// PING stopped answering; readiness stays SERVING because
    /// READINESS_FOLLOWS_REDIS is off and Redis was reached before.
    RedisDownStillServing(Error),
    /// PING stopped answering (or does not at the first tick).
    RedisDown(Error),
    /// `INFO memory` answers again after it failed.
    InfoAnswersAgain,
    /// `INFO memory` failed (logged once until it answers again).
    InfoFails {
        /// Why.
        error: Error,
        /// The policy still in force, described for the log.
        last_known: String,
    },
    /// A policy unlike the last one was read.
    EvictionChanged {
        /// The policy now in force.
        eviction: Eviction,
        /// REDIS_ALLOW_EVICTION, which turns the errors into warnings.
        allowed: bool,
    },
    /// Readiness changed (or was decided at the first tick): the health
    /// status follows.
    Report(Readiness),
}

/// What readiness remembers from one tick to the next.
#[derive(Debug)]
pub(super) struct State {
    policy: Policy,
    /// Whether PING answered at the last tick; `None` before the first.
    was_up: Option<bool>,
    /// The last policy read.
    eviction: Eviction,
    /// Whether `INFO memory` failed at its last try, so its warning is
    /// logged once per spell of failures.
    info_failing: bool,
    /// The readiness last reported; `None` before the first tick.
    readiness: Option<Readiness>,
    /// Whether Redis has answered (and passed the access check) since the
    /// start.
    reached: bool,
    /// The failed checks since Redis last answered.
    failures: u32,
    /// The cause of the access check's last failure, so each is logged once.
    access_refused: Option<&'static str>,
}

impl State {
    /// Before the first tick: nothing known, readiness not yet reported.
    pub(super) fn new(policy: Policy) -> Self {
        Self {
            policy,
            was_up: None,
            eviction: Eviction::Unknown,
            info_failing: false,
            readiness: None,
            reached: false,
            failures: 0,
            access_refused: None,
        }
    }

    /// Whether the next tick runs the access check (when PING answers): only
    /// until it first passes.
    pub(super) fn needs_access_check(&self) -> bool {
        !self.reached
    }

    /// Takes in one tick's observation and says what to do about it. Pure:
    /// no I/O, no clock.
    pub(super) fn step(&mut self, seen: Observation) -> Vec<Action> {
        let Observation {
            ping,
            access,
            policies,
        } = seen;
        let up = ping.is_ok();
        let mut actions = Vec::new();
        if up && !self.reached {
            match access {
                Some(Ok(())) => {
                    if self.access_refused.is_some() {
                        actions.push(Action::AccessPasses);
                    }
                    self.reached = true;
                }
                // Each cause is logged once, however many ticks repeat it.
                Some(Err(Ok(refused))) if self.access_refused != Some(refused.cause()) => {
                    self.access_refused = Some(refused.cause());
                    actions.push(Action::AccessRefused(refused));
                }
                Some(Err(Err(err))) => actions.push(Action::AccessUnanswered(err)),
                // Refused as last time, or not asked: nothing new.
                Some(Err(Ok(_))) | None => {}
            }
        }
        if up {
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
        }
        if self.was_up != Some(up) {
            actions.push(match ping {
                Ok(()) => Action::RedisAnswers,
                Err(err) if self.policy.follows_redis.is_none() && self.reached => {
                    Action::RedisDownStillServing(err)
                }
                Err(err) => Action::RedisDown(err),
            });
            self.was_up = Some(up);
        }

        if up {
            match policies {
                Some(Ok(policies)) => {
                    if self.info_failing {
                        actions.push(Action::InfoAnswersAgain);
                        self.info_failing = false;
                    }
                    let now = Eviction::from_policies(policies);
                    if now != self.eviction {
                        actions.push(Action::EvictionChanged {
                            eviction: now.clone(),
                            allowed: self.policy.allow_eviction,
                        });
                        self.eviction = now;
                    }
                }
                Some(Err(error)) if !self.info_failing => {
                    self.info_failing = true;
                    actions.push(Action::InfoFails {
                        error,
                        last_known: self.eviction.describe(),
                    });
                }
                Some(Err(_)) | None => {}
            }
        }

        let now = if matches!(self.eviction, Eviction::Possible(_)) && !self.policy.allow_eviction {
            Readiness::RedisEvicts
        } else if !self.reached
            || self
                .policy
                .follows_redis
                .is_some_and(|limit| self.failures >= limit)
        {
            Readiness::RedisDown
        } else {
            Readiness::Serving
        };
        if self.readiness != Some(now) {
            actions.push(Action::Report(now));
            self.readiness = Some(now);
        }
        actions
    }
}

/// Carries out one action of a step: its log line, and for a report the
/// health status.
async fn apply(action: Action, health: &HealthReporter) {
    match action {
        Action::AccessPasses => tracing::info!("redis access check passes"),
        Action::AccessRefused(refused) => tracing::error!(
            cause = refused.cause(),
            error = %refused,
            fix = refused.fix(),
            "redis answers PING but refuses what calls need ({}): readiness stays NOT_SERVING. Fix: {}",
            refused.cause(),
            refused.fix()
        ),
        Action::AccessUnanswered(err) => {
            tracing::debug!(error = %err, "redis access check did not answer");
        }
        Action::RedisAnswers => tracing::info!("redis answers"),
        Action::RedisDownStillServing(err) => tracing::warn!(
            error = %err,
            "redis does not answer: calls fail with UNAVAILABLE; readiness stays SERVING (READINESS_FOLLOWS_REDIS is off)"
        ),
        Action::RedisDown(err) => tracing::warn!(error = %err, "redis does not answer"),
        Action::InfoAnswersAgain => tracing::info!("INFO memory answers again"),
        Action::InfoFails { error, last_known } => tracing::warn!(
            error = %error,
            last_known,
            "cannot read maxmemory-policy (INFO memory failed while PING answers): readiness keeps the last policy read, and does not wait for one if none was; allow INFO for this Redis user so eviction can be detected"
        ),
        Action::EvictionChanged { eviction, allowed } => eviction.log(allowed),
        Action::Report(now) => {
            let status = if now == Readiness::Serving {
                tracing::info!(state = now.as_str(), "ready: serving");
                ServingStatus::Serving
            } else {
                tracing::warn!(state = now.as_str(), "not ready: not serving");
                ServingStatus::NotServing
            };
            health
                .set_service_status(sessionstore::SERVICE_NAME, status)
                .await;
        }
    }
}

/// Why readiness is what it is; the `state` label of the READINESS metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Readiness {
    /// Calls are welcome.
    Serving,
    /// Redis was never reached (or failed its access check), or with
    /// READINESS_FOLLOWS_REDIS has failed too many checks in a row.
    RedisDown,
    /// A master may evict keys, and REDIS_ALLOW_EVICTION does not accept it.
    RedisEvicts,
}

impl Readiness {
    fn as_str(self) -> &'static str {
        match self {
            Self::Serving => "serving",
            Self::RedisDown => "redis_down",
            Self::RedisEvicts => "redis_evicts",
        }
    }
}

/// What the last successful read of the masters' `maxmemory-policy` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Eviction {
    /// Never read: INFO has not answered yet (or is forbidden).
    Unknown,
    /// Every master keeps its keys (`noeviction`, or `maxmemory` 0).
    Never,
    /// These masters may evict keys.
    Possible(Vec<MaxmemoryPolicy>),
}

impl Eviction {
    fn from_policies(policies: Vec<MaxmemoryPolicy>) -> Self {
        let evicting: Vec<_> = policies.into_iter().filter(|p| p.evicts()).collect();
        if evicting.is_empty() {
            Self::Never
        } else {
            Self::Possible(evicting)
        }
    }

    fn gauge(&self) -> f64 {
        match self {
            Self::Unknown => -1.0,
            Self::Never => 1.0,
            Self::Possible(_) => 0.0,
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Unknown => "unknown".into(),
            Self::Never => NOEVICTION.into(),
            Self::Possible(masters) => masters
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// Logs the policy just read, which differs from the one before: an error
    /// per evicting master (a warning when REDIS_ALLOW_EVICTION accepts it),
    /// naming the master, its policy and the fix.
    fn log(&self, allow_eviction: bool) {
        match self {
            Self::Unknown => {}
            Self::Never => tracing::info!(
                maxmemory_policy = NOEVICTION,
                "every Redis master keeps its keys (maxmemory-policy noeviction, or no maxmemory limit)"
            ),
            Self::Possible(masters) => {
                for master in masters {
                    let node = master.node.as_deref().unwrap_or("master");
                    if allow_eviction {
                        tracing::warn!(
                            node,
                            maxmemory_policy = %master.policy,
                            maxmemory = master.maxmemory,
                            "Redis may evict keys (maxmemory-policy {} is not noeviction and maxmemory is {} bytes); serving anyway because REDIS_ALLOW_EVICTION=true: evicted session indexes and token reservations break RevokeAllUserSessions, the per-user session cap and token uniqueness",
                            master.policy,
                            master.maxmemory
                        );
                    } else {
                        tracing::error!(
                            node,
                            maxmemory_policy = %master.policy,
                            maxmemory = master.maxmemory,
                            "Redis may evict keys (maxmemory-policy {} is not noeviction and maxmemory is {} bytes): evicted session indexes and token reservations silently break RevokeAllUserSessions, the per-user session cap and token uniqueness, so readiness stays NOT_SERVING. Fix: run `CONFIG SET maxmemory-policy noeviction` on this master and set `maxmemory-policy noeviction` in its redis.conf (or the managed service's parameters) so a restart keeps it; or set REDIS_ALLOW_EVICTION=true to serve anyway and accept the risk",
                            master.policy,
                            master.maxmemory
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: Policy = Policy {
        allow_eviction: false,
        follows_redis: None,
    };

    fn down() -> Error {
        Error::Timeout(Duration::from_millis(1))
    }

    fn noperm() -> AccessRefused {
        AccessRefused::NoPermission(Error::Internal("NOPERM no permissions".into()))
    }

    fn readonly() -> AccessRefused {
        AccessRefused::ReadOnly("READONLY You can't write against a read only replica.".into())
    }

    fn policy(name: &str, maxmemory: u64) -> MaxmemoryPolicy {
        MaxmemoryPolicy {
            node: None,
            policy: name.into(),
            maxmemory,
        }
    }

    /// A tick where Redis answers PING; the access check answered `access`
    /// when the state asked for it.
    fn answering(
        state: &State,
        access: impl FnOnce() -> Result<(), Result<AccessRefused, Error>>,
        policies: Result<Vec<MaxmemoryPolicy>, Error>,
    ) -> Observation {
        Observation {
            ping: Ok(()),
            access: state.needs_access_check().then(access),
            policies: Some(policies),
        }
    }

    /// A healthy Redis: PING, the access check and `noeviction`.
    fn healthy(state: &State) -> Observation {
        answering(state, || Ok(()), Ok(vec![policy(NOEVICTION, 1 << 30)]))
    }

    /// A tick where PING fails: nothing else is asked.
    fn silent() -> Observation {
        Observation {
            ping: Err(down()),
            access: None,
            policies: None,
        }
    }

    /// The actions' names, for comparing whole steps.
    fn names(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|action| match action {
                Action::AccessPasses => "access passes".into(),
                Action::AccessRefused(refused) => format!("access refused {}", refused.cause()),
                Action::AccessUnanswered(_) => "access unanswered".into(),
                Action::RedisAnswers => "redis answers".into(),
                Action::RedisDownStillServing(_) => "redis down, still serving".into(),
                Action::RedisDown(_) => "redis down".into(),
                Action::InfoAnswersAgain => "info answers again".into(),
                Action::InfoFails { last_known, .. } => format!("info fails ({last_known})"),
                Action::EvictionChanged { eviction, allowed } => {
                    format!("eviction {} (allowed {allowed})", eviction.describe())
                }
                Action::Report(now) => format!("report {}", now.as_str()),
            })
            .collect()
    }

    /// Readiness starts NOT_SERVING while Redis has never answered, and turns
    /// SERVING at the first tick where it answers, passes the access check
    /// and keeps its keys; the next healthy tick changes nothing.
    #[test]
    fn unreachable_redis_keeps_readiness_not_serving_until_it_answers() {
        let mut state = State::new(DEFAULT);
        assert_eq!(
            names(&state.step(silent())),
            ["redis down", "report redis_down"]
        );
        assert_eq!(state.eviction.gauge(), -1.0);
        assert!(names(&state.step(silent())).is_empty(), "logged once");
        assert!(state.needs_access_check());

        let seen = healthy(&state);
        assert!(seen.access.is_some(), "the access check runs");
        assert_eq!(
            names(&state.step(seen)),
            [
                "redis answers",
                "eviction noeviction (allowed false)",
                "report serving"
            ]
        );
        assert_eq!(state.readiness, Some(Readiness::Serving));
        assert_eq!(state.eviction.gauge(), 1.0);
        assert!(!state.needs_access_check(), "not again once passed");
        let seen = healthy(&state);
        assert!(seen.access.is_none());
        assert!(names(&state.step(seen)).is_empty());
    }

    /// An access check refused with NOPERM keeps readiness NOT_SERVING and
    /// is logged once however many ticks repeat it; a new cause (READONLY)
    /// is logged once too; when it passes, that is logged and readiness
    /// turns SERVING. A check that does not answer is only noted.
    #[test]
    fn access_refusals_are_logged_once_per_cause_until_the_check_passes() {
        let mut state = State::new(DEFAULT);
        let keeps = || Ok(vec![policy(NOEVICTION, 0)]);
        let seen = answering(&state, || Err(Ok(noperm())), keeps());
        assert_eq!(
            names(&state.step(seen)),
            [
                "access refused NOPERM",
                "redis answers",
                "eviction noeviction (allowed false)",
                "report redis_down"
            ]
        );
        let seen = answering(&state, || Err(Ok(noperm())), keeps());
        assert!(names(&state.step(seen)).is_empty(), "NOPERM logged once");
        let seen = answering(&state, || Err(Ok(readonly())), keeps());
        assert_eq!(names(&state.step(seen)), ["access refused READONLY"]);
        let seen = answering(&state, || Err(Ok(readonly())), keeps());
        assert!(names(&state.step(seen)).is_empty(), "READONLY logged once");
        let seen = answering(&state, || Err(Err(down())), keeps());
        assert_eq!(names(&state.step(seen)), ["access unanswered"]);
        assert_eq!(state.readiness, Some(Readiness::RedisDown));
        let seen = answering(&state, || Ok(()), keeps());
        assert_eq!(
            names(&state.step(seen)),
            ["access passes", "report serving"]
        );
        assert!(!state.needs_access_check());
    }

    /// By default an outage after Redis was reached leaves readiness
    /// SERVING, and says so; recovery is logged, and readiness never moved.
    #[test]
    fn an_outage_leaves_readiness_serving_by_default() {
        let mut state = State::new(DEFAULT);
        state.step(healthy(&state));
        for _ in 0..10 {
            let actions = state.step(silent());
            assert!(
                !actions.iter().any(|a| matches!(a, Action::Report(_))),
                "{:?}",
                names(&actions)
            );
        }
        assert_eq!(state.failures, 10);
        assert_eq!(state.readiness, Some(Readiness::Serving));
        let mut state = State::new(DEFAULT);
        state.step(healthy(&state));
        assert_eq!(names(&state.step(silent())), ["redis down, still serving"]);
        assert_eq!(names(&state.step(healthy(&state))), ["redis answers"]);
        assert_eq!(state.failures, 0);
    }

    /// With READINESS_FOLLOWS_REDIS, readiness turns NOT_SERVING at the n-th
    /// failed check in a row, not before, and SERVING again at the first
    /// that answers; the count starts over then.
    #[test]
    fn readiness_follows_redis_after_n_failures_and_recovers() {
        let mut state = State::new(Policy {
            allow_eviction: false,
            follows_redis: Some(3),
        });
        state.step(healthy(&state));
        assert_eq!(names(&state.step(silent())), ["redis down"]);
        assert!(names(&state.step(silent())).is_empty());
        assert_eq!(names(&state.step(silent())), ["report redis_down"]);
        assert!(names(&state.step(silent())).is_empty());
        assert_eq!(
            names(&state.step(healthy(&state))),
            ["redis answers", "report serving"]
        );
        assert_eq!(names(&state.step(silent())), ["redis down"]);
        assert!(names(&state.step(silent())).is_empty(), "counted from zero");
        assert_eq!(state.readiness, Some(Readiness::Serving));
    }

    /// A master that may evict keeps readiness NOT_SERVING (gauge 0) until
    /// its policy is fixed; a policy with no `maxmemory` does not evict; an
    /// outage keeps the last policy read.
    #[test]
    fn an_evicting_redis_blocks_readiness_until_fixed() {
        let mut state = State::new(DEFAULT);
        let seen = answering(&state, || Ok(()), Ok(vec![policy("allkeys-lru", 100)]));
        assert_eq!(
            names(&state.step(seen)),
            [
                "redis answers",
                "eviction allkeys-lru (maxmemory 100) (allowed false)",
                "report redis_evicts"
            ]
        );
        assert_eq!(state.eviction.gauge(), 0.0);
        let seen = answering(&state, || Ok(()), Ok(vec![policy("allkeys-lru", 100)]));
        assert!(names(&state.step(seen)).is_empty(), "logged once");
        assert_eq!(names(&state.step(silent())), ["redis down, still serving"]);
        assert_eq!(state.readiness, Some(Readiness::RedisEvicts), "kept");
        let seen = answering(&state, || Ok(()), Ok(vec![policy("allkeys-lru", 0)]));
        assert_eq!(
            names(&state.step(seen)),
            [
                "redis answers",
                "eviction noeviction (allowed false)",
                "report serving"
            ]
        );
    }

    /// REDIS_ALLOW_EVICTION serves despite an evicting master, still
    /// logging the policy (as a warning).
    #[test]
    fn allowed_eviction_serves() {
        let mut state = State::new(Policy {
            allow_eviction: true,
            follows_redis: None,
        });
        let seen = answering(&state, || Ok(()), Ok(vec![policy("volatile-lru", 1)]));
        assert_eq!(
            names(&state.step(seen)),
            [
                "redis answers",
                "eviction volatile-lru (maxmemory 1) (allowed true)",
                "report serving"
            ]
        );
        assert_eq!(state.eviction.gauge(), 0.0);
    }

    /// INFO failing while PING answers is warned about once per spell, keeps
    /// the last policy read, and blocks nothing when none was ever read.
    #[test]
    fn a_failing_info_keeps_the_last_policy_and_warns_once() {
        let mut state = State::new(DEFAULT);
        let seen = answering(&state, || Ok(()), Err(down()));
        assert_eq!(
            names(&state.step(seen)),
            ["redis answers", "info fails (unknown)", "report serving"]
        );
        assert_eq!(state.eviction.gauge(), -1.0);
        let seen = answering(&state, || Ok(()), Err(down()));
        assert!(names(&state.step(seen)).is_empty(), "warned once");
        let seen = answering(&state, || Ok(()), Ok(vec![policy("allkeys-lru", 5)]));
        assert_eq!(
            names(&state.step(seen)),
            [
                "info answers again",
                "eviction allkeys-lru (maxmemory 5) (allowed false)",
                "report redis_evicts"
            ]
        );
        let seen = answering(&state, || Ok(()), Err(down()));
        assert_eq!(
            names(&state.step(seen)),
            ["info fails (allkeys-lru (maxmemory 5))"]
        );
        assert_eq!(state.readiness, Some(Readiness::RedisEvicts), "kept");
    }
}
