//! The attempt loop: one call's attempts within its budget, an endpoint
//! picked for each, the time left sent as `grpc-timeout`, and after each
//! failure the decision whether another attempt may be made.
//!
//! The decisions are kept apart from the loop that acts on them, so they can
//! be tested without a network: [`Failure::of`] classifies a failed attempt
//! (was it ever sent, ever processed, a transient failure, the endpoint's own
//! failure), [`Retries::after`] decides whether and when to retry (the
//! attempt bound, the free retries, the retry budget), and [`Deadline`]
//! says how long the next attempt may take and whether a pause still fits.
//! [`Caller::call`] applies them: ejects endpoints, charges the retry
//! budget, sleeps. With the `otel` feature it also makes the call's and
//! each attempt's spans, and puts the attempt's `traceparent` on it
//! (`trace`).

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use sessionstore::v1::session_store_client::SessionStoreClient;
use tonic::{Request, Response, Status, transport::Channel};

use crate::{
    balance::{Member, Pool},
    error::{self, Error, Result},
    metadata::Auth,
    retry::{RetryPolicy, RetryThrottle, later_than},
};

/// The generated stub on one endpoint's channel, as each attempt gets it.
pub(crate) type Stub = SessionStoreClient<Channel>;

/// The time and attempt bounds of each call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallPolicy {
    /// The whole call's budget.
    pub(crate) timeout: Duration,
    /// Each attempt's bound within it, if shorter.
    pub(crate) attempt_timeout: Option<Duration>,
    /// The attempt bound and the backoff between attempts.
    pub(crate) retry: RetryPolicy,
}

/// Whether a call may be repeated after it reached the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Safe to repeat: get, count, list.
    Read,
    /// Not to be repeated once it may have reached the server.
    Write,
}

/// What a client's calls share: the endpoints, the bearer token, the bounds
/// and the retry budget.
pub(crate) struct Caller {
    /// The endpoints each attempt picks from.
    pub(crate) pool: Arc<Pool>,
    /// The bearer token and `grpc-timeout` put on each attempt.
    pub(crate) auth: Arc<Auth>,
    /// Each call's time and attempt bounds.
    pub(crate) policy: CallPolicy,
    /// The retry budget shared across calls.
    pub(crate) throttle: RetryThrottle,
}

