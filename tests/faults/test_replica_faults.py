"""Faults of one replica: its worker or its gRPC face killed mid-stream or just before a burst, its worker
stopped (SIGSTOP) under load; and the replica count lowered under load."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable

import pytest

from faults.harness import (
    DEPLOYMENT,
    IDLE_TIMEOUT_S,
    SLACK_S,
    TOKEN_DELAY_MS,
    CaseReport,
    Load,
    burst,
    proxy_metrics,
    replicas_by_load,
    sim_spec,
    until,
)
from tools.local_cluster import LocalCluster

pytestmark = pytest.mark.timeout(240)

LONG_TOKENS = 200  # 1 s a stream: a fault lands in the middle of many


async def busy_replica(c: LocalCluster, load: Load) -> str:
    """The replica with the most calls in flight (at least 2)."""
    found: list[tuple[str, str, int]] = []

    async def busy() -> bool:
        nonlocal found
        found = await replicas_by_load(c)
        return bool(found) and found[0][2] >= 2

    await until(busy, 30.0, f"two streams in flight on one replica ({len(load.results)} done)")
    return found[0][0]


async def ready_count(c: LocalCluster) -> int:
    return len([r for r in await c.ready_replicas(DEPLOYMENT) if r.get("healthy", True)])


@pytest.mark.parametrize("process", ["worker", "replica"])
async def test_sigkill_mid_stream(
    make_cluster: Callable[..., Awaitable[LocalCluster]], case: CaseReport, process: str
) -> None:
    c = await make_cluster(sim_spec(replicas=2))
    load = await Load([c.proxy_url], concurrency=16, max_tokens=LONG_TOKENS).start()
    try:
        rid = await busy_replica(c, load)
        os.kill(c.replica_processes()[rid][process], signal.SIGKILL)
        killed = time.monotonic()
        await load.completed_since(killed, 16)  # new requests go to the live replica (or are retried)
        await until(lambda: _count_is(c, 2), 30.0, "a replacement replica READY")
        case.recovery_s["replacement READY"] = time.monotonic() - killed
    finally:
        results = await load.stop()
    retries = await proxy_metrics(c.proxy_url, "tokenbus_proxy_retries")
    # only the streams the dead replica had started can fail; anything before its first token is retried
    case.check(results, max_errors=None, streaming_at=killed, note=f"proxy: {retries}")


async def _count_is(c: LocalCluster, n: int) -> bool:
    return await ready_count(c) == n


async def test_replica_sigkill_then_50_at_once(
    make_cluster: Callable[..., Awaitable[LocalCluster]], case: CaseReport
) -> None:
    c = await make_cluster(sim_spec(replicas=2))
    rid = (await c.ready_replicas(DEPLOYMENT))[0]["id"]
    os.kill(c.replica_processes()[rid]["replica"], signal.SIGKILL)
    results = await burst([c.proxy_url], 50)
    retries = await proxy_metrics(c.proxy_url, "tokenbus_proxy_retries")
    case.check(results, max_errors=0, note=f"proxy: {retries}")


async def test_worker_sigstop_15s_under_load(
    make_cluster: Callable[..., Awaitable[LocalCluster]], case: CaseReport
) -> None:
    c = await make_cluster(sim_spec(replicas=2))
    load = await Load([c.proxy_url], concurrency=16, max_tokens=LONG_TOKENS).start()
    stopped_s = 15.0
    try:
        rid = await busy_replica(c, load)
        worker = c.replica_processes()[rid]["worker"]
        os.kill(worker, signal.SIGSTOP)
        stopped = time.monotonic()
        try:

            async def unhealthy() -> bool:
                return rid not in {r["id"] for r in await c.ready_replicas(DEPLOYMENT) if r.get("healthy", True)}

            case.recovery_s["stuck replica out of routing"] = await until(unhealthy, stopped_s, "replica unhealthy")
            await asyncio.sleep(stopped - time.monotonic() + stopped_s)  # the fault's length
        finally:
            os.kill(worker, signal.SIGCONT)
        resumed = time.monotonic()
        await until(lambda: _count_is(c, 2), 30.0, "two healthy READY replicas again (recovered or replaced)")
        case.recovery_s["2 healthy after SIGCONT"] = time.monotonic() - resumed
        await load.completed_since(time.monotonic(), 16)
    finally:
        results = await load.stop()
    retries = await proxy_metrics(c.proxy_url, "tokenbus_proxy_retries")
    case.check(results, max_errors=None, streaming_at=stopped, note=f"proxy: {retries}")
    # no stream waited out the stop: a stalled one ends at the idle timeout, one not started is retried
    stream_s = LONG_TOKENS * TOKEN_DELAY_MS / 1000
    longest = max(r.ended - r.started for r in results)
    assert longest < stream_s + IDLE_TIMEOUT_S + SLACK_S, f"a stream took {longest:.1f} s"
    late = [r for r in results if r.started > stopped + 8.0 and r.ended < stopped + stopped_s]
    assert late and all(r.attempts == 1 for r in late), "once detected, the stopped replica is routed no request"


async def test_scale_down_under_load(make_cluster: Callable[..., Awaitable[LocalCluster]], case: CaseReport) -> None:
    c = await make_cluster(sim_spec(replicas=3))
    load = await Load([c.proxy_url], concurrency=24, max_tokens=LONG_TOKENS).start()
    try:
        await load.completed_since(0.0, 24)
        await c.admin("scale", {"name": DEPLOYMENT, "replicas": 1})
        scaled = time.monotonic()
        case.recovery_s["scaled to 1"] = await until(lambda: _count_is(c, 1), 60.0, "one replica left")

        async def gone() -> bool:
            status = await c.admin("status")
            dep = next(d for d in status["deployments"] if d["name"] == DEPLOYMENT)
            return len(dep["replicas_list"]) == 1

        await until(gone, 60.0, "the drained replicas gone")
        case.recovery_s["drained and stopped"] = time.monotonic() - scaled
        await load.completed_since(time.monotonic(), 24)
    finally:
        results = await load.stop()
    case.check(results, max_errors=0)
