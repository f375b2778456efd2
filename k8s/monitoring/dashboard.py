#!/usr/bin/env python3
"""Writes dashboard.json, the Grafana dashboard for session-server, from the
panel list below (Python standard library only; import the JSON in Grafana, or
ship it with a dashboard provisioner / the grafana-sidecar ConfigMap label).

Usage: python3 k8s/monitoring/dashboard.py [OUT]   (default: dashboard.json beside this file)
scripts/check-monitoring.sh regenerates it and fails on a diff, then evaluates
every query below against a live server through Prometheus.

Queries use the variables $job and $instance and Grafana's $__rate_interval.
"""

import json
import pathlib
import sys

SEL = 'job=~"$job", instance=~"$instance"'
SESSIONS = 'method=~"/sessionstore[.]v1[.]SessionStore/.*"'
SERVER_ERRORS = 'code=~"UNAVAILABLE|INTERNAL|UNKNOWN|DEADLINE_EXCEEDED|DATA_LOSS"'
RATE = "[$__rate_interval]"


def rpc_quantile(q):
    return (
        f"histogram_quantile({q}, sum by (method, le) "
        f"(rate(sessionstore_rpc_duration_seconds_bucket{{{SEL}, {SESSIONS}}}{RATE})))"
    )


# (row title, [(panel title, unit, description, [(legend, query), ...]), ...])
ROWS = [
    ("Traffic", [
        ("RPC rate by method and code", "reqps",
         "Calls per second, every service, by method and gRPC code.",
         [("{{method}} {{code}}",
           f"sum by (method, code) (rate(sessionstore_rpc_requests_total{{{SEL}}}{RATE}))")]),
        ("Error ratio by method and code", "percentunit",
         "Share of each method's calls that ended with each non-OK code. Server-side codes "
         "(UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED) feed SessionStoreErrorRatio; caller "
         "errors (INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED) do not.",
         [("{{method}} {{code}}",
           f'sum by (method, code) (rate(sessionstore_rpc_requests_total{{{SEL}, code!="OK"}}{RATE}))'
           " / ignoring (code) group_left "
           f"sum by (method) (rate(sessionstore_rpc_requests_total{{{SEL}}}{RATE}))")]),
        ("Server-side error ratio (SessionStore)", "percentunit",
         "What SessionStoreErrorRatio alerts on (above 5% for 5 minutes).",
         [("server errors",
           f"sum (rate(sessionstore_rpc_requests_total{{{SEL}, {SESSIONS}, {SERVER_ERRORS}}}{RATE}))"
           f" / sum (rate(sessionstore_rpc_requests_total{{{SEL}, {SESSIONS}}}{RATE}))")]),
        ("Latency p50 / p99 by method", "s",
         "SessionStore methods; SessionStoreHighLatency alerts on p99 above 250 ms for 10 minutes.",
         [("p50 {{method}}", rpc_quantile(0.5)), ("p99 {{method}}", rpc_quantile(0.99))]),
    ]),
    ("Redis", [
        ("Redis round trip p50 / p99 by op", "s",
         "One Redis round trip (a command or a script) by store operation, readiness PINGs included.",
         [("p50 {{op}}",
           "histogram_quantile(0.5, sum by (op, le) "
           f"(rate(sessionstore_redis_command_duration_seconds_bucket{{{SEL}}}{RATE})))"),
          ("p99 {{op}}",
           "histogram_quantile(0.99, sum by (op, le) "
           f"(rate(sessionstore_redis_command_duration_seconds_bucket{{{SEL}}}{RATE})))")]),
        ("Redis errors by op and kind", "ops",
         "Failed Redis operations per second: unavailable, timeout, out_of_memory, internal.",
         [("{{op}} {{kind}}",
           f"sum by (op, kind) (rate(sessionstore_redis_errors_total{{{SEL}}}{RATE}))")]),
        ("Redis pool use", "short",
         "Connections checked out, open, and REDIS_POOL_SIZE, per instance; "
         "SessionStoreRedisPoolSaturated alerts above 80% in use.",
         [("in use {{instance}}", f"sum by (instance) (sessionstore_redis_pool_in_use_connections{{{SEL}}})"),
          ("open {{instance}}", f"sum by (instance) (sessionstore_redis_pool_connections{{{SEL}}})"),
          ("max {{instance}}", f"max by (instance) (sessionstore_redis_pool_max_connections{{{SEL}}})")]),
        ("Readiness by state", "short",
         "Instances in each readiness state: serving, redis_down (PING fails), redis_evicts "
         "(maxmemory-policy is not noeviction).",
         [("{{state}}", f"sum by (state) (sessionstore_readiness{{{SEL}}})")]),
        ("Redis up and eviction policy", "short",
         "sessionstore_redis_up (1 = PING answers) and sessionstore_redis_eviction_policy_ok "
         "(1 = noeviction, 0 = may evict, -1 = unknown) per instance.",
         [("redis up {{instance}}", f"min by (instance) (sessionstore_redis_up{{{SEL}}})"),
          ("policy ok {{instance}}", f"min by (instance) (sessionstore_redis_eviction_policy_ok{{{SEL}}})")]),
    ]),
    ("Limits", [
        ("Calls refused with RESOURCE_EXHAUSTED", "reqps",
         "Calls shed at MAX_CONCURRENT_REQUESTS or a stream cap (or Redis out of memory), by method.",
         [("{{method}}",
           f'sum by (method) (rate(sessionstore_rpc_requests_total{{{SEL}, code="RESOURCE_EXHAUSTED"}}{RATE}))')]),
    ]),
    ("Sessions and logins", [
        ("Sessions created, revoked, evicted, refused", "ops",
         "Per second. Evicted: a user's oldest session pushed out at MAX_SESSIONS_PER_USER.",
         [("created", f"sum (rate(sessionstore_sessions_created_total{{{SEL}}}{RATE}))"),
          ("revoked {{how}}", f"sum by (how) (rate(sessionstore_sessions_revoked_total{{{SEL}}}{RATE}))"),
          ("evicted", f"sum (rate(sessionstore_sessions_evicted_total{{{SEL}}}{RATE}))"),
          ("refused {{reason}}", f"sum by (reason) (rate(sessionstore_sessions_refused_total{{{SEL}}}{RATE}))")]),
        ("Rotations by outcome", "ops",
         "RotateSession answers per second: rotated (a refresh), already_rotated (a repeat within "
         "ROTATION_GRACE_MS: a retry or racing tabs), reuse_detected (a family ended: "
         "SessionStoreRefreshReuseDetected), not_found (no live family: idle too long, past its "
         "end, logged out), token_taken (the new token id was taken).",
         [("{{outcome}}", f"sum by (outcome) (rate(sessionstore_rotations_total{{{SEL}}}{RATE}))")]),
        ("Login attempts allowed / refused", "ops",
         "RecordLoginAttempt answers per second; a burst of refused is password guessing.",
         [("{{result}}", f"sum by (result) (rate(sessionstore_login_attempts_total{{{SEL}}}{RATE}))")]),
    ]),
]


