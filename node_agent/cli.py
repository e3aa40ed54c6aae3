"""`python -m node_agent` / `tokenbus agent`: flags, capacity, the state directory (re-adopting the replicas a previous
agent left running), the head link, and a clean stop on SIGTERM/SIGINT (which stops every replica)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from pathlib import Path

from bus.curve import CurveKeyError, add_client_args, client_keys
from bus.endpoints import DEFAULT_BIND, DEFAULT_HEARTBEAT_S, DEFAULT_LIVENESS, DEFAULT_ROUTER, WILDCARDS, host_port
from bus.log_setup import configure
from bus.metrics_http import serve_metrics
from bus.run import run_until_signal
from node_agent.agent import Agent
from node_agent.binaries import bin_dir
from node_agent.capacity import default_cpu_slots, memory_bytes
from node_agent.gpus import GpuSpecError, discover_gpus, parse_gpus
from node_agent.head_link import Capacity, HeadLink
from node_agent.state import StateDir, StateDirError, default_state_dir

log = logging.getLogger("node_agent")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tokenbus agent", description="the tokenbus node agent")
    p.add_argument("--head", default=DEFAULT_ROUTER, help=f"the head's ROUTER endpoint (default {DEFAULT_ROUTER})")
    p.add_argument("--node-id", default=f"{socket.gethostname()}-{os.getpid()}", help="default: hostname-pid")
    p.add_argument("--cpu-slots", type=int, default=default_cpu_slots(), help="replicas this node runs at most")
    p.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT_S, help="heartbeat interval in seconds")
    p.add_argument(
        "--gpus",
        metavar="SPEC",
        help="this node's GPUs by hand: a count N, or INDEX[:NAME[:MEMORY_GIB]],... (default: found through NVML)",
    )
    p.add_argument(
        "--bind",
        default=DEFAULT_BIND,
        metavar="HOST",
        help="the address replicas' gRPC servers listen on (default %(default)s); 0.0.0.0 needs --advertise",
    )
    p.add_argument(
        "--advertise",
        metavar="HOST",
        help="the address proxies reach this node's replicas at, sent to the head (default: the --bind address)",
    )
    add_client_args(p, "agent")
    p.add_argument(
        "--state-dir",
        type=Path,
        help="where the replicas' state is kept, so that a restarted agent of the same --node-id re-adopts them "
        f"(default {default_state_dir('NODE_ID')})",
    )
    p.add_argument(
        "--orphan-timeout",
        type=float,
        help="seconds a replica keeps serving after its agent died with no agent calling it, then stops itself "
        "(default: tokenbus-replica's, 60)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="PORT",
        help="serve Prometheus /metrics on this port of the --bind address (default 0: a free port, sent to the head)",
    )
    opts = p.parse_args(argv)
    if not 0 <= opts.metrics_port <= 65535:
        p.error("--metrics-port must be 0 to 65535")
    if opts.cpu_slots < 0:
        p.error("--cpu-slots must be >= 0")
    if opts.heartbeat <= 0:
        p.error("--heartbeat must be > 0")
    if opts.orphan_timeout is not None and not opts.orphan_timeout > 0:
        p.error("--orphan-timeout must be > 0")
    try:
        opts.gpus = discover_gpus() if opts.gpus is None else parse_gpus(opts.gpus)
    except GpuSpecError as e:
        p.error(f"--gpus: {e}")
    if opts.state_dir is None:
        opts.state_dir = default_state_dir(opts.node_id)
    if opts.advertise is None:
        if opts.bind in WILDCARDS:
            p.error("--bind on every interface needs --advertise HOST: the address proxies reach replicas at")
        opts.advertise = opts.bind
    try:
        opts.keys = client_keys(opts)
    except CurveKeyError as e:
        p.error(str(e))
    return opts


async def _serve(opts: argparse.Namespace) -> int:
    try:
        metrics_port = serve_metrics(opts.bind, opts.metrics_port)
    except OSError as e:
        log.error("agent %s cannot serve metrics on %s: %s", opts.node_id, host_port(opts.bind, opts.metrics_port), e)
        return 1
    metrics = host_port(opts.advertise, metrics_port)
    capacity = Capacity(opts.node_id, opts.advertise, opts.cpu_slots, opts.gpus, memory_bytes(), metrics)
    binaries = bin_dir()
    log.info(
        "agent %s started: %d cpu slots, %s GPUs, %d MiB; replicas bind to %s, reached at %s; binaries from %s",
        capacity.node_id,
        capacity.cpu_slots,
        f"{len(capacity.gpus)} ({', '.join(sorted({g.name for g in capacity.gpus}))})" if capacity.gpus else "no",
        capacity.memory_bytes >> 20,
        opts.bind,
        opts.advertise,
        binaries,
    )
    try:
        state = StateDir(opts.state_dir)
    except StateDirError as e:
        log.error("agent %s cannot start: %s", opts.node_id, e)
        return 1
    log.info("agent %s keeps its replicas' state in %s", opts.node_id, state.path)
    agent = Agent(opts.node_id, opts.bind, opts.advertise, binaries, state, opts.orphan_timeout, gpus=opts.gpus)
    await agent.adopt()
    link = HeadLink(
        opts.head,
        capacity,
        heartbeat_s=opts.heartbeat,
        liveness=DEFAULT_LIVENESS,
        statuses=agent.statuses,
        on_command=agent.on_command,
        keys=opts.keys,
    )
    agent.attach(link)
    link_task = asyncio.create_task(link.run(), name="head-link")
    try:
        await link_task
    finally:
        link_task.cancel()
        await agent.stop_all()
        link.close()
        state.close()
        log.info("agent %s stopped", capacity.node_id)
    return 0


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    configure("node_agent")
    return run_until_signal(_serve(opts))
