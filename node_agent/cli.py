"""`python -m node_agent` / `tokenbus agent`: flags, capacity, the state directory (re-adopting the replicas a previous
agent left running), the head link, and a clean stop on SIGTERM/SIGINT (which stops every replica)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from pathlib import Path

from bus.endpoints import DEFAULT_HEARTBEAT_S, DEFAULT_LIVENESS, DEFAULT_ROUTER
from bus.log_setup import configure
from bus.run import run_until_signal
from node_agent.agent import Agent
from node_agent.binaries import bin_dir
from node_agent.capacity import default_cpu_slots, gpu_count, memory_bytes
from node_agent.head_link import Capacity, HeadLink
from node_agent.state import StateDir, StateDirError, default_state_dir

log = logging.getLogger("node_agent")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tokenbus agent", description="the tokenbus node agent")
    p.add_argument("--head", default=DEFAULT_ROUTER, help=f"the head's ROUTER endpoint (default {DEFAULT_ROUTER})")
    p.add_argument("--node-id", default=f"{socket.gethostname()}-{os.getpid()}", help="default: hostname-pid")
    p.add_argument("--cpu-slots", type=int, default=default_cpu_slots(), help="replicas this node runs at most")
    p.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT_S, help="heartbeat interval in seconds")
    p.add_argument("--host", default="127.0.0.1", help="the address replicas bind their gRPC servers to")
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
    opts = p.parse_args(argv)
    if opts.cpu_slots < 0:
        p.error("--cpu-slots must be >= 0")
    if opts.heartbeat <= 0:
        p.error("--heartbeat must be > 0")
    if opts.orphan_timeout is not None and not opts.orphan_timeout > 0:
        p.error("--orphan-timeout must be > 0")
    if opts.state_dir is None:
        opts.state_dir = default_state_dir(opts.node_id)
    return opts


async def _serve(opts: argparse.Namespace) -> int:
    capacity = Capacity(opts.node_id, opts.host, opts.cpu_slots, gpu_count(), memory_bytes())
    binaries = bin_dir()
    log.info(
        "agent %s started: %d cpu slots, %d gpus, %d MiB; replicas bind to %s; binaries from %s",
        capacity.node_id,
        capacity.cpu_slots,
        capacity.gpus,
        capacity.memory_bytes >> 20,
        opts.host,
        binaries,
    )
    try:
        state = StateDir(opts.state_dir)
    except StateDirError as e:
        log.error("agent %s cannot start: %s", opts.node_id, e)
        return 1
    log.info("agent %s keeps its replicas' state in %s", opts.node_id, state.path)
    agent = Agent(opts.node_id, opts.host, binaries, state, opts.orphan_timeout)
    await agent.adopt()
    link = HeadLink(
        opts.head,
        capacity,
        heartbeat_s=opts.heartbeat,
        liveness=DEFAULT_LIVENESS,
        statuses=agent.statuses,
        on_command=agent.on_command,
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
