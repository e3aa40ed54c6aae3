"""The /metrics endpoint of a Python process (head, agent, worker): prometheus-client's HTTP server on a thread.

Each process serves its own registry (the default one: its tokenbus_* metrics, and the client library's process_*
and python_* ones) on a port of its own, 0 by default (the kernel picks one); the address it got is what the process
announces to the head, so that `tokenbus top` and Prometheus find it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from prometheus_client import Gauge, disable_created_metrics, start_http_server

from bus.endpoints import host_port
from schemas.messages import ReplicaState

log = logging.getLogger(__name__)


def set_replica_states(gauge: Gauge, states: Iterable[ReplicaState]) -> None:
    """Sets `gauge{state}` to how many of `states` are in each state but EXITED (lower case), 0 for a state none is in:
    every series stays there, so a count falling to 0 is seen as 0 rather than as a series gone."""
    counts = Counter(states)
    for state in ReplicaState:
        if state is not ReplicaState.EXITED:
            gauge.labels(state.value.lower()).set(counts[state])


def serve_metrics(host: str, port: int) -> int:
    """Serves /metrics on `host`:`port` (0: a free port) from a daemon thread; the port it listens on. OSError when
    it cannot bind."""
    # the `_created` series would double every counter and histogram in the text format, and nothing reads them
    disable_created_metrics()
    server, _ = start_http_server(port, addr=host)
    bound = int(server.server_address[1])
    log.info("metrics on http://%s/metrics", host_port(host, bound))
    return bound
