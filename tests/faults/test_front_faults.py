"""Faults at the front: more clients than a deployment's capacity, slowloris connections, and `tokenbus up`
interrupted (SIGINT) under load."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cluster_harness import UP_READY_S, Up, shm_entries

from faults.harness import DEPLOYMENT, OK, CaseReport, Load, burst, sim_spec, until
from tools.chaos import Outcome, Via
from tools.local_cluster import LocalCluster
from tools.procs import alive
from tools.up import DEPLOYMENT as UP_DEPLOYMENT

pytestmark = pytest.mark.timeout(240)

IO_TIMEOUT_S = 30.0  # the proxy's deadline for each read of a client connection (proxy_cpp/proxy/connection.hpp)


async def test_overload_small_max_concurrency(
    make_cluster: Callable[..., Awaitable[LocalCluster]], case: CaseReport
) -> None:
    c = await make_cluster(sim_spec(replicas=1, max_concurrency=2))
    results = await burst([c.proxy_url], 60, max_tokens=100)
    case.check(results, max_errors=None)
    refused = [r for r in results if r.outcome is Outcome.ERROR]
    assert sum(r.outcome in OK for r in results) >= 2, "the deployment's capacity is served"
    for r in refused:  # a refusal is an answer: 429 (queue full or waited out) or 503, with when to come back
        assert r.via is Via.STATUS and r.status in (429, 503), str(r)
        assert r.retry_after is not None and int(r.retry_after) >= 1, str(r)


async def test_slowloris(make_cluster: Callable[..., Awaitable[LocalCluster]], case: CaseReport) -> None:
    c = await make_cluster(sim_spec(replicas=1))
    host, port = c.proxy_url.removeprefix("http://").split(":")
    slow = []
    for _ in range(50):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/" + DEPLOYMENT.encode() + b" HTTP/1.1\r\nHost: x\r\n")
        slow.append((reader, writer))
    opened = time.monotonic()

    async def trickle() -> None:  # a header byte now and then, never the end of the header
        while True:
            for _, writer in slow:
                if not writer.is_closing():
                    writer.write(b"X")
            await asyncio.sleep(1.0)

    trickler = asyncio.create_task(trickle())
    try:
        load = await Load([c.proxy_url], concurrency=8).start()
        try:
            await load.completed_since(0.0, 40)  # served while the slow connections hang on
        finally:
            results = await load.stop()
        case.check(results, max_errors=0)

        # each slow connection read to its end: whatever the proxy answers (408 or nothing), then its close
        to_end = [asyncio.create_task(reader.read()) for reader, _ in slow]

        async def all_closed() -> bool:
            return all(t.done() for t in to_end)

        await until(all_closed, IO_TIMEOUT_S * 2, "the proxy closes every slowloris connection")
        case.recovery_s["slow connections closed"] = time.monotonic() - opened
    finally:
        trickler.cancel()
        for _, writer in slow:
            writer.close()


async def test_sigint_of_up_under_load(tmp_path: Path, case: CaseReport) -> None:
    shm_before = shm_entries()
    up = Up(tmp_path / "state")
    try:
        up.wait_for("Ctrl-C stops everything", UP_READY_S)
        pids = up.pids()
        load = await Load([up.url], concurrency=16, deployment=UP_DEPLOYMENT).start()
        try:
            await load.completed_since(0.0, 16)
            replica_pids = up.replica_pids()
            assert replica_pids
            interrupted = time.monotonic()
            up.proc.send_signal(signal.SIGINT)
            await until(lambda: _exited(up), 60.0, "tokenbus up stops after SIGINT")
            case.recovery_s["everything stopped"] = time.monotonic() - interrupted
        finally:
            results = await load.stop()
    finally:
        up.kill()
    # the streams open at the SIGINT finish (the proxy drains them before it exits); later requests are refused
    case.check([r for r in results if r.started < interrupted], max_errors=0)
    case.check([r for r in results if r.started >= interrupted], max_errors=None, proxy_killed=True)
    assert up.proc.returncode == 0, "".join(up.lines[-20:])
    assert not [pid for pid in [*pids.values(), *replica_pids] if alive(pid)]
    assert shm_entries() - shm_before == set()


async def _exited(up: Up) -> bool:
    return up.proc.poll() is not None
