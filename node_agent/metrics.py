"""The agent's Prometheus metrics (served by bus/metrics_http.py on `--metrics-port`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REPLICA_STARTS = Counter("tokenbus_agent_replica_starts", "Replicas this agent spawned (both processes started)")
REPLICA_EXITS = Counter(
    "tokenbus_agent_replica_exits",
    "Replicas that ended, by cause: asked (the head or the agent's own stop), crashed (a process exited while READY), "
    "failed_start (not READY: spawn error, no LISTENING, ready timeout, a process exited), refused (a StartReplica it "
    "could not take), unresponsive (re-adopted but not answering Health: ended), agent_error",
    ["cause"],
)
REPLICAS_ADOPTED = Counter(
    "tokenbus_agent_replicas_adopted", "Replicas a previous agent left running that this one re-adopted at its start"
)
REPLICAS = Gauge("tokenbus_agent_replicas", "Replicas this agent runs, by state (starting, ready, draining)", ["state"])
REGISTERED = Gauge("tokenbus_agent_registered", "1 while the agent is registered with the head, else 0")
REGISTRATIONS = Counter("tokenbus_agent_registrations", "Registrations the head acknowledged (1 + reconnections)")
_RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REGISTER_ROUND_TRIP = Histogram(
    "tokenbus_agent_register_round_trip_seconds",
    "From a REGISTER sent to the head's REGISTER_ACK received (the head answers no other agent message)",
    buckets=_RTT_BUCKETS,
)
HEAD_HEARTBEAT_GAP = Histogram(
    "tokenbus_agent_head_heartbeat_gap_seconds",
    "Between two heartbeats received from the head; it sends one every interval, so the excess over the interval is "
    "the head's or the network's delay",
    buckets=(0.1, 0.25, 0.5, 0.75, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0),
)