impl Caller {
    /// A call of `method` (its name in the service, "GetSession": for its
    /// spans) that is safe to repeat.
    pub(crate) async fn read<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        request: Req,
        call: F,
    ) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(Stub, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        self.traced(Kind::Read, method, request, call).await
    }

    /// A call of `method` that must not be repeated once it may have reached
    /// the server.
    pub(crate) async fn write<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        request: Req,
        call: F,
    ) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(Stub, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        self.traced(Kind::Write, method, request, call).await
    }

    /// [`Caller::call`] in the call's span, which ends with the call's code.
    #[cfg(feature = "otel")]
    async fn traced<Req, Resp, F, Fut>(
        &self,
        kind: Kind,
        method: &'static str,
        request: Req,
        call: F,
    ) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(Stub, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        use tracing::Instrument;
        let span = crate::trace::call_span(method);
        let result = self
            .call(kind, method, request, call)
            .instrument(span.clone())
            .await;
        if result.is_err() && !span.is_disabled() {
            span.record("otel.status_code", "ERROR");
        }
        result
    }

    /// [`Caller::call`]: without the `otel` feature, no spans.
    #[cfg(not(feature = "otel"))]
    async fn traced<Req, Resp, F, Fut>(
        &self,
        kind: Kind,
        _method: &'static str,
        request: Req,
        call: F,
    ) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(Stub, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        self.call(kind, request, call).await
    }

    /// Runs a call's attempts within its budget: picks an endpoint for each,
    /// sends the time left as `grpc-timeout`, and decides after each failure
    /// whether another attempt may be made (see [`Retries::after`]).
    async fn call<Req, Resp, F, Fut>(
        &self,
        kind: Kind,
        #[cfg(feature = "otel")] method: &'static str,
        request: Req,
        call: F,
    ) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(Stub, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let policy = &self.policy;
        let deadline = Deadline::after(Instant::now(), policy.timeout);
        let mut retries = Retries::new(policy.retry.max_attempts, self.pool.members().len());
        let mut last: Option<(Arc<Member>, Status)> = None;
        #[cfg(feature = "otel")]
        let (call_span, mut attempt_number) = (tracing::Span::current(), 0_u32);
        loop {
            let Some(budget) = deadline.attempt_budget(Instant::now(), policy.attempt_timeout)
            else {
                return Err(out_of_time(policy.timeout, last.map(|(_, s)| s)));
            };
            let Some(member) = self.pool.pick(last.as_ref().map(|(m, _)| m)) else {
                return Err(Error::from(Status::unavailable(
                    "no session store address: the DNS name resolved to none yet",
                )));
            };
            retries.start();
            let mut attempt = Request::new(request.clone());
            self.auth.prepare(&mut attempt, budget);
            #[cfg(feature = "otel")]
            let attempt_span = {
                attempt_number += 1;
                crate::trace::attempt_span(&call_span, method, attempt_number, &mut attempt)
            };
            let stub = SessionStoreClient::new(member.channel());
            let in_flight = member.start();
            let result = tokio::time::timeout(budget, call(stub, attempt)).await;
            drop(in_flight);
            #[cfg(feature = "otel")]
            crate::trace::end(
                &attempt_span,
                match &result {
                    Ok(Ok(_)) => tonic::Code::Ok,
                    Ok(Err(status)) => status.code(),
                    Err(_elapsed) => tonic::Code::DeadlineExceeded,
                },
            );
            let status = match result {
                Ok(Ok(response)) => {
                    member.answered();
                    self.throttle.succeeded();
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) => {
                    if error::is_local_timeout(&status) {
                        // tonic's own timer: no answer in time, as below.
                        member.timed_out();
                    } else if !error::is_transport_failure(&status) {
                        // The server answered: its connection works.
                        member.answered();
                    }
                    status
                }
                Err(_elapsed) => {
                    member.timed_out();
                    Status::deadline_exceeded(format!("no answer within {} ms", budget.as_millis()))
                }
            };
            let failure = Failure::of(&status, kind);
            if failure.ejects() {
                member.connect_failed();
            }
            let next = retries.after(
                failure,
                || self.pool.has_other_available(&member),
                &self.throttle,
            );
            let pause = match next {
                Next::Fail => return Err(Error::from(status)),
                Next::Retry(Pause::Now) => Duration::ZERO,
                Next::Retry(Pause::Backoff(retry)) => policy.retry.backoff(retry),
            };
            if !deadline.allows_pause(Instant::now(), pause) {
                // No attempt could start within the budget.
                return Err(Error::from(status));
            }
            tokio::time::sleep(pause).await;
            last = Some((member, status));
        }
    }
}

/// One call's budget: the instant by which every attempt and pause ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Deadline(Instant);

impl Deadline {
    /// The budget of a call started at `now` with `timeout` (capped, so that
    /// `Duration::MAX` cannot overflow the clock).
    fn after(now: Instant, timeout: Duration) -> Self {
        Self(later_than(now, timeout))
    }

    /// How long an attempt starting at `now` may take: the time left, or
    /// `attempt_timeout` when shorter; `None` once no time is left.
    fn attempt_budget(&self, now: Instant, attempt_timeout: Option<Duration>) -> Option<Duration> {
        let left = self.0.saturating_duration_since(now);
        if left.is_zero() {
            return None;
        }
        Some(attempt_timeout.map_or(left, |t| t.min(left)))
    }

    /// Whether another attempt could start after pausing `pause` from `now`.
    fn allows_pause(&self, now: Instant, pause: Duration) -> bool {
        later_than(now, pause) < self.0
    }
}

