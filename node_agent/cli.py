"""`python -m node_agent` / `tokenbus agent`: flags, capacity, the head link, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket

from bus.endpoints import DEFAULT_HEARTBEAT_S, DEFAULT_LIVENESS, DEFAULT_ROUTER
from bus.log_setup import configure
from bus.run import run_until_signal
from node_agent.agent import Agent
from node_agent.binaries import bin_dir
from node_agent.capacity import default_cpu_slots, gpu_count, memory_bytes
from node_agent.head_link import Capacity, HeadLink

log = logging.getLogger("node_agent")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tokenbus agent", description="the tokenbus node agent")
    p.add_argument("--head", default=DEFAULT_ROUTER, help=f"the head's ROUTER endpoint (default {DEFAULT_ROUTER})")
    p.add_argument("--node-id", default=f"{socket.gethostname()}-{os.getpid()}", help="default: hostname-pid")
    p.add_argument("--cpu-slots", type=int, default=default_cpu_slots(), help="replicas this node runs at most")
    p.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT_S, help="heartbeat interval in seconds")
    p.add_argument("--host", default="127.0.0.1", help="the address replicas bind their gRPC servers to")
    opts = p.parse_args(argv)
    if opts.cpu_slots < 0:
        p.error("--cpu-slots must be >= 0")
    if opts.heartbeat <= 0:
        p.error("--heartbeat must be > 0")
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
    agent = Agent(opts.node_id, opts.host, binaries)
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
        log.info("agent %s stopped", capacity.node_id)
    return 0


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    configure("node_agent")
    return run_until_signal(_serve(opts))
