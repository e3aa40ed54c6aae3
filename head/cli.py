"""`python -m head` / `tokenbus head`: flags, logging, and the head run until SIGTERM/SIGINT.

Where it listens: `--bind HOST` with `--router-port`/`--pub-port`, or whole endpoints with `--router`/`--pub` (tests
use free ports and ipc paths). A head reachable from other machines (any endpoint not on loopback or ipc) must have
`--keys`: it refuses to start without them.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sqlite3
from pathlib import Path

import zmq

from bus.curve import KEYS_ENV, CurveKeyError, load_server
from bus.endpoints import (
    DEFAULT_BIND,
    DEFAULT_HEARTBEAT_S,
    DEFAULT_PUB,
    DEFAULT_PUB_PORT,
    DEFAULT_ROUTER,
    DEFAULT_ROUTER_PORT,
    WILDCARDS,
    host_port,
)
from bus.log_setup import configure
from bus.metrics_http import serve_metrics
from bus.run import run_until_signal
from head.server import Head
from head.state import DEFAULT_NODE_GRACE_S

log = logging.getLogger("head")


def endpoint_host(endpoint: str) -> str | None:
    """The host of a tcp endpoint ("tcp://HOST:PORT", IPv6 in brackets), None for ipc and inproc."""
    if not endpoint.startswith("tcp://"):
        return None
    return endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")


def is_local(endpoint: str) -> bool:
    """Whether only this machine can reach `endpoint`: ipc, inproc, or tcp on a loopback address."""
    host = endpoint_host(endpoint)
    if host is None:
        return endpoint.startswith(("ipc://", "inproc://"))
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or an interface name: not known to be loopback
        return False


def tcp_endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tokenbus head", description="the tokenbus head controller")
    p.add_argument(
        "--bind",
        metavar="HOST",
        help=f"the address to listen on, with --router-port and --pub-port (default {DEFAULT_BIND}); 0.0.0.0 for "
        "every interface (needs --advertise)",
    )
    p.add_argument("--router-port", type=int, default=DEFAULT_ROUTER_PORT, help="default %(default)s")
    p.add_argument("--pub-port", type=int, default=DEFAULT_PUB_PORT, help="default %(default)s")
    p.add_argument(
        "--advertise",
        metavar="HOST",
        help="the address clients reach the head at, shown in the log and in `status` (default: the bound one)",
    )
    p.add_argument("--router", help=f"the whole ROUTER endpoint to bind instead (default {DEFAULT_ROUTER})")
    p.add_argument("--pub", help=f"the whole PUB endpoint for routing snapshots instead (default {DEFAULT_PUB})")
    p.add_argument(
        "--keys",
        type=Path,
        default=os.environ.get(KEYS_ENV) or None,
        metavar="DIR",
        help="CURVE: DIR/head.key_secret, accepting only the clients in DIR/authorized/ (`tokenbus keys gen DIR`); "
        f"required unless every endpoint is loopback or ipc (default ${KEYS_ENV} when set)",
    )
    p.add_argument("--db", type=Path, default=Path(".tokenbus/head.db"), help="SQLite file of the desired state")
    p.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT_S, help="heartbeat interval in seconds")
    p.add_argument(
        "--node-grace",
        type=float,
        default=DEFAULT_NODE_GRACE_S,
        metavar="S",
        help="seconds a lost node's replicas are kept (routed, not replaced) in case its agent comes back "
        f"(default {DEFAULT_NODE_GRACE_S:g})",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="PORT",
        help="serve Prometheus /metrics on this port of the ROUTER's host (default 0: a free port, shown in `status`)",
    )
    opts = p.parse_args(argv)
    if not 0 <= opts.metrics_port <= 65535:
        p.error("--metrics-port must be 0 to 65535")
    if opts.heartbeat <= 0:
        p.error("--heartbeat must be > 0")
    if opts.node_grace < 0:
        p.error("--node-grace must be >= 0")
    bind = opts.bind or DEFAULT_BIND
    opts.router = opts.router or tcp_endpoint(bind, opts.router_port)
    opts.pub = opts.pub or tcp_endpoint(bind, opts.pub_port)
    exposed = [e for e in (opts.router, opts.pub) if not is_local(e)]
    if exposed and opts.keys is None:
        p.error(
            f"{' and '.join(exposed)} can be reached from other machines: start the head with --keys DIR "
            "(`tokenbus keys gen DIR` makes them) so that only known agents, proxies and CLIs get in"
        )
    if opts.advertise is None and any(endpoint_host(e) in WILDCARDS for e in (opts.router, opts.pub)):
        p.error("binding every interface needs --advertise HOST: the address agents, proxies and the CLI use")
    return opts


async def _serve(opts: argparse.Namespace) -> int:
    try:
        keys = load_server(opts.keys) if opts.keys is not None else None
    except CurveKeyError as e:
        log.error("cannot start: %s", e)
        return 2
    metrics_host = endpoint_host(opts.router) or DEFAULT_BIND  # an ipc or inproc head serves it on loopback
    try:
        metrics_port = serve_metrics(metrics_host, opts.metrics_port)
    except OSError as e:
        log.error("cannot serve metrics on %s: %s", host_port(metrics_host, opts.metrics_port), e)
        return 1
    try:
        head = Head(
            opts.router,
            opts.pub,
            opts.db,
            heartbeat_s=opts.heartbeat,
            node_grace_s=opts.node_grace,
            keys=keys,
            advertise=opts.advertise,
            metrics_address=host_port(opts.advertise or metrics_host, metrics_port),
        )
    except sqlite3.Error as e:
        log.error("cannot open the head's database %s: %s", opts.db, e)
        return 1
    try:
        head.bind()
    except zmq.ZMQError as e:
        log.error("cannot bind %s / %s: %s", opts.router, opts.pub, e)
        return 1
    await head.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    configure("head")
    return run_until_signal(_serve(opts))