/// What a failed attempt allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// The request never left this process (its connection could not be
    /// opened): safe to repeat, read or write.
    NeverSent,
    /// The request may have left, but the server provably never processed
    /// it (see [`error::never_processed`]): safe to repeat, read or write.
    Unprocessed,
    /// A transient failure after the request may have reached the server:
    /// repeated for reads only.
    Retry,
    /// Nothing to retry.
    Final,
}

impl Verdict {
    fn of(status: &Status, kind: Kind) -> Self {
        if error::never_sent(status) {
            return Self::NeverSent;
        }
        if error::never_processed(status) {
            return Self::Unprocessed;
        }
        match kind {
            Kind::Read if error::is_transient(status) => Self::Retry,
            Kind::Read | Kind::Write => Self::Final,
        }
    }
}

/// A failed attempt, as the retry decisions see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Failure {
    verdict: Verdict,
    /// The endpoint itself failed (its connection refused, reset or cut: a
    /// server gone) rather than answering: it is ejected, and a retry on
    /// another endpoint is free of the retry budget, so that one server
    /// dying under load (every call in flight on it failing at once) does
    /// not drain the budget and leave those calls unretried. Once no other
    /// endpoint is available (the whole backend down), these failures are
    /// charged like the rest. A request the server refused or a connection
    /// it was closing (its GOAWAY) is not that: the server is there, tonic
    /// opens a new connection for the next attempt, and a server that is in
    /// fact gone fails that connect (and is ejected then).
    endpoint_failed: bool,
    /// A sign of trouble on the server side ([`error::is_transient`]).
    transient: bool,
}

impl Failure {
    /// Classifies the status of a failed attempt of a call of `kind`.
    fn of(status: &Status, kind: Kind) -> Self {
        let verdict = Verdict::of(status, kind);
        Self {
            verdict,
            endpoint_failed: error::is_transport_failure(status)
                && !error::is_local_timeout(status)
                && verdict != Verdict::Unprocessed,
            transient: error::is_transient(status),
        }
    }

    /// Whether the endpoint is ejected (and probed in the background).
    fn ejects(&self) -> bool {
        self.endpoint_failed || self.verdict == Verdict::NeverSent
    }
}

/// What the loop does after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// Another attempt, after this pause.
    Retry(Pause),
    /// The call fails with the attempt's status.
    Fail,
}

/// The pause before the next attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pause {
    /// None: a request that never left, going to another endpoint, or the
    /// transparent retry.
    Now,
    /// The backoff before retry number `n` (1 for the first), so that a
    /// struggling server is not hammered.
    Backoff(u32),
}

/// One call's retry state: the attempts counted against `max_attempts`, and
/// the retries that do not count.
#[derive(Clone, Copy, Debug)]
struct Retries {
    max_attempts: u32,
    /// Attempts counted so far.
    attempts: u32,
    /// Requests that never left are retried on other endpoints without
    /// counting, at most once per endpoint.
    free_retries: usize,
    /// gRPC's transparent retry: the first attempt the server provably
    /// never processed is repeated at once, free of the attempt count and
    /// of the retry budget (a connection aged out under load fails every
    /// call queued on it at once: charging those would drain the budget
    /// for nothing). Another such failure in the same call is an ordinary
    /// retry: counted, charged, paced.
    transparent_retry: bool,
}

impl Retries {
    /// A call's state before its first attempt, over `endpoints` endpoints.
    fn new(max_attempts: u32, endpoints: usize) -> Self {
        Self {
            max_attempts,
            attempts: 0,
            free_retries: endpoints,
            transparent_retry: true,
        }
    }

    /// An attempt is about to be made.
    fn start(&mut self) {
        self.attempts += 1;
    }