def panel(panel_id, title, unit, description, targets, x, y):
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": expr,
                "legendFormat": legend,
            }
            for i, (legend, expr) in enumerate(targets)
        ],
    }


def variable(name, query):
    return {
        "name": name,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "definition": query,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,
        "sort": 1,
    }


def dashboard():
    panels, panel_id, y = [], 1, 0
    for row_title, row_panels in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id, y = panel_id + 1, y + 1
        for i, spec in enumerate(row_panels):
            panels.append(panel(panel_id, *spec, x=12 * (i % 2), y=y + 8 * (i // 2)))
            panel_id += 1
        y += 8 * ((len(row_panels) + 1) // 2)
    return {
        "title": "SessionStore",
        "uid": "sessionstore",
        "description": "session-server: traffic, errors, latency, Redis, limits, sessions and logins. "
                       "Generated by k8s/monitoring/dashboard.py; alerts in k8s/monitoring/rules.yaml, "
                       "runbook in docs/runbook.md.",
        "tags": ["sessionstore", "grpc", "redis"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus",
             "current": {}, "label": "Prometheus"},
            variable("job", "label_values(sessionstore_rpc_requests_total, job)"),
            variable("instance", 'label_values(sessionstore_rpc_requests_total{job=~"$job"}, instance)'),
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).with_name("dashboard.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
