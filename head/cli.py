"""`python -m head` / `tokenbus head`: flags, logging, and the head run until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import sqlite3
from pathlib import Path

import zmq

from bus.endpoints import DEFAULT_HEARTBEAT_S, DEFAULT_PUB, DEFAULT_ROUTER
from bus.log_setup import configure
from bus.run import run_until_signal
from head.server import Head
from head.state import DEFAULT_NODE_GRACE_S

log = logging.getLogger("head")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tokenbus head", description="the tokenbus head controller")
    p.add_argument("--router", default=DEFAULT_ROUTER, help=f"ROUTER endpoint to bind (default {DEFAULT_ROUTER})")
    p.add_argument("--pub", default=DEFAULT_PUB, help=f"PUB endpoint for routing snapshots (default {DEFAULT_PUB})")
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
    opts = p.parse_args(argv)
    if opts.heartbeat <= 0:
        p.error("--heartbeat must be > 0")
    if opts.node_grace < 0:
        p.error("--node-grace must be >= 0")
    return opts


async def _serve(opts: argparse.Namespace) -> int:
    try:
        head = Head(opts.router, opts.pub, opts.db, heartbeat_s=opts.heartbeat, node_grace_s=opts.node_grace)
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