    /// Decides, after the attempt just started failed with `failure`,
    /// whether another is made and after which pause. `other_available`
    /// says whether an endpoint other than the failed one is available now
    /// (asked only when it matters). Charges `throttle` (the retry budget)
    /// for a sign of trouble on the server side, except for the free
    /// retries, and retries only while it allows.
    fn after(
        &mut self,
        failure: Failure,
        other_available: impl Fn() -> bool,
        throttle: &RetryThrottle,
    ) -> Next {
        let verdict = failure.verdict;
        let elsewhere = failure.endpoint_failed && other_available();
        let transparent = verdict == Verdict::Unprocessed && self.transparent_retry;
        if verdict != Verdict::NeverSent && !transparent && failure.transient && !elsewhere {
            // A sign of trouble on the server side, read or write: the
            // retry budget drains with these, so retries stop when most
            // calls fail.
            throttle.failed();
        }
        let retry = match verdict {
            Verdict::NeverSent if self.free_retries > 0 => {
                self.free_retries -= 1;
                self.attempts -= 1;
                true
            }
            Verdict::NeverSent => self.attempts < self.max_attempts,
            Verdict::Unprocessed if transparent => {
                self.transparent_retry = false;
                self.attempts -= 1;
                true
            }
            Verdict::Unprocessed | Verdict::Retry => {
                self.attempts < self.max_attempts && (elsewhere || throttle.allows_retry())
            }
            Verdict::Final => false,
        };
        if !retry {
            return Next::Fail;
        }
        // A request that never left goes straight to another endpoint when
        // there is one, and the transparent retry goes at once (to a new
        // connection); anything else waits.
        if transparent || (verdict == Verdict::NeverSent && other_available()) {
            Next::Retry(Pause::Now)
        } else {
            Next::Retry(Pause::Backoff(self.attempts.max(1)))
        }
    }
}

