#!/usr/bin/env python3
"""Proves the SessionStore contract from Python: calls every RPC of
sessionstore.v1.SessionStore (a WatchRevocations subscriber included), plus
the standard grpc.health.v1 checks, through stubs generated from proto/ alone,
and checks each answer.

Usage:  python check.py HOST:PORT
Needs grpcio and grpcio-health-checking, and the stubs that
`python -m grpc_tools.protoc -Iproto --python_out=OUT --grpc_python_out=OUT
proto/sessionstore/v1/session_store.proto` writes, on PYTHONPATH.
scripts/check-polyglot.sh does all of that and starts a server.
Expects the server's default RATE_LIMIT_MAX_ATTEMPTS (5) and
RATE_LIMIT_ACCOUNT_MAX_ATTEMPTS (10). Exits 1 on a failure.
"""

import sys
import uuid

import grpc
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sessionstore.v1 import session_store_pb2 as pb
from sessionstore.v1 import session_store_pb2_grpc as pb_grpc

SERVICE = "sessionstore.v1.SessionStore"
SERVING = health_pb2.HealthCheckResponse.SERVING
MAX_ATTEMPTS = 5  # RATE_LIMIT_MAX_ATTEMPTS
ACCOUNT_MAX_ATTEMPTS = 10  # RATE_LIMIT_ACCOUNT_MAX_ATTEMPTS
DEADLINE = 5  # seconds, for every call

passed = 0


def check(what, condition):
    global passed
    if not condition:
        raise AssertionError(what)
    passed += 1
    print(f"  ok  {what}")


def error_code(call, request):
    """The status code a call fails with, or None when it succeeds."""
    try:
        call(request, timeout=DEADLINE)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return None, None


def wait_until_serving(channel, seconds=30):
    """Follows the standard health Watch until SessionStore is SERVING (Redis answers)."""
    health = health_pb2_grpc.HealthStub(channel)
    updates = health.Watch(
        health_pb2.HealthCheckRequest(service=SERVICE), timeout=seconds, wait_for_ready=True
    )
    try:
        for update in updates:
            if update.status == SERVING:
                updates.cancel()
                return
    except grpc.RpcError as err:
        raise AssertionError(f"{SERVICE} not SERVING within {seconds} s: {err.code()}") from err
    raise AssertionError("health Watch ended before SERVING")


