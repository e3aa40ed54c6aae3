"""The /metrics endpoint of a Python process (head, agent, worker): prometheus-client's HTTP server on a thread.

Each process serves its own registry (the default one: its tokenbus_* metrics, and the client library's process_*
and python_* ones) on a port of its own, 0 by default (the kernel picks one); the address it got is what the process
announces to the head, so that `tokenbus top` and Prometheus find it.
"""

from __future__ import annotations

import logging

from prometheus_client import disable_created_metrics, start_http_server

from bus.endpoints import host_port

log = logging.getLogger(__name__)


def serve_metrics(host: str, port: int) -> int:
    """Serves /metrics on `host`:`port` (0: a free port) from a daemon thread; the port it listens on. OSError when
    it cannot bind."""
    # the `_created` series would double every counter and histogram in the text format, and nothing reads them
    disable_created_metrics()
    server, _ = start_http_server(port, addr=host)
    bound = int(server.server_address[1])
    log.info("metrics on http://%s/metrics", host_port(host, bound))
    return bound
