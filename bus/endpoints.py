"""Default endpoints and timing of the bus (schemas/README.md section 2, DESIGN.md "Heartbeats")."""

from __future__ import annotations

DEFAULT_BIND = "127.0.0.1"  # the address the head and the agents' replicas listen on unless told otherwise
DEFAULT_ROUTER_PORT = 5555
DEFAULT_PUB_PORT = 5556
DEFAULT_ROUTER = f"tcp://{DEFAULT_BIND}:{DEFAULT_ROUTER_PORT}"  # the head's ROUTER: agents, the admin CLI, snapshots
DEFAULT_PUB = f"tcp://{DEFAULT_BIND}:{DEFAULT_PUB_PORT}"  # the head's PUB: routing snapshots
WILDCARDS = ("0.0.0.0", "::", "*")  # every interface: listening there needs an address to advertise to clients
DEFAULT_HEARTBEAT_S = 1.0  # heartbeat interval H, both ways between head and agents
DEFAULT_LIVENESS = 3  # a peer silent for this many intervals is lost


def host_port(host: str, port: int | str) -> str:
    """ "HOST:PORT", an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