def run(channel):
    run_id = uuid.uuid4().hex[:12]
    user, token_1, token_2 = f"py-{run_id}", f"jti-{run_id}-1", f"jti-{run_id}-2"

    # Standard gRPC health: the process ("") and the readiness of SessionStore.
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=DEADLINE)
        check(f"Health.Check({name!r}) is SERVING", answer.status == SERVING)

    store = pb_grpc.SessionStoreStub(channel)

    # CreateSession, with metadata and a ttl, then one with the server's default ttl.
    first = store.CreateSession(
        pb.CreateSessionRequest(
            user_id=user,
            token_id=token_1,
            metadata={"ip": "192.0.2.1", "device": "python"},
            ttl=Duration(seconds=120),
        ),
        timeout=DEADLINE,
    )
    session = first.session
    check("CreateSession created the session", first.created and first.HasField("session")
          and first.outcome == pb.CREATE_OUTCOME_CREATED)
    check("  with its ids and metadata", (session.user_id, session.token_id) == (user, token_1)
          and dict(session.metadata) == {"ip": "192.0.2.1", "device": "python"})
    lifetime = session.expires_at.ToMilliseconds() - session.created_at.ToMilliseconds()
    check("  and expires exactly ttl (120 s) after creation", lifetime == 120_000)
    again = store.CreateSession(
        pb.CreateSessionRequest(user_id=user, token_id=token_1), timeout=DEADLINE
    )
    check("CreateSession retried: created=false, ALREADY_EXISTS with the existing session",
          not again.created and again.outcome == pb.CREATE_OUTCOME_ALREADY_EXISTS
          and again.session == session)
    second = store.CreateSession(
        pb.CreateSessionRequest(user_id=user, token_id=token_2), timeout=DEADLINE
    )
    check("CreateSession without ttl uses the default",
          second.created and second.session.expires_at.ToMilliseconds()
          > second.session.created_at.ToMilliseconds())

    # GetSession, without and with the user_id hint.
    found = store.GetSession(pb.GetSessionRequest(token_id=token_1), timeout=DEADLINE)
    check("GetSession finds the session as created", found.session == session)
    hinted = store.GetSession(
        pb.GetSessionRequest(token_id=token_1, user_id=user), timeout=DEADLINE
    )
    check("GetSession with the user_id hint finds it too", hinted.session == session)
    wrong = store.GetSession(
        pb.GetSessionRequest(token_id=token_1, user_id=f"other-{run_id}"), timeout=DEADLINE
    )
    check("GetSession with a wrong hint finds nothing (not an error)",
          not wrong.HasField("session"))

    # ListUserSessions (newest first) and GetUserSessionCount.
    listed = store.ListUserSessions(pb.ListUserSessionsRequest(user_id=user), timeout=DEADLINE)
    check("ListUserSessions lists both, newest first",
          [s.token_id for s in listed.sessions] == [token_2, token_1])
    count = store.GetUserSessionCount(
        pb.GetUserSessionCountRequest(user_id=user), timeout=DEADLINE
    )
    check("GetUserSessionCount is 2", count.count == 2)

    # RevokeSession, then RevokeAllUserSessions.
    revoked = store.RevokeSession(pb.RevokeSessionRequest(token_id=token_1), timeout=DEADLINE)
    check("RevokeSession revoked it", revoked.revoked)
    gone = store.GetSession(pb.GetSessionRequest(token_id=token_1), timeout=DEADLINE)
    check("  and GetSession no longer finds it", not gone.HasField("session"))
    twice = store.RevokeSession(pb.RevokeSessionRequest(token_id=token_1), timeout=DEADLINE)
    check("RevokeSession again: revoked=false", not twice.revoked)
    replay = store.CreateSession(
        pb.CreateSessionRequest(user_id=user, token_id=token_1), timeout=DEADLINE
    )
    check("CreateSession replayed after the revocation: TOKEN_REVOKED, nothing revived",
          not replay.created and replay.outcome == pb.CREATE_OUTCOME_TOKEN_REVOKED
          and not store.GetSession(pb.GetSessionRequest(token_id=token_1),
                                   timeout=DEADLINE).HasField("session"))
    everything = store.RevokeAllUserSessions(
        pb.RevokeAllUserSessionsRequest(user_id=user), timeout=DEADLINE
    )
    check("RevokeAllUserSessions revoked the 1 left", everything.revoked_count == 1)
    count = store.GetUserSessionCount(
        pb.GetUserSessionCountRequest(user_id=user), timeout=DEADLINE
    )
    check("  and the count is 0", count.count == 0)

    # RevokeOtherUserSessions ("sign out other devices"): a user of its own;
    # the asking session stays, the two others end, a dead one keeps nothing.
    other_user = f"py-others-{run_id}"
    mine, others = f"jti-{run_id}-mine", [f"jti-{run_id}-other-{i}" for i in (1, 2)]
    for token in [mine, *others]:
        store.CreateSession(pb.CreateSessionRequest(user_id=other_user, token_id=token),
                            timeout=DEADLINE)
    signed_out = store.RevokeOtherUserSessions(
        pb.RevokeOtherUserSessionsRequest(user_id=other_user, token_id=mine), timeout=DEADLINE
    )
    check("RevokeOtherUserSessions kept the asking session and revoked the 2 others",
          signed_out.kept and signed_out.revoked_count == 2
          and store.GetSession(pb.GetSessionRequest(token_id=mine),
                               timeout=DEADLINE).HasField("session")
          and not any(store.GetSession(pb.GetSessionRequest(token_id=t),
                                       timeout=DEADLINE).HasField("session") for t in others))
    dead = store.RevokeOtherUserSessions(
        pb.RevokeOtherUserSessionsRequest(user_id=other_user, token_id=others[0]),
        timeout=DEADLINE,
    )
    check("  and from a revoked session: kept=false, nothing revoked",
          not dead.kept and dead.revoked_count == 0
          and store.GetSession(pb.GetSessionRequest(token_id=mine),
                               timeout=DEADLINE).HasField("session"))

    # RotateSession and ExtendSession: a family of its own (a user of its own,
    # so the counts above are untouched).
    rot_user = f"py-rot-{run_id}"
    rot_1, rot_2 = f"jti-{run_id}-rot-1", f"jti-{run_id}-rot-2"
    login = store.CreateSession(pb.CreateSessionRequest(user_id=rot_user, token_id=rot_1),
                                timeout=DEADLINE).session
    family = login.family_id
    check("CreateSession starts a family: family_id and family_expires_at set",
          family != "" and login.HasField("family_expires_at")
          and login.family_expires_at.ToMilliseconds() >= login.expires_at.ToMilliseconds())
    rotated = store.RotateSession(
        pb.RotateSessionRequest(user_id=rot_user, family_id=family, token_id=rot_1,
                                new_token_id=rot_2), timeout=DEADLINE)
    successor = rotated.session
    check("RotateSession: ROTATED, the successor has the new token id in the same family",
          rotated.outcome == pb.ROTATE_OUTCOME_ROTATED and rotated.HasField("session")
          and (successor.user_id, successor.token_id, successor.family_id)
          == (rot_user, rot_2, family))
    check("  and the rotated-away token is no longer found",
          not store.GetSession(pb.GetSessionRequest(token_id=rot_1),
                               timeout=DEADLINE).HasField("session"))
    retried = store.RotateSession(
        pb.RotateSessionRequest(user_id=rot_user, family_id=family, token_id=rot_1,
                                new_token_id=rot_2), timeout=DEADLINE)
    check("RotateSession retried with the old token: ALREADY_ROTATED, the same successor",
          retried.outcome == pb.ROTATE_OUTCOME_ALREADY_ROTATED
          and retried.session.token_id == rot_2 and retried.session.family_id == family)
    extended = store.ExtendSession(
        pb.ExtendSessionRequest(user_id=rot_user, token_id=rot_2, ttl=Duration(seconds=1800)),
        timeout=DEADLINE)
    check("ExtendSession returns the successor with a later expiry, within the family's end",
          extended.HasField("session") and extended.session.token_id == rot_2
          and extended.session.expires_at.ToMilliseconds()
          > successor.expires_at.ToMilliseconds()
          and extended.session.expires_at.ToMilliseconds()
          <= extended.session.family_expires_at.ToMilliseconds())
    unknown = store.ExtendSession(
        pb.ExtendSessionRequest(user_id=rot_user, token_id=f"jti-{run_id}-rot-unknown"),
        timeout=DEADLINE)
    check("ExtendSession of an unknown token: no session (not an error)",
          not unknown.HasField("session"))
    store.RevokeSession(pb.RevokeSessionRequest(token_id=rot_2, user_id=rot_user),
                        timeout=DEADLINE)

    # RecordLoginAttempt: MAX_ATTEMPTS allowed, the next one refused with retry_after.
    ip = f"2001:db8:{run_id[:4]}:{run_id[4:8]}::1"  # a /64 of its own for this run
    for attempt in range(1, MAX_ATTEMPTS + 2):
        verdict = store.RecordLoginAttempt(pb.RecordLoginAttemptRequest(ip=ip), timeout=DEADLINE)
        if attempt <= MAX_ATTEMPTS:
            check(f"RecordLoginAttempt #{attempt}: allowed, {MAX_ATTEMPTS - attempt} remaining",
                  verdict.allowed and verdict.attempts == attempt
                  and verdict.remaining == MAX_ATTEMPTS - attempt
                  and not verdict.HasField("retry_after"))
        else:
            wait = verdict.retry_after.ToMilliseconds()
            check(f"RecordLoginAttempt #{attempt}: refused, retry_after {wait / 1000:.1f} s",
                  not verdict.allowed and verdict.attempts == attempt
                  and verdict.remaining == 0
                  and verdict.HasField("retry_after") and wait > 0
                  and verdict.refused_by == pb.LOGIN_LIMIT_ADDRESS)

    # ResetLoginAttempts clears the counter.
    reset = store.ResetLoginAttempts(pb.ResetLoginAttemptsRequest(ip=ip), timeout=DEADLINE)
    check("ResetLoginAttempts cleared the counter", reset.reset)
    verdict = store.RecordLoginAttempt(pb.RecordLoginAttemptRequest(ip=ip), timeout=DEADLINE)
    check("  and the next attempt is allowed again", verdict.allowed and verdict.attempts == 1)
    store.ResetLoginAttempts(pb.ResetLoginAttemptsRequest(ip=ip), timeout=DEADLINE)

    # With an account: attempts from many addresses are refused at the
    # account's limit, by the account; a reset with the account clears it.
    account = f"victim-{run_id}@example.com"
    for n in range(1, ACCOUNT_MAX_ATTEMPTS + 2):
        verdict = store.RecordLoginAttempt(
            pb.RecordLoginAttemptRequest(ip=f"198.51.100.{n}", account=account), timeout=DEADLINE)
        if n <= ACCOUNT_MAX_ATTEMPTS:
            check(f"RecordLoginAttempt(account) #{n}: allowed",
                  verdict.allowed and verdict.refused_by == pb.LOGIN_LIMIT_UNSPECIFIED)
        else:
            check(f"RecordLoginAttempt(account) #{n}: refused by the account",
                  not verdict.allowed and verdict.refused_by == pb.LOGIN_LIMIT_ACCOUNT
                  and verdict.attempts == n and verdict.HasField("retry_after"))
    reset = store.ResetLoginAttempts(
        pb.ResetLoginAttemptsRequest(ip="198.51.100.1", account=account), timeout=DEADLINE)
    verdict = store.RecordLoginAttempt(
        pb.RecordLoginAttemptRequest(ip="198.51.100.99", account=account), timeout=DEADLINE)
    check("ResetLoginAttempts(account) cleared the account", reset.reset and verdict.allowed)

    # A reset with one's own account keeps the guesses against another.
    attacker = "192.0.2.250"
    for _ in range(MAX_ATTEMPTS - 1):
        store.RecordLoginAttempt(
            pb.RecordLoginAttemptRequest(ip=attacker, account=account), timeout=DEADLINE)
    own = f"own-{run_id}"
    store.RecordLoginAttempt(pb.RecordLoginAttemptRequest(ip=attacker, account=own),
                             timeout=DEADLINE)
    store.ResetLoginAttempts(pb.ResetLoginAttemptsRequest(ip=attacker, account=own),
                             timeout=DEADLINE)
    verdicts = [store.RecordLoginAttempt(
        pb.RecordLoginAttemptRequest(ip=attacker, account=account), timeout=DEADLINE)
        for _ in range(2)]
    check("  and a reset with another account keeps the address's guesses",
          verdicts[0].allowed and not verdicts[1].allowed
          and verdicts[1].refused_by == pb.LOGIN_LIMIT_ADDRESS)
    code, details = error_code(store.RecordLoginAttempt, pb.RecordLoginAttemptRequest(
        ip=attacker, account="x" * 257))
    check("RecordLoginAttempt with a 257-byte account: INVALID_ARGUMENT naming account",
          code == grpc.StatusCode.INVALID_ARGUMENT and "account" in details)

    # Trusted devices (#24): a login issues a device token; once untrusted
    # clients have locked the account, the token still gets its owner in,
    # even from an address the attacker locked, until ForgetLoginDevices.
    owner = f"device-owner-{run_id}@example.com"
    issued = store.ResetLoginAttempts(
        pb.ResetLoginAttemptsRequest(ip="203.0.113.1", account=owner, issue_device_token=True),
        timeout=DEADLINE)
    token = issued.device_token
    check("ResetLoginAttempts(issue_device_token) issued a token", len(token) >= 32)
    for n in range(1, ACCOUNT_MAX_ATTEMPTS + 2):
        verdict = store.RecordLoginAttempt(
            pb.RecordLoginAttemptRequest(ip=f"203.0.113.{n + 1}", account=owner), timeout=DEADLINE)
    check("  untrusted attempts lock the account",
          not verdict.allowed and verdict.refused_by == pb.LOGIN_LIMIT_ACCOUNT)
    verdict = store.RecordLoginAttempt(
        pb.RecordLoginAttemptRequest(ip=attacker, account=owner, device_token=token),
        timeout=DEADLINE)
    check("RecordLoginAttempt(device_token): trusted and allowed from a locked address",
          verdict.allowed and verdict.device_trusted)
    verdict = store.RecordLoginAttempt(
        pb.RecordLoginAttemptRequest(ip="203.0.113.99", account=owner, device_token="f" * 64),
        timeout=DEADLINE)
    check("  a made-up token is untrusted (and refused by the account), not an error",
          not verdict.device_trusted and verdict.refused_by == pb.LOGIN_LIMIT_ACCOUNT)
    forgotten = store.ForgetLoginDevices(pb.ForgetLoginDevicesRequest(account=owner),
                                         timeout=DEADLINE)
    verdict = store.RecordLoginAttempt(
        pb.RecordLoginAttemptRequest(ip="203.0.113.98", account=owner, device_token=token),
        timeout=DEADLINE)
    check("ForgetLoginDevices forgot the token",
          forgotten.forgotten == 1 and not verdict.device_trusted and not verdict.allowed)
    code, details = error_code(store.RecordLoginAttempt, pb.RecordLoginAttemptRequest(
        ip=attacker, account=owner, device_token="no spaces"))
    check("RecordLoginAttempt with a bad device_token: INVALID_ARGUMENT naming device_token",
          code == grpc.StatusCode.INVALID_ARGUMENT and "device_token" in details)

    # WatchRevocations: a subscriber sees a revocation made by another call.
    watcher, watched = f"py-watch-{run_id}", f"jti-{run_id}-watched"
    store.CreateSession(pb.CreateSessionRequest(user_id=watcher, token_id=watched),
                        timeout=DEADLINE)
    stream = store.WatchRevocations(pb.WatchRevocationsRequest(), timeout=30)
    first = next(stream)
    check("WatchRevocations starts with a reset", first.reset)
    store.RevokeSession(pb.RevokeSessionRequest(token_id=watched), timeout=DEADLINE)
    store.CreateSession(pb.CreateSessionRequest(user_id=watcher, token_id=f"{watched}-2"),
                        timeout=DEADLINE)
    store.RevokeAllUserSessions(pb.RevokeAllUserSessionsRequest(user_id=watcher),
                                timeout=DEADLINE)
    seen, resets = [], 0
    for message in stream:
        resets += message.reset
        seen.extend(r for r in message.revocations if r.user_id == watcher)
        if len(seen) >= 2:
            break
    stream.cancel()
    check("  no reset while the server's subscription is up", resets == 0)
    check("  the RevokeSession arrives: REVOCATION_REASON_REVOKED with its ids",
          (seen[0].user_id, seen[0].token_id, seen[0].reason)
          == (watcher, watched, pb.REVOCATION_REASON_REVOKED))
    check("  then RevokeAllUserSessions, user-wide (empty token_id)",
          (seen[1].token_id, seen[1].reason) == ("", pb.REVOCATION_REASON_SIGNED_OUT_EVERYWHERE)
          and seen[1].revoked_at.ToMilliseconds() >= seen[0].revoked_at.ToMilliseconds())

    # INVALID_ARGUMENT, with the field named in the message.
    code, details = error_code(
        store.CreateSession, pb.CreateSessionRequest(user_id="has space", token_id=token_1)
    )
    check("CreateSession with a bad user_id: INVALID_ARGUMENT naming user_id",
          code == grpc.StatusCode.INVALID_ARGUMENT and "user_id" in details)
    code, details = error_code(store.GetSession, pb.GetSessionRequest(token_id=""))
    check("GetSession with an empty token_id: INVALID_ARGUMENT naming token_id",
          code == grpc.StatusCode.INVALID_ARGUMENT and "token_id" in details)
    code, details = error_code(store.CreateSession, pb.CreateSessionRequest(
        user_id=user, token_id=f"jti-{run_id}-3", ttl=Duration(seconds=-1)))
    check("CreateSession with a negative ttl: INVALID_ARGUMENT naming ttl",
          code == grpc.StatusCode.INVALID_ARGUMENT and "ttl" in details)
    code, details = error_code(store.RecordLoginAttempt,
                               pb.RecordLoginAttemptRequest(ip="not-an-ip"))
    check("RecordLoginAttempt with a bad ip: INVALID_ARGUMENT naming ip",
          code == grpc.StatusCode.INVALID_ARGUMENT and "ip" in details)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    # Retry the connection quickly while the server is still starting.
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
    with grpc.insecure_channel(sys.argv[1], options=options) as channel:
        try:
            wait_until_serving(channel)
            print(f"polyglot: {sys.argv[1]} is SERVING")
            run(channel)
        except (AssertionError, grpc.RpcError) as failure:
            print(f"  FAILED  {failure}")
            print(f"polyglot: {passed} passed, 1 failed")
            return 1
    print(f"polyglot: {passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
