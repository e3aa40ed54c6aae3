"""The head's Prometheus metrics (served by bus/metrics_http.py on `--metrics-port`).

Gauges of the cluster's state are set by the head's one task after each reconcile pass, never computed on the
scrape thread: the state is owned by that task and must not be read while it changes.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

NODES = Gauge("tokenbus_head_nodes", "Nodes the head knows, by state (alive, lost)", ["state"])
REPLICAS = Gauge(
    "tokenbus_head_replicas", "Replicas in the head's table, by state as routed (starting, ready, draining)", ["state"]
)
RECONCILE_SECONDS = Histogram(
    "tokenbus_head_reconcile_duration_seconds",
    "Time of one reconcile pass (desired vs actual, commands to the agents)",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
SNAPSHOT_VERSION = Gauge("tokenbus_head_snapshot_version", "Version of the routing snapshot published last")
SNAPSHOT_BYTES = Gauge("tokenbus_head_snapshot_bytes", "Payload size of the routing snapshot published last")
SNAPSHOTS_PUBLISHED = Counter(
    "tokenbus_head_snapshots_published", "Routing snapshot versions published (re-publishes not counted)"
)
ADMIN_REQUESTS = Counter(
    "tokenbus_head_admin_requests",
    "Admin requests answered, by op (deploy, scale, delete, status, other) and result (ok, refused)",
    ["op", "result"],
)
PROXIES = Gauge("tokenbus_head_proxies", "Proxies that reported to the head in the last 10 s")
REPLICA_UNEXPECTED_EXITS = Counter(
    "tokenbus_head_replica_unexpected_exits",
    "Replicas that exited without the head asking (each is replaced), by deployment",
    ["deployment"],
)