/// The error for a call whose budget ran out between attempts: the last
/// attempt's, or a plain deadline.
fn out_of_time(timeout: Duration, last: Option<Status>) -> Error {
    match last {
        Some(status) => Error::from(status),
        None => Error::from(Status::deadline_exceeded(format!(
            "no answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy-free state: `max_attempts` attempts over `endpoints`.
    fn retries(max_attempts: u32, endpoints: usize) -> Retries {
        Retries::new(max_attempts, endpoints)
    }

    /// A full retry budget of 10 tokens, as the builder's default.
    fn budget() -> RetryThrottle {
        RetryThrottle::new(10, 0.1)
    }

    /// A budget drained to half, where retries stop.
    fn drained() -> RetryThrottle {
        let throttle = budget();
        for _ in 0..5 {
            throttle.failed();
        }
        assert!(!throttle.allows_retry());
        throttle
    }

    /// Whether `throttle` was charged, from full, by the calls in between:
    /// four more charges drain it when one was made.
    fn charged(throttle: &RetryThrottle) -> bool {
        for _ in 0..4 {
            throttle.failed();
        }
        !throttle.allows_retry()
    }

    fn refused() -> Status {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))))
    }

    fn local_timeout() -> Status {
        Status::from_error(Box::new(tonic::TimeoutExpired(())))
    }

    const NEVER_SENT: Failure = Failure {
        verdict: Verdict::NeverSent,
        endpoint_failed: true,
        transient: true,
    };
    const UNPROCESSED: Failure = Failure {
        verdict: Verdict::Unprocessed,
        endpoint_failed: false,
        transient: true,
    };
    /// A read the server may have processed, then failed (UNAVAILABLE).
    const TRANSIENT_READ: Failure = Failure {
        verdict: Verdict::Retry,
        endpoint_failed: false,
        transient: true,
    };
    /// A read whose connection broke mid-call: the endpoint's own failure.
    const BROKEN_READ: Failure = Failure {
        verdict: Verdict::Retry,
        endpoint_failed: true,
        transient: true,
    };

    /// Reads are retried on transient codes; writes are not once the
    /// request may have reached the server; codes that say the request
    /// itself is wrong are never retried.
    #[test]
    fn which_statuses_allow_a_retry() {
        for status in [
            Status::unavailable("redis is down"),
            Status::deadline_exceeded("late"),
            local_timeout(),
        ] {
            assert_eq!(
                Verdict::of(&status, Kind::Read),
                Verdict::Retry,
                "{status:?}"
            );
            assert_eq!(
                Verdict::of(&status, Kind::Write),
                Verdict::Final,
                "{status:?}"
            );
        }
        for status in [
            Status::invalid_argument("invalid user_id"),
            Status::unauthenticated("missing bearer token"),
            Status::permission_denied("no"),
            Status::not_found("x"),
            Status::internal("bug"),
            Status::resource_exhausted("not load shedding"),
            Status::cancelled("the caller went away"),
        ] {
            assert_eq!(
                Verdict::of(&status, Kind::Read),
                Verdict::Final,
                "{status:?}"
            );
            assert_eq!(
                Verdict::of(&status, Kind::Write),
                Verdict::Final,
                "{status:?}"
            );
        }
        // A connection that could not be opened: never sent, read or write.
        for kind in [Kind::Read, Kind::Write] {
            assert_eq!(Verdict::of(&refused(), kind), Verdict::NeverSent);
        }
    }

    /// A refused connection is the endpoint's failure and ejects it; an
    /// answer from the server, or this side's timer, is not and does not.
    #[test]
    fn only_the_endpoints_own_failures_eject_it() {
        let failure = Failure::of(&refused(), Kind::Write);
        assert!(failure.endpoint_failed && failure.ejects());
        for status in [Status::unavailable("redis is down"), local_timeout()] {
            let failure = Failure::of(&status, Kind::Read);
            assert!(!failure.endpoint_failed && !failure.ejects(), "{status:?}");
            assert!(failure.transient, "{status:?}");
        }
        let failure = Failure::of(&Status::invalid_argument("x"), Kind::Read);
        assert!(!failure.transient && !failure.ejects());
    }

    /// A read failing transiently is retried with growing backoff until
    /// `max_attempts` attempts were made, the first included.
    #[test]
    fn reads_are_retried_up_to_the_attempt_bound() {
        let throttle = budget();
        let mut state = retries(3, 1);
        state.start();
        assert_eq!(
            state.after(TRANSIENT_READ, || false, &throttle),
            Next::Retry(Pause::Backoff(1))
        );
        state.start();
        assert_eq!(
            state.after(TRANSIENT_READ, || false, &throttle),
            Next::Retry(Pause::Backoff(2))
        );
        state.start();
        assert_eq!(state.after(TRANSIENT_READ, || false, &throttle), Next::Fail);

        let mut once = retries(1, 1);
        once.start();
        assert_eq!(once.after(TRANSIENT_READ, || false, &budget()), Next::Fail);
    }

    /// A write that may have reached the server is never repeated, with
    /// attempts and budget left; the failure still charges the budget.
    #[test]
    fn a_write_that_may_have_reached_the_server_is_not_repeated() {
        for status in [
            Status::unavailable("connection reset mid-call"),
            Status::deadline_exceeded("late"),
            local_timeout(),
        ] {
            let throttle = budget();
            let mut state = retries(3, 2);
            state.start();
            let failure = Failure::of(&status, Kind::Write);
            assert_eq!(state.after(failure, || true, &throttle), Next::Fail);
            assert!(charged(&throttle), "{status:?}");
        }
    }

    /// A request that never left is retried on another endpoint at once,
    /// read or write, without counting as an attempt or taking from the
    /// budget, once per endpoint; then it counts like any attempt.
    #[test]
    fn a_request_never_sent_is_retried_free_once_per_endpoint() {
        let throttle = budget();
        let mut state = retries(1, 2);
        state.start();
        assert_eq!(
            state.after(NEVER_SENT, || true, &throttle),
            Next::Retry(Pause::Now)
        );
        state.start();
        // No other endpoint left: a pause before trying again.
        assert_eq!(
            state.after(NEVER_SENT, || false, &throttle),
            Next::Retry(Pause::Backoff(1))
        );
        state.start();
        assert_eq!(state.after(NEVER_SENT, || true, &throttle), Next::Fail);
        assert!(!charged(&throttle), "never-sent requests are free");
    }

    /// The first request the server provably never processed is repeated
    /// at once, uncounted and free; a second one in the same call is an
    /// ordinary retry: counted, charged and paced.
    #[test]
    fn the_first_unprocessed_request_is_a_transparent_retry() {
        let throttle = budget();
        let mut state = retries(2, 1);
        state.start();
        assert_eq!(
            state.after(UNPROCESSED, || false, &throttle),
            Next::Retry(Pause::Now)
        );
        assert!(throttle.allows_retry());
        state.start();
        assert_eq!(
            state.after(UNPROCESSED, || false, &throttle),
            Next::Retry(Pause::Backoff(1))
        );
        state.start();
        assert_eq!(state.after(UNPROCESSED, || false, &throttle), Next::Fail);

        // Charged from the second one on.
        let throttle = budget();
        let mut state = retries(3, 1);
        state.start();
        state.after(UNPROCESSED, || false, &throttle);
        assert!(!charged(&throttle));
        let throttle = budget();
        state.start();
        state.after(UNPROCESSED, || false, &throttle);
        assert!(charged(&throttle));
    }

    /// With the budget drained, transient failures are not retried; an
    /// endpoint's own failure with another endpoint available still is,
    /// and does not charge the budget.
    #[test]
    fn the_retry_budget_stops_retries_but_not_failover() {
        let mut state = retries(3, 2);
        state.start();
        assert_eq!(state.after(TRANSIENT_READ, || true, &drained()), Next::Fail);

        let mut state = retries(3, 2);
        state.start();
        assert_eq!(
            state.after(BROKEN_READ, || true, &drained()),
            Next::Retry(Pause::Backoff(1))
        );
        let throttle = budget();
        let mut state = retries(3, 2);
        state.start();
        state.after(BROKEN_READ, || true, &throttle);
        assert!(!charged(&throttle), "a failover is free");
        // No other endpoint: charged like the rest.
        let throttle = budget();
        let mut state = retries(3, 1);
        state.start();
        state.after(BROKEN_READ, || false, &throttle);
        assert!(charged(&throttle));
    }

    /// Final failures are never retried and do not charge the budget.
    #[test]
    fn final_failures_end_the_call() {
        let throttle = budget();
        let mut state = retries(3, 2);
        state.start();
        let failure = Failure::of(&Status::invalid_argument("x"), Kind::Read);
        assert_eq!(state.after(failure, || true, &throttle), Next::Fail);
        assert!(!charged(&throttle));
    }

    /// Each attempt gets the time left, or its own bound when shorter; none
    /// starts once the budget is spent, nor after a pause that reaches it.
    #[test]
    fn the_overall_deadline_bounds_attempts_and_pauses() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let deadline = Deadline::after(start, 2 * second);
        assert_eq!(deadline.attempt_budget(start, None), Some(2 * second));
        assert_eq!(deadline.attempt_budget(start + second, None), Some(second));
        assert_eq!(
            deadline.attempt_budget(start, Some(Duration::from_millis(300))),
            Some(Duration::from_millis(300))
        );
        assert_eq!(
            deadline.attempt_budget(start + second, Some(5 * second)),
            Some(second)
        );
        assert_eq!(deadline.attempt_budget(start + 2 * second, None), None);
        assert_eq!(deadline.attempt_budget(start + 3 * second, None), None);

        assert!(deadline.allows_pause(start, Duration::from_millis(1999)));
        assert!(!deadline.allows_pause(start, 2 * second));
        assert!(!deadline.allows_pause(start + second, second));

        // "No limit" neither overflows nor ends.
        let unbounded = Deadline::after(start, Duration::MAX);
        assert!(unbounded.attempt_budget(start, None).is_some());
        assert!(unbounded.allows_pause(start, second));
    }

    /// A budget spent before any attempt is a deadline; after one, the last
    /// attempt's error.
    #[test]
    fn out_of_time_reports_the_last_failure() {
        let timeout = Duration::from_millis(500);
        let err = out_of_time(timeout, None);
        assert!(matches!(&err, Error::DeadlineExceeded(_)), "{err:?}");
        assert!(err.to_string().contains("500 ms"), "{err}");
        let err = out_of_time(timeout, Some(Status::unavailable("redis is down")));
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    }
}
