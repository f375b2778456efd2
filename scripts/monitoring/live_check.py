#!/usr/bin/env python3
"""The live half of scripts/check-monitoring.sh: a real session-server scraped
by a real Prometheus, load that makes every signal exist, then every dashboard
query and every alert expression evaluated through Prometheus's HTTP API.

Starts, each on a free loopback port in WORK: a private redis-server (it is
stopped and restarted; the shared Redis is never touched), the session-server
binary, and Prometheus scraping it every second with rules.yaml loaded. Then:
  1. load: every RPC, bad input (INVALID_ARGUMENT), a user past
     MAX_SESSIONS_PER_USER (evictions), one address past the login limit
     (refusals), rotations and refresh-token reuse (a family ended), a burst past MAX_CONCURRENT_REQUESTS while Redis sleeps
     (RESOURCE_EXHAUSTED and slow calls);
  2. Redis set to an evicting maxmemory-policy, then back;
  3. Redis stopped and started three times (readiness flapping), then stopped
     until SessionStoreRedisDown is `firing`, with calls failing meanwhile;
  4. every panel query (the dashboard's variables set to match everything)
     and every alert expression as loaded by Prometheus, as range queries over
     the run: each must parse and return data; alerts the load drives must
     have been true, the others' signal (their expression without the final
     comparison) must have data.

Usage: live_check.py SERVER_BIN RULES DASHBOARD WORK   (stubs on PYTHONPATH)
Exits 1 with the reasons on any failure.
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc

from sessionstore.v1 import session_store_pb2 as pb
from sessionstore.v1 import session_store_pb2_grpc as pb_grpc

SERVER_BIN, RULES, DASHBOARD, WORK = sys.argv[1:5]
MAX_CONCURRENT = 4
MAX_SESSIONS = 3
MAX_ATTEMPTS = 5

# Alerts this run drives true at some point (most stay pending: their `for`
# is longer than the run); the pool alert is checked through its signal, as
# filling the pool takes sustained load.
MUST_BE_TRUE = {
    "SessionStoreRedisDown",
    "SessionStoreHighLatency",
    "SessionStoreReadinessFlapping",
    "SessionStoreErrorRatio",
    "SessionStoreRequestsShed",
    "SessionStoreLoginRefusalSpike",
    "SessionStoreEvictionSpike",
    "SessionStoreRedisEvictingPolicy",
    "SessionStoreRefreshReuseDetected",
}

procs = []
failures = []


def log(msg):
    print(f"live-check: {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(name, args, env=None):
    out = open(os.path.join(WORK, f"{name}.log"), "ab")
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    procs.append(proc)
    return proc


def wait_for(what, check, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.2)
    raise SystemExit(f"live-check: FAILED: {what} within {seconds} s")


# --- Redis ---------------------------------------------------------------

redis_port = free_port()
redis_proc = None


def redis_cli(*args):
    return subprocess.run(
        ["redis-cli", "-p", str(redis_port), *args], capture_output=True, text=True, timeout=10
    ).stdout.strip()


def start_redis():
    global redis_proc
    redis_proc = spawn("redis", [
        "redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
        "--appendonly", "no", "--dir", WORK, "--maxmemory-policy", "noeviction",
        # A limit, so that an evicting policy really evicts (the server
        # ignores the policy while maxmemory is 0).
        "--maxmemory", "256mb",
        "--enable-debug-command", "local",
    ])
    wait_for("redis-server answers", lambda: redis_cli("ping") == "PONG", 10)


def stop_redis():
    redis_proc.terminate()
    redis_proc.wait(10)


# --- Prometheus ----------------------------------------------------------

prom_port = free_port()
PROM = f"http://127.0.0.1:{prom_port}"


def api(path, **params):
    url = f"{PROM}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as err:  # 400/422: a query that does not parse
        return json.load(err)


def instant(query):
    answer = api("query", query=query)
    return answer["data"]["result"] if answer.get("status") == "success" else []


def over_run(query, start):
    """Range query over the whole run: (error or None, series with data)."""
    answer = api("query_range", query=query, start=f"{start:.3f}", end=f"{time.time():.3f}", step="1s")
    if answer.get("status") != "success":
        return answer.get("error", "failed"), []
    return None, [s for s in answer["data"]["result"] if s["values"]]


def main():
    start_redis()
    grpc_port, metrics_port = free_port(), free_port()
    env = dict(os.environ, NO_COLOR="1", LISTEN_ADDR=f"127.0.0.1:{grpc_port}",
               METRICS_ADDR=f"127.0.0.1:{metrics_port}", REDIS_URL=f"redis://127.0.0.1:{redis_port}",
               KEY_PREFIX=f"monitoring-{uuid.uuid4().hex[:8]}:", HEALTH_CHECK_INTERVAL_MS="200",
               REDIS_TIMEOUT_MS="500",
               # Readiness follows Redis at once, so stopping Redis flaps it
               # (by default an outage leaves readiness SERVING).
               READINESS_FOLLOWS_REDIS="true", READINESS_REDIS_FAILURES="1",
               MAX_CONCURRENT_REQUESTS=str(MAX_CONCURRENT),
               MAX_SESSIONS_PER_USER=str(MAX_SESSIONS), RATE_LIMIT_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
               SHUTDOWN_DELAY_MS="0")
    env.pop("AUTH_TOKENS_FILE", None)
    spawn("server", [SERVER_BIN], env=env)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    wait_for("session-server serves /metrics",
             lambda: b"sessionstore_redis_up 1" in urllib.request.urlopen(metrics_url, timeout=2).read(), 30)

    rules_copy = os.path.join(WORK, "rules.yaml")
    with open(RULES) as src, open(rules_copy, "w") as dst:
        dst.write(src.read())
    config = os.path.join(WORK, "prometheus.yml")
    with open(config, "w") as f:
        f.write(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [{rules_copy}]
scrape_configs:
  - job_name: sessionstore
    static_configs: [{{targets: ["127.0.0.1:{metrics_port}"]}}]
""")
    spawn("prometheus", [
        "prometheus", f"--config.file={config}", f"--storage.tsdb.path={WORK}/tsdb",
        f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn",
    ])
    wait_for("Prometheus scrapes the server", lambda: instant('up{job="sessionstore"} == 1'), 60)
    run_start = time.time() - 1
    log(f"redis :{redis_port}, server :{grpc_port} (metrics :{metrics_port}), prometheus :{prom_port}")

    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    store = pb_grpc.SessionStoreStub(channel)

    def call(method, request, timeout=5):
        try:
            return getattr(store, method)(request, timeout=timeout)
        except grpc.RpcError as err:
            return err.code()

    # 1. Load. A counter appears at its first increment, and Prometheus sees
    # no increase before its first sample: so first one call of each kind,
    # until every counter the alerts use has been scraped, then the bulk.
    run = uuid.uuid4().hex[:8]

    def rotate_and_reuse(user, rotations):
        """Starts a family, rotates it, then presents a token id it never had
        with its real family id: reuse, whatever ROTATION_GRACE_MS is."""
        created = call("CreateSession", pb.CreateSessionRequest(user_id=user, token_id=f"{user}-0"))
        if not isinstance(created, pb.CreateSessionResponse) or not created.session.family_id:
            failures.append(f"CreateSession for {user} answered no family: {created}")
            return
        family = created.session.family_id
        for i in range(rotations):
            call("RotateSession", pb.RotateSessionRequest(
                user_id=user, family_id=family, token_id=f"{user}-{i}", new_token_id=f"{user}-{i + 1}"))
        call("RotateSession", pb.RotateSessionRequest(
            user_id=user, family_id=family, token_id=f"{user}-stolen", new_token_id=f"{user}-x"))

    rotate_and_reuse(f"rot-{run}-prime", 1)
    for i in range(MAX_SESSIONS + 1):  # one eviction
        call("CreateSession", pb.CreateSessionRequest(user_id=f"busy-{run}", token_id=f"prime-{run}-{i}"))
    for _ in range(MAX_ATTEMPTS + 1):  # one refusal
        call("RecordLoginAttempt", pb.RecordLoginAttemptRequest(ip="192.0.2.7"))
    for name in ("sessionstore_sessions_evicted_total", "sessionstore_sessions_created_total",
                 'sessionstore_login_attempts_total{result="refused"}',
                 'sessionstore_login_attempts_total{result="allowed"}',
                 "sessionstore_refresh_reuse_detected_total"):
        wait_for(f"{name} is scraped", lambda: instant(name), 20)
    time.sleep(1.5)  # one more scrape at these values

    for i in range(40):
        user, token = f"u-{run}-{i}", f"t-{run}-{i}"
        call("CreateSession", pb.CreateSessionRequest(user_id=user, token_id=token))
        call("GetSession", pb.GetSessionRequest(token_id=token))
        call("GetUserSessionCount", pb.GetUserSessionCountRequest(user_id=user))
        call("ListUserSessions", pb.ListUserSessionsRequest(user_id=user))
        call("CreateSession", pb.CreateSessionRequest(user_id=user, token_id=token))  # already_exists
        if i % 2:
            call("RevokeSession", pb.RevokeSessionRequest(token_id=token, user_id=user))
        else:
            call("RevokeAllUserSessions", pb.RevokeAllUserSessionsRequest(user_id=user))
        call("CreateSession", pb.CreateSessionRequest(user_id=user, token_id=token))  # token_revoked
        call("GetSession", pb.GetSessionRequest(token_id=""))  # INVALID_ARGUMENT
        call("CreateSession", pb.CreateSessionRequest(user_id="", token_id=token))  # INVALID_ARGUMENT
    for i in range(5):  # rotations, each family ended by a reuse
        rotate_and_reuse(f"rot-{run}-{i}", 3)
    for i in range(80):  # one user far past the cap: most creations evict
        call("CreateSession", pb.CreateSessionRequest(user_id=f"busy-{run}", token_id=f"busy-{run}-{i}"))
    for i in range(150):  # one address far past the limit: most attempts refused
        call("RecordLoginAttempt", pb.RecordLoginAttemptRequest(ip="192.0.2.7"))
    call("ResetLoginAttempts", pb.ResetLoginAttemptsRequest(ip="192.0.2.7"))
    call("RecordLoginAttempt", pb.RecordLoginAttemptRequest(ip="not an address"))  # INVALID_ARGUMENT

    # A burst while Redis sleeps: MAX_CONCURRENT_REQUESTS calls wait (slow
    # calls for the latency panels), the rest are shed at once. The shed
    # counter only appears with the first burst, and Prometheus sees no
    # increase before its first sample: so the later bursts wait until it
    # was scraped (with a faster server all three fit between two scrapes).
    for burst in range(3):
        if burst == 1:
            wait_for("the shed counter is scraped",
                     lambda: instant('sessionstore_rpc_requests_total{code="RESOURCE_EXHAUSTED"}'), 20)
            time.sleep(1.5)  # one more scrape at this value
        sleeper = threading.Thread(target=redis_cli, args=("debug", "sleep", "0.4"))
        sleeper.start()
        time.sleep(0.05)
        with ThreadPoolExecutor(32) as pool:
            codes = list(pool.map(lambda i: call("GetSession", pb.GetSessionRequest(token_id=f"t-{run}-{i}")),
                                  range(32)))
        sleeper.join()
        log(f"burst: {sum(c == grpc.StatusCode.RESOURCE_EXHAUSTED for c in codes)} of 32 shed")
    log("load done")

    # 2. An evicting policy, long enough for a few scrapes.
    redis_cli("config", "set", "maxmemory-policy", "allkeys-lru")
    wait_for("the evicting policy is seen", lambda: instant("sessionstore_redis_eviction_policy_ok == 0"), 20)
    wait_for("SessionStoreRedisEvictingPolicy is pending",
             lambda: instant('ALERTS{alertname="SessionStoreRedisEvictingPolicy"}'), 20)
    redis_cli("config", "set", "maxmemory-policy", "noeviction")
    wait_for("noeviction is seen again", lambda: instant("sessionstore_redis_eviction_policy_ok == 1"), 20)

    # 3. Redis flaps three times, then stays down until the alert fires.
    for _ in range(3):
        stop_redis()
        wait_for("readiness redis_down is seen", lambda: instant('sessionstore_readiness{state="redis_down"} == 1'), 20)
        start_redis()
        wait_for("readiness serving is seen", lambda: instant('sessionstore_readiness{state="serving"} == 1'), 20)
    stop_redis()
    down_since = time.monotonic()

    def firing():
        call("GetSession", pb.GetSessionRequest(token_id=f"t-{run}-0"))  # UNAVAILABLE
        call("CreateSession", pb.CreateSessionRequest(user_id=f"u-{run}", token_id=f"down-{run}"))
        alerts = api("alerts")["data"]["alerts"]
        return any(a["labels"]["alertname"] == "SessionStoreRedisDown" and a["state"] == "firing" for a in alerts)

    wait_for("SessionStoreRedisDown firing", firing, 90)
    log(f"SessionStoreRedisDown firing {time.monotonic() - down_since:.0f} s after Redis stopped")
    start_redis()
    time.sleep(2)  # a scrape and an evaluation with Redis back

    # 4. Every panel query and every alert expression, over the whole run.
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    panels = 0
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            query = (target["expr"].replace("$__rate_interval", "1m")
                     .replace("$job", ".*").replace("$instance", ".*"))
            error, series = over_run(query, run_start)
            panels += 1
            where = f"panel '{panel['title']}' {target['refId']}"
            if error:
                failures.append(f"{where}: does not evaluate: {error}")
            elif not series:
                failures.append(f"{where}: no data: {query}")
    log(f"{panels} panel queries evaluated")

    groups = api("rules", type="alert")["data"]["groups"]
    alerts = [rule for group in groups for rule in group["rules"]]
    with open(RULES) as f:
        expected = set(re.findall(r"^\s*- alert: (\S+)", f.read(), re.M))
    if {a["name"] for a in alerts} != expected:
        failures.append(f"Prometheus loaded {sorted(a['name'] for a in alerts)}, rules.yaml has {sorted(expected)}")
    for rule in alerts:
        name, expr = rule["name"], rule["query"]
        if rule.get("health") != "ok":
            failures.append(f"{name}: rule health {rule.get('health')}: {rule.get('lastError')}")
        error, series = over_run(expr, run_start)
        if error:
            failures.append(f"{name}: does not evaluate: {error}")
            continue
        signal = re.sub(r"\s*(>=|<=|==|!=|>|<)\s*-?[0-9.]+\s*$", "", expr)
        _, signal_series = over_run(signal, run_start)
        true = bool(series)
        log(f"{name}: {'true during the run' if true else 'never true'}, signal "
            f"{'has data' if signal_series else 'EMPTY'}")
        if not signal_series:
            failures.append(f"{name}: its signal has no data: {signal}")
        if name in MUST_BE_TRUE and not true:
            failures.append(f"{name}: the load should have made it true: {expr}")

    if failures:
        for failure in failures:
            log(f"FAILED: {failure}")
        return 1
    log(f"passed: {panels} panel queries and {len(alerts)} alerts")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    sys.exit(code)
